"""The client's end of a lease (issue 10): its record, and the socket its executors reach.

The socket is bound in the per-user runtime directory (mode 0700), beside the server's, so
only this user's processes can connect to it (and a connection's peer credentials are
checked as well); see :mod:`taskcs.client.direct` for the flow.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ProtocolError
from ..runtime import protocol as p
from ..runtime import shm
from ..runtime.stream import StreamLink, StreamListener
from .recovery import Item

log = logging.getLogger(__name__)

_serial = itertools.count(1)
#: Most often the client reports its direct-path totals to the server: enough for `cs-server
#: status` and the dashboard, and a round trip of ~150 us does not wake the server each time.
REPORT_SECONDS = 0.005


@dataclass(slots=True, eq=False)
class _Leased:
    id: int
    name: str  # the executor's, as results on the server path name it
    ident: bytes  # its routing id on our ROUTER
    live: bool = False  # its HELLO arrived: it is connected
    revoked: bool = False
    inflight: dict[int, Item] = field(default_factory=dict)  # task_id -> what was sent
    known: set[str] = field(default_factory=set)  # blobs it has
    stopping: set[int] = field(default_factory=set)  # force-cancelled tasks still running there
    big: int = 0  # bytes of big payloads (>= OOB_BYTES) sent there and not answered yet


class DirectSocket:
    """The Unix socket that leased executors connect to (only this user can reach it), and
    their connections (:mod:`taskcs.runtime.stream`: ZeroMQ's I/O threads cost more than
    the whole rest of a direct round trip).

    An executor's first message on its connection is one frame, its routing id
    (``LEASE_ID_PREFIX`` + lease id); protocol messages follow. Every file descriptor is
    watched by the client connection's ZeroMQ poller (:meth:`attach`), so one wait covers
    the server and the executors; a connection with unsent bytes is watched for POLLOUT too.

    Shared memory (:mod:`taskcs.runtime.shm`): each connection offers our arena first, ACKED
    (a TASKS region is freed by :meth:`ack` as its tasks' results come); the executor's is
    RELEASED, so the owner calls :meth:`release` once it has handled what :meth:`recv` gave.
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, f"direct-{os.getpid()}-{next(_serial)}.sock")
        self._listener = StreamListener(self.path)
        self.endpoint = "unix://" + self.path
        self._links: dict[int, StreamLink] = {}  # fd -> connection
        self._ident: dict[int, bytes] = {}  # fd -> its executor's routing id, once said
        self._by_ident: dict[bytes, StreamLink] = {}
        self._writing: set[int] = set()  # fds with bytes the kernel has not taken
        self._poller: Any = None  # the client connection's zmq.Poller
        self._ready = select.poll()  # the same fds, for a check that never blocks
        self._ready.register(self._listener.fd, select.POLLIN)
        self._holding: list[StreamLink] = []  # links with executors' regions to give back

    def attach(self, poller: Any) -> None:
        """Watch every descriptor with ``poller`` (a new connection's, after a reconnection)."""
        import zmq

        self._poller = poller
        poller.register(self._listener.fd, zmq.POLLIN)
        for fd in self._links:
            poller.register(fd, zmq.POLLIN | (zmq.POLLOUT if fd in self._writing else 0))

    def readable(self) -> bool:
        """True if an executor sent something (or connected): one poll(2) that never blocks."""
        return bool(self._ready.poll(0))

    def recv(self) -> list[tuple[bytes, p.Message]]:
        """Every message waiting, with its sender's routing id (never blocks)."""
        out: list[tuple[bytes, p.Message]] = []
        ready = self._ready.poll(0)
        if not ready:
            return out
        links = self._links
        for fd, events in ready:
            if fd == self._listener.fd:
                for new in self._listener.accept():
                    self._add(new)
                continue
            found = links.get(fd)
            if found is None:
                continue
            link = found
            if events & select.POLLOUT and not events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._flush(link)
                continue
            ident = self._ident.get(fd)
            for frames in link.recv_frames():
                if ident is None:  # its first message: who it is
                    ident = bytes(frames[0])
                    if not ident.startswith(p.LEASE_ID_PREFIX) or len(frames) != 1:
                        log.warning("a direct connection did not say which lease it serves: closed")
                        link.close()
                        break
                    self._ident[fd] = ident
                    old = self._by_ident.get(ident)
                    if old is not None and old is not link:
                        self._drop(old)
                    self._by_ident[ident] = link
                    continue
                try:
                    out.append((ident, p.from_wire(frames[0], frames[1:])))
                except ProtocolError as exc:
                    log.warning("dropped a malformed message from a leased executor: %s", exc)
            if link.holds:
                self._holding.append(link)
            if link.closed:
                self._drop(link)
            elif link.wants_write:
                self._flush(link)
        return out

    def release(self) -> None:
        """What :meth:`recv` returned is handled: the executors' regions it came in are free."""
        for link in self._holding:
            link.release_held()
        self._holding.clear()

    def send(self, ident: bytes, msg: p.Message, tags: list[int] | tuple[()] = ()) -> bool:
        """Send to the executor ``ident``; False if it is not connected (it died). ``tags``:
        the task ids of a TASKS message, for :meth:`ack`."""
        link = self._by_ident.get(ident)
        if link is None or link.closed:
            log.debug("cannot send to leased executor %r: not connected", ident)
            return False
        ok = link.send(msg, tags)
        if not ok:
            self._drop(link)
        elif link.wants_write:
            self._watch_write(link, True)
        return ok

    def flush(self) -> None:
        """Send what waits for the kernel on any connection (cheap when nothing does)."""
        for fd in list(self._writing):
            link = self._links.get(fd)
            if link is not None:
                self._flush(link)

    def _flush(self, link: StreamLink) -> None:
        if not link.flush():
            self._drop(link)
            return
        self._watch_write(link, link.wants_write)

    def _watch_write(self, link: StreamLink, on: bool) -> None:
        fd = link.fd
        if on == (fd in self._writing):
            return
        import zmq

        (self._writing.add if on else self._writing.discard)(fd)
        self._ready.modify(fd, select.POLLIN | (select.POLLOUT if on else 0))
        if self._poller is not None:
            self._poller.register(fd, zmq.POLLIN | (zmq.POLLOUT if on else 0))

    def shm_counts(self) -> tuple[int, int]:
        """Messages sent to and received from the connected executors through shared memory."""
        links = self._links.values()
        return sum(link.shm_sent for link in links), sum(link.shm_received for link in links)

    def ack(self, ident: bytes, results: list[tuple[Any, ...]]) -> None:
        """Executor ``ident`` answered for these tasks (EXEC_DONE entries, task id first):
        the TASKS regions they came in may be reused once each of their tasks is answered."""
        link = self._by_ident.get(ident)
        if link is not None and link.acking:
            link.ack([entry[0] for entry in results])

    def _add(self, link: StreamLink) -> None:
        import zmq

        link.offer_arena(shm.ACKED)
        self._links[link.fd] = link
        self._ready.register(link.fd, select.POLLIN)
        if self._poller is not None:
            self._poller.register(link.fd, zmq.POLLIN)

    def _drop(self, link: StreamLink) -> None:
        fd = link.fd
        if self._links.get(fd) is not link:
            return
        del self._links[fd]
        ident = self._ident.pop(fd, None)
        if ident is not None and self._by_ident.get(ident) is link:
            del self._by_ident[ident]
        self._writing.discard(fd)
        with contextlib.suppress(KeyError, ValueError):
            self._ready.unregister(fd)
        if self._poller is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._poller.unregister(fd)
        link.close()

    def close(self) -> None:
        """Close every connection and the listener, and remove its file."""
        for link in list(self._links.values()):
            self._drop(link)
        if self._poller is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._poller.unregister(self._listener.fd)
        self._listener.close()


def _load(lease: _Leased) -> int:
    return len(lease.inflight)


def _first_ref(lease: _Leased) -> str:
    """The function of the task its executor runs now (it runs them in the order sent)."""
    wire = next(iter(lease.inflight.values()))[1]
    return wire[1] if wire is not None else ""


class Totals:
    """A client's direct-path totals, and what the server last heard of them (LEASE_COUNTS:
    absolute numbers, so a report that is late or lost does no lasting harm)."""

    __slots__ = ("_at", "_reported", "counts")

    def __init__(self) -> None:
        self.counts = [0, 0, 0, 0, 0]  # submitted, done, failed, cancelled, retried
        self._reported: tuple[Any, ...] = ()
        self._at = 0.0

    def reset(self) -> None:
        """From zero (a new server); in place: the client holds the list."""
        self.counts[:] = [0, 0, 0, 0, 0]
        self._reported = ()

    def report(self, leases: Iterable[_Leased], waiting: int, force: bool) -> p.LeaseCounts | None:
        """The LEASE_COUNTS to send now, if anything changed and one is due (or ``force``);
        called after every batch of results, so it returns before looking at ``leases``
        (a view, not a list made for it) unless one is due."""
        now = time.monotonic()
        if not force and now - self._at < REPORT_SECONDS:
            return None
        in_flight = {lease.id: len(lease.inflight) for lease in leases}
        in_flight[0] = waiting  # waiting in the client for room on a lease
        running = {lease.id: _first_ref(lease) for lease in leases if lease.inflight}
        state = (*self.counts, in_flight, running)
        if state == self._reported:
            return None
        self._reported = state
        self._at = now
        submitted, done, failed, cancelled, retried = self.counts
        return p.LeaseCounts(submitted, done, failed, cancelled, retried, in_flight, running)

    def due_in(self) -> float | None:
        """Seconds until changed totals must be reported; None if nothing changed."""
        if tuple(self.counts) == self._reported[:5]:
            return None
        return max(0.0, self._at + REPORT_SECONDS - time.monotonic())
