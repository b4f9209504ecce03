"""Protocol messages on a Unix stream socket: the direct path's link (issue 10).

A client and the executors it leased exchange TASKS and EXEC_DONE on one of these (see
:mod:`taskcs.client.direct` and :mod:`taskcs.executor.direct`). Why not ZeroMQ, as every other
hop: a ZeroMQ message crosses the library's I/O thread on each side, two thread wake-ups per
hop beside the kernel's. Measured here (2 cores, one trivial task per round trip, pickled
both ways, 3,000 round trips): a Unix socketpair between two processes 42 µs p50 and 59 µs
p99; ZeroMQ REQ/REP over ipc 151 µs p50; ProcessPoolExecutor ~220 µs. The direct path has
exactly two ends, one owner each, so none of ZeroMQ's routing, reconnection or queueing is
needed there: a socket in the 0700 runtime directory, non-blocking, with a queue of what
the kernel has not taken yet, is the whole transport.

Wire format, per message: a little-endian u32 frame count n (at most MAX_FRAMES), n u64
frame lengths, then the n frames: :func:`protocol.to_frames`' frames, so payloads of at
least ``OOB_BYTES`` travel as frames of their own, not copied into the pickle. They are sent
with one ``sendmsg`` (scatter-gather: no concatenation), and a message of at least
BIG_MESSAGE bytes is received straight into a buffer of its own size, its frames returned
as memoryviews of it: a 10 MB payload is copied once by the kernel in each direction and
never by Python. Where both ends offered an arena (:mod:`taskcs.runtime.shm`), a message
of at least ``SHM_BYTES`` is written into the sender's shared memory instead and only its
place crosses the socket: a u32 of SHM_FLAG | n, the u64 offset of its first frame in the
arena, the n frame lengths. An arena is offered once, as a link's first message (ARENA_WORD,
u64 size, u32 mode, its memfd passed with SCM_RIGHTS); until a link has read its first
message it receives with ``recvmsg`` to catch that descriptor, then with ``recv_into``.

Both ends are single-threaded by construction (the client's I/O lock, the executor's
loop), so nothing here locks. A link that reads end-of-file or fails is ``closed``: the
owner learns an executor's death from the server (LEASE_LOST), which stays authoritative.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections import deque
from typing import Any

from ..errors import ProtocolError
from . import protocol as p
from . import shm

log = logging.getLogger(__name__)

_COUNT = shm.COUNT
_LEN = shm.LENGTH
#: More frames than this in one message is a corrupt stream (a TASKS batch carries one frame
#: per big payload, at most a few hundred).
MAX_FRAMES = shm.MAX_FRAMES
#: A message at least this big is read into a buffer of its own (see the module docstring).
BIG_MESSAGE = 1 << 18
#: Bytes asked of the kernel per receive of small messages.
CHUNK = 1 << 18
#: The kernel caps this at its maximum (net.core.wmem_max); asking costs nothing.
SOCKET_BUFFER = 1 << 22
#: sendmsg takes at most IOV_MAX (1024 on Linux) buffers at a time.
_IOV = 1000


def _tune(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    sock.setblocking(False)


class StreamLink(shm.ArenaLink):
    """One end of a connected Unix stream socket carrying framed messages (and, with
    :meth:`offer_arena`, big ones in shared memory: :class:`~taskcs.runtime.shm.ArenaLink`)."""

    __slots__ = ("_big", "_chunk", "_got", "_head", "_out", "_rbuf", "closed", "fd", "sock")

    def __init__(self, sock: socket.socket) -> None:
        _tune(sock)
        self.sock = sock
        self.fd = sock.fileno()
        self.closed = False
        self._out: deque[memoryview] = deque()  # what the kernel has not taken yet
        self._rbuf = b""  # received bytes not yet part of a whole message
        # Receives land here: sock.recv(CHUNK) would allocate CHUNK bytes each time, and an
        # allocation that big is an mmap and page faults (~20 µs a receive, profiled).
        self._chunk = memoryview(bytearray(CHUNK))
        self._big: bytearray | None = None  # a big message being read (the module docstring)
        self._head: list[int] = []  # its frame lengths
        self._got = 0  # bytes of it read so far
        self._init_arenas()

    @classmethod
    def connect(cls, path: str) -> StreamLink:
        """Connect to the listener at ``path`` (raises OSError if there is none)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)  # a local listener accepts at once (or the backlog is full: raise)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    # ------------------------------------------------------------------ sending
    @property
    def wants_write(self) -> bool:
        """True while bytes wait for the kernel to take them (poll this fd for POLLOUT)."""
        return bool(self._out)

    def send(self, msg: p.Message, tags: list[Any] | tuple[()] = ()) -> bool:
        """Queue ``msg`` and send what the kernel takes now; False if the link is closed.
        ``tags``: for an ACKED arena, what the peer acknowledges (:meth:`ack`) once done
        with the message; without them a big message does not go through that arena."""
        return self.send_frames(p.to_frames(msg, scatter=True), tags)

    def send_frames(self, frames: list[Any], tags: list[Any] | tuple[()] = ()) -> bool:
        """Send raw frames as one message (see the module docstring); False if closed. A
        frame may be a list of pieces (a :class:`~taskcs.runtime.protocol.Scattered`
        payload's parts): they go out back to back as that one frame, never joined here."""
        if self.closed:
            return False
        views: list[memoryview] = []
        lengths: list[bytes] = []
        size = 0  # the frames' bytes
        for frame in frames:
            if type(frame) is list:
                pieces = [memoryview(piece).cast("B") for piece in frame]
                views.extend(pieces)
                n = sum(v.nbytes for v in pieces)
            else:
                view = memoryview(frame) if type(frame) is bytes else memoryview(frame).cast("B")
                views.append(view)
                n = view.nbytes
            lengths.append(_LEN.pack(n))
            size += n
        head = self._into_arena(views, lengths, size, tags) if self._arena is not None else b""
        if head:
            views, size = [], 0  # written into our arena: only its place goes
        else:
            head = _COUNT.pack(len(lengths)) + b"".join(lengths)
        if self._out:
            self._out.append(memoryview(head))
            self._out.extend(views)
            return self.flush()
        parts = [memoryview(head), *views]
        total = len(head) + size
        try:
            sent = self.sock.sendmsg(parts) if len(parts) <= _IOV else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._fail(exc)
            return False
        if sent == total:
            return True
        self._queue_rest(parts, sent)
        return self.flush()

    def _queue_rest(self, parts: list[memoryview], sent: int) -> None:
        for part in parts:
            n = part.nbytes
            if sent >= n:
                sent -= n
                continue
            self._out.append(part[sent:] if sent else part)
            sent = 0

    def flush(self) -> bool:
        """Send what waits, as far as the kernel takes it now; False if the link failed."""
        out = self._out
        while out:
            batch = [out[i] for i in range(min(len(out), _IOV))]
            try:
                sent = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                self._fail(exc)
                return False
            while sent and out:
                n = out[0].nbytes
                if sent >= n:
                    out.popleft()
                    sent -= n
                else:
                    out[0] = out[0][sent:]
                    sent = 0
        return True

    # ------------------------------------------------------------------ receiving
    def recv_frames(self) -> list[list[Any]]:
        """Every whole message that has arrived, as frame lists (never blocks)."""
        out: list[list[Any]] = []
        sock = self.sock
        while not self.closed:
            if self._big is not None:
                view = memoryview(self._big)[self._got:]
                try:
                    n = sock.recv_into(view)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._fail(exc)
                    break
                if n == 0:
                    self._fail(None)
                    break
                self._got += n
                if self._got == len(self._big):
                    out.append(self._split_big())
                continue
            try:
                n = self._recv_fds() if self._want_fds else sock.recv_into(self._chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fail(exc)
                break
            if not n:
                self._fail(None)
                break
            # Parsed where it landed; what must outlive the next receive is copied out of it.
            data = memoryview(self._rbuf + self._chunk[:n].tobytes()) if self._rbuf else self._chunk[:n]
            try:
                self._parse(data, out)
            except ProtocolError as exc:
                log.warning("closing a direct link with a corrupt stream: %s", exc)
                self._fail(None)
                break
            if n < CHUNK and self._big is None:
                break  # drained: a further recv would only fail (a system call saved)
        return out

    def _parse(self, buf: memoryview, out: list[list[Any]]) -> None:
        """Whole messages of ``buf`` to ``out`` (frames copied out of it); the start of a big
        one to its own buffer; a partial small one to ``_rbuf``."""
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (count,) = _COUNT.unpack_from(buf, pos)
            if count & (shm.SHM_FLAG | shm.ARENA_WORD):
                used = self._parse_special(buf, pos, count, out)
                if not used:
                    break
                pos += used
                continue
            if not 0 < count <= MAX_FRAMES:
                raise ProtocolError(f"a message of {count} frames")
            body = pos + 4 + 8 * count
            if end < body:
                break
            lengths = [_LEN.unpack_from(buf, pos + 4 + 8 * i)[0] for i in range(count)]
            size = sum(lengths)
            if end - body < size and size >= BIG_MESSAGE:
                # Read the rest into its own buffer: one copy of what came, none of the rest.
                big = bytearray(size)
                have = end - body
                big[:have] = buf[body:end]
                self._big, self._head, self._got = big, lengths, have
                pos = end
                break
            if end - body < size:
                break
            frames: list[Any] = []
            at = body
            for n in lengths:
                frames.append(buf[at:at + n].tobytes())
                at += n
            out.append(frames)
            pos = at
        if pos:
            self._want_fds = False  # a first message is read: any arena offer came with it
        self._rbuf = buf[pos:end].tobytes() if pos < end else b""

    def _split_big(self) -> list[Any]:
        assert self._big is not None
        view = memoryview(self._big)
        frames: list[Any] = []
        at = 0
        for i, n in enumerate(self._head):
            # The first frame is the pickled message (bytes, for io.BytesIO); payloads stay views.
            frames.append(bytes(view[at:at + n]) if i == 0 else view[at:at + n])
            at += n
        self._big, self._head, self._got = None, [], 0
        return frames

    def recv(self) -> list[p.Message]:
        """Every whole message that has arrived, decoded; malformed ones dropped and logged."""
        msgs: list[p.Message] = []
        for frames in self.recv_frames():
            try:
                msgs.append(p.from_wire(frames[0], frames[1:]))
            except ProtocolError as exc:
                log.warning("dropped a malformed message on a direct link: %s", exc)
        return msgs

    # ------------------------------------------------------------------ the end
    def _fail(self, exc: BaseException | None) -> None:
        if exc is not None:
            log.debug("direct link failed: %s", exc)
        self.closed = True
        self._out.clear()

    def close(self) -> None:
        """Close the socket (what the kernel has not taken is dropped) and the arenas."""
        self.closed = True
        self._out.clear()
        self.sock.close()
        self._close_arenas()

class StreamListener:
    """A listening Unix socket at ``path`` (created here, removed by :meth:`close`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
            self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self._uid = os.getuid()

    def accept(self) -> list[StreamLink]:
        """Every connection waiting (never blocks); one of another user is refused."""
        links: list[StreamLink] = []
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return links
            except OSError as exc:
                log.warning("direct path: accept failed: %s", exc)
                return links
            # The directory is 0700 already; the peer's credentials make sure of it.
            try:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                uid = struct.unpack("3i", creds)[1]
            except OSError:
                uid = -1
            if uid != self._uid:
                log.warning("direct path: refused a connection of uid %d", uid)
                sock.close()
                continue
            links.append(StreamLink(sock))

    def close(self) -> None:
        """Close the socket and remove its file."""
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
