"""The execution loop of an executor thread or process.

Data flow::

    server --TASKS--> conn.recv --> pending deque --> run_task --> results list
    server <--EXEC_DONE-- flush (pending empty, batch full, or FLUSH_SECONDS passed)
    server <--OUTPUT-- (process flavour) text the task printed, sent before its result
    server --INTERRUPT (+ SIGINT)--> stop a task whose client left (see ExecutorLoop)
    server --LEASE--> a DirectLink to that client: its TASKS join the same pending queue, their
        results, OUTPUT and NOT_CANCELLED go back on the link (issue 10: the direct path)

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
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

from ..runtime import protocol as p
from ..runtime.task import Status
from ..runtime.transport import Connection
from ..runtime.zmq_transport import _average_wait, spin_seconds
from . import nesting as _nesting  # issue 13: inline subtasks of this process's task
from .direct import DirectLink, LeaseLinks, ServerOrigin
from .runner import Resolver, ResultEntry, TaskEntry, run_task

#: Where a task came from, and where its result goes: the server, or a leased client's link.
Origin = ServerOrigin | DirectLink

log = logging.getLogger(__name__)

#: Longest a finished result waits for batch-mates before it is sent.
FLUSH_SECONDS = 0.002
#: Most results in one EXEC_DONE message.
FLUSH_COUNT = 256
#: ... or past this many payload bytes: a big result leaves at once, so its client decodes it
#: while the next one is computed (issue 10).
FLUSH_BYTES = 1 << 20


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


class ExecutorLoop(LeaseLinks):
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
        self._pending: deque[tuple[TaskEntry, Origin]] = deque()
        self._last_ref = ""
        self._took: dict[str, int] = {}  # func_ref -> µs it last ran here (bounded)
        self._server = ServerOrigin(conn)
        self._links: dict[int, DirectLink] = {}  # lease id -> link (issue 10)
        self._unsent = 0  # results waiting in the origins' lists
        self._unsent_bytes = 0  # their payloads' bytes
        self._bye: str | None = None
        self._running: int | None = None  # gid of the task being run
        self._running_origin: Origin | None = None
        self._link_spin = spin_seconds()  # issue 10: see _spin_links
        self._link_poll: select.poll | None = None  # the links' descriptors, for _spin_links
        self._wait_avg = 0.0
        self._stop_running = False  # an INTERRUPT named the running task
        self._stop_inline_due = False  # issue 13: a task ended with inline subtasks running
        self._in_handler = False

    def run(self) -> str:
        """Run until the server says BYE, ``stop_event`` is set, or ``alive()`` is false."""
        conn = self.conn
        conn.send(p.Hello("executor", self.name, os.getpid(), self.capacity))
        pending = self._pending
        links = self._links
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
                waited = time.perf_counter() if links and not pending else 0.0
                if waited and self._spin_links():
                    timeout = 0
                if links:
                    self._watch_links()
                for msg in conn.recv(timeout, spin=False):  # see executor_main
                    self._handle(msg, self._server)
                if links:
                    if waited:
                        self._wait_avg = _average_wait(self._wait_avg, time.perf_counter() - waited, self._link_spin)
                    self._read_links()
                if self._bye is not None:
                    return self._bye
                while pending:
                    if self._unsent and self._may_be_long(pending[0][0][1]):
                        break  # send what is done first
                    entry, origin = pending.popleft()
                    result = self._run_one(entry, origin)
                    if not origin.closing:
                        origin.results.append(result)
                        self._unsent += 1
                        self._unsent_bytes += len(result[2])
                    elif origin is not self._server:
                        self._end_link_if_idle(origin)  # type: ignore[arg-type]
                    if self._stop_inline_due:  # issue 13: see _run_one
                        self._stop_inline_due = False
                        if self._flush():
                            last_sent = time.monotonic()
                        last_flush = time.monotonic()
                        _nesting.stop_inline()
                    if self._bye is not None:
                        break
                    now = time.monotonic()
                    if (self._unsent >= FLUSH_COUNT or self._unsent_bytes >= FLUSH_BYTES
                            or now - last_flush >= FLUSH_SECONDS):
                        break
                now = time.monotonic()
                if self._unsent and (not pending or self._unsent >= FLUSH_COUNT or self._unsent_bytes >= FLUSH_BYTES
                                     or now - last_flush >= FLUSH_SECONDS or self._may_be_long(pending[0][0][1])):
                    if self._flush():
                        last_sent = now
                    last_flush = now
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

    def _flush(self) -> bool:
        """Send every origin its results; True if the server got some."""
        self._unsent = self._unsent_bytes = 0
        to_server = False
        origins: list[Origin] = [self._server, *self._links.values()]
        for origin in origins:
            if origin.results:
                origin.send(p.ExecDone(origin.results))
                origin.results = []
                to_server |= origin is self._server
        return to_server

    def _handle(self, msg: p.Message, origin: Origin) -> None:
        """React to one message from the server or a leased client's link (also called from
        the SIGINT handler)."""
        if isinstance(msg, p.Tasks):
            if msg.blobs:  # the server's (holder 0) or a lease's (its id): Resolver.forget
                self.resolver.add_blobs(msg.blobs, getattr(origin, "lease_id", 0))
            if not origin.closing:
                self._pending.extend([(entry, origin) for entry in msg.tasks])
        elif isinstance(msg, (p.Cancel, p.Interrupt)):
            gids = set(msg.task_ids if isinstance(msg, p.Cancel) else msg.gids)
            dropped = self._drop(self._pending, gids, origin)
            origin.results.extend(dropped)
            self._unsent += len(dropped)
            if isinstance(msg, p.Cancel) and len(dropped) < len(gids):
                # Too late for the rest (running, or done with the result on its way): say so,
                # so the client's future.cancel() can answer False, as concurrent.futures does.
                late = gids - {entry[0] for entry in dropped}
                origin.send(p.NotCancelled(sorted(late)))
            if isinstance(msg, p.Interrupt) and self._running in gids and self._running_origin is origin:
                self._stop_running = True
                _nesting.stop_inline()  # issue 13: its subtasks running inline in this process
        elif isinstance(msg, p.Forget):  # blobs its sender no longer counts on us keeping
            self.resolver.forget(msg.digests, getattr(origin, "lease_id", 0))
        elif origin is not self._server:
            if not isinstance(msg, (p.Heartbeat, p.Bye)):
                log.warning("lease %d: unexpected %s from the client", getattr(origin, "lease_id", 0),
                            msg.COMMAND.name)
        elif isinstance(msg, p.Lease):
            self._open_link(msg)
        elif isinstance(msg, p.Release):
            self._release(msg)
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

    def _run_one(self, entry: TaskEntry, origin: Origin) -> ResultEntry:
        """Run one task; an interrupted one yields a CANCELLED result (nobody waits for it)."""
        start = time.perf_counter()
        start_ns = time.time_ns()  # issue 11: an interrupted task's span on the timeline
        try:
            self._stop_running = False
            self._running = entry[0]
            self._running_origin = origin
            # issue 10: a big result for a direct-path client is sent in pieces, never joined
            result = run_task(self.resolver, entry, scatter=origin is not self._server)
        except KeyboardInterrupt:
            self._running = None
            if self.capture is not None:
                self.capture.take()  # its client is gone or does not want it
            return (entry[0], int(Status.CANCELLED), b"", int((time.perf_counter() - start) * 1e6),
                    start_ns, time.time_ns())
        finally:
            self._running = None
            self._running_origin = None
            _nesting._ended[0] += 1  # issue 13: its late subtasks are not run (run_inline)
            if _nesting._direct:  # issues 10 + 13: a task sent on a lease had subtasks (see below)
                for lease_id, task_ids in _nesting.take_direct_parents().items():
                    self.conn.send(p.DirectEnded(lease_id, task_ids))
            if _nesting._inline:  # issue 13: subtasks of a task that ended are cancelled
                if origin is self._server:
                    # ... once its result is on its way (run() flushes, then stops them): an
                    # inline subtask's CANCELLED answer that reached the server first freed
                    # its nested client's foreground for the parent's next queued subtask,
                    # which started before the server learnt that the parent had ended.
                    self._stop_inline_due = True
                else:  # a direct parent: DIRECT_ENDED, just sent, told the server already
                    _nesting.stop_inline()
        if self.capture is not None and self.capture.parts:
            origin.send(p.Output([(entry[0], self.capture.take())]))
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
                self._handle(msg, self._server)
            self._read_links()
        finally:
            self._in_handler = False
        if self._stop_running and self._running is not None:
            self._stop_running = False
            raise KeyboardInterrupt(f"task {self._running} was stopped: its client left or cancelled it")

    @staticmethod
    def _drop(pending: deque[tuple[TaskEntry, Origin]], gids: set[int], origin: Origin) -> list[ResultEntry]:
        """Remove ``origin``'s not-yet-started tasks ``gids`` from ``pending``; their CANCELLED
        results (ids are per origin: a client's task ids and the server's gids may collide)."""
        if not any(entry[0] in gids and o is origin for entry, o in pending):
            return []
        kept = [(entry, o) for entry, o in pending if entry[0] not in gids or o is not origin]
        dropped = [(entry[0], int(Status.CANCELLED), b"", 0, 0, 0) for entry, o in pending
                   if entry[0] in gids and o is origin]
        pending.clear()
        pending.extend(kept)
        return dropped


def start_thread_executor(conn: Connection, name: str, capacity: int = 1) -> tuple[threading.Thread, ExecutorLoop]:
    """Start an executor on a daemon thread (phase 2); returns the thread and its loop."""
    loop = ExecutorLoop(conn, name, capacity)
    thread = threading.Thread(target=loop.run, name=f"taskcs-{name}", daemon=True)
    thread.start()
    return thread, loop
