"""The server's death (issue #9, item 2): real processes, a real SIGKILL of the server's pid.

The client notices at once (a pidfd, not heartbeat silence), starts a new local server as at
start-up and resubmits what was unfinished; IOTasks running in the client are unaffected;
executors die with their server; a named server is retried for a bounded time only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

import taskcs
from taskcs.runtime import discovery

from .conftest import server_status, wait_until

pytestmark = pytest.mark.multiprocess

#: An IOTask of this test: runs on the client's foreground thread, in this process.
IO_RUNS: list[str] = []
IO_GATE = threading.Event()


@taskcs.io_task
def held_io(tag: str) -> str:
    IO_RUNS.append(tag)
    IO_GATE.wait(60)
    return tag.upper()


def _executor_pids(runtime_dir: Path) -> list[int]:
    return [ex["pid"] for ex in server_status(runtime_dir)["executors"] if ex["capacity"] and not ex["stdio"]]


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_killed_server_is_restarted_and_the_set_completes(runtime_dir: Path, start_server: Any) -> None:
    # Heartbeats 30 s apart: silence would take minutes to tell, so only the pidfd can make
    # the client notice within the waits below.
    record = start_server(2, 60.0, "--heartbeat", "30")
    IO_RUNS.clear()
    IO_GATE.clear()
    executors = _executor_pids(runtime_dir)
    try:
        with taskcs.Client() as client:  # finds the local server: auto-start applies
            try:
                _kill_and_complete(client, record, runtime_dir, executors)
            finally:
                IO_GATE.set()  # never leave the client's shutdown waiting for the IOTask
    finally:
        IO_GATE.set()
        _kill(executors)


def _kill_and_complete(client: taskcs.Client, record: discovery.ServerRecord, runtime_dir: Path,
                       executors: list[int]) -> None:
    tasks = [taskcs.Task("burn", (0.05,)) for _ in range(20)]
    tasks += [taskcs.Task("multiply", (i, 3)) for i in range(300)]
    tasks.append(taskcs.Task(held_io, ("io",)))
    ts = client.submit_set(tasks)
    wait_until(lambda: IO_RUNS, what="the IOTask to start in the client")
    wait_until(lambda: server_status(runtime_dir)["stats"]["done"] >= 5, what="some tasks done")
    os.kill(record.pid, signal.SIGKILL)  # the server we started, by its pid
    # Its executors die with it at once (parent-death signal), mid-task.
    wait_until(lambda: not any(discovery.pid_alive(pid) for pid in executors), timeout=5,
               what="the killed server's executors to exit")
    new = wait_until(lambda: (r := discovery.live_record(runtime_dir)) and r.pid != record.pid and r,
                     timeout=30, what="a new server")
    wait_until(lambda: client.server_pid == new.pid, what="the client to join the new server")
    IO_GATE.set()  # the IOTask, untouched by all this, may finish now
    results = ts.results(timeout=60)
    assert results[20:320] == [i * 3 for i in range(300)]
    assert all(isinstance(r, int) for r in results[:20])
    assert results[-1] == "IO" and IO_RUNS == ["io"]  # ran once, completed here
    assert client.submit("add", 2, 3).result(10) == 5  # and the client works on


def test_retries_zero_fails_clearly_and_executors_die_with_their_server(
        runtime_dir: Path, start_server: Any) -> None:
    record = start_server(2, 60.0, "--heartbeat", "30")
    executors = _executor_pids(runtime_dir)
    try:
        with taskcs.Client(foreground=None) as client:
            once = [client.submit_task(taskcs.Task("sleep", (30,), retries=0)) for _ in range(2)]
            wait_until(lambda: all(ex["in_flight"] for ex in server_status(runtime_dir)["executors"]
                                   if ex["capacity"] and not ex["stdio"]), what="both executors busy")
            os.kill(record.pid, signal.SIGKILL)
            for fut in once:
                with pytest.raises(taskcs.BrokenError, match="retries=0"):
                    fut.result(timeout=30)
            # Busy in a 30 s sleep: only the parent-death signal stops them this soon.
            wait_until(lambda: not any(discovery.pid_alive(pid) for pid in executors), timeout=5,
                       what="the killed server's busy executors to exit")
    finally:
        _kill(executors)


def test_a_named_server_is_retried_then_the_futures_fail_naming_it(runtime_dir: Path, start_server: Any) -> None:
    record = start_server(1)
    executors = _executor_pids(runtime_dir)
    try:
        with taskcs.Client(record.endpoint, foreground=None, reconnect_timeout=1.0) as client:
            fut = client.submit("sleep", 30)
            wait_until(lambda: server_status(runtime_dir)["stats"]["submitted"] == 1, what="the task to arrive")
            os.kill(record.pid, signal.SIGKILL)
            with pytest.raises(taskcs.BrokenError) as info:
                fut.result(timeout=30)
            assert record.endpoint in str(info.value) and "within 1s" in str(info.value)
            assert discovery.live_record(runtime_dir) is None  # a named server is never auto-started
    finally:
        _kill(executors)


def test_a_named_server_that_comes_back_in_time_gets_the_work_again(runtime_dir: Path, start_server: Any) -> None:
    record = start_server(1)
    executors = _executor_pids(runtime_dir)
    try:
        with taskcs.Client(record.endpoint, foreground=None, reconnect_timeout=30.0) as client:
            slow = [client.submit("burn", 0.05) for _ in range(10)]  # still running when it dies
            futures = [client.submit("add", i, i) for i in range(50)]
            wait_until(lambda: server_status(runtime_dir)["stats"]["submitted"] == 60, what="the tasks to arrive")
            os.kill(record.pid, signal.SIGKILL)
            wait_until(lambda: not discovery.pid_alive(record.pid), what="the server to die")
            new, started = discovery.ensure_server(runtime_dir, ["--executors", "2"])  # same ipc endpoint
            assert started and new.endpoint == record.endpoint
            assert [f.result(timeout=30) for f in futures] == [2 * i for i in range(50)]
            assert all(isinstance(f.result(timeout=30), int) for f in slow)
            assert client.server_pid == new.pid
    finally:
        _kill(executors)


def test_two_clients_of_a_killed_server_meet_on_one_new_server(runtime_dir: Path, start_server: Any) -> None:
    record = start_server(2, 60.0, "--heartbeat", "30")
    executors = _executor_pids(runtime_dir)
    try:
        with taskcs.Client(foreground=None) as a, taskcs.Client(foreground=None) as b:
            work = {c: [c.submit("burn", 0.02) for _ in range(10)] + [c.submit("multiply", i, 7) for i in range(100)]
                    for c in (a, b)}
            wait_until(lambda: server_status(runtime_dir)["stats"]["done"] >= 2, what="some tasks done")
            os.kill(record.pid, signal.SIGKILL)
            for futures in work.values():
                assert [f.result(timeout=60) for f in futures[10:]] == [7 * i for i in range(100)]
            new = discovery.live_record(runtime_dir)
            assert new is not None and new.pid != record.pid
            assert a.server_pid == b.server_pid == new.pid  # the start lock let one server start
    finally:
        _kill(executors)


@pytest.mark.timeout(120)
def test_soak_server_kills_at_smoke_size() -> None:
    """The soak suite's server-kill scenario (benchmarks/soak.py), tiny: every set completes."""
    from benchmarks import soak

    outcome = soak.server_kills(times=2, set_size=100)
    assert outcome.ok, outcome.line
    assert outcome.figures["completed"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_tcp_server_death_is_noticed_by_its_connection_closing(runtime_dir: Path, start_server: Any) -> None:
    # Heartbeats 30 s apart (silence: 150 s): only the socket monitor can tell within the wait.
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    record = start_server(1, 60.0, "--heartbeat", "30", "--endpoint", endpoint)
    executors = _executor_pids(runtime_dir)
    try:
        with taskcs.Client(endpoint, foreground=None, reconnect_timeout=1.0) as client:
            fut = client.submit("sleep", 30)
            wait_until(lambda: server_status(runtime_dir)["stats"]["submitted"] == 1, what="the task to arrive")
            os.kill(record.pid, signal.SIGKILL)
            with pytest.raises(taskcs.BrokenError, match="connection to the server closed") as info:
                fut.result(timeout=20)
            assert endpoint in str(info.value)
    finally:
        _kill(executors)


def test_clients_leave_no_watch_behind(runtime_dir: Path, start_server: Any) -> None:
    start_server(1)

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with taskcs.Client(foreground=None) as warm:  # the shared ZeroMQ context's own fds
        assert warm.submit("add", 1, 1).result(10) == 2
    before = fds()
    for _ in range(10):
        with taskcs.Client(foreground=None) as client:
            assert client.submit("add", 1, 2).result(10) == 3
            assert client._watch is not None  # a pidfd on the local server
    assert fds() <= before + 2, "each client left file descriptors behind"
