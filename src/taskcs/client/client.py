"""The taskcs client: a :class:`concurrent.futures.Executor` backed by a taskcs server.

Data flow::

    caller threads                      I/O thread (owns the connection)             server
    submit() -> _outbox (deque) --wake-->  SUBMIT batches, within the credit window  ---->
    fut.cancel() -> _cancels     --wake-->  CANCEL                                    ---->
                                           RESULTS -> decode -> future.set_result   <----
    foreground executor <- _fg_inbox   <-- TASKS (IOTasks: this client's terminal)   <----
    foreground executor -> _fg_results --wake--> EXEC_DONE                            ---->

    server dies (pidfd) -> ServerLoss._recover: a new server, in-flight tasks resubmitted
                           (taskcs.client.recovery)

Only the I/O thread touches the connection, so heartbeats keep flowing while the foreground
executor blocks on stdin. Credit (how many tasks may be outstanding on the server) comes
from WELCOME; submissions beyond it wait here, in the client's memory, not the server's.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import contextlib
import itertools
import logging
import os
import pickle
import queue
import sys
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import BrokenError, ClosedError, ServerStartError, SubmissionError
from ..executor.runner import Resolver, run_task
from ..runtime import codec
from ..runtime import protocol as p
from ..runtime.task import DEFAULT_RETRIES, FLAG_IO, Task
from ..runtime.transport import Connection
from ..stdlib_tasks import REGISTRY, is_io
from .callcache import CallableCache
from .recovery import (
    RECONNECT_TIMEOUT,
    DisconnectWatch,
    Item,
    ServerLoss,
    ServerWatch,
    await_welcome,
    complete,
    watch_server,
)
from .taskset import TaskFuture, TaskSet

log = logging.getLogger(__name__)

#: Most tasks in one SUBMIT: large enough to amortise a message, small enough that the
#: server interleaves other peers' messages between batches.
SUBMIT_BATCH = 2048
#: Seconds the I/O thread leaves the socket to callers after one pumped it (see _pump_until).
PUMP_PARK = 0.002
#: Longest future.cancel() waits for the server's answer (one round trip, normally < 1 ms).
CANCEL_ANSWER_SECONDS = 2.0
#: A pumping caller spins before blocking only with at most this many tasks outstanding.
SPIN_OUTSTANDING = 8
#: Digests of code blobs the server has, remembered so each goes once per connection; bounded
#: so a program that sends new code per task does not grow it without end.
SENT_BLOBS_LIMIT = 4096
_STOP = object()
_NUDGE = object()
_pickle_dumps = pickle.dumps


class Client(ServerLoss, cf.Executor):
    """Submit tasks to a taskcs server; every method returns standard futures.

    ``Client()`` finds the local server (starting one if none runs), ``Client(address)``
    connects to ``address`` without auto-start, and :meth:`in_process` runs executor threads
    in this process with no server at all (phase 2). ``foreground`` selects who runs this
    client's IOTasks: ``"thread"`` (a thread of this client, using this process's terminal),
    ``"caller"`` (your thread, inside :meth:`run_foreground`), or ``None`` (IOTasks fail).
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        connection: Connection | None = None,
        foreground: str | None = "thread",
        io_only: bool = True,
        name: str | None = None,
        forward_output: bool = True,
        on_output: Callable[[TaskFuture | None, str], None] | None = None,
        autostart: bool = True,
        connect_timeout: float = 10.0,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
    ) -> None:
        if foreground not in ("thread", "caller", None):
            raise ValueError("foreground must be 'thread', 'caller' or None")
        self._owned: list[Any] = []  # things closed with the client (in-process server, context)
        # How to reach a server again if this one dies (None: a connection given to us).
        self._reconnect_to: Callable[[], Connection] | None = None
        self._where = "the local server"
        self._reconnect_timeout = reconnect_timeout
        if connection is None:
            from ..runtime.discovery import connect_local

            named = address or os.environ.get("TASKCS_ADDRESS")
            self._where = named or "the local server"
            self._reconnect_to = lambda: connect_local(named, autostart=autostart and not named)
            connection = connect_local(address, autostart=autostart)
        self._conn = connection
        self.name = name or f"client-{os.getpid()}"
        #: Called with (future or None, text) for output forwarded from executors; replaceable.
        self.on_output = on_output or _print_output
        self._futures: dict[int, TaskFuture] = {}
        self._outbox: deque[Item] = deque()
        self._cancels: deque[int] = deque()
        self._fg_results: deque[tuple[int, tuple[int, int, bytes, int]]] = deque()  # (generation, result)
        self._fg_inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sets: dict[int, TaskSet] = {}
        self._ids = itertools.count(1)
        self._set_ids = itertools.count(1)
        # Per-callable knowledge, held weakly: a client keeps no user object alive (#9).
        self._sigs: CallableCache[tuple[Any, set[int]]] = CallableCache()
        self._fast: CallableCache[tuple[str, str, int, bytes | None, set[int]]] = CallableCache()
        self._fast_raw = self._fast.raw()
        self._sent_blobs: set[str] = set()
        # What surviving the server's death needs (see _recover): sets whose close went out,
        # IOTasks sent but not yet seen by the foreground, and the foreground's tasks by gid.
        self._gen = 0  # bumped at each reconnection; gids are per server
        self._closed_sets: set[int] = set()
        self._inflight: dict[int, Item] = {}  # task_id -> what was sent for it (bytes only)
        #: task_id -> "the server said it runs", for callers waiting in future.cancel()
        self._refused: dict[int, bool] = {}
        self._io_sent: dict[tuple[str, bytes], deque[int]] = {}
        self._fg_tasks: dict[int, int] = {}  # gid -> task_id, this generation
        self._fg_orphans: dict[tuple[int, int], int] = {}  # (generation, gid) -> task_id
        self._watch: ServerWatch | DisconnectWatch | None = None
        self._outstanding = 0
        self._waiting = False
        self._closed = False
        self._broken: BaseException | None = None
        self._shutdown_lock = threading.Lock()
        self._linger = 0.0
        self._fg_until = False
        self._abandon = False  # at interpreter exit: say BYE without waiting for results
        self.foreground = foreground
        stdio = foreground is not None
        self._hello = p.Hello(
            "client", self.name, os.getpid(), 1 if stdio else 0, stdio, io_only and stdio,
            _import_path(), forward_output,
        )
        self._conn.send(self._hello)
        self._welcome = self._await_welcome(connect_timeout)
        self._credit: tuple[p.Welcome | None, int] = (None, 0)  # (the WELCOME it updates, credit)
        self._hb = self._welcome.heartbeat_ms / 1000 or None
        if self._reconnect_to is not None:
            self._watch = watch_server(self._conn, self._welcome.server_pid)
        self._last_recv = self._last_sent = time.monotonic()
        # Whoever holds this lock owns the connection: the I/O thread, or a caller pumping it.
        self._io_cond = threading.Condition(threading.Lock())
        self._want_io = 0  # callers waiting to pump; changed under _want_lock (+= is not atomic)
        self._want_lock = threading.Lock()
        self._pumper: int | None = None
        self._pump_end = 0.0
        self._io_done = False
        self._io_ident: int | None = None
        self._resolver = Resolver(self.name)
        self._io_thread = threading.Thread(target=self._io_loop, name="taskcs-client-io", daemon=True)
        self._io_thread.start()
        if foreground == "thread":
            threading.Thread(target=self.run_foreground, name="taskcs-foreground", daemon=True).start()
        _live_clients.add(self)

    @classmethod
    def in_process(cls, executors: int = 2, *, engine: Any = None, **kwargs: Any) -> Client:
        """A client on a private in-process server with ``executors`` threads (phase 2).

        ``engine`` (issue 14): a cluster engine spec (``"dask-local"``, ``"dask://HOST:PORT"``,
        ``"ray-local"``, ``"ray://HOST:PORT"``, ``"ray-auto"``) or a ``distributed.Client``
        the caller holds; the server sends it work after its executor threads, as
        ``cs-server start --engine`` does (with ``executors=0`` everything but IOTasks goes
        there). A bad spec, a missing extra or an unreachable cluster raises EngineError.
        The server, its threads and an engine it started stop when the client shuts down.
        """
        from ..server.inprocess import InProcessServer

        server = InProcessServer(executors=executors, engine=engine)
        if executors == 0 and engine is None:
            kwargs.setdefault("io_only", False)  # the client's own executor is the only one
        client = cls(connection=server.connect(), **kwargs)
        client._owned.append(server)
        return client

    # ------------------------------------------------------------ public API
    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Schedule ``fn(*args, **kwargs)``; ``fn`` may be a callable or a standard task name."""
        # Fast path for a function already seen with this many positional arguments: one
        # cache lookup replaces name resolution, arity check and IO detection (~2x faster).
        entry = self._fast_raw.get(id(fn))  # CallableCache.get, inlined
        if (entry is None or entry[0]() is not fn or kwargs or len(args) not in entry[1][4]
                or self._closed or self._broken):
            return self._submit(0, fn, args, kwargs, None, None, None)
        label, ref, flags, blob, _ = entry[1]
        # issue #13: the C pickler, unless the bytes name __main__ or a user module (by value then)
        try:
            payload = _pickle_dumps(args, codec.PICKLE_PROTOCOL)
            if 0x93 in payload and codec.names_user_objects(payload, args):
                payload = codec.encode_inputs(label, args, kwargs, by_value=True)
        except Exception:
            payload = codec.encode_inputs(label, args, kwargs)
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
        chunks = _chunks(zip(*iterables, strict=False) if star else iterables[0], chunksize)
        mapper = REGISTRY["map_chunk"]
        inner = super().map(mapper, itertools.repeat(fn_arg), chunks, itertools.repeat(star), timeout=timeout)
        return itertools.chain.from_iterable(inner)

    def run_foreground(self, until: Callable[[], bool] | None = None, poll: float = 0.1,
                       around: Callable[[], contextlib.AbstractContextManager[Any]] | None = None) -> None:
        """Run this client's foreground executor in the calling thread.

        Returns when ``until()`` is true, or when the client is shut down. ``around()``, if
        given, makes a context manager entered around each task run (e.g. to lend it the
        terminal: see :meth:`taskcs.client.console.Console.owned_by_task`).
        """
        resolver = self._resolver
        self._fg_until = until is not None  # results then nudge us to re-check ``until``
        while True:
            if until is not None and until():
                return
            try:
                item = self._fg_inbox.get(timeout=poll if until is not None else None)
            except queue.Empty:
                continue
            if item is _NUDGE:
                continue
            if item is _STOP:
                self._fg_inbox.put(_STOP)  # let other foreground loops see it too
                return
            if isinstance(item, dict):
                resolver.add_blobs(item)
                continue
            gen, entry = item
            if around is None:
                result = run_task(resolver, entry)
            else:
                with around():
                    result = run_task(resolver, entry)
            self._fg_results.append((gen, result))
            self._conn.wake()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; optionally cancel pending ones; wait for the rest."""
        with self._shutdown_lock:
            first = not self._closed
            self._closed = True
        if cancel_futures:
            for fut in list(self._futures.values()):
                self.cancel(fut, force=True)  # issue 9: running ones are stopped too
        if first:
            self._conn.wake()
        if wait:
            self._io_thread.join()
            for owned in self._owned:
                owned.close()

    close = shutdown

    def abort(self, timeout: float = 2.0) -> None:
        """Leave at once: cancel pending tasks, abandon running ones (the server discards their
        results), say BYE, and wait at most ``timeout`` seconds for that to go out."""
        self._abandon = True
        self.shutdown(wait=False, cancel_futures=True)
        self._io_thread.join(timeout)
        for owned in self._owned:
            owned.close()

    # ---- issue 9 (item 3): stopping a running task ---------------------------------------
    def cancel(self, future: cf.Future[Any], force: bool = True) -> bool:
        """Cancel ``future``, a future of this client; with ``force``, stop it even if it is
        already running: its executor interrupts it (the task sees KeyboardInterrupt) and is
        replaced if it does not stop within the server's grace period. The future ends
        cancelled at once. Returns False if it already had its result.

        ``future.cancel()`` itself never stops a running task, as in concurrent.futures. On
        executor threads (:meth:`in_process`) a running task cannot be interrupted: it runs to
        its end and its result is discarded.
        """
        if not isinstance(future, TaskFuture) or future._owner is not self:
            raise ValueError("not a future of this client")
        if not force:
            return future.cancel()
        if not future._cancel_here():
            return False
        # A negative id in CANCEL means "even if it is running" (see protocol's docstring).
        self._cancels.append(-future.task_id)
        self._conn.wake()
        return True
    # ---- end issue 9 (item 3) ------------------------------------------------------------------

    @property
    def server_pid(self) -> int:
        """Process id of the server this client talks to (this process when in-process)."""
        return self._welcome.server_pid

    # --------------------------------------------------------- submission
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
        payload = codec.encode_inputs(label, task.args, task.kwargs)
        retries = DEFAULT_RETRIES if task.retries is None else task.retries
        flags = FLAG_IO if io else 0
        if task.io is None and task.retries is None and task.name is None and not task.kwargs:
            self._remember_fast(task.fn, label, ref, flags, blob, len(task.args))
        return label, (ref, payload, flags, retries), blob

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

    def _request_cancel(self, task_id: int) -> None:
        self._cancels.append(task_id)
        self._conn.wake()

    def _cancel(self, fut: TaskFuture) -> bool:
        """``future.cancel()``: at once for a task still here; for one the server has, ask it
        and wait (one round trip) for CANCELLED or NOT_CANCELLED, pumping the socket as
        ``result()`` does. Where this thread cannot wait (the I/O thread, a callback while
        another thread pumps) or no answer comes in time, the future is cancelled here and the
        task's result, if it still runs, dropped: the behaviour of taskcs before it asked."""
        task_id = fut.task_id
        me = threading.get_ident()
        if (task_id not in self._inflight or me == self._io_ident or me == self._pumper
                or self._closed or self._broken is not None):
            return fut._cancel_here()
        self._refused[task_id] = False
        self._request_cancel(task_id)
        deadline = time.monotonic() + CANCEL_ANSWER_SECONDS
        try:
            while not fut.done() and not self._refused.get(task_id):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if self._pump_until(fut, left, until=lambda: bool(self._refused.get(task_id))) == left:
                    time.sleep(0.001)  # another thread does the I/O: it files the answer for us
        finally:
            refused = self._refused.pop(task_id, False)
        if fut.done():
            return fut.cancelled()
        return False if refused else fut._cancel_here()

    # ----------------------------------------------------------- I/O thread
    def _await_welcome(self, timeout: float) -> p.Welcome:
        welcome = await_welcome(self._conn, timeout)
        if welcome is not None:
            return welcome
        self._conn.close()
        where = getattr(self._conn, "endpoint", "")
        hint = ""
        if "@tcp://" in where:  # a CURVE handshake the server refused looks exactly like silence
            from ..runtime import keys

            with contextlib.suppress(Exception):
                mine = keys.load().public.decode()
                hint = (f"; if it runs, it may not trust this client's key: run `cs-server keys trust {mine}` "
                        "on the server")
        raise ServerStartError(f"no answer from the server {where} within {timeout:.1f}s{hint}".replace("  ", " "))

    def _io_loop(self) -> None:
        conn = self._conn
        self._io_ident = threading.get_ident()
        if hasattr(conn, "pending"):  # a submission ends a spin at once
            conn.pending = self._has_pending
        cond = self._io_cond
        cond.acquire()
        try:
            while True:
                if self._closed and (self._abandon or not (self._futures or self._outbox or self._fg_results)):
                    break
                # Stay off the socket while a caller pumps it, and for PUMP_PARK after: the next
                # result() of a caller in a loop then finds the socket free, with no wake-up.
                if self._want_io or (not self._closed and (left := self._pump_end + PUMP_PARK - time.monotonic()) > 0):
                    cond.wait(None if self._want_io else left)
                    continue
                self._io_step(self._hb, spin=False)
                if self._broken is not None:
                    break
            if self._broken is None:
                self._conn.send(p.Bye("client shut down"))
                self._linger = 1.0  # let BYE reach the server before the socket closes
        except Exception as exc:  # never leave futures hanging on a crashed I/O thread
            log.exception("client I/O thread failed")
            self._break(BrokenError(f"client I/O failed: {exc}"))
        finally:
            self._io_done = True  # under the lock: no caller pumps a closed socket
            cond.release()
            self._fg_inbox.put(_STOP)
            if self._watch is not None:  # its pidfd or socket monitor goes with the connection
                self._watch.close()
                self._watch = None
            self._conn.close(self._linger)  # the connection of now: a server may have been replaced

    def _io_step(self, wait: float | None, spin: bool = True) -> None:
        """One turn of I/O: receive (up to ``wait``), handle, send what is due, keep alive.

        Run by the I/O thread, or by a caller pumping in :meth:`_pump_until`; always under
        ``_io_cond``'s lock, since ZeroMQ sockets are not thread-safe. Only a pumping caller
        spins: the I/O thread spinning would hold the GIL against threads that submit (it
        doubled the client's CPU per task in workload 1).
        """
        conn = self._conn
        self._waiting = True
        if self._outbox or self._cancels or self._fg_results:
            self._waiting = False
        # Poll before blocking only while a few results are due: an idle client never spins,
        # and with many outstanding, results come in batches that amortise a wake-up.
        msgs = conn.recv(0 if not self._waiting else wait, spin=spin and 0 < self._outstanding <= SPIN_OUTSTANDING)
        self._waiting = False
        if not msgs and self._watch is not None and self._watch.dead():
            for msg in conn.recv(0, spin=False):  # what it said last (a BYE?) comes first
                self._on_message(msg)
            if self._broken is None:
                self._recover(self._watch.why)
            return
        now = time.monotonic()
        if msgs:
            self._last_recv = now
        for msg in msgs:
            self._on_message(msg)
        if self._broken is not None:
            return
        if self._send_pending():
            self._last_sent = now
        hb = self._hb
        if hb and now - self._last_sent >= hb:
            conn.send(p.Heartbeat())
            self._last_sent = now
        if hb and now - self._last_recv > hb * self._welcome.liveness:
            self._recover(f"the server has been silent for {now - self._last_recv:.1f}s")

    def _pump_until(self, fut: TaskFuture, timeout: float | None,
                    until: Callable[[], bool] | None = None) -> float | None:
        """Wait for ``fut`` by doing the I/O thread's work in this thread; return the time left.

        A result handed from the I/O thread to a waiting caller costs a thread wake-up, and so
        does a submission handed the other way: ~50 µs each on a VM, a quarter of a round
        trip. A caller that pumps the socket itself pays neither. Callers that cannot pump
        (the I/O thread, a thread already pumping, a closed client) just return.
        """
        me = threading.get_ident()
        if me == self._io_ident or me == self._pumper or self._closed or self._broken is not None:
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = self._io_cond
        with self._want_lock:
            self._want_io += 1
        self._conn.wake()  # the I/O thread may be blocked on the socket, holding the lock
        with cond:
            with self._want_lock:
                self._want_io -= 1
            if not self._io_done:
                self._pumper = me
                try:
                    hb = self._hb
                    while not fut.done() and self._broken is None and not (until is not None and until()):
                        if deadline is None:
                            self._io_step(hb)
                        elif (left := deadline - time.monotonic()) > 0:
                            self._io_step(min(left, hb) if hb else left)
                        else:
                            break
                except Exception as exc:  # as in the I/O thread: fail the futures, never hang
                    log.exception("client I/O failed in a pumping caller")
                    self._break(BrokenError(f"client I/O failed: {exc}"))
                finally:
                    self._pumper = None
                    self._pump_end = time.monotonic()
                    cond.notify()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _has_pending(self) -> bool:
        return bool(self._outbox or self._cancels or self._fg_results)

    def _send_pending(self) -> bool:
        sent = False
        if self._cancels:
            ids = []
            while self._cancels:
                ids.append(self._cancels.popleft())
            self._conn.send(p.Cancel(ids))
            sent = True
        if self._fg_results:
            results = []
            while self._fg_results:
                gen, result = self._fg_results.popleft()
                if gen == self._gen:
                    self._fg_tasks.pop(result[0], None)
                    results.append(result)
                else:  # run for a server that died: its future completes here
                    self._finish_orphan(gen, result)
            if results:
                self._conn.send(p.ExecDone(results))
                sent = True
        outbox = self._outbox
        # The server's latest CREDIT for this connection, else its WELCOME's.
        credit = self._credit[1] if self._credit[0] is self._welcome else self._welcome.credit
        while outbox and (self._outstanding < credit or outbox[0][1] is None):
            set_id = outbox[0][0]
            tasks: list[tuple[int, str, bytes, int, int]] = []
            blobs: dict[str, bytes] = {}
            close = False
            while outbox and outbox[0][0] == set_id and len(tasks) < SUBMIT_BATCH:
                if outbox[0][1] is None:
                    outbox.popleft()
                    close = True
                    self._closed_sets.add(set_id)
                    break
                if self._outstanding >= credit:
                    break
                item = outbox.popleft()
                wire, blob = item[1], item[2]
                assert wire is not None
                fut = self._futures.get(wire[0])
                if fut is None or fut.cancelled():
                    self._futures.pop(wire[0], None)
                    continue  # cancelled before it left: the server never needs to know
                if wire[3] & FLAG_IO:  # to know it again when the server hands it to our foreground
                    self._io_sent.setdefault((wire[1], wire[2]), deque()).append(wire[0])
                if blob is not None and wire[1][5:] not in self._sent_blobs:
                    blobs[wire[1][5:]] = blob
                    if len(self._sent_blobs) >= SENT_BLOBS_LIMIT:
                        self._sent_blobs.clear()  # the server takes a blob it has again
                    self._sent_blobs.add(wire[1][5:])
                tasks.append(wire)
                self._inflight[wire[0]] = item  # until its result: to send again if the server dies
                self._outstanding += 1
            self._conn.send(p.Submit(set_id, tasks, blobs, close))
            sent = True
        return sent

    def _on_message(self, msg: p.Message) -> None:
        if isinstance(msg, p.Results):
            self._on_results(msg.results)
        elif isinstance(msg, p.Tasks):
            if msg.blobs:
                self._fg_inbox.put(msg.blobs)
            for entry in msg.tasks:
                self._claim_foreground(entry)
                self._fg_inbox.put((self._gen, entry))
        elif isinstance(msg, p.SetDone):
            self._closed_sets.discard(msg.set_id)
            ts = self._sets.pop(msg.set_id, None)
            if ts is not None:
                ts.server_counts = (msg.done, msg.failed, msg.cancelled)
        elif isinstance(msg, p.Output):
            for task_id, text in msg.items:
                self.on_output(self._futures.get(task_id), text)
        elif isinstance(msg, p.NotCancelled):  # too late: those tasks run (see _cancel)
            refused = self._refused
            for task_id in msg.ids:
                if task_id in refused:
                    refused[task_id] = True
        elif isinstance(msg, p.Credit):
            self._credit = (self._welcome, msg.credit)
        elif isinstance(msg, p.Bye):
            self._break(BrokenError(f"the server closed the connection: {msg.reason}"))
        elif isinstance(msg, p.Error):
            log.warning("server error: %s", msg.text)

    def _on_results(self, results: list[tuple[int, int, bytes, str]]) -> None:
        futures = self._futures
        inflight = self._inflight
        for task_id, status, payload, executor in results:
            self._outstanding -= 1
            inflight.pop(task_id, None)
            fut = futures.pop(task_id, None)
            if fut is not None:
                complete(fut, status, payload, executor)
        if self._fg_until:
            self._fg_inbox.put(_NUDGE)  # a foreground loop waiting on a condition re-checks it

    def _break(self, exc: BaseException) -> None:
        self._broken = exc
        self._inflight.clear()
        for fut in list(self._futures.values()):
            with contextlib.suppress(cf.InvalidStateError):
                fut.set_exception(BrokenError(f"task {fut.label} lost: {exc}"))
        self._futures.clear()
        if self._watch is not None:
            self._watch.close()
            self._watch = None


_live_clients: weakref.WeakSet[Client] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    # Daemon threads die silently at exit: tell the server we are leaving, so it drops our
    # queued tasks at once instead of after the heartbeat expiry.
    for client in list(_live_clients):
        client.abort()


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def format_output(fut: TaskFuture | None, text: str) -> str:
    """Output a task printed on an executor, each line marked with its task."""
    label = f"[{fut.label}#{fut.task_id}]" if fut is not None else "[task]"
    return "".join(f"{label} {line}\n" for line in text.splitlines())


def _print_output(fut: TaskFuture | None, text: str) -> None:
    sys.stdout.write(format_output(fut, text))
    sys.stdout.flush()


def _import_path() -> list[str]:
    """This process's sys.path made absolute: the server runs in another directory, where
    '' or '.' would name the wrong place."""
    return [os.path.abspath(entry) if entry else os.getcwd() for entry in sys.path]
