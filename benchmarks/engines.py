"""Issue 14 side by side: taskcs over a Dask cluster and over a Ray cluster, against each
engine's own client and against taskcs phase 3 alone, in one run.

    python -m benchmarks.engines [--quick] [--rounds N] [--engines dask,ray] [--out-dir benchmarks]

One Dask cluster (``dask scheduler`` + 2 single-threaded ``dask worker`` processes, no
nanny) on 127.0.0.1 and a cs-server with no executors of its own and ``--engine dask://...``
on it; one Ray cluster (``ray start --head --block --num-cpus 2``, a temp dir of its own,
token auth with a token of this run) and a cs-server with ``--executors 0 --engine
ray-auto`` on it (``RAY_ADDRESS`` names the head); a phase-3 cs-server with 2 executors.
``--engines`` picks the engines (default: every one whose extra is installed). Run as
root, the whole benchmark re-executes itself in a loopback-only network namespace
(``unshare -n``), as the tests do, so both clusters stay on loopback.

Workloads, rounds interleaved so the machine's drift hits every system alike:

    trivial   inc(x) over N items: Dask client.map + gather / Ray one .remote call per item +
              ray.get, taskcs-over-engine map, taskcs phase 3 map (tasks/s; the engines get
              fewer items: Dask runs ~400/s, Ray ~1-2k/s)
    cpu       24 x burn(0.1 s): the engine alone vs taskcs over it (wall s), the two sets
              back to back, which goes first alternating by round
    rtt       one trivial task submitted and awaited, sequentially (p50/p99 µs)

Writes ENGINES.md and engines.json with the date, the machine and the command.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def ray_cluster(scratch: Path, cpus: int = 2) -> Iterator[str]:
    """A Ray head node on 127.0.0.1 whose workers can import ``benchmarks.workloads``.

    ``ray start --block`` stays in the foreground as the parent of every Ray process it
    starts and stops them on SIGTERM; it leads a session of its own, so whatever outlives
    it is in its process group. A temp dir of its own (no other Ray on the machine is
    touched) and a token of this run for Ray's token auth, which ``ray start`` turns on:
    every driver here (this process, the cs-server) inherits it through the environment.
    """
    port = _free_port()
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # Ray's workers belong to one driver (job), and past num_workers_soft_limit idle workers
    # (default: the CPUs) Ray kills the idle ones: with two drivers taking turns on 2 CPUs
    # (this process for "Ray alone", the cs-server), every turn would then start its workers
    # afresh (~1 s each) and the rounds would measure worker start-up. Room for both drivers'.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_num_workers_soft_limit": str(2 * cpus)}
    log_path = scratch / "ray.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(cpus),
                             "--include-dashboard", "false", "--disable-usage-stats", "--node-ip-address",
                             "127.0.0.1", "--port", str(port),
                             "--temp-dir", str(scratch / "ray")],
                            cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.terminate()  # ours, by pid: it stops the Ray processes it started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        with suppress(ProcessLookupError):  # anything left of what it started (its own process group)
            os.killpg(proc.pid, signal.SIGKILL)
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
    samples = []
    for i in range(sizes["rtt_n"]):
        t0 = time.perf_counter()
        dc.submit(inc, i, pure=False).result()
        samples.append((time.perf_counter() - t0) * 1e6)
    out["rtt_p50_us"], out["rtt_p99_us"] = _percentiles(samples)
    return out


def measure_ray(ray: Any, rinc: Any, sizes: dict[str, int]) -> dict[str, float]:
    """Ray's own path: one ``.remote`` call per item, then ``ray.get``."""
    n = sizes["ray_trivial_n"]

    def trivial() -> None:
        assert ray.get([rinc.remote(x) for x in range(n)]) == list(range(1, n + 1))

    out = {"trivial_per_s": _rate(n, trivial)}
    samples = []
    for i in range(sizes["rtt_n"]):
        t0 = time.perf_counter()
        ray.get(rinc.remote(i))
        samples.append((time.perf_counter() - t0) * 1e6)
    out["rtt_p50_us"], out["rtt_p99_us"] = _percentiles(samples)
    return out


def measure_taskcs(client: taskcs.Client, sizes: dict[str, int], rtt: bool) -> dict[str, float]:
    n = sizes["trivial_n"]

    def trivial() -> None:
        assert list(client.map(inc, range(n))) == list(range(1, n + 1))

    out = {"trivial_per_s": _rate(n, trivial)}
    if rtt:
        samples = []
        for i in range(sizes["rtt_n"]):
            t0 = time.perf_counter()
            client.submit(inc, i).result()
            samples.append((time.perf_counter() - t0) * 1e6)
        out["rtt_p50_us"], out["rtt_p99_us"] = _percentiles(samples)
    return out


def _taskcs_cpu_set(client: taskcs.Client, n: int) -> None:
    for f in [client.submit(burn, 0.1) for _ in range(n)]:
        f.result()


def _wall(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


#: Each engine: the module its extra installs, the name of its columns.
ENGINES = {"dask": ("distributed", "Dask"), "ray": ("ray", "Ray")}


def installed_engines() -> list[str]:
    """The engines whose extra is installed here (looked up, not imported)."""
    return [name for name, (module, _) in ENGINES.items() if importlib.util.find_spec(module) is not None]


def run(quick: bool, rounds: int, engines: list[str]) -> dict[str, Any]:
    sizes = {"trivial_n": 20_000 if quick else 100_000, "dask_trivial_n": 1000 if quick else 5000,
             "ray_trivial_n": 2000 if quick else 10_000, "cpu_n": 12 if quick else 24,
             "rtt_n": 100 if quick else 300}
    systems = [s for e in engines for s in (e, f"taskcs over {e}")] + ["taskcs phase 3"]
    samples: dict[str, list[dict[str, float]]] = {system: [] for system in systems}
    versions = {"taskcs": taskcs.__version__}
    measures: dict[str, Callable[[], dict[str, float]]] = {}
    cpu_sets: dict[str, Callable[[], object]] = {}
    scratch = Path(tempfile.mkdtemp(prefix="tcs-bench-eng-"))
    try:
        with ExitStack() as stack:
            clients: dict[str, taskcs.Client] = {}
            if "dask" in engines:
                import distributed

                versions["distributed"] = distributed.__version__
                address = stack.enter_context(dask_cluster(scratch))
                dc = distributed.Client(address, set_as_default=False)
                stack.callback(dc.close)
                dc.wait_for_workers(2, timeout=60)
                measures["dask"] = lambda: measure_dask(dc, sizes)
                cpu_sets["dask"] = lambda: dc.gather(dc.map(burn, [0.1] * sizes["cpu_n"], pure=False))
                endpoint = stack.enter_context(
                    cs_server(scratch, "over-dask", ["--executors", "0", "--engine", "dask://" + address[6:]]))
                clients["taskcs over dask"] = taskcs.Client(endpoint, autostart=False)
            if "ray" in engines:
                address = stack.enter_context(ray_cluster(scratch))
                import ray  # after ray_cluster: Ray reads its auth settings from the environment on import

                versions["ray"] = ray.__version__
                ray.init(address=address, log_to_driver=False, configure_logging=False)
                stack.callback(ray.shutdown)  # our driver only: the cluster is stopped by ray_cluster
                rinc, rburn = ray.remote(inc), ray.remote(burn)
                ray.get([rinc.remote(i) for i in range(4)])  # the workers of this driver's job are up
                measures["ray"] = lambda: measure_ray(ray, rinc, sizes)
                cpu_sets["ray"] = lambda: ray.get([rburn.remote(0.1) for _ in range(sizes["cpu_n"])])
                os.environ["RAY_ADDRESS"] = address  # what --engine ray-auto connects to
                endpoint = stack.enter_context(
                    cs_server(scratch, "over-ray", ["--executors", "0", "--engine", "ray-auto"]))
                clients["taskcs over ray"] = taskcs.Client(endpoint, autostart=False)
            clients["taskcs phase 3"] = taskcs.Client(
                stack.enter_context(cs_server(scratch, "phase3", ["--executors", "2"])), autostart=False)
            for name, client in clients.items():
                stack.callback(client.shutdown)
                if name != "taskcs phase 3":
                    cpu_sets[name] = functools.partial(_taskcs_cpu_set, client, sizes["cpu_n"])
            for engine in engines:
                wait_for_engine(clients[f"taskcs over {engine}"])
            for r in range(rounds):
                print(f"round {r + 1}/{rounds}", file=sys.stderr, flush=True)
                for system in systems:
                    samples[system].append(measures[system]() if system in measures else
                                           measure_taskcs(clients[system], sizes, rtt=system != "taskcs phase 3"))
                # Each engine's CPU-bound sets back to back, the order swapped every round: the
                # machine's load drifts over seconds and would otherwise favour one column.
                for engine in engines:
                    pair = [engine, f"taskcs over {engine}"][::-1 if r % 2 else 1]
                    for system in pair:
                        samples[system][-1]["cpu_s"] = _wall(cpu_sets[system])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    medians = {system: {k: statistics.median(s[k] for s in rows) for k in rows[0]} for system, rows in samples.items()}
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sizes": sizes, "rounds": rounds,
            "engines": engines,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "versions": versions, "medians": medians, "samples": samples}


#: What each engine's cluster is, for the report.
CLUSTERS = {
    "dask": "one Dask cluster: scheduler + 2 single-threaded workers (no nanny) on 127.0.0.1; "
            "taskcs over it is a cs-server with `--executors 0 --engine dask://...`",
    "ray": "one Ray cluster: `ray start --head --num-cpus 2` on 127.0.0.1 (a temp dir of its own, no "
           "dashboard); taskcs over it is a cs-server with `--executors 0 --engine ray-auto` on it",
}
#: The engine's own one-call-per-item path, as the report names it.
OWN_PATH = {"dask": "Dask `client.map`", "ray": "Ray one `.remote` call per item"}


def _engine_rows(results: dict[str, Any], engine: str) -> list[str]:
    m, s, name = results["medians"], results["sizes"], ENGINES[engine][1]
    d, o, p = m[engine], m[f"taskcs over {engine}"], m["taskcs phase 3"]
    per_round = {system: ", ".join(f"{row['cpu_s']:.2f}" for row in results["samples"][system])
                 for system in (engine, f"taskcs over {engine}")}
    return [
        f"| workload | {name} alone | taskcs over {name} | taskcs phase 3 (2 executors) | ratio |",
        "|---|---|---|---|---|",
        f"| trivial tasks, tasks/s ({OWN_PATH[engine]} of {s[f'{engine}_trivial_n']:,}; taskcs `map` of "
        f"{s['trivial_n']:,}) | {d['trivial_per_s']:,.0f} | {o['trivial_per_s']:,.0f} | {p['trivial_per_s']:,.0f} | "
        f"**{o['trivial_per_s'] / d['trivial_per_s']:.0f}x** {name} (target >= 20x); "
        f"**{100 * o['trivial_per_s'] / p['trivial_per_s']:.0f} %** of phase 3 (target >= 25 %) |",
        f"| CPU-bound set ({s['cpu_n']} x burn 0.1 s), wall s | {d['cpu_s']:.2f} | {o['cpu_s']:.2f} | | "
        f"**{d['cpu_s'] / o['cpu_s']:.2f}x** {name}'s speed (target >= 0.95) |",
        f"| round trip of one trivial task, p50 / p99 µs | {d['rtt_p50_us']:,.0f} / {d['rtt_p99_us']:,.0f} | "
        f"{o['rtt_p50_us']:,.0f} / {o['rtt_p99_us']:,.0f} | | |", "",
        f"CPU-bound set per round, wall s: {name} alone {per_round[engine]}; "
        f"taskcs over {name} {per_round[f'taskcs over {engine}']}.", "",
    ]


def write(results: dict[str, Any], out_dir: Path, command: str) -> None:
    engines, v, s = results["engines"], results["versions"], results["sizes"]
    names = " and over ".join(f"a {ENGINES[e][1]} cluster" for e in engines)
    lines = [
        f"# taskcs over {names} (issue 14)", "",
        f"- command: `{command}`", f"- date: {results['date']}; machine: {results['machine']}",
        "- versions: " + ", ".join(f"{k} {v[k]}" for k in v),
        *(f"- {CLUSTERS[e]}" for e in engines),
        f"- all in one run, in a loopback-only network namespace; medians of {results['rounds']} interleaved rounds",
        "",
    ]
    for engine in engines:
        lines += [f"## {ENGINES[engine][1]}", "", *_engine_rows(results, engine)]
    lines += [
        "taskcs over an engine batches tiny tasks into one engine task (sized by their measured run time), so "
        "it pays the engine's per-task cost once per batch; long tasks go one per engine task. The round trip "
        "adds taskcs's hops (client -> cs-server -> engine thread) to the engine's own.", "",
        f"The CPU-bound set is {s['cpu_n'] * 0.1 / 2:.1f} s of work per worker with nothing else running; "
        "wall times above that are other load on the machine, which moves both columns alike.", "",
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
    parser.add_argument("--engines", default=",".join(installed_engines()),
                        help="comma-separated, of: " + ", ".join(ENGINES) + " (default: those installed)")
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    missing = [e for e in engines if e not in installed_engines()]
    if not engines or missing:
        parser.error(f"--engines {args.engines!r}: " + (
            "; ".join(f"{e} is not one of {', '.join(ENGINES)}" if e not in ENGINES else
                      f"{e} needs its extra: pip install -e '.[{e}]'" for e in missing) or "no engine named"))
    if argv is None:
        _in_netns()
    command = os.environ.get("BENCH_COMMAND") or " ".join(["python -m benchmarks.engines", *sys.argv[1:]])
    results = run(args.quick, args.rounds, engines)
    write(results, args.out_dir, command)
    print((args.out_dir / "ENGINES.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
