"""Nested clients under tasks sent on a lease (issues 10 + 13): the dispatcher's rules, sans-IO."""

from __future__ import annotations

import pickle

import pytest

from taskcs.runtime import protocol as p
from taskcs.runtime.direct_parents import DIRECT_PARENT, LEASE_BITS, direct_word
from taskcs.runtime.dispatcher import DispatcherConfig
from taskcs.runtime.nesting import PARENT_SHIFT, flags_with_parent
from taskcs.runtime.task import Status
from tests.runtime.test_dispatcher import Harness, decoded_exception
from tests.runtime.test_leases import _end, _lease
from tests.runtime.test_nesting_rules import nested_client, sub

E1_PID = 777
OK, ERROR, CANCELLED = int(Status.OK), int(Status.ERROR), int(Status.CANCELLED)


@pytest.fixture
def h() -> Harness:
    return Harness(DispatcherConfig(heartbeat_interval=None, prefetch_seconds=0))


def leased(h: Harness) -> tuple[bytes, bytes, bytes, int, int]:
    """root (with a terminal) leases e1 (pid E1_PID) and e2; returns their lease ids."""
    e1 = h.executor("e1", pid=E1_PID)
    e2 = h.executor("e2")
    root = h.client("root", stdio=True)
    l1, l2 = _lease(h, root, e1, e2)
    return root, e1, e2, l1, l2


def test_the_parent_word_and_its_flag() -> None:
    flags = flags_with_parent(1, (3, 12))
    assert flags & DIRECT_PARENT and flags & 1
    word = flags >> PARENT_SHIFT
    assert (word & ((1 << LEASE_BITS) - 1), word >> LEASE_BITS) == (3, 12)
    assert flags_with_parent(1, 5) == 1 | 5 << PARENT_SHIFT  # a server gid: as before
    for bad in ((0, 1), (1, 0), (1 << LEASE_BITS, 1)):
        with pytest.raises(ValueError):
            direct_word(*bad)


def test_a_nested_client_on_a_leased_executor_is_no_rival_but_another_client_is(h: Harness) -> None:
    root, _e1, _e2, l1, l2 = leased(h)
    k = nested_client(h, "k", pid=E1_PID)
    assert h.take(root, p.Revoke) == [], "a client in a leased executor's process revoked the leases"
    assert [row["state"] for row in h.d.status()["leases"]] == ["granted", "granted"]  # type: ignore[index]
    other = h.client("other")
    assert sorted(m.lease_id for m in h.take(root, p.Revoke)) == [l1, l2]
    h.gone(other)
    h.gone(k)


def test_subtasks_of_a_direct_task_are_adopted_run_and_go_to_the_root(h: Harness) -> None:
    root, e1, e2, l1, l2 = leased(h)
    k = nested_client(h, "k", pid=E1_PID)
    sub(h, k, (l1, 7), [1, 2, 3])  # root's task 7, sent on lease l1, runs on e1
    # Queued subtasks revoke the leases; the inline one runs in k's foreground at once.
    assert sorted(m.lease_id for m in h.take(root, p.Revoke)) == [l1, l2]
    (inline,) = h.gids(k)
    _end(h, root, e2, l2)  # e2 drained: back to the server, it takes a subtask
    (on_e2,) = h.gids(e2)
    assert h.gids(e1) == [], "the leased executor running the parent gets no server task"
    h.send(e2, p.Output([(on_e2, "hi\n")]))
    assert [m.items for m in h.take(root, p.Output)] == [[(7, "hi\n")]], "output under the root's task id"
    sub(h, k, (l1, 7), [4], io=True)
    (io_gid,) = h.gids(root)  # on the root's terminal
    h.send(root, p.ExecDone([(io_gid, OK, pickle.dumps("typed"), 10, 0, 0)]))
    h.complete(k, [inline])
    (third,) = h.gids(k)  # its foreground is free: the last queued one runs inline too
    h.complete(e2, [on_e2])
    h.complete(k, [third])
    assert sorted((r[0], r[1]) for r in h.results(k)) == [(1, OK), (2, OK), (3, OK), (4, OK)]
    assert h.results(root) == [], "the root hears of its subtasks' results nothing"


def test_direct_ended_cancels_the_subtasks_recursively_and_later_ones_are_refused(h: Harness) -> None:
    root, e1, e2, l1, l2 = leased(h)
    k = nested_client(h, "k", pid=E1_PID)
    sub(h, k, (l1, 7), [1, 2, 3])
    (inline,) = h.gids(k)
    _end(h, root, e2, l2)
    (on_e2,) = h.gids(e2)
    k2 = nested_client(h, "k2", pid=h.d._peers[e2].hello.pid)
    sub(h, k2, on_e2, [1])  # a grandchild, under a server gid: k2's foreground takes it
    (grandchild,) = h.gids(k2)
    h.send(k, p.DirectEnded(l1, [7]))  # not from the lease's executor: ignored
    assert h.results(k) == []
    h.send(e1, p.DirectEnded(l1, [7]))
    assert sorted(r[1] for r in h.results(k)) == [CANCELLED] * 3
    assert [r[1] for r in h.results(k2)] == [CANCELLED]
    assert [m.gids for m in h.take(e2, p.Interrupt)] == [[on_e2]], "the running child is stopped"
    assert [m.gids for m in h.take(k, p.Interrupt)] == [[inline]], "and the inline one"
    assert [m.gids for m in h.take(k2, p.Interrupt)] == [[grandchild]]
    assert h.d._nest is not None and not h.d._nest.children
    sub(h, k, (l1, 7), [9])  # a late SUBMIT of the ended parent
    (late,) = h.results(k)
    assert late[1] == ERROR and "no such task runs" in str(decoded_exception(late[2]))


def test_direct_ended_before_the_subtask_leaves_a_tombstone(h: Harness) -> None:
    root, e1, _e2, l1, _l2 = leased(h)
    k = nested_client(h, "k", pid=E1_PID)
    h.send(e1, p.DirectEnded(l1, [7]))  # the parent returned before k's SUBMIT went out
    sub(h, k, (l1, 7), [1])
    assert [r[1] for r in h.results(k)] == [ERROR]
    assert h.gids(k) == [] and h.take(root, p.Revoke) == []


@pytest.mark.parametrize("claim", ["other pid", "unknown lease", "ended lease"])
def test_a_bogus_direct_parent_is_refused(claim: str, h: Harness) -> None:
    root, _e1, _e2, l1, _l2 = leased(h)
    k = nested_client(h, "k", pid=E1_PID if claim != "other pid" else 4)
    lease = l1 if claim != "unknown lease" else 99
    if claim == "ended lease":
        h.send(root, p.Release(l1, False))  # drained: its tasks have their results
    sub(h, k, (lease, 7), [1])
    (refused,) = h.results(k)
    assert refused[1] == ERROR and "no such task runs" in str(decoded_exception(refused[2]))


def test_the_leased_executor_dying_under_a_direct_parent(h: Harness) -> None:
    root, e1, e2, l1, l2 = leased(h)
    k = nested_client(h, "k", pid=E1_PID)
    sub(h, k, (l1, 7), [1, 2])
    _end(h, root, e2, l2)
    (on_e2,) = h.gids(e2)
    h.gone(e1, exit_code=-9)
    (lost,) = h.take(root, p.LeaseLost)
    assert lost.lease_id == l1, "the root retries or fails its task, as the direct path does"
    assert k not in h.d.peers()
    assert [m.gids for m in h.take(e2, p.Interrupt)] == [[on_e2]]
    assert h.d._dparents == {} and h.d._nest is not None and not h.d._nest.children


@pytest.mark.parametrize("how", ["holder leaves", "lease ends"])
def test_a_lease_that_ends_ends_its_direct_parents(how: str, h: Harness) -> None:
    root, e1, _e2, l1, _l2 = leased(h)
    k = nested_client(h, "k", pid=E1_PID)
    sub(h, k, (l1, 7), [1, 2])
    sub(h, k, (l1, 7), [3], io=True)  # on the root's terminal
    (inline,) = h.gids(k)
    (_io_gid,) = h.gids(root)
    sub(h, k, (l1, 7), [4], io=True)  # queued behind it there
    if how == "holder leaves":
        h.gone(root)
        assert [m for m in h.take(e1, p.Release)] == [p.Release(l1, True)]
    else:  # e.g. a false claim: the task never ran, nothing says it ended
        h.send(root, p.Release(l1, False))
        assert h.take(e1, p.Release) == [p.Release(l1, False)]
        h.send(e1, p.Release(l1, False))
    assert sorted(r[1] for r in h.results(k)) == [CANCELLED] * 4
    assert [m.gids for m in h.take(k, p.Interrupt)] == [[inline]]
    assert h.d.task_count() == 0


def test_no_lease_is_granted_while_a_task_tree_lives(h: Harness) -> None:
    root, e1, e2, l1, l2 = leased(h)
    k = nested_client(h, "k", pid=E1_PID)
    sub(h, k, (l1, 7), [1])
    (inline,) = h.gids(k)
    _end(h, root, e2, l2)  # revoked by the queued subtask... which k took inline
    h.complete(k, [inline])
    assert h.take(root, p.Lease) == [], "e2 lent again in the middle of the tree"
    h.send(e1, p.DirectEnded(l1, [7]))
    assert [m.name for m in h.take(root, p.Lease)] == ["e2"], "the tree is over: lent again"


def test_a_root_that_leaves_with_subtask_iotasks_queued_at_its_terminal(h: Harness) -> None:
    """The server path too: the subtasks' IOTasks queued at a root that left are cancelled
    (its io_queue went with it; this raised KeyError before issues 10 + 13 met)."""
    from tests.runtime.test_nesting_rules import start_parent

    root, e1, _e2, parent = start_parent(h)
    k = nested_client(h, "k", pid=h.d._peers[e1].hello.pid)
    sub(h, k, parent, [5, 6], io=True)
    assert len(h.gids(root)) == 1  # one at a time on its terminal; the other waits
    h.gone(root)
    assert sorted(r[1] for r in h.results(k)) == [CANCELLED] * 2
    assert [m.gids for m in h.take(e1, p.Interrupt)] == [[parent]]
    assert h.d.task_count() == 0
