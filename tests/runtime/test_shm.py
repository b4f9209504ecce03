"""Shared memory for the direct path's big messages (taskcs.runtime.shm), alone and on real
socketpairs between two StreamLinks."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest

from taskcs.runtime import protocol as p
from taskcs.runtime import shm
from taskcs.runtime.shm import SHM_FLAG
from taskcs.runtime.stream import StreamLink
from tests.runtime.test_stream import _drain

pytestmark = pytest.mark.skipif(not shm.available(), reason="shared memory arenas need Linux on x86-64")

MB = 1 << 20


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair() -> Iterator[tuple[StreamLink, StreamLink]]:
    """Two linked ends: ``left`` offers an ACKED arena (a client's), ``right`` a RELEASED one
    (an executor's)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = StreamLink(a), StreamLink(b)
    assert left.offer_arena(shm.ACKED) and right.offer_arena(shm.RELEASED)
    yield left, right
    left.close()
    right.close()


def _tasks(task_id: int, blob: bytes) -> p.Tasks:
    return p.Tasks([(task_id, "std:echo", blob, "")], {})


# ---------------------------------------------------------------------- the arena alone
def test_acked_regions_are_freed_once_every_tag_is_acknowledged_and_coalesce() -> None:
    arena = shm.Arena(shm.ACKED, 8 * MB)
    try:
        blob = memoryview(os.urandom(MB))
        first = arena.put([blob], MB, [1, 2])
        second = arena.put([blob], MB, [3])
        assert 0 < first < second and arena.in_use > 2 * MB
        arena.ack([1])
        assert arena.in_use > 2 * MB  # task 2 of the first region is not answered yet
        arena.ack([3, 99])  # an unknown tag is ignored
        arena.ack([2])
        assert arena.in_use == 0 and not arena.pending
        assert arena.put([blob], MB, [4]) == first  # first fit: the same low pages again
    finally:
        arena.close()


def test_a_full_arena_says_so_instead_of_waiting() -> None:
    arena = shm.Arena(shm.ACKED, 2 * MB)
    try:
        blob = memoryview(os.urandom(MB))
        assert arena.put([blob], MB, [1]) > 0
        assert arena.put([blob], MB, [2]) == -1  # a header and page rounding: no second MB
        arena.ack([1])
        assert arena.put([blob], MB, [2]) > 0
    finally:
        arena.close()


def test_released_regions_come_back_when_the_peer_clears_them() -> None:
    arena = shm.Arena(shm.RELEASED, 8 * MB)
    peer = shm.PeerArena(os.dup(arena.fd), arena.size, shm.RELEASED)
    try:
        data = os.urandom(3 * MB)
        start = arena.put([memoryview(data)[:10], memoryview(data)[10:]], len(data))
        frames = peer.frames(start, [10, len(data) - 10])
        assert frames[0] == data[:10] and type(frames[0]) is bytes and bytes(frames[1]) == data[10:]
        assert arena.in_use >= len(data)
        peer.release(start)
        assert arena.in_use == 0
        del frames
    finally:
        peer.close()
        arena.close()


def test_an_arena_that_empties_gives_its_pages_past_keep_bytes_back() -> None:
    arena = shm.Arena(shm.ACKED, 128 * MB)
    try:
        resident = lambda: os.fstat(arena.fd).st_blocks * 512  # noqa: E731
        blob = memoryview(bytes(60 * MB))
        arena.put([blob], blob.nbytes, [1])
        assert resident() >= 60 * MB
        arena.ack([1])
        assert resident() <= shm.KEEP_BYTES
    finally:
        arena.close()


def test_a_peer_refuses_offsets_outside_its_arena() -> None:
    arena = shm.Arena(shm.ACKED, 2 * MB)
    peer = shm.PeerArena(os.dup(arena.fd), arena.size, shm.ACKED)
    try:
        for start, lengths in ((0, [10]), (64 + 1, [10]), (64, [2 * MB])):
            with pytest.raises(p.ProtocolError):
                peer.frames(start, lengths)
        with pytest.raises(p.ProtocolError):
            shm.PeerArena(os.dup(arena.fd), 4 * MB, shm.ACKED)  # bigger than the file
    finally:
        peer.close()
        arena.close()


# ---------------------------------------------------------------------- on a link
def test_big_messages_go_through_the_arenas_both_ways_and_their_regions_come_back(
        pair: tuple[StreamLink, StreamLink]) -> None:
    left, right = pair
    blobs = [os.urandom(MB + i) for i in range(20)]
    for i, blob in enumerate(blobs):
        assert left.send(_tasks(i, blob), [i])
    got = _drain(left, right, len(blobs))
    assert [bytes(m.tasks[0][2]) for m in got] == blobs
    assert left.shm_sent == right.shm_received == len(blobs)
    assert left.acking
    left.ack(list(range(20)))
    assert not left.acking and left._arena is not None and left._arena.in_use == 0
    for i, blob in enumerate(blobs):
        assert right.send(p.ExecDone([(i, 0, blob, 1, 2, 3)]))
    back = _drain(right, left, len(blobs))
    assert [bytes(m.results[0][2]) for m in back] == blobs
    assert left.holds and right._arena is not None and right._arena.in_use > 20 * MB
    del back
    left.release_held()
    assert not left.holds and right._arena.in_use == 0


def test_released_pages_are_trimmed_at_the_next_message_after_a_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm.Arena, "close_fd", lambda self: None)  # keep it, to count its pages
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = StreamLink(a), StreamLink(b)
    assert right.offer_arena(shm.RELEASED) and right._arena is not None
    fd = right._arena.fd
    try:
        resident = lambda: os.fstat(fd).st_blocks * 512  # noqa: E731
        big = bytes(50 * MB)
        assert right.send(p.ExecDone([(1, 0, big, 1, 2, 3)]))
        got = _drain(right, left, 1)
        assert len(got[0].results[0][2]) == len(big) and resident() >= 50 * MB
        del got
        left.release_held()
        assert resident() >= 50 * MB  # the sender has not looked yet
        assert right.send(p.ExecDone([(2, 0, b"small", 1, 2, 3)]))  # any message looks
        assert resident() <= shm.KEEP_BYTES
    finally:
        left.close()
        right.close()
        os.close(fd)


def test_regions_are_reused_without_mixing_messages() -> None:
    """A small arena, many messages: each region is written again only after its message
    was handled, and those that find no room go on the socket; every one arrives intact."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = StreamLink(a), StreamLink(b)
    os.environ["TASKCS_SHM_MB"] = "3"
    try:
        assert right.offer_arena(shm.RELEASED)
    finally:
        del os.environ["TASKCS_SHM_MB"]
    try:
        for round_ in range(10):
            blobs = [bytes([round_ * 5 + i]) * (MB * 4 // 5 + i) for i in range(5)]
            for i, blob in enumerate(blobs):
                assert right.send(p.ExecDone([(i, 0, blob, 1, 2, 3)]))
            got = _drain(right, left, len(blobs))
            assert [bytes(m.results[0][2]) for m in got] == blobs
            del got
            left.release_held()
        assert right.shm_sent == 30  # three fit in 3 MiB each round; the rest on the socket
    finally:
        left.close()
        right.close()


def test_messages_without_tags_do_not_use_an_acked_arena(pair: tuple[StreamLink, StreamLink]) -> None:
    left, right = pair
    blob = os.urandom(2 * MB)
    assert left.send(_tasks(1, blob))  # nobody would acknowledge it: on the socket
    assert bytes(_drain(left, right, 1)[0].tasks[0][2]) == blob
    assert left.shm_sent == 0


def test_small_messages_stay_on_the_socket(pair: tuple[StreamLink, StreamLink]) -> None:
    left, right = pair
    assert left.send(_tasks(1, b"x" * 1000), [1])
    assert _drain(left, right, 1)[0].tasks[0][2] == b"x" * 1000
    assert left.shm_sent == 0 and not left.acking


@pytest.mark.parametrize("corrupt", ["outside", "before offer"])
def test_a_bad_shared_memory_message_closes_the_link_without_raising(corrupt: str) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = StreamLink(a), StreamLink(b)
    try:
        if corrupt == "outside":
            assert left.offer_arena(shm.ACKED)
            right.recv()  # the offer
        a.sendall(struct.pack("<IQQ", SHM_FLAG | 1, 1 << 40, 10))
        assert right.recv() == [] and right.closed
    finally:
        left.close()
        right.close()


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKCS_SHM", "0")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = StreamLink(a), StreamLink(b)
    try:
        assert not left.offer_arena(shm.ACKED)
        blob = os.urandom(MB)
        assert left.send(_tasks(1, blob), [1])
        assert bytes(_drain(left, right, 1)[0].tasks[0][2]) == blob and left.shm_sent == 0
    finally:
        left.close()
        right.close()


def test_no_descriptor_is_left_open() -> None:
    before = _fds()
    for _ in range(5):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        left, right = StreamLink(a), StreamLink(b)
        assert left.offer_arena(shm.ACKED) and right.offer_arena(shm.RELEASED)
        assert left.send(_tasks(1, os.urandom(MB)), [1])
        _drain(left, right, 1)
        _drain(right, left, 0)  # the offer
        left.close()
        right.close()
    assert _fds() == before
