"""The seven workloads, written once against the :class:`~benchmarks.systems.System` surface.

Each workload starts its system, warms it up (worker processes started, code imported),
then measures ``mode.repeats`` repetitions (fewer when the time budget runs out, never fewer
than one) and returns ``{metric: [one sample per repetition]}``. Start-up and shutdown are
never inside a measurement, except in the cold-start workload, where they are the point.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import procs
from .systems import WORKERS, System, runtime_dir, start_cs_server, stop_cs_server
from .workloads import burn, echo_bytes, inc

REPO = Path(__file__).resolve().parent.parent
Metrics = dict[str, list[float]]
Factory = Callable[[], System]


@dataclass(frozen=True, slots=True)
class Mode:
    repeats: int
    submit_n: int
    map_n: int
    map_chunk: int
    rtt_n: int
    rtt_warmup: int
    cold_repeats: int
    cpu_tasks: int
    cpu_seconds: float
    scale_ns: tuple[int, ...]
    payloads: tuple[tuple[str, int, int], ...]  # (metric key, bytes per payload, task count)
    budget_s: float  # stop repeating once a workload has run this long (after one repeat)


MB = 1_000_000
MODES: dict[str, Mode] = {
    "full": Mode(5, 10_000, 100_000, 1_000, 1_000, 100, 5, 8, 0.25,
                 (10**3, 10**4, 10**5, 10**6), (("payload_1mb", MB, 64), ("payload_10mb", 10 * MB, 16)),
                 90.0),
    "quick": Mode(3, 2_000, 20_000, 500, 300, 30, 3, 8, 0.1,
                  (10**3, 10**4, 10**5), (("payload_1mb", MB, 16), ("payload_10mb", 10 * MB, 4)), 30.0),
    "smoke": Mode(1, 50, 400, 50, 20, 5, 1, 4, 0.02,
                  (200,), (("payload_1mb", MB, 2), ("payload_10mb", 10 * MB, 1)), 5.0),
}


@contextlib.contextmanager
def running(factory: Factory) -> Iterator[System]:
    """A started and warmed-up system that is closed whatever happens."""
    system = factory()
    try:
        system.start()
        warm = range(8 * WORKERS)
        _check(system.gather([system.submit(inc, i) for i in warm]), [i + 1 for i in warm])
        _check(system.call(inc, 1), 2)
        yield system
    finally:
        system.close()


def repeats(mode: Mode, limit: int | None = None) -> Iterator[int]:
    """Repetition numbers: ``mode.repeats`` of them, or fewer once the budget is spent.

    ``BENCH_REPEATS`` (set by the orchestrator when it spreads repeats over rounds) caps them.
    """
    start = time.perf_counter()
    count = limit or mode.repeats
    cap = os.environ.get("BENCH_REPEATS")
    if cap:
        count = max(1, min(count, int(cap)))
    for i in range(count):
        if i and time.perf_counter() - start > mode.budget_s:
            return
        yield i


def _check(got: Any, want: Any) -> None:
    if got != want:
        raise AssertionError(f"wrong results: got {str(got)[:80]}, want {str(want)[:80]}")


# --------------------------------------------------------------------------- workloads
def submit_many(factory: Factory, mode: Mode, n: int | None) -> Metrics:
    """Workload 1: N trivial tasks submitted one at a time, then every result gathered."""
    n = n or mode.submit_n
    samples = []
    with running(factory) as system:
        for _ in repeats(mode):
            t0 = time.perf_counter()
            handles = [system.submit(inc, i) for i in range(n)]
            results = system.gather(handles)
            samples.append(n / (time.perf_counter() - t0))
            _check(sum(results), n * (n + 1) // 2)
    return {"submit_tps": samples}


def bulk_map(factory: Factory, mode: Mode, n: int | None) -> Metrics:
    """Workload 2: map over N trivial items with the system's own bulk API and a chunksize."""
    n = n or mode.map_n
    items = list(range(n))
    samples = []
    with running(factory) as system:
        for _ in repeats(mode):
            t0 = time.perf_counter()
            results = system.map(inc, items, mode.map_chunk)
            samples.append(n / (time.perf_counter() - t0))
            _check(sum(results), n * (n + 1) // 2)
    return {"map_tps": samples}


def round_trip(factory: Factory, mode: Mode, n: int | None) -> Metrics:
    """Workload 3: one trivial task at a time, submitted and waited for; p50/p99 per repeat."""
    n = n or mode.rtt_n
    p50: list[float] = []
    p99: list[float] = []
    with running(factory) as system:
        for i in range(mode.rtt_warmup):
            system.call(inc, i)
        for _ in repeats(mode):
            lat = []
            for i in range(n):
                t0 = time.perf_counter()
                system.call(inc, i)
                lat.append((time.perf_counter() - t0) * 1e6)
            p50.append(statistics.median(lat))
            p99.append(statistics.quantiles(lat, n=100)[98] if len(lat) > 1 else lat[0])
    return {"roundtrip_p50_us": p50, "roundtrip_p99_us": p99}


def _time_first_result(code: str, env: dict[str, str], timeout: float = 120.0) -> float:
    """Seconds from spawning ``python -c code`` to reading its first output line ("2")."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # blocks at most until the process dies
            elapsed = time.perf_counter() - t0
            proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if line.strip() != "2":
            err.seek(0)
            tail = err.read().decode(errors="replace")[-400:]
            raise RuntimeError(f"cold start printed {line.strip()!r} (exit {proc.returncode}): {tail}")
    return elapsed


def cold_start(factory: Factory, mode: Mode, n: int | None) -> Metrics:
    """Workload 4: fresh process -> import, start, one task, print. taskcs-ipc twice:
    with no server (auto-start in a fresh runtime dir) and with a warm server."""
    system = factory()
    samples: list[float] = []
    out: Metrics = {"coldstart_s": samples}
    is_server = system.name in ("taskcs-ipc", "taskcs-direct")
    base = runtime_dir() if is_server else ""
    for i in repeats(mode, mode.cold_repeats):
        env = dict(os.environ)
        if is_server:
            env["TASKCS_RUNTIME_DIR"] = os.path.join(base, f"cold-{i}")
            os.makedirs(env["TASKCS_RUNTIME_DIR"], mode=0o700)
        try:
            samples.append(_time_first_result(system.cold_code, env))
        finally:
            if is_server:
                stop_cs_server(env)
    if is_server:
        env = dict(os.environ, TASKCS_RUNTIME_DIR=os.path.join(base, "warm"))
        os.makedirs(env["TASKCS_RUNTIME_DIR"], mode=0o700)
        warm: list[float] = []
        try:
            start_cs_server(env)
            _time_first_result(system.cold_code, env)  # the server's executors import inc once
            warm.extend(_time_first_result(system.cold_code, env) for _ in repeats(mode, mode.cold_repeats))
        finally:
            stop_cs_server(env)
        out["coldstart_warm_s"] = warm
    return out


def cpu_bound(factory: Factory, mode: Mode, n: int | None) -> Metrics:
    """Workload 5: CPU time the tasks measured inside themselves, summed, over wall time."""
    n = n or mode.cpu_tasks
    samples = []
    with running(factory) as system:
        system.gather([system.submit(burn, 0.01) for _ in range(WORKERS)])
        for _ in repeats(mode):
            t0 = time.perf_counter()
            cpu = sum(system.gather([system.submit(burn, mode.cpu_seconds) for _ in range(n)]))
            samples.append(cpu / (time.perf_counter() - t0))
    return {"cpu_efficiency": samples}


def scale(factory: Factory, mode: Mode, n: int | None) -> Metrics:
    """Workload 6: N trivial tasks (submit + gather): time per task and peak memory."""
    n = n or mode.scale_ns[0]
    samples = []
    with running(factory) as system:
        for _ in repeats(mode, 1 if n >= 10**6 else None):
            t0 = time.perf_counter()
            results = system.gather([system.submit(inc, i) for i in range(n)])
            samples.append((time.perf_counter() - t0) / n * 1e6)
            _check(sum(results), n * (n + 1) // 2)
            del results
        server = procs.hwm_mb(system.server_pid())
    out: Metrics = {"us_per_task": samples, "client_hwm_mb": [procs.hwm_mb(os.getpid()) or 0.0]}
    if server is not None:
        out["server_hwm_mb"] = [server]
    return out


def payloads(factory: Factory, mode: Mode, n: int | None) -> Metrics:
    """Workload 7: tasks that take and return 1 MB / 10 MB of bytes; MB/s counts both ways."""
    out: Metrics = {}
    with running(factory) as system:
        for key, size, count in mode.payloads:
            data = os.urandom(size)
            _check(len(system.call(echo_bytes, data)), size)
            samples = out[f"{key}_mbps"] = []
            for _ in repeats(mode):
                t0 = time.perf_counter()
                results = system.gather([system.submit(echo_bytes, data) for _ in range(count)])
                samples.append(2 * size * count / MB / (time.perf_counter() - t0))
                _check([len(r) for r in results], [size] * count)
                del results
    return out


WORKLOADS: dict[str, Callable[[Factory, Mode, int | None], Metrics]] = {
    "submit": submit_many,
    "map": bulk_map,
    "roundtrip": round_trip,
    "coldstart": cold_start,
    "cpu": cpu_bound,
    "scale": scale,
    "payload": payloads,
}
