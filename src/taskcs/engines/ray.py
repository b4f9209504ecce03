"""Ray as an engine: ``ray://head:10001`` (Ray Client), ``ray-auto`` (a server on a node of a
running cluster) or ``ray-local`` (``ray.init()`` on this machine, owned by the server).

Every engine task is ``taskcs.engines.runner.run_batch`` as a Ray remote function, with the
tasks as bytes. Ray re-runs a task whose worker process died up to ``max_retries`` times:
the task's own ``retries`` (the fewest of the tasks batched into one Ray task). Ray is
process-wide: one Ray engine per server process.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from .base import DoneCallback, Engine, EngineError, EngineLost
from .runner import environment, run_batch

log = logging.getLogger(__name__)

#: Ray's re-runs of a task whose worker died, unless its own retries say otherwise.
MAX_RETRIES = 1
#: CPUs of a ``ray-local`` cluster: one per core of a small machine.
LOCAL_CPUS = 2


def _find() -> None:
    if importlib.util.find_spec("ray") is None:
        _import()  # raises the message naming the extra


def _import() -> Any:
    try:
        import ray
    except ImportError:
        raise EngineError("the Ray engine needs its extra: pip install 'taskcs[ray]'") from None
    return ray


class RayEngine(Engine):
    """See the module docstring."""

    kind = "ray"

    def __init__(self, spec: str) -> None:
        _find()
        self.spec = spec
        if spec == "ray-local":
            self.address = "local"
        elif spec == "ray-auto":
            self.address = "auto"
        else:
            if not spec.startswith("ray://") or ":" not in spec[len("ray://"):]:
                raise EngineError(f"--engine {spec!r}: expected ray://HOST:PORT (the head's Ray Client port)")
            self.address = spec
        self._remote: Any = None
        self._env: Any = None
        self._refs: dict[str, Any] = {}
        self._cancelling: set[str] = set()
        self._connected = False

    def check_installed(self) -> None:
        """See :meth:`Engine.check_installed`."""
        _import()

    def connect(self, timeout: float) -> None:
        """See :meth:`Engine.connect`."""
        ray = _import()
        try:
            if self.spec == "ray-local":
                # No dashboard (it would bind a port); loopback; the server's log stays about taskcs.
                ray.init(num_cpus=LOCAL_CPUS, include_dashboard=False, log_to_driver=False,
                         configure_logging=False, _node_ip_address="127.0.0.1")
            else:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        except Exception as exc:
            self.close()
            raise EngineError(f"cannot reach the Ray cluster at {self.address}: {exc}") from None
        self._connected = True
        self._remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(run_batch)
        self._env = ray.remote(num_cpus=0)(environment)

    def environments(self) -> dict[str, Any]:
        """See :meth:`Engine.environments`: one run per alive node, pinned to it."""
        ray = _import()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = {n["NodeID"][:12]: self._env.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote() for n in nodes}
        out: dict[str, Any] = {}
        for node, ref in refs.items():
            try:
                out[node] = ray.get(ref, timeout=60)
            except Exception as exc:
                out[node] = exc
        return out

    def slots(self) -> dict[str, int]:
        """See :meth:`Engine.slots`: CPUs per alive node."""
        ray = _import()
        return {n["NodeID"][:12]: int(n.get("Resources", {}).get("CPU", 0))
                for n in ray.nodes() if n.get("Alive")}

    def alive(self) -> bool:
        """See :meth:`Engine.alive`."""
        ray = _import()
        return self._connected and bool(ray.is_initialized())

    def submit(self, key: str, entries: list[tuple[int, str, bytes, str]], blobs: dict[str, bytes],
               retries: int, done: DoneCallback) -> None:
        """See :meth:`Engine.submit`: ``retries`` becomes Ray's ``max_retries``."""
        ray = _import()
        ref = self._remote.options(max_retries=max(0, retries)).remote(entries, blobs)
        self._refs[key] = ref

        def finished(fut: Any) -> None:
            self._refs.pop(key, None)
            try:
                done(key, fut.result())
            except BaseException as exc:
                if key in self._cancelling:
                    self._cancelling.discard(key)
                    done(key, exc)
                elif isinstance(exc, (ray.exceptions.RaySystemError, ray.exceptions.ObjectLostError)):
                    done(key, EngineLost(f"the Ray cluster at {self.address} dropped the task: {exc}"))
                else:  # WorkerCrashedError past max_retries, a task that could not be unpickled, ...
                    done(key, exc)

        ref.future().add_done_callback(finished)

    def cancel(self, key: str) -> None:
        """See :meth:`Engine.cancel`."""
        ray = _import()
        ref = self._refs.pop(key, None)
        if ref is not None:
            self._cancelling.add(key)
            try:
                ray.cancel(ref)
            except Exception as exc:
                log.debug("ray.cancel: %s", exc)

    def close(self) -> None:
        """See :meth:`Engine.close`."""
        self._refs.clear()
        self._cancelling.clear()
        if self._connected:
            self._connected = False
            try:
                _import().shutdown()
            except Exception as exc:
                log.debug("ray.shutdown: %s", exc)
