"""The client's end of a lease (issue 10): its record, and the ROUTER its executors reach.

The socket is bound in the per-user runtime directory (mode 0700), beside the server's, so
only this user's processes can connect to it; see :mod:`taskcs.client.direct` for the flow.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ProtocolError
from ..runtime import protocol as p
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


class DirectSocket:
    """The client's ROUTER that leased executors connect to (only this user can reach it)."""

    def __init__(self, directory: str) -> None:
        import zmq

        from ..runtime.zmq_transport import _tune

        self._zmq = zmq
        self.path = os.path.join(directory, f"direct-{os.getpid()}-{next(_serial)}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.sock: Any = zmq.Context.instance().socket(zmq.ROUTER)
        _tune(self.sock)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished executor raises
        try:
            self.sock.bind(f"ipc://{self.path}")
        except Exception:
            self.sock.close(linger=0)
            raise
        self.endpoint = f"ipc://{self.path}"

    def readable(self) -> bool:
        """True if a message waits (no system call beyond ZeroMQ's event check)."""
        return bool(self.sock.get(self._zmq.EVENTS) & self._zmq.POLLIN)

    def recv(self) -> list[tuple[bytes, p.Message]]:
        """Every message waiting, with its sender's routing id (never blocks)."""
        from ..runtime.zmq_transport import _recv_message

        out: list[tuple[bytes, p.Message]] = []
        zmq = self._zmq
        sock = self.sock
        # An events check per message, not a failed receive at the end: zmq.Again costs ~3 µs.
        while sock.get(zmq.EVENTS) & zmq.POLLIN:
            try:
                frames = _recv_message(sock, True)
            except zmq.Again:
                break
            try:
                out.append((frames[0], p.from_wire(frames[1], frames[2:])))
            except (ProtocolError, IndexError) as exc:
                log.warning("dropped a malformed message from a leased executor: %s", exc)
        return out

    def send(self, ident: bytes, msg: p.Message) -> bool:
        """Send to the executor ``ident``; False if it is not connected (it died)."""
        from ..runtime.zmq_transport import ZERO_COPY_BYTES, _send_parts

        frames = p.to_frames(msg)
        try:
            if len(frames) == 1:
                self.sock.send_multipart([ident, frames[0]], copy=len(frames[0]) < ZERO_COPY_BYTES)
            else:
                _send_parts(self.sock, [ident, *frames])
        except self._zmq.ZMQError as exc:  # EHOSTUNREACH: gone; LEASE_LOST will follow
            log.debug("cannot send to leased executor %r: %s", ident, exc)
            return False
        return True

    def close(self) -> None:
        """Close the socket and remove its file."""
        self.sock.close(linger=0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


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

    def report(self, leases: list[_Leased], waiting: int, force: bool) -> p.LeaseCounts | None:
        """The LEASE_COUNTS to send now, if anything changed and one is due (or ``force``)."""
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
