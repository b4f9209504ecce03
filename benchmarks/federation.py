"""Phase 4 side by side: federated cs-servers against one phase-3 server, in one run.

    python -m benchmarks.federation [--quick] [--out-dir benchmarks]

Configurations (all on loopback, each server in its own runtime and config directory, as on
its own machine; rounds interleave the configurations so the machine's drift hits all alike):

    phase3        one cs-server with 2 executors, the client on it (ipc)
    fed 1+1       alpha (1 executor) linked to beta (1 executor), the client on alpha
    fed 0+2       alpha with no executor forwarding everything to beta (2 executors)
    fed 0+2 +5ms  as fed 0+2, the link through a relay that delays each direction by 5 ms
                  (a WAN-like link; ``tc netem`` is used when the kernel has it, else this
                  userspace relay)

Workloads: a CPU-bound set (wall time), 5,000 trivial tasks submitted one at a time (tasks/s)
and sequential round trips (p50/p99). Writes FEDERATION.md and federation.json with the date,
the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import taskcs
from taskcs.phases.federated import DemoServer
from taskcs.runtime import keys

HERE = Path(__file__).resolve().parent


class DelayRelay:
    """A TCP relay on loopback that holds every chunk ``delay`` seconds in each direction."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target = target
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        import queue

        chunks: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def deliver() -> None:
            while True:
                due, data = chunks.get()
                if not data:
                    dst.close()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=deliver, daemon=True).start()
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            chunks.put((time.monotonic() + self.delay, data))
            if not data:
                return

    def close(self) -> None:
        """Stop accepting (open relays die with the process)."""
        self._stop = True
        self.listener.close()


@contextmanager
def configuration(name: str, root: Path) -> Iterator[str]:
    """The servers of configuration ``name``; yields the ipc endpoint the client uses."""
    servers: list[DemoServer] = []
    relay: DelayRelay | None = None
    try:
        if name == "phase3":
            solo = DemoServer(root, f"solo{time.monotonic_ns()}")
            servers.append(solo)
            solo.start(executors=2, listen=False)
            assert solo.record is not None
            yield solo.record.endpoint
            return
        tag = time.monotonic_ns()
        alpha, beta = DemoServer(root, f"alpha{tag}"), DemoServer(root, f"beta{tag}")
        servers += [beta, alpha]
        keys.trust(beta.key, alpha.config)
        keys.trust(alpha.key, beta.config)
        split = (1, 1) if name == "fed 1+1" else (0, 2)
        alpha.start(executors=split[0])
        target = alpha.listen
        if name.endswith("+5ms"):
            host, port = alpha.listen[len("tcp://"):].rsplit(":", 1)
            relay = DelayRelay((host, int(port)), 0.005)
            target = f"tcp://127.0.0.1:{relay.port}"
        beta.start(f"{alpha.key}@{target}", executors=split[1])
        deadline = time.monotonic() + 20
        while not (alpha.linked() and beta.linked()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: servers did not link")
            time.sleep(0.05)
        assert alpha.record is not None
        yield alpha.record.endpoint
    finally:
        for server in servers:
            server.stop()
        if relay is not None:
            relay.close()


def cpu_set(client: taskcs.Client, n: int) -> float:
    """Wall seconds for ``n`` CPU-bound tasks of ~0.1 s each."""
    start = time.perf_counter()
    futures = [client.submit("burn", 0.1) for _ in range(n)]
    for f in futures:
        f.result()
    return time.perf_counter() - start


def trivial(client: taskcs.Client, n: int) -> float:
    """Tasks per second for ``n`` trivial tasks submitted one at a time, then gathered."""
    start = time.perf_counter()
    futures = [client.submit("add", i, 1) for i in range(n)]
    for i, f in enumerate(futures):
        assert f.result() == i + 1
    return n / (time.perf_counter() - start)


def round_trips(client: taskcs.Client, n: int) -> tuple[float, float]:
    """p50 and p99 in µs of ``n`` sequential submit + result."""
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        client.submit("add", i, 1).result()
        samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


WORKLOADS: dict[str, tuple[tuple[str, ...], Callable[[taskcs.Client, dict[str, int]], dict[str, float]]]] = {
    "cpu": (("phase3", "fed 1+1"), lambda c, s: {"seconds": cpu_set(c, s["cpu_n"])}),
    "trivial": (("phase3", "fed 0+2", "fed 0+2 +5ms"), lambda c, s: {"tasks_per_s": trivial(c, s["trivial_n"])}),
    "round_trip": (("phase3", "fed 0+2", "fed 0+2 +5ms"), lambda c, s: dict(zip(
        ("p50_us", "p99_us"), round_trips(c, s["rtt_n"]), strict=True))),
}


def run(quick: bool) -> dict[str, Any]:
    sizes = {"cpu_n": 12 if quick else 24, "trivial_n": 2000 if quick else 5000, "rtt_n": 100 if quick else 300}
    rounds = 1 if quick else 3
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="tcs-fedbench-"))
    os.environ.setdefault("TASKCS_SPIN_US", "1000")
    for r in range(rounds):
        for workload, (configs, measure) in WORKLOADS.items():
            for config in configs:
                with configuration(config, root) as endpoint, \
                        taskcs.Client(endpoint, autostart=False, foreground=None) as client:
                    for i in range(20):  # warm up: durations measured, code and paths sent
                        client.submit("add", i, 1).result()
                    client.submit("burn", 0.05).result()
                    result = measure(client, sizes)
                samples.setdefault(workload, {}).setdefault(config, []).append(result)
                print(f"[fedbench] round {r + 1} {workload:<10} {config:<14} {result}", file=sys.stderr, flush=True)
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    medians = {w: {c: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for c, runs in by.items()}
               for w, by in samples.items()}
    return {"sizes": sizes, "rounds": rounds, "samples": samples, "medians": medians}


def netem_available() -> str:
    """Whether ``tc netem`` works in a fresh network namespace here (the reason if not)."""
    import subprocess

    name = f"tcsnetem{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        try:
            subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True,
                           capture_output=True)
            out = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                                  "delay", "5ms"], capture_output=True, text=True)
            return "yes" if out.returncode == 0 else f"no: tc says {out.stderr.strip()!r}"
        finally:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"no: {exc}"


def write(results: dict[str, Any], out_dir: Path, command: str) -> None:
    m = results["medians"]
    cpu = m["cpu"]["phase3"]["seconds"] / m["cpu"]["fed 1+1"]["seconds"]
    triv = m["trivial"]["fed 0+2"]["tasks_per_s"] / m["trivial"]["phase3"]["tasks_per_s"]
    lines = [
        "# Phase 4 benchmarks: federated servers against one phase-3 server",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"taskcs {taskcs.__version__}",
        f"- command: `{command}`",
        f"- rounds: {results['rounds']} (configurations interleaved), medians shown; sizes {results['sizes']}",
        f"- `tc netem` in a network namespace: {results['netem']}; the +5ms rows use a userspace relay that "
        "holds each chunk 5 ms per direction (10 ms added to every round trip over the link)",
        "",
        "| workload | configuration | median | ratio |",
        "|---|---|---|---|",
        f"| CPU-bound set ({results['sizes']['cpu_n']} x burn 0.1 s), wall s | one server, 2 executors | "
        f"{m['cpu']['phase3']['seconds']:.2f} | |",
        f"| | two servers, 1 executor each | {m['cpu']['fed 1+1']['seconds']:.2f} | "
        f"**{cpu:.2f}** (phase 3 / federated; target >= 0.9) |",
    ]
    for config in ("phase3", "fed 0+2", "fed 0+2 +5ms"):
        rate = m["trivial"][config]["tasks_per_s"]
        ratio = rate / m["trivial"]["phase3"]["tasks_per_s"]
        lines.append(f"| trivial tasks one at a time, tasks/s | {config} | {rate:,.0f} | {ratio:.2f}"
                     + (" (target >= 0.5)" if config == "fed 0+2" else "") + " |")
    for config in ("phase3", "fed 0+2", "fed 0+2 +5ms"):
        rt = m["round_trip"][config]
        lines.append(f"| round trip p50 / p99, µs | {config} | {rt['p50_us']:,.0f} / {rt['p99_us']:,.0f} | "
                     f"{rt['p50_us'] / m['round_trip']['phase3']['p50_us']:.2f} |")
    lines += ["", f"Forwarded trivial throughput is {triv:.0%} of phase 3's.", ""]
    (out_dir / "FEDERATION.md").write_text("\n".join(lines))
    (out_dir / "federation.json").write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=HERE)
    args = parser.parse_args(argv)
    command = os.environ.get("BENCH_COMMAND") or "python -m benchmarks.federation" + (" --quick" if args.quick else "")
    results = run(args.quick)
    results["netem"] = netem_available()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write(results, args.out_dir, command)
    print((args.out_dir / "FEDERATION.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
