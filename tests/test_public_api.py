"""The public namespace is thin and complete: everything documented is importable from taskcs."""

from __future__ import annotations

import concurrent.futures as cf

import taskcs


def test_all_names_exist_and_are_documented() -> None:
    for name in taskcs.__all__:
        obj = getattr(taskcs, name)
        assert obj.__doc__, f"taskcs.{name} has no docstring"


def test_client_is_an_executor_and_errors_form_one_tree() -> None:
    assert issubclass(taskcs.Client, cf.Executor)
    assert issubclass(taskcs.TaskFuture, cf.Future)
    for err in (taskcs.ProtocolError, taskcs.SubmissionError, taskcs.ClosedError, taskcs.BrokenError,
                taskcs.ExecutorDiedError, taskcs.TaskError, taskcs.ServerStartError, taskcs.SecurityError):
        assert issubclass(err, taskcs.TaskcsError)
    assert issubclass(taskcs.ExecutorDiedError, taskcs.BrokenError)
    assert issubclass(taskcs.SubmissionError, ValueError)


def test_timeline_is_public() -> None:  # issue 11
    import dataclasses

    assert "timeline" in taskcs.__all__ and "TaskRecord" in taskcs.__all__
    assert {f.name for f in dataclasses.fields(taskcs.TaskRecord)} >= {
        "task_id", "set_id", "name", "status", "submitted_ns", "started_ns", "finished_ns", "server", "executor",
        "retried", "forwarded", "io"}
    assert isinstance(taskcs.timeline(), list)
