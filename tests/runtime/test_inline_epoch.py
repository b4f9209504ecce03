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
