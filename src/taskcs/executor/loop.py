"""The execution loop of an executor thread or process.

Data flow::

    server --TASKS--> conn.recv --> pending deque --> run_task --> results list
    server <--EXEC_DONE-- flush (pending empty, batch full, or FLUSH_SECONDS passed)
    server <--OUTPUT-- (process flavour) text the task printed, sent before its result

Tasks run one at a time in the loop's thread; a batch of results is flushed as soon as the
executor runs out of work, so a lone task's round trip is not delayed, while a stream of tiny
tasks still travels in batches.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from ..runtime import protocol as p
from ..runtime.task import Status
from ..runtime.transport import Connection
from .runner import Resolver, ResultEntry, TaskEntry, run_task

log = logging.getLogger(__name__)

#: Longest a finished result waits for batch-mates before it is sent.
FLUSH_SECONDS = 0.002
#: Most results in one EXEC_DONE message.
FLUSH_COUNT = 256


class _CapturedStdout(io.TextIOBase):
    """sys.stdout of an executor process: collects what the running task prints."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def writable(self) -> bool:
        return True

    def take(self) -> str:
        text = "".join(self.parts)
        self.parts.clear()
        return text


class ExecutorLoop:
    """Receives tasks on ``conn``, runs them, returns results, until BYE or ``stop``."""

    def __init__(
        self,
        conn: Connection,
        name: str,
        capacity: int = 1,
        capture_output: bool = False,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        self.conn = conn
        self.name = name
        self.capacity = capacity
        self.resolver = Resolver(name)
        self.capture = _CapturedStdout() if capture_output else None
        self.alive = alive  # e.g. "is my parent server still there"
        self.stop_event = threading.Event()
        self.heartbeat = 1.0

    def run(self) -> str:
        """Run until the server says BYE, ``stop_event`` is set, or ``alive()`` is false."""
        conn = self.conn
        conn.send(p.Hello("executor", self.name, os.getpid(), self.capacity))
        pending: deque[TaskEntry] = deque()
        results: list[ResultEntry] = []
        last_flush = last_sent = time.monotonic()
        if self.capture is not None:
            sys.stdout = self.capture
        try:
            while not self.stop_event.is_set():
                timeout = 0 if pending else self.heartbeat
                for msg in conn.recv(timeout, spin=False):  # see executor_main
                    if isinstance(msg, p.Tasks):
                        self.resolver.add_blobs(msg.blobs)
                        pending.extend(msg.tasks)
                    elif isinstance(msg, p.Cancel):
                        results.extend(self._drop(pending, set(msg.task_ids)))
                    elif isinstance(msg, p.Welcome):
                        self.heartbeat = (msg.heartbeat_ms / 1000) or 1.0
                    elif isinstance(msg, p.Bye):
                        return msg.reason or "server said BYE"
                    elif isinstance(msg, p.Error):
                        log.warning("server error: %s", msg.text)
                while pending:
                    entry = pending.popleft()
                    result = run_task(self.resolver, entry)
                    if self.capture is not None and self.capture.parts:
                        conn.send(p.Output([(entry[0], self.capture.take())]))
                    results.append(result)
                    now = time.monotonic()
                    if len(results) >= FLUSH_COUNT or now - last_flush >= FLUSH_SECONDS:
                        break
                now = time.monotonic()
                if results and (not pending or len(results) >= FLUSH_COUNT or now - last_flush >= FLUSH_SECONDS):
                    conn.send(p.ExecDone(results))
                    results = []
                    last_flush = last_sent = now
                elif not pending and now - last_sent >= self.heartbeat:
                    if self.alive is not None and not self.alive():
                        return "the server process is gone"
                    conn.send(p.Heartbeat())
                    last_sent = now
            return "stopped"
        finally:
            if self.capture is not None:
                sys.stdout = sys.__stdout__


    @staticmethod
    def _drop(pending: deque[TaskEntry], gids: set[int]) -> list[ResultEntry]:
        """Remove not-yet-started tasks ``gids`` from ``pending``; their CANCELLED results."""
        kept = [entry for entry in pending if entry[0] not in gids]
        dropped = [(entry[0], int(Status.CANCELLED), b"", 0) for entry in pending if entry[0] in gids]
        pending.clear()
        pending.extend(kept)
        return dropped


def start_thread_executor(conn: Connection, name: str, capacity: int = 1) -> tuple[threading.Thread, ExecutorLoop]:
    """Start an executor on a daemon thread (phase 2); returns the thread and its loop."""
    loop = ExecutorLoop(conn, name, capacity)
    thread = threading.Thread(target=loop.run, name=f"taskcs-{name}", daemon=True)
    thread.start()
    return thread, loop
