"""Engine scenarios on a real Dask cluster, each run as a real ``__main__`` script.

tests/test_engines.py runs ``python tests/test_engines_scenarios.py NAME RUNTIME_DIR`` inside
a network namespace of its own that has only loopback (``unshare -n``), so nothing the
scheduler, the workers or the server bind can leave loopback or collide with a parallel run.
The script starts ``dask scheduler`` and ``dask worker`` processes (no nanny: a killed worker
stays dead) in a scratch directory, so the workers cannot import this module: its functions
must travel by value. It prints one line ``RESULT <json>`` for the test to check, and stops
every process it started, by pid, whatever happens.

pytest collects this file but finds no tests in it: everything runs under ``__main__``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
SRC = Path(__file__).resolve().parents[1] / "src"


def double_and_print(x: int) -> tuple[int, int]:
    """A function of ``__main__``: the workers cannot import it, so it must go by value."""
    print(f"printed on a worker: {x}")
    return 2 * x, os.getpid()


def slow(x: int, seconds: float) -> tuple[int, int]:
    """Long enough to be mid-run when a process is killed."""
    time.sleep(seconds)
    return x, os.getpid()


def marked(x: int, seconds: float, marker: str) -> tuple[int, int]:
    """Say which process runs this (a file ``marker``) before a long sleep, so it can be killed mid-task."""
    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return x, os.getpid()


def kill_mid_task(client: Any, scratch: Path, retries: int) -> list[list[Any]]:
    """Four tasks with ``retries``; the process running the first is SIGKILLed mid-task."""
    from taskcs import Task

    marker = scratch / f"first-{retries}.pid"
    tasks = [Task(marked, (0, 3.0, str(marker)), retries=retries)]
    tasks += [Task(slow, (i, 0.3), retries=retries) for i in range(1, 4)]
    ts = client.submit_set(tasks)
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(int(marker.read_text()), signal.SIGKILL)  # a Ray worker of this test's server
    outcomes: list[list[Any]] = []
    for f in ts.futures:
        try:
            outcomes.append(["ok", f.result(timeout=120)[0]])
        except Exception as exc:
            outcomes.append(["error", f"{type(exc).__name__}: {exc}"])
    return outcomes


def die_on(x: int, fatal: int) -> int:
    """Kills its worker process when ``x == fatal``."""
    if x == fatal:
        os._exit(1)
    return x


class Cluster:
    """A ``dask scheduler`` and ``workers`` ``dask worker`` processes on 127.0.0.1."""

    def __init__(self, scratch: Path, workers: int, env: dict[str, str] | None = None, port: int = 0) -> None:
        self.scratch = scratch
        self.env = {**os.environ, **(env or {})}
        if "PYTHONPATH" not in (env or {}):
            self.env.pop("PYTHONPATH", None)  # nothing that would let a worker import this script
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.address = self._scheduler(port)
        for _ in range(workers):
            self.add_worker()

    def _spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.scratch / f"dask-{len(self.procs)}.log", "wb")  # noqa: SIM115 (kept for the test's report)
        proc = subprocess.Popen([str(BIN / "dask"), *args], cwd=self.scratch, env={**self.env, **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def _scheduler(self, port: int) -> str:
        info = self.scratch / f"scheduler-{len(self.procs)}.json"
        self.scheduler = self._spawn("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
                                     "--scheduler-file", str(info))
        deadline = time.monotonic() + 60
        while not info.exists() or not info.read_text().strip():
            if time.monotonic() > deadline or self.scheduler.poll() is not None:
                raise RuntimeError("the dask scheduler did not start")
            time.sleep(0.05)
        time.sleep(0.05)  # the file is written in one go, but be sure it is complete
        return str(json.loads(info.read_text())["address"])

    def add_worker(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        proc = self._spawn("worker", self.address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                           "--host", "127.0.0.1", env=env)
        self.workers.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.kill(proc)


def cs_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "cs-server"), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def engine_row() -> dict[str, Any]:
    out = cs_server("status", "--json")
    info = json.loads(out.stdout)
    return dict(info["engines"][0]) | {"stats": info["stats"]}


def wait_engine(workers: int, connections: int = 1, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        row = engine_row()
        if row["state"] == "up" and row["workers"] == workers and row["connections"] >= connections:
            return row
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine did not attach: {row}")
        time.sleep(0.1)


def start_server(address: str, executors: int) -> int:
    out = cs_server("start", "--executors", str(executors), "--engine", f"dask://{address[len('tcp://'):]}",
                    "--idle-timeout", "0")
    if out.returncode != 0:
        raise RuntimeError(f"cs-server start failed: {out.stderr}")
    return int(out.stdout.split("pid ")[1].split(",")[0])


# ---------------------------------------------------------------------------- scenarios
def mixed(scratch: Path) -> dict[str, Any]:
    """__main__ functions on the workers, an IOTask on the client, results in order."""
    from taskcs import Client, Task

    cluster = Cluster(scratch, workers=2)
    try:
        server_pid = start_server(cluster.address, executors=0)
        wait_engine(2)
        with Client() as client:
            tasks = [Task(double_and_print, (i,)) for i in range(8)]
            tasks.insert(3, Task("print_line", ("an IOTask on the client",)))
            tasks.append(Task("add", (2, 3)))
            ts = client.submit_set(tasks)
            results = [f.result(timeout=60) for f in ts.futures]
            executors = [f.executor for f in ts.futures]
            client_name = client.name
            before = engine_row()
            mapped = list(client.map(abs, range(-3000, 0)))  # tiny tasks: they travel in batches
            after = engine_row()
        sys.stdout.flush()
        return {"results": results, "executors": executors, "client": client_name, "server_pid": server_pid,
                "worker_pids": [w.pid for w in cluster.workers], "engine": before,
                "mapped_ok": mapped == list(range(3000, 0, -1)),
                "map_batches": after["batches"] - before["batches"], "map_done": after["done"] - before["done"]}
    finally:
        cs_server("stop", "--now")
        cluster.close()


def kill_worker(scratch: Path) -> dict[str, Any]:
    """SIGKILL one of two workers mid-set: Dask re-runs its task; every task has one result."""
    from taskcs import Client, Task

    cluster = Cluster(scratch, workers=2)
    try:
        start_server(cluster.address, executors=0)
        wait_engine(2)
        with Client() as client:
            tasks = [Task(slow, (i, 0.4), retries=i % 2) for i in range(12)]
            ts = client.submit_set(tasks)
            first = ts.futures[0].result(timeout=60)
            victim = next(w for w in cluster.workers if w.pid == first[1])
            cluster.kill(victim)
            outcomes = []
            for f in ts.futures:
                try:
                    outcomes.append(["ok", f.result(timeout=120)[0], f.executor])
                except Exception as exc:
                    outcomes.append(["error", repr(exc), f.executor])
        return {"outcomes": outcomes, "victim": victim.pid, "engine": engine_row()}
    finally:
        cs_server("stop", "--now")
        cluster.close()


def kill_scheduler(scratch: Path) -> dict[str, Any]:
    """SIGKILL the scheduler mid-set: the engine's tasks are requeued (retries 1) onto the
    local executor or fail naming the engine (retries 0); a new scheduler is re-attached."""
    from taskcs import Client, Task

    cluster = Cluster(scratch, workers=1)
    port = int(cluster.address.rsplit(":", 1)[1])
    try:
        start_server(cluster.address, executors=1)
        wait_engine(1)
        with Client() as client:
            tasks = [Task(slow, (i, 1.0), retries=i % 2) for i in range(6)]
            ts = client.submit_set(tasks)
            deadline = time.monotonic() + 30
            while engine_row()["in_flight"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            on_engine = engine_row()["in_flight"]
            cluster.kill(cluster.scheduler)
            outcomes = []
            for f in ts.futures:
                try:
                    outcomes.append(["ok", f.result(timeout=120)[0], f.executor])
                except Exception as exc:
                    outcomes.append(["error", str(exc), f.executor])
            after = client.submit(slow, 99, 0.0).result(timeout=60)[0]  # the server still serves
            down = engine_row()
            for w in cluster.workers:
                cluster.kill(w)
            cluster.workers.clear()
            cluster.address = cluster._scheduler(port)  # a new scheduler where the old one was
            cluster.add_worker()
            again = wait_engine(1, connections=2, timeout=90)
            back = client.submit(double_and_print, 21).result(timeout=60)[0]
        return {"outcomes": outcomes, "on_engine": on_engine, "after": after, "down": down, "again": again,
                "back": back}
    finally:
        cs_server("stop", "--now")
        cluster.close()


def cancel(scratch: Path) -> dict[str, Any]:
    """Futures cancelled while their tasks wait on the engine get CANCELLED; the set completes."""
    from taskcs import Client

    cluster = Cluster(scratch, workers=1)
    try:
        start_server(cluster.address, executors=0)
        wait_engine(1)
        with Client() as client:
            futures = [client.submit(slow, i, 1.5) for i in range(4)]
            deadline = time.monotonic() + 30
            while engine_row()["in_flight"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            cancelled = [f.cancel() for f in futures[1:]]
            first = futures[0].result(timeout=60)[0]
            deadline = time.monotonic() + 30
            while (row := engine_row())["in_flight"] and time.monotonic() < deadline:
                time.sleep(0.05)
        return {"first": first, "cancelled": cancelled, "engine": row}
    finally:
        cs_server("stop", "--now")
        cluster.close()


def other_taskcs(scratch: Path) -> Path:
    """A copy of taskcs that says it is another version, for a worker's PYTHONPATH."""
    fake = scratch / "fake"
    shutil.copytree(SRC / "taskcs", fake / "taskcs", ignore=shutil.ignore_patterns("__pycache__"))
    init = fake / "taskcs" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "0.0.0-other+'))
    return fake


def late_mismatch(scratch: Path) -> dict[str, Any]:
    """A worker of another taskcs version joins a running engine: its status names the problem."""
    cluster = Cluster(scratch, workers=1)
    try:
        start_server(cluster.address, executors=0)
        wait_engine(1)
        cluster.add_worker(env={"PYTHONPATH": str(other_taskcs(scratch))})
        deadline = time.monotonic() + 60
        while not (row := engine_row())["problem"] and time.monotonic() < deadline:
            time.sleep(0.1)
        return {"engine": row}
    finally:
        cs_server("stop", "--now")
        cluster.close()


def version_mismatch(scratch: Path) -> dict[str, Any]:
    """Workers with another taskcs version: cs-server start refuses with one line, exit 2."""
    cluster = Cluster(scratch, workers=1, env={"PYTHONPATH": str(other_taskcs(scratch))})
    try:
        from distributed import Client as DaskClient

        with DaskClient(cluster.address, timeout=30) as dc:
            dc.wait_for_workers(1, timeout=60)
        out = cs_server("start", "--executors", "0", "--engine", f"dask://{cluster.address[6:]}")
        return {"rc": out.returncode, "stderr": out.stderr, "stdout": out.stdout}
    finally:
        cluster.close()


USERLIB = (Path(__file__).resolve().parent / "data" / "userlib.py").read_text()

USER_SCRIPT = """
import json, os
import taskcs
from userlib import Point, norm, scaled

with taskcs.Client(foreground=None) as c:
    a = c.submit(norm, Point(3, 4))
    d = c.submit(scaled, Point(1, 2), 3)
    p = d.result(timeout=60)
    print("USER " + json.dumps({"norm": a.result(timeout=60), "norm_on": a.executor,
                                "scaled": [type(p).__module__, p.x, p.y], "scaled_on": d.executor}))
"""


def user_module(scratch: Path) -> dict[str, Any]:
    """Functions and classes of the user's own module, which the workers cannot import."""
    project = scratch / "project"
    project.mkdir()
    (project / "userlib.py").write_text(USERLIB)
    (project / "script.py").write_text(USER_SCRIPT)
    cluster = Cluster(scratch, workers=2)  # in scratch, without the project on their path
    try:
        start_server(cluster.address, executors=0)
        wait_engine(2)
        out = subprocess.run([sys.executable, "script.py"], cwd=project, capture_output=True, text=True,
                             timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        lines = [line for line in out.stdout.splitlines() if line.startswith("USER ")]
        result: dict[str, Any] = json.loads(lines[0][5:]) if lines else {}
        return {**result, "rc": out.returncode, "stderr": out.stderr[-3000:]}
    finally:
        cs_server("stop", "--now")
        cluster.close()


def given_client(scratch: Path) -> dict[str, Any]:
    """A Server in this process, handed a distributed.Client the caller already holds."""
    import threading

    from distributed import Client as DaskClient

    from taskcs import Client
    from taskcs.server.server import Server, ServerOptions

    cluster = Cluster(scratch, workers=1)
    runtime = Path(os.environ["TASKCS_RUNTIME_DIR"])
    try:
        with DaskClient(cluster.address, timeout=30, set_as_default=False) as dc:
            dc.wait_for_workers(1, timeout=60)
            server = Server(ServerOptions(runtime_dir=runtime, executors=0, idle_timeout=0, engine=dc))
            out: dict[str, Any] = {}

            def use() -> None:
                try:
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline and not (runtime / "server.json").exists():
                        time.sleep(0.05)
                    wait_engine(1)
                    with Client() as client:
                        fut = client.submit(double_and_print, 4)
                        out["result"] = fut.result(timeout=60)[0]
                        out["executor"] = fut.executor
                finally:
                    server.request_stop(now=False)

            thread = threading.Thread(target=use)
            thread.start()
            server.serve()  # in the main thread: it owns the signal handlers
            thread.join(60)
            out["dask_client_still_open"] = dc.status == "running"  # ours to close, not the server's
        return out
    finally:
        cluster.close()


def ray_local(scratch: Path) -> dict[str, Any]:
    """The mixed set against ``--engine ray-local`` (ray.init() owned by the server, 2 CPUs)."""
    from taskcs import Client, Task

    out = cs_server("start", "--executors", "0", "--engine", "ray-local", "--idle-timeout", "0")
    if out.returncode != 0:
        raise RuntimeError(f"cs-server start failed: {out.stderr}")
    server_pid = int(out.stdout.split("pid ")[1].split(",")[0])
    try:
        wait_engine(1, timeout=120)
        with Client() as client:
            tasks = [Task(double_and_print, (i,)) for i in range(8)]
            tasks.insert(3, Task("print_line", ("an IOTask on the client",)))
            tasks.append(Task("add", (2, 3)))
            ts = client.submit_set(tasks)
            results = [f.result(timeout=120) for f in ts.futures]
            executors = [f.executor for f in ts.futures]
            client_name = client.name
            # SIGKILL the Ray worker running a task: retries become Ray's max_retries.
            retried = kill_mid_task(client, scratch, retries=1)
            not_retried = kill_mid_task(client, scratch, retries=0)
        sys.stdout.flush()
        return {"results": results, "executors": executors, "client": client_name, "server_pid": server_pid,
                "engine": engine_row(), "retried": retried, "not_retried": not_retried}
    finally:
        cs_server("stop", "--now")


def poison(scratch: Path) -> dict[str, Any]:
    """A task that kills its worker, inside a batch of tiny tasks: only that one fails."""
    from taskcs import Client

    out = cs_server("start", "--executors", "0", "--engine", "dask-local", "--idle-timeout", "0")
    if out.returncode != 0:
        raise RuntimeError(f"cs-server start failed: {out.stderr}")
    try:
        wait_engine(2, timeout=120)
        with Client() as client:
            futures = [client.submit(die_on, x, 2500) for x in range(3000)]
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result(timeout=180))
                except Exception as exc:
                    outcomes.append(f"error: {exc}")
        return {"errors": {i: o for i, o in enumerate(outcomes) if isinstance(o, str)},
                "ok": sum(1 for i, o in enumerate(outcomes) if o == i), "engine": engine_row()}
    finally:
        cs_server("stop", "--now")


def dask_local(scratch: Path) -> dict[str, Any]:
    """cs-demo --engine dask-local: the combined demo, its work on a LocalCluster it owns."""
    out = subprocess.run([str(BIN / "cs-demo"), "--engine", "dask-local"], capture_output=True, text=True,
                         timeout=180, input="", cwd=scratch)
    return {"rc": out.returncode, "stdout": out.stdout, "stderr": out.stderr[-3000:]}


def stranded(scratch: Path) -> dict[str, Any]:
    """``--executors 0``, the scheduler killed: past ``--engine-grace`` the queued work fails
    naming the engine (nothing else can run it); a new scheduler is re-attached and serves."""
    from taskcs import Client, Task

    cluster = Cluster(scratch, workers=1)
    port = int(cluster.address.rsplit(":", 1)[1])
    try:
        out = cs_server("start", "--executors", "0", "--engine", f"dask://{cluster.address[len('tcp://'):]}",
                        "--engine-grace", "2", "--idle-timeout", "0")
        if out.returncode != 0:
            raise RuntimeError(f"cs-server start failed: {out.stderr}")
        wait_engine(1)
        with Client() as client:
            futures = [client.submit_task(Task(slow, (i, 0.5), retries=1)) for i in range(4)]
            futures[0].result(timeout=60)
            for proc in [cluster.scheduler, *cluster.workers]:
                cluster.kill(proc)
            cluster.workers.clear()
            deadline = time.monotonic() + 30
            while engine_row()["state"] == "up" and time.monotonic() < deadline:
                time.sleep(0.05)
            late = client.submit(slow, 9, 0.0)  # submitted while the engine is down
            outcomes = []
            started = time.monotonic()
            for f in [*futures, late]:
                try:
                    outcomes.append(["ok", f.result(timeout=60)[0]])
                except Exception as exc:
                    outcomes.append(["error", type(exc).__name__, str(exc)])
            waited = time.monotonic() - started
            io = client.submit("print_line", "IOTasks still run").result(timeout=30)  # at home, no engine
            cluster.address = cluster._scheduler(port)
            cluster.add_worker()
            again = wait_engine(1, connections=2, timeout=90)
            back = client.submit(double_and_print, 21).result(timeout=60)[0]
        return {"outcomes": outcomes, "waited": waited, "io": io, "again": again, "back": back}
    finally:
        cs_server("stop", "--now")
        cluster.close()


def in_process(scratch: Path) -> dict[str, Any]:
    """``Client.in_process(executors=0, engine=...)``: no cs-server, the engine in this process."""
    from taskcs import Client, Task

    cluster = Cluster(scratch, workers=2)
    try:
        with Client.in_process(executors=0, engine=f"dask://{cluster.address[len('tcp://'):]}") as client:
            tasks = [Task(double_and_print, (i,)) for i in range(6)]
            tasks.insert(2, Task("print_line", ("an IOTask at home",)))
            ts = client.submit_set(tasks)
            results = [f.result(timeout=120) for f in ts.futures]
            executors = [f.executor for f in ts.futures]
            name = client.name
            status = client._owned[0].status()["engines"][0]
        try:
            Client.in_process(engine="dask://127.0.0.1:9")  # nothing listens there
            refused = ""
        except Exception as exc:
            refused = f"{type(exc).__name__}: {exc}"
        return {"results": results, "executors": executors, "client": name, "engine": status,
                "worker_pids": [w.pid for w in cluster.workers], "pid": os.getpid(), "refused": refused}
    finally:
        cluster.close()


SCENARIOS = {f.__name__.replace("_", "-"): f for f in (
    mixed, kill_worker, kill_scheduler, cancel, version_mismatch, dask_local, ray_local, given_client, late_mismatch,
    poison, user_module, stranded, in_process)}


def main() -> int:
    name = sys.argv[1]
    scratch = Path(tempfile.mkdtemp(prefix="tcs-dask-"))
    try:
        result = SCENARIOS[name](scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
