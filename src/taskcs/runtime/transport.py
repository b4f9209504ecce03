"""The transport interface, and its in-process implementation on queue channels.

A transport moves :class:`~taskcs.runtime.protocol.Message` records between the server's
dispatcher and its peers. The server side sees every peer by an opaque ``PeerId`` (bytes);
each peer holds a :class:`Connection`. Phases differ only in which implementation they wire:

    phase 1-2   QueueHub / QueueConnection      objects through queue.SimpleQueue, no encoding
    phase 3-4   ZmqServerTransport / ZmqConnection (taskcs.runtime.zmq_transport): ROUTER/DEALER

Data flow of the queue flavour::

    QueueConnection.send ---> hub.inbox (one SimpleQueue) ---> QueueHub.recv -> dispatcher
    dispatcher -> QueueHub.send ---> peer's own SimpleQueue ---> QueueConnection.recv
"""

from __future__ import annotations

import itertools
import queue
import threading
from abc import ABC, abstractmethod

from .protocol import Message

PeerId = bytes

#: Messages taken from a transport in one go: big enough to batch, small enough that
#: heartbeats and other peers are not starved by one busy peer.
RECV_BATCH = 1024
#: Most messages one peer gets into a batch while no other peer has any: then the server
#: ticks (heartbeats, expiry) before reading on, however long that peer keeps sending.
PEER_BATCH = 256


class ServerTransport(ABC):
    """The server's end: one inbox for every peer, addressed replies."""

    @abstractmethod
    def recv(self, timeout: float | None, spin: bool = True) -> list[tuple[PeerId, Message]]:
        """Wait up to ``timeout`` seconds (None: forever) for messages; return all at hand.

        ``spin=False`` tells a transport that polls before blocking not to.
        """

    @abstractmethod
    def send(self, peer: PeerId, msg: Message) -> None:
        """Send ``msg`` to ``peer``; a peer that is gone is silently skipped."""

    @abstractmethod
    def close(self, linger: float = 0.0) -> None:
        """Release the transport's resources."""


class Connection(ABC):
    """A peer's end. ``send``/``recv`` belong to one owner thread; ``wake`` to any thread."""

    @abstractmethod
    def send(self, msg: Message) -> None:
        """Send ``msg`` to the server."""

    @abstractmethod
    def recv(self, timeout: float | None, spin: bool = True) -> list[Message]:
        """Wait up to ``timeout`` for messages or a :meth:`wake`; return what arrived.

        ``spin=False`` tells a transport that polls before blocking not to (nothing is expected).
        """

    @abstractmethod
    def wake(self) -> None:
        """Make a blocked :meth:`recv` return early (thread-safe)."""

    @abstractmethod
    def close(self, linger: float = 0.0) -> None:
        """Release the connection (it does not say BYE: the owner does that first);
        ``linger`` seconds are given to messages still queued."""


_WAKE = object()


class QueueHub(ServerTransport):
    """In-process transport: every peer gets a queue, the server one shared inbox."""

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[tuple[PeerId, Message] | object] = queue.SimpleQueue()
        self._peers: dict[PeerId, queue.SimpleQueue[Message | object]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def connect(self) -> QueueConnection:
        """A new peer connection to this hub."""
        with self._lock:
            peer_id = b"q%d" % next(self._ids)
            own: queue.SimpleQueue[Message | object] = queue.SimpleQueue()
            self._peers[peer_id] = own
        return QueueConnection(self, peer_id, own)

    def disconnect(self, peer_id: PeerId) -> None:
        """Forget a peer's queue."""
        with self._lock:
            self._peers.pop(peer_id, None)

    def recv(self, timeout: float | None, spin: bool = True) -> list[tuple[PeerId, Message]]:
        """See :meth:`ServerTransport.recv`."""
        try:
            first = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return []
        items = [first]
        while len(items) < RECV_BATCH:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        return [item for item in items if item is not _WAKE]  # type: ignore[misc]

    def send(self, peer: PeerId, msg: Message) -> None:
        """See :meth:`ServerTransport.send`."""
        own = self._peers.get(peer)
        if own is not None:
            own.put(msg)

    def wake(self) -> None:
        """Make a blocked :meth:`recv` return (used to stop the server thread)."""
        self.inbox.put(_WAKE)

    def close(self, linger: float = 0.0) -> None:
        """See :meth:`ServerTransport.close`."""
        with self._lock:
            self._peers.clear()


class QueueConnection(Connection):
    """A peer's end of a :class:`QueueHub`."""

    def __init__(self, hub: QueueHub, peer_id: PeerId, own: queue.SimpleQueue[Message | object]) -> None:
        self.hub = hub
        self.peer_id = peer_id
        self._own = own

    def send(self, msg: Message) -> None:
        """See :meth:`Connection.send`."""
        self.hub.inbox.put((self.peer_id, msg))

    def recv(self, timeout: float | None, spin: bool = True) -> list[Message]:
        """See :meth:`Connection.recv`."""
        try:
            first = self._own.get(timeout=timeout) if timeout != 0 else self._own.get_nowait()
        except queue.Empty:
            return []
        items = [first]
        while len(items) < RECV_BATCH:
            try:
                items.append(self._own.get_nowait())
            except queue.Empty:
                break
        return [item for item in items if item is not _WAKE]  # type: ignore[misc]

    def wake(self) -> None:
        """See :meth:`Connection.wake`."""
        self._own.put(_WAKE)

    def close(self, linger: float = 0.0) -> None:
        """See :meth:`Connection.close`."""
        self.hub.disconnect(self.peer_id)
