"""The lease rules of the dispatcher (issue 10), sans-IO: who gets executors, when they come back."""

from __future__ import annotations

import pytest

from taskcs.runtime import protocol as p

from .test_dispatcher import Harness, normal

ENDPOINT = "unix:///tmp/x/direct-1-1.sock"


@pytest.fixture
def h() -> Harness:
    return Harness()


def _lease(h: Harness, client: bytes, *executors: bytes) -> list[int]:
    """Ask for leases; the ids granted, checking both ends were told."""
    h.send(client, p.Lease(0, ENDPOINT, "", 0))
    grants = h.take(client, p.Lease)
    for executor in executors:
        (order,) = h.take(executor, p.Lease)
        assert order.endpoint == ENDPOINT
    assert sorted(g.name for g in grants) == sorted(e.decode() for e in executors)
    return [g.lease_id for g in grants]


def _end(h: Harness, client: bytes, executor: bytes, lease_id: int) -> None:
    """The client drained a revoked lease: RELEASE, the executor is told and answers."""
    h.send(client, p.Release(lease_id, False))
    assert h.take(executor, p.Release) == [p.Release(lease_id, False)]
    h.send(executor, p.Release(lease_id, False))


def test_a_lone_client_gets_the_idle_executors_and_the_server_sends_them_nothing(h: Harness) -> None:
    e1, e2 = h.executor("e1"), h.executor("e2")
    c = h.client("c")
    (l1, l2) = _lease(h, c, e1, e2)
    assert h.d.has_work()  # a graceful stop waits for lent executors
    status = h.d.status()
    assert [row["state"] for row in status["leases"]] == ["granted", "granted"]  # type: ignore[index]
    h.submit(c, 1, [normal(1)])  # a set: through the server, so the leases come back
    assert sorted(m.lease_id for m in h.take(c, p.Revoke)) == [l1, l2]
    assert h.gids(e1) == [] and h.gids(e2) == []  # lent executors get no server tasks
    _end(h, c, e1, l1)
    (gid,) = h.gids(e1)  # back: the queued task goes there at once
    h.complete(e1, [gid])
    assert [r[0] for r in h.results(c)] == [1]
    assert [m.name for m in h.take(c, p.Lease)] == ["e1"]  # alone, nothing queued, e1 idle: lent again
    _end(h, c, e2, l2)
    assert [m.name for m in h.take(c, p.Lease)] == ["e2"]


def test_a_second_client_revokes_every_lease_and_none_is_granted_while_two_are_here(h: Harness) -> None:
    e = h.executor("e")
    a = h.client("a")
    (lease,) = _lease(h, a, e)
    b = h.client("b")
    assert [m.lease_id for m in h.take(a, p.Revoke)] == [lease]
    h.send(b, p.Lease(0, ENDPOINT, "", 0))
    assert h.take(b, p.Lease) == [p.Lease(0, "", "", 0)]  # none now: b does not wait for one
    h.submit(b, 1, [normal(1)])
    assert h.gids(e) == []  # still lent until the first client releases it
    _end(h, a, e, lease)
    assert len(h.gids(e)) == 1
    assert h.take(a, p.Lease) == [] and h.take(b, p.Lease) == []


def test_a_leased_executors_death_is_told_to_its_client(h: Harness) -> None:
    e = h.executor("e", pid=31)
    c = h.client("c")
    (lease,) = _lease(h, c, e)
    h.gone(e, reason="executor process 31 exited with code -9", exit_code=-9)
    assert h.take(c, p.LeaseLost) == [p.LeaseLost(lease, "executor process 31 exited with code -9", -9, False)]
    assert not h.d.has_work()


def test_a_gone_clients_lease_is_abandoned_and_its_executor_signalled_until_it_answers(h: Harness) -> None:
    e = h.executor("e", pid=77)
    c = h.client("c")
    (lease,) = _lease(h, c, e)
    h.send(c, p.LeaseStop(lease, True))  # a forced cancel: signal it
    assert h.d.interrupted() == [(77, 0.0)]
    h.send(c, p.LeaseStop(lease, False))
    assert h.d.interrupted() == []
    h.gone(c)
    assert h.take(e, p.Release) == [p.Release(lease, True)]
    assert h.d.interrupted() == [(77, 0.0)]  # its running task is stopped as on the server path
    h.send(e, p.Release(lease, False))
    assert h.d.interrupted() == [] and not h.d.has_work()


def test_counts_from_the_client_are_folded_into_the_stats_once(h: Harness) -> None:
    e = h.executor("e")
    c = h.client("c")
    (lease,) = _lease(h, c, e)
    h.send(c, p.LeaseCounts(10, 4, 1, 2, 1, {lease: 3, 0: 2}, {lease: "std:add"}))
    h.send(c, p.LeaseCounts(10, 5, 1, 2, 1, {lease: 2, 0: 2}, {lease: "std:add"}))  # absolute: no double count
    status = h.d.status()
    stats = status["stats"]
    assert stats["submitted"] == 10 and stats["done"] == 5 and stats["retried"] == 1  # type: ignore[index]
    (row,) = status["executors"]  # type: ignore[misc]
    assert row["leased_to"] == "c" and row["in_flight"] == 2 and row["running"] == ["std:add"]
    assert status["queued"] == 2
    (s,) = status["sets"]  # type: ignore[misc]
    assert (s["set_id"], s["running"], s["done"], s["cancelled"]) == (0, 2, 5, 2)


def test_lease_requests_from_non_clients_or_remote_endpoints_are_refused(h: Harness) -> None:
    e = h.executor("e")
    c = h.client("c")
    h.send(c, p.Lease(0, "tcp://10.0.0.1:5555", "", 0))
    assert h.errors(c) and h.take(e, p.Lease) == []
    h.send(e, p.Lease(0, ENDPOINT, "", 0))
    assert h.errors(e)
