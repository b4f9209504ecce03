"""The direct path's framed Unix-socket link (taskcs.runtime.stream), on real socketpairs."""

from __future__ import annotations

import os
import pickle
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskcs.executor.runner import dumps_large
from taskcs.runtime import protocol as p
from taskcs.runtime.stream import BIG_MESSAGE, StreamLink, StreamListener


@pytest.fixture
def pair() -> Iterator[tuple[StreamLink, StreamLink]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = StreamLink(a), StreamLink(b)
    yield left, right
    left.close()
    right.close()


def _drain(sender: StreamLink, receiver: StreamLink, want: int) -> list[p.Message]:
    """Receive until ``want`` messages came, flushing the sender between reads."""
    got: list[p.Message] = []
    for _ in range(100_000):
        got += receiver.recv()
        if len(got) >= want:
            return got
        assert sender.flush() and not receiver.closed
    raise AssertionError(f"only {len(got)} of {want} messages arrived")


def test_small_messages_arrive_whole_and_in_order(pair: tuple[StreamLink, StreamLink]) -> None:
    left, right = pair
    sent = [p.Tasks([(i, "std:add", b"x" * i, "")], {}) for i in range(200)]
    for msg in sent:
        assert left.send(msg)
    assert _drain(left, right, len(sent)) == sent


def test_big_payloads_survive_partial_writes_in_both_directions(pair: tuple[StreamLink, StreamLink]) -> None:
    left, right = pair
    blobs: list[bytes] = []
    while not (left.wants_write and right.wants_write) and len(blobs) < 200:  # past the socket buffers
        blob = os.urandom(3 * BIG_MESSAGE + len(blobs))
        assert left.send(p.Tasks([(len(blobs), "std:echo", blob, "")], {}))
        assert right.send(p.ExecDone([(len(blobs), 0, blob, 1, 2, 3)]))
        blobs.append(blob)
    assert left.wants_write and right.wants_write  # the kernel took only part: the rest waits in the link
    to_right = _drain(left, right, len(blobs))
    to_left = _drain(right, left, len(blobs))
    assert [bytes(m.tasks[0][2]) for m in to_right] == blobs
    assert [bytes(m.results[0][2]) for m in to_left] == blobs
    assert not left.wants_write and not right.wants_write


def test_raw_frames_and_an_identity_first(pair: tuple[StreamLink, StreamLink]) -> None:
    left, right = pair
    assert left.send_frames([b"lease-7"]) and left.send(p.Heartbeat())
    frames = right.recv_frames()
    assert frames[0] == [b"lease-7"] and len(frames) == 2
    assert p.from_wire(frames[1][0], frames[1][1:]) == p.Heartbeat()


def test_a_corrupt_stream_closes_the_link_without_raising(pair: tuple[StreamLink, StreamLink]) -> None:
    left, right = pair
    left.sock.sendall(struct.pack("<I", 0))  # a message of no frames
    assert right.recv_frames() == [] and right.closed
    assert not right.send(p.Heartbeat())  # a closed link takes nothing


def test_the_peer_hanging_up_closes_the_link(pair: tuple[StreamLink, StreamLink]) -> None:
    left, right = pair
    assert left.send(p.Heartbeat())
    left.close()
    assert right.recv() == [p.Heartbeat()]  # what it sent before is still delivered
    assert right.recv() == [] and right.closed


def test_a_listener_accepts_its_own_user_and_removes_its_file(tmp_path: Path) -> None:
    path = str(tmp_path / "direct.sock")
    listener = StreamListener(path)
    try:
        assert listener.accept() == []
        client = StreamLink.connect(path)
        accepted = listener.accept()
        assert len(accepted) == 1
        assert client.send(p.Heartbeat()) and _drain(client, accepted[0], 1) == [p.Heartbeat()]
        client.close()
        accepted[0].close()
    finally:
        listener.close()
    assert not os.path.exists(path)
    with pytest.raises(OSError):
        StreamLink.connect(path)


def test_a_scattered_payload_travels_in_pieces_and_arrives_whole(pair: tuple[StreamLink, StreamLink]) -> None:
    left, right = pair
    data = os.urandom(BIG_MESSAGE + 5)
    payload = dumps_large((data,), scatter=True)
    assert isinstance(payload, p.Scattered) and any(part is data for part in payload.parts)  # not copied
    msg = p.Tasks([(1, "std:echo", payload, ""), (2, "std:add", b"small", "")], {})
    frames = p.to_frames(msg, scatter=True)
    assert any(type(frame) is list for frame in frames)
    joined = p.to_frames(msg)  # what every other transport sends: the payload joined
    assert not any(type(frame) is list for frame in joined)
    assert p.from_wire(joined[0], joined[1:]).tasks[0][2] == pickle.dumps((data,), 5)
    assert left.send(msg)
    (got,) = _drain(left, right, 1)
    assert pickle.loads(got.tasks[0][2]) == (data,) and got.tasks[1][2] == b"small"


def test_a_scattered_payload_copies_a_mutable_argument() -> None:
    data = bytearray(os.urandom(BIG_MESSAGE))
    payload = dumps_large((data,), scatter=True)
    before = bytes(data)
    data[:8] = b"changed!"  # the caller reuses its buffer after submitting
    assert pickle.loads(payload.join()) == (bytearray(before),)
