"""Surviving the server's death: notice it at once, reach a successor, resubmit (#9, item 2).

Data flow::

    WELCOME(server_pid) --> ServerWatch: a pidfd of the local server, polled with the socket
                            (DisconnectWatch: a socket monitor, for a tcp server)
    server exits        --> pidfd readable --> the client's I/O step --> ServerLoss._recover
    _recover            --> reconnect(): connect, HELLO, WELCOME, with backoff, bounded
                            (the local server: started again as at start-up; a named
                            server: the same address, until RECONNECT_TIMEOUT)
                        --> _resubmit(): what was in flight goes to the outbox's front
    foreground results of the dead server's IOTasks --> complete() here, by (generation, gid)

A pidfd says "that process has exited" the moment it has, with no false alarm from a slow
server: heartbeat silence stays the fallback for servers whose process this machine cannot
see (tcp endpoints). The watch joins the connection's poller, so a client blocked waiting for
results wakes on the death as it would on a message.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import select
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import BrokenError, ServerStartError, SubmissionError, TaskcsError
from ..runtime import codec
from ..runtime import protocol as p
from ..runtime.task import FLAG_IO, Status
from ..runtime.transport import Connection
from .taskset import TaskFuture, TaskSet

#: An outbox entry: (set_id, (task_id, func_ref, payload, flags, retries), code blob); a
#: task of None closes the set.
Item = tuple[int, tuple[int, str, bytes, int, int] | None, bytes | None]

log = logging.getLogger(__name__)

#: How long a client keeps trying to reach a named server that went away before it fails the
#: futures: long enough for a restart (`cs-server stop; cs-server start`), short enough that
#: a script whose server is gone for good ends with a clear error.
RECONNECT_TIMEOUT = 30.0
#: First pause between attempts, doubled after each up to MAX_DELAY (Guide: backoff).
FIRST_DELAY = 0.05
MAX_DELAY = 2.0
#: Longest one attempt waits for WELCOME before it starts again on a fresh socket.
ATTEMPT_TIMEOUT = 2.0


class ServerWatch:
    """Becomes readable when the local server's process exits (a Linux pidfd)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.why = f"server process {pid} exited"
        self.fd: int | None = None
        self._poll = select.poll()
        try:
            self.fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return  # already gone: dead() says so at once
        self._poll.register(self.fd, select.POLLIN)

    def attach(self, conn: Connection) -> None:
        """Wake ``conn``'s blocking receive when the server dies (a ZeroMQ poller takes fds)."""
        poller = getattr(conn, "poller", None)
        if poller is not None and self.fd is not None:
            import zmq

            poller.register(self.fd, zmq.POLLIN)

    def dead(self) -> bool:
        """True once the process has exited (one non-blocking poll)."""
        return self.fd is None or bool(self._poll.poll(0))

    def close(self) -> None:
        """Release the pidfd."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class DisconnectWatch:
    """Becomes readable when the tcp connection to a (remote) server closes: a ZeroMQ socket
    monitor reporting EVENT_DISCONNECTED. A server killed on another machine closes its end
    (its kernel sends FIN or RST) long before its heartbeats are missed; a machine that
    vanishes without a word is still noticed by that silence."""

    def __init__(self, conn: Any) -> None:
        import zmq

        self.why = "the connection to the server closed"
        self._sock = conn.sock
        self.monitor = conn.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        conn.poller.register(self.monitor, zmq.POLLIN)

    def dead(self) -> bool:
        """True once a disconnection was reported (drains the monitor)."""
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        gone = False
        while self.monitor.poll(0):
            gone |= recv_monitor_message(self.monitor)["event"] == zmq.EVENT_DISCONNECTED
        return gone

    def close(self) -> None:
        """Stop monitoring (before the connection's socket closes) and close the monitor."""
        with contextlib.suppress(Exception):  # the socket may be closed already
            self._sock.disable_monitor()
        self.monitor.close(linger=0)


def watch_server(conn: Connection, server_pid: int) -> ServerWatch | DisconnectWatch | None:
    """A watch on the server behind ``conn``: its pid on this machine (an ipc endpoint), or
    the tcp connection to it; None for other connections (in-process)."""
    endpoint = str(getattr(conn, "endpoint", ""))
    if "tcp://" in endpoint and hasattr(conn, "sock") and hasattr(conn, "poller"):
        try:
            return DisconnectWatch(conn)
        except Exception as exc:  # zmq.ZMQError: monitoring unsupported; silence still tells
            log.debug("cannot monitor the connection to %s: %s", endpoint, exc)
            return None
    if not endpoint.startswith("ipc://") or server_pid <= 0 or server_pid == os.getpid():
        return None
    if not hasattr(os, "pidfd_open"):
        return None  # not Linux >= 5.3: heartbeat silence still tells
    try:
        watch = ServerWatch(server_pid)
    except OSError as exc:  # e.g. ENOSYS in a sandbox
        log.debug("cannot watch server pid %d: %s", server_pid, exc)
        return None
    watch.attach(conn)
    return watch


def await_welcome(conn: Connection, timeout: float) -> p.Welcome | None:
    """The server's WELCOME within ``timeout`` seconds, or None; ServerStartError if refused."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        for msg in conn.recv(left):
            if isinstance(msg, p.Welcome):
                return msg
            if isinstance(msg, p.Error):
                raise ServerStartError(f"server refused the connection: {msg.text}")
    return None


def reconnect(connect: Callable[[], Connection], hello: p.Hello, where: str, why: str,
              timeout: float = RECONNECT_TIMEOUT,
              give_up: Callable[[], bool] = lambda: False) -> tuple[Connection, p.Welcome]:
    """Connect again: ``connect()`` then HELLO until a WELCOME, with backoff, for at most
    ``timeout`` seconds; BrokenError naming ``where`` and ``why`` when none answers."""
    deadline = time.monotonic() + timeout
    delay = FIRST_DELAY
    error = "no answer"
    while True:
        conn: Any = None
        try:
            conn = connect()
            conn.send(hello)
            welcome = await_welcome(conn, min(ATTEMPT_TIMEOUT, max(0.05, deadline - time.monotonic())))
            if welcome is not None:
                return conn, welcome
            error = "no answer"
        except (TaskcsError, OSError) as exc:
            error = str(exc)
        except Exception as exc:  # zmq.ZMQError and the like: try again, as for OSError
            error = f"{type(exc).__name__}: {exc}"
        if conn is not None:
            conn.close()
        left = deadline - time.monotonic()
        if left <= 0 or give_up():
            raise BrokenError(f"lost the server at {where} ({why}), and no server answered there "
                              f"within {timeout:g}s: {error}")
        log.info("server at %s not back yet (%s); retrying in %.2fs", where, error, min(delay, left))
        time.sleep(min(delay, left))
        delay = min(delay * 2, MAX_DELAY)


class ServerLoss:
    """The part of :class:`~taskcs.client.client.Client` that outlives its server.

    Mixed into Client, whose state it shares (declared here for the type checker); runs in
    whichever thread does the client's I/O, under its I/O lock.
    """

    _conn: Connection
    _welcome: p.Welcome
    _hello: p.Hello
    _hb: float | None
    _last_recv: float
    _last_sent: float
    _where: str
    _reconnect_to: Callable[[], Connection] | None
    _reconnect_timeout: float
    _closed: bool
    _abandon: bool
    _owned: list[Any]
    _futures: dict[int, TaskFuture]
    _outbox: deque[Item]
    _inflight: dict[int, Item]
    _closed_sets: set[int]
    _sets: dict[int, TaskSet]
    _io_sent: dict[tuple[str, bytes], deque[int]]
    _fg_tasks: dict[int, int]
    _fg_orphans: dict[tuple[int, int], int]
    _gen: int
    _sent_blobs: set[str]
    _outstanding: int
    _watch: ServerWatch | DisconnectWatch | None
    name: str
    _timeline: deque[Any] | None  # issue 11: the timeline's ring (None: not kept)
    _retried: set[int]  # issue 11: task ids sent again to a new server, until their result

    def _break(self, exc: BaseException) -> None:
        raise NotImplementedError  # Client's

    def _has_pending(self) -> bool:
        raise NotImplementedError  # Client's

    def _claim_foreground(self, entry: tuple[int, str, bytes, str]) -> None:
        """Remember which of our IOTasks the server's ``entry`` (named by its gid) is: if that
        server dies, the task still completes here (it is not run twice)."""
        waiting = self._io_sent.get((entry[1], entry[2]))
        while waiting:
            task_id = waiting.popleft()
            if task_id in self._futures:
                self._fg_tasks[entry[0]] = task_id
                break
        if waiting is not None and not waiting:
            del self._io_sent[(entry[1], entry[2])]

    def _finish_orphan(self, gen: int, result: tuple[int, int, bytes, int, int, int]) -> None:
        task_id = self._fg_orphans.pop((gen, result[0]), None)
        fut = self._futures.pop(task_id, None) if task_id is not None else None
        if fut is not None:
            complete(fut, result[1], result[2], self.name)

    def _recover(self, why: str) -> None:
        """The server died or went silent: reach it (or its successor) again and resubmit.

        A local server is started again as at start-up; a named one is tried again at its
        address, with backoff, for ``reconnect_timeout`` seconds. Every unfinished task goes
        again, with one retry fewer, since it may have been running (a task with
        ``retries=0`` fails instead); IOTasks the foreground has taken complete here, and
        those it never saw go again as they are: they run only here, so they never ran.
        """
        if self._reconnect_to is None or (self._closed and not self._futures):
            self._break(BrokenError(why))
            return
        log.warning("lost %s (%s): reconnecting; %d tasks unfinished",
                    self._where, why, len(self._futures))
        if self._watch is not None:
            self._watch.close()  # first: a socket monitor is stopped on its live socket
            self._watch = None
        old = self._conn
        old_sock = getattr(old, "sock", None)
        if old_sock is not None:
            old_sock.close(linger=0)  # its wake pipe stays open (other threads may poke it)
            self._owned.append(old)  # until shutdown
        else:
            old.close()
        try:
            conn, welcome = reconnect(self._reconnect_to, self._hello, self._where, why,
                                      self._reconnect_timeout, give_up=lambda: self._abandon)
        except BrokenError as exc:
            self._conn = DeadConnection()
            self._break(exc)
            return
        self._conn, self._welcome = conn, welcome
        self._hb = welcome.heartbeat_ms / 1000 or None
        self._last_recv = self._last_sent = time.monotonic()
        if hasattr(conn, "pending"):
            conn.pending = self._has_pending
        self._watch = watch_server(conn, welcome.server_pid)
        self._resubmit(why)
        log.warning("reconnected to %s (server pid %d)", self._where, welcome.server_pid)

    def _resubmit(self, why: str) -> None:
        """Put every unfinished task that left for the dead server back at the outbox's front."""
        for gid, task_id in self._fg_tasks.items():
            self._fg_orphans[(self._gen, gid)] = task_id
        in_foreground = set(self._fg_tasks.values())
        self._gen += 1
        self._fg_tasks = {}
        self._io_sent.clear()
        self._sent_blobs.clear()
        self._outstanding = 0
        groups: dict[int, list[Item]] = {}  # by set, in order: a set's close follows its tasks
        for task_id, (set_id, wire, blob) in sorted(self._inflight.items()):
            fut = self._futures.get(task_id)
            if fut is None or task_id in in_foreground:
                continue  # done, or completing in our foreground
            assert wire is not None
            if fut.cancelled():
                del self._futures[task_id]  # the dead server owed us its CANCELLED result
                continue
            if not wire[3] & FLAG_IO:  # IOTasks not handed to us never ran: no retry spent
                if wire[4] <= 0:
                    del self._futures[task_id]
                    with contextlib.suppress(cf.InvalidStateError):
                        fut.set_exception(BrokenError(
                            f"task {fut.label} lost: {why} while it was queued or running there, "
                            "and retries=0 forbids running it again"))
                    continue
                wire = (wire[0], wire[1], wire[2], wire[3], wire[4] - 1)
                if self._timeline is not None:
                    self._retried.add(task_id)  # issue 11: its record says so
            groups.setdefault(set_id, []).append((set_id, wire, blob))
        self._inflight.clear()
        again: list[Item] = []
        for set_id, items in groups.items():
            again.extend(items)
            if set_id in self._closed_sets:
                again.append((set_id, None, None))
        for set_id in self._closed_sets - groups.keys():
            self._sets.pop(set_id, None)  # complete here; the dead server's SET_DONE never comes
        self._closed_sets.clear()
        self._outbox.extendleft(reversed(again))


def complete(fut: TaskFuture, status: int, payload: bytes, executor: str) -> None:
    """Give ``fut`` its result (from RESULTS, or from our foreground after a server died)."""
    fut.executor = executor
    try:
        if status == Status.OK:
            fut.set_result(codec.loads(payload))
        elif status == Status.ERROR:
            fut.set_exception(codec.error_to_exception(codec.decode_error(payload)))
        else:
            cf.Future.cancel(fut)  # the server cancelled it: no question to ask back
    except cf.InvalidStateError:
        pass  # cancelled by the caller a moment ago
    except Exception as exc:  # the result cannot be unpickled here
        fut.set_exception(SubmissionError(f"task {fut.label}: cannot decode its result: {exc}"))


class DeadConnection(Connection):
    """Stands in for a connection that could not be made again: sends go nowhere."""

    def send(self, msg: p.Message) -> None:
        """Dropped: there is no server."""

    def recv(self, timeout: float | None, spin: bool = True) -> list[p.Message]:
        """Nothing ever arrives."""
        return []

    def wake(self) -> None:
        """Nothing to wake."""

    def close(self, linger: float = 0.0) -> None:
        """Nothing to release."""
