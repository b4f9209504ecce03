"""Phase 3 under failure and load: a server that dies, a client that dies, flow control."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import taskcs
from taskcs.runtime import discovery

from .conftest import run_cli, server_status, wait_until

pytestmark = pytest.mark.multiprocess


def test_client_notices_a_dead_server_and_fails_its_futures(runtime_dir: Path, start_server: Any) -> None:
    record = start_server(1, 60.0, "--heartbeat", "0.1")  # expiry = 5 x 0.1 s
    # A named server: retried briefly, never auto-started (see test_server_death.py for that).
    client = taskcs.Client(record.endpoint, foreground=None, reconnect_timeout=0.5)
    executors: list[int] = []
    try:
        fut = client.submit("sleep", 30)
        status = wait_until(lambda: (s := server_status(runtime_dir))["stats"]["submitted"] == 1 and s,
                            what="the task to arrive")
        executors = [ex["pid"] for ex in status["executors"] if ex["capacity"] and not ex["stdio"]]
        os.kill(record.pid, signal.SIGKILL)  # the server we started, by its pid
        with pytest.raises(taskcs.BrokenError, match="exited"):
            fut.result(timeout=10)
        with pytest.raises(taskcs.BrokenError):
            client.submit("add", 1, 2)
    finally:
        client.abort()
        # Its orphaned executor would sleep out the 30 s task before noticing: stop it too.
        for pid in executors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_killed_client_has_its_tasks_dropped(runtime_dir: Path, start_server: Any) -> None:
    start_server(1, 60.0, "--heartbeat", "0.1")
    script = (
        "import taskcs, time\n"
        "c = taskcs.Client(foreground=None)\n"
        "fs = [c.submit('sleep', 0.2) for _ in range(50)]\n"
        "print('submitted', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "submitted"
        wait_until(lambda: server_status(runtime_dir)["stats"]["submitted"] == 50, what="50 tasks queued")
        proc.kill()  # no BYE: the server must notice the silence
    finally:
        proc.kill()
        proc.wait(10)
    def dropped() -> dict[str, Any] | None:
        status = server_status(runtime_dir)
        return status if not status["clients"] and not status["sets"] else None

    status = wait_until(dropped, what="the dead client to be dropped")
    assert status["queued"] == 0
    assert status["stats"]["done"] <= 3  # its queued tasks were dropped, not run
    with taskcs.Client(foreground=None) as other:  # and the server serves everyone else
        assert other.submit("add", 2, 2).result(10) == 4


def test_flow_control_bounds_what_a_fast_client_puts_on_the_server(runtime_dir: Path, start_server: Any) -> None:
    start_server(1, 60.0, "--client-credit", "50")
    with taskcs.Client(foreground=None) as client:
        futures = [client.submit("sleep", 0.001) for _ in range(600)]
        peak = 0
        while not all(f.done() for f in futures):
            sets = server_status(runtime_dir)["sets"]
            peak = max([peak] + [s["queued"] + s["running"] for s in sets])
        assert [f.result() > 0 for f in futures] == [True] * 600
    assert 0 < peak <= 50


def test_discovery_record_and_socket_are_private(runtime_dir: Path, start_server: Any) -> None:
    record = start_server(1)
    assert (runtime_dir.stat().st_mode & 0o777) == 0o700
    assert ((runtime_dir / discovery.RECORD).stat().st_mode & 0o777) == 0o600
    assert Path(record.endpoint[len("ipc://"):]).exists()


def test_a_live_server_of_another_taskcs_build_is_not_taken(runtime_dir: Path, start_server: Any) -> None:
    import dataclasses

    from taskcs.runtime import protocol as p

    record = start_server(1)
    live = discovery.live_record(runtime_dir)
    assert live is not None and live.features == p.FEATURES  # the server publishes its features
    older = dataclasses.replace(record, features=p.FEATURES - 1)  # as a build before this one wrote it
    discovery.write_record(runtime_dir, older)
    assert discovery.live_record(runtime_dir) is None  # a client would misread its messages
    out = run_cli("cs-server", "stop")  # ... but `stop` still reaches it (after an upgrade, say)
    assert out.returncode == 0 and f"cs-server {record.pid} stopped" in out.stdout, out.stderr
    assert not discovery.pid_alive(record.pid)


def test_cold_cs_client_run_is_quick(runtime_dir: Path) -> None:
    # Not a timing assertion (those belong to benchmarks): the cold path must work end to end
    # from nothing, and leave exactly one server behind.
    started = time.monotonic()
    out = subprocess.run([str(Path(sys.executable).parent / "cs-client"), "add", "1", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "= 3" in out.stdout, out.stderr
    record = discovery.live_record(runtime_dir)
    assert record is not None and discovery.pid_alive(record.pid)
    assert time.monotonic() - started < 30
