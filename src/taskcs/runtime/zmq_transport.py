"""ZeroMQ implementations of the transport: ROUTER on the server, DEALER on peers.

Frames are those of :mod:`taskcs.runtime.protocol`. Malformed input is dropped and logged
(never raised into the server loop), so one bad peer cannot stop the others.

Before a receiver blocks it polls its socket without sleeping for a short while (``spin``,
default :data:`DEFAULT_SPIN_US`, environment ``TASKCS_SPIN_US``; 0 turns it off). On this
kind of machine waking a blocked process costs 50-100 µs per ZeroMQ hop, and a round trip
through the server makes four; a receiver still polling when its message lands skips that
wake-up. The spin is adaptive: a receiver spins only while its recent waits were shorter
than the spin (a message that comes every few milliseconds is not worth a spinning core),
it gives its core away on every turn (``sched_yield``), and it ends the moment its owner
has other work.

TCP endpoints beyond loopback are CURVE-encrypted and authenticated (phase 4): the server's
ROUTER binds its ipc endpoint in the clear (the 0700 runtime directory guards it) and then,
with CURVE switched on for the binds that follow, each ``listen_curve`` endpoint; a ZAP
handler (:mod:`taskcs.server.security`) admits only trusted client keys. A connection to
``KEY@tcp://host:port`` is a CURVE client of the server whose public key is KEY, using the
key pair in this user's config directory (:mod:`taskcs.runtime.keys`).

A peer's ``wake`` writes a byte into a pipe that its poller watches alongside the socket:
waking costs one syscall and needs no second ZeroMQ socket (sockets are not thread-safe).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..errors import ProtocolError
from . import protocol
from .protocol import Message
from .ratelimit import DropLog
from .transport import PEER_BATCH, RECV_BATCH, Connection, PeerId, ServerTransport

log = logging.getLogger(__name__)

#: How long (µs) a receiver polls before it blocks, unless ``TASKCS_SPIN_US`` says otherwise.
#: A round trip through the server takes 300-600 µs here: a spin shorter than that misses.
DEFAULT_SPIN_US = 1000


def spin_seconds() -> float:
    """The spin before blocking, in seconds: ``TASKCS_SPIN_US`` or :data:`DEFAULT_SPIN_US`."""
    raw = os.environ.get("TASKCS_SPIN_US")
    if raw is None:
        return DEFAULT_SPIN_US / 1e6
    try:
        value = int(raw)
        if value < 0:
            raise ValueError
    except ValueError:
        log.warning("TASKCS_SPIN_US=%r is not a whole number of microseconds >= 0; using %d",
                    raw, DEFAULT_SPIN_US)
        return DEFAULT_SPIN_US / 1e6
    return value / 1e6


def _spin_for(spin: float, wait_avg: float, timeout: float | None) -> float:
    """How long to spin: nothing when recent waits outlasted the spin, never past ``timeout``."""
    if not spin or wait_avg >= spin or timeout == 0:
        return 0.0
    return spin if timeout is None else min(spin, timeout)


def _average_wait(avg: float, waited: float, spin: float) -> float:
    """The running mean of waits, each capped at 4 spins so one long idle spell is forgiven soon."""
    return avg + (min(waited, 4 * spin) - avg) * 0.25


def _spin(sock: zmq.Socket[Any], seconds: float, pending: Callable[[], bool] | None = None) -> bool:
    """Poll ``sock`` (and ``pending``) without sleeping for up to ``seconds``; True if ready."""
    if seconds <= 0:
        return False
    get = sock.get
    clock = time.perf_counter
    end = clock() + seconds
    while not get(zmq.EVENTS) & zmq.POLLIN:  # type: ignore[operator,arg-type]
        if (pending is not None and pending()) or clock() >= end:
            return pending is not None and pending()
        os.sched_yield()  # releases the GIL too, so this process's other threads run
    return True


#: Peers whose WELCOME the server transport remembers (their bodies take the fast unpickler).
MAX_WELCOMED = 65536

#: Frames at least this big are sent zero-copy; below it pyzmq's copy is cheaper than the
#: bookkeeping of a zero-copy frame (its garbage-collector thread showed up in profiles).
ZERO_COPY_BYTES = 1 << 16


def _recv_message(sock: zmq.Socket[Any], router: bool) -> list[Any]:
    """One multipart message (zmq.Again if none): a ROUTER's identity frame and the message
    frame as bytes, the payload frames after them as memoryviews of ZeroMQ's own buffers,
    so a big payload is not copied on its way in (:func:`protocol.to_frames`)."""
    parts: list[Any] = [sock.recv(zmq.NOBLOCK)]
    if router and sock.rcvmore:
        parts.append(sock.recv(zmq.NOBLOCK))
    while sock.rcvmore:
        parts.append(sock.recv(zmq.NOBLOCK, copy=False).buffer)
    return parts


def _send_parts(sock: zmq.Socket[Any], parts: list[Any]) -> None:
    """One multipart message; big parts (payload buffers) are handed to ZeroMQ uncopied."""
    last = len(parts) - 1
    for i, part in enumerate(parts):
        sock.send(part, zmq.SNDMORE if i < last else 0, copy=len(part) < ZERO_COPY_BYTES)


def _tune(sock: zmq.Socket[Any]) -> None:
    sock.linger = 0
    # Unbounded ZeroMQ queues: taskcs bounds memory with its own credits, and a ROUTER that
    # hits its high-water mark silently drops messages, which would lose results.
    sock.sndhwm = 0
    sock.rcvhwm = 0


class _Spinning:
    """Poll-before-block for a transport with ``sock`` and a ``poller`` watching it."""

    sock: zmq.Socket[Any]
    poller: zmq.Poller
    spin: float  # seconds; 0: never
    wait_avg: float  # seconds: how long recent receives waited (see _spin_for)

    def _poll(self, timeout: float | None, spin: bool, pending: Callable[[], bool] | None = None) -> Any:
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if not (spin and self.spin > 0):
            return self.poller.poll(ms)
        t0 = time.perf_counter()
        if _spin(self.sock, _spin_for(self.spin, self.wait_avg, timeout), pending):
            ms = 0
        ready = self.poller.poll(ms)
        self.wait_avg = _average_wait(self.wait_avg, time.perf_counter() - t0, self.spin)
        return ready


class ZmqServerTransport(_Spinning, ServerTransport):
    """A bound ROUTER socket."""

    def __init__(self, endpoint: str, context: zmq.Context[Any] | None = None,
                 spin: float | None = None) -> None:
        self.context = context or zmq.Context.instance()
        self.spin = spin_seconds() if spin is None else spin
        self.wait_avg = 0.0
        self.sock = self.context.socket(zmq.ROUTER)
        _tune(self.sock)
        self.sock.router_mandatory = True  # an unroutable peer raises instead of vanishing silently
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.dropped = 0

    def recv(self, timeout: float | None, spin: bool = True) -> list[tuple[PeerId, Message]]:
        """See :meth:`ServerTransport.recv`.

        Garbage is cheap to reject and logged rate-limited per peer (:class:`DropLog`); bodies
        from peers the server has not welcomed are decoded with the bomb-proof unpickler; no
        peer gets more than :data:`PEER_BATCH` messages of one batch, so a flooding peer cannot
        delay the others' messages (ZeroMQ takes turns between connections) or their heartbeats
        (the server ticks after every batch).
        """
        drops = self._drop_log()
        drops.flush(time.monotonic())
        if not self._poll(timeout, spin):
            return []
        out: list[tuple[PeerId, Message]] = []
        sock = self.sock
        welcomed = self._welcomed_peers()
        taken: dict[PeerId, int] = {}
        for _ in range(RECV_BATCH):
            try:
                frames = _recv_message(sock, True)
            except zmq.Again:
                break
            peer = frames[0]
            count = taken[peer] = taken.get(peer, 0) + 1
            if len(frames) < 2:
                self._dropped(peer, "an empty message")
                continue
            frame = frames[1]
            if frame[:4] != protocol.HEADER:  # the commonest garbage, rejected without a decode
                self._dropped(peer, f"bad protocol header {bytes(frame[:8])!r}")
                continue
            try:
                out.append((peer, protocol.from_wire(frame, frames[2:], untrusted=peer not in welcomed)))
            except ProtocolError as exc:
                self._dropped(peer, str(exc))
            if count >= PEER_BATCH and len(taken) == 1:
                break  # one peer has had its turn: tick, then read on (others may be waiting)
        return out

    def listen_curve(self, endpoint: str, keypair: Any) -> str:
        """Also bind ``endpoint`` with CURVE as this server (``keypair``); the bound endpoint.

        ZeroMQ applies security options to the binds made after they are set, so the ipc
        endpoint bound in ``__init__`` stays plain while this one is encrypted.
        """
        self.sock.curve_server = True
        self.sock.curve_publickey = keypair.public
        self.sock.curve_secretkey = keypair.secret
        self.sock.bind(endpoint)
        return str(self.sock.getsockopt_string(zmq.LAST_ENDPOINT))

    # ---- issue 9 (items 3, 5): rate-limited drops, welcomed and unreachable peers ---------------------------------
    # Created on first use (the constructor belongs to the endpoint/security options).
    _drops: DropLog | None = None
    _welcomed: dict[PeerId, None] | None = None
    _unreachable: set[PeerId] | None = None

    def _drop_log(self) -> DropLog:
        if self._drops is None:
            self._drops = DropLog(log)
        return self._drops

    def _welcomed_peers(self) -> dict[PeerId, None]:
        if self._welcomed is None:
            self._welcomed = {}
        return self._welcomed

    def _unreachable_peers(self) -> set[PeerId]:
        if self._unreachable is None:
            self._unreachable = set()
        return self._unreachable

    def take_unreachable(self) -> list[PeerId]:
        """Peers a send failed to since the last call: their connection is gone (the ROUTER
        forgets a peer when its socket closes, e.g. when its process dies)."""
        if not self._unreachable:
            return []
        peers = list(self._unreachable)
        self._unreachable.clear()
        return peers

    def _dropped(self, peer: PeerId, reason: str) -> None:
        self.dropped += 1
        self._drop_log().drop(peer, reason, time.monotonic())

    def _note_sent(self, peer: PeerId, msg: Message) -> None:
        """A peer the server welcomed is trusted with the fast (C) unpickler from now on."""
        if type(msg) is protocol.Welcome:
            welcomed = self._welcomed_peers()
            if len(welcomed) >= MAX_WELCOMED:
                del welcomed[next(iter(welcomed))]  # bounded: the oldest falls back to the safe path
            welcomed[peer] = None
    # ---- end issue 9 (items 3, 5) ---------------------------------------------------------------

    def send(self, peer: PeerId, msg: Message) -> None:
        """See :meth:`ServerTransport.send`."""
        self._note_sent(peer, msg)  # issue 9 (item 5)
        try:
            frames = protocol.to_frames(msg)
            if len(frames) == 1:
                self.sock.send_multipart([peer, frames[0]], copy=len(frames[0]) < ZERO_COPY_BYTES)
            else:
                _send_parts(self.sock, [peer, *frames])
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer disconnected
            log.debug("cannot send %s to %r: %s", msg.COMMAND.name, peer[:8], exc)
            if exc.errno == zmq.EHOSTUNREACH and len(self._unreachable_peers()) < MAX_WELCOMED:
                self._unreachable_peers().add(peer)  # issue 9: see take_unreachable

    def close(self, linger: float = 0.0) -> None:
        """See :meth:`ServerTransport.close`; ``linger`` seconds to deliver queued messages."""
        self.sock.close(linger=int(linger * 1000))


def split_address(address: str) -> tuple[bytes | None, str]:
    """``KEY@tcp://host:port`` -> (KEY, endpoint); a plain endpoint -> (None, endpoint)."""
    from .keys import valid_key

    # A z85 key is exactly 40 characters and may itself hold '@', ':' or '/'.
    if "://" not in address[:8]:
        key, sep, endpoint = address[:40], address[40:41], address[41:]
        if sep != "@" or "://" not in endpoint:
            raise ProtocolError(f"{address!r} is neither an endpoint (tcp://host:port) nor "
                                "PUBLIC_KEY@tcp://host:port")
        if not valid_key(key):
            raise ProtocolError(f"{key!r} in {address!r} is not a server's public key (see `cs-server keys show`)")
        return key.encode(), endpoint
    return None, address


def secure_client(sock: zmq.Socket[Any], address: str, keypair: Any = None) -> str:
    """Make ``sock`` a CURVE client when ``address`` names a server key; the endpoint to connect."""
    server_key, endpoint = split_address(address)
    if server_key is not None:
        from . import keys

        pair = keypair or keys.load()
        sock.curve_serverkey = server_key
        sock.curve_publickey = pair.public
        sock.curve_secretkey = pair.secret
    return endpoint


class ZmqConnection(_Spinning, Connection):
    """A DEALER connected to a server endpoint."""

    def __init__(self, endpoint: str, context: zmq.Context[Any] | None = None,
                 spin: float | None = None) -> None:
        self.context = context or zmq.Context.instance()
        self.endpoint = endpoint
        self.spin = spin_seconds() if spin is None else spin
        self.wait_avg = 0.0
        #: Work of the owner that should end a spin early (the client's outbox, say).
        self.pending: Callable[[], bool] | None = None
        self.sock = self.context.socket(zmq.DEALER)
        _tune(self.sock)
        # ms; a peer started before its server binds (forked executors) retries this soon,
        # backing off up to reconnect_ivl_max.
        self.sock.reconnect_ivl = 10
        self.sock.reconnect_ivl_max = 2000
        self.sock.connect(secure_client(self.sock, endpoint))
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        #: wake() may come from any thread, also after close(): once closed, the pipe's numbers
        #: belong to whatever the process opens next (a direct link's socket, a received memfd)
        self._fd_lock = threading.Lock()
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(self._rfd, zmq.POLLIN)
        self.dropped = 0

    def send(self, msg: Message) -> None:
        """See :meth:`Connection.send`."""
        frames = protocol.to_frames(msg)
        if len(frames) == 1:
            self.sock.send(frames[0], copy=len(frames[0]) < ZERO_COPY_BYTES)
        else:
            _send_parts(self.sock, frames)

    def recv(self, timeout: float | None, spin: bool = True) -> list[Message]:
        """See :meth:`Connection.recv`; ``spin=False`` blocks at once."""
        events = dict(self._poll(timeout, spin, self.pending))
        if self._rfd in events:
            with contextlib.suppress(BlockingIOError):
                os.read(self._rfd, 4096)
        out: list[Message] = []
        if self.sock not in events:
            return out
        for _ in range(RECV_BATCH):
            try:
                frames = _recv_message(self.sock, False)
            except zmq.Again:
                break
            try:
                out.append(protocol.from_wire(frames[0], frames[1:]))
            except ProtocolError as exc:
                self.dropped += 1
                log.warning("dropped malformed message from the server: %s", exc)
        return out

    def wake(self) -> None:
        """See :meth:`Connection.wake`."""
        # A full pipe means a wake is pending anyway; a closed one means we are shutting down.
        with self._fd_lock, contextlib.suppress(OSError):
            if self._wfd >= 0:
                os.write(self._wfd, b"!")

    def close(self, linger: float = 0.0) -> None:
        """See :meth:`Connection.close`; ``linger`` seconds to deliver queued messages."""
        self.sock.close(linger=int(linger * 1000))
        with self._fd_lock:  # idempotent: a second close must not close a reused number
            fds, self._rfd, self._wfd = (self._rfd, self._wfd), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
