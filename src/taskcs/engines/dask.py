"""Dask distributed as an engine: an existing scheduler (``dask://host:8786``), a
``distributed.Client`` the caller already holds, or a LocalCluster this server owns
(``dask-local``).

Every engine task is ``taskcs.engines.runner.run_batch`` with the tasks as bytes. Dask
re-runs a task whose worker died (up to ``distributed.scheduler.allowed-failures``, 3 by
default, then ``KilledWorker``), whatever the task's ``retries``: a task on Dask may run
more than once on worker loss, and still gets exactly one result here.
"""

from __future__ import annotations

import importlib.util
import logging
from concurrent.futures import CancelledError
from typing import Any

from .base import DoneCallback, Engine, EngineError, EngineLost
from .runner import environment, run_batch

log = logging.getLogger(__name__)

#: Workers and threads of a ``dask-local`` cluster: one single-threaded process per core
#: of a small machine, so captured output and CPU-bound tasks behave as on executors.
LOCAL_WORKERS = 2


def _find() -> None:
    if importlib.util.find_spec("distributed") is None:
        _import()  # raises the message naming the extra


def _import() -> Any:
    try:
        import distributed
    except ImportError:
        raise EngineError("the Dask engine needs its extra: pip install 'taskcs[dask]'") from None
    return distributed


class DaskEngine(Engine):
    """See the module docstring; ``address`` None means a LocalCluster of our own."""

    kind = "dask"

    def __init__(self, address: str | None = None, client: Any = None, workers: int = LOCAL_WORKERS) -> None:
        _find()
        self._given = client
        self._target = address
        self.workers = workers
        if client is not None:
            self.address = str(client.scheduler.address)
        else:
            self.address = address or "local"
        self.client: Any = None
        self.cluster: Any = None
        self._futures: dict[str, Any] = {}
        self._cancelling: set[str] = set()

    def check_installed(self) -> None:
        """See :meth:`Engine.check_installed`."""
        _import()

    def connect(self, timeout: float) -> None:
        """See :meth:`Engine.connect`."""
        distributed = _import()
        # Dask logs every worker and client event at INFO: keep the server's log about taskcs.
        logging.getLogger("distributed").setLevel(logging.WARNING)
        if self._given is not None:
            self.client = self._given
            return
        try:
            if self._target is None:
                # No dashboard: it would bind 0.0.0.0:8787. Loopback only, silenced logs.
                self.cluster = distributed.LocalCluster(
                    n_workers=self.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                    dashboard_address=None, silence_logs=logging.ERROR,
                )
                self.address = str(self.cluster.scheduler_address)
                self.client = distributed.Client(self.cluster, set_as_default=False)
            else:
                self.client = distributed.Client(self._target, timeout=timeout, set_as_default=False)
        except Exception as exc:
            self.close()
            raise EngineError(f"cannot reach the Dask scheduler at {self.address}: {exc}") from None

    def environments(self) -> dict[str, Any]:
        """See :meth:`Engine.environments`."""
        out: dict[str, Any] = self.client.run(environment, on_error="return")
        return out

    def slots(self) -> dict[str, int]:
        """See :meth:`Engine.slots`."""
        return {str(k): int(v) for k, v in self.client.nthreads().items()}

    def alive(self) -> bool:
        """See :meth:`Engine.alive`."""
        return self.client is not None and self.client.status == "running"

    def submit(self, key: str, entries: list[tuple[int, str, bytes, str]], blobs: dict[str, bytes],
               retries: int, done: DoneCallback) -> None:
        """See :meth:`Engine.submit`; Dask has no per-task knob for worker loss (its
        ``retries`` are for exceptions), so ``retries`` is not used: see the module docstring."""
        future = self.client.submit(run_batch, entries, blobs, key=key, pure=False)
        self._futures[key] = future

        def finished(fut: Any) -> None:
            self._futures.pop(key, None)
            try:
                done(key, fut.result())
            except CancelledError as exc:
                if key in self._cancelling:
                    self._cancelling.discard(key)
                    done(key, exc)
                else:  # Dask cancels every future when its scheduler connection is lost
                    done(key, EngineLost(f"the Dask scheduler at {self.address} dropped the task: {exc}"))
            except BaseException as exc:  # KilledWorker, the task could not be unpickled, ...
                done(key, exc)

        future.add_done_callback(finished)

    def cancel(self, key: str) -> None:
        """See :meth:`Engine.cancel`."""
        future = self._futures.pop(key, None)
        if future is not None:
            self._cancelling.add(key)
            future.cancel()

    def close(self) -> None:
        """See :meth:`Engine.close`."""
        self._futures.clear()
        self._cancelling.clear()
        client, self.client = self.client, None
        if client is not None and client is not self._given:
            try:
                client.close(timeout=5)
            except Exception as exc:
                log.debug("closing the Dask client: %s", exc)
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            try:
                cluster.close(timeout=10)
            except Exception as exc:
                log.debug("closing the LocalCluster: %s", exc)
