"""The direct path (issue 10): leased executors, with real servers, executors and clients.

Each test first waits until the client's leases are live (the executors said HELLO on its
socket), so its tasks really take the direct path; the guarantees are those of the server path.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import taskcs
from taskcs import ExecutorDiedError, Task, TaskcsError
from taskcs.runtime import shm
from taskcs.runtime.protocol import Scattered
from tests.conftest import run_cli, server_status, wait_until

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]


def _leased(client: taskcs.Client, n: int) -> None:
    """Wait for ``n`` live leases (a client asks when a plain task leaves after it has had a
    result, with nothing left at the server)."""
    assert client.submit("add", 0, 0).result(timeout=20) == 0
    assert client.submit("add", 0, 1).result(timeout=20) == 1

    def settled() -> bool:  # live here, and granted (not being revoked) at the server
        rows = server_status(client_dir(client))["leases"]
        return client._dlive == n and len(rows) == n and all(row["state"] == "granted" for row in rows)

    wait_until(settled, what=f"{n} live leases")


def client_dir(client: taskcs.Client) -> Path:
    return Path(os.environ["TASKCS_RUNTIME_DIR"])


def _mark_then_sleep(path: str, seconds: float) -> float:
    """Say it started (a file holding this process's pid), then sleep: a test then knows it runs."""
    import time

    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return seconds


def _started_on(directory: Path, marker: Path) -> dict[str, Any]:
    """The status row of the executor that runs the task writing ``marker``, once it runs."""
    pid = int(wait_until(lambda: marker.exists() and marker.read_text(), what="the task to start"))
    return next(ex for ex in _executors(directory) if ex["pid"] == pid)


def _executors(directory: Path) -> list[dict[str, Any]]:
    return [ex for ex in server_status(directory)["executors"] if not ex["stdio"]]


def _running_on_lease(directory: Path) -> dict[str, Any] | None:
    busy = [ex for ex in _executors(directory) if ex.get("leased_to") and ex["in_flight"]]
    return busy[0] if busy else None


def test_a_lone_client_sends_its_tasks_straight_to_leased_executors(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=2)
    with taskcs.Client(foreground=None, direct=True) as client:
        _leased(client, 2)
        futs = [client.submit(pow, i, 2) for i in range(500)]
        assert [f.result(timeout=20) for f in futs] == [i * i for i in range(500)]
        assert {f.executor for f in futs} <= {"exec-1", "exec-2"}
        records = {r.task_id: r for r in client.timeline()}  # issue 11's records, as on the server path
        for f in futs:
            r = records[f.task_id]
            assert r.executor == f.executor and r.status == "ok" and not r.retried
            assert 0 < r.submitted_ns <= r.started_ns <= r.finished_ns
        assert list(client.map(abs, range(-50, 0), chunksize=7)) == list(range(50, 0, -1))
        status = server_status(runtime_dir)
        assert {row["state"] for row in status["leases"]} == {"granted"}
        assert {ex["leased_to"] for ex in _executors(runtime_dir)} == {client.name}
        # The server counted them although it never saw them (the client reports its totals).
        wait_until(lambda: server_status(runtime_dir)["stats"]["done"] >= 500 + 8 + 2, what="the direct totals")
    assert server_status(runtime_dir)["stats"]["failed"] == 0


def test_a_leased_executor_killed_mid_task_is_retried_or_fails_clearly(runtime_dir: Path,
                                                                      start_server: Any) -> None:
    start_server(executors=2)
    with taskcs.Client(foreground=None, direct=True) as client:
        _leased(client, 2)
        fut = client.submit_task(Task(_mark_then_sleep, (str(runtime_dir / "m1"), 1.0), retries=1))
        victim = _started_on(runtime_dir, runtime_dir / "m1")
        assert fut.task_id in client._direct_of  # it did take the direct path
        os.kill(victim["pid"], signal.SIGKILL)  # an executor of the server we started
        assert fut.result(timeout=20) >= 1.0  # sent again, to the other lease or the server
        assert fut.executor is not None and fut.executor != victim["name"]

        _leased(client, 2)  # the replacement is lent too, once idle
        fut = client.submit_task(Task(_mark_then_sleep, (str(runtime_dir / "m2"), 5.0), retries=0))
        victim = _started_on(runtime_dir, runtime_dir / "m2")
        os.kill(victim["pid"], signal.SIGKILL)
        exc = fut.exception(timeout=20)
        assert isinstance(exc, ExecutorDiedError), repr(exc)
        assert f"executor {victim['name']} died while running task {fut.task_id}" in str(exc)
        assert exc.exit_code == -signal.SIGKILL
        assert client.submit("add", 1, 2).result(timeout=20) == 3
        wait_until(lambda: server_status(runtime_dir)["stats"]["retried"] == 1, what="the retry counted")


def _mark_then_echo(path: str, data: bytes, seconds: float) -> bytes:
    """_mark_then_sleep, returning ``data``."""
    _mark_then_sleep(path, seconds)
    return data


def test_big_payloads_go_in_pieces_and_arrive_whole_on_either_path(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=2)
    with taskcs.Client(foreground=None) as client:
        _leased(client, 2)
        data = os.urandom(3 << 20)
        mutable = bytearray(os.urandom(1 << 20))
        snapshot = bytes(mutable)
        futs = [client.submit(bytes, arg) for arg in (data, data, mutable, mutable)]  # the 2nd of each: fast path
        mutable[:4] = b"gone"  # after submitting: the tasks must see what was submitted
        assert [f.result(timeout=20) for f in futs] == [data, data, snapshot, snapshot]
        # In flight on a lease when its executor dies, while a second client has the leases
        # revoked: sent again through the server, which gets the pieces joined.
        assert client.submit(_mark_then_echo, str(runtime_dir / "m0"), b"", 0.0).result(timeout=20) == b""
        fut = client.submit(_mark_then_echo, str(runtime_dir / "m1"), data, 3.0)
        victim = _started_on(runtime_dir, runtime_dir / "m1")
        assert fut.task_id in client._direct_of
        assert type(client._inflight[fut.task_id][1][2]) is Scattered  # not joined: the direct path's pieces
        with taskcs.Client(foreground=None) as other:
            wait_until(lambda: client._dlive == 0, what="the leases revoked")
            os.kill(victim["pid"], signal.SIGKILL)  # an executor of the server we started
            assert fut.result(timeout=30) == data
            assert fut.executor != victim["name"]
            assert other.submit("add", 1, 1).result(timeout=20) == 2


def _reverse(data: bytes) -> bytes:
    return data[::-1]


@pytest.mark.skipif(not shm.available(), reason="shared memory arenas need Linux on x86-64")
def test_big_payloads_travel_in_shared_memory_and_no_region_is_reused_too_soon(
        runtime_dir: Path, start_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arenas of 4 MiB (the client's and the executors'), 24 distinct payloads of ~0.7 MB in
    flight at once, three times: regions are reused and some messages find no room and take
    the socket; a region written again before its message was read would mix payloads."""
    monkeypatch.setenv("TASKCS_SHM_MB", "4")  # inherited by the server's executors
    start_server(executors=2)
    with taskcs.Client(foreground=None) as client:
        _leased(client, 2)
        for _ in range(3):
            blobs = [os.urandom(700_000 + i) for i in range(24)]
            futs = [client.submit(_reverse, blob) for blob in blobs]
            assert [f.result(timeout=30) for f in futs] == [blob[::-1] for blob in blobs]
        assert client._dsock is not None
        sent, received = client._dsock.shm_counts()
        assert 0 < sent < 72 and received > 0  # shared memory both ways, and the socket too


def _hold(data: bytes, seconds: float) -> int:
    time.sleep(seconds)
    return len(data)


def test_big_payloads_in_flight_to_one_executor_are_capped(runtime_dir: Path, start_server: Any) -> None:
    """LEASE_BYTES (8 MiB): of twelve 3 MB tasks a lease takes three, even with a window of
    hundreds (the function's measured time is microseconds); the rest wait in the client.
    One task bigger than the cap still goes."""
    start_server(executors=2)
    with taskcs.Client(foreground=None) as client:
        _leased(client, 2)
        assert [client.submit(_hold, b"", 0.0).result(timeout=20) for _ in range(40)] == [0] * 40  # its time
        data = os.urandom(3 << 20)
        futs = [client.submit(_hold, data, 1.0) for _ in range(12)]
        wait_until(lambda: len(client._direct_of) == 6, what="six tasks on the leases")
        assert sorted(len(lease.inflight) for lease in client._leases.values()) == [3, 3]
        assert len(client._dq) == 6
        assert [f.result(timeout=30) for f in futs] == [3 << 20] * 12
        assert client.submit(_hold, os.urandom(20 << 20), 0.0).result(timeout=30) == 20 << 20


def test_a_second_client_revokes_the_leases_and_both_finish_exactly_once(runtime_dir: Path,
                                                                         start_server: Any) -> None:
    start_server(executors=2)
    with taskcs.Client(foreground=None, name="first", direct=True) as first:
        _leased(first, 2)
        futs_a = [first.submit("sleep", 0.005) for _ in range(200)]
        with taskcs.Client(foreground=None, name="second", direct=True) as second:
            wait_until(lambda: first._dlive == 0, what="the first client's leases revoked")
            futs_b = [second.submit("add", i, 1) for i in range(300)]
            futs_a += [first.submit("add", i, 2) for i in range(300)]  # now through the server
            assert [f.result(timeout=30) for f in futs_b] == [i + 1 for i in range(300)]
        assert all(f.result(timeout=30) >= 0.005 for f in futs_a[:200])
        assert [f.result(timeout=30) for f in futs_a[200:]] == [i + 2 for i in range(300)]
        wait_until(lambda: not server_status(runtime_dir)["leases"] or first._dlive == 2,
                   what="the leases ended (or granted again: the first client is alone)")
    status = wait_until(lambda: (s := server_status(runtime_dir))["stats"]["done"] == 802 and s,
                        what="every task counted once")
    assert status["stats"]["failed"] == 0 and status["stats"]["cancelled"] == 0


def test_forced_cancel_stops_a_task_running_on_a_leased_executor(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    with taskcs.Client(foreground=None, direct=True) as client:
        _leased(client, 1)
        started = runtime_dir / "started"
        fut = client.submit(_mark_then_sleep, str(started), 30.0)
        queued = [client.submit("sleep", 30) for _ in range(2)]
        wait_until(started.exists, what="the task running on the leased executor")
        (pid,) = [ex["pid"] for ex in _executors(runtime_dir)]
        assert fut.task_id in client._direct_of  # it did take the direct path
        assert fut.cancel() is False  # it runs: concurrent.futures' answer
        assert all(f.cancel() for f in queued)  # still waiting: cancelled at once
        assert client.cancel(fut, force=True) is True
        assert fut.cancelled()
        assert client.submit("add", 2, 3).result(timeout=20) == 5  # the executor is free again
        status = server_status(runtime_dir)
        assert status["executors_replaced"] == 0  # interrupted, not killed
        assert [ex["pid"] for ex in _executors(runtime_dir)] == [pid]
        with pytest.raises(cf.CancelledError):
            fut.result(timeout=0)


def test_iotasks_stay_on_the_foreground_while_leases_are_live(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=2)
    with taskcs.Client(foreground="thread", direct=True) as client:
        _leased(client, 2)
        here = client.submit_task(Task(os.getpid, io=True))
        there = [client.submit(os.getpid) for _ in range(4)]
        assert here.result(timeout=20) == os.getpid()
        assert os.getpid() not in {f.result(timeout=20) for f in there}
        assert client.submit("print_line", "hello").result(timeout=20) == "hello"


def test_server_stops_with_leased_work(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    client = taskcs.Client(foreground=None, reconnect_timeout=0.5, direct=True)
    try:
        _leased(client, 1)
        short = client.submit("sleep", 0.5)
        assert run_cli("cs-server", "stop").returncode == 0  # graceful: leased work finishes
        assert short.result(timeout=20) >= 0.5
    finally:
        client.shutdown(wait=True)
    start_server(executors=1)
    client = taskcs.Client(foreground=None, reconnect_timeout=0.5, direct=True)
    try:
        _leased(client, 1)
        long = client.submit("sleep", 30)
        wait_until(lambda: _running_on_lease(runtime_dir), what="the sleep on the lease")
        assert run_cli("cs-server", "stop", "--now").returncode == 0
        assert isinstance(long.exception(timeout=20), TaskcsError)
    finally:
        client.shutdown(wait=True)


def test_the_direct_path_is_the_default(runtime_dir: Path, start_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TASKCS_DIRECT", raising=False)
    start_server(executors=1)
    with taskcs.Client(foreground=None) as client:
        _leased(client, 1)
        assert [client.submit("add", 1, i).result(timeout=20) for i in range(3)] == [1, 2, 3]
        assert server_status(runtime_dir)["leases"] and client._dsock is not None


@pytest.mark.parametrize(("direct", "env"), [(False, None), (None, "0")])
def test_without_direct_every_task_stays_on_the_server_path(runtime_dir: Path, start_server: Any,
                                                           monkeypatch: pytest.MonkeyPatch, direct: Any,
                                                           env: str | None) -> None:
    if env is None:
        monkeypatch.delenv("TASKCS_DIRECT", raising=False)
    else:  # the default (on) turned off by the environment
        monkeypatch.setenv("TASKCS_DIRECT", env)
    start_server(executors=1)
    with taskcs.Client(foreground=None, direct=direct) as client:
        assert [client.submit("add", 1, i).result(timeout=20) for i in range(3)] == [1, 2, 3]
        assert server_status(runtime_dir)["leases"] == [] and client._dsock is None


def test_shutdown_with_cancel_futures_stops_leased_work(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    client = taskcs.Client(foreground=None, direct=True)
    try:
        _leased(client, 1)
        futs = [client.submit("sleep", 30) for _ in range(4)]
        (pid,) = [ex["pid"] for ex in wait_until(lambda: [ex for ex in _executors(runtime_dir)
                                                          if ex["in_flight"] and ex.get("leased_to")],
                                                 what="a sleep running on the lease")]
    finally:
        client.shutdown(wait=True, cancel_futures=True)  # returns once the running sleep stopped
    assert all(f.cancelled() for f in futs)
    status = wait_until(lambda: (s := server_status(runtime_dir))["stats"]["cancelled"] == 4 and s,
                        what="four cancels counted")
    assert status["executors_replaced"] == 0 and [ex["pid"] for ex in _executors(runtime_dir)] == [pid]


def test_code_goes_once_per_leased_executor(runtime_dir: Path, start_server: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from taskcs.client import leased
    from taskcs.runtime import protocol as p

    sent: list[p.Tasks] = []
    send = leased.DirectSocket.send

    def recording_send(self: Any, ident: bytes, msg: Any, tags: Any = ()) -> bool:
        if isinstance(msg, p.Tasks):
            sent.append(msg)
        return send(self, ident, msg, tags)

    monkeypatch.setattr(leased.DirectSocket, "send", recording_send)
    start_server(executors=2)
    offset = 7
    with taskcs.Client(foreground=None, direct=True) as client:
        _leased(client, 2)
        futs = [client.submit(lambda x: x + offset, i) for i in range(200)]  # code by value
        assert [f.result(timeout=20) for f in futs] == [i + 7 for i in range(200)]
    code = [digest for msg in sent for digest in msg.blobs if not digest.startswith("path:")]
    assert len(code) == len({f.executor for f in futs}) and len(set(code)) == 1  # once per connection
