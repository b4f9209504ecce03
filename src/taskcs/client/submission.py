"""Building tasks: the submission fast path, its per-callable caches, the outbox.

Data flow::

    submit(fn, *args) --_fast hit--> pickle args --> TaskFuture + outbox entry --wake--> I/O
                      --miss------> _submit -> _prepare (name, arity, IO flag, codec)
                                           -> _remember_fast (next call of fn hits)
    submit_set(tasks) --> every task prepared first (a bad one rejects the set) --> outbox
    map(fn, it, chunksize) --> chunks of items --> the standard task map_chunk, pickled once
                           --every SEND_EVERY chunks--> Pump._send_now (one I/O turn here)

Nothing here touches the connection (map asks :mod:`taskcs.client.pump` for a turn): the
outbox (a deque) is drained by whoever does the client's I/O, in credit-sized SUBMIT batches
(:mod:`taskcs.client.wire`). The caches hold callables weakly (:mod:`taskcs.client.callcache`):
a client keeps no user object alive.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import pickle
import time
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import BrokenError, ClosedError, SubmissionError
from ..executor.nesting import current_parent, task_epoch  # issue 13
from ..executor.runner import _BYTES_TYPES, LARGE_BYTES, dumps_large
from ..runtime import codec
from ..runtime.nesting import flags_with_parent  # issue 13
from ..runtime.task import DEFAULT_RETRIES, FLAG_IO, Task
from ..runtime.transport import Connection
from ..stdlib_tasks import REGISTRY, is_io
from .callcache import CallableCache
from .recovery import Item
from .taskset import TaskFuture, TaskSet

_pickle_dumps = pickle.dumps
#: Client.map hands what it has submitted to the executors after each SEND_EVERY chunks,
#: so they start while the rest are pickled, not once the last one is (issue 10; 100 chunks
#: of 1,000 ints, 2 leased executors, 2 cores: 11.0 -> 10.2 ms a map, medians of 6 runs
#: alternated with no send; every 8 chunks was slower than none, every 32 no better than 16).
SEND_EVERY = 16
#: Subtasks of a nested client whose epoch is remembered (issue 13: see _prepare); past this
#: many the memory starts afresh, and a subtask then counts with the client's last epoch.
INLINE_EPOCHS_LIMIT = 4096
#: Argument types whose pickles name no global (issue 10: such a payload may stay in pieces).
_PLAIN = frozenset({bytes, bytearray, int, float, str, bool, type(None)})


class Submission(cf.Executor):
    """The part of :class:`~taskcs.client.client.Client` that turns calls into outbox entries.

    Mixed into Client, whose state it shares (declared here for the type checker).
    """

    _conn: Connection
    _futures: dict[int, TaskFuture]
    _outbox: deque[Item]
    _sets: dict[int, TaskSet]
    _ids: Iterator[int]
    _set_ids: Iterator[int]
    _sigs: CallableCache[tuple[Any, set[int]]]
    _fast: CallableCache[tuple[str, str, int, bytes | None, set[int]]]
    _fast_raw: dict[int, tuple[Callable[[], Any], tuple[str, str, int, bytes | None, set[int]]]]
    _waiting: bool
    _closed: bool
    _broken: BaseException | None
    _nested: bool  # issue 13: a client in a task, of the task's own server
    _parent_epoch: int  # issue 13: executor.nesting.task_epoch() at its last submission
    _inline_epochs: dict[tuple[str, int], int]  # issue 13: the same per subtask (ref, hash(payload))
    _dsock: Any  # issue 10: the direct path's socket, once leases were asked for
    name: str

    if TYPE_CHECKING:  # what a TaskFuture's owner provides (taskcs.client.wire, .pump)
        def _request_cancel(self, task_id: int) -> None: ...

        def _cancel(self, fut: TaskFuture) -> bool: ...

        def _send_now(self) -> None: ...

        def _pump_until(self, fut: TaskFuture, timeout: float | None,
                        until: Callable[[], bool] | None = None) -> float | None: ...

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Schedule ``fn(*args, **kwargs)``; ``fn`` may be a callable or a standard task name."""
        # Fast path for a function already seen with this many positional arguments: one
        # cache lookup replaces name resolution, arity check and IO detection (~2x faster).
        entry = self._fast_raw.get(id(fn))  # CallableCache.get, inlined
        if (entry is None or entry[0]() is not fn or kwargs or len(args) not in entry[1][4]
                or self._closed or self._broken):
            return self._submit(0, fn, args, kwargs, None, None, None)
        label, ref, flags, blob, _ = entry[1]
        # issue #13: the C pickler, unless the bytes name __main__ or a user module (by value
        # then, the code inside as blobs bundled with the function: a new ref and blob)
        try:
            for arg in args:  # issue 10: a big bytes argument is pickled without copies
                if type(arg) in _BYTES_TYPES and len(arg) >= LARGE_BYTES:
                    # Plain data only (no global can be inside): left in pieces when it may
                    # go on a lease's stream link (protocol.Scattered), joined otherwise.
                    if self._dsock is not None and not flags & FLAG_IO and all(type(a) in _PLAIN for a in args):
                        payload = dumps_large(args, scatter=True)
                        break
                    payload = dumps_large(args)
                    break
            else:
                payload = _pickle_dumps(args, codec.PICKLE_PROTOCOL)
            if type(payload) is bytes and 0x93 in payload and codec.names_user_objects(payload, args):
                ref, payload, blob = codec.encode_task(label, ref, blob, args, kwargs, by_value=True)
        except Exception:
            ref, payload, blob = codec.encode_task(label, ref, blob, args, kwargs)
        task_id = next(self._ids)
        fut = TaskFuture(task_id, label, self)
        self._futures[task_id] = fut
        self._outbox.append((0, (task_id, ref, payload, flags, DEFAULT_RETRIES), blob))
        if self._waiting:
            self._waiting = False
            self._conn.wake()
        return fut

    def submit_task(self, task: Task) -> TaskFuture:
        """Schedule a :class:`~taskcs.Task` (to set ``io``, ``retries`` or ``name``)."""
        return self._submit(0, task.fn, task.args, task.kwargs, task.io, task.retries, task.name)

    def submit_set(self, tasks: Iterable[Task | tuple[Any, ...]]) -> TaskSet:
        """Submit a task set: all tasks are validated first, so a bad one rejects the whole set
        with a :class:`SubmissionError` naming it, and nothing is sent."""
        set_id = next(self._set_ids)
        prepared = [self._prepare(t if isinstance(t, Task) else Task(t[0], tuple(t[1:]))) for t in tasks]
        futures = [self._enqueue(set_id, *item) for item in prepared]
        ts = TaskSet(set_id, futures)
        self._sets[set_id] = ts
        self._outbox.append((set_id, None, None))  # close the set after its tasks
        self._kick()
        return ts

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1
    ) -> Iterator[Any]:
        """Like :meth:`concurrent.futures.Executor.map`; ``chunksize`` > 1 sends items in chunks."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        ref, blob = codec.function_ref(fn)
        fn_arg: Any = blob
        if blob is None:  # by reference: a task name or "module:function" becomes the function
            fn_arg = REGISTRY[ref[4:]] if ref.startswith("std:") else codec.resolve_import(*ref[4:].split(":", 1))
        # One iterable (the common case) travels as plain items, not 1-tuples: less to pickle.
        star = len(iterables) != 1
        end = None if timeout is None else time.monotonic() + timeout
        chunks = _chunks(zip(*iterables, strict=False) if star else iterables[0], chunksize)
        futures = self._submit_chunks(fn_arg, chunks, star)
        return itertools.chain.from_iterable(_in_order(futures, end))

    # ---- issue 10: map ------------------------------------------------------------------------
    def _submit_chunks(self, fn_arg: Any, chunks: Iterator[list[Any]], star: bool) -> list[TaskFuture]:
        """map's chunks as tasks of the standard task map_chunk: what submit() makes of each,
        less a second pickling. A function sent by value travels as its pickle, bytes that
        name its module, so submit()'s look for objects of the user's matched every chunk and
        had the C pickler confirm it: 11 of the ~34 us each chunk of 1,000 ints cost (with
        islice's 6 more, 3.4 of a map's 12 ms went before anything was sent). Those bytes are
        data (no object in them), so what is looked at here is what follows them: the items.
        Every SEND_EVERY chunks, what was submitted is sent (see there).
        """
        mapper = REGISTRY["map_chunk"]
        futures: list[TaskFuture] = []
        for n, chunk in enumerate(chunks):
            if n and n % SEND_EVERY == 0:
                self._send_now()
            args = (fn_arg, chunk, star)
            entry = self._fast_raw.get(id(mapper))  # submit()'s fast path, known after a first chunk
            if (entry is None or entry[0]() is not mapper or 3 not in entry[1][4] or self._closed
                    or self._broken or (type(fn_arg) is bytes and len(fn_arg) >= LARGE_BYTES)):
                futures.append(self.submit(mapper, *args))
                continue
            label, ref, flags, blob, _ = entry[1]
            try:
                payload = _pickle_dumps(args, codec.PICKLE_PROTOCOL)
            except Exception:
                futures.append(self.submit(mapper, *args))  # its fallbacks, or its error
                continue
            items = payload
            if type(fn_arg) is bytes and (at := payload.find(fn_arg)) >= 0:
                items = payload[at + len(fn_arg):]  # fn's pickle comes first: then the items
            if 0x93 in items and codec.names_user_objects(items, args):
                ref, payload, blob = codec.encode_task(label, ref, blob, args, {}, by_value=True)
            futures.append(self._enqueue(0, label, (ref, payload, flags, DEFAULT_RETRIES), blob))
            self._kick()
        return futures
    # ---- end issue 10: map --------------------------------------------------------------------


    def _submit(self, set_id: int, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                io: bool | None, retries: int | None, name: str | None) -> TaskFuture:
        item = self._prepare(Task(fn, args, kwargs, io, retries, name))
        fut = self._enqueue(set_id, *item)
        self._kick()
        return fut

    def _prepare(self, task: Task) -> tuple[str, tuple[str, bytes, int, int], bytes | None]:
        if self._broken is not None:
            raise BrokenError(f"client {self.name} lost its server: {self._broken}")
        if self._closed:
            raise ClosedError("cannot submit: this client was shut down")
        label = task.label()
        ref, blob = codec.function_ref(task.fn)
        fn = task.fn
        if ref.startswith("std:"):
            fn = REGISTRY[ref[4:]]
        elif isinstance(fn, str):
            fn = codec.resolve_import(*ref[4:].split(":", 1))
        if callable(fn):
            self._check_arity(label, fn, task.args, task.kwargs)
        io = is_io(fn) if task.io is None else task.io
        # issue #13: code inside the inputs makes the task's ref a bundle; the fast path keeps
        # the function's own ref and blob
        wire_ref, payload, wire_blob = codec.encode_task(label, ref, blob, task.args, task.kwargs)
        retries = DEFAULT_RETRIES if task.retries is None else task.retries
        flags = FLAG_IO if io else 0
        if self._nested:  # issue 13: a subtask names the task it runs for; never on the fast path
            flags = flags_with_parent(flags, current_parent())
            epoch = self._parent_epoch = task_epoch()  # see executor.nesting.run_inline
            # And per subtask: a client kept across tasks (joblib's, one per process) would
            # otherwise run a stale subtask of an ended task that reaches its foreground after
            # the next task's first submission. Keyed by (ref, hash of the payload), the key the
            # foreground sees too; nothing of the payload is kept.
            epochs = self._inline_epochs
            if len(epochs) >= INLINE_EPOCHS_LIMIT:
                epochs.clear()  # bounded: those then fall back to the client's last epoch
            epochs[(wire_ref, hash(payload))] = epoch
        elif task.io is None and task.retries is None and task.name is None and not task.kwargs:
            self._remember_fast(task.fn, label, ref, flags, blob, len(task.args))
        return label, (wire_ref, payload, flags, retries), wire_blob

    def _remember_fast(self, fn: Any, label: str, ref: str, flags: int, blob: bytes | None, nargs: int) -> None:
        fast = self._fast.get(fn)
        if fast is None:
            fast = (label, ref, flags, blob, set())
            if not self._fast.put(fn, fast):
                return  # takes no weak reference: it stays on the slow path
        fast[4].add(nargs)

    def _enqueue(self, set_id: int, label: str, wire: tuple[str, bytes, int, int], blob: bytes | None) -> TaskFuture:
        task_id = next(self._ids)
        fut = TaskFuture(task_id, label, self)
        self._futures[task_id] = fut
        self._outbox.append((set_id, (task_id, *wire), blob))
        return fut

    def _kick(self) -> None:
        if self._waiting:
            self._waiting = False
            self._conn.wake()

    def _check_arity(self, label: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Signature.bind costs microseconds: remember positional counts that bound fine, so a
        # stream of calls shaped alike (the common case) is checked by one set lookup.
        if type(fn) is types.MethodType:
            # A bound method is a new object at every ``obj.method``: check its function,
            # which lives as long as its class, with ``self`` in front.
            args = (fn.__self__, *args)
            fn = fn.__func__
        cached = self._sigs.get(fn)
        if cached is None:
            import inspect  # lazy: ~4 ms of start-up that a warm fast path never needs

            try:
                sig: Any = inspect.signature(fn)
            except (TypeError, ValueError):
                sig = None  # some builtins have no signature: let the executor judge
            cached = (sig, set())
            self._sigs.put(fn, cached)  # not cached if fn takes no weak reference
        if kwargs or len(args) not in cached[1]:
            if cached[0] is not None:
                try:
                    cached[0].bind(*args, **kwargs)
                except TypeError as exc:
                    raise SubmissionError(f"task {label}: wrong arguments: {exc}") from None
            if not kwargs:
                cached[1].add(len(args))


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    if type(items) is list:  # slices: 1.4 us a chunk of 1,000, where islice takes 7 (issue 10)
        for start in range(0, len(items), size):
            yield items[start:start + size]
        return
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _in_order(futures: list[TaskFuture], end: float | None) -> Iterator[Any]:
    """The results of ``futures`` in order, as concurrent.futures.Executor.map yields them: by
    ``end`` (a monotonic time) or TimeoutError; those not reached are cancelled on the way out."""
    futures.reverse()
    try:
        while futures:
            fut = futures.pop()
            try:
                yield fut.result(None if end is None else end - time.monotonic())
            finally:
                fut.cancel()
                del fut  # keep no reference to a failure's traceback
    finally:
        for fut in futures:
            fut.cancel()
