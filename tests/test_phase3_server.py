"""Phase 3 end to end: the cs-server process, discovery, auto-start, control and fault recovery.

Every test runs real processes on real ZeroMQ ipc sockets in its own runtime directory; the
``runtime_dir`` fixture stops whatever server is recorded there. Waiting is always on a
condition (``wait_until``), never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from taskcs import Client, ExecutorDiedError, ServerStartError, TaskcsError
from taskcs.runtime import discovery
from taskcs.runtime import protocol as p
from taskcs.server.control import request
from tests.conftest import BIN, run_cli, server_status, wait_until

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(30)]

#: Executors of an auto-started server (cs-server's default: one per core).
DEFAULT_EXECUTORS = os.cpu_count() or 1


def _executors(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The server's executor processes (not clients' foreground executors)."""
    return [ex for ex in status["executors"] if not ex["stdio"]]


def _server_pids(directory: Path) -> list[int]:
    """Pids of every live cs-server process started for ``directory`` (scans /proc).

    Forked executors share their server's command line; they are told apart by their parent.
    """
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if b"taskcs.server.cli" in argv and str(directory).encode() in argv and discovery.pid_alive(int(entry.name)):
            parents[int(entry.name)] = ppid
    return sorted(pid for pid, ppid in parents.items() if ppid not in parents)


def _status_when(directory: Path, predicate: Any, what: str) -> dict[str, Any]:
    """The first server status for which ``predicate(status)`` holds (polled with a deadline)."""

    def probe() -> dict[str, Any] | None:
        status = server_status(directory)
        return status if predicate(status) else None

    return wait_until(probe, what=what)


def _wait_executors(directory: Path, count: int = DEFAULT_EXECUTORS) -> dict[str, Any]:
    return _status_when(directory, lambda s: len(_executors(s)) == count, f"{count} executors connected")


# ------------------------------------------------------------------ discovery and auto-start
def test_client_autostarts_a_server_from_nothing(runtime_dir: Path) -> None:
    runtime_dir.rmdir()  # truly nothing: the client creates the directory itself
    with Client(foreground=None) as client:
        assert client.submit("add", 2, 3).result(timeout=10) == 5
        record = discovery.read_record(runtime_dir)
        assert record is not None
        assert record.pid == client.server_pid != os.getpid()
        assert discovery.pid_alive(record.pid)
        assert record.endpoint == f"ipc://{runtime_dir / discovery.SOCKET}"
        assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((runtime_dir / discovery.RECORD).stat().st_mode) == 0o600
        assert _server_pids(runtime_dir) == [record.pid]
        _wait_executors(runtime_dir)


def test_second_client_reuses_the_running_server(runtime_dir: Path) -> None:
    with Client(foreground=None) as first:
        pid = first.server_pid
    with Client(foreground=None) as second:
        assert second.server_pid == pid
        assert second.submit("multiply", 6, 7).result(timeout=10) == 42
    assert _server_pids(runtime_dir) == [pid]
    _wait_executors(runtime_dir)


RACER = """
import sys
from taskcs import Client
print("ready", flush=True)
sys.stdin.readline()  # released together with the other racers
client = Client(foreground=None)
print(client.server_pid, flush=True)
client.shutdown()
"""


def test_racing_clients_start_exactly_one_server(runtime_dir: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", RACER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:  # release them as close together as we can
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=30) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    pids = {int(out.strip()) for out, _ in outputs}
    assert len(pids) == 1, outputs
    assert _server_pids(runtime_dir) == list(pids)
    log = (runtime_dir / discovery.LOG).read_text()
    assert log.count("listening on") == 1, log
    _wait_executors(runtime_dir)


@pytest.mark.parametrize("holder", ["dead pid", "live pid that is no server"])
def test_stale_record_is_removed_and_a_fresh_server_started(runtime_dir: Path, holder: str) -> None:
    proc = subprocess.Popen(["sleep", "30"] if holder.startswith("live") else ["true"])
    if holder == "dead pid":
        proc.wait()
    fake = discovery.ServerRecord(proc.pid, discovery.default_endpoint(runtime_dir), p.VERSION, time.time() - 60)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as leftover:  # a dead server's socket file
            leftover.bind(str(runtime_dir / discovery.SOCKET))
        discovery.write_record(runtime_dir, fake)
        with Client(foreground=None) as client:
            assert client.server_pid != proc.pid
            assert client.submit("add", 1, 1).result(timeout=10) == 2
            record = discovery.read_record(runtime_dir)
            assert record is not None and record.pid == client.server_pid
            _wait_executors(runtime_dir)
        assert proc.poll() is None or holder == "dead pid"  # the stale holder was left alone
    finally:
        discovery.remove_record(runtime_dir, proc.pid)  # never let teardown signal the fake pid
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_explicit_address_with_no_server_fails_clearly_without_autostart(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = f"ipc://{runtime_dir / 'nobody.sock'}"
    started = time.monotonic()
    with pytest.raises(ServerStartError, match="no answer from the server"):
        Client(nowhere, connect_timeout=0.5)
    monkeypatch.setenv("TASKCS_ADDRESS", nowhere)
    with pytest.raises(ServerStartError, match="no answer from the server"):
        Client(connect_timeout=0.5)
    assert time.monotonic() - started < 5
    assert discovery.read_record(runtime_dir) is None
    assert _server_pids(runtime_dir) == []


def test_no_autostart_without_a_server_fails_clearly(runtime_dir: Path) -> None:
    with pytest.raises(ServerStartError, match="no taskcs server is running"):
        Client(autostart=False, connect_timeout=0.5)
    assert discovery.read_record(runtime_dir) is None


# ------------------------------------------------------------------------ lifecycle via CLI
def test_idle_server_exits_by_itself_after_its_client_leaves(runtime_dir: Path) -> None:
    proc = run_cli("cs-server", "start", "--executors", "1", "--idle-timeout", "1", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "cs-server started: pid" in proc.stdout
    record = discovery.read_record(runtime_dir)
    assert record is not None
    with Client(foreground=None) as client:
        assert client.server_pid == record.pid
        # work that outlasts the idle timeout keeps the server alive
        assert client.submit("sleep", 1.3).result(timeout=10) >= 1.3
        assert discovery.pid_alive(record.pid)
    wait_until(lambda: not discovery.pid_alive(record.pid), timeout=10, what="the idle server to exit")
    assert discovery.read_record(runtime_dir) is None
    assert not (runtime_dir / discovery.SOCKET).exists()


def test_start_twice_reports_the_running_server(runtime_dir: Path) -> None:
    first = run_cli("cs-server", "start", "--executors", "1", timeout=30)
    second = run_cli("cs-server", "start", "--executors", "1", timeout=30)
    assert first.returncode == second.returncode == 0, (first.stderr, second.stderr)
    record = discovery.read_record(runtime_dir)
    assert record is not None
    assert f"started: pid {record.pid}" in first.stdout
    assert f"already running: pid {record.pid}" in second.stdout


def test_status_shows_pid_and_executors(runtime_dir: Path, start_server: Any) -> None:
    record = start_server(executors=2)
    info = _wait_executors(runtime_dir, 2)
    proc = run_cli("cs-server", "status", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["pid"] == record.pid
    pids = sorted(ex["pid"] for ex in _executors(data))
    assert pids == sorted(ex["pid"] for ex in _executors(info))
    assert all(pid != record.pid and discovery.pid_alive(pid) for pid in pids)
    assert data["executors_replaced"] == 0 and data["dropped_messages"] == 0
    text = run_cli("cs-server", "status")
    assert text.returncode == 0, text.stderr
    assert f"cs-server pid {record.pid} on {record.endpoint}" in text.stdout
    assert "executors (2, 0 replaced)" in text.stdout
    for pid in pids:
        assert f"pid {pid}" in text.stdout


def test_status_and_stop_without_a_server_exit_1(runtime_dir: Path) -> None:
    for command in ("status", "stop"):
        proc = run_cli("cs-server", command)
        assert proc.returncode == 1
        assert f"no server running in {runtime_dir}" in proc.stderr


def test_stop_ends_the_server_and_removes_its_record(runtime_dir: Path, start_server: Any) -> None:
    record = start_server(executors=1)
    executor_pids = [ex["pid"] for ex in _executors(_wait_executors(runtime_dir, 1))]
    proc = run_cli("cs-server", "stop", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"cs-server {record.pid} stopped" in proc.stdout
    assert not discovery.pid_alive(record.pid)
    assert discovery.read_record(runtime_dir) is None
    assert not (runtime_dir / discovery.SOCKET).exists()
    wait_until(lambda: not any(discovery.pid_alive(pid) for pid in executor_pids), what="executors to exit")


def test_stop_right_after_start_is_prompt(runtime_dir: Path) -> None:
    # spawn: a fresh interpreter takes ~0.2 s to join, so the stop reliably arrives first
    record, _ = discovery.ensure_server(runtime_dir, ["--executors", "1", "--start-method", "spawn"])
    started = time.monotonic()
    request(record.endpoint, p.Stop(False))
    wait_until(lambda: not discovery.pid_alive(record.pid), what="the server to exit")
    elapsed = time.monotonic() - started
    killed = "exited with code -9" in (runtime_dir / discovery.LOG).read_text()
    assert elapsed < 2.0 and not killed, f"stop took {elapsed:.1f}s, executor SIGKILLed: {killed}"


def test_stop_now_fails_the_running_task_instead_of_hanging(runtime_dir: Path, start_server: Any) -> None:
    record = start_server(executors=1)
    client = Client(foreground=None)
    stopper: subprocess.Popen[str] | None = None
    try:
        fut = client.submit("sleep", 30)
        wait_until(lambda: any(ex["in_flight"] for ex in _executors(server_status(runtime_dir))),
                   what="the sleep task to be running")
        stopper = subprocess.Popen([str(BIN / "cs-server"), "stop", "--now"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        exc = fut.exception(timeout=5)  # promptly: not after the 30 s task, nor after the server exits
        assert isinstance(exc, TaskcsError)
        assert "the server stopped before this task finished" in str(exc)
        out, err = stopper.communicate(timeout=30)
        assert stopper.returncode == 0, err
        assert f"cs-server {record.pid} stopped" in out
        assert not discovery.pid_alive(record.pid)
        assert discovery.read_record(runtime_dir) is None
        with pytest.raises(TaskcsError):  # the client knows its server is gone
            client.submit("add", 1, 2).result(timeout=5)
    finally:
        if stopper is not None and stopper.poll() is None:
            stopper.kill()
            stopper.wait()
        client.shutdown(wait=True)


# ----------------------------------------------------------------------- fault injection
def test_executor_killed_mid_task_is_retried_and_replaced(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=2)
    _wait_executors(runtime_dir, 2)
    with Client(foreground=None) as client:
        fut = client.submit("sleep", 0.8)
        busy = wait_until(lambda: [ex for ex in _executors(server_status(runtime_dir)) if ex["in_flight"]],
                          what="an executor running the task")
        victim = busy[0]
        os.kill(victim["pid"], signal.SIGKILL)
        assert fut.result(timeout=15) >= 0.8
        assert fut.executor is not None and fut.executor != victim["name"]
        status = _status_when(runtime_dir, lambda s: s["executors_replaced"] >= 1 and len(_executors(s)) == 2,
                              "the dead executor to be replaced")
        assert status["stats"]["retried"] == 1
        assert victim["pid"] not in [ex["pid"] for ex in _executors(status)]
        # the set still completes on the repaired pool
        assert [f.result(timeout=10) for f in [client.submit("add", i, i) for i in range(10)]] == \
            [2 * i for i in range(10)]


def test_task_killing_every_executor_fails_with_its_exit_code(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=2)
    with Client(foreground=None) as client:
        fut = client.submit("exit_process", 7)
        exc = fut.exception(timeout=20)
        assert isinstance(exc, ExecutorDiedError), repr(exc)
        assert exc.exit_code == 7
        assert "exited with code 7" in str(exc)
        status = _status_when(runtime_dir, lambda s: s["executors_replaced"] >= 2 and len(_executors(s)) == 2,
                              "both dead executors to be replaced")
        assert status["stats"]["retried"] == 1  # DEFAULT_RETRIES: one retry, then the failure
        assert status["stats"]["failed"] == 1
        assert client.submit("add", 1, 2).result(timeout=15) == 3


def test_malformed_messages_are_dropped_and_the_server_keeps_serving(
    runtime_dir: Path, start_server: Any
) -> None:
    record = start_server(executors=1)
    context: zmq.Context[Any] = zmq.Context()
    raw = context.socket(zmq.DEALER)
    raw.linger = 0
    try:
        raw.connect(record.endpoint)
        hello = p.HEADER + bytes([p.Command.HELLO])
        bad = [
            [b"garbage"],
            [b"XXXX\x01body"],
            [p.HEADER + bytes([99]) + pickle.dumps(())],
            [hello + b"not a pickle"],
            [hello + pickle.dumps(os.system)],  # a global: refused
            [hello + pickle.dumps(("client",))],  # wrong field count
            [p.HEADER, bytes([p.Command.HELLO]), pickle.dumps(("client", "x", 1))],  # three frames, not one
            [bytes(p.to_frames(p.ExecDone([(1, 0, b"x" * p.OOB_BYTES, 1, 0, 0)]))[0])],  # its payload frame missing
        ]
        for frames in bad:
            raw.send_multipart(frames)
        wait_until(lambda: server_status(runtime_dir)["dropped_messages"] >= len(bad),
                   what="the malformed messages to be counted")
        # well-formed but unexpected: a clear ERROR reply, not silence
        raw.send(p.to_wire(p.Submit(1, [], {}, True)))
        assert raw.poll(5000), "no reply to SUBMIT before HELLO"
        reply = p.from_wire(raw.recv())
        assert isinstance(reply, p.Error) and "HELLO" in reply.text
    finally:
        raw.close()
        context.term()
    assert discovery.pid_alive(record.pid)
    with Client(foreground=None) as client:
        assert client.submit("add", 20, 22).result(timeout=10) == 42
    assert server_status(runtime_dir)["dropped_messages"] == len(bad)


def test_server_sigterm_is_a_graceful_stop(runtime_dir: Path, start_server: Any) -> None:
    record = start_server(executors=1)
    with contextlib.closing(Client(foreground=None)) as client:
        fut = client.submit("sleep", 0.5)
        wait_until(lambda: any(ex["in_flight"] for ex in _executors(server_status(runtime_dir))),
                   what="the task to be running")
        os.kill(record.pid, signal.SIGTERM)
        assert fut.result(timeout=10) >= 0.5  # accepted work finishes before the server leaves
    wait_until(lambda: not discovery.pid_alive(record.pid), what="the server to exit")
    assert discovery.read_record(runtime_dir) is None
