"""The dispatcher's rules for tasks that submit tasks (issue 13, part 2), driven sans-IO."""

from __future__ import annotations

import pickle

import pytest

from taskcs.runtime import protocol as p
from taskcs.runtime.dispatcher import DispatcherConfig
from taskcs.runtime.nesting import flags_with_parent
from taskcs.runtime.task import FLAG_IO, Status
from tests.runtime.test_dispatcher import Harness, decoded_exception

EXEC_PID = 777


@pytest.fixture
def h() -> Harness:
    return Harness(DispatcherConfig(heartbeat_interval=None, prefetch_seconds=0))


def nested_client(h: Harness, name: str, pid: int = EXEC_PID) -> bytes:
    """A client inside an executor process (its pid), with the inline foreground every
    nested client has."""
    peer = name.encode()
    h.send(peer, p.Hello("client", name, pid, 1, True, True))
    h.take(peer, p.Welcome)
    return peer


def start_parent(h: Harness) -> tuple[bytes, bytes, bytes, int]:
    """root (with a terminal) submits task 1; it runs on executor e1; returns its gid."""
    root = h.client("root", stdio=True)
    e1 = h.executor("e1", pid=EXEC_PID)
    e2 = h.executor("e2")
    h.submit(root, 1, [(1, "std:add", 0, 1)])
    (gid,) = h.gids(e1)
    return root, e1, e2, gid


def sub(h: Harness, client: bytes, parent: int, task_ids: list[int], io: bool = False) -> None:
    flags = flags_with_parent(FLAG_IO if io else 0, parent)
    h.send(client, p.Submit(0, [(t, "std:add", pickle.dumps(t), flags, 1) for t in task_ids], {}, False))


def test_own_subtasks_go_inline_first_and_never_behind_the_waiting_parent() -> None:
    h = Harness(DispatcherConfig(heartbeat_interval=None))  # with prefetch of tiny tasks
    root, e1, e2, parent = start_parent(h)
    h.submit(root, 2, [(2, "std:add", 0, 1)])
    h.complete(e2, h.gids(e2), duration_us=10)  # std:add is known to be tiny: prefetched from now on
    h.results(root)
    h.set_dones(root)
    k = nested_client(h, "k")
    sub(h, k, parent, list(range(1, 20)))
    assert len(h.gids(k)) == 1, "the nested client runs one of its own subtasks"
    assert len(h.gids(e2)) == 18, "a free executor takes (and prefetches) the others"
    assert h.gids(e1) == [], "nothing queues behind the parent that waits"
    h.assert_quiet(root)


def test_a_parent_that_ends_cancels_its_subtasks_recursively(h: Harness) -> None:
    root, e1, e2, parent = start_parent(h)
    k = nested_client(h, "k")
    sub(h, k, parent, [1, 2, 3])
    (inline,) = h.gids(k)
    (on_e2,) = h.gids(e2)
    k2 = nested_client(h, "k2", pid=h.d._peers[e2].hello.pid)
    sub(h, k2, on_e2, [1])  # a grandchild, queued (k2's foreground takes it)
    (grandchild,) = h.gids(k2)
    h.complete(e1, [parent])  # the parent finishes with its children outstanding
    assert [r[1] for r in h.results(root)] == [int(Status.OK)]
    assert sorted(r[1] for r in h.results(k)) == [int(Status.CANCELLED)] * 3
    assert [r[1] for r in h.results(k2)] == [int(Status.CANCELLED)]
    assert [m.gids for m in h.take(e2, p.Interrupt)] == [[on_e2]], "the running child is stopped"
    assert not h.d.has_work()
    h.complete(k, [inline])  # late answers from the inline runners are dropped
    h.complete(k2, [grandchild])
    assert h.results(k) == [] and h.results(k2) == []


def test_an_iotask_of_a_subtask_runs_on_the_root_clients_terminal(h: Harness) -> None:
    root, _e1, _e2, parent = start_parent(h)
    k = nested_client(h, "k")
    sub(h, k, parent, [5], io=True)
    (gid,) = h.gids(root)
    assert h.gids(k) == []
    h.send(root, p.ExecDone([(gid, 0, pickle.dumps("typed"), 10, 0, 0)]))
    assert [(r[0], pickle.loads(r[2]), r[3]) for r in h.results(k)] == [(5, "typed", "root")]
    h.assert_quiet(root)


def test_output_of_a_subtask_goes_to_the_root_under_the_outermost_task(h: Harness) -> None:
    root, _e1, e2, parent = start_parent(h)
    k = nested_client(h, "k")
    sub(h, k, parent, [1, 2])
    (on_e2,) = h.gids(e2)
    h.send(e2, p.Output([(on_e2, "hello\n")]))
    assert [m.items for m in h.take(root, p.Output)] == [[(1, "hello\n")]]
    assert h.take(k, p.Output) == []


def test_a_parent_not_running_in_the_clients_process_is_refused(h: Harness) -> None:
    _root, _e1, e2, parent = start_parent(h)
    stranger = nested_client(h, "stranger", pid=4)
    sub(h, stranger, parent, [1])
    sub(h, stranger, 99999, [2])
    results = h.results(stranger)
    assert [r[1] for r in results] == [int(Status.ERROR)] * 2
    assert all("no such task runs" in str(decoded_exception(r[2])) for r in results)
    assert h.gids(e2) == [] and h.gids(stranger) == []


def test_a_dead_executor_takes_its_nested_clients_and_their_subtasks(h: Harness) -> None:
    root, e1, e2, parent = start_parent(h)
    k = nested_client(h, "k")
    sub(h, k, parent, [1, 2, 3])
    sub(h, k, parent, [4], io=True)
    (on_e2,) = h.gids(e2)
    (io_gid,) = h.gids(root)
    h.gone(e1, exit_code=-9)
    assert k not in h.d.peers(), "the nested client died with its executor process"
    assert [m.gids for m in h.take(e2, p.Interrupt)] == [[on_e2]]
    # The parent runs again (retries=1) on the executor left, once that one is free.
    h.complete(e2, [on_e2], status=int(Status.CANCELLED))
    assert h.gids(e2) == [parent]
    # The root's terminal is free again for another IOTask (its IOTask's answer is dropped).
    h.send(root, p.ExecDone([(io_gid, 0, pickle.dumps("late"), 10, 0, 0)]))
    h.submit(root, 2, [(2, "std:prompt", FLAG_IO, 1)])
    assert len(h.gids(root)) == 1


def test_a_nested_client_force_cancels_a_subtask_it_runs_inline(h: Harness) -> None:
    _root, _e1, e2, parent = start_parent(h)
    k = nested_client(h, "k")
    sub(h, k, parent, [1, 2])
    (inline,) = h.gids(k)
    (on_e2,) = h.gids(e2)
    h.send(k, p.Cancel([-1, -2]))
    assert sorted(r[1] for r in h.results(k)) == [int(Status.CANCELLED)] * 2
    assert [m.gids for m in h.take(k, p.Interrupt)] == [[inline]]
    assert [m.gids for m in h.take(e2, p.Interrupt)] == [[on_e2]]
    sub(h, k, parent, [3])
    assert h.gids(k) == [], "its foreground is busy until it answers for the stopped task"
    h.complete(k, [inline], status=int(Status.CANCELLED))
    assert len(h.gids(k)) == 1
