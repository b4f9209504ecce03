"""The poll-before-block ("spin") of the ZeroMQ transport: configuration and its bounds.

A spin must never delay anything: it ends when a message lands, when the owner has work of
its own (``pending``), and at the caller's timeout, whichever comes first.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from taskcs import Client
from taskcs.runtime import protocol as p
from taskcs.runtime import zmq_transport as zt
from taskcs.runtime.dispatcher import Dispatcher, DispatcherConfig
from taskcs.runtime.transport import PeerId, ServerTransport
from taskcs.server.core import SPIN_TASKS, ServerCore
from tests.conftest import run_cli

pytestmark = pytest.mark.timeout(20)


@pytest.mark.parametrize(("raw", "expected"), [
    (None, zt.DEFAULT_SPIN_US / 1e6), ("0", 0.0), ("1500", 0.0015),
    ("-5", zt.DEFAULT_SPIN_US / 1e6), ("fast", zt.DEFAULT_SPIN_US / 1e6),
])
def test_spin_seconds_reads_the_environment(monkeypatch: pytest.MonkeyPatch, raw: str | None,
                                            expected: float) -> None:
    if raw is None:
        monkeypatch.delenv("TASKCS_SPIN_US", raising=False)
    else:
        monkeypatch.setenv("TASKCS_SPIN_US", raw)
    assert zt.spin_seconds() == pytest.approx(expected)


def test_a_bad_spin_setting_is_reported(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TASKCS_SPIN_US", "-5")
    zt.spin_seconds()
    assert "TASKCS_SPIN_US='-5'" in caplog.text


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[zt.ZmqServerTransport, zt.ZmqConnection]]:
    """A bound server transport and a connected peer on a private context, closed after."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    server = zt.ZmqServerTransport(f"ipc://{tmp_path}/s.sock", ctx, spin=0.0)
    conn = zt.ZmqConnection(server.endpoint, ctx, spin=0.0)
    try:
        yield server, conn
    finally:
        conn.close()
        server.close()
        ctx.term()


@pytest.mark.parametrize("spin", [0.0, 0.5])
def test_a_message_sent_while_the_server_spins_is_received(
        pair: tuple[zt.ZmqServerTransport, zt.ZmqConnection], spin: float) -> None:
    server, conn = pair
    server.spin = spin
    timer = threading.Timer(0.05, conn.send, (p.Heartbeat(),))
    timer.start()
    try:
        got = server.recv(5.0)
    finally:
        timer.join()
    assert [type(msg) for _, msg in got] == [p.Heartbeat]


@pytest.mark.parametrize("spin", [0.0, 0.5])
def test_a_message_sent_while_the_peer_spins_is_received(
        pair: tuple[zt.ZmqServerTransport, zt.ZmqConnection], spin: float) -> None:
    server, conn = pair
    conn.spin = spin
    conn.send(p.Heartbeat())  # the server learns the peer's identity from its first message
    peer, _ = server.recv(5.0)[0]
    timer = threading.Timer(0.05, server.send, (peer, p.Heartbeat()))
    timer.start()
    try:
        got = conn.recv(5.0)
    finally:
        timer.join()
    assert [type(msg) for msg in got] == [p.Heartbeat]


def test_the_owners_pending_work_ends_a_spin_at_once(
        pair: tuple[zt.ZmqServerTransport, zt.ZmqConnection]) -> None:
    _, conn = pair
    conn.spin = 60.0  # were the spin to ignore ``pending``, the test's timeout would fire
    conn.pending = lambda: True
    t0 = time.monotonic()
    assert conn.recv(60.0) == []
    assert time.monotonic() - t0 < 10


def test_a_spin_never_outlasts_the_callers_timeout(
        pair: tuple[zt.ZmqServerTransport, zt.ZmqConnection]) -> None:
    server, conn = pair
    server.spin = conn.spin = 60.0
    t0 = time.monotonic()
    assert server.recv(0.1) == []
    assert conn.recv(0.1) == []
    assert conn.recv(1.0, spin=False) == []
    assert time.monotonic() - t0 < 10


@pytest.mark.multiprocess
def test_a_server_that_never_spins_still_serves(runtime_dir: Path) -> None:
    started = run_cli("cs-server", "start", "--executors", "1", "--spin-us", "0")
    assert started.returncode == 0, started.stderr
    with Client(autostart=False) as client:
        assert [client.submit(pow, 2, i).result(timeout=10) for i in range(20)] == [2 ** i for i in range(20)]


def test_a_negative_spin_is_refused(runtime_dir: Path) -> None:
    proc = run_cli("cs-server", "start", "--spin-us", "-1")
    assert proc.returncode == 2
    assert "--spin-us: must be >= 0" in proc.stderr


def test_spinning_stops_after_long_waits_and_resumes_after_short_ones() -> None:
    spin = 0.001
    avg = 0.0
    assert zt._spin_for(spin, avg, None) == spin
    assert zt._spin_for(spin, avg, 0.0002) == 0.0002  # never past the caller's timeout
    assert zt._spin_for(spin, avg, 0) == 0.0
    avg = zt._average_wait(avg, 5.0, spin)  # one idle second: messages come too rarely to spin
    assert zt._spin_for(spin, avg, None) == 0.0
    for _ in range(3):  # messages come quickly again
        avg = zt._average_wait(avg, 0.0001, spin)
    assert zt._spin_for(spin, avg, None) == spin


def test_a_receiver_that_waited_long_blocks_without_spinning(
        pair: tuple[zt.ZmqServerTransport, zt.ZmqConnection]) -> None:
    server, _ = pair
    server.spin = 60.0
    server.wait_avg = 120.0
    cpu0 = time.thread_time()
    assert server.recv(0.5) == []
    # A spin burns the CPU time it waits (~0.5 s here); a blocked poll burns next to none.
    assert time.thread_time() - cpu0 < 0.1


class _RecordingTransport(ServerTransport):
    """Records whether the server asked for a spin on each receive."""

    def __init__(self) -> None:
        self.spins: list[bool] = []

    def recv(self, timeout: float | None, spin: bool = True) -> list[tuple[PeerId, p.Message]]:
        self.spins.append(spin)
        return []

    def send(self, peer: PeerId, msg: p.Message) -> None:
        pass

    def close(self, linger: float = 0.0) -> None:
        pass


def test_the_server_spins_only_with_few_tasks_in_flight() -> None:
    dispatcher = Dispatcher(DispatcherConfig(), 1)
    transport = _RecordingTransport()
    core = ServerCore(dispatcher, transport)
    core.step(0)
    now = time.monotonic()
    dispatcher.handle(b"c", p.Hello("client", "c", 1, 0, False, False, "", False), now)
    tasks = [(i, "std:add", pickle.dumps((i, 1)), 0, 1) for i in range(1, SPIN_TASKS + 2)]
    dispatcher.handle(b"c", p.Submit(1, tasks, {}, False), now)  # no executor: all stay queued
    assert dispatcher.task_count() == SPIN_TASKS + 1
    core.step(0)
    assert transport.spins == [True, False]


def test_a_closed_connection_leaves_the_numbers_of_its_pipe_alone(
        pair: tuple[zt.ZmqServerTransport, zt.ZmqConnection]) -> None:
    """wake() may come late from another thread and close() twice; by then the process may
    have opened something else under the pipe's numbers (seen: a direct link's received memfd
    closed under it, in the full suite). Neither may touch it."""
    import os

    _, conn = pair
    numbers = (conn._rfd, conn._wfd)
    conn.close()
    r, w = os.pipe()
    try:
        for fd, number in ((r, numbers[0]), (w, numbers[1])):
            if fd != number:  # the new pipe did not take the freed number itself: put it there
                with pytest.raises(OSError):
                    os.fstat(number)  # (only if nothing else took it meanwhile)
                os.dup2(fd, number)
        conn.wake()
        conn.close()  # and the fixture closes it once more
        os.set_blocking(numbers[0], False)
        with pytest.raises(BlockingIOError):
            os.read(numbers[0], 16)  # the late wake wrote nothing into the new pipe
        os.write(numbers[1], b"x")
        assert os.read(numbers[0], 16) == b"x"  # and neither number was closed
    finally:
        for fd in (r, w, *numbers):
            with contextlib.suppress(OSError):
                os.close(fd)
