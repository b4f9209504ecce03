"""Tasks that submit tasks (issue 13, part 2): the executor process's side.

The dispatcher's rules and the design's rationale are in :mod:`taskcs.runtime.nesting`.
Here, in the executor process::

    executor_main --enter_executor--> TASKCS_ADDRESS = this server's endpoint (a nested
                                      Client() connects there, never auto-starts)
    a task calls Client() --in_task()--> the client runs a foreground thread (the inline
                                         runner) and stamps each submission with
                                         current_parent(): the gid its thread runs
    nested client's foreground --run_inline--> runs one of its own subtasks, that gid
                                               recorded for the thread (thread-local)
    INTERRUPT of the executor's task, or its end --stop_inline--> every inline task of the
                                               process gets KeyboardInterrupt (they all
                                               descend from that task)
    INTERRUPT(gids) to a nested client (its inline subtask was cancelled) --stop_inline(gids)
    a task sent on a lease (issues 10 + 13): current_parent() names (lease id, task id) and
        remembers it; after the task, the loop --DIRECT_ENDED--> server (runtime.direct_parents)

Which gid a thread runs: the executor's loop runs its task in the main thread; a nested
client's foreground thread runs inline subtasks; any other thread (one the user's task
started) counts as running the executor's task.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from ..runtime.task import Status

if TYPE_CHECKING:
    from .runner import Resolver, ResultEntry, TaskEntry

log = logging.getLogger(__name__)

_loop: Any = None  # the ExecutorLoop of this process, once it is an executor
_local = threading.local()  # .gid: the inline task this thread runs
_lock = threading.Lock()
_inline: dict[int, tuple[int, bool]] = {}  # thread ident -> (gid, interrupt sent)


def enter_executor(loop: Any, endpoint: str) -> None:
    """This process is an executor of the server at ``endpoint`` running ``loop``."""
    global _loop
    _loop = loop
    # A nested Client() in a task finds its own server by the variable every client honours,
    # even on a phase-4 peer running a forwarded task (and a subprocess of a task does too).
    os.environ["TASKCS_ADDRESS"] = endpoint


def in_task() -> bool:
    """True in an executor process (where a Client is a nested one)."""
    return _loop is not None


def current_parent() -> int | tuple[int, int]:
    """The gid of the task the calling thread runs for (0: none); for a task the direct path
    sent on a lease, (lease id, task id), remembered until the loop reports its end."""
    gid = getattr(_local, "gid", None)
    if gid is None and _loop is not None:
        origin = _loop._running_origin
        gid = _loop._running
        lease_id = getattr(origin, "lease_id", 0)
        if gid and lease_id and origin is _loop._running_origin:  # issues 10 + 13: a direct parent
            parent = (lease_id, gid)
            with _lock:
                _direct.add(parent)
            return parent
    return gid or 0


# ---- issues 10 + 13: parents sent on a lease (taskcs.runtime.direct_parents) ------------------
#: (lease id, task id) of direct tasks a nested submission named as its parent, until the
#: loop reports them ended (DIRECT_ENDED); the loop tests it after each task (empty: ~20 ns).
_direct: set[tuple[int, int]] = set()


def take_direct_parents() -> dict[int, list[int]]:
    """The direct parents named so far, by lease, forgotten here. Called by the loop when no
    task runs, so every one of them has ended (a stray thread's late claim is reported at the
    next task's end, or cancelled with its lease)."""
    with _lock:
        named = sorted(_direct)
        _direct.clear()
    out: dict[int, list[int]] = {}
    for lease_id, task_id in named:
        out.setdefault(lease_id, []).append(task_id)
    return out
# ---- end issues 10 + 13 ------------------------------------------------------------------------


#: How many of the executor's tasks have ended (the loop counts each before it stops their
#: inline subtasks). A nested client notes it at each submission (task_epoch): a subtask
#: arriving after the task it descends from has ended is not run (run_inline).
_ended = [0]


def task_epoch() -> int:
    """The count of the executor's tasks ended so far (see ``_ended``)."""
    return _ended[0]


def run_inline(resolver: Resolver, entry: TaskEntry, epoch: int | None = None) -> ResultEntry:
    """Run a nested client's own subtask in this (its foreground) thread; a task stopped by
    :func:`stop_inline` yields a CANCELLED result, and so does one whose client last
    submitted in an executor task (``epoch``) that has ended since: the server sent it after
    an inline sibling's CANCELLED answer freed this thread, before it learnt that their
    parent had ended (the two come on different connections; seen under load in CI)."""
    from .runner import run_task

    if epoch is not None and _loop is not None and epoch != _ended[0]:
        log.info("not running subtask %d: the task it descends from has ended", entry[0])
        now = time.time_ns()
        return (entry[0], int(Status.CANCELLED), b"", 0, now, now)
    me = threading.get_ident()
    outer = getattr(_local, "gid", None)
    start = time.perf_counter()
    start_ns = time.time_ns()  # the timeline's span of a stopped task (issue 11)
    interrupted = False
    try:
        with _lock:
            _inline[me] = (entry[0], False)
        _local.gid = entry[0]
        result = run_task(resolver, entry)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        _local.gid = outer
        with _lock:
            _, sent = _inline.pop(me, (0, False))
            if sent:  # raised already, or still pending: clear it, it was for this task
                _async_raise(me, None)
    if interrupted or sent:
        return (entry[0], int(Status.CANCELLED), b"", int((time.perf_counter() - start) * 1e6),
                start_ns, time.time_ns())
    return result


def stop_inline(gids: Collection[int] | None = None) -> int:
    """KeyboardInterrupt to the inline tasks ``gids`` of this process (None: every one; they
    all descend from the task the executor runs, which was interrupted or ended); returns how
    many were told."""
    if not _inline:
        return 0
    told = 0
    with _lock:
        for ident, (gid, sent) in list(_inline.items()):
            if gids is not None and gid not in gids:
                continue
            if not sent and _async_raise(ident, KeyboardInterrupt):
                _inline[ident] = (gid, True)
                told += 1
    if told:
        log.info("stopping %d inline subtask(s): cancelled, or the task they descend from ended", told)
    return told


def _async_raise(ident: int, exc: type[BaseException] | None) -> bool:
    """Raise ``exc`` in thread ``ident`` at its next bytecode (None: clear a pending one)."""
    set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    obj = ctypes.py_object(exc) if exc is not None else None
    return bool(set_async_exc(ctypes.c_ulong(ident), obj))
