"""One adapter per system, all with the same small surface, and the child-process entry point.

Every adapter runs its tasks on exactly ``WORKERS`` executor processes (threads for taskcs
phase 2, which is the point of that row). The orchestrator runs each (system, workload) as::

    python -m benchmarks.systems SYSTEM WORKLOAD --mode full|quick|smoke [--n N] --json

which prints one ``@@RESULT {json}`` line; everything else on stdout/stderr is noise from the
libraries and is only kept for the error message when a run fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import procs

WORKERS = 2
RESULT_PREFIX = "@@RESULT "


class System:
    """The adapter surface the workloads use; ``call`` and ``gather`` have generic defaults."""

    name = "?"
    #: Python snippet for the cold-start workload: import, start, run inc(1), print, stop.
    cold_code = ""

    def start(self) -> None:
        """Start the system (its worker processes must be ready when this returns)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise NotImplementedError

    def result(self, handle: Any) -> Any:
        return handle.result()

    def gather(self, handles: list[Any]) -> list[Any]:
        return [self.result(h) for h in handles]

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One round trip: submit and wait."""
        return self.result(self.submit(fn, *args))

    def map(self, fn: Callable[..., Any], items: list[Any], chunksize: int) -> list[Any]:
        raise NotImplementedError

    def server_pid(self) -> int | None:
        """The scheduler/server process, when it is a process of its own (else None)."""
        return None

    def close(self) -> None:
        """Stop everything started; must be safe to call after a failed start."""


# ----------------------------------------------------------------------------- taskcs
def _taskcs_client_class() -> Any:
    try:
        from taskcs import Client
    except ImportError:  # before taskcs/__init__.py re-exports it
        from taskcs.client.client import Client
    return Client


_TASKCS_IMPORT = (
    "try:\n from taskcs import Client\n"
    "except ImportError:\n from taskcs.client.client import Client\n"
    "from benchmarks.workloads import inc\n"
)


def cs_server_command(*args: str) -> list[str]:
    """The ``cs-server`` console script of this interpreter's environment (or ``-m``)."""
    script = Path(sys.executable).parent / "cs-server"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "taskcs.server.cli", *args]


def runtime_dir() -> str:
    """This run's TASKCS_RUNTIME_DIR: the orchestrator's fresh one, or a new private one."""
    path = os.environ.get("TASKCS_RUNTIME_DIR")
    if not path:
        path = tempfile.mkdtemp(prefix="tcsb-", dir="/tmp" if os.path.isdir("/tmp") else None)
        os.environ["TASKCS_RUNTIME_DIR"] = path
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def start_cs_server(env: dict[str, str] | None = None, timeout: float = 60.0) -> None:
    """``cs-server start --executors 2`` in TASKCS_RUNTIME_DIR; returns when it is up."""
    proc = subprocess.run(
        cs_server_command("start", "--executors", str(WORKERS)),
        env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cs-server start failed ({proc.returncode}): {proc.stderr or proc.stdout}")


def stop_cs_server(env: dict[str, str] | None = None, timeout: float = 30.0) -> None:
    """``cs-server stop``; quiet when no server runs there."""
    # On a timeout the orchestrator's sweep kills whatever is left.
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        subprocess.run(cs_server_command("stop"), env=env, capture_output=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)


class ExecutorSystem(System):
    """A system driven through a :class:`concurrent.futures.Executor` held in ``ex``."""

    #: Keyword arguments of ``ex.shutdown`` in :meth:`close`.
    shutdown_kwargs: dict[str, Any] = {}

    def __init__(self) -> None:
        self.ex: Any = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.ex.submit(fn, *args)

    def map(self, fn: Callable[..., Any], items: list[Any], chunksize: int) -> list[Any]:
        return list(self.ex.map(fn, items, chunksize=chunksize))

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(**self.shutdown_kwargs)


class TaskcsServer(ExecutorSystem):
    """taskcs phase 3: a ``cs-server`` with 2 executor processes, reached over ipc://."""

    name = "taskcs-ipc"
    # The server path (every task through the cs-server): since the direct path is the
    # default, it is asked for by name.
    cold_code = (_TASKCS_IMPORT + "c = Client(direct=False)\nprint(c.submit(inc, 1).result(), flush=True)\n"
                 "c.shutdown()\n")

    def start(self) -> None:
        runtime_dir()
        start_cs_server()
        self.ex = _taskcs_client_class()(autostart=False, direct=False)
        procs.record_pid(self.ex.server_pid)

    def server_pid(self) -> int | None:
        return int(self.ex.server_pid)

    def close(self) -> None:
        try:
            super().close()
        finally:
            stop_cs_server()


class TaskcsDirect(TaskcsServer):
    """taskcs phase 3 with the direct path of issue 10 (the default, ``Client()``): the client
    leases the server's idle executors and sends them its plain tasks itself."""

    name = "taskcs-direct"
    cold_code = _TASKCS_IMPORT + "c = Client()\nprint(c.submit(inc, 1).result(), flush=True)\nc.shutdown()\n"

    def start(self) -> None:
        runtime_dir()
        start_cs_server()
        self.ex = _taskcs_client_class()(autostart=False, direct=True)
        procs.record_pid(self.ex.server_pid)


class TaskcsThreads(ExecutorSystem):
    """taskcs phase 2: an in-process server with 2 executor threads (the GIL is shared)."""

    name = "taskcs-threads"
    cold_code = (_TASKCS_IMPORT + "c = Client.in_process(executors=2)\n"
                 "print(c.submit(inc, 1).result(), flush=True)\nc.shutdown()\n")

    def start(self) -> None:
        self.ex = _taskcs_client_class().in_process(executors=WORKERS)


# ------------------------------------------------------------------- stdlib executors
class ProcessPool(ExecutorSystem):
    """concurrent.futures.ProcessPoolExecutor(2)."""

    name = "ProcessPoolExecutor"
    cold_code = ("from concurrent.futures import ProcessPoolExecutor\nfrom benchmarks.workloads import inc\n"
                 "if __name__ == '__main__':\n ex = ProcessPoolExecutor(2)\n"
                 " print(ex.submit(inc, 1).result(), flush=True)\n ex.shutdown()\n")
    shutdown_kwargs = {"wait": True, "cancel_futures": True}

    def start(self) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.ex = ProcessPoolExecutor(WORKERS)


class MpPool(System):
    """multiprocessing.Pool(2): apply_async for single tasks, map for bulk."""

    name = "multiprocessing.Pool"
    cold_code = ("import multiprocessing\nfrom benchmarks.workloads import inc\n"
                 "if __name__ == '__main__':\n pool = multiprocessing.Pool(2)\n"
                 " print(pool.apply_async(inc, (1,)).get(), flush=True)\n pool.close()\n pool.join()\n")

    def __init__(self) -> None:
        self.pool: Any = None

    def start(self) -> None:
        import multiprocessing

        self.pool = multiprocessing.Pool(WORKERS)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.apply_async(fn, args)

    def result(self, handle: Any) -> Any:
        return handle.get()

    def map(self, fn: Callable[..., Any], items: list[Any], chunksize: int) -> list[Any]:
        return list(self.pool.map(fn, items, chunksize=chunksize))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def chunked(items: Iterable[Any], size: int) -> list[list[Any]]:
    items = list(items)
    return [items[i:i + size] for i in range(0, len(items), size)]


def _zmq() -> System:
    from .zmq_reference import ZmqReference

    return ZmqReference(WORKERS)


def _zmq_broker() -> System:
    from .zmq_broker_reference import ZmqBrokerReference

    return ZmqBrokerReference(WORKERS)


def _peer(name: str) -> Callable[[], System]:
    def factory() -> System:
        from . import peers  # imports nothing heavy itself; each adapter imports its library

        system: System = getattr(peers, name)()
        return system

    return factory


#: name -> (factory, import needed to run it): the order is the table's order.
SYSTEMS: dict[str, tuple[Callable[[], System], str | None]] = {
    "taskcs-ipc": (TaskcsServer, "zmq"),
    "taskcs-direct": (TaskcsDirect, "zmq"),  # issue 10
    "taskcs-threads": (TaskcsThreads, None),
    "ProcessPoolExecutor": (ProcessPool, None),
    "multiprocessing.Pool": (MpPool, None),
    "loky": (_peer("Loky"), "loky"),
    "dask": (_peer("Dask"), "distributed"),
    "ray": (_peer("Ray"), "ray"),
    "zmq-reference": (_zmq, "zmq"),
    "zmq-broker-reference": (_zmq_broker, "zmq"),
}


def main(argv: list[str] | None = None) -> int:
    """Child entry point: run one workload on one system and print its samples as JSON."""
    from . import measure

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("workload", choices=sorted(measure.WORKLOADS))
    parser.add_argument("--mode", choices=sorted(measure.MODES), default="full")
    parser.add_argument("--n", type=int, default=None, help="task count (scale workload)")
    parser.add_argument("--json", action="store_true", help="print the @@RESULT line")
    args = parser.parse_args(argv)
    factory, _ = SYSTEMS[args.system]
    started = time.perf_counter()
    try:
        data = measure.WORKLOADS[args.workload](factory, measure.MODES[args.mode], args.n)
        out: dict[str, Any] = {"ok": True, "metrics": data}
    except Exception as exc:
        traceback.print_exc()
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}".strip()[:300]}
    out["elapsed_s"] = round(time.perf_counter() - started, 3)
    text = json.dumps(out)
    print(RESULT_PREFIX + text if args.json else text, flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
