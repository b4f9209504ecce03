"""Client-side records: the future of one task and a submitted task set."""

from __future__ import annotations

import concurrent.futures as cf
import concurrent.futures._base as cf_base
import threading
from collections.abc import Iterator
from typing import Any, Protocol

#: Guards the lazy creation of a future's condition against a concurrent fast completion.
_LAZY_LOCK = threading.Lock()
_FINISHED = cf_base.FINISHED
_PENDING = cf_base.PENDING


class FutureOwner(Protocol):
    """What a :class:`TaskFuture` asks of the client that made it."""

    def _request_cancel(self, task_id: int) -> None: ...

    def _cancel(self, fut: TaskFuture) -> bool: ...

    def _pump_until(self, fut: TaskFuture, timeout: float | None) -> float | None: ...


class TaskFuture(cf.Future):
    """A :class:`concurrent.futures.Future` that knows its task.

    Cancelling a task that is still pending also removes it from the server's queue.
    ``executor`` names the executor that ran it, once done; ``submitted_ns`` is when it left
    for the server (``time.time_ns()`` of its SUBMIT; 0 before), for the timeline.

    Its condition variable is created only when someone waits on it or adds a callback: most
    results of a bulk submission arrive before anyone looks, and a Condition per task was a
    third of the client's time in profiles. :meth:`set_result` completes such a future without
    one; the creation and that check share ``_LAZY_LOCK``, so a waiter either sees the result or
    is notified.
    """

    # Slots keep a bulk submission small: the base class's __dict__ is never allocated,
    # and the waiter/callback lists exist only once someone needs them.
    __slots__ = ("_cb", "_cond", "_exception", "_owner", "_result", "_state", "_w", "executor", "label",
                 "submitted_ns", "task_id")

    def __init__(self, task_id: int, label: str, owner: FutureOwner) -> None:
        # Future.__init__ is skipped on purpose: it would build the Condition eagerly.
        self._cond: threading.Condition | None = None
        self._state = _PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._w: list[Any] | None = None
        self._cb: list[Any] | None = None
        self.task_id = task_id
        self.label = label
        self.executor: str | None = None
        self.submitted_ns = 0  # issue 11: stamped by the I/O turn that sends it, not here (see wire)
        self._owner = owner

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            with _LAZY_LOCK:
                if self._cond is None:
                    self._cond = threading.Condition()
                cond = self._cond
        return cond

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        if self._w is None:
            self._w = []
        return self._w

    @property
    def _done_callbacks(self) -> list[Any]:
        if self._cb is None:
            self._cb = []
        return self._cb

    def set_result(self, result: Any) -> None:
        """Complete with ``result`` (used by the client); see Future.set_result."""
        with _LAZY_LOCK:
            if self._cond is None:  # nobody waits and no callbacks: no condition needed
                if self._state != _PENDING:
                    raise cf.InvalidStateError(f"{self._state}: {self!r}")
                self._result = result
                self._state = _FINISHED
                return
        super().set_result(result)

    def result(self, timeout: float | None = None) -> Any:
        """The task's value; see :meth:`concurrent.futures.Future.result`."""
        if self._state == _PENDING:  # the caller receives its result itself (see Client._pump_until)
            timeout = self._owner._pump_until(self, timeout)
        if self._state == _FINISHED and self._exception is None:
            return self._result  # already done: no need to build a condition to read it
        return super().result(timeout)

    def done(self) -> bool:
        """True if the task finished or was cancelled."""
        return self._state in _DONE_STATES

    def cancelled(self) -> bool:
        """True if the task was cancelled (read without building a condition)."""
        return self._state in _CANCELLED_STATES

    def cancel(self) -> bool:
        """Cancel the task unless it has started, as :meth:`concurrent.futures.Future.cancel`:
        False once it runs (the server or its executor says so, within one round trip) or has
        its result; a running task is never stopped (``Client.cancel(future, force=True)`` does)."""
        if self._state != _PENDING:
            return self._state in _CANCELLED_STATES
        return self._owner._cancel(self)

    def _cancel_here(self) -> bool:
        """Mark cancelled at once, and tell the server (its result, if any, is dropped)."""
        if cf.Future.cancel(self):
            self._owner._request_cancel(self.task_id)
            return True
        return False


_CANCELLED_STATES = frozenset({cf_base.CANCELLED, cf_base.CANCELLED_AND_NOTIFIED})
_DONE_STATES = frozenset({cf_base.FINISHED, cf_base.CANCELLED, cf_base.CANCELLED_AND_NOTIFIED})


class TaskSet:
    """A submitted set of tasks: complete when every task has a result.

    ``futures`` are in submission order; :meth:`as_completed` yields them as they finish.
    """

    def __init__(self, set_id: int, futures: list[TaskFuture]) -> None:
        self.set_id = set_id
        self.futures = futures
        #: (done, failed, cancelled) as counted by the server once it reports the set complete
        #: (after a server died: by the server that finished it, of the tasks it was given).
        self.server_counts: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return len(self.futures)

    def done(self) -> bool:
        """True when every task has a result (or was cancelled)."""
        return all(f.done() for f in self.futures)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the set is complete; return whether it is."""
        _, not_done = cf.wait(self.futures, timeout=timeout)
        return not not_done

    def as_completed(self, timeout: float | None = None) -> Iterator[TaskFuture]:
        """Yield the set's futures as they complete."""
        yield from cf.as_completed(self.futures, timeout=timeout)  # type: ignore[arg-type,misc]

    def results(self, timeout: float | None = None, return_exceptions: bool = False) -> list[Any]:
        """Every task's value, in submission order; raises the first failure unless
        ``return_exceptions``, in which case failures appear in the list as exceptions."""
        if not self.wait(timeout):
            raise TimeoutError(f"task set {self.set_id} incomplete after {timeout}s")
        out: list[Any] = []
        for fut in self.futures:
            if return_exceptions:
                out.append(fut.exception() if not fut.cancelled() and fut.exception() else
                           (cf.CancelledError() if fut.cancelled() else fut.result()))
            else:
                out.append(fut.result())
        return out

    def counts(self) -> dict[str, int]:
        """How many tasks are pending, done, failed and cancelled, as seen by this client."""
        c = {"pending": 0, "done": 0, "failed": 0, "cancelled": 0}
        for fut in self.futures:
            if fut.cancelled():
                c["cancelled"] += 1
            elif not fut.done():
                c["pending"] += 1
            elif fut.exception() is not None:
                c["failed"] += 1
            else:
                c["done"] += 1
        return c
