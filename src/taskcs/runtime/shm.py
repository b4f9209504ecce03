"""Shared memory for the direct path's big messages (issue 10).

A message of at least SHM_BYTES on a :class:`~taskcs.runtime.stream.StreamLink` is written
once into its sender's *arena*, a memfd both processes map, and only its place crosses the
socket. Why: on these machines a page fault costs ~3.5 µs. A 1 MB payload crossing a socket
is copied by the kernel twice and read into a fresh buffer of ~250 pages, all faulted; and
the profile of a 1 MB echo benchmark had the client ~80 % in the kernel (page faults 37 % of
its time, socket copies 17 %). Arena pages fault once per link and are then reused.

Each side of a link owns the arena it writes (created when the link opens, its descriptor
sent once with SCM_RIGHTS) and allocates regions in it first-fit, so a steady stream of
messages keeps reusing the same low pages. A region is given back in one of two ways, fixed
per arena:

- ``ACKED``: the sender knows when the receiver is done. A client's TASKS region is freed
  when every task in it has its EXEC_DONE entry (an executor reads a task's arguments
  before it answers for it; cancelled ones are answered too). The receiver maps it
  read-only.
- ``RELEASED``: the receiver says so, by clearing the region's first byte once it has
  handled the message (a client unpickles results as they arrive); the sender looks at
  those bytes before it allocates. No message, no wake-up. This relies on the receiver's
  reads of a region being ordered before its later store to the flag, which x86-64 (TSO)
  guarantees: :func:`available` is False elsewhere, and links fall back to the socket.

When an arena has no room (a receiver slow to give regions back), the message goes on the
socket as before: nothing waits for memory and nothing is lost. An arena lives as long as
its link; the memfd goes when both processes have unmapped it.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import logging
import mmap
import os
import platform
import socket
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import ProtocolError

log = logging.getLogger(__name__)

#: A message at least this big is sent through the arena (smaller ones cost less as bytes on
#: the socket than a region's bookkeeping).
SHM_BYTES = 1 << 18
#: Size of an arena's address space, in MiB (``TASKCS_SHM_MB``). A memfd is sparse: only
#: pages written count, and first-fit reuse keeps those to the most bytes in flight at once.
ARENA_MB = 256
#: Pages past this are given back to the kernel whenever an arena empties (a burst of big
#: results must not stay resident for the rest of a long lease).
KEEP_BYTES = 32 << 20
#: Regions start on page boundaries; their first byte is the RELEASED flag.
_ALIGN = 4096
_HEADER = 64
ACKED = 1
RELEASED = 2
#: A link's count words outside 1..MAX_FRAMES (:mod:`taskcs.runtime.stream`): a message in
#: the sender's arena, and the offer of an arena.
SHM_FLAG = 1 << 31
ARENA_WORD = 1 << 30
#: The link's framing (defined here, where both halves of the link can import it): a count
#: word, then u64 lengths; at most MAX_FRAMES frames.
COUNT = struct.Struct("<I")
LENGTH = struct.Struct("<Q")
_ARENA_BODY = struct.Struct("<QI")  # an offer: the arena's size and mode
_ANCILLARY = socket.CMSG_SPACE(4 * 4)
MAX_FRAMES = 1 << 16


def arena_bytes() -> int:
    """The size of a new arena: ``TASKCS_SHM_MB`` MiB, else ARENA_MB."""
    try:
        mb = int(os.environ.get("TASKCS_SHM_MB", ARENA_MB))
    except ValueError:
        mb = ARENA_MB
    return max(1, mb) << 20


def available() -> bool:
    """True where arenas work: Linux memfds, x86-64 (see the module docstring), and
    ``TASKCS_SHM`` not set to ``0``."""
    return (hasattr(os, "memfd_create") and platform.machine().lower() in ("x86_64", "amd64")
            and os.environ.get("TASKCS_SHM", "1") != "0")


class Arena:
    """The sender's arena: regions allocated, written, and taken back."""

    def __init__(self, mode: int, size: int = 0) -> None:
        self.mode = mode
        self.size = size = size or arena_bytes()
        self.fd = os.memfd_create("taskcs-direct", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._mm = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise
        self._view = memoryview(self._mm)
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, size), sorted, coalesced
        self._used: dict[int, int] = {}  # offset -> size of each region handed out
        self._pending: dict[int, int] = {}  # ACKED: offset -> tags not yet acknowledged
        self._region_of: dict[Any, int] = {}  # ACKED: tag -> offset
        self._high = 0  # end of the highest region handed out since the arena was last trimmed

    def close_fd(self) -> None:
        """Close the descriptor once the peer has its own (the mapping stays)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def put(self, views: Sequence[memoryview], total: int, tags: Iterable[Any] = ()) -> int:
        """Write ``views`` (``total`` bytes) into a new region and return the offset of their
        first byte, or -1 if there is no room. In an ACKED arena the region is freed once
        each of ``tags`` is acknowledged (:meth:`ack`), so ``tags`` must not be empty. (A
        RELEASED arena's cleared regions are taken back by :meth:`reclaim`, which the link
        calls before every message it sends.)"""
        need = -(-(total + _HEADER) // _ALIGN) * _ALIGN
        offset = self._alloc(need)
        if offset < 0:
            return -1
        if self.mode == ACKED:
            count = 0
            for tag in tags:
                self._region_of[tag] = offset
                count += 1
            self._pending[offset] = count
        view = self._view
        at = offset + _HEADER
        for part in views:
            n = part.nbytes
            view[at:at + n] = part
            at += n
        self._mm[offset] = 1  # held by the receiver (RELEASED clears it)
        return offset + _HEADER

    @property
    def pending(self) -> bool:
        """ACKED arenas: True while some region waits for its tags' acknowledgements."""
        return bool(self._region_of)

    def ack(self, tags: Iterable[Any]) -> None:
        """ACKED arenas: the receiver is done with ``tags``; free each region left with none."""
        region_of, pending = self._region_of, self._pending
        for tag in tags:
            offset = region_of.pop(tag, None)
            if offset is None:
                continue
            left = pending[offset] - 1
            if left:
                pending[offset] = left
            else:
                del pending[offset]
                self._release(offset)

    def reclaim(self) -> None:
        """RELEASED arenas: take back the regions the receiver has cleared."""
        mm = self._mm
        for offset in [o for o in self._used if not mm[o]]:
            self._release(offset)

    def _alloc(self, need: int) -> int:
        free = self._free
        for i, (offset, size) in enumerate(free):
            if size >= need:
                if size == need:
                    del free[i]
                else:
                    free[i] = (offset + need, size - need)
                self._used[offset] = need
                self._high = max(self._high, offset + need)
                return offset
        return -1

    def _release(self, offset: int) -> None:
        size = self._used.pop(offset)
        free = self._free
        i = bisect.bisect(free, (offset, 0))
        if i < len(free) and free[i][0] == offset + size:  # merge with the next extent
            size += free.pop(i)[1]
        if i and free[i - 1][0] + free[i - 1][1] == offset:  # and with the previous one
            offset, size = free[i - 1][0], free[i - 1][1] + size
            free[i - 1] = (offset, size)
        else:
            free.insert(i, (offset, size))
        if not self._used and self._high > KEEP_BYTES:
            self._mm.madvise(mmap.MADV_REMOVE, KEEP_BYTES, self._high - KEEP_BYTES)
            self._high = KEEP_BYTES

    @property
    def in_flight(self) -> bool:
        """True while some region is handed out."""
        return bool(self._used)

    @property
    def in_use(self) -> int:
        """Bytes of regions not given back yet (for tests and the log)."""
        if self.mode == RELEASED and self._used:
            self.reclaim()
        return sum(self._used.values())

    def close(self) -> None:
        """Unmap (once no view of it is left: the last one's release does it otherwise)."""
        self.close_fd()
        self._view.release()
        with contextlib.suppress(BufferError):
            self._mm.close()


class PeerArena:
    """The receiver's mapping of the other side's arena."""

    def __init__(self, fd: int, size: int, mode: int) -> None:
        try:
            have = os.fstat(fd).st_size
            if mode not in (ACKED, RELEASED) or not 0 < size <= 1 << 40 or have < size:
                raise ProtocolError(f"an arena of {size} bytes, mode {mode}, on a file of {have}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if mode == RELEASED else 0)
            self._mm = mmap.mmap(fd, size, prot=prot)
        finally:
            os.close(fd)
        self.mode = mode
        self.size = size
        self._view = memoryview(self._mm)

    def frames(self, start: int, lengths: list[int]) -> list[Any]:
        """The frames of a message written at ``start``: the first as bytes (the pickled
        message), the payloads as views of the mapping."""
        end = start + sum(lengths)
        if start < _HEADER or (start - _HEADER) % _ALIGN or end > self.size:
            raise ProtocolError(f"a message at {start}..{end} of an arena of {self.size} bytes")
        view = self._view
        out: list[Any] = []
        at = start
        for i, n in enumerate(lengths):
            out.append(bytes(view[at:at + n]) if i == 0 else view[at:at + n])
            at += n
        return out

    def release(self, start: int) -> None:
        """RELEASED arenas: give the region of the message at ``start`` back."""
        self._mm[start - _HEADER] = 0

    def close(self) -> None:
        """Drop the mapping (views still held keep it until they go)."""
        self._view.release()
        with contextlib.suppress(BufferError):
            self._mm.close()


class ArenaLink:
    """The shared-memory half of :class:`~taskcs.runtime.stream.StreamLink` (mixed into it):
    offering our arena, writing big messages into it, reading the peer's, giving regions
    back. The wire format is in the stream module's docstring."""

    __slots__ = ("_arena", "_fds", "_held", "_peer", "_want_fds", "shm_received", "shm_sent")
    sock: socket.socket  # these four are the link's own
    closed: bool
    _out: deque[memoryview]
    _chunk: memoryview

    def _init_arenas(self) -> None:
        self._arena: Arena | None = None  # where our big messages go (offer_arena)
        self._peer: PeerArena | None = None  # the other side's, mapped
        self._held: list[int] = []  # starts of RELEASED messages received and not released yet
        self._fds: list[int] = []  # descriptors received, not yet claimed by an offer
        self._want_fds = True  # nothing read yet: an offer's descriptor may come first
        self.shm_sent = 0  # messages sent through our arena, and received through the peer's
        self.shm_received = 0

    def offer_arena(self, mode: int) -> bool:
        """Create this side's arena and offer it to the peer: call before sending anything
        else. False where arenas are not available or this failed (then big messages go on
        the socket; a broken socket shows at the next send)."""
        if self.closed or self._out or self._arena is not None or not available():
            return False
        try:
            arena = Arena(mode)
        except OSError as exc:
            log.info("direct link without shared memory: %s", exc)
            return False
        head = COUNT.pack(ARENA_WORD) + _ARENA_BODY.pack(arena.size, mode)
        try:
            sent = self.sock.sendmsg([head], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [arena.fd]))])
        except OSError:
            arena.close()
            return False
        arena.close_fd()  # the peer holds its own descriptor now
        if sent < len(head):
            self._out.append(memoryview(head)[sent:])
        self._arena = arena
        return True

    def _into_arena(self, views: list[memoryview], lengths: list[bytes], total: int,
                    tags: Iterable[Any]) -> bytes:
        """Write a message of ``total`` bytes into our arena: the header that goes instead, or
        b"" if it goes on the socket (too small, no room, or an ACKED arena and nobody would
        acknowledge it)."""
        arena = self._arena
        assert arena is not None
        if arena.mode == RELEASED and arena.in_flight:
            arena.reclaim()  # at every message, so pages are trimmed soon after a burst
        if not (tags or arena.mode == RELEASED):
            return b""
        if total < SHM_BYTES:
            return b""
        start = arena.put(views, total, tags)
        if start < 0:
            return b""
        self.shm_sent += 1
        return COUNT.pack(SHM_FLAG | len(lengths)) + LENGTH.pack(start) + b"".join(lengths)

    @property
    def acking(self) -> bool:
        """True while messages sent with tags wait for :meth:`ack`."""
        return self._arena is not None and self._arena.pending

    def ack(self, tags: list[Any]) -> None:
        """The peer is done with the messages sent with ``tags``: their regions are free."""
        if self._arena is not None:
            self._arena.ack(tags)

    @property
    def holds(self) -> bool:
        """True while regions of the peer's arena wait for :meth:`release_held`."""
        return bool(self._held)

    def release_held(self) -> None:
        """The messages received so far are handled: give their regions back (RELEASED)."""
        if self._peer is not None:
            for start in self._held:
                self._peer.release(start)
        self._held.clear()

    def _recv_fds(self) -> int:
        """``recv_into`` the chunk, keeping any descriptors that came with the bytes."""
        n, ancillary, _, _ = self.sock.recvmsg_into([self._chunk], _ANCILLARY)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                self._fds.extend(fds)
        return n

    def _parse_special(self, buf: memoryview, pos: int, count: int, out: list[list[Any]]) -> int:
        """A message in the peer's arena, or the offer of one, at ``pos``: the bytes it took
        from ``buf``, or 0 if it has not all arrived."""
        end = len(buf)
        if count & SHM_FLAG:
            n = count & ~SHM_FLAG
            if not 0 < n <= MAX_FRAMES:
                raise ProtocolError(f"a shared-memory message of {n} frames")
            body = pos + 12 + 8 * n
            if end < body:
                return 0
            if self._peer is None:
                raise ProtocolError("a shared-memory message before any arena was offered")
            (start,) = LENGTH.unpack_from(buf, pos + 4)
            lengths = [LENGTH.unpack_from(buf, pos + 12 + 8 * i)[0] for i in range(n)]
            out.append(self._peer.frames(start, lengths))
            self.shm_received += 1
            if self._peer.mode == RELEASED:
                self._held.append(start)
            return body - pos
        if count != ARENA_WORD:
            raise ProtocolError(f"a message of {count} frames")
        if end - pos < 4 + _ARENA_BODY.size:
            return 0
        size, mode = _ARENA_BODY.unpack_from(buf, pos + 4)
        if self._peer is not None or not self._fds:
            raise ProtocolError("an arena offered twice, or without its descriptor")
        try:
            self._peer = PeerArena(self._fds.pop(0), size, mode)
        except OSError as exc:
            raise ProtocolError(f"cannot map the arena offered: {exc}") from None
        return 4 + _ARENA_BODY.size

    def _close_arenas(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self._held.clear()
        if self._arena is not None:
            self._arena.close()
            self._arena = None
        if self._peer is not None:
            self._peer.close()
            self._peer = None
