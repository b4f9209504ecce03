"""Links to peer servers (``cs-server --peer KEY@tcp://host:port``), and the transport that
polls them together with the server's ROUTER.

Data flow::

    dispatcher --(link id, msg)--> LinkTransport.send --> that link's CURVE DEALER --> peer's ROUTER
    peer's ROUTER --> DEALER --> LinkTransport.recv --(link id, msg)--> dispatcher
    LinkManager.step(now): open due links (our HELLO via dispatcher.introduce), notice links
        the dispatcher has dropped (lost, BYE, refused) or that never got an answer, and
        re-open them with backoff

Each opening of a link is a new socket and a new link id (``generation``), so nothing sent on
an old connection can be taken for the new one: a peer's late results after it was declared
lost are never seen. The link carries work both ways; the server at the other end sees us
as one more peer on its ROUTER.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from ..errors import ProtocolError
from ..runtime import protocol
from ..runtime.dispatcher import Dispatcher, Outgoing, PeerId
from ..runtime.keys import KeyPair
from ..runtime.transport import RECV_BATCH, ServerTransport
from ..runtime.zmq_transport import ZmqServerTransport, secure_client, split_address

log = logging.getLogger(__name__)

#: First and longest wait before re-opening a lost link: quick after a blip, and a peer that
#: is down for long costs one connection attempt per BACKOFF_MAX seconds.
BACKOFF_MIN = 0.2
BACKOFF_MAX = 10.0


@dataclass(slots=True, eq=False)
class PeerLink:
    """One configured peer: where it is, which key it must prove, and the current socket."""

    index: int
    address: str
    server_key: bytes
    endpoint: str
    sock: Any = None
    id: PeerId = b""
    generation: int = 0
    state: str = "waiting"  # waiting (to (re)open) | connecting | connected
    next_attempt: float = 0.0
    backoff: float = BACKOFF_MIN
    since: float = 0.0
    name: str = ""
    attempts: int = 0
    #: The socket's event monitor: a TCP connection that closes (the peer's process died,
    #: its host went away) is known at once, not after the heartbeat liveness.
    monitor: Any = None
    disconnected: bool = False
    ids: set[PeerId] = field(default_factory=set)


def parse_peer(address: str, index: int) -> PeerLink:
    """A ``--peer`` value: ``KEY@tcp://host:port`` (the key is required: it names the peer)."""
    key, endpoint = split_address(address)
    if key is None or not endpoint.startswith("tcp://"):
        raise ProtocolError(f"--peer {address!r}: expected PUBLIC_KEY@tcp://host:port (the peer's "
                            "`cs-server keys show`)")
    return PeerLink(index, address, key, endpoint)


class InprocSource(Protocol):
    """Issue 14: a peer in this process (an engine link) with a pipe fd that wakes the poll."""

    fd: int

    def drain(self) -> list[tuple[PeerId, protocol.Message]]: ...
    def deliver(self, peer: PeerId, msg: protocol.Message) -> None: ...


class LinkTransport(ServerTransport):
    """The server's ROUTER plus one DEALER per open link, polled together."""

    def __init__(self, inner: ZmqServerTransport) -> None:
        self.inner = inner
        self.links: dict[PeerId, PeerLink] = {}
        self.poller = zmq.Poller()
        self.poller.register(inner.sock, zmq.POLLIN)
        self.sources: list[InprocSource] = []  # issue 14: engine links

    @property
    def dropped(self) -> int:
        """Malformed messages dropped (the ROUTER's count)."""
        return self.inner.dropped

    def attach(self, link: PeerLink) -> None:
        """Start polling ``link``'s socket under its current id."""
        self.links[link.id] = link
        self.poller.register(link.sock, zmq.POLLIN)
        link.disconnected = False
        link.monitor = link.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller.register(link.monitor, zmq.POLLIN)

    # ---- issue 14: in-process sources (engine links, taskcs.engines.link) ----
    def add_source(self, source: InprocSource) -> None:
        """Poll ``source.fd`` with the sockets; messages to ids starting 0xff 'E' go to it."""
        self.sources.append(source)
        self.poller.register(source.fd, zmq.POLLIN)

    def remove_source(self, source: InprocSource) -> None:
        """Stop polling ``source``."""
        if source in self.sources:
            self.sources.remove(source)
            self.poller.unregister(source.fd)
    # ---- end issue 14 ----

    def detach(self, link: PeerLink) -> None:
        """Stop polling ``link``'s socket and close it."""
        self.links.pop(link.id, None)
        if link.monitor is not None:
            self.poller.unregister(link.monitor)
            link.sock.disable_monitor()
            link.monitor.close(linger=0)
            link.monitor = None
        if link.sock is not None:
            self.poller.unregister(link.sock)
            link.sock.close(linger=0)
            link.sock = None

    def recv(self, timeout: float | None, spin: bool = True) -> list[tuple[PeerId, protocol.Message]]:
        """See :meth:`ServerTransport.recv`; link messages carry their link's id."""
        if not self.links and not self.sources:
            return self.inner.recv(timeout, spin)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        ready = dict(self.poller.poll(ms))
        out: list[tuple[PeerId, protocol.Message]] = []
        if self.inner.sock in ready:
            out.extend(self.inner.recv(0, spin=False))
        for link in list(self.links.values()):
            if link.sock in ready:
                out.extend(self._recv_link(link))
            if link.monitor is not None and link.monitor in ready:
                self._link_events(link)
        for source in self.sources:  # issue 14
            if source.fd in ready:
                out.extend(source.drain())
        return out

    def _link_events(self, link: PeerLink) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(link.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                link.disconnected = True  # LinkManager.step declares the peer lost

    def _recv_link(self, link: PeerLink) -> list[tuple[PeerId, protocol.Message]]:
        out = []
        for _ in range(RECV_BATCH):
            try:
                frames = [link.sock.recv(zmq.NOBLOCK)]
                while link.sock.rcvmore:
                    frames.append(link.sock.recv(zmq.NOBLOCK, copy=False).buffer)
            except zmq.Again:
                break
            try:
                out.append((link.id, protocol.from_wire(frames[0], frames[1:])))
            except ProtocolError as exc:
                log.warning("dropped malformed message from peer %s: %s", link.name or link.endpoint, exc)
        return out

    def send(self, peer: PeerId, msg: protocol.Message) -> None:
        """See :meth:`ServerTransport.send`."""
        link = self.links.get(peer)
        if link is None:
            if peer[:2] == b"\xffE":  # issue 14: an engine link, in this process
                for source in self.sources:
                    source.deliver(peer, msg)
                return
            if peer[:2] != b"\xffL":  # a closed link's id: its messages have nowhere to go
                self.inner.send(peer, msg)
            return
        frames = protocol.to_frames(msg)
        try:
            link.sock.send_multipart(frames, copy=False) if len(frames) > 1 else link.sock.send(frames[0])
        except zmq.ZMQError as exc:
            log.debug("cannot send %s to peer %s: %s", msg.COMMAND.name, link.endpoint, exc)

    def close(self, linger: float = 0.0) -> None:
        """See :meth:`ServerTransport.close`."""
        for link in list(self.links.values()):
            if link.monitor is not None:  # an open monitor socket would hang the context's term()
                link.monitor.close(linger=0)
                link.monitor = None
            if link.sock is not None:
                link.sock.close(linger=int(linger * 1000))
                link.sock = None
        self.links.clear()
        self.inner.close(linger)


class LinkManager:
    """Keeps every configured link open: connect, notice loss, reconnect with backoff."""

    def __init__(self, links: list[PeerLink], transport: LinkTransport, dispatcher: Dispatcher,
                 context: Any, keypair: KeyPair, answer_timeout: float, send: Callable[[Outgoing], None]) -> None:
        self.links = links
        self.transport = transport
        self.dispatcher = dispatcher
        self.context = context
        self.keypair = keypair
        #: A link with no HELLO back after this long is re-opened (the peer is down, or does
        #: not trust our key: its ZAP handler refuses the handshake and we learn nothing more).
        self.answer_timeout = answer_timeout
        self.send = send

    def step(self, now: float) -> None:
        """Open due links and notice the dispatcher's verdicts on open ones."""
        for link in self.links:
            if link.state == "waiting" and now >= link.next_attempt:
                self._open(link, now)
            elif link.state == "connecting":
                if self.dispatcher.is_server_peer(link.id):
                    link.state = "connected"
                    link.backoff = BACKOFF_MIN
                    link.name = self.dispatcher.peer_name(link.id)
                    log.info("linked to peer server %s at %s", link.name, link.endpoint)
                elif now - link.since > self.answer_timeout:
                    if link.attempts in (1, 3) or link.attempts % 10 == 0:
                        log.warning("peer %s: no answer within %.1fs (attempt %d); it may be down, or may not "
                                    "trust this server's key (run `cs-server keys trust %s` there)",
                                    link.endpoint, self.answer_timeout, link.attempts, self.keypair.public.decode())
                    self._close(link, now, "no answer")
            elif link.state == "connected" and link.disconnected:
                log.warning("connection to peer server %s at %s closed; its tasks run again elsewhere, "
                            "reconnecting", link.name, link.endpoint)
                self._close(link, now, "its connection closed")
            elif link.state == "connected" and not self.dispatcher.is_server_peer(link.id):
                log.warning("link to peer server %s at %s lost; reconnecting", link.name, link.endpoint)
                self._close(link, now, "lost")

    def _open(self, link: PeerLink, now: float) -> None:
        link.generation += 1
        link.attempts += 1
        # 0xff 'L' never starts a ROUTER's own routing ids (they start with a zero byte).
        link.id = b"\xffL" + struct.pack(">HI", link.index, link.generation)
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = sock.rcvhwm = 0  # credits bound the queues, as on every taskcs socket
        sock.reconnect_ivl = 100
        sock.reconnect_ivl_max = int(BACKOFF_MAX * 1000)
        sock.connect(secure_client(sock, link.address, self.keypair))
        link.sock = sock
        link.state = "connecting"
        link.since = now
        self.transport.attach(link)
        self.send(self.dispatcher.introduce(link.id, now))

    def _close(self, link: PeerLink, now: float, reason: str) -> None:
        self.send(self.dispatcher.forget(link.id, now, f"link {reason}"))
        self.transport.detach(link)
        link.state = "waiting"
        link.next_attempt = now + link.backoff
        link.backoff = min(link.backoff * 2, BACKOFF_MAX)

    def status(self) -> list[dict[str, Any]]:
        """Configured links as status records (connected ones are completed by the dispatcher)."""
        return [{"id": link.id.hex(), "name": link.name, "endpoint": link.endpoint,
                 "connected": link.state == "connected", "key": link.server_key.decode()} for link in self.links]

    def close(self) -> None:
        """Close every link's socket."""
        for link in self.links:
            self.transport.detach(link)
