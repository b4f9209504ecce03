"""A leased executor's connection to its client (issue 10; see :mod:`taskcs.runtime.leases`).

Data flow::

    server --LEASE(id, endpoint)--> LeaseLinks._open_link --> DirectLink: a Unix stream socket
        connected to the client's listener; our arena's offer (RELEASED: runtime/shm.py), its
        routing id (LEASE_ID_PREFIX + id), then HELLO
    client --TASKS/CANCEL/INTERRUPT--> DirectLink.recv --> the loop's pending queue
        (big TASKS in the client's arena, which the client frees as we answer for each task)
    the loop --EXEC_DONE/OUTPUT/NOT_CANCELLED--> DirectLink.send --> client
    server --RELEASE--> the loop closes the link and answers RELEASE to the server

The link's descriptor joins the server connection's poller, so the loop blocks on both at once.
Only the owner of the 0700 runtime directory can reach the client's socket, so bodies are
decoded with the fast unpickler, as a server decodes its welcomed peers'.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from collections import deque
from typing import Any

from ..errors import ProtocolError
from ..runtime import protocol as p
from ..runtime import shm
from ..runtime.stream import StreamLink
from ..runtime.zmq_transport import _spin_for
from .runner import Resolver, ResultEntry, TaskEntry

log = logging.getLogger(__name__)


#: Seconds a reading of the machine's run queue stays valid (see :func:`contended`).
CONTENTION_SECONDS = 0.05
_contention = [0.0, False]  # (when read, contended)
_NCPU = os.cpu_count() or 1


def contended() -> bool:
    """True while more processes want to run than there are cores (``/proc/loadavg``'s
    running count, read at most every CONTENTION_SECONDS).

    A receiver that spins (sched_yield) on a machine with no idle core hands its core to
    another process for a whole time slice: a round trip went from ~280 µs blocking to
    ~900-1300 µs spinning with a test suite running beside it (2 cores). Spinning pays only
    when a core would otherwise idle; the running count (which includes the spinners
    themselves) tells that at once, where the load average lags by a minute.
    """
    now = time.monotonic()
    if now - _contention[0] < CONTENTION_SECONDS:
        return bool(_contention[1])
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        running = 0
    busy = running > _NCPU
    _contention[0], _contention[1] = now, busy
    return busy


class ServerOrigin:
    """Where tasks from the server came from: results go back on the server connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.results: list[ResultEntry] = []
        self.closing = False

    def send(self, msg: p.Message) -> None:
        """Send on the server connection."""
        self.conn.send(msg)


class DirectLink:
    """A connection to a client that leased this executor; tasks and their results travel on
    it (a Unix stream socket: :mod:`taskcs.runtime.stream` says why not ZeroMQ)."""

    def __init__(self, lease_id: int, endpoint: str, name: str, capacity: int) -> None:
        if not endpoint.startswith("unix://"):
            raise ProtocolError(f"lease {lease_id}: {endpoint!r} is not a unix:// endpoint")
        self.lease_id = lease_id
        self.results: list[ResultEntry] = []
        #: The lease was abandoned (its client is gone): nothing more is sent on it.
        self.closing = False
        self.done = [0, 0, 0]  # ok, error, cancelled: for the log
        self.link = StreamLink.connect(endpoint[len("unix://"):])
        self.fd = self.link.fd
        self.watching_write = False  # its poller registration includes POLLOUT
        # Our results' arena first (RELEASED: the client gives regions back as it unpickles);
        # the client's tasks may arrive in its own (ACKED), which this side only reads.
        self.link.offer_arena(shm.RELEASED)
        self.link.send_frames([p.LEASE_ID_PREFIX + str(lease_id).encode()])  # who we are
        self.send(p.Hello("executor", name, os.getpid(), capacity))

    @property
    def wants_write(self) -> bool:
        """True while bytes wait for the kernel (the loop then polls for POLLOUT)."""
        return self.link.wants_write

    def send(self, msg: p.Message) -> None:
        """Send ``msg`` to the client (dropped if the lease is being abandoned or the client is
        gone: the server ends the lease then)."""
        if self.closing:
            return
        if not self.link.send(msg):
            log.info("lease %d: the client is gone; dropped %s", self.lease_id, msg.COMMAND.name)

    def flush(self) -> None:
        """Send what the kernel did not take before."""
        self.link.flush()

    def recv(self) -> list[p.Message]:
        """Every message waiting (never blocks)."""
        return self.link.recv()

    def close(self) -> None:
        """Close the socket (the client has every result it waits for, or is gone)."""
        self.link.close()


class LeaseLinks:
    """The leases of an :class:`~taskcs.executor.loop.ExecutorLoop` (mixed into it, whose
    state it shares): opening, reading, watching and ending its links to clients."""

    conn: Any
    name: str
    capacity: int
    _links: dict[int, DirectLink]
    _link_spin: float
    _link_poll: select.poll | None
    _wait_avg: float
    _pending: deque[tuple[TaskEntry, Any]]
    _unsent: int
    _running_origin: Any
    _stop_running: bool
    resolver: Resolver

    def _handle(self, msg: p.Message, origin: Any) -> None:
        raise NotImplementedError  # the loop's

    def _flush(self) -> bool:
        raise NotImplementedError  # the loop's

    def _spin_links(self) -> bool:
        """Poll the links without sleeping for a while before blocking: the next task of a
        client waiting on each result comes within ~100 µs, and a blocked executor's wake-up
        costs about that much again (round trip p99 ~2.5 ms -> ~0.33 ms measured, 2 cores).
        Adaptive, as the transports' spin: only while recent waits were shorter than it."""
        spin = _spin_for(self._link_spin, self._wait_avg, None)
        if not spin or contended():
            return False
        ready = self._link_poll
        if ready is None:  # made again only when the links change (once per wait before)
            ready = self._link_poll = select.poll()
            for link in self._links.values():
                if not link.link.closed:
                    ready.register(link.fd, select.POLLIN)
        end = time.perf_counter() + spin
        while time.perf_counter() < end:
            if ready.poll(0):
                return True
            os.sched_yield()
        return False

    def _read_links(self) -> None:
        for link in list(self._links.values()):
            if link.wants_write:
                link.flush()
            for msg in link.recv():
                self._handle(msg, link)
            if link.link.closed and not link.closing:  # the client is gone: the server ends the lease
                link.closing = True
                poller = getattr(self.conn, "poller", None)
                self._link_poll = None
                if poller is not None:
                    with contextlib.suppress(KeyError):
                        poller.unregister(link.fd)  # a hung-up socket would wake every poll

    def _watch_links(self) -> None:
        """Before the loop blocks: watch a link for room in its socket while bytes of a big
        result wait for the kernel, and only then (POLLOUT is nearly always true)."""
        import zmq

        poller = getattr(self.conn, "poller", None)
        if poller is None:
            return
        for link in self._links.values():
            want = link.wants_write and not link.closing
            if want != link.watching_write and not link.link.closed:
                link.watching_write = want
                poller.register(link.fd, zmq.POLLIN | (zmq.POLLOUT if want else 0))

    def _open_link(self, msg: p.Lease) -> None:
        poller = getattr(self.conn, "poller", None)
        if poller is None or msg.lease_id in self._links:
            self.conn.send(p.Release(msg.lease_id, False))  # cannot serve it here: hand it back
            return
        try:
            link = DirectLink(msg.lease_id, msg.endpoint, self.name, self.capacity)
        except (OSError, ProtocolError) as exc:  # the client is gone already, say
            log.info("cannot reach the client of lease %d (%s): handed back", msg.lease_id, exc)
            self.conn.send(p.Release(msg.lease_id, False))
            return
        import zmq

        poller.register(link.fd, zmq.POLLIN)
        self._links[msg.lease_id] = link
        self._link_poll = None
        log.info("executor %s lent to client %s (pid %d)", self.name, msg.name, msg.pid)

    def _release(self, msg: p.Release) -> None:
        link = self._links.get(msg.lease_id)
        if link is None:
            self.conn.send(p.Release(msg.lease_id, False))
            return
        if not msg.abandon:
            self._flush()  # nothing should be left (the client drained); never lose a result
        link.closing = True
        kept = [(entry, o) for entry, o in self._pending if o is not link]
        self._pending.clear()
        self._pending.extend(kept)
        self._unsent -= len(link.results)
        link.results = []
        if self._running_origin is link:
            self._stop_running = True  # the server signals us: the task is stopped, as abandoned
        else:
            self._end_link_if_idle(link)

    def _end_link_if_idle(self, link: DirectLink) -> None:
        if self._running_origin is link or self._links.get(link.lease_id) is not link:
            return
        del self._links[link.lease_id]
        self.resolver.drop_holder(link.lease_id)  # the code only its client sent
        self._link_poll = None
        poller = getattr(self.conn, "poller", None)
        if poller is not None:
            with contextlib.suppress(KeyError):  # not if its client hung up (_read_links)
                poller.unregister(link.fd)
        link.close()
        self.conn.send(p.Release(link.lease_id, False))  # the server may give us its tasks again
