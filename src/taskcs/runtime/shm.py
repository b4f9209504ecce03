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

import bisect
import contextlib
import mmap
import os
import platform
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import ProtocolError

#: A message at least this big is sent through the arena (smaller ones cost less as bytes on
#: the socket than a region's bookkeeping).
SHM_BYTES = 1 << 18
#: Size of an arena's address space, in MiB (``TASKCS_SHM_MB``). A memfd is sparse: only
#: pages written count, and first-fit reuse keeps those to the most bytes in flight at once.
ARENA_MB = 256
#: Regions start on page boundaries; their first byte is the RELEASED flag.
_ALIGN = 4096
_HEADER = 64
ACKED = 1
RELEASED = 2


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

    def close_fd(self) -> None:
        """Close the descriptor once the peer has its own (the mapping stays)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def put(self, views: Sequence[memoryview], total: int, tags: Iterable[Any] = ()) -> int:
        """Write ``views`` (``total`` bytes) into a new region and return the offset of their
        first byte, or -1 if there is no room. In an ACKED arena the region is freed once
        each of ``tags`` is acknowledged (:meth:`ack`), so ``tags`` must not be empty."""
        if self.mode == RELEASED and self._used:
            self._reclaim()
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

    def _reclaim(self) -> None:
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

    @property
    def in_use(self) -> int:
        """Bytes of regions not given back yet (for tests and the log)."""
        if self.mode == RELEASED and self._used:
            self._reclaim()
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
            if mode not in (ACKED, RELEASED) or not 0 < size <= 1 << 40 or os.fstat(fd).st_size < size:
                raise ProtocolError(f"an arena of {size} bytes, mode {mode}, on a file of "
                                    f"{os.fstat(fd).st_size}")
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
