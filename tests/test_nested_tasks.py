"""Tasks that submit tasks (issue 13, part 2), end to end on a real cs-server.

A task calls ``taskcs.Client()`` (or joblib) and submits to the server it runs under; while it
waits, its own process runs its subtasks (so no depth deadlocks with every executor busy);
IOTasks and output of subtasks go to the client of the outermost task; a parent that ends
or is cancelled takes its outstanding subtasks with it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import taskcs
from taskcs.errors import ExecutorDiedError, TaskcsError
from tests.conftest import server_status, wait_until
from tests.federation import nodes_fixture  # noqa: F401 - the `nodes` fixture

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------- tasks (run on executors)
def fanout(depth: int, width: int) -> int:
    """A tree of tasks: each inner node submits ``width`` children and waits for them."""
    if depth == 0:
        return 1
    with taskcs.Client() as client:
        return sum(client.map(fanout, [depth - 1] * width, [width] * width))


def where_am_i() -> tuple[int, str]:
    return os.getpid(), threading.current_thread().name


def parent_with_iotask() -> tuple[tuple[int, str], str | None, int]:
    with taskcs.Client() as client:
        fut = client.submit_task(taskcs.Task(where_am_i, io=True))
        return fut.result(), fut.executor, os.getpid()


def chatty_child(i: int) -> int:
    print(f"child {i} says hi")
    return i


def parent_of_chatty(n: int) -> int:
    with taskcs.Client() as client:
        return sum(client.map(chatty_child, range(n)))


def blocked_child(marker_dir: str, i: int) -> int:
    """Marks its start, waits for the test's release file, marks its end."""
    Path(marker_dir, f"started-{i}").touch()
    while not Path(marker_dir, "release").exists():
        time.sleep(0.01)
    Path(marker_dir, f"done-{i}").touch()
    return i


def _started(marker_dir: str, n: int) -> bool:
    return len(list(Path(marker_dir).glob("started-*"))) >= n


def waiting_parent(marker_dir: str, n: int, fail: bool) -> list[int]:
    """Submits ``n`` blocked children; waits for them, or fails once two have started."""
    client = taskcs.Client()
    futures = [client.submit(blocked_child, marker_dir, i) for i in range(n)]
    if fail:
        while not _started(marker_dir, 2):
            time.sleep(0.01)
        raise ValueError("the parent fails with its children outstanding")
    return [fut.result() for fut in futures]


def parent_cancelling_its_children(marker_dir: str) -> list[bool]:
    """Force-cancels its own running children (one runs inline in this process), then lives on
    past the release of the children: only the cancel can have stopped them."""
    with taskcs.Client() as client:
        futures = [client.submit(blocked_child, marker_dir, i) for i in range(2)]
        while not _started(marker_dir, 2):
            time.sleep(0.01)
        cancelled = [client.cancel(fut, force=True) for fut in futures]
        Path(marker_dir, "cancelled").touch()
        while not Path(marker_dir, "release").exists():
            time.sleep(0.01)
        time.sleep(0.5)  # a surviving child notices the release within 10 ms
        return cancelled


def parent_that_dies(marker_dir: str) -> None:
    client = taskcs.Client()
    for i in range(3):
        client.submit(blocked_child, marker_dir, i)
    while not _started(marker_dir, 2):
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGKILL)


def square_where(i: int) -> tuple[int, int, str]:
    return i * i, os.getpid(), threading.current_thread().name


def joblib_parent(n: int) -> tuple[int, set[int], set[str]]:
    import joblib

    # No parallel_config here: the outer Parallel's backend gives its nested calls taskcs.
    out = joblib.Parallel(n_jobs=2)(joblib.delayed(square_where)(i) for i in range(n))
    return sum(v for v, _, _ in out), {pid for _, pid, _ in out}, {name for _, _, name in out}


def parent_on_a_peer(n: int) -> tuple[int, str, str]:
    """Chatty children, then an IOTask, which a task forwarded from the origin may not have."""
    with taskcs.Client() as client:
        total = sum(client.map(chatty_child, range(n)))
        try:
            client.submit_task(taskcs.Task(where_am_i, io=True)).result()
            io = "ran"
        except TaskcsError as exc:
            io = str(exc)
    return total, os.environ["TASKCS_ADDRESS"], io


# ---------------------------------------------------------------- helpers
def _executor_pids(runtime_dir: Path) -> set[int]:
    return {ex["pid"] for ex in server_status(runtime_dir)["executors"] if not ex["stdio"]}


def _idle(runtime_dir: Path) -> bool:
    info = server_status(runtime_dir)
    return info["queued"] == 0 and all(ex["in_flight"] == 0 for ex in info["executors"])


def _no_child_completes(marker_dir: Path, runtime_dir: Path) -> None:
    """Once the server is idle, release every child still alive: none may finish."""
    wait_until(lambda: _idle(runtime_dir), timeout=20, what="the server to have nothing queued or running")
    (marker_dir / "release").touch()
    deadline = time.monotonic() + 1.0  # a surviving child would notice the release within 10 ms
    while time.monotonic() < deadline:
        assert not list(marker_dir.glob("done-*")), "a cancelled parent's subtask ran to completion"
        time.sleep(0.02)


# ---------------------------------------------------------------- tests
def test_recursive_fanout_depth4_width4_on_two_executors(start_server: Callable[..., Any],
                                                         runtime_dir: Path) -> None:
    start_server(2)
    with taskcs.Client() as client:
        start = time.perf_counter()
        assert client.submit(fanout, 4, 4).result(timeout=100) == 4 ** 4
        took = time.perf_counter() - start
    print(f"depth-4 width-4 fan-out (341 tasks, 85 nested clients) on 2 executors: {took:.2f}s")
    wait_until(lambda: _idle(runtime_dir), what="the server to be idle")
    assert server_status(runtime_dir)["clients"] == [], "a nested client outlived its task"


def test_iotask_of_a_subtask_runs_on_the_root_clients_foreground(start_server: Callable[..., Any]) -> None:
    start_server(1)
    with taskcs.Client(name="root") as client:
        (pid, thread), executor, parent_pid = client.submit(parent_with_iotask).result(timeout=60)
    assert pid == os.getpid() and thread == "taskcs-foreground"
    assert executor == "root"
    assert parent_pid != os.getpid()


def test_output_of_subtasks_reaches_the_root_client(start_server: Callable[..., Any]) -> None:
    start_server(2)
    seen: list[tuple[Any, str]] = []
    with taskcs.Client(on_output=lambda fut, text: seen.append((fut, text))) as client:
        fut = client.submit(parent_of_chatty, 4)
        assert fut.result(timeout=60) == 6
    lines = sorted(line for _, text in seen for line in text.splitlines())
    assert lines == [f"child {i} says hi" for i in range(4)]
    assert all(owner is fut for owner, _ in seen), "output not marked with the outermost task"


def _end_parent(client: taskcs.Client, fut: Any, how: str, tmp_path: Path, runtime_dir: Path) -> None:
    """End a parent of three children (``waiting_parent``'s shape) by ``how``: forced cancel,
    its client leaving, its own failure; then check no subtask of it completes or starts."""
    # One child runs inline in the parent's process, one on the other executor, one waits.
    wait_until(lambda: _started(str(tmp_path), 2), timeout=30, what="two children to start")
    if how == "force":
        assert client.cancel(fut, force=True)
    elif how == "shutdown":
        client.shutdown(wait=True, cancel_futures=True)
    else:
        with pytest.raises(ValueError, match="children outstanding"):
            fut.result(timeout=30)
    _no_child_completes(tmp_path, runtime_dir)
    assert not (tmp_path / "started-2").exists(), "a queued subtask ran after its parent ended"


@pytest.mark.parametrize("how", ["force", "shutdown", "fail"])
def test_a_parent_that_ends_takes_its_subtasks_with_it(how: str, start_server: Callable[..., Any],
                                                       runtime_dir: Path, tmp_path: Path) -> None:
    start_server(2)
    client = taskcs.Client()
    try:
        fut = client.submit(waiting_parent, str(tmp_path), 3, how == "fail")
        _end_parent(client, fut, how, tmp_path, runtime_dir)
    finally:
        client.shutdown(wait=True, cancel_futures=True)
    with taskcs.Client() as other:  # the server and both executors still serve
        assert sorted(other.map(pow, [2, 3], [2, 2])) == [4, 9]


def test_a_task_force_cancels_its_own_running_subtasks(start_server: Callable[..., Any], runtime_dir: Path,
                                                      tmp_path: Path) -> None:
    start_server(2)
    with taskcs.Client() as client:
        fut = client.submit(parent_cancelling_its_children, str(tmp_path))
        wait_until(lambda: (tmp_path / "cancelled").exists(), timeout=30, what="the parent to cancel")
        # Both children stopped (the executor's, and the inline one in the parent's process)
        # once only the parent is in flight anywhere; then a survivor would see the release.
        wait_until(lambda: sum(ex["in_flight"] for ex in server_status(runtime_dir)["executors"]) == 1,
                   timeout=20, what="the cancelled children to stop")
        (tmp_path / "release").touch()
        assert fut.result(timeout=60) == [True, True]
    assert not list(tmp_path.glob("done-*")), "a force-cancelled subtask ran to completion"


def test_nested_joblib_parallel_inside_tasks(start_server: Callable[..., Any], runtime_dir: Path) -> None:
    joblib = pytest.importorskip("joblib")
    import taskcs.joblib  # noqa: F401  (registers the backend)

    start_server(2)
    pids = _executor_pids(runtime_dir)
    with joblib.parallel_config(backend="taskcs", n_jobs=2):
        # Two parents: every executor runs one, and each waits on a nested Parallel.
        out = joblib.Parallel()(joblib.delayed(joblib_parent)(6) for _ in range(2))
    for total, inner_pids, threads in out:
        assert total == sum(i * i for i in range(6))
        assert inner_pids <= pids, "nested calls ran outside the server's executors"
        assert threads <= {"MainThread", "taskcs-foreground"}, f"nested calls ran on threads {threads}"


def test_a_dying_task_with_a_nested_client_leaves_the_server_serving(
        start_server: Callable[..., Any], runtime_dir: Path, tmp_path: Path) -> None:
    start_server(2)
    with taskcs.Client() as client:
        fut = client.submit_task(taskcs.Task(parent_that_dies, (str(tmp_path),), retries=0))
        with pytest.raises(ExecutorDiedError):
            fut.result(timeout=60)
        _no_child_completes(tmp_path, runtime_dir)
        assert sorted(client.map(pow, [2, 3], [2, 2])) == [4, 9]
        assert client.submit(fanout, 2, 2).result(timeout=60) == 4
    wait_until(lambda: server_status(runtime_dir)["clients"] == [], what="the dead task's client to be dropped")


def test_a_bogus_parent_is_refused_with_a_clear_error(start_server: Callable[..., Any]) -> None:
    from taskcs.runtime.nesting import flags_with_parent

    start_server(1)
    with taskcs.Client() as client:
        client._nested = True  # claim a parent this process does not run
        import taskcs.client.submission as submission

        original = submission.current_parent
        submission.current_parent = lambda: 12345  # type: ignore[assignment]
        try:
            fut = client.submit(pow, 2, 3)
        finally:
            submission.current_parent = original  # type: ignore[assignment]
        with pytest.raises(TaskcsError, match="no such task runs"):
            fut.result(timeout=30)
        assert flags_with_parent(1, 5) >> 8 == 5
        client._nested = False
        assert client.submit(pow, 2, 3).result(timeout=30) == 8


@pytest.mark.multiprocess
def test_a_task_forwarded_to_a_peer_submits_to_that_peer(nodes: Any) -> None:
    alpha, beta = nodes("alpha", "beta")
    alpha.start(executors=0)  # everything runs on the peer
    beta.start(alpha, executors=2)
    alpha.wait_linked("beta")
    seen: list[str] = []
    with taskcs.Client(alpha.ipc(), autostart=False, on_output=lambda fut, text: seen.append(text)) as client:
        fut = client.submit(parent_on_a_peer, 3)
        total, address, io = fut.result(timeout=60)
        assert client.submit(fanout, 3, 3).result(timeout=60) == 27
    assert fut.executor.startswith("beta:")
    assert total == 3 and address == beta.ipc()
    assert "peer server" in io, io
    assert sorted(line for text in seen for line in text.splitlines()) == [f"child {i} says hi" for i in range(3)]
