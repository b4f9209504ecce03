"""Issue 9, item 5: a flood of bad frames neither starves a live client nor floods the log.

The flood comes from a raw ZeroMQ DEALER in the test, against a real cs-server; a real client
connected before it must still get its task done, and the server log must stay short.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import pytest
import zmq

import taskcs
from taskcs.errors import ProtocolError
from taskcs.runtime import protocol as p
from taskcs.runtime import ratelimit
from taskcs.runtime.ratelimit import DropLog

from .conftest import server_status, wait_until

#: A valid header and command, then a body whose LONG_BINPUT index (2**30) made the C
#: unpickler allocate and zero 16 GB: the frame that stalled the server for 46 s.
MEMO_BOMB = b"TCS1" + bytes([p.Command.SUBMIT]) + b"\x80\x05N" + b"r" + (2**30).to_bytes(4, "little") + b"."


def garbage(rng: random.Random, i: int) -> list[bytes]:
    """One bad message of several kinds: random bytes, valid header with a garbage body,
    wrong version, an unknown command, a memo bomb, a valid body of the wrong shape, nothing."""
    kind = i % 7
    if kind == 0:
        return [rng.randbytes(rng.randrange(1, 64))]
    if kind == 1:
        return [b"TCS1" + bytes([rng.randrange(1, 16)]) + rng.randbytes(rng.randrange(0, 64))]
    if kind == 2:
        return [b"TCS9" + bytes([p.Command.HELLO]) + pickle.dumps(("client", "x", 1, 0, False, False, [], True))]
    if kind == 3:
        return [b"TCS1\xee" + pickle.dumps(())]
    if kind == 4:
        return [MEMO_BOMB]
    if kind == 5:
        return [b"TCS1" + bytes([p.Command.SUBMIT]) + pickle.dumps(("not", "a", "submit"))]
    return [b""]


def test_the_memo_bomb_is_refused_at_once_from_an_unwelcomed_peer() -> None:
    with pytest.raises(ProtocolError):
        p.from_wire(MEMO_BOMB, untrusted=True)  # the C unpickler would take ~46 s here
    hello = p.Hello("client", "c", 1)
    assert p.from_wire(p.to_wire(hello), untrusted=True) == hello


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_flood_of_bad_frames_does_not_starve_a_client(runtime_dir: Path, start_server: Any) -> None:
    record = start_server(1)
    rng = random.Random(9)
    context = zmq.Context()
    flooder = context.socket(zmq.DEALER)
    flooder.linger = 0
    try:
        with taskcs.Client(foreground=None) as client:
            assert client.submit("add", 1, 1).result(10) == 2
            flooder.connect(record.endpoint)
            for i in range(20_000):
                flooder.send_multipart(garbage(rng, i))
            # Submitted right behind the flood: it must not wait for the whole flood to be read.
            assert client.submit("add", 2, 3).result(20) == 5
            wait_until(lambda: server_status(runtime_dir)["dropped_messages"] >= 20_000, timeout=30,
                       what="the server to read the whole flood")
            assert client.submit("add", 3, 4).result(10) == 7
    finally:
        flooder.close(0)
        context.term()
    lines = Path(record.log).read_text().splitlines()
    drop_lines = [line for line in lines if "dropped" in line]
    assert 1 <= len(drop_lines) <= ratelimit.FIRST, drop_lines  # one peer: the first few in full
    assert len(lines) < 50, lines[-10:]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0


def test_drop_log_writes_the_first_few_then_one_summary_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.drops")
    drops = DropLog(logger)
    clock = _Clock()
    with caplog.at_level(logging.WARNING, logger="tests.drops"):
        for minute in range(3):
            for i in range(10_000):
                clock.now = minute * 60.0 + i * 0.005  # 10,000 drops over 50 s of each minute
                drops.drop(b"peer-a", "garbage", clock.now)
        drops.flush(clock.now + 60.0)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == ratelimit.FIRST + 3, messages
    summaries = [m for m in messages if "more" in m]
    assert sum(int(m.split()[1]) for m in summaries) == 30_000 - ratelimit.FIRST
    assert drops.total == 30_000


def test_drop_log_is_bounded_over_many_spoofed_identities(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.drops.many")
    drops = DropLog(logger)
    with caplog.at_level(logging.WARNING, logger="tests.drops.many"):
        for i in range(20_000):
            drops.drop(os.urandom(5) if i % 2 else b"%d" % (i % 9000), "garbage", 1.0)
        assert len(drops._counted) <= ratelimit.MAX_PEERS + 1  # memory: bounded too
        drops.flush(61.0)
    # The global budget, then at most SUMMARY_PEERS + 1 summary lines.
    assert len(caplog.records) <= ratelimit.BUDGET + ratelimit.SUMMARY_PEERS + 1
    assert drops.total == 20_000
