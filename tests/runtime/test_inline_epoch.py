"""A nested client's inline subtask is not run once the executor task it descends from has
ended (taskcs.executor.nesting.run_inline): the server may send it after an inline sibling's
CANCELLED answer, before it has learnt, on another connection, that their parent ended."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import pytest

from taskcs.executor import nesting
from taskcs.executor.runner import Resolver
from taskcs.runtime.task import Status


@pytest.fixture
def in_executor(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(nesting, "_loop", object())  # this process counts as an executor
    monkeypatch.setattr(nesting, "_ended", [7])
    yield


def _entry(gid: int) -> tuple[int, str, bytes, str]:
    return (gid, "std:add", pickle.dumps(((2, 3), {})), "")


def test_a_subtask_of_a_task_still_running_runs(in_executor: Any) -> None:
    result = nesting.run_inline(Resolver("ex-test"), _entry(5), epoch=nesting.task_epoch())
    assert result[0] == 5 and result[1] == int(Status.OK) and pickle.loads(result[2]) == 5


def test_a_subtask_that_arrives_after_its_task_ended_is_cancelled_unrun(in_executor: Any) -> None:
    submitted = nesting.task_epoch()
    nesting._ended[0] += 1  # the executor's task ended (the loop counts it)
    result = nesting.run_inline(Resolver("ex-test"), _entry(6), epoch=submitted)
    assert result[0] == 6 and result[1] == int(Status.CANCELLED) and result[2] == b""


class _Waker:
    def wake(self) -> None:
        pass


def test_a_reused_clients_stale_subtask_is_cancelled_though_it_submitted_since(in_executor: Any) -> None:
    """A client kept across tasks (joblib's, one per process): a subtask of a task that ended
    reaches the foreground after the client's first submission in the next task. The client's
    last epoch is the new task's; the subtask's own, remembered at its submission, is not."""
    import queue
    from collections import deque

    from taskcs.client.foreground import _STOP, Foreground

    stale, fresh = _entry(8), (9, "std:add", pickle.dumps(((4, 5), {})), "")
    fg = Foreground()
    fg._conn, fg._resolver, fg._nested = _Waker(), Resolver("ex-test"), True  # type: ignore[assignment]
    fg._fg_inbox, fg._fg_results, fg._fg_until = queue.SimpleQueue(), deque(), False
    # submitted in the first task, which then ended; the next task submitted another
    fg._inline_epochs = {(stale[1], hash(stale[2])): nesting.task_epoch()}
    nesting._ended[0] += 1
    fg._parent_epoch = nesting.task_epoch()
    fg._inline_epochs[(fresh[1], hash(fresh[2]))] = fg._parent_epoch
    for item in ((1, stale), (1, fresh), _STOP):
        fg._fg_inbox.put(item)
    fg.run_foreground()
    results = {r[0]: r for _, r in fg._fg_results}
    assert results[8][1] == int(Status.CANCELLED), "the ended task's subtask ran"
    assert results[9][1] == int(Status.OK) and pickle.loads(results[9][2]) == 9
