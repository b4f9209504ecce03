"""The joblib backend "taskcs": ``joblib.Parallel`` (and scikit-learn's ``n_jobs``) on a server.

    import joblib, taskcs.joblib                      # importing registers the backend
    with joblib.parallel_config(backend="taskcs", n_jobs=-1):      # the local server
        GridSearchCV(SVC(), grid, cv=5).fit(X, y)
    with joblib.parallel_config(backend="taskcs", address="tcp://host:7700"):
        ...

Data flow::

    Parallel --BatchedCalls--> TaskcsBackend.submit --> Client.submit(Calls(f), [args, ...], nested)
        ^                                    |          (one function f, no keywords: most calls)
        |                                    +--------> Client.submit(run_batch, batch)  (others)
        |                                                     | (one task per batch)
        +--callback (client's I/O thread) <-- TaskFuture <----+ results / remote exception

* ``n_jobs=-1`` is the server's capacity: the slots of its executors (``STATUS``), so joblib
  slices the work for the whole server, not for this machine's cores.
* Batching is joblib's own automatic batching (batches of 0.2-2 s of work, as for loky).
* A batch is data, never code of its own: the server stores code blobs by digest, and a blob
  per batch would grow without end. A batch of calls to one plain function ``f`` is the
  arguments of the task ``Calls(f)``, whose code blob (``f``) goes once per connection; any
  other batch is the argument of :func:`run_batch`, and the client sends the user's functions
  and classes inside it once per connection too (see :mod:`taskcs.runtime.coderef`).
* An exception in one call aborts the rest: every outstanding task of this Parallel call is
  cancelled (queued and prefetched ones never run, running ones are interrupted) and joblib
  re-raises the task's exception, whose ``__cause__`` is the remote traceback.
* ``n_jobs=1`` runs sequentially here, as joblib's other process backends do.

One :class:`~taskcs.Client` per address is shared by every Parallel call of the process (a
connection costs milliseconds, a Parallel call may take less); it closes at interpreter exit.
"""

from __future__ import annotations

import logging
import os
import threading
import types
from typing import Any

from joblib import register_parallel_backend
from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    SequentialBackend,
)
from joblib.parallel import BatchedCalls

log = logging.getLogger(__name__)

__all__ = ["Calls", "TaskcsBackend", "run_batch"]

#: Most calls in one batch (joblib's auto-batching may ask for fewer, never more here).
#: joblib grows a batch of trivial calls until it runs 0.2 s, a size made for loky's
#: milliseconds per batch; with 2 workers it reaches ~1,300 calls, and joblib then holds
#: batch size x n_jobs of the user's ``(f, args, kwargs)`` calls alive until each batch is
#: sent. Held that long they outlive two young collections and reach the oldest generation,
#: whose full collections then scan the whole heap: in a process that has imported
#: scikit-learn, 2-3 of them per 100,000 calls cost 100-160 ms of a ~300 ms run
#: (benchmarks/JOBLIB.md). At 256 the calls die young: no full collection in the run, and
#: 440 batches instead of 78 cost less than one did (a batch costs the caller ~50 us here).
MAX_BATCH_CALLS = 256

_clients: dict[str | None, Any] = {}
_clients_lock = threading.Lock()


def run_batch(batch: Any) -> Any:
    """The task every batch runs as: call joblib's ``BatchedCalls``."""
    return batch()


#: Functions whose code blob holds no state of its own: a bound method or a callable object in a
#: Calls would make its instance a code blob, kept by the server for good (see run_batch).
_PLAIN = (types.FunctionType, types.BuiltinFunctionType)


class Calls:
    """The task of every batch whose calls all have function ``fn`` and no keyword arguments:
    what ``BatchedCalls.__call__`` does, from the calls' positional arguments.

    It is the task's *function*, so ``fn`` travels in its code blob, once per connection (and
    is resolved once per executor); a batch is then plain data, which the C pickler takes on
    the fast path, with no by-value pass over it.
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, calls: list[tuple[Any, ...]], nested: tuple[Any, Any]) -> list[Any]:
        from joblib import parallel_config

        fn = self.fn
        with parallel_config(backend=nested[0], n_jobs=nested[1]):
            return [fn(*args) for args in calls]


def _client(address: str | None) -> Any:
    """The shared client for ``address`` (None: the local server, started if needed)."""
    with _clients_lock:
        client = _clients.get(address)
        if client is None or client._closed or client._broken is not None:
            from .client.client import Client

            client = _clients[address] = Client(address, foreground=None, name=f"joblib-{os.getpid()}")
        return client


def _server_capacity(address: str | None) -> int:
    """Slots of the server's executors (not the clients' foreground executors)."""
    from .runtime import discovery
    from .runtime import protocol as p
    from .server.control import request

    try:
        info = request(discovery.resolve_address(address), p.StatusRequest(), timeout=5.0)
        slots = sum(int(ex.get("capacity", 1)) for ex in info.get("executors", []) if not ex.get("stdio"))
    except Exception as exc:  # an old or remote server that does not answer STATUS
        log.warning("cannot ask the taskcs server for its capacity (%s); assuming this machine's cores", exc)
        slots = 0
    return slots or (os.cpu_count() or 1)


class TaskcsBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib backend running each batch of calls as one taskcs task."""

    default_n_jobs = -1  # parallel_config(backend="taskcs") alone means the whole server
    supports_retrieve_callback = True
    supports_timeout = True
    supports_return_generator = True
    supports_sharedmem = False
    uses_threads = False
    # Batch durations: joblib's defaults (0.2-2 s, as loky). Shorter batches (50 ms) were
    # tried: joblib measures a batch from dispatch to result, queueing included, so they kept
    # GridSearchCV at one fit per task, and every task pays the hop through the server (a
    # process wake-up each way on a busy machine): slower by a few percent (benchmarks/JOBLIB.md).

    def compute_batch_size(self) -> int:
        """joblib's automatic batch size, at most :data:`MAX_BATCH_CALLS` calls."""
        size = int(super().compute_batch_size())
        if size > MAX_BATCH_CALLS:
            # Capped where joblib keeps it too, so the batches it times are those it sized.
            size = self._effective_batch_size = MAX_BATCH_CALLS
        return size

    def __init__(self, address: str | None = None, nesting_level: int | None = None,
                 inner_max_num_threads: int | None = None, **backend_kwargs: Any) -> None:
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads,
                         **backend_kwargs)
        self.address = address
        self._capacity: int | None = None
        self._futures: set[Any] = set()
        self._lock = threading.Lock()
        self._calls: dict[int, Calls] = {}  # id(fn) -> its batches' task function, per Parallel call

    def __reduce__(self) -> Any:
        # Never pickle a live client: a copy of this backend (in a batch) reconnects by address.
        return TaskcsBackend, (self.address, self.nesting_level, self.inner_max_num_threads)

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """``n_jobs`` < 0 counts from the server's capacity (-1: all of it)."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs < 0:
            if self._capacity is None:
                self._capacity = _server_capacity(self.address)
            return max(self._capacity + 1 + n_jobs, 1)
        return int(n_jobs)

    def configure(self, n_jobs: int | None = 1, parallel: Any = None, prefer: str | None = None,
                  require: str | None = None, **backend_kwargs: Any) -> int:
        """Connect (once per process and address) and return the number of workers."""
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        self.parallel = parallel
        self._client_obj = _client(self.address)
        return n_jobs

    def submit(self, func: Any, callback: Any = None) -> Any:
        """Run the batch ``func`` as one task; ``callback`` runs when it completes."""
        items: list[Any] = getattr(func, "items", None) or []
        fn = items[0][0] if items else None
        calls = [args for f, args, kwargs in items if f is fn and not kwargs] if items else []
        if calls and len(calls) == len(items) and type(func) is BatchedCalls and type(fn) in _PLAIN:
            # One function, no keywords (Parallel over delayed(f)(x), the common case): send
            # f once and the arguments as a list, not a (f, args, {}) triple per call: a third
            # of the pickling, here and on the executor (benchmarks/JOBLIB.md).
            calls_of = self._calls.get(id(fn))
            if calls_of is None or calls_of.fn is not fn:
                # One per function for the Parallel call: the client then finds its code blob
                # by identity, instead of pickling the function again for every batch.
                calls_of = self._calls[id(fn)] = Calls(fn)
            future = self._client_obj.submit(calls_of, calls, (func._backend, func._n_jobs))
        else:
            # The client finds the user's functions and classes in the batch and sends their
            # code once per connection (see taskcs.runtime.coderef), not inside every batch.
            future = self._client_obj.submit(run_batch, func)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._discard)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def _discard(self, future: Any) -> None:
        with self._lock:
            self._futures.discard(future)

    def retrieve_result_callback(self, future: Any) -> Any:
        """The batch's results; re-raises the task's exception (remote traceback as cause)."""
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """Stop every outstanding task of this backend: queued and prefetched ones never run,
        running ones are interrupted on their executors (a forced cancel, as #9 built)."""
        with self._lock:
            futures, self._futures = self._futures, set()
        for future in futures:
            if not future.done():
                self._client_obj.cancel(future, force=True)

    # ---- issue 13 (part 2): a Parallel inside a task runs on the task's own server
    def get_nested_backend(self) -> Any:
        """The backend of a Parallel inside one of our tasks: taskcs again (joblib's default
        is threads), on the server the task runs under (address None: the executor exports
        it), as a nested client whose process runs its calls while the task waits."""
        return TaskcsBackend(None, nesting_level=(self.nesting_level or 0) + 1), None
    # ---- end issue 13 (part 2)

    def terminate(self) -> None:
        """End of a Parallel call: forget its tasks and batch statistics; keep the client."""
        with self._lock:
            self._futures = set()
        self._calls = {}  # holds the user's functions: only for the Parallel call that used them
        self.reset_batch_stats()


register_parallel_backend("taskcs", TaskcsBackend)
