"""Run every system x workload in its own time-bounded child process; write the results.

    python -m benchmarks.run [--quick | --smoke] [--systems a,b] [--workloads x,y] [--out-dir D]

Data flow::

    for system, workload (and, for scale, each N):
        fresh TASKCS_RUNTIME_DIR + unique BENCH_RUN_TOKEN
        child: python -m benchmarks.systems SYSTEM WORKLOAD --json  --(timeout)-->  @@RESULT {...}
        cleanup: cs-server stop in that runtime dir, then kill whatever still carries the token
    samples -> median / min / max -> ratios taskcs / peer -> results.json, RESULTS.md, results.png

A system that is not installed, fails or times out is recorded with the reason and the run
goes on; a child never outlives its time bound, and nothing it started outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from . import procs, report
from .measure import MODES, WORKLOADS
from .systems import RESULT_PREFIX, SYSTEMS, stop_cs_server

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TASKCS = ("taskcs-ipc", "taskcs-direct", "taskcs-threads")

#: Seconds a child may run, per mode: generous, since a child repeats its workload itself
#: (bounded by the mode's budget); a timeout marks that cell and the run continues.
CHILD_TIMEOUT = {"full": 420.0, "quick": 150.0, "smoke": 60.0}
#: Passes over the systems (repeats are spread over them); the noisy machine's speed drifts
#: by ±30% over minutes, and one pass put each system in a single stretch of it.
ROUNDS = {"full": 3, "quick": 1, "smoke": 1}
#: Systems measured in the first round only: their gaps to taskcs (10-300x) dwarf the drift,
#: and each of their children spends seconds starting a cluster.
ONCE = frozenset({"dask", "ray"})
#: Largest predicted duration of one scale repetition (from the previous N's time per task):
#: beyond it the system skips the larger N, so 10^6 runs only for the fast systems.
SCALE_BUDGET = {"full": 90.0, "quick": 40.0, "smoke": 30.0}

#: How long to wait before each child for other processes on this (shared) machine to go
#: quiet (under a quarter of a core); past it the child runs anyway and the load is recorded.
QUIET_WAIT = {"full": 30.0, "quick": 10.0, "smoke": 0.0}
#: ... and at most this long over the whole run, so a busy machine cannot stall it.
QUIET_TOTAL = {"full": 600.0, "quick": 120.0, "smoke": 0.0}
_quiet_spent = [0.0]
#: Busy cores (of other processes) at which a measurement counts as disturbed.
NOISY_CORES = 0.25
#: Time for the pass that re-runs disturbed cells once the machine is quieter.
RETRY_TOTAL = {"full": 900.0, "quick": 180.0, "smoke": 0.0}

PIP_NAMES = {"loky": "loky", "distributed": "dask[distributed]", "ray": "ray", "zmq": "pyzmq"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def missing_dependency(system: str) -> str | None:
    """Why ``system`` cannot run here, or None."""
    module = SYSTEMS[system][1]
    if module is not None and importlib.util.find_spec(module) is None:
        return f"not installed (pip install {PIP_NAMES.get(module, module)})"
    if system.startswith("taskcs") and importlib.util.find_spec("taskcs") is None:
        return "not installed (pip install -e .)"
    return None


def run_child(system: str, workload: str, mode: str, n: int | None, timeout: float) -> dict[str, Any]:
    """One child process; returns its @@RESULT payload or ``{"ok": False, "error": ...}``."""
    token = uuid.uuid4().hex
    # Short and under /tmp: the server's ipc:// socket path must stay under 107 bytes.
    rdir = tempfile.mkdtemp(prefix="tcsb-", dir="/tmp" if os.path.isdir("/tmp") else None)
    env = dict(os.environ, TASKCS_RUNTIME_DIR=rdir, **{procs.TOKEN_ENV: token})
    if _child_repeats[0]:
        env["BENCH_REPEATS"] = str(_child_repeats[0])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "benchmarks.systems", system, workload, "--mode", mode, "--json"]
    if n is not None:
        cmd += ["--n", str(n)]
    started = time.perf_counter()
    snapshot = procs.cpu_snapshot()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        result = _parse(out, err, proc.returncode)
        wall = time.perf_counter() - started
        result["background_cores"] = round(procs.others_cpu_seconds(snapshot, token) / wall, 2)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the child and its helpers
        proc.communicate()
        result = {"ok": False, "error": f"timed out after {timeout:.0f} s", "timeout": True}
    finally:
        _cleanup(system, rdir, env, token)
    result.setdefault("elapsed_s", round(time.perf_counter() - started, 3))
    result["token"] = token
    return result


def _parse(out: str, err: str, code: int) -> dict[str, Any]:
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_PREFIX):
            data: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
            return data
    tail = (err or out).strip().splitlines()[-3:]
    return {"ok": False, "error": f"exit {code} without a result: {' | '.join(tail)[-300:]}"}


def _cleanup(system: str, rdir: str, env: dict[str, str], token: str) -> None:
    if system.startswith("taskcs"):
        for sub in [Path(rdir), *(p for p in Path(rdir).iterdir() if p.is_dir())]:
            if (sub / procs.PIDS_FILE).exists() or any(sub.iterdir()):
                stop_cs_server(dict(env, TASKCS_RUNTIME_DIR=str(sub)), timeout=15)
    killed = procs.sweep(token)
    if killed:
        log(f"  cleanup: killed {len(killed)} leftover process(es) of {system}: {killed}")
    shutil.rmtree(rdir, ignore_errors=True)


#: Repeats per child when the repeats are spread over rounds (0: the mode's own count).
_child_repeats = [0]


def merge_rounds(into: dict[str, Any], more: dict[str, Any]) -> None:
    """Add a later round's results of one system to the earlier rounds': samples pooled."""
    metrics = into["metrics"]
    for key, summary in more["metrics"].items():
        pooled = metrics[key]["samples"] + summary["samples"] if key in metrics else summary["samples"]
        metrics[key] = summarize(pooled)
    for label, why in more["errors"].items():
        into["errors"].setdefault(label, why)
    for label, load in more["background_cores"].items():
        into["background_cores"][label] = max(load, into["background_cores"].get(label, 0.0))


def summarize(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "n": len(ordered), "samples": samples}


def n_label(n: int) -> str:
    exp = len(str(n)) - 1
    return f"1e{exp}" if n == 10**exp else str(n)


def run_system(system: str, mode: str, workloads: list[str]) -> dict[str, Any]:
    """Every workload of one system: ``{"metrics": {...}, "errors": {...}}``."""
    metrics: dict[str, Any] = {}
    errors: dict[str, str] = {}
    background: dict[str, float] = {}
    why = missing_dependency(system)
    if why is not None:
        log(f"{system}: {why}")
        return {"metrics": metrics, "errors": {"*": why}, "background_cores": background}
    timeout = CHILD_TIMEOUT[mode]
    quiet_wait = QUIET_WAIT[mode]
    quiet_total = QUIET_TOTAL[mode]
    for workload in workloads:
        if workload != "scale":
            _quiet(background, workload, quiet_wait, quiet_total)
            log(f"{system} / {workload} ...")
            res = run_child(system, workload, mode, None, timeout)
            _note_load(background, workload, res)
            _merge(system, workload, res, metrics, errors, "")
            continue
        per_task_us: float | None = None
        for n in MODES[mode].scale_ns:
            label = f"scale {n_label(n)}"
            predicted = per_task_us * n / 1e6 if per_task_us is not None else 0.0
            if predicted > SCALE_BUDGET[mode]:
                errors[label] = f"skipped: ~{predicted:.0f} s predicted > {SCALE_BUDGET[mode]:.0f} s budget"
                log(f"{system} / {label}: {errors[label]}")
                continue
            _quiet(background, label, quiet_wait, quiet_total)
            log(f"{system} / {label} ...")
            res = run_child(system, "scale", mode, n, max(timeout, 3 * predicted))
            _note_load(background, label, res)
            _merge(system, label, res, metrics, errors, f"scale_{n_label(n)}_")
            if not res.get("ok"):
                break  # a larger N would fail the same way, only slower
            per_task_us = statistics.median(res["metrics"]["us_per_task"])
    return {"metrics": metrics, "errors": errors, "background_cores": background}


def _quiet(background: dict[str, float], label: str, max_wait: float, total: float) -> None:
    """Let other processes on this shared machine go quiet first; record what was left."""
    if max_wait > 0:
        started = time.monotonic()
        wait = max(0.0, min(max_wait, total - _quiet_spent[0]))
        load = background[label] = procs.wait_quiet(max_wait=wait)
        _quiet_spent[0] += time.monotonic() - started
        if load >= NOISY_CORES:
            log(f"  note: other processes still use {load:.2f} cores")


def retry_noisy(results: dict[str, Any], mode: str) -> None:
    """Re-run, once, every cell that started while other processes were busy, if the machine
    is quieter now; the quieter run replaces the first. Bounded by ``RETRY_TOTAL``."""
    deadline = time.monotonic() + RETRY_TOTAL[mode]
    for system, entry in results.items():
        for label, load in list(entry.get("background_cores", {}).items()):
            if load < NOISY_CORES:
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                log("retry pass: out of time; the remaining noisy cells stay as measured")
                return
            now = procs.wait_quiet(max_wait=min(QUIET_WAIT[mode], left))
            if now > load - 0.2:
                log(f"retry {system} / {label}: still {now:.2f} busy cores (was {load:.2f}), kept")
                continue
            scale_n = label.split()[1] if label.startswith("scale ") else None
            log(f"retry {system} / {label} (busy cores {load:.2f} -> {now:.2f}) ...")
            res = run_child(system, "scale" if scale_n else label, mode,
                            int(float(scale_n)) if scale_n else None, CHILD_TIMEOUT[mode])
            again = max(now, res.get("background_cores", 0.0))
            if res.get("ok") and again < load:
                _merge(system, label, res, entry["metrics"], {}, f"scale_{scale_n}_" if scale_n else "")
                entry["background_cores"][label] = again
                entry.setdefault("retried", []).append(label)
            else:
                log(f"  kept the first run (background {again:.2f} cores this time)")


def _note_load(background: dict[str, float], label: str, res: dict[str, Any]) -> None:
    """A cell's background load: the worse of before and during its run."""
    during = res.get("background_cores", 0.0)
    if during >= NOISY_CORES:
        log(f"  note: other processes used {during:.2f} cores during the run")
    background[label] = max(background.get(label, 0.0), during)


def _merge(system: str, label: str, res: dict[str, Any], metrics: dict[str, Any],
           errors: dict[str, str], prefix: str) -> None:
    if res.get("ok"):
        for key, samples in res["metrics"].items():
            metrics[prefix + key] = summarize(samples)
        log(f"  ok in {res.get('elapsed_s', 0):.1f} s: " + ", ".join(
            f"{prefix}{k}={statistics.median(v):.4g}" for k, v in res["metrics"].items()))
    else:
        errors[label] = res.get("error", "failed")
        log(f"  {system} / {label} FAILED: {errors[label]}")


def ratios(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """``{taskcs system: {peer: {metric: taskcs median / peer median}}}``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for mine in TASKCS:
        ours = results.get(mine, {}).get("metrics", {})
        if not ours:
            continue
        table = out[mine] = {}
        for peer, data in results.items():
            if peer == mine:
                continue
            row = table[peer] = {}
            for key, ref in data.get("metrics", {}).items():
                if key in ours and ref["median"]:
                    row[key] = ours[key]["median"] / ref["median"]
            # a warm taskcs server against a peer's cold start (the peers have no server)
            if "coldstart_warm_s" in ours and "coldstart_s" in data.get("metrics", {}):
                row["coldstart_warm_s"] = ours["coldstart_warm_s"]["median"] / data["metrics"]["coldstart_s"]["median"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="fewer repeats, smaller sizes")
    group.add_argument("--smoke", action="store_true", help="tiny sizes: checks the harness only")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset")
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-joblib", action="store_true", help="skip benchmarks.joblib_bench (issue #13)")
    parser.add_argument("--rounds", type=int, help="passes over all systems, samples pooled "
                        f"(default: {ROUNDS['full']} full, 1 otherwise; {', '.join(sorted(ONCE))} run once)")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    systems = [s for s in args.systems.split(",") if s]
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(systems) - set(SYSTEMS)) + sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown system or workload: {', '.join(unknown)}")
    command = os.environ.get("BENCH_COMMAND") or " ".join(
        [Path(sys.executable).name, "-m", "benchmarks.run", *(argv if argv is not None else sys.argv[1:])])
    started = time.time()
    log(f"mode {mode}: {len(systems)} systems x {len(workloads)} workloads -> {args.out_dir}")
    # Rounds: every system once per round, so each is sampled in several stretches of the
    # machine's (shared, drifting) speed rather than all in one; samples are pooled.
    rounds = args.rounds if args.rounds is not None else ROUNDS[mode]
    if rounds > 1:
        _child_repeats[0] = -(-MODES[mode].repeats // rounds)
    results: dict[str, Any] = {}
    for r in range(rounds):
        for system in systems:
            if r and system in ONCE:
                continue
            if rounds > 1:
                log(f"round {r + 1}/{rounds}: {system}")
            got = run_system(system, mode, workloads)
            if system in results:
                merge_rounds(results[system], got)
            else:
                results[system] = got
    retry_noisy(results, mode)
    data = {
        "meta": {**report.machine_info(command, mode, time.time() - started), "rounds": rounds},
        "results": results,
        "ratios": ratios(results),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out_dir / "RESULTS.md").write_text(report.markdown(data))
    if not args.no_plot:
        note = report.plot(data, args.out_dir / "results.png")
        if note:
            log(note)
    log(f"wrote {args.out_dir / 'RESULTS.md'} in {time.time() - started:.0f} s")
    # --- issue #13: joblib backend "taskcs" vs "loky", side by side in the same run ---
    if mode != "smoke" and not args.no_joblib:
        subprocess.run([sys.executable, "-m", "benchmarks.joblib_bench", *(["--quick"] if mode == "quick" else []),
                        "--out", str(args.out_dir / "JOBLIB.md")], cwd=REPO, timeout=1800, check=False)
    # --- end issue #13 ---
    return 0


if __name__ == "__main__":
    sys.exit(main())
