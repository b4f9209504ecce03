"""Nested clients under tasks the direct path sent (issues 10 + 13), end to end.

The root client leases both executors first (``_leased``), so its task goes straight to a leased
executor, unknown to the server; each task checks that it did (``current_parent()`` names a
lease). The guarantees are those of tests/test_nested_tasks.py on the server path.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import taskcs
from taskcs.errors import ExecutorDiedError
from tests.conftest import server_status, wait_until
from tests.test_direct_path import _leased
from tests.test_nested_tasks import (
    _end_parent,
    _idle,
    _no_child_completes,
    _started,
    blocked_child,
    chatty_child,
    fanout,
    where_am_i,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]


# ---------------------------------------------------------------- tasks (run on executors)
def _direct() -> tuple[int, int]:
    """This task's parent name for a nested client: (lease id, task id) if it came directly."""
    from taskcs.executor.nesting import current_parent

    parent = current_parent()
    assert isinstance(parent, tuple), f"the task did not come on a lease (parent {parent})"
    return parent


def direct_fanout(depth: int, width: int) -> int:
    _direct()
    return fanout(depth, width)


def direct_iotask_and_output(n: int) -> tuple[tuple[int, str], str | None, int]:
    _direct()
    with taskcs.Client() as client:
        total = sum(client.map(chatty_child, range(n)))
        fut = client.submit_task(taskcs.Task(where_am_i, io=True))
        return fut.result(), fut.executor, total


def direct_waiting_parent(marker_dir: str, n: int, how: str) -> list[int]:
    """Submits ``n`` blocked children; waits for them, fails without waiting, or kills its
    own process once two have started."""
    _direct()
    client = taskcs.Client()
    futures = [client.submit(blocked_child, marker_dir, i) for i in range(n)]
    if how != "wait":
        while not _started(marker_dir, 2):
            time.sleep(0.01)
        if how == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError("the parent fails with its children outstanding")
    return [fut.result() for fut in futures]


def dies_once(marker_dir: str) -> int:
    """First run: two blocked children start, then the process dies; the retry fans out."""
    first = Path(marker_dir, "first")
    if not Path(marker_dir, "died").exists():
        _direct()
        first.mkdir(exist_ok=True)
        client = taskcs.Client()
        for i in range(3):
            client.submit(blocked_child, str(first), i)
        while not _started(str(first), 2):
            time.sleep(0.01)
        Path(marker_dir, "died").touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return fanout(2, 2)


def holds_a_client_open(marker_dir: str) -> int:
    """Opens a nested client and keeps it connected, idle, until the test's release file."""
    _direct()
    with taskcs.Client():
        Path(marker_dir, "open").touch()
        while not Path(marker_dir, "release").exists():
            time.sleep(0.01)
    return 1


# ---------------------------------------------------------------- helpers
def _lease_rows(runtime_dir: Path) -> list[dict[str, Any]]:
    return list(server_status(runtime_dir)["leases"])


# ---------------------------------------------------------------- tests
def test_recursive_fanout_from_a_direct_task(start_server: Callable[..., Any], runtime_dir: Path) -> None:
    start_server(2)
    with taskcs.Client(direct=True) as client:
        _leased(client, 2)
        assert client.submit(direct_fanout, 4, 4).result(timeout=100) == 4 ** 4
        # The tree is done: the lone client gets its executors back and the direct path resumes.
        _leased(client, 2)
        assert client.submit(direct_fanout, 2, 3).result(timeout=60) == 9
    wait_until(lambda: _idle(runtime_dir), what="the server to be idle")
    assert server_status(runtime_dir)["clients"] == [], "a nested client outlived its task"


def test_a_tree_under_a_direct_task_on_the_only_executor(start_server: Callable[..., Any]) -> None:
    """Its lease is revoked by the first subtask but holds the parent, so its whole tree runs
    inline in the parent's process: no executor is free, and none is needed."""
    start_server(1)
    with taskcs.Client(direct=True) as client:
        _leased(client, 1)
        assert client.submit(direct_fanout, 3, 3).result(timeout=60) == 27


def test_iotask_and_output_of_a_direct_tasks_subtasks_reach_the_root(start_server: Callable[..., Any]) -> None:
    start_server(2)
    seen: list[tuple[Any, str]] = []
    with taskcs.Client(direct=True, name="root", on_output=lambda fut, text: seen.append((fut, text))) as client:
        _leased(client, 2)
        fut = client.submit(direct_iotask_and_output, 4)
        (pid, thread), executor, total = fut.result(timeout=60)
    assert (pid, thread, executor, total) == (os.getpid(), "taskcs-foreground", "root", 6)
    lines = sorted(line for _, text in seen for line in text.splitlines())
    assert lines == [f"child {i} says hi" for i in range(4)]
    assert all(owner is fut for owner, _ in seen), "output not marked with the outermost task"


@pytest.mark.parametrize("how", ["force", "shutdown", "fail"])
def test_a_direct_parent_that_ends_takes_its_subtasks_with_it(how: str, start_server: Callable[..., Any],
                                                              runtime_dir: Path, tmp_path: Path) -> None:
    start_server(2)
    client = taskcs.Client(direct=True)
    try:
        _leased(client, 2)
        fut = client.submit(direct_waiting_parent, str(tmp_path), 3, "fail" if how == "fail" else "wait")
        _end_parent(client, fut, how, tmp_path, runtime_dir)
        if how == "shutdown":  # the lease holder left: its leases were abandoned
            client = taskcs.Client(direct=True)
        assert sorted(client.map(pow, [2, 3], [2, 2])) == [4, 9]  # the server and both executors serve
    finally:
        client.shutdown(wait=True, cancel_futures=True)


def test_a_direct_parent_whose_executor_dies(start_server: Callable[..., Any], runtime_dir: Path,
                                             tmp_path: Path) -> None:
    start_server(2)
    with taskcs.Client(direct=True) as client:
        _leased(client, 2)
        fut = client.submit_task(taskcs.Task(direct_waiting_parent, (str(tmp_path), 3, "die"), retries=0))
        with pytest.raises(ExecutorDiedError):
            fut.result(timeout=60)
        _no_child_completes(tmp_path, runtime_dir)
        assert sorted(client.map(pow, [2, 3], [2, 2])) == [4, 9]
        assert client.submit(fanout, 2, 2).result(timeout=60) == 4
    wait_until(lambda: server_status(runtime_dir)["clients"] == [], what="the dead task's client to be dropped")


def test_a_direct_parent_whose_executor_dies_is_retried(start_server: Callable[..., Any], runtime_dir: Path,
                                                        tmp_path: Path) -> None:
    start_server(2)
    with taskcs.Client(direct=True) as client:
        _leased(client, 2)
        fut = client.submit_task(taskcs.Task(dies_once, (str(tmp_path),), retries=1))
        assert fut.result(timeout=60) == 4
        assert {r.task_id: r for r in client.timeline()}[fut.task_id].retried
        _no_child_completes(tmp_path / "first", runtime_dir)
        assert not (tmp_path / "first" / "started-2").exists(), "a queued subtask ran after its parent died"


def test_a_nested_client_is_not_a_second_client_for_the_lease_policy(
        start_server: Callable[..., Any], runtime_dir: Path, tmp_path: Path) -> None:
    start_server(2)
    with taskcs.Client(direct=True) as client:
        _leased(client, 2)
        fut = client.submit(holds_a_client_open, str(tmp_path))
        wait_until(lambda: (tmp_path / "open").exists(), timeout=30, what="the nested client to connect")
        status = server_status(runtime_dir)
        assert len(status["clients"]) == 2
        assert [row["state"] for row in status["leases"]] == ["granted", "granted"]
        assert client.submit(pow, 3, 2).result(timeout=20) == 9
        (tmp_path / "release").touch()
        assert fut.result(timeout=30) == 1
