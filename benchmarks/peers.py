"""Adapters for the third-party peers: loky, Dask distributed and Ray.

Each imports its library only when started, so this module imports without them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

from . import procs
from .systems import WORKERS, ExecutorSystem, System, chunked
from .workloads import inc_chunk


class Loky(ExecutorSystem):
    """loky.get_reusable_executor(max_workers=2)."""

    name = "loky"
    cold_code = ("from loky import get_reusable_executor\nfrom benchmarks.workloads import inc\n"
                 "ex = get_reusable_executor(max_workers=2)\nprint(ex.submit(inc, 1).result(), flush=True)\n"
                 "ex.shutdown(wait=True)\n")
    shutdown_kwargs = {"wait": True, "kill_workers": True}

    def start(self) -> None:
        from loky import get_reusable_executor

        # A generous idle timeout: the default (300 s) could retire workers mid-benchmark.
        self.ex = get_reusable_executor(max_workers=WORKERS, timeout=3600)


class Dask(System):
    """Dask distributed: LocalCluster(n_workers=2, threads_per_worker=1, processes=True).

    The scheduler runs in this (the client's) process, so it has no server pid of its own.
    ``map`` sends chunks (client.map over ``inc_chunk``): one Dask task per item would
    measure the scheduler's per-task cost twice over and is covered by ``submit``.
    """

    name = "dask"
    cold_code = ("from dask.distributed import Client, LocalCluster\nfrom benchmarks.workloads import inc\n"
                 "if __name__ == '__main__':\n"
                 " cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,"
                 " dashboard_address=None)\n"
                 " client = Client(cluster)\n print(client.submit(inc, 1).result(), flush=True)\n"
                 " client.close()\n cluster.close()\n")

    def __init__(self) -> None:
        self.cluster: Any = None
        self.client: Any = None

    def start(self) -> None:
        import logging

        from dask.distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.ERROR)
        self.cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                                    dashboard_address=None)
        self.client = Client(self.cluster)
        self.client.wait_for_workers(WORKERS)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.client.submit(fn, *args, pure=False)  # pure=True would dedupe equal calls

    def gather(self, handles: list[Any]) -> list[Any]:
        return list(self.client.gather(handles))

    def map(self, fn: Callable[..., Any], items: list[Any], chunksize: int) -> list[Any]:
        chunks = chunked(items, chunksize)
        futures = self.client.map(functools.partial(inc_chunk, fn), chunks, pure=False)
        return [x for chunk in self.client.gather(futures) for x in chunk]

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


class Ray(System):
    """Ray: ray.init(num_cpus=2); remote functions, ray.get; ``map`` sends chunks."""

    name = "ray"
    cold_code = ("import ray\nfrom benchmarks.workloads import inc\n"
                 "ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)\n"
                 "print(ray.get(ray.remote(inc).remote(1)), flush=True)\nray.shutdown()\n")

    def __init__(self) -> None:
        self.ray: Any = None
        self._remote: dict[Any, Any] = {}

    def start(self) -> None:
        import ray

        self.ray = ray
        ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)

    def _fn(self, fn: Callable[..., Any]) -> Any:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self.ray.remote(fn)
        return remote

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._fn(fn).remote(*args)

    def result(self, handle: Any) -> Any:
        return self.ray.get(handle)

    def gather(self, handles: list[Any]) -> list[Any]:
        return list(self.ray.get(handles))

    def map(self, fn: Callable[..., Any], items: list[Any], chunksize: int) -> list[Any]:
        remote = self._fn(inc_chunk)
        refs = [remote.remote(fn, chunk) for chunk in chunked(items, chunksize)]
        return [x for chunk in self.ray.get(refs) for x in chunk]

    def server_pid(self) -> int | None:
        return procs.find_descendant(os.getpid(), "raylet")

    def close(self) -> None:
        if self.ray is not None:
            self.ray.shutdown()
