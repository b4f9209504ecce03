"""What an engine worker runs: taskcs's own functions, never a user function by reference.

A cluster engine (Dask, Ray) unpickles the function it is given by reference, so it only
ever receives the module-level functions of this module, which every worker with taskcs
installed can import. The user's task travels as bytes inside the arguments (its function
reference, its encoded inputs and any code blob), exactly as to an executor process::

    EngineLink --engine task: run_batch(entries, blobs)--> worker
        Resolver + run_task per entry (stdout captured per task, per thread)
    EngineLink <--(where, [(gid, status, payload, µs)], [(gid, text)])-- worker

Nothing here may import an engine at module level: a worker imports this module once and
the same code serves every engine.
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import sys
import threading
from typing import Any

from ..executor.runner import Resolver, ResultEntry, TaskEntry, run_task

#: What run_batch returns: (where it ran, results, output) with output as (gid, text).
BatchOutcome = tuple[str, list[ResultEntry], list[tuple[int, str]]]

_local = threading.local()
_resolver_lock = threading.Lock()
_resolver: Resolver | None = None
#: Each batch holds the code blobs it brought while it runs (Resolver holders), then lets them
#: go: every batch carries the blobs its tasks need, so a long-lived worker keeps none after
#: its batches (new code per task would otherwise grow it for good); a worker resolves a
#: function by value again per batch (~50 us, a batch is ~20 ms of work).
_batches = itertools.count(1)


class _PerThreadStdout(io.TextIOBase):
    """sys.stdout of a worker process: text printed by a task goes to that task's buffer.

    Per thread, because an engine worker may run several tasks at once in threads; text
    printed outside a task (the engine's own) goes to the worker's real stdout.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        parts = getattr(_local, "parts", None)
        if parts is None:
            self.inner.write(text)  # Ray's own stdout returns None, not a count
            return len(text)
        parts.append(text)
        return len(text)

    def flush(self) -> None:
        if getattr(_local, "parts", None) is None:
            self.inner.flush()

    def writable(self) -> bool:
        return True


def _install_capture() -> Resolver:
    global _resolver
    with _resolver_lock:
        if not isinstance(sys.stdout, _PerThreadStdout):
            sys.stdout = _PerThreadStdout(sys.stdout)
        if _resolver is None:
            _resolver = Resolver(where())
        return _resolver


def where() -> str:
    """The name of the engine worker this runs on, for ``future.executor`` and lanes."""
    if "distributed" in sys.modules:
        try:
            from distributed import get_worker

            return f"worker-{get_worker().address}"
        except Exception:  # not inside a Dask worker
            pass
    if "ray" in sys.modules:
        try:
            import ray

            if ray.is_initialized():
                return f"ray-node-{ray.get_runtime_context().get_node_id()[:8]}-pid{os.getpid()}"
        except Exception:
            pass
    return f"{socket.gethostname()}:{os.getpid()}"


def run_batch(entries: list[TaskEntry], blobs: dict[str, bytes]) -> BatchOutcome:
    """Run a batch of taskcs tasks in order on this worker; never raises for a task's failure."""
    resolver = _install_capture()
    holder = 0
    if blobs:
        with _resolver_lock:  # batches may run in threads of one worker
            holder = -next(_batches)  # negative: never a lease id
            resolver.add_blobs(blobs, holder)
    results: list[ResultEntry] = []
    output: list[tuple[int, str]] = []
    parts: list[str] = []
    _local.parts = parts
    try:
        for entry in entries:
            results.append(run_task(resolver, entry))
            if parts:
                output.append((entry[0], "".join(parts)))
                parts.clear()
    finally:
        _local.parts = None
        if holder:
            with _resolver_lock:
                resolver.drop_holder(holder)
    return where(), results, output


def environment() -> dict[str, str]:
    """Versions that must match between a server and the engine's workers."""
    import dill

    import taskcs

    return {
        "taskcs": taskcs.__version__,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "dill": str(dill.__version__),
    }
