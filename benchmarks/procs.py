"""Process helpers on Linux ``/proc``: peak memory, descendants, and the cleanup sweep.

Every benchmark child runs with a unique ``BENCH_RUN_TOKEN`` in its environment; whatever it
starts (servers that daemonize, executor processes, Ray's raylet, Dask workers) inherits it.
After the child ends, :func:`sweep` kills exactly the processes carrying that token, so a
crashed or timed-out run never leaves anything behind, and nothing else is ever touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

TOKEN_ENV = "BENCH_RUN_TOKEN"
PIDS_FILE = ".bench-pids"


def status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmHWM, VmRSS), or None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def hwm_mb(pid: int | None) -> float | None:
    """Peak resident memory (VmHWM) of ``pid`` in MB."""
    if pid is None:
        return None
    kb = status_kb(pid, "VmHWM")
    return None if kb is None else round(kb / 1024, 1)


def _ppid_and_name(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    return int(stat[stat.rindex(")") + 2:].split()[1]), name


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def descendants(root: int) -> list[int]:
    """Every living descendant of ``root`` (children first)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        info = _ppid_and_name(pid)
        if info is not None:
            children.setdefault(info[0], []).append(pid)
    out: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def find_descendant(root: int, name: str) -> int | None:
    """The first descendant of ``root`` whose process name or command line contains ``name``."""
    for pid in descendants(root):
        info = _ppid_and_name(pid)
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if info is not None and (name in info[1] or name in cmd):
            return pid
    return None


def record_pid(pid: int) -> None:
    """Note a server pid in the runtime dir, for the orchestrator's cleanup."""
    rdir = os.environ.get("TASKCS_RUNTIME_DIR")
    if rdir:
        with contextlib.suppress(OSError), open(Path(rdir) / PIDS_FILE, "a") as fh:
            fh.write(f"{pid}\n")


def with_token(token: str) -> list[int]:
    """Processes (other than this one) whose environment carries ``BENCH_RUN_TOKEN=token``."""
    needle = f"{TOKEN_ENV}={token}".encode()
    found = []
    me = os.getpid()
    for pid in _all_pids():
        if pid == me:
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(pid)
    return found


def alive(pid: int) -> bool:
    info = _ppid_and_name(pid)
    if info is None:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_pids(pids: list[int], grace: float = 3.0) -> list[int]:
    """SIGTERM ``pids``, wait up to ``grace`` seconds, SIGKILL the rest; return the killed."""
    live = [p for p in pids if alive(p)]
    for pid in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in live):
        time.sleep(0.05)
    for pid in live:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    return live


def sweep(token: str) -> list[int]:
    """Kill every leftover process of one benchmark child (identified by its token)."""
    leftovers = with_token(token)
    return kill_pids(leftovers) if leftovers else []


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


def busy_cores(interval: float = 0.5) -> float:
    """How many cores were busy during ``interval`` (this process sleeps meanwhile)."""
    busy0, total0 = _cpu_times()
    time.sleep(interval)
    busy1, total1 = _cpu_times()
    return round((busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1), 2)


def wait_quiet(threshold: float = 0.25, max_wait: float = 30.0) -> float:
    """Wait (at most ``max_wait`` s) until other processes use under ``threshold`` cores;
    return the last reading, so a noisy measurement can be reported as such."""
    deadline = time.monotonic() + max_wait
    while True:
        load = busy_cores()
        if load < threshold or time.monotonic() >= deadline:
            return load


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_snapshot() -> dict[int, tuple[int, int]]:
    """pid -> (CPU ticks used so far, start time) for every living process.

    Zombies are left out: their environment can no longer be read, so a benchmark child's
    not-yet-reaped helper (a daemonizing server's intermediate process, a loky worker)
    would otherwise count as somebody else's load."""
    out = {}
    for pid in _all_pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            out[pid] = (int(fields[11]) + int(fields[12]), int(fields[19]))  # utime+stime, starttime
    return out


def others_cpu_seconds(before: dict[int, tuple[int, int]], token: str) -> float:
    """CPU seconds that processes other than this one and those carrying ``token`` used
    since ``before``: the background a measurement shared the machine with. Processes that
    both started and ended in between are missed, so this errs low."""
    mine = set(with_token(token)) | {os.getpid()}
    ticks = 0
    for pid, (used, started) in cpu_snapshot().items():
        if pid in mine:
            continue
        prev = before.get(pid)
        ticks += used - (prev[0] if prev is not None and prev[1] == started else 0)
    return ticks / _TICK
