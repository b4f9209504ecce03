"""The foreground executor: where this client's IOTasks run, in a thread of this process.

Data flow::

    I/O turn: TASKS from the server --> _fg_inbox (blobs dict | (generation, entry) | _Forget | _NUDGE | _STOP)
    run_foreground(): _fg_inbox.get() --> run_task (optionally inside ``around()``)
                      --> _fg_results (generation, result) --wake--> I/O turn: EXEC_DONE

The foreground never touches the connection: the I/O thread (or a pumping caller) keeps
heartbeats flowing while an IOTask blocks on the terminal. Results carry the generation of
the server they were run for, so one finished for a server that died completes here
(:mod:`taskcs.client.recovery`).
"""

from __future__ import annotations

import contextlib
import queue
from collections import deque
from collections.abc import Callable
from typing import Any

from ..executor.nesting import run_inline  # issue 13
from ..executor.runner import Resolver, run_task
from ..runtime.transport import Connection

#: Put in the foreground's inbox when the client's I/O ends: every foreground loop returns.
_STOP = object()
#: Put in the foreground's inbox after results, so a loop waiting on ``until`` re-checks it.
_NUDGE = object()


class _Forget:
    """An inbox item: code blobs the server pruned (FORGET), dropped by the foreground's resolver."""

    __slots__ = ("digests",)

    def __init__(self, digests: list[str]) -> None:
        self.digests = digests


class Foreground:
    """The part of :class:`~taskcs.client.client.Client` that runs its IOTasks.

    Mixed into Client, whose state it shares (declared here for the type checker).
    """

    _conn: Connection
    _resolver: Resolver
    _fg_inbox: queue.SimpleQueue[Any]
    _fg_results: deque[tuple[int, tuple[int, int, bytes, int, int, int]]]  # (generation, ResultEntry)
    _fg_until: bool
    _nested: bool  # issue 13: this foreground runs the client's own subtasks (run_inline)
    _parent_epoch: int  # issue 13: see executor.nesting.run_inline
    _inline_epochs: dict[tuple[str, int], int]  # issue 13: per subtask (Submission._prepare)

    def run_foreground(self, until: Callable[[], bool] | None = None, poll: float = 0.1,
                       around: Callable[[], contextlib.AbstractContextManager[Any]] | None = None) -> None:
        """Run this client's foreground executor in the calling thread.

        Returns when ``until()`` is true, or when the client is shut down. ``around()``, if
        given, makes a context manager entered around each task run (e.g. to lend it the
        terminal: see :meth:`taskcs.client.console.Console.owned_by_task`).
        """
        resolver = self._resolver
        run: Callable[[Resolver, Any], Any] = run_task
        if self._nested:  # issue 13
            def run(resolver: Resolver, entry: Any) -> Any:
                epoch = self._inline_epochs.get((entry[1], hash(entry[2])), self._parent_epoch)
                return run_inline(resolver, entry, epoch)
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
            if isinstance(item, _Forget):
                resolver.forget(item.digests)
                continue
            gen, entry = item
            if around is None:
                result = run(resolver, entry)
            else:
                with around():
                    result = run(resolver, entry)
            self._fg_results.append((gen, result))
            self._conn.wake()

