"""Issue 14 side by side: taskcs over a Dask cluster against Dask's own client, and against
taskcs phase 3 alone, in one run.

    python -m benchmarks.engines [--quick] [--rounds N] [--out-dir benchmarks]

One Dask cluster (``dask scheduler`` + 2 single-threaded ``dask worker`` processes, no
nanny) on 127.0.0.1; a cs-server with no executors of its own and ``--engine dask://...``
on it; a phase-3 cs-server with 2 executors. Run as root, the whole benchmark re-executes
itself in a loopback-only network namespace (``unshare -n``), as the tests do.

Workloads, rounds interleaved so the machine's drift hits every system alike:

    trivial   inc(x) over N items: Dask client.map + gather, taskcs-over-Dask map,
              taskcs phase 3 map (tasks/s; Dask gets fewer items: it runs ~400/s)
    cpu       24 x burn(0.1 s): Dask client.map vs taskcs over Dask (wall s)
    rtt       one trivial task submitted and awaited, sequentially (p50/p99 µs)

Writes ENGINES.md and engines.json with the date, the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import taskcs
from benchmarks.workloads import burn, inc
from taskcs.runtime import discovery

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent


@contextmanager
def dask_cluster(scratch: Path, workers: int = 2) -> Iterator[str]:
    """A scheduler and ``workers`` workers that can import ``benchmarks.workloads``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs: list[subprocess.Popen[bytes]] = []
    info = scratch / "scheduler.json"
    log = open(scratch / "dask.log", "wb")  # noqa: SIM115 (closed below)
    try:
        procs.append(subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                       "--no-dashboard", "--scheduler-file", str(info)],
                                      cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while not info.exists() or not info.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError("the dask scheduler did not start")
            time.sleep(0.05)
        time.sleep(0.05)
        address = str(json.loads(info.read_text())["address"])
        for _ in range(workers):
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-nanny",
                                           "--no-dashboard", "--host", "127.0.0.1"],
                                          cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT))
        yield address
    finally:
        for proc in procs:  # the processes we started, by pid
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        log.close()


@contextmanager
def cs_server(scratch: Path, name: str, args: list[str]) -> Iterator[str]:
    """A cs-server in a runtime directory of its own; yields its endpoint."""
    directory = scratch / name
    directory.mkdir()
    record = discovery.spawn_server(directory, [*args, "--idle-timeout", "0"])
    try:
        yield record.endpoint
    finally:
        discovery.terminate(record.pid, grace=30)


def wait_for_engine(client: taskcs.Client, timeout: float = 60) -> None:
    """Until the engine is attached (a task ran on it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.submit(inc, 0).result(timeout=timeout).__class__ is int:
            return
    raise RuntimeError("the engine did not attach")


def _rate(n: int, run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return n / (time.perf_counter() - start)


def _percentiles(samples: list[float]) -> tuple[float, float]:
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def measure_dask(dc: Any, sizes: dict[str, int]) -> dict[str, float]:
    n = sizes["dask_trivial_n"]
    offset = int(time.time() * 1000) % 10**9  # fresh keys: Dask would reuse results of pure calls

    def trivial() -> None:
        assert dc.gather(dc.map(inc, range(offset, offset + n))) == list(range(offset + 1, offset + n + 1))

    out = {"trivial_per_s": _rate(n, trivial)}
    start = time.perf_counter()
    dc.gather(dc.map(burn, [0.1] * sizes["cpu_n"], pure=False))
    out["cpu_s"] = time.perf_counter() - start
    samples = []
    for i in range(sizes["rtt_n"]):
        t0 = time.perf_counter()
        dc.submit(inc, i, pure=False).result()
        samples.append((time.perf_counter() - t0) * 1e6)
    out["rtt_p50_us"], out["rtt_p99_us"] = _percentiles(samples)
    return out


def measure_taskcs(client: taskcs.Client, sizes: dict[str, int], cpu: bool) -> dict[str, float]:
    n = sizes["trivial_n"]

    def trivial() -> None:
        assert list(client.map(inc, range(n))) == list(range(1, n + 1))

    out = {"trivial_per_s": _rate(n, trivial)}
    if cpu:
        start = time.perf_counter()
        for f in [client.submit(burn, 0.1) for _ in range(sizes["cpu_n"])]:
            f.result()
        out["cpu_s"] = time.perf_counter() - start
        samples = []
        for i in range(sizes["rtt_n"]):
            t0 = time.perf_counter()
            client.submit(inc, i).result()
            samples.append((time.perf_counter() - t0) * 1e6)
        out["rtt_p50_us"], out["rtt_p99_us"] = _percentiles(samples)
    return out


def run(quick: bool, rounds: int) -> dict[str, Any]:
    from distributed import Client as DaskClient

    sizes = {"trivial_n": 20_000 if quick else 100_000, "dask_trivial_n": 1000 if quick else 5000,
             "cpu_n": 12 if quick else 24, "rtt_n": 100 if quick else 300}
    samples: dict[str, list[dict[str, float]]] = {"dask": [], "taskcs over dask": [], "taskcs phase 3": []}
    scratch = Path(tempfile.mkdtemp(prefix="tcs-bench-eng-"))
    try:
        with dask_cluster(scratch) as address, \
                cs_server(scratch, "engine", ["--executors", "0", "--engine", "dask://" + address[6:]]) as e_ep, \
                cs_server(scratch, "phase3", ["--executors", "2"]) as p_ep:
            dc = DaskClient(address, set_as_default=False)
            dc.wait_for_workers(2, timeout=60)
            over = taskcs.Client(e_ep, autostart=False)
            own = taskcs.Client(p_ep, autostart=False)
            try:
                wait_for_engine(over)
                for r in range(rounds):
                    print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
                    samples["dask"].append(measure_dask(dc, sizes))
                    samples["taskcs over dask"].append(measure_taskcs(over, sizes, cpu=True))
                    samples["taskcs phase 3"].append(measure_taskcs(own, sizes, cpu=False))
            finally:
                over.shutdown()
                own.shutdown()
                dc.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    medians = {system: {k: statistics.median(s[k] for s in rows) for k in rows[0]} for system, rows in samples.items()}
    import distributed

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sizes": sizes, "rounds": rounds,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "versions": {"taskcs": taskcs.__version__, "distributed": distributed.__version__},
            "medians": medians, "samples": samples}


def write(results: dict[str, Any], out_dir: Path, command: str) -> None:
    m = results["medians"]
    d, o, p = m["dask"], m["taskcs over dask"], m["taskcs phase 3"]
    s = results["sizes"]
    lines = [
        "# taskcs over a Dask cluster (issue 14)", "",
        f"- command: `{command}`", f"- date: {results['date']}; machine: {results['machine']}",
        f"- versions: taskcs {results['versions']['taskcs']}, dask/distributed {results['versions']['distributed']}",
        f"- one Dask cluster: scheduler + 2 single-threaded workers (no nanny) on 127.0.0.1, in a loopback-only "
        f"network namespace; medians of {results['rounds']} interleaved rounds", "",
        "| workload | Dask alone | taskcs over Dask | taskcs phase 3 (2 executors) | ratio |",
        "|---|---|---|---|---|",
        f"| trivial tasks, tasks/s (Dask `client.map` of {s['dask_trivial_n']:,}; taskcs `map` of "
        f"{s['trivial_n']:,}) | {d['trivial_per_s']:,.0f} | {o['trivial_per_s']:,.0f} | {p['trivial_per_s']:,.0f} | "
        f"**{o['trivial_per_s'] / d['trivial_per_s']:.0f}x** Dask (target >= 20x); "
        f"**{100 * o['trivial_per_s'] / p['trivial_per_s']:.0f} %** of phase 3 (target >= 25 %) |",
        f"| CPU-bound set ({s['cpu_n']} x burn 0.1 s), wall s | {d['cpu_s']:.2f} | {o['cpu_s']:.2f} | | "
        f"**{d['cpu_s'] / o['cpu_s']:.2f}x** Dask's speed (target >= 0.95) |",
        f"| round trip of one trivial task, p50 / p99 µs | {d['rtt_p50_us']:,.0f} / {d['rtt_p99_us']:,.0f} | "
        f"{o['rtt_p50_us']:,.0f} / {o['rtt_p99_us']:,.0f} | | |", "",
        "taskcs over Dask batches tiny tasks into one Dask task (sized by their measured run time), so it "
        "pays Dask's per-task cost once per batch; long tasks go one per Dask task. The round trip adds "
        "taskcs's hops (client -> cs-server -> engine thread) to Dask's own.", "",
        f"The CPU-bound set is {s['cpu_n'] * 0.1 / 2:.1f} s of work per worker with nothing else running; "
        "wall times above that are other load on the machine, which moves both columns (per-round samples: "
        + "; ".join(f"{name} " + ", ".join(f"{row['cpu_s']:.2f}" for row in results["samples"][name])
                    for name in ("dask", "taskcs over dask")) + ").", "",
    ]
    (out_dir / "ENGINES.md").write_text("\n".join(lines))
    (out_dir / "engines.json").write_text(json.dumps(results, indent=1))


def _in_netns() -> bool:
    """Re-run this command in a loopback-only network namespace when we can (root)."""
    if os.environ.get("TASKCS_BENCH_NETNS") or os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    env = {**os.environ, "TASKCS_BENCH_NETNS": "1"}
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, "-m",
           "benchmarks.engines", *sys.argv[1:]]
    sys.exit(subprocess.call(cmd, env=env, cwd=ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    if argv is None:
        _in_netns()
    command = os.environ.get("BENCH_COMMAND") or "python -m benchmarks.engines" + (" --quick" if args.quick else "")
    results = run(args.quick, args.rounds)
    write(results, args.out_dir, command)
    print((args.out_dir / "ENGINES.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
