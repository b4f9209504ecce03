"""What the soak suite (benchmarks/soak.py) is built from: its tasks, the sandbox every
scenario runs in, the client worker processes, result counting and the report.

    Sandbox        private runtime dir under /tmp; its cs-server(s); every pid to stop after
    worker_mixed   a client process: submit, map and task sets of squares, counted
    worker_victim  a client process that submits sleeps and waits to be SIGKILLed
    write_report   SOAK.md: date, machine, command, one figure per line
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def square(i: int) -> int:
    """The soak's task: cheap, and its result says which input it had."""
    return i * i


def square_slowly(i: int, delay: float) -> int:
    """As :func:`square`, but long enough that an executor kill lands mid-task."""
    time.sleep(delay)
    return i * i


@dataclass
class Outcome:
    """One line of SOAK.md: ``ok`` None means pending (cannot pass on this branch yet)."""

    name: str
    ok: bool | None
    line: str
    figures: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------- sandbox
class Sandbox:
    """A private runtime directory, the servers started in it, and every pid to stop after."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tcs-soak-", dir="/tmp"))
        self.orphans: set[int] = set()  # executors of a server we SIGKILLed
        self.procs: list[subprocess.Popen[str]] = []
        self._saved = os.environ.get("TASKCS_RUNTIME_DIR")
        os.environ["TASKCS_RUNTIME_DIR"] = str(self.dir)  # in-process clients find our server

    def start_server(self, executors: int, *extra: str) -> Any:
        from taskcs.runtime import discovery

        args = ["--executors", str(executors), "--idle-timeout", "600", *extra]
        record, _ = discovery.ensure_server(self.dir, args)
        deadline = time.monotonic() + 20
        while len(self.executors()) < executors and time.monotonic() < deadline:
            time.sleep(0.02)
        return record

    def record(self) -> Any:
        from taskcs.runtime import discovery

        return discovery.read_record(self.dir)

    def status(self) -> dict[str, Any]:
        from taskcs.runtime import protocol as p
        from taskcs.server.control import request

        return request(self.record().endpoint, p.StatusRequest(), timeout=10)

    def executors(self) -> list[dict[str, Any]]:
        with contextlib.suppress(Exception):
            return [ex for ex in self.status()["executors"] if not ex["stdio"]]
        return []

    def server_rss_mb(self) -> float:
        return _status_kb(self.record().pid, "VmRSS") / 1024

    def server_peak_mb(self) -> float:
        return _status_kb(self.record().pid, "VmHWM") / 1024

    def worker(self, kind: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.soak", "--worker", kind, *args],
                                cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
        self.procs.append(proc)
        return proc

    def kill_server(self) -> int:
        """SIGKILL our server (its executors are remembered, to be stopped later)."""
        record = self.record()
        self.orphans.update(ex["pid"] for ex in self.executors())
        os.kill(record.pid, signal.SIGKILL)
        return int(record.pid)

    def close(self) -> None:
        from taskcs.runtime import discovery

        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.communicate(timeout=10)
        record = discovery.read_record(self.dir)
        if record is not None and discovery.pid_alive(record.pid):
            self.orphans.update(ex["pid"] for ex in self.executors())
            discovery.terminate(record.pid, grace=10)
        for pid in self.orphans:  # executors of servers we started: ours to stop
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._saved is None:
            os.environ.pop("TASKCS_RUNTIME_DIR", None)
        else:
            os.environ["TASKCS_RUNTIME_DIR"] = self._saved
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_lines(self) -> tuple[int, int]:
        """Lines in the server log: (all, warnings and errors). INFO lines include one per
        status request, which the soak itself makes."""
        path = self.dir / "server.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return len(lines), sum(1 for line in lines if " WARNING " in line or " ERROR " in line)


@contextlib.contextmanager
def sandbox() -> Iterator[Sandbox]:
    box = Sandbox()
    try:
        yield box
    finally:
        box.close()


def _status_kb(pid: int, field_name: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return float(line.split()[1])
    return 0.0


def collect(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"right": 0, "wrong": 0, "lost": -1, "error": f"worker exited {proc.returncode}: {out[-500:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def check_set(ts: Any, inputs: list[int], timeout: float = 120) -> dict[str, int]:
    """Counts for one task set of squares: right, wrong, lost (no result), duplicated (the
    server counted more results than tasks)."""
    right = wrong = lost = 0
    for fut, i in zip(ts.futures, inputs, strict=True):
        try:
            value = fut.result(timeout)
        except Exception:
            lost += 1
            continue
        if value == i * i:
            right += 1
        else:
            wrong += 1
    counts = getattr(ts, "server_counts", None)
    deadline = time.monotonic() + 5
    while counts is None and time.monotonic() < deadline:  # SET_DONE follows the last result
        time.sleep(0.01)
        counts = ts.server_counts
    duplicated = max(0, sum(counts) - len(inputs)) if counts else 0
    return {"right": right, "wrong": wrong, "lost": lost, "duplicated": duplicated}


def add(total: dict[str, int], part: dict[str, int]) -> None:
    for key, value in part.items():
        if isinstance(value, int):
            total[key] = total.get(key, 0) + value


# ------------------------------------------------------------------------- workers
def worker_mixed(tasks: int, seed: int) -> dict[str, int]:
    import taskcs

    rng = random.Random(seed)
    total: dict[str, int] = {"right": 0, "wrong": 0, "lost": 0, "duplicated": 0}
    third = tasks // 3
    with taskcs.Client(foreground=None) as client:
        inputs = [rng.randrange(10**6) for _ in range(third)]
        futures = [client.submit(square, i) for i in inputs]
        for fut, i in zip(futures, inputs, strict=True):
            try:
                total["right" if fut.result(300) == i * i else "wrong"] += 1
            except Exception:
                total["lost"] += 1
        inputs = [rng.randrange(10**6) for _ in range(third)]
        try:
            for value, i in zip(client.map(square, inputs, chunksize=64, timeout=300), inputs, strict=True):
                total["right" if value == i * i else "wrong"] += 1
        except Exception:
            total["lost"] += third
        left = tasks - 2 * third
        while left > 0:
            inputs = [rng.randrange(10**6) for _ in range(min(left, 500))]
            left -= len(inputs)
            add(total, check_set(client.submit_set([(square, i) for i in inputs]), inputs, 300))
    return total


def worker_closures(tasks: int, seed: int) -> dict[str, int]:
    """A program that makes new code for every task: ``submit(lambda k=k: ...)`` in a loop,
    each function its own code blob (taskcs.runtime.blob_refs)."""
    import taskcs

    total: dict[str, int] = {"right": 0, "wrong": 0, "lost": 0, "duplicated": 0}
    pad = "x" * 500  # a little data in each function's globals, as real closures carry
    with taskcs.Client(foreground=None) as client:
        futures = [client.submit(lambda k=k: k * seed + len(pad)) for k in range(tasks)]
        for k, fut in enumerate(futures):
            try:
                total["right" if fut.result(300) == k * seed + len(pad) else "wrong"] += 1
            except Exception:
                total["lost"] += 1
    return total


def worker_victim() -> None:
    import taskcs

    client = taskcs.Client(foreground=None)
    client.submit_set([("sleep", 30), ("sleep", 30)])
    print("submitted", flush=True)
    time.sleep(120)  # until the soak SIGKILLs us


def _machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    mem = _status_kb_file("/proc/meminfo", "MemTotal") / 1024 / 1024
    return f"{platform.node()}: {os.cpu_count()} cores ({model}), {mem:.0f} GB RAM, {platform.platform()}, " \
           f"Python {platform.python_version()}"


def _status_kb_file(path: str, key: str) -> float:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    return 0.0


def write_report(outcomes: list[Outcome], out: Path, command: str, seconds: float) -> None:
    """SOAK.md: date, machine, command, then one line per scenario."""
    mark = {True: "ok", False: "FAILED", None: "pending"}
    lines = [
        "# Soak results", "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
        f"- machine: {_machine()}",
        f"- command: `{command}` ({seconds / 60:.1f} min)",
        "- load average (1, 5, 15 min) at the end: {:.1f}, {:.1f}, {:.1f} (the machine is shared)".format(
            *os.getloadavg()), "",
    ]
    lines += [f"- **{mark[o.ok]}** {o.line}" for o in outcomes]
    out.write_text("\n".join(lines) + "\n")
