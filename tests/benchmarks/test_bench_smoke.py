"""The benchmark harness end to end at tiny sizes, with only the systems that need no extra
packages, writing into a temporary directory (never over the committed results)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEMS = ("taskcs-threads", "ProcessPoolExecutor", "multiprocessing.Pool", "zmq-reference",
           "zmq-broker-reference")
METRICS = ("submit_tps", "map_tps", "roundtrip_p50_us", "roundtrip_p99_us", "coldstart_s",
           "cpu_efficiency", "scale_200_us_per_task", "scale_200_client_hwm_mb",
           "payload_1mb_mbps", "payload_10mb_mbps")


def run_bench(out: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--no-plot", "--out-dir", str(out), *args],
        cwd=REPO, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    return data


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    return out, run_bench(out, "--systems", ",".join(SYSTEMS))


def test_every_system_reports_every_metric_positive(smoke: tuple[Path, dict[str, Any]]) -> None:
    _, data = smoke
    assert list(data["results"]) == list(SYSTEMS)
    for system in SYSTEMS:
        entry = data["results"][system]
        assert entry["errors"] == {}, (system, entry["errors"])
        for key in METRICS:
            stat = entry["metrics"][key]
            assert stat["n"] >= 1 and len(stat["samples"]) == stat["n"], (system, key)
            assert 0 < stat["min"] <= stat["median"] <= stat["max"], (system, key, stat)


def test_ratios_meta_and_report(smoke: tuple[Path, dict[str, Any]]) -> None:
    out, data = smoke
    ratios = data["ratios"]["taskcs-threads"]
    assert set(ratios) == set(SYSTEMS) - {"taskcs-threads"}
    assert all(r > 0 for peer in ratios.values() for r in peer.values())
    assert ratios["ProcessPoolExecutor"]["submit_tps"] == pytest.approx(
        data["results"]["taskcs-threads"]["metrics"]["submit_tps"]["median"]
        / data["results"]["ProcessPoolExecutor"]["metrics"]["submit_tps"]["median"])
    meta = data["meta"]
    assert meta["cores"] >= 1 and meta["python"].startswith("CPython 3")
    assert "benchmarks.run" in meta["command"] and meta["mode"] == "smoke"
    text = (out / "RESULTS.md").read_text()
    assert "Ratios taskcs-threads / peer" in text and meta["command"] in text


@pytest.mark.parametrize("system", ["zmq-reference", "zmq-broker-reference"])
def test_a_timed_out_child_is_killed_with_everything_it_started(system: str) -> None:
    from benchmarks import procs, run

    result = run.run_child(system, "cpu", "full", None, timeout=0.5)
    assert not result["ok"] and "timed out" in result["error"]
    assert procs.with_token(result["token"]) == []  # its worker (and broker) processes were swept too


def test_the_broker_reference_reports_its_broker_memory(smoke: tuple[Path, dict[str, Any]]) -> None:
    _, data = smoke
    assert data["results"]["zmq-broker-reference"]["metrics"]["scale_200_server_hwm_mb"]["median"] > 0


def test_a_missing_system_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import run

    monkeypatch.setitem(run.SYSTEMS, "absent", (run.SYSTEMS["zmq-reference"][0], "no_such_module_xyz"))
    entry = run.run_system("absent", "smoke", ["submit"])
    assert entry["metrics"] == {} and "not installed" in entry["errors"]["*"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_taskcs_server_adapter(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "--systems", "taskcs-ipc", "--workloads", "submit,roundtrip,coldstart")
    entry = data["results"]["taskcs-ipc"]
    assert entry["errors"] == {}
    for key in ("submit_tps", "roundtrip_p50_us", "coldstart_s", "coldstart_warm_s"):
        assert entry["metrics"][key]["median"] > 0


def test_a_disturbed_cell_is_measured_again_when_the_machine_is_quieter(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import procs, run

    monkeypatch.setitem(run.RETRY_TOTAL, "smoke", 60.0)
    monkeypatch.setattr(procs, "wait_quiet", lambda max_wait: 0.0)
    real_child = run.run_child

    def quiet_child(*args: Any, **kwargs: Any) -> dict[str, Any]:
        # The real load of this machine must not decide the test: the re-run reports quiet.
        return {**real_child(*args, **kwargs), "background_cores": 0.0}

    monkeypatch.setattr(run, "run_child", quiet_child)
    results: dict[str, Any] = {"multiprocessing.Pool": {
        "metrics": {}, "errors": {}, "background_cores": {"submit": 1.0, "map": 0.1}}}
    run.retry_noisy(results, "smoke")
    entry = results["multiprocessing.Pool"]
    assert entry["retried"] == ["submit"] and entry["background_cores"]["submit"] == 0.0
    assert entry["metrics"]["submit_tps"]["median"] > 0 and "map_tps" not in entry["metrics"]


def test_rounds_pool_the_samples_of_every_pass(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "--systems", "taskcs-threads,zmq-reference", "--workloads", "submit",
                     "--rounds", "2")
    assert data["meta"]["rounds"] == 2
    for system in ("taskcs-threads", "zmq-reference"):
        summary = data["results"][system]["metrics"]["submit_tps"]
        assert summary["n"] == 2 * len_one_round(), summary  # one repeat per child, two passes
    assert "2 round(s)" in (tmp_path / "RESULTS.md").read_text()


def len_one_round() -> int:
    from benchmarks.measure import MODES

    return -(-MODES["smoke"].repeats // 2)


def test_merge_rounds_pools_samples_errors_and_load() -> None:
    from benchmarks.run import merge_rounds, summarize

    first = {"metrics": {"a": summarize([1.0, 3.0])}, "errors": {"x": "failed"}, "background_cores": {"a": 0.1}}
    second = {"metrics": {"a": summarize([2.0]), "b": summarize([5.0])}, "errors": {"y": "timed out"},
              "background_cores": {"a": 0.3}}
    merge_rounds(first, second)
    assert first["metrics"]["a"]["samples"] == [1.0, 3.0, 2.0] and first["metrics"]["a"]["median"] == 2.0
    assert first["metrics"]["b"]["n"] == 1
    assert first["errors"] == {"x": "failed", "y": "timed out"}
    assert first["background_cores"] == {"a": 0.3}


def test_bench_repeats_caps_a_childs_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.measure import MODES, repeats

    monkeypatch.setenv("BENCH_REPEATS", "2")
    assert len(list(repeats(MODES["full"]))) == 2
    monkeypatch.delenv("BENCH_REPEATS")
    assert len(list(repeats(MODES["full"]))) == MODES["full"].repeats > 2
