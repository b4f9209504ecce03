"""Issue 14: a real Dask cluster as an engine of cs-server, on loopback only.

Each scenario of tests/test_engines_scenarios.py runs as a real ``__main__`` in a network
namespace that has only loopback (``unshare -n``, then ``ip link set lo up``): a Dask
scheduler and workers (which cannot import the scenario), a cs-server with ``--engine
dask://...`` and a client. The checks on what the scenario saw are made here.
Cases that need no cluster (bad spec, missing extra, unreachable address) run directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import run_cli

SCENARIOS = Path(__file__).with_name("test_engines_scenarios.py")

pytestmark = [pytest.mark.engine, pytest.mark.multiprocess]

# Looked up, not imported: importing distributed or ray here would change the test process
# for every other test (both patch pickling and signal handling on import).
HAVE_DASK = importlib.util.find_spec("distributed") is not None


def _netns_ok() -> str | None:
    """None if a loopback-only network namespace can be made here, else why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip not installed"
    try:
        out = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -n failed: {exc}"
    return None if out.returncode == 0 else f"unshare -n needs root: {out.stderr.decode().strip()}"


NETNS_PROBLEM = _netns_ok()
needs_cluster = [
    pytest.mark.skipif(not HAVE_DASK, reason="needs the dask extra: pip install -e '.[test,dask]'"),
    pytest.mark.skipif(NETNS_PROBLEM is not None, reason=f"no loopback-only namespace: {NETNS_PROBLEM}"),
]


def cluster(fn: Any) -> Any:
    """Skip (with the reason) where there is no dask extra or no loopback-only namespace."""
    for mark in needs_cluster:
        fn = mark(fn)
    return fn


def run_scenario(name: str, runtime_dir: Path, timeout: float = 240) -> tuple[dict[str, Any], str]:
    """Run one scenario in its own loopback-only namespace; its RESULT and its whole stdout."""
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, str(SCENARIOS), name]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "TASKCS_RUNTIME_DIR": str(runtime_dir)})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the scenario and the dask processes it started
        out, err = proc.communicate()
        pytest.fail(f"scenario {name} timed out\n--- stdout\n{out}\n--- stderr\n{err[-4000:]}")
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"scenario {name} failed\n--- stdout\n{out}\n--- stderr\n{err[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):]), out


@cluster
def test_mixed_set_runs_main_functions_on_workers_and_iotasks_on_the_client(runtime_dir: Path) -> None:
    result, out = run_scenario("mixed", runtime_dir)
    expected: list[Any] = [[2 * i, None] for i in range(8)]
    results = result["results"]
    assert len(results) == 10
    assert results[3] == "an IOTask on the client"
    assert results[-1] == 5
    values = [r for i, r in enumerate(results) if i not in (3, 9)]
    assert [v[0] for v in values] == [e[0] for e in expected]  # in submission order
    executors = result["executors"]
    assert executors[3] == result["client"]  # the IOTask stayed at home
    engine_lanes = [e for i, e in enumerate(executors) if i != 3]
    assert all(e.startswith("dask:worker-tcp://127.0.0.1:") for e in engine_lanes), executors
    # The __main__ function ran in the worker processes, not in the server.
    pids = {v[1] for v in values}
    assert pids <= set(result["worker_pids"]) and result["server_pid"] not in pids
    # What a task printed on a worker reached the client, marked like local output.
    for i in range(8):
        assert f"printed on a worker: {i}" in out
    assert result["engine"]["done"] == 9 and result["engine"]["failed"] == 0
    # 3,000 tiny tasks, in order, in far fewer engine tasks (the first few go alone: unmeasured).
    assert result["mapped_ok"] and result["map_done"] == 3000
    assert result["map_batches"] <= 3000 // 10, result["map_batches"]


@pytest.mark.slow
@cluster
def test_worker_sigkilled_mid_set_every_task_gets_exactly_one_result(runtime_dir: Path) -> None:
    result, _ = run_scenario("kill-worker", runtime_dir)
    outcomes = result["outcomes"]
    # Dask re-runs a task whose worker died (whatever its retries): nothing lost, one result each.
    assert [o[:2] for o in outcomes] == [["ok", i] for i in range(12)], outcomes
    assert result["engine"]["stats"]["done"] == 12 and result["engine"]["stats"]["failed"] == 0
    assert result["engine"]["workers"] == 1


@pytest.mark.slow
@cluster
def test_scheduler_killed_tasks_requeue_or_fail_naming_the_engine_then_it_reattaches(runtime_dir: Path) -> None:
    result, _ = run_scenario("kill-scheduler", runtime_dir)
    outcomes = result["outcomes"]
    assert result["on_engine"] >= 2
    assert len(outcomes) == 6
    for i, outcome in enumerate(outcomes):
        if outcome[0] == "ok":
            assert outcome[1] == i
        else:
            assert i % 2 == 0, "a task with retries=1 must run again, not fail"
            assert "engine dask at tcp://127.0.0.1:" in outcome[1] and "lost" in outcome[1], outcome
    # At least one retries=0 task was on the engine when it went: it fails, naming the engine.
    assert any(o[0] == "error" for o in outcomes), outcomes
    oks_after_loss = [o for i, o in enumerate(outcomes) if i % 2 == 1]
    assert all(o[0] == "ok" for o in oks_after_loss), outcomes
    assert result["after"] == 99  # the server kept serving on its local executor
    assert result["down"]["state"] in ("down", "connecting")
    assert result["again"]["state"] == "up" and result["again"]["connections"] == 2
    assert result["back"] == 42


@cluster
def test_cancelled_futures_reach_tasks_waiting_on_the_engine(runtime_dir: Path) -> None:
    result, _ = run_scenario("cancel", runtime_dir)
    assert result["first"] == 0
    assert result["cancelled"] == [True, True, True]
    assert result["engine"]["stats"]["cancelled"] == 3
    assert result["engine"]["in_flight"] == 0


@cluster
def test_version_mismatch_is_refused_with_one_line_naming_both_sides(runtime_dir: Path) -> None:
    result, _ = run_scenario("version-mismatch", runtime_dir)
    assert result["rc"] == 2, result
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1, lines
    assert "taskcs 0.0.0-other+" in lines[0] and "this server taskcs 0.1.0" in lines[0], lines[0]


@cluster
def test_a_worker_of_another_version_joining_later_is_reported(runtime_dir: Path) -> None:
    result, _ = run_scenario("late-mismatch", runtime_dir)
    problem = result["engine"]["problem"]
    assert "taskcs 0.0.0-other+" in problem and "this server taskcs 0.1.0" in problem, result
    assert result["engine"]["state"] == "up"


@pytest.mark.slow
@cluster
def test_a_task_that_kills_its_worker_fails_alone_not_its_batch_mates(runtime_dir: Path) -> None:
    result, _ = run_scenario("poison", runtime_dir)
    errors = result["errors"]
    # Dask gives up on a task after it was on 4 workers that died (allowed-failures 3), and
    # counts every task then in progress on a dying worker: an unlucky neighbour of the
    # culprit may share its fate, but the batch as a whole does not.
    assert "2500" in errors and all("KilledWorker" in e for e in errors.values()), errors
    assert len(errors) <= 3 and result["ok"] == 3000 - len(errors), errors


@pytest.mark.slow
@cluster
def test_cs_demo_with_a_dask_local_engine(runtime_dir: Path) -> None:
    result, _ = run_scenario("dask-local", runtime_dir)
    assert result["rc"] == 0, result
    assert "11/11 tasks succeeded" in result["stdout"]
    assert "on dask:worker-tcp://127.0.0.1:" in result["stdout"]
    assert "printed by an IOTask" in result["stdout"]



@cluster
def test_the_users_own_module_travels_by_value_to_workers_that_cannot_import_it(runtime_dir: Path) -> None:
    result, _ = run_scenario("user-module", runtime_dir)
    assert result["rc"] == 0, result["stderr"]
    assert result["norm"] == 5.0 and result["norm_on"].startswith("dask:worker-tcp://127.0.0.1:")
    assert result["scaled"] == ["userlib", 3, 6] and result["scaled_on"].startswith("dask:worker-")


@cluster
def test_a_server_takes_a_distributed_client_the_caller_holds(runtime_dir: Path) -> None:
    result, _ = run_scenario("given-client", runtime_dir)
    assert result["result"] == 8
    assert result["executor"].startswith("dask:worker-tcp://127.0.0.1:")
    assert result["dask_client_still_open"] is True


HAVE_RAY = importlib.util.find_spec("ray") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_RAY, reason="needs the ray extra (250 MB, not in the default test install): "
                    "pip install -e '.[test,ray]'")
@cluster
def test_mixed_set_on_a_ray_local_engine(runtime_dir: Path) -> None:
    result, out = run_scenario("ray-local", runtime_dir)
    results = result["results"]
    assert results[3] == "an IOTask on the client" and results[-1] == 5
    values = [r for i, r in enumerate(results) if i not in (3, 9)]
    assert [v[0] for v in values] == [2 * i for i in range(8)]
    executors = result["executors"]
    assert executors[3] == result["client"]
    assert all(e.startswith("ray:ray-node-") for i, e in enumerate(executors) if i != 3), executors
    assert result["server_pid"] not in {v[1] for v in values}
    for i in range(8):
        assert f"printed on a worker: {i}" in out
    # The Ray worker running a task is SIGKILLed: with retries=1 Ray runs it again; with
    # retries=0 it fails, once, naming the engine; the other tasks are untouched.
    assert result["retried"] == [["ok", i] for i in range(4)], result["retried"]
    not_retried = result["not_retried"]
    assert not_retried[1:] == [["ok", i] for i in range(1, 4)], not_retried
    assert not_retried[0][0] == "error" and "engine ray at local" in not_retried[0][1], not_retried
    assert result["engine"]["done"] == 9 + 4 + 3 and result["engine"]["failed"] == 1, result["engine"]


# ------------------------------------------------------------- no cluster needed
def test_unknown_engine_scheme_is_one_line_and_exit_2(runtime_dir: Path) -> None:
    out = run_cli("cs-server", "start", "--engine", "spark://host:7077", timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "cs-server: --engine 'spark://host:7077': unknown engine; expected dask://HOST:PORT, dask-local, "
        "ray://HOST:PORT, ray-auto or ray-local"]
    assert not (runtime_dir / "server.json").exists()


def test_missing_extra_names_the_pip_command(runtime_dir: Path, tmp_path: Path) -> None:
    # A `distributed` that cannot be imported, as on a default install (pyzmq + dill only).
    (tmp_path / "distributed").mkdir()
    (tmp_path / "distributed" / "__init__.py").write_text("raise ImportError('No module named distributed')\n")
    out = run_cli("cs-server", "start", "--engine", "dask-local", env={"PYTHONPATH": str(tmp_path)}, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == "cs-server: the Dask engine needs its extra: pip install 'taskcs[dask]'"


@pytest.mark.skipif(not HAVE_DASK, reason="needs the dask extra")
def test_unreachable_scheduler_is_one_line_and_exit_2(runtime_dir: Path) -> None:
    # Port 9 (discard) on loopback: nothing listens, so the connection is refused.
    out = run_cli("cs-server", "serve", "--engine", "dask://127.0.0.1:9", timeout=90)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cs-server: cannot reach the Dask scheduler at tcp://127.0.0.1:9")
    assert out.stdout == ""


@cluster
def test_with_no_executors_work_fails_naming_the_engine_past_its_grace_then_it_reattaches(
        runtime_dir: Path) -> None:
    result, _ = run_scenario("stranded", runtime_dir)
    outcomes = result["outcomes"]
    assert outcomes[0] == ["ok", 0]
    failed = [o for o in outcomes[1:] if o[0] == "error"]
    # The scheduler went with tasks on it (retries 1: requeued) and one submitted while it was
    # down: nothing here can run them, so past the 2 s grace each fails naming the engine.
    assert failed and outcomes[-1][0] == "error", outcomes
    for outcome in failed:
        assert outcome[1] == "EngineUnavailable", outcome
        assert "engine dask at tcp://127.0.0.1:" in outcome[2] and "unavailable" in outcome[2], outcome
    assert all(o == ["ok", i + 1] for i, o in enumerate(outcomes[1:-1]) if o[0] == "ok"), outcomes
    assert result["io"] == "IOTasks still run"  # the client's foreground needs no engine
    assert result["again"]["state"] == "up" and result["back"] == 42


@cluster
def test_client_in_process_with_an_engine(runtime_dir: Path) -> None:
    result, out = run_scenario("in-process", runtime_dir)
    results = result["results"]
    assert results[2] == "an IOTask at home"
    assert [r[0] for i, r in enumerate(results) if i != 2] == [2 * i for i in range(6)]
    executors = result["executors"]
    assert executors[2] == result["client"]
    assert all(e.startswith("dask:worker-tcp://127.0.0.1:") for i, e in enumerate(executors) if i != 2), executors
    pids = {r[1] for i, r in enumerate(results) if i != 2}
    assert pids <= set(result["worker_pids"]) and result["pid"] not in pids
    assert "printed on a worker: 3" in out
    assert result["engine"]["done"] == 6 and result["engine"]["state"] == "up"
    assert result["refused"].startswith("EngineError") and "127.0.0.1:9" in result["refused"], result["refused"]
