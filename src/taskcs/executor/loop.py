"""The execution loop of an executor thread or process.

Data flow::

    server --TASKS--> conn.recv --> pending deque --> run_task --> results list
    server <--EXEC_DONE-- flush (pending empty, batch full, or FLUSH_SECONDS passed)
    server <--OUTPUT-- (process flavour) text the task printed, sent before its result
    server --INTERRUPT (+ SIGINT)--> stop a task whose client left (see ExecutorLoop)

Tasks run one at a time in the loop's thread; a batch of results is flushed as soon as the
executor runs out of work, so a lone task's round trip is not delayed, while a stream of tiny
tasks still travels in batches. Results waiting for batch-mates are also flushed before a
task that may be long starts (another function than the last one, or one that last ran for
longer than FLUSH_SECONDS): a quick task's result must not wait behind a 30 s sleep.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from ..runtime import protocol as p
from ..runtime.task import Status
from ..runtime.transport import Connection
from . import nesting as _nesting  # issue 13: inline subtasks of this process's task
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
    """Receives tasks on ``conn``, runs them, returns results, until BYE or ``stop``.

    In a process's main thread the loop can be interrupted (``interruptible``, the default
    there): the server sends INTERRUPT and then SIGINT, and the handler, which runs between
    the task's bytecodes or when a blocking call such as ``time.sleep`` is cut short, reads the
    socket and raises KeyboardInterrupt in the task if the INTERRUPT names it. A stray SIGINT
    (a Ctrl-C at the terminal, or one meant for a task that has just finished) is ignored.
    Elsewhere (executor threads) INTERRUPT only drops tasks still waiting.
    """

    def __init__(
        self,
        conn: Connection,
        name: str,
        capacity: int = 1,
        capture_output: bool = False,
        alive: Callable[[], bool] | None = None,
        interruptible: bool | None = None,
    ) -> None:
        self.conn = conn
        self.name = name
        self.capacity = capacity
        self.resolver = Resolver(name)
        self.capture = _CapturedStdout() if capture_output else None
        self.alive = alive  # e.g. "is my parent server still there"
        self.stop_event = threading.Event()
        self.heartbeat = 1.0
        self.interruptible = interruptible  # None: if run() runs in the main thread
        self._pending: deque[TaskEntry] = deque()
        self._last_ref = ""
        self._took: dict[str, int] = {}  # func_ref -> µs it last ran here (bounded)
        self._results: list[ResultEntry] = []
        self._bye: str | None = None
        self._running: int | None = None  # gid of the task being run
        self._stop_running = False  # an INTERRUPT named the running task
        self._in_handler = False

    def run(self) -> str:
        """Run until the server says BYE, ``stop_event`` is set, or ``alive()`` is false."""
        conn = self.conn
        conn.send(p.Hello("executor", self.name, os.getpid(), self.capacity))
        pending = self._pending
        last_flush = last_sent = time.monotonic()
        if self.capture is not None:
            sys.stdout = self.capture
        interruptible = self.interruptible
        if interruptible is None:
            interruptible = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if interruptible else None
        try:
            while not self.stop_event.is_set():
                timeout = 0 if pending else self.heartbeat
                for msg in conn.recv(timeout, spin=False):  # see executor_main
                    self._handle(msg)
                if self._bye is not None:
                    return self._bye
                while pending:
                    if self._results and self._may_be_long(pending[0][1]):
                        break  # send what is done first
                    self._results.append(self._run_one(pending.popleft()))
                    if self._bye is not None:
                        break
                    now = time.monotonic()
                    if len(self._results) >= FLUSH_COUNT or now - last_flush >= FLUSH_SECONDS:
                        break
                now = time.monotonic()
                results = self._results
                if results and (not pending or len(results) >= FLUSH_COUNT or now - last_flush >= FLUSH_SECONDS
                                or self._may_be_long(pending[0][1])):
                    conn.send(p.ExecDone(results))
                    self._results = []
                    last_flush = last_sent = now
                elif not pending and now - last_sent >= self.heartbeat:
                    if self.alive is not None and not self.alive():
                        return "the server process is gone"
                    conn.send(p.Heartbeat())
                    last_sent = now
                if self._bye is not None:
                    return self._bye
            return "stopped"
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if self.capture is not None:
                sys.stdout = sys.__stdout__

    def _handle(self, msg: p.Message) -> None:
        """React to one message from the server (also called from the SIGINT handler)."""
        if isinstance(msg, p.Tasks):
            self.resolver.add_blobs(msg.blobs)
            self._pending.extend(msg.tasks)
        elif isinstance(msg, (p.Cancel, p.Interrupt)):
            gids = set(msg.task_ids if isinstance(msg, p.Cancel) else msg.gids)
            dropped = self._drop(self._pending, gids)
            self._results.extend(dropped)
            if isinstance(msg, p.Cancel) and len(dropped) < len(gids):
                # Too late for the rest (running, or done with the result on its way): say so,
                # so the client's future.cancel() can answer False, as concurrent.futures does.
                late = gids - {entry[0] for entry in dropped}
                self.conn.send(p.NotCancelled(sorted(late)))
            if isinstance(msg, p.Interrupt) and self._running in gids:
                self._stop_running = True
                _nesting.stop_inline()  # issue 13: its subtasks running inline in this process
        elif isinstance(msg, p.Welcome):
            self.heartbeat = (msg.heartbeat_ms / 1000) or 1.0
        elif isinstance(msg, p.Bye):
            self._bye = msg.reason or "server said BYE"
        elif isinstance(msg, p.Error):
            log.warning("server error: %s", msg.text)

    def _may_be_long(self, ref: str) -> bool:
        """True if a task of ``ref`` may outlast the wait of results batched before it."""
        took = self._took.get(ref)
        return ref != self._last_ref or took is None or took > FLUSH_SECONDS * 1e6

    def _run_one(self, entry: TaskEntry) -> ResultEntry:
        """Run one task; an interrupted one yields a CANCELLED result (nobody waits for it)."""
        start = time.perf_counter()
        start_ns = time.time_ns()  # issue 11: an interrupted task's span on the timeline
        try:
            self._stop_running = False
            self._running = entry[0]
            result = run_task(self.resolver, entry)
        except KeyboardInterrupt:
            self._running = None
            if self.capture is not None:
                self.capture.take()  # its client is gone or does not want it
            return (entry[0], int(Status.CANCELLED), b"", int((time.perf_counter() - start) * 1e6),
                    start_ns, time.time_ns())
        finally:
            self._running = None
            if _nesting._inline:
                _nesting.stop_inline()  # issue 13: subtasks of a task that ended are cancelled
        if self.capture is not None and self.capture.parts:
            self.conn.send(p.Output([(entry[0], self.capture.take())]))
        if len(self._took) >= 4096:
            self._took.clear()  # bounded: a stream of distinct lambdas must not grow it
        self._last_ref = entry[1]
        self._took[entry[1]] = result[3]
        return result

    def _on_sigint(self, signum: int, frame: object) -> None:
        # Only while a task runs: then the loop is not inside the connection, so reading it
        # here cannot tear a message apart. Raise once per task: a second KeyboardInterrupt in
        # the task's own clean-up would only make it harder to stop.
        if self._running is None or self._in_handler:
            return
        self._in_handler = True
        try:
            for msg in self.conn.recv(0, spin=False):
                self._handle(msg)
        finally:
            self._in_handler = False
        if self._stop_running and self._running is not None:
            self._stop_running = False
            raise KeyboardInterrupt(f"task {self._running} was stopped: its client left or cancelled it")

    @staticmethod
    def _drop(pending: deque[TaskEntry], gids: set[int]) -> list[ResultEntry]:
        """Remove not-yet-started tasks ``gids`` from ``pending``; their CANCELLED results."""
        if not any(entry[0] in gids for entry in pending):
            return []
        kept = [entry for entry in pending if entry[0] not in gids]
        dropped = [(entry[0], int(Status.CANCELLED), b"", 0, 0, 0) for entry in pending if entry[0] in gids]
        pending.clear()
        pending.extend(kept)
        return dropped


def start_thread_executor(conn: Connection, name: str, capacity: int = 1) -> tuple[threading.Thread, ExecutorLoop]:
    """Start an executor on a daemon thread (phase 2); returns the thread and its loop."""
    loop = ExecutorLoop(conn, name, capacity)
    thread = threading.Thread(target=loop.run, name=f"taskcs-{name}", daemon=True)
    thread.start()
    return thread, loop
