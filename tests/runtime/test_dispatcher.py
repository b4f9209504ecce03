"""The sans-IO dispatcher driven directly with message objects: no threads, no sleeps, no clock."""

from __future__ import annotations

import pickle
from collections import defaultdict
from typing import Any

import pytest

from taskcs.errors import ExecutorDiedError, SubmissionError, TaskcsError
from taskcs.runtime import codec
from taskcs.runtime import protocol as p
from taskcs.runtime.dispatcher import FAIRNESS_QUANTUM, Dispatcher, DispatcherConfig
from taskcs.runtime.task import FLAG_IO, Status

PeerId = bytes
#: (task_id, func_ref, flags, retries); the payload names the task so results are traceable.
Spec = tuple[int, str, int, int]


def payload_of(task_id: int) -> bytes:
    return pickle.dumps(("input", task_id))


class Harness:
    """Feeds a Dispatcher and files every outgoing message in the recipient's inbox."""

    def __init__(self, config: DispatcherConfig | None = None) -> None:
        self.d = Dispatcher(config or DispatcherConfig(heartbeat_interval=None), server_pid=4242)
        self.now = 0.0
        self.inbox: dict[PeerId, list[p.Message]] = defaultdict(list)
        self._pids = iter(range(1000, 10**6))

    # -------------------------------------------------------------- driving
    def feed(self, out: list[tuple[PeerId, p.Message]]) -> list[tuple[PeerId, p.Message]]:
        for peer, msg in out:
            # every message must survive the wire: the dispatcher only emits encodable values
            assert p.decode(p.encode(msg)) == msg
            self.inbox[peer].append(msg)
        return out

    def send(self, peer: PeerId, msg: p.Message) -> list[tuple[PeerId, p.Message]]:
        msg = p.decode(p.encode(msg))  # exactly what the wire would deliver
        return self.feed(self.d.handle(peer, msg, self.now))

    def gone(self, peer: PeerId, **kwargs: Any) -> list[tuple[PeerId, p.Message]]:
        return self.feed(self.d.peer_gone(peer, self.now, kwargs.pop("reason", "test"), **kwargs))

    def tick(self, now: float) -> list[tuple[PeerId, p.Message]]:
        self.now = now
        return self.feed(self.d.tick(now))

    def executor(self, name: str, capacity: int = 1, pid: int | None = None, **kwargs: Any) -> PeerId:
        peer = name.encode()
        pid = next(self._pids) if pid is None else pid
        out = self.send(peer, p.Hello("executor", name, pid, capacity, **kwargs))
        assert out[0][0] == peer and isinstance(out[0][1], p.Welcome)
        assert out[0][1].peer_name == name
        self.take(peer, p.Welcome)
        return peer

    def client(self, name: str, stdio: bool = False, io_only: bool = True, **kwargs: Any) -> PeerId:
        """A client; with ``stdio`` it is also its own foreground executor (capacity 1)."""
        peer = name.encode()
        hello = p.Hello("client", name, next(self._pids), 1 if stdio else 0, stdio,
                        io_only and stdio, **kwargs)
        out = self.send(peer, hello)
        assert isinstance(out[0][1], p.Welcome)
        self.take(peer, p.Welcome)
        return peer

    def submit(
        self, client: PeerId, set_id: int, specs: list[Spec], close: bool = True,
        blobs: dict[str, bytes] | None = None,
    ) -> list[tuple[PeerId, p.Message]]:
        tasks = [(tid, ref, payload_of(tid), flags, retries) for tid, ref, flags, retries in specs]
        return self.send(client, p.Submit(set_id, tasks, blobs or {}, close))

    def complete(
        self, executor: PeerId, gids: list[int], status: int = 0, duration_us: int = 1000
    ) -> list[tuple[PeerId, p.Message]]:
        results = [(gid, int(status), pickle.dumps(("result", gid)), duration_us, 0, 0) for gid in gids]
        return self.send(executor, p.ExecDone(results))

    # -------------------------------------------------------------- reading inboxes
    def take(self, peer: PeerId, cls: type[p.Message]) -> list[Any]:
        """Remove and return the messages of type ``cls`` in ``peer``'s inbox."""
        box = self.inbox[peer]
        mine = [m for m in box if isinstance(m, cls)]
        box[:] = [m for m in box if not isinstance(m, cls)]
        return mine

    def tasks(self, peer: PeerId) -> list[tuple[int, str, bytes, str]]:
        return [entry for msg in self.take(peer, p.Tasks) for entry in msg.tasks]

    def gids(self, peer: PeerId) -> list[int]:
        return [entry[0] for entry in self.tasks(peer)]

    def task_ids(self, entries: list[tuple[int, str, bytes, str]]) -> list[int]:
        return [pickle.loads(payload)[1] for _, _, payload, _ in entries]

    def results(self, client: PeerId) -> list[tuple[int, int, bytes, str]]:
        return [r[:4] for msg in self.take(client, p.Results) for r in msg.results]  # the timing: test_timeline

    def set_dones(self, client: PeerId) -> list[p.SetDone]:
        return self.take(client, p.SetDone)

    def errors(self, peer: PeerId) -> list[str]:
        return [m.text for m in self.take(peer, p.Error)]

    def assert_quiet(self, *peers: PeerId) -> None:
        for peer in peers:
            assert self.inbox[peer] == [], f"{peer!r} got {self.inbox[peer]}"


def normal(tid: int, retries: int = 1, ref: str = "std:add") -> Spec:
    return (tid, ref, 0, retries)


def io(tid: int, retries: int = 1) -> Spec:
    return (tid, "std:prompt", FLAG_IO, retries)


def decoded_exception(payload: bytes) -> BaseException:
    return codec.error_to_exception(codec.decode_error(payload))


@pytest.fixture
def h() -> Harness:
    return Harness()


@pytest.fixture
def tight() -> Harness:
    """Executors' windows equal their capacity: no prefetch, so each dispatch is visible."""
    return Harness(DispatcherConfig(heartbeat_interval=None, prefetch_seconds=0))


# --------------------------------------------------------------------------- registration
def test_hello_gets_welcome_with_connection_parameters() -> None:
    config = DispatcherConfig(heartbeat_interval=2.5, liveness=4, client_credit=77)
    d = Dispatcher(config, server_pid=31)
    out = d.handle(b"c", p.Hello("client", "alice", 10), 0.0)
    assert out == [(b"c", p.Welcome("alice", 2500, 4, 77, 31))]
    assert d.client_count() == 1
    assert d.peers() == [b"c"]


def test_heartbeats_disabled_welcome_says_zero(h: Harness) -> None:
    out = h.send(b"c", p.Hello("client", "c", 1))
    assert out == [(b"c", p.Welcome("c", 0, 5, 16384, 4242))]


@pytest.mark.parametrize(
    "msg",
    [
        p.Submit(1, [(1, "std:add", b"", 0, 1)], {}, True),
        p.Cancel([1]),
        p.ExecDone([(1, 0, b"", 5, 0, 0)]),
        p.Output([(1, "text")]),
        p.StatusRequest(),
    ],
    ids=lambda m: type(m).__name__,
)
def test_message_before_hello_gets_an_error_reply(h: Harness, msg: p.Message) -> None:
    out = h.send(b"stranger", msg)
    assert len(out) == 1
    peer, reply = out[0]
    assert peer == b"stranger"
    assert isinstance(reply, p.Error)
    assert msg.COMMAND.name in reply.text and "HELLO" in reply.text
    assert h.d.peers() == []
    assert not h.d.has_work()


@pytest.mark.parametrize("msg", [p.Heartbeat(), p.Bye("leaving")], ids=lambda m: type(m).__name__)
def test_heartbeat_or_bye_before_hello_is_ignored(h: Harness, msg: p.Message) -> None:
    assert h.send(b"stranger", msg) == []


def test_hello_twice_is_an_error(h: Harness) -> None:
    c = h.client("c")
    h.send(c, p.Hello("client", "c", 1))
    assert len(h.errors(c)) == 1
    assert h.d.client_count() == 1


def test_unexpected_command_gets_a_clear_error(h: Harness) -> None:
    c = h.client("c")
    h.send(c, p.Results([(1, 0, b"", "x", 0, 0, "s", 0)]))
    (text,) = h.errors(c)
    assert "RESULTS" in text and "client" in text


# --------------------------------------------------------------------------- the basic cycle
def test_submit_run_result_set_done(h: Harness) -> None:
    c = h.client("c")
    e = h.executor("e1", capacity=2)
    h.submit(c, 1, [normal(10), normal(11)])
    entries = h.tasks(e)
    assert h.task_ids(entries) == [10, 11]
    assert all(ref == "std:add" and ctx == "" for _, ref, _, ctx in entries)
    assert [payload for _, _, payload, _ in entries] == [payload_of(10), payload_of(11)]
    assert h.d.has_work()
    h.assert_quiet(c)

    gids = [entry[0] for entry in entries]
    h.complete(e, [gids[0]])
    assert h.results(c) == [(10, Status.OK, pickle.dumps(("result", gids[0])), "e1")]
    assert h.set_dones(c) == []  # one task still running
    h.complete(e, [gids[1]], status=Status.ERROR)
    assert [(r[0], r[1]) for r in h.results(c)] == [(11, Status.ERROR)]
    assert h.set_dones(c) == [p.SetDone(1, 1, 1, 0)]
    assert not h.d.has_work()
    h.assert_quiet(c, e)


def test_results_of_one_batch_travel_in_one_message(h: Harness) -> None:
    c = h.client("c")
    e = h.executor("e1", capacity=8)
    h.submit(c, 1, [normal(i) for i in range(5)], close=False)
    h.complete(e, h.gids(e))
    (msg,) = h.take(c, p.Results)
    assert sorted(r[0] for r in msg.results) == list(range(5))


def test_set_done_only_after_close(h: Harness) -> None:
    c = h.client("c")
    e = h.executor("e1")
    h.submit(c, 5, [normal(1)], close=False)
    h.complete(e, h.gids(e))
    assert len(h.results(c)) == 1
    assert h.set_dones(c) == []  # all results in, but more tasks may still come
    h.submit(c, 5, [], close=True)
    assert h.set_dones(c) == [p.SetDone(5, 1, 0, 0)]


def test_empty_closed_set_is_done_at_once(h: Harness) -> None:
    c = h.client("c")
    h.submit(c, 9, [], close=True)
    assert h.set_dones(c) == [p.SetDone(9, 0, 0, 0)]


def test_tasks_queued_before_any_executor_start_when_one_joins(h: Harness) -> None:
    c = h.client("c")
    h.submit(c, 1, [normal(1), normal(2)])
    h.assert_quiet(c)
    e = h.executor("late", capacity=2)
    # the HELLO itself must trigger dispatch: a silent executor would otherwise idle
    # until its first heartbeat while work waits
    assert h.task_ids(h.tasks(e)) == [1, 2]


def test_even_spread_over_idle_executors(h: Harness) -> None:
    c = h.client("c")
    e1, e2 = h.executor("e1", capacity=4), h.executor("e2", capacity=4)
    h.submit(c, 1, [normal(i) for i in range(8)])
    assert len(h.tasks(e1)) == 4
    assert len(h.tasks(e2)) == 4


def test_executor_window_bounds_in_flight(tight: Harness) -> None:
    c = tight.client("c")
    e = tight.executor("e", capacity=3)
    tight.submit(c, 1, [normal(i) for i in range(10)])
    first = tight.gids(e)
    assert len(first) == 3
    tight.complete(e, first[:2])
    assert len(tight.gids(e)) == 2  # two freed slots, two new tasks


def test_duplicate_task_id_is_refused(h: Harness) -> None:
    c = h.client("c")
    h.executor("e", capacity=4)
    h.submit(c, 1, [normal(1)], close=False)
    h.submit(c, 1, [normal(1)], close=False)
    (text,) = h.errors(c)
    assert "task id 1" in text
    assert h.d.status()["stats"]["submitted"] == 1


# --------------------------------------------------------------------------- IOTasks
def test_io_task_goes_only_to_its_clients_stdio_executor_one_at_a_time(h: Harness) -> None:
    alice = h.client("alice", stdio=True)
    bob = h.client("bob", stdio=True)
    e = h.executor("e", capacity=8)
    h.submit(alice, 1, [io(1), io(2), normal(3), io(4)])
    h.submit(bob, 1, [io(1)])

    assert h.task_ids(h.tasks(e)) == [3]  # the shared executor never gets an IOTask
    first = h.tasks(alice)
    assert h.task_ids(first) == [1]  # one at a time, in submission order
    assert first[0][1] == "std:prompt"
    bobs = h.tasks(bob)
    assert h.task_ids(bobs) == [1]  # bob's runs on bob's terminal, concurrently with alice's

    gid = first[0][0]
    for finished, following in ((1, 2), (2, 4)):
        h.complete(alice, [gid])
        assert [r[0] for r in h.results(alice)] == [finished]
        nxt = h.tasks(alice)
        assert h.task_ids(nxt) == [following]  # the next prompt only after the previous one
        gid = nxt[0][0]
    h.complete(alice, [gid])
    assert [r[0] for r in h.results(alice)] == [4]
    assert h.tasks(alice) == []
    h.complete(bob, [bobs[0][0]])
    assert h.results(bob)[0][:2] == (1, Status.OK)
    assert h.tasks(e) == []


def test_io_only_stdio_client_gets_no_normal_tasks(h: Harness) -> None:
    c = h.client("c", stdio=True, io_only=True)
    h.submit(c, 1, [normal(1)])
    assert h.tasks(c) == []
    e = h.executor("e")
    assert h.task_ids(h.tasks(e)) == [1]


def test_stdio_client_without_io_only_also_runs_normal_tasks(h: Harness) -> None:
    c = h.client("c", stdio=True, io_only=False)
    other = h.client("other")
    h.submit(other, 1, [normal(1)])
    assert h.task_ids(h.tasks(c)) == [1]


def test_io_task_from_client_without_stdio_fails_at_once(h: Harness) -> None:
    c = h.client("c", stdio=False)
    e = h.executor("e", capacity=4)
    h.submit(c, 3, [io(1), normal(2)])
    (result,) = h.results(c)
    task_id, status, payload, executor = result
    assert (task_id, status, executor) == (1, Status.ERROR, "server")
    exc = decoded_exception(payload)
    assert isinstance(exc, SubmissionError)
    assert "IOTask 1" in str(exc) and "foreground executor" in str(exc) and "c" in str(exc)
    entries = h.tasks(e)
    assert h.task_ids(entries) == [2]  # the rest of the set is unaffected
    assert h.set_dones(c) == []
    h.complete(e, [entries[0][0]])
    assert h.set_dones(c) == [p.SetDone(3, 1, 1, 0)]


# --------------------------------------------------------------------------- fairness
def test_small_set_is_not_starved_by_a_large_one(tight: Harness) -> None:
    c = tight.client("c")
    e = tight.executor("e", capacity=2)
    tight.submit(c, 1, [normal(i) for i in range(1000, 1100)])  # the large set
    running = tight.gids(e)
    assert len(running) == 2
    tight.submit(c, 2, [normal(i) for i in range(3)])  # the small set
    small_seen: set[int] = set()
    rounds = 0
    while rounds < 10:
        rounds += 1
        tight.complete(e, running)
        entries = tight.tasks(e)
        running = [entry[0] for entry in entries]
        small_seen.update(tid for tid in tight.task_ids(entries) if tid < 1000)
        if len(small_seen) == 3:
            break
    assert small_seen == {0, 1, 2}
    assert rounds <= 5
    assert tight.d.status()["queued"] > 80  # the large set is far from done


def test_fairness_quantum_interleaves_sets(h: Harness) -> None:
    c = h.client("c")
    h.submit(c, 1, [normal(i) for i in range(3 * FAIRNESS_QUANTUM)])
    h.submit(c, 2, [normal(i) for i in range(10_000, 10_000 + FAIRNESS_QUANTUM)])
    e = h.executor("e", capacity=2 * FAIRNESS_QUANTUM)  # 2 quanta
    ids = h.task_ids(h.tasks(e))
    assert ids[:FAIRNESS_QUANTUM] == list(range(FAIRNESS_QUANTUM))
    assert ids[FAIRNESS_QUANTUM:] == list(range(10_000, 10_000 + FAIRNESS_QUANTUM))


# --------------------------------------------------------------------------- executors leaving
def test_executor_gone_mid_task_requeues_and_completes_once(h: Harness) -> None:
    c = h.client("c")
    e1 = h.executor("e1")
    h.submit(c, 1, [normal(1, retries=1)])
    (gid,) = h.gids(e1)
    e2 = h.executor("e2")
    assert h.tasks(e2) == []  # not duplicated while e1 still runs it
    h.gone(e1, exit_code=-9)
    assert h.results(c) == []  # retried, not failed
    assert h.gids(e2) == [gid]
    h.complete(e2, [gid])
    assert [r[:2] for r in h.results(c)] == [(1, Status.OK)]
    assert h.set_dones(c) == [p.SetDone(1, 1, 0, 0)]
    assert h.d.status()["stats"]["retried"] == 1
    h.complete(e2, [gid])  # a duplicate report is ignored
    h.assert_quiet(c)


def test_requeued_task_waits_for_a_new_executor(h: Harness) -> None:
    c = h.client("c")
    e1 = h.executor("e1")
    h.submit(c, 1, [normal(1)])
    (gid,) = h.gids(e1)
    h.gone(e1)
    h.assert_quiet(c)
    e2 = h.executor("e2")
    h.send(e2, p.Heartbeat())  # any message lets the dispatcher notice the new capacity
    assert h.gids(e2) == [gid]


def test_death_beyond_retries_is_executor_died_error_with_exit_code(h: Harness) -> None:
    c = h.client("c")
    e1 = h.executor("e1")
    h.submit(c, 1, [normal(1, retries=1)])
    h.gids(e1)
    e2 = h.executor("e2")
    h.gone(e1, exit_code=3, reason="killed")
    assert len(h.gids(e2)) == 1  # first death: retried
    h.gone(e2, exit_code=13, reason="os._exit")
    ((task_id, status, payload, executor),) = h.results(c)
    assert (task_id, status, executor) == (1, Status.ERROR, "e2")
    exc = decoded_exception(payload)
    assert isinstance(exc, ExecutorDiedError) and type(exc) is ExecutorDiedError
    assert exc.exit_code == 13
    assert "e2" in str(exc) and "task 1" in str(exc) and "os._exit" in str(exc)
    assert h.set_dones(c) == [p.SetDone(1, 0, 1, 0)]
    assert not h.d.has_work()


def test_zero_retries_fails_on_first_death(h: Harness) -> None:
    c = h.client("c")
    e = h.executor("e")
    h.submit(c, 1, [normal(1, retries=0)])
    h.gids(e)
    h.gone(e)
    ((_, status, payload, _),) = h.results(c)
    assert status == Status.ERROR
    assert isinstance(decoded_exception(payload), ExecutorDiedError)
    assert decoded_exception(payload).exit_code is None  # type: ignore[attr-defined]


def test_graceful_bye_requeues_without_consuming_retries(h: Harness) -> None:
    c = h.client("c")
    e1 = h.executor("e1")
    h.submit(c, 1, [normal(1, retries=0)])
    (gid,) = h.gids(e1)
    h.send(e1, p.Bye("shutting down"))
    assert h.d.peers() == [c]
    h.assert_quiet(c)  # not failed although it had no retries left
    e2 = h.executor("e2")
    h.send(e2, p.Heartbeat())
    assert h.gids(e2) == [gid]
    h.gone(e2, graceful=True)  # graceful via the supervisor too
    e3 = h.executor("e3")
    h.send(e3, p.Heartbeat())
    assert h.gids(e3) == [gid]
    h.complete(e3, [gid])
    assert [r[:2] for r in h.results(c)] == [(1, Status.OK)]
    assert h.d.status()["stats"]["retried"] == 0


@pytest.mark.parametrize("how", ["bye", "peer_gone", "peer_gone_graceful", "expiry"])
def test_work_of_a_leaving_executor_reaches_the_others_in_the_same_output(how: str) -> None:
    """Regression: output of peer_gone inside BYE/tick was dropped, so requeued tasks were
    marked running on the surviving executor without a TASKS message ever reaching it."""
    h = Harness(DispatcherConfig(heartbeat_interval=1.0, liveness=3))
    c = h.client("c")
    e1 = h.executor("e1", capacity=2)
    e2 = h.executor("e2", capacity=8)
    h.submit(c, 1, [normal(i, retries=1) for i in range(4)])
    moved = h.gids(e1)
    assert moved
    h.gids(e2)
    if how == "bye":
        out = h.send(e1, p.Bye("scaling down"))
    elif how == "expiry":
        h.now = 3.5
        h.send(c, p.Heartbeat())
        h.send(e2, p.Heartbeat())
        out = h.tick(3.5)
    else:
        out = h.gone(e1, graceful=how.endswith("graceful"))
    assert sorted(e[0] for msg in h.take(e2, p.Tasks) for e in msg.tasks) == sorted(moved)
    assert any(peer == e2 and isinstance(msg, p.Tasks) for peer, msg in out)
    h.complete(e2, moved)
    assert len(h.results(c)) == len(moved)


def test_results_of_an_expired_executor_reach_the_client() -> None:
    """Regression: an error result created during tick() expiry was lost with its SET_DONE."""
    h = Harness(DispatcherConfig(heartbeat_interval=1.0, liveness=2))
    c = h.client("c")
    e = h.executor("e")
    h.submit(c, 7, [normal(1, retries=0)])
    h.gids(e)
    h.now = 2.5
    h.send(c, p.Heartbeat())
    out = h.tick(2.5)
    assert [peer for peer, msg in out if isinstance(msg, (p.Results, p.SetDone))] == [c, c]
    assert [r[:2] for r in h.results(c)] == [(1, Status.ERROR)]
    assert h.set_dones(c) == [p.SetDone(7, 0, 1, 0)]


def test_peer_gone_twice_or_unknown_is_harmless(h: Harness) -> None:
    e = h.executor("e")
    h.gone(e)
    assert h.gone(e) == []
    assert h.gone(b"never-seen") == []


# --------------------------------------------------------------------------- clients leaving
def test_client_gone_drops_queued_and_discards_running(tight: Harness) -> None:
    c = tight.client("c")
    other = tight.client("other")
    e = tight.executor("e", capacity=2)
    tight.submit(c, 1, [normal(i) for i in range(6)])
    running = tight.gids(e)
    assert len(running) == 2
    tight.gone(c)
    assert not tight.d.has_work()
    assert tight.d.client_count() == 1
    # issue 9: the executor is told to stop them (see tests/test_abandoned_work.py)
    assert [sorted(m.gids) for m in tight.take(e, p.Interrupt)] == [sorted(running)]
    out = tight.complete(e, running)
    assert out == []  # results of a gone client are discarded, nothing more to dispatch
    tight.assert_quiet(c, e)
    tight.submit(other, 1, [normal(1), normal(2)])
    assert tight.task_ids(tight.tasks(e)) == [1, 2]  # the executor's window was freed


def test_client_bye_drops_its_io_queue(h: Harness) -> None:
    c = h.client("c", stdio=True)
    h.submit(c, 1, [io(1), io(2), io(3)])
    assert len(h.tasks(c)) == 1
    h.send(c, p.Bye("bye"))
    assert not h.d.has_work()
    assert h.d.peers() == []


def test_stdio_client_leaving_requeues_other_clients_tasks(h: Harness) -> None:
    helper = h.client("helper", stdio=True, io_only=False)
    c = h.client("c")
    h.submit(c, 1, [normal(1, retries=0)])
    (gid,) = h.gids(helper)
    h.send(helper, p.Bye("done"))
    e = h.executor("e")
    h.send(e, p.Heartbeat())
    assert h.gids(e) == [gid]


# --------------------------------------------------------------------------- cancel
def test_cancel_queued_task_gives_one_cancelled_result(tight: Harness) -> None:
    c = tight.client("c")
    e = tight.executor("e")
    tight.submit(c, 1, [normal(1), normal(2), normal(3)])
    (running,) = tight.gids(e)
    tight.send(c, p.Cancel([2]))
    assert [r[:2] for r in tight.results(c)] == [(2, Status.CANCELLED)]
    tight.send(c, p.Cancel([2]))  # again: nothing more
    tight.send(c, p.Cancel([99]))  # unknown: nothing
    tight.send(c, p.Cancel([1]))  # running: its result will arrive as usual
    assert tight.results(c) == []
    tight.complete(e, [running])
    assert [r[:2] for r in tight.results(c)] == [(1, Status.OK)]
    (nxt,) = tight.tasks(e)
    assert tight.task_ids([nxt]) == [3]  # the cancelled task was skipped, never dispatched
    tight.complete(e, [nxt[0]])
    assert [r[:2] for r in tight.results(c)] == [(3, Status.OK)]
    assert tight.set_dones(c) == [p.SetDone(1, 2, 0, 1)]
    assert tight.tasks(e) == []
    assert not tight.d.has_work()


def test_cancel_of_a_prefetched_task_is_forwarded_to_its_executor(h: Harness) -> None:
    c = h.client("c")
    e = h.executor("e", capacity=1)
    h.submit(c, 1, [normal(9)])
    h.complete(e, h.gids(e), duration_us=1)  # measured tiny: the executor gets work queued ahead
    h.results(c)
    h.set_dones(c)
    h.submit(c, 2, [normal(1), normal(2)])
    by_id = {pickle.loads(entry[2])[1]: entry[0] for entry in h.tasks(e)}
    assert sorted(by_id) == [1, 2]  # 1 runs, 2 waits in the executor's queue
    h.send(c, p.Cancel([2]))
    assert h.take(e, p.Cancel) == [p.Cancel([by_id[2]])]  # by gid: the executor's name for it
    assert h.results(c) == [(2, Status.CANCELLED, b"", "e")]  # at once: future.cancel() is True
    h.send(e, p.ExecDone([(by_id[2], int(Status.CANCELLED), b"", 0, 0, 0)]))  # dropped unstarted
    assert h.results(c) == []  # its one result was the CANCELLED
    h.complete(e, [by_id[1]])
    assert [r[:2] for r in h.results(c)] == [(1, Status.OK)]
    assert h.set_dones(c) == [p.SetDone(2, 1, 0, 1)]


def test_cancel_of_a_task_the_executor_runs_is_refused_and_keeps_its_result(h: Harness) -> None:
    c = h.client("c")
    e = h.executor("e")
    h.submit(c, 1, [normal(1)])
    (gid,) = h.gids(e)
    h.send(c, p.Cancel([1]))
    assert h.take(c, p.NotCancelled) == [p.NotCancelled([1])]  # future.cancel() answers False
    assert h.take(e, p.Cancel) == []  # the first of its slots: it runs, nothing to drop
    h.complete(e, [gid])  # the result comes as usual
    assert [r[:2] for r in h.results(c)] == [(1, Status.OK)]
    assert h.set_dones(c) == [p.SetDone(1, 1, 0, 0)]


def test_cancel_of_a_task_on_a_clients_foreground_executor_is_refused_there(h: Harness) -> None:
    helper = h.client("helper", stdio=True, io_only=False)
    c = h.client("c")
    h.submit(c, 1, [normal(1)])
    assert len(h.tasks(helper)) == 1
    h.send(c, p.Cancel([1]))
    assert h.take(c, p.NotCancelled) == [p.NotCancelled([1])]
    h.take(c, p.Credit)
    h.assert_quiet(helper, c)


def test_cancel_last_queued_task_completes_the_set(h: Harness) -> None:
    c = h.client("c")
    h.submit(c, 4, [normal(1), io(2)])  # the IOTask is refused: c has no stdio
    assert [r[:2] for r in h.results(c)] == [(2, Status.ERROR)]
    h.send(c, p.Cancel([1]))
    assert [r[:2] for r in h.results(c)] == [(1, Status.CANCELLED)]
    assert h.set_dones(c) == [p.SetDone(4, 0, 1, 1)]


def test_cancel_queued_io_task(h: Harness) -> None:
    c = h.client("c", stdio=True)
    h.submit(c, 1, [io(1), io(2), io(3)])
    (first,) = h.tasks(c)
    h.send(c, p.Cancel([2]))
    assert [r[:2] for r in h.results(c)] == [(2, Status.CANCELLED)]
    h.complete(c, [first[0]])
    assert h.task_ids(h.tasks(c)) == [3]


# --------------------------------------------------------------------------- flow control
def test_credit_overflow_gives_error_results_not_lost_tasks() -> None:
    h = Harness(DispatcherConfig(heartbeat_interval=None, client_credit=3))
    c = h.client("c")
    h.submit(c, 1, [normal(i) for i in range(5)])
    results = h.results(c)
    assert [r[:2] for r in results] == [(3, Status.ERROR), (4, Status.ERROR)]
    exc = decoded_exception(results[0][2])
    assert isinstance(exc, SubmissionError) and "credit of 3" in str(exc)
    e = h.executor("e", capacity=5)
    h.send(e, p.Heartbeat())
    gids = h.gids(e)
    assert len(gids) == 3
    h.complete(e, gids)
    assert sorted(r[0] for r in h.results(c)) == [0, 1, 2]
    assert h.set_dones(c) == [p.SetDone(1, 3, 2, 0)]
    h.submit(c, 2, [normal(10)])  # credit is back once results are out
    h.complete(e, h.gids(e))
    assert [r[:2] for r in h.results(c)] == [(10, Status.OK)]


# --------------------------------------------------------------------------- heartbeats
def test_heartbeat_expiry_for_unsupervised_peer() -> None:
    h = Harness(DispatcherConfig(heartbeat_interval=1.0, liveness=3))
    c = h.client("c")
    e = h.executor("e", pid=501)
    s = h.executor("s", pid=502)
    assert h.d.mark_supervised(999) is None
    assert h.d.mark_supervised(502) == s
    assert h.d.peer_by_pid(501) == e
    h.submit(c, 1, [normal(1, retries=0)])
    assert len(h.tasks(e)) == 1  # the first idle executor takes the lone task

    out = h.tick(1.0)
    assert {peer for peer, msg in out if isinstance(msg, p.Heartbeat)} == {c, e, s}
    assert h.d.next_deadline(1.0) == 2.0
    h.send(c, p.Heartbeat())  # only the client keeps talking
    h.now = 2.9
    h.send(c, p.Heartbeat())
    assert e in h.d.peers()
    h.tick(3.01)  # e: silent for more than 3 intervals
    assert e not in h.d.peers()
    assert s in h.d.peers()  # supervised: its parent watches it, not heartbeats
    assert c in h.d.peers()
    ((_, status, payload, _),) = h.results(c)
    assert status == Status.ERROR
    exc = decoded_exception(payload)
    assert isinstance(exc, ExecutorDiedError) and "silent" in str(exc)
    h.tick(100.0)
    assert h.d.peers() == [s]


def test_tick_without_heartbeats_does_nothing(h: Harness) -> None:
    h.client("c")
    assert h.tick(1e9) == []
    assert h.d.next_deadline(1e9) is None


def test_any_message_counts_as_heartbeat() -> None:
    h = Harness(DispatcherConfig(heartbeat_interval=1.0, liveness=2))
    e = h.executor("e")
    h.now = 1.9
    h.complete(e, [12345])  # even a stale result keeps the peer alive
    h.tick(3.0)
    assert e in h.d.peers()
    h.tick(4.0)
    assert e not in h.d.peers()


# --------------------------------------------------------------------------- blobs and context
def test_code_blob_sent_once_per_executor(h: Harness) -> None:
    c = h.client("c")
    e1 = h.executor("e1", capacity=4)
    blob = b"fake dill blob"
    ref = "dill:" + codec.blob_digest(blob)
    h.submit(c, 1, [normal(1, ref=ref), normal(2, ref=ref)], blobs={ref[5:]: blob})
    (msg,) = h.take(e1, p.Tasks)
    assert msg.blobs == {ref[5:]: blob}
    h.submit(c, 2, [normal(3, ref=ref)])  # the client sends the blob once per connection
    (msg,) = h.take(e1, p.Tasks)
    assert msg.blobs == {}
    e2 = h.executor("e2", capacity=4)
    h.submit(c, 3, [normal(i, ref=ref) for i in range(4, 12)])
    messages = h.take(e2, p.Tasks)
    assert messages and messages[0].blobs == {ref[5:]: blob}  # a new connection gets it once
    assert all(m.blobs == {} for m in messages[1:])
    assert all(m.blobs == {} for m in h.take(e1, p.Tasks))


def test_code_blob_never_sent_is_refused_not_a_crash(h: Harness) -> None:
    c = h.client("c")
    e = h.executor("e")
    h.submit(c, 1, [normal(1, ref="dill:" + "0" * 40)])
    ((task_id, status, payload, _),) = h.results(c)
    assert (task_id, status) == (1, Status.ERROR)
    assert isinstance(decoded_exception(payload), SubmissionError)
    h.assert_quiet(e)


def test_client_sys_path_becomes_task_context(h: Harness) -> None:
    c = h.client("c", sys_path=["/home/u/project", "/opt/lib"])
    e = h.executor("e", capacity=4)
    h.submit(c, 1, [normal(1, ref="ref:mymod:f"), normal(2, ref="std:add")])
    (msg,) = h.take(e, p.Tasks)
    by_id = {pickle.loads(entry[2])[1]: entry for entry in msg.tasks}
    ctx = by_id[1][3]
    assert ctx.startswith("path:")
    assert msg.blobs[ctx] == b"/home/u/project\0/opt/lib"
    assert by_id[2][3] == ctx  # standard tasks too: their inputs may hold the user's objects


# --------------------------------------------------------------------------- output, status, abort
def test_output_forwarded_to_the_tasks_client(h: Harness) -> None:
    c = h.client("c")
    quiet = h.client("quiet", forward_output=False)
    e = h.executor("e", capacity=4)
    h.submit(c, 1, [normal(7)])
    h.submit(quiet, 1, [normal(8)])
    by_id = {pickle.loads(entry[2])[1]: entry[0] for entry in h.tasks(e)}
    h.send(e, p.Output([(by_id[7], "hello\n"), (by_id[8], "shh\n"), (999, "stale\n")]))
    assert h.take(c, p.Output) == [p.Output([(7, "hello\n")])]
    h.assert_quiet(quiet)


def test_status_snapshot(h: Harness) -> None:
    c = h.client("c")
    h.executor("e", capacity=2)
    h.submit(c, 1, [normal(i) for i in range(30)], close=False)
    out = h.send(c, p.StatusRequest())
    ((_, reply),) = out
    assert isinstance(reply, p.StatusReply)
    info = reply.info
    assert info["clients"] == ["c"]
    window = 2  # nothing measured yet: an unknown function gets no prefetch
    assert info["executors"][0]["in_flight"] == window
    assert info["sets"][0]["queued"] == 30 - window and info["sets"][0]["running"] == window


def test_abort_fails_everything_once(h: Harness) -> None:
    c = h.client("c", stdio=True)
    e = h.executor("e")
    h.submit(c, 1, [normal(1), normal(2), io(3), io(4)])
    assert h.task_ids(h.tasks(c)) == [3]
    h.feed(h.d.abort("server stopping now"))
    results = h.results(c)
    assert sorted(r[0] for r in results) == [1, 2, 3, 4]
    assert {r[1] for r in results} == {Status.ERROR}
    assert all(isinstance(decoded_exception(r[2]), TaskcsError) for r in results)
    assert h.set_dones(c) == [p.SetDone(1, 0, 4, 0)]
    assert not h.d.has_work()
    h.complete(e, h.gids(e))
    h.assert_quiet(c)


def test_draining_refuses_new_submissions(h: Harness) -> None:
    c = h.client("c")
    h.d.draining = True
    h.submit(c, 1, [normal(1)])
    ((tid, status, payload, _),) = h.results(c)
    assert (tid, status) == (1, Status.ERROR)
    assert "stopping" in str(decoded_exception(payload))


def test_goodbye_tells_every_peer(h: Harness) -> None:
    c, e = h.client("c"), h.executor("e")
    out = h.d.goodbye("bye all")
    assert sorted(out, key=lambda x: x[0]) == [(c, p.Bye("bye all")), (e, p.Bye("bye all"))]


# ---------------------------------------------------------------- one budget shared by clients
def test_each_client_gets_a_share_of_the_server_budget_and_is_told_when_it_changes() -> None:
    h = Harness(DispatcherConfig(heartbeat_interval=None, client_credit=64, server_budget=100, min_credit=10))
    first = h.send(b"c1", p.Hello("client", "c1", 1))
    assert first[0][1].credit == 64  # alone: the per-client cap, not the whole budget
    second = h.send(b"c2", p.Hello("client", "c2", 2))
    assert second[0][1].credit == 50
    assert h.take(b"c1", p.Credit) == [p.Credit(50)]
    for i in range(3, 21):
        h.send(f"c{i}".encode(), p.Hello("client", f"c{i}", i))
    assert h.take(b"c1", p.Credit)[-1] == p.Credit(10)  # never below min_credit
    h.send(b"ex", p.Hello("executor", "ex", 99, 1))
    assert h.take(b"c1", p.Credit) == []  # executors are no sharers
    for i in range(3, 21):
        h.gone(f"c{i}".encode())
    assert h.take(b"c1", p.Credit)[-1] == p.Credit(50)
    # A client that sent up to its old credit before it heard of the new one loses nothing.
    h.send(b"c3", p.Hello("client", "c3", 3))
    assert h.take(b"c1", p.Credit) == [p.Credit(33)]
    out = h.submit(b"c1", 1, [(i, "std:add", 0, 0) for i in range(1, 51)])
    assert not [m for _, m in out if isinstance(m, p.Results)]


# --------------------------------------------------------------------------- issue 14: stranded work
def test_fail_queued_fails_only_queued_non_io_work_when_nothing_can_place_it(h: Harness) -> None:
    from taskcs.engines.base import EngineUnavailable

    c = h.client("c", stdio=True)  # a foreground for IOTasks only: it cannot run the others
    h.submit(c, 1, [normal(1), normal(2), io(3)])
    assert not h.d.can_place() and h.d.queued_count() == 2
    io_running = h.tasks(c)  # the IOTask went to the client's own foreground
    assert h.task_ids(io_running) == [3]
    h.feed(h.d.fail_queued(EngineUnavailable("engine dask at tcp://x:1 has been unavailable")))
    failed = h.results(c)
    assert sorted(r[0] for r in failed) == [1, 2] and all(r[1] == int(Status.ERROR) for r in failed)
    exc = decoded_exception(failed[0][2])
    assert isinstance(exc, EngineUnavailable) and "tcp://x:1" in str(exc)
    assert h.d.queued_count() == 0 and h.set_dones(c) == []  # the IOTask still runs
    h.complete(c, [io_running[0][0]])
    assert [(r[0], r[1]) for r in h.results(c)] == [(3, int(Status.OK))]
    assert [s.failed for s in h.set_dones(c)] == [2]
    e = h.executor("e")
    assert h.d.can_place()
    h.submit(c, 2, [normal(4)])
    assert h.task_ids(h.tasks(e)) == [4]  # work that can be placed is never failed
    h.feed(h.d.fail_queued(EngineUnavailable("unused")))
    assert h.results(c) == []


def test_a_client_of_another_taskcs_build_is_refused_naming_both(h: Harness) -> None:
    out = h.send(b"old", p.Hello("client", "old", 5, features=p.FEATURES - 1, taskcs="0.0.9"))
    (error,) = [m for _, m in out if isinstance(m, p.Error)]
    assert f"{p.VERSION}.{p.FEATURES}" in error.text and f"{p.VERSION}.{p.FEATURES - 1}" in error.text
    assert "0.0.9" in error.text and not any(isinstance(m, p.Welcome) for _, m in out)
    assert h.d.client_count() == 0
    h.client("new")  # one of this build is welcome
    assert h.d.client_count() == 1
