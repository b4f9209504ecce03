"""Cluster engines (Dask, Ray) as one more place a cs-server sends work.

    cs-server start --engine dask://scheduler-host:8786   an existing Dask scheduler
    cs-server start --engine dask-local                   a LocalCluster the server owns
    cs-server start --engine ray://head-host:10001        an existing Ray cluster (Ray Client)
    cs-server start --engine ray-auto                     a server on a node of a Ray cluster
    cs-server start --engine ray-local                    ray.init() on this machine, owned

The engine is attached as a pseudo peer server (:mod:`taskcs.engines.link`), so the
federation rules apply: local executors first, IOTasks never leave the client. Engines run
only :func:`taskcs.engines.runner.run_batch`, with the tasks as bytes.
"""

from __future__ import annotations

from typing import Any

from .base import Engine, EngineError, EngineLost, EngineRefused, EngineUnavailable, version_problem

__all__ = ["SPECS", "Engine", "EngineError", "EngineLost", "EngineRefused", "EngineUnavailable", "make_engine",
           "preflight"]

SPECS = "dask://HOST:PORT, dask-local, ray://HOST:PORT, ray-auto or ray-local"


def make_engine(spec: str | Any) -> Engine:
    """The engine for a ``--engine`` spec, or for a ``distributed.Client`` object.

    Raises EngineError (one line for a person) for a wrong scheme or a missing extra.
    """
    if isinstance(spec, Engine):
        return spec
    if not isinstance(spec, str):
        if type(spec).__module__.startswith("distributed"):
            from .dask import DaskEngine

            return DaskEngine(client=spec)
        raise EngineError(f"engine {spec!r}: expected a spec ({SPECS}) or a distributed.Client")
    if spec == "dask-local":
        from .dask import DaskEngine

        return DaskEngine(None)
    if spec.startswith("dask://"):
        rest = spec[len("dask://"):]
        host, _, port = rest.rpartition(":")
        if not host or not port.isdigit():
            raise EngineError(f"--engine {spec!r}: expected dask://HOST:PORT (the scheduler's address)")
        from .dask import DaskEngine

        return DaskEngine(f"tcp://{rest}")
    if spec in ("ray-local", "ray-auto") or spec.startswith("ray://"):
        try:
            from .ray import RayEngine
        except ImportError as exc:  # this build has no Ray support
            raise EngineError(f"--engine {spec!r}: Ray engines are not available in this build ({exc})") from None
        return RayEngine(spec)
    raise EngineError(f"--engine {spec!r}: unknown engine; expected {SPECS}")


def preflight(spec: str | Any, timeout: float = 5.0) -> Engine:
    """Check a spec before a server starts: parse it, import its extra and, for an existing
    cluster, connect once and compare versions. Raises EngineError with one clear line."""
    engine = make_engine(spec)
    engine.check_installed()
    if engine.address in ("local", ""):
        return engine  # an owned cluster starts with the server; nothing to reach yet
    try:
        engine.connect(timeout)
        problem = version_problem(engine, engine.environments())
    finally:
        engine.close()
    if problem is not None:
        raise EngineRefused(problem)
    return engine
