"""Issue 9, item 3: when a client leaves, or force-cancels a task, its running work is stopped.

The dispatcher's rules first (sans-IO), then real processes: a cs-client Ctrl-C'd in the
middle of ``sleep 30``, a client SIGKILLed, ``client.cancel(future, force=True)``, and a task
that ignores KeyboardInterrupt, whose executor is replaced after the grace period.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import taskcs
from taskcs.runtime import protocol as p
from taskcs.runtime.dispatcher import DispatcherConfig
from taskcs.runtime.task import Status

from .conftest import BIN, server_status, wait_until
from .runtime.test_dispatcher import Harness, normal


# ------------------------------------------------------------------ the dispatcher's rules
@pytest.fixture
def tight() -> Harness:
    return Harness(DispatcherConfig(heartbeat_interval=None, prefetch_seconds=0))


def test_a_force_cancel_answers_at_once_and_interrupts_the_executor(tight: Harness) -> None:
    c = tight.client("c")
    e = tight.executor("e", pid=777)
    tight.submit(c, 1, [normal(1), normal(2)])
    (gid,) = tight.gids(e)
    tight.send(c, p.Cancel([-1]))
    assert [(tid, status) for tid, status, _, _ in tight.results(c)] == [(1, Status.CANCELLED)]
    assert [m.gids for m in tight.take(e, p.Interrupt)] == [[gid]]
    assert tight.d.interrupted() == [(777, 0.0)]
    assert tight.gids(e) == []  # its slot stays taken until the executor answers
    tight.complete(e, [gid], status=Status.CANCELLED)
    assert tight.results(c) == []  # the late answer is not a second result
    assert tight.d.interrupted() == []
    assert len(tight.gids(e)) == 1  # task 2 now runs
    tight.send(c, p.Cancel([-2, -2, -99]))  # twice, and an unknown id: answered once
    assert [tid for tid, *_ in tight.results(c)] == [2]


def test_a_force_cancel_of_a_queued_task_is_a_plain_cancel(tight: Harness) -> None:
    c = tight.client("c")
    e = tight.executor("e")
    tight.submit(c, 1, [normal(1), normal(2)])
    tight.send(c, p.Cancel([-2]))
    assert [(tid, status) for tid, status, _, _ in tight.results(c)] == [(2, Status.CANCELLED)]
    assert tight.take(e, p.Interrupt) == []


def test_a_gone_client_has_its_running_tasks_interrupted_until_the_executor_goes(tight: Harness) -> None:
    c = tight.client("c")
    e1 = tight.executor("e1", pid=11)
    e2 = tight.executor("e2", pid=22)
    tight.submit(c, 1, [normal(i) for i in range(1, 5)])
    g1, g2 = tight.gids(e1), tight.gids(e2)
    tight.gone(c)
    assert [m.gids for m in tight.take(e1, p.Interrupt)] == [g1]
    assert [m.gids for m in tight.take(e2, p.Interrupt)] == [g2]
    assert sorted(pid for pid, _ in tight.d.interrupted()) == [11, 22]
    tight.gone(e2, reason="killed for not stopping", graceful=True)
    assert tight.d.interrupted() == [(11, 0.0)]
    tight.complete(e1, g1)
    assert tight.d.interrupted() == []
    assert not tight.d.has_work()


# ------------------------------------------------------------------ real processes


def _executors(directory: Path) -> list[dict[str, Any]]:
    return [ex for ex in server_status(directory)["executors"] if not ex["stdio"]]


def _idle(directory: Path, clients: int = 0) -> dict[str, Any] | None:
    """The status once nothing is in flight or queued and ``clients`` are connected."""
    status = server_status(directory)
    busy = [ex for ex in status["executors"] if not ex["stdio"] and ex["in_flight"]]
    busy += [s for s in status["sets"] if s["queued"] or s["running"]]
    return None if busy or len(status["clients"]) != clients else status


def _running(directory: Path, n: int = 1) -> list[int]:
    """Pids of executors once ``n`` of them run something."""
    busy = [ex["pid"] for ex in _executors(directory) if ex["in_flight"]]
    return busy if len(busy) >= n else []


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_ctrl_c_on_cs_client_stops_its_task_on_the_executor(runtime_dir: Path, start_server: Any) -> None:
    start_server(1)
    proc = subprocess.Popen([str(BIN / "cs-client"), "sleep", "30"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (pid,) = wait_until(lambda: _running(runtime_dir), what="sleep 30 to start on the executor")
        proc.send_signal(signal.SIGINT)  # the Ctrl-C, to the process we started
        assert proc.wait(10) == 130
    finally:
        proc.kill()
        proc.communicate(timeout=10)
    status = wait_until(lambda: _idle(runtime_dir), what="nothing in flight")
    assert status["executors_replaced"] == 0  # interrupted, not killed
    with taskcs.Client(foreground=None) as client:
        fut = client.submit("add", 1, 2)
        assert fut.result(10) == 3
    assert [ex["pid"] for ex in _executors(runtime_dir)] == [pid]  # the same executor served it


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_killed_client_has_its_running_tasks_stopped(runtime_dir: Path, start_server: Any) -> None:
    start_server(2)
    script = (
        "import taskcs, time\n"
        "c = taskcs.Client(foreground=None)\n"
        "fs = [c.submit('sleep', 30) for _ in range(4)]\n"
        "print('submitted', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "submitted"
        pids = wait_until(lambda: _running(runtime_dir, 2), what="both executors to run a sleep")
    finally:
        proc.kill()  # no BYE: the server notices the connection closing
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    status = wait_until(lambda: _idle(runtime_dir), what="the killed client's work to stop")
    assert status["executors_replaced"] == 0
    assert sorted(ex["pid"] for ex in _executors(runtime_dir)) == sorted(pids)


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_force_cancel_stops_a_running_task_and_shutdown_cancel_futures_stops_the_rest(
        runtime_dir: Path, start_server: Any) -> None:
    start_server(1)
    client = taskcs.Client(foreground=None)
    try:
        fut = client.submit("sleep", 30)
        wait_until(lambda: _running(runtime_dir), what="the sleep to start")
        assert client.cancel(fut, force=False) is False  # concurrent.futures' meaning: it runs
        assert not fut.cancelled()
        assert _running(runtime_dir)  # ... and it is not stopped on the executor
        # ... and force then still stops it (the server kept it, since it was running)
        assert client.cancel(fut, force=True) is True
        wait_until(lambda: _idle(runtime_dir, clients=1), what="the cancelled sleep to stop")
        fut = client.submit("sleep", 30)
        wait_until(lambda: _running(runtime_dir), what="the second sleep to start")
        assert client.cancel(fut, force=True)
        with pytest.raises(cf.CancelledError):
            fut.result(1)
        wait_until(lambda: _idle(runtime_dir, clients=1), what="the forced sleep to stop")
        done = client.submit("add", 2, 2)
        assert done.result(10) == 4
        assert client.cancel(done) is False  # it has its result
        with pytest.raises(ValueError):
            client.cancel(cf.Future())
        fut = client.submit("sleep", 30)
        wait_until(lambda: _running(runtime_dir), what="the third sleep to start")
        client.shutdown(wait=True, cancel_futures=True)
    finally:
        client.abort()
    status = wait_until(lambda: _idle(runtime_dir), what="the shut-down client's sleep to stop")
    assert status["executors_replaced"] == 0


def _stubborn(seconds: float, ready: str) -> str:
    """A task that ignores SIGINT, as one stuck in C code would: only replacing its executor
    stops it. (Catching KeyboardInterrupt in a loop is not enough: the interrupt can land
    outside the ``try``, and then the task does stop.)"""
    import signal
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    open(ready, "w").close()  # tell the test: from now on, only SIGKILL stops this task
    time.sleep(seconds)
    return "finished"


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_an_executor_that_does_not_stop_is_replaced(runtime_dir: Path, start_server: Any) -> None:
    start_server(1)
    with taskcs.Client(foreground=None) as client:
        ready = runtime_dir / "stubborn-ready"
        fut = client.submit(_stubborn, 60, str(ready))
        behind = client.submit("add", 5, 5)  # queued behind it: must survive the replacement
        wait_until(ready.exists, what="the stubborn task to ignore SIGINT")
        (pid,) = _running(runtime_dir)
        assert client.cancel(fut)
        wait_until(lambda: server_status(runtime_dir)["executors_replaced"] == 1, timeout=20,
                   what="the executor to be replaced")
        assert behind.result(20) == 10
        assert client.submit("add", 1, 1).result(10) == 2
        new = [ex["pid"] for ex in _executors(runtime_dir)]
        assert new and pid not in new
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped by its server


def _notes_its_interrupt(path: str) -> None:
    """Sleeps; writes ``path`` when it sees KeyboardInterrupt, then lets it end the task."""
    import time

    try:
        time.sleep(30)
    except KeyboardInterrupt:
        Path(path).write_text("KeyboardInterrupt")
        raise


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_a_silent_client_has_its_task_interrupted_where_it_sleeps(runtime_dir: Path, start_server: Any) -> None:
    """SIGSTOP keeps the connection open: only heartbeat expiry notices; the task itself
    sees KeyboardInterrupt (its executor is not killed)."""
    start_server(1, 60.0, "--heartbeat", "0.1")  # expiry = 5 x 0.1 s
    marker = runtime_dir / "interrupted"
    script = (
        "import sys, time, taskcs\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from tests.test_abandoned_work import _notes_its_interrupt\n"
        "c = taskcs.Client(foreground=None)\n"
        "f = c.submit(_notes_its_interrupt, sys.argv[2])\n"
        "print('submitted', flush=True)\n"
        "time.sleep(60)\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", script, repo, str(marker)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "submitted"
        (pid,) = wait_until(lambda: _running(runtime_dir), what="the task to start")
        proc.send_signal(signal.SIGSTOP)  # silent, connection still open
        wait_until(marker.exists, what="the task to see KeyboardInterrupt")
        status = wait_until(lambda: _idle(runtime_dir), what="the silent client to be dropped")
    finally:
        proc.kill()
        proc.send_signal(signal.SIGCONT)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert marker.read_text() == "KeyboardInterrupt"
    assert status["executors_replaced"] == 0
    assert [ex["pid"] for ex in _executors(runtime_dir)] == [pid]
