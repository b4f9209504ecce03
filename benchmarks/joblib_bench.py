"""joblib's backend "taskcs" against joblib's default "loky", same worker count (issue #13).

    python -m benchmarks.joblib_bench [--quick] [--workers 2] [--rounds 5] [--out benchmarks/JOBLIB.md]

Workloads, each measured warm (a first call starts loky's workers / connects to the server):

* ``trivial``: ``Parallel()(delayed(inc)(i) for i in range(100_000))``, joblib's automatic
  batching on both sides; calls per second. Also with ``n_jobs=1`` ("sequential": no
  workers, the calls run in the caller), the ceiling for any backend: the caller's own
  generator and joblib's bookkeeping, with nothing sent anywhere.
* ``gridsearch``: ``GridSearchCV(SVC(), 8 C x 5 gamma, cv=5)`` on 1000 digits: 200 small fits;
  seconds per search.

The backends alternate round by round (taskcs, loky, taskcs, ...) so the shared machine's
drifting speed hits both alike; the table gives the median and the range of the rounds. The
taskcs server is private (a temporary runtime dir, ``--workers`` executors), stopped by pid at
the end. Writes the markdown report to ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .workloads import inc

HERE = Path(__file__).resolve().parent


def _trivial(n: int) -> Callable[[], float]:
    from joblib import Parallel, delayed

    def run() -> float:
        t0 = time.perf_counter()
        got = Parallel()(delayed(inc)(i) for i in range(n))
        elapsed = time.perf_counter() - t0
        assert got[-1] == n and len(got) == n
        return n / elapsed

    return run


def _gridsearch() -> Callable[[], float]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    X, y = load_digits(return_X_y=True)
    X, y = X[:1000], y[:1000]
    grid = {"C": [0.1, 0.3, 1, 3, 10, 30, 100, 300], "gamma": [1e-4, 3e-4, 1e-3, 3e-3, "scale"]}

    def run() -> float:
        t0 = time.perf_counter()
        search = GridSearchCV(SVC(), grid, cv=5).fit(X, y)
        elapsed = time.perf_counter() - t0
        assert search.best_score_ > 0.9
        return elapsed

    return run


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far; 0 if it is gone (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(ppid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == ppid:
                    kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return kids


def _cpu_total(backend: str, server_pid: int) -> float:
    """CPU seconds used so far by everything a run of ``backend`` involves: this process, and the
    taskcs server with its executors, or loky's worker processes (this process's children)."""
    own = os.times()
    if backend == "sequential":
        return own.user + own.system
    pids = [server_pid, *_children(server_pid)] if backend == "taskcs" else [
        pid for pid in _children(os.getpid()) if pid != server_pid]
    return own.user + own.system + sum(_proc_cpu(pid) for pid in pids)


def measure(workers: int, rounds: int, calls: int, only: str = "",
            server_pid: int = 0) -> dict[str, dict[str, list[float]]]:
    """{workload: {backend: [one sample per round]}, workload + "_cpu": {backend: [CPU s per run]}}."""
    from joblib import parallel_config

    import taskcs.joblib  # noqa: F401  registers "taskcs"

    workloads = {"trivial": _trivial(calls), "gridsearch": _gridsearch()}
    if only:
        workloads = {only: workloads[only]}
    def backends(name: str) -> tuple[str, ...]:
        return ("taskcs", "loky", "sequential") if name == "trivial" else ("taskcs", "loky")

    results: dict[str, dict[str, list[float]]] = {w: {b: [] for b in backends(w)} for w in workloads}
    results.update({w + "_cpu": {b: [] for b in backends(w)} for w in workloads})
    results.update({w + "_caller": {b: [] for b in backends(w)} for w in workloads})
    for name, run in workloads.items():
        for backend in backends(name):  # warm: workers started, code loaded, batch size learnt
            with parallel_config(backend=backend, n_jobs=1 if backend == "sequential" else workers):
                run()
        for r in range(rounds):
            order = backends(name) if r % 2 == 0 else backends(name)[::-1]
            for backend in order:
                cpu, caller = _cpu_total(backend, server_pid), time.process_time()
                with parallel_config(backend=backend, n_jobs=1 if backend == "sequential" else workers):
                    results[name][backend].append(run())
                results[name + "_caller"][backend].append(time.process_time() - caller)
                results[name + "_cpu"][backend].append(_cpu_total(backend, server_pid) - cpu)
            print(f"[joblib-bench] {name} round {r + 1}/{rounds}: "
                  + ", ".join(f"{b} {v[-1]:,.2f} ({results[name + '_cpu'][b][-1]:.2f} CPU s)"
                              for b, v in results[name].items()), file=sys.stderr)
    return results


def report(results: dict[str, dict[str, list[float]]], command: str, workers: int, calls: int) -> str:
    import joblib
    import sklearn

    def cell(samples: list[float]) -> str:
        return f"{statistics.median(samples):,.2f} ({min(samples):,.2f}-{max(samples):,.2f})"

    trivial, grid = results["trivial"], results["gridsearch"]
    tcpu, gcpu = results["trivial_cpu"], results["gridsearch_cpu"]
    tcaller = results["trivial_caller"]
    speedup = statistics.median(trivial["taskcs"]) / statistics.median(trivial["loky"])
    ceiling = statistics.median(trivial["sequential"]) / statistics.median(trivial["loky"])
    grid_ratio = statistics.median(grid["taskcs"]) / statistics.median(grid["loky"])
    load = os.getloadavg()
    lines = [
        "# joblib: backend \"taskcs\" vs \"loky\"",
        "",
        f"Command: `{command}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.python_implementation()} "
        f"{platform.python_version()}, joblib {joblib.__version__}, scikit-learn {sklearn.__version__}; "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} at the end (a shared machine). "
        f"{workers} workers each (taskcs: executors of a private server; loky: worker processes). "
        f"Median of {len(trivial['taskcs'])} alternating rounds (min-max).",
        "",
        "| workload | taskcs | loky | taskcs / loky |",
        "|---|---|---|---|",
        f"| {calls:,} trivial calls, calls/s (higher is better) | {cell(trivial['taskcs'])} | "
        f"{cell(trivial['loky'])} | **{speedup:.2f}x** loky's rate |",
        f"| the same with `n_jobs=1` (no workers: the ceiling), calls/s | {cell(trivial['sequential'])} | | "
        f"{ceiling:.2f}x loky's rate |",
        f"| GridSearchCV, 200 SVC fits, s (lower is better) | {cell(grid['taskcs'])} | {cell(grid['loky'])} | "
        f"**{grid_ratio:.2f}** of loky's time |",
        f"| CPU s of all processes, {calls:,} trivial calls | {cell(tcpu['taskcs'])} | {cell(tcpu['loky'])} | "
        f"{statistics.median(tcpu['taskcs']) / statistics.median(tcpu['loky']):.2f} |",
        f"| CPU s of all processes, GridSearchCV | {cell(gcpu['taskcs'])} | {cell(gcpu['loky'])} | "
        f"{statistics.median(gcpu['taskcs']) / statistics.median(gcpu['loky']):.2f} |",
        f"| CPU s of the calling process alone, {calls:,} trivial calls | {cell(tcaller['taskcs'])} | "
        f"{cell(tcaller['loky'])} | {statistics.median(tcaller['taskcs']) / statistics.median(tcaller['loky']):.2f} |",
        f"| CPU s with `n_jobs=1`, {calls:,} trivial calls (all in the caller) | {cell(tcaller['sequential'])} | | |",
        "",
        "The CPU rows (this process, plus the taskcs server and its executors, or loky's worker",
        "processes) are the load-proof comparison: the wall-clock rows move with what else runs on",
        "the machine, the CPU a run costs much less so.",
        "",
        "Targets (issue #13): trivial calls >= 1.5x loky "
        f"({'met' if speedup >= 1.5 else 'not met'} here); GridSearchCV within 5 % of loky or faster "
        f"({'met' if grid_ratio <= 1.05 else 'not met'} here).",
        "",
        "Where the time of the trivial calls goes: in the calling process, which both backends keep",
        "busy (it builds every call and hands out every result), so it sets the pace. The user's",
        "generator, `delayed(inc)(i) for i in range(100_000)` (a `functools.wraps` per call), costs",
        "~0.125 CPU s of it with any backend; `n_jobs=1` above adds joblib's own bookkeeping and",
        "the calls, nothing else.",
        "",
        "The rest was mostly the garbage collector. joblib's automatic batching grows a batch of",
        "trivial calls until it runs 0.2 s (sized for loky's milliseconds per batch): ~1,300 calls",
        "here, and it holds batch size x n_jobs of the user's `(f, args, kwargs)` calls alive until",
        "each batch is sent. Held that long they reach the oldest generation, and its full",
        "collections scan the whole heap, which in this process holds scikit-learn. `gc.callbacks`",
        "timing over 4 runs of 100,000 calls each (the two backends alike before the cap):",
        "",
        "| in the calling process, per 100,000 calls | full collections | their time |",
        "|---|---|---|",
        "| taskcs, batches as joblib sizes them (78 batches) | 2-3 | 96-163 ms |",
        "| loky, batches as joblib sizes them | 2-3 | 94-148 ms |",
        "| loky, told `batch_size=256` | 0 | 0 ms |",
        "| taskcs, batches of at most 256 calls (`taskcs.joblib.MAX_BATCH_CALLS`; 439 batches) | 0 | 0 ms |",
        "| the same without scikit-learn imported, as joblib sizes them | 2-3 | 20-35 ms |",
        "",
        "So batches of taskcs's backend take at most 256 calls: the calls die young, and the",
        "caller's CPU per 100,000 calls went from 0.29-0.37 to 0.19-0.21 s. The 361 extra",
        "batches cost ~50 us each in the caller (a submit, a direct-link message, a result and",
        "joblib's callback). loky's default is what the table compares, as a user gets it; told",
        "`batch_size=256` it gains less (327-357 k calls/s against 263-331 k, caller 0.24-0.27 s),",
        "as its batches cost it more. A batch of calls to one plain function also travels as the",
        "task `Calls(f)` with a list of argument tuples: the function's code once per connection,",
        "the batch on the C pickler's fast path, a third of the pickling of joblib's `(f, args, {})`",
        "triples.",
        "",
        "GridSearchCV: batches of 1-8 fits (joblib's auto-batching picks the same sizes for both",
        "backends), the same CPU in all processes; the fits themselves are >85 % of the executors'",
        "time, the payload's decoding (X and y, by buffer) under 2 %; the rest is the machine.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 20k calls")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--out", type=Path, default=HERE / "JOBLIB.md")
    parser.add_argument("--only", choices=("trivial", "gridsearch"), help="one workload, no report")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    calls = 20_000 if args.quick else 100_000
    command = os.environ.get("BENCH_COMMAND") or " ".join(
        ["python", "-m", "benchmarks.joblib_bench", *(argv if argv is not None else sys.argv[1:])])
    try:
        import joblib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        args.out.write_text(f"# joblib: backend \"taskcs\" vs \"loky\"\n\nNot run: {exc} (pip install joblib "
                            "scikit-learn).\n")
        print(f"joblib bench not run: {exc}", file=sys.stderr)
        return 0
    runtime = Path(tempfile.mkdtemp(prefix="tcs-jl-", dir="/tmp"))
    os.environ["TASKCS_RUNTIME_DIR"] = str(runtime)
    os.environ.pop("TASKCS_ADDRESS", None)
    from taskcs.runtime import discovery

    try:
        record, _ = discovery.ensure_server(runtime, ["--executors", str(args.workers), "--idle-timeout", "600"])
        results = measure(args.workers, rounds, calls, args.only or "", record.pid)
    finally:
        record = discovery.read_record(runtime)
        if record is not None and discovery.pid_alive(record.pid):
            os.kill(record.pid, signal.SIGTERM)
        shutil.rmtree(runtime, ignore_errors=True)
    if args.only:
        return 0
    text = report(results, command, args.workers, calls)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
