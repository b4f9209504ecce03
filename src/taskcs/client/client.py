"""The taskcs client: a :class:`concurrent.futures.Executor` backed by a taskcs server.

Data flow::

    caller threads                      I/O thread (owns the connection)             server
    submit() -> _outbox (deque) --wake-->  SUBMIT batches, within the credit window  ---->
    fut.cancel() -> _cancels     --wake-->  CANCEL                                    ---->
                                           RESULTS -> decode -> future.set_result   <----
    foreground executor <- _fg_inbox   <-- TASKS (IOTasks: this client's terminal)   <----
    foreground executor -> _fg_results --wake--> EXEC_DONE                            ---->

    server dies (pidfd) -> ServerLoss._recover: a new server, in-flight tasks resubmitted

Only the I/O thread touches the connection, so heartbeats keep flowing while the foreground
executor blocks on stdin. Credit (how many tasks may be outstanding on the server) comes
from WELCOME; submissions beyond it wait here, in the client's memory, not the server's.

``Client`` is assembled from one module per role, each opening with its own data flow:

- :mod:`taskcs.client.submission`: building tasks (the fast path, its caches, the outbox);
- :mod:`taskcs.client.pump`: who owns the connection (the I/O thread or a pumping caller);
- :mod:`taskcs.client.wire`: what one I/O turn sends and how each message is handled;
- :mod:`taskcs.client.foreground`: the foreground executor (IOTasks);
- :mod:`taskcs.client.recovery`: surviving the server's death;
- :mod:`taskcs.client.taskset`: futures and task sets.

This module holds the state they share (created in ``__init__``) and the lifecycle.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import itertools
import os
import queue
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..executor.nesting import in_task as _in_task  # issue 13
from ..executor.runner import Resolver, ResultEntry
from ..runtime import protocol as p
from ..runtime.timeline import TIMELINE_RECORDS, RawRecord, TaskRecord, to_record
from ..runtime.transport import Connection
from ..stdlib_tasks import REGISTRY  # noqa: F401  (re-exported: tests reach it as taskcs.client.client.REGISTRY)
from .callcache import CallableCache
from .foreground import Foreground
from .pump import Pump
from .recovery import RECONNECT_TIMEOUT, DisconnectWatch, Item, ServerWatch, watch_server
from .submission import Submission
from .taskset import TaskFuture, TaskSet


class Client(Submission, Foreground, Pump):
    """Submit tasks to a taskcs server; every method returns standard futures.

    ``Client()`` finds the local server (starting one if none runs), ``Client(address)``
    connects to ``address`` without auto-start, and :meth:`in_process` runs executor threads
    in this process with no server at all (phase 2). ``foreground`` selects who runs this
    client's IOTasks: ``"thread"`` (a thread of this client, using this process's terminal),
    ``"caller"`` (your thread, inside :meth:`run_foreground`), or ``None`` (IOTasks fail).

    Submitting: :meth:`submit`, :meth:`submit_task`, :meth:`submit_set`, :meth:`map`;
    stopping: :meth:`cancel`, :meth:`shutdown`, :meth:`abort`; IOTasks in your thread:
    :meth:`run_foreground`.

    ``timeline`` is how many finished tasks :meth:`timeline` remembers (the latest; 0: none).
    ``direct`` (default: on; ``direct=False`` or ``TASKCS_DIRECT=0`` turns it off) lets this
    client lease executors and send them its plain tasks itself while it is alone on its
    server (issue 10; :mod:`taskcs.client.direct`): two hops per task instead of four.
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
        timeline: int = TIMELINE_RECORDS,
        direct: bool | None = None,
    ) -> None:
        if foreground not in ("thread", "caller", None):
            raise ValueError("foreground must be 'thread', 'caller' or None")
        self._owned: list[Any] = []  # things closed with the client (in-process server, context)
        # How to reach a server again if this one dies (None: a connection given to us).
        self._reconnect_to: Callable[[], Connection] | None = None
        self._where = "the local server"
        self._reconnect_timeout = reconnect_timeout
        discovered = connection is None  # issue 13
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
        self._fg_results: deque[tuple[int, ResultEntry]] = deque()  # (generation, result)
        # issue 11: raw records of the latest finished tasks, bounded (see timeline())
        self._timeline: deque[RawRecord] | None = deque(maxlen=timeline) if timeline > 0 else None
        self._retried: set[int] = set()  # task ids resubmitted after a server died, until their result
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
        # issue 13: in a task, a client of the task's own server is a nested one: its
        # submissions name their parent task, and its foreground thread runs its own subtasks
        # while the task waits for them (taskcs.runtime.nesting)
        self._nested = discovered and _in_task() and (
            address is None or address == os.environ.get("TASKCS_ADDRESS"))
        self._parent_epoch = 0
        self._inline_epochs: dict[tuple[str, int], int] = {}  # issue 13: see Submission._prepare
        if self._nested:
            foreground, io_only = "thread", True
        self.foreground = foreground
        stdio = foreground is not None
        self._hello = p.Hello(
            "client", self.name, os.getpid(), 1 if stdio else 0, stdio, io_only and stdio,
            _import_path(), forward_output, features=p.FEATURES, taskcs=__version__,
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
        self._io_busy = True  # the I/O thread may be on the socket (taskcs.client.pump)
        self._resolver = Resolver(self.name)
        # issue 10: executors lent by the server get this client's tasks directly, unless
        # turned off (direct=False, TASKCS_DIRECT=0). A nested Client() in a task sent that way
        # names it by (lease, task id) (issues 10 + 13: runtime.direct_parents). Never in an
        # executor process: a nested client is the server's to place.
        if direct is None:
            direct = os.environ.get("TASKCS_DIRECT", "1") != "0"
        self._direct_init(direct and not _in_task())
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

    # ------------------------------------------------------------ lifecycle
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

    # ---- issue 11: the task timeline ---------------------------------------------------------
    def timeline(self) -> list[TaskRecord]:
        """When and where this client's latest finished tasks ran, in order of their start.

        At most ``timeline`` records (the constructor's; the oldest are forgotten first).
        Write them for Perfetto with :func:`taskcs.client.trace.write_trace`, or as a page with
        :func:`taskcs.client.trace.write_html`.
        """
        raw = self._timeline.copy() if self._timeline is not None else ()  # atomic: the I/O thread appends
        records = [to_record(r, self.name) for r in raw]
        records.sort(key=lambda r: (r.started_ns or r.submitted_ns, r.task_id))
        return records
    # ---- end issue 11 ------------------------------------------------------------------------

    @property
    def server_pid(self) -> int:
        """Process id of the server this client talks to (this process when in-process)."""
        return self._welcome.server_pid


_live_clients: weakref.WeakSet[Client] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    # Daemon threads die silently at exit: tell the server we are leaving, so it drops our
    # queued tasks at once instead of after the heartbeat expiry.
    for client in list(_live_clients):
        client.abort()


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
