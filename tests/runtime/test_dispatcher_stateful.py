"""A hypothesis state machine over the Dispatcher: random peers, sets, results, deaths, cancels.

The model is built only from what the dispatcher *sends* (each peer's inbox) plus what the test
itself sent; the dispatcher's internals are never read. Every task carries its own identity in
its payload, so a TASKS entry can be traced back to the submitting client and task id.

Checked after every step and at the end:

* every task of a connected client gets exactly one result, never two, and nothing is ever
  sent about a client that has gone or to a peer that is not connected;
* an IOTask is only ever sent to the foreground (stdio) executor that is its own client, one
  at a time; plain tasks never go to an ``io_only`` foreground executor;
* a task is in flight on at most one executor; a task sent to an executor that then died is
  re-sent elsewhere, or fails with ExecutorDiedError only once its retries are used up; a
  graceful leave never consumes a retry;
* CANCEL of a queued task answers CANCELLED at once; for a dispatched one it is forwarded (by
  gid) to the executor holding it, never to a client's foreground executor, and nothing else;
* a SET_DONE arrives exactly once per closed set, after every result of the set and in the
  same step as the last one, with the right counts;
* no executor idles (fewer tasks in flight than its capacity) while plain work is queued,
  and a foreground executor with queued IOTasks is always running one;
* code and path blobs reach each executor before (or with) the first task that needs them,
  and each travels once per connection (again only after a FORGET of it, which names only
  blobs the peer was sent and no live task needs);
* every message the dispatcher emits survives protocol encode/decode.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from taskcs.errors import ExecutorDiedError, SubmissionError
from taskcs.runtime import codec
from taskcs.runtime import protocol as p
from taskcs.runtime.dispatcher import Dispatcher, DispatcherConfig
from taskcs.runtime.task import FLAG_IO, Status

#: Heartbeats flow (the interval is reached by the tick rule) but nobody ever expires:
#: expiry is peer_gone with a timer, covered by the example tests.
CONFIG = DispatcherConfig(heartbeat_interval=50.0, liveness=10**9, client_credit=10)

BLOBS = {codec.blob_digest(b"code of task A"): b"code of task A",
         codec.blob_digest(b"code of task B"): b"code of task B"}
REFS = ["std:add", "std:prompt", "ref:usermod:work", *("dill:" + d for d in BLOBS)]
SYS_PATHS = [["/home/u/project"], ["/home/u/other", "/opt/lib"]]

Key = tuple[bytes, int]  # (client peer id, task id)
index = st.integers(min_value=0, max_value=10**6)


@dataclass
class MTask:
    key: Key
    set_id: int
    ref: str
    io: bool
    retries: int
    retries_left: int = -1
    refused: bool = False
    gid: int | None = None
    holder: bytes | None = None  # the connected peer it was sent to and that has not reported
    results: list[tuple[int, bytes, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.retries_left < 0:
            self.retries_left = self.retries


@dataclass
class MSet:
    task_ids: list[int] = field(default_factory=list)
    closed: bool = False
    done_messages: int = 0


@dataclass
class MPeer:
    id: bytes
    kind: str
    capacity: int
    stdio: bool = False
    io_only: bool = False
    ctx: str = ""
    in_flight: dict[int, Key] = field(default_factory=dict)  # gid -> task, as sent
    cancels: set[int] = field(default_factory=set)  # gids the dispatcher asked it to drop
    known_blobs: set[str] = field(default_factory=set)
    # client side
    sets: dict[int, MSet] = field(default_factory=dict)
    next_task_id: int = 1
    next_set_id: int = 1
    sent_blobs: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.id.decode()


def path_ctx(paths: list[str]) -> tuple[str, bytes]:
    blob = "\0".join(paths).encode()
    return "path:" + codec.blob_digest(blob), blob


class DispatcherMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d = Dispatcher(CONFIG, server_pid=1)
        self.now = 0.0
        self.peers: dict[bytes, MPeer] = {}  # connected peers, in registration order
        self.tasks: dict[Key, MTask] = {}  # every accepted or refused task ever submitted
        self.path_blobs: dict[str, bytes] = {}
        self.counter = 0

    # ================================================================ helpers
    def new_id(self, prefix: str) -> bytes:
        self.counter += 1
        return f"{prefix}{self.counter}".encode()

    def pick(self, candidates: list[MPeer], i: int) -> MPeer:
        return candidates[i % len(candidates)]

    def clients(self) -> list[MPeer]:
        return [peer for peer in self.peers.values() if peer.kind == "client"]

    def busy(self) -> list[MPeer]:
        return [peer for peer in self.peers.values() if peer.in_flight]

    def open_sets(self) -> list[tuple[MPeer, int]]:
        return [(c, sid) for c in self.clients() for sid, s in c.sets.items() if not s.closed]

    def live_tasks(self) -> list[MTask]:
        return [t for t in self.tasks.values() if t.key[0] in self.peers]

    def queued(self, task: MTask) -> bool:
        return not task.refused and not task.results and task.holder is None

    def absorb(
        self,
        out: list[tuple[bytes, p.Message]],
        expected: dict[Key, Any] | None = None,
        cancels: list[tuple[bytes, int]] | None = None,
    ) -> None:
        """Check and record the dispatcher's output. ``expected``: key -> (status, check) for
        exactly the results this step must produce; ``cancels``: exactly the (executor, gid)
        CANCELs it must forward."""
        expected = dict(expected or {})
        got: set[Key] = set()
        forwarded: list[tuple[bytes, int]] = []
        refused: list[tuple[bytes, int | None]] = []
        for peer_id, msg in out:
            assert p.decode(p.encode(msg)) == msg, f"{msg!r} does not survive the wire"
            assert peer_id in self.peers, f"{type(msg).__name__} sent to {peer_id!r}, not connected"
            peer = self.peers[peer_id]
            if isinstance(msg, p.Tasks):
                self.on_tasks(peer, msg)
            elif isinstance(msg, p.Results):
                for task_id, status, payload, executor, *_ in msg.results:
                    key = (peer_id, task_id)
                    task = self.tasks[key]
                    if key not in expected and (task.holder, task.gid) in forwarded:
                        # Cancelled while in its executor's prefetch queue: answered at once; the
                        # executor, told to drop it, still holds it until it answers.
                        assert status == Status.CANCELLED and not task.results, (key, status)
                        task.results.append((status, payload, executor))
                        task.holder = None
                        got.add(key)
                        continue
                    assert key in expected, f"unexpected result {status} for {key}"
                    assert key not in got and not self.tasks[key].results, f"second result for {key}"
                    want_status, check = expected.pop(key)
                    assert status == want_status, (key, status, want_status)
                    check(payload, executor)
                    task = self.tasks[key]
                    assert task.holder is None, f"result for {key} while {task.holder!r} runs it"
                    task.results.append((status, payload, executor))
                    got.add(key)
            elif isinstance(msg, p.SetDone):
                self.on_set_done(peer, msg)
            elif isinstance(msg, p.Cancel):
                assert peer.kind == "executor", f"CANCEL forwarded to {peer.kind} {peer.name}"
                for gid in msg.task_ids:
                    assert gid in peer.in_flight, f"CANCEL of gid {gid}, not on {peer.name}"
                    forwarded.append((peer_id, gid))
                    peer.cancels.add(gid)
            elif isinstance(msg, p.Interrupt):  # issue 9: running tasks of a client that left
                assert peer.kind == "executor", f"INTERRUPT sent to {peer.kind} {peer.name}"
                for gid in msg.gids:
                    assert gid in peer.in_flight, f"INTERRUPT of gid {gid}, not on {peer.name}"
            elif isinstance(msg, p.NotCancelled):  # a running task: future.cancel() is False
                for task_id in msg.ids:
                    task = self.tasks[(peer_id, task_id)]
                    assert task.holder is not None, f"NOT_CANCELLED for {task.key}, which no one runs"
                    refused.append((task.holder, task.gid))
            elif isinstance(msg, p.Forget):  # code nobody holds any more (runtime.blob_refs)
                self.on_forget(peer, msg)
            elif isinstance(msg, (p.Heartbeat, p.StatusReply, p.Credit)):
                pass
            else:
                raise AssertionError(f"unexpected {msg!r} to {peer_id!r}")
        assert not expected, f"missing results for {sorted(expected)}"
        # Each cancelled running task: forwarded to its executor (it may still be queued there)
        # or refused at once (it runs), never both, never neither.
        assert sorted(forwarded + refused) == sorted(cancels or []), "forwarded or refused CANCELs differ"

    def on_forget(self, peer: MPeer, msg: p.Forget) -> None:
        gone = set(msg.digests)
        assert gone <= peer.known_blobs, f"FORGET of blobs {peer.name} was never sent"
        for task in self.tasks.values():  # no live task may still name them
            if task.key[0] in self.peers and not task.refused and not task.results:
                assert task.ref[5:] not in gone and self.peers[task.key[0]].ctx not in gone, (
                    f"FORGET of the code of live task {task.key}")
        peer.known_blobs -= gone

    def on_tasks(self, peer: MPeer, msg: p.Tasks) -> None:
        assert peer.capacity > 0, f"tasks sent to {peer.name}, which has no capacity"
        assert msg.tasks, "empty TASKS message"
        for name, blob in msg.blobs.items():
            assert name not in peer.known_blobs, f"blob {name[:12]} sent twice to {peer.name}"
            assert blob == (BLOBS.get(name) or self.path_blobs[name])
        peer.known_blobs.update(msg.blobs)
        for gid, ref, payload, ctx in msg.tasks:
            kind, client_id, task_id = pickle.loads(payload)
            assert kind == "task"
            key = (client_id, task_id)
            task = self.tasks[key]
            assert client_id in self.peers, f"task {key} of a gone client sent to {peer.name}"
            assert not task.refused and not task.results, f"finished task {key} sent again"
            assert task.holder is None, f"{key} sent to {peer.name} while {task.holder!r} runs it"
            assert task.gid in (None, gid), "a task keeps its gid across retries"
            assert ref == task.ref
            client = self.peers[client_id]
            assert ctx == client.ctx  # every task carries its client's import path
            if ctx:
                assert ctx in peer.known_blobs, f"path blob missing on {peer.name}"
            if ref.startswith("dill:"):
                assert ref[5:] in peer.known_blobs, f"code blob missing on {peer.name}"
            if task.io:
                assert peer.id == client_id, f"IOTask {key} sent to {peer.name}, not its client"
                assert peer.stdio
                running_io = [g for g, k in peer.in_flight.items() if self.tasks[k].io]
                assert not running_io, f"second IOTask on {peer.name} while {running_io} runs"
            else:
                assert not peer.io_only, f"plain task {key} sent to io_only {peer.name}"
            task.gid = gid
            task.holder = peer.id
            peer.in_flight[gid] = key

    def on_set_done(self, client: MPeer, msg: p.SetDone) -> None:
        s = client.sets.get(msg.set_id)
        assert s is not None, f"SET_DONE for unknown set {msg.set_id}"
        assert s.closed, f"SET_DONE for open set {msg.set_id}"
        assert s.done_messages == 0, f"second SET_DONE for set {msg.set_id}"
        statuses = []
        for task_id in s.task_ids:
            results = self.tasks[(client.id, task_id)].results
            assert len(results) == 1, f"SET_DONE {msg.set_id} before the result of task {task_id}"
            statuses.append(results[0][0])
        counts = (statuses.count(Status.OK), statuses.count(Status.ERROR), statuses.count(Status.CANCELLED))
        assert (msg.done, msg.failed, msg.cancelled) == counts
        s.done_messages += 1

    def handle(self, peer_id: bytes, msg: p.Message, expected: dict[Key, Any] | None = None,
               cancels: list[tuple[bytes, int]] | None = None) -> None:
        msg = p.decode(p.encode(msg))  # exactly what the wire would deliver
        self.absorb(self.d.handle(peer_id, msg, self.now), expected, cancels)

    def leave(self, peer: MPeer, graceful: bool, exit_code: int | None, via_bye: bool) -> None:
        """``peer`` leaves: predict which of its tasks fail, then let the dispatcher react."""
        del self.peers[peer.id]
        expected: dict[Key, Any] = {}
        for key in peer.in_flight.values():
            task = self.tasks[key]
            if key[0] not in self.peers or task.results:
                continue  # its client left (maybe it was this peer): forgotten
            assert task.holder == peer.id
            task.holder = None
            if graceful:
                event("running task requeued after a graceful leave")
                continue
            if task.retries_left > 0:
                task.retries_left -= 1
                event("running task retried after a death")
            else:
                expected[key] = (Status.ERROR, died_check(peer.name, exit_code))
                event("running task failed: executor died beyond its retries")
        if via_bye:
            out = self.d.handle(peer.id, p.decode(p.encode(p.Bye("leaving"))), self.now)
        else:
            out = self.d.peer_gone(peer.id, self.now, "test", exit_code=exit_code, graceful=graceful)
        self.absorb(out, expected)

    # ================================================================ rules: peers
    @initialize(
        capacities=st.lists(st.integers(1, 3), min_size=1, max_size=3),
        clients=st.lists(st.tuples(st.booleans(), st.booleans(), st.sampled_from([None, 0, 1])),
                         min_size=1, max_size=2),
    )
    def start(self, capacities: list[int], clients: list[tuple[bool, bool, int | None]]) -> None:
        """Most runs start with clients and executors; the rules add and remove more."""
        for capacity in capacities:
            self.add_executor(capacity)
        for stdio, io_only, path in clients:
            self.add_client(stdio, io_only, path)

    @rule(capacity=st.integers(1, 3))
    def add_executor(self, capacity: int) -> None:
        peer = MPeer(self.new_id("e"), "executor", capacity)
        self.peers[peer.id] = peer
        hello = p.decode(p.encode(p.Hello("executor", peer.name, self.counter, capacity)))
        out = self.d.handle(peer.id, hello, self.now)
        assert out[0] == (peer.id, p.Welcome(peer.name, 50_000, CONFIG.liveness, CONFIG.client_credit, 1))
        self.absorb(out[1:])

    @rule(stdio=st.booleans(), io_only=st.booleans(), path=st.sampled_from([None, 0, 1]))
    def add_client(self, stdio: bool, io_only: bool, path: int | None) -> None:
        """A client; with stdio it is its own foreground executor (capacity 1), as Client does."""
        sys_path = SYS_PATHS[path] if path is not None else []
        ctx = ""
        if sys_path:
            ctx, blob = path_ctx(sys_path)
            self.path_blobs[ctx] = blob
        peer = MPeer(self.new_id("c"), "client", 1 if stdio else 0, stdio, io_only and stdio, ctx)
        self.peers[peer.id] = peer
        hello = p.Hello("client", peer.name, self.counter, peer.capacity, stdio, peer.io_only, sys_path)
        hello = p.decode(p.encode(hello))
        out = self.d.handle(peer.id, hello, self.now)
        assert isinstance(out[0][1], p.Welcome) and out[0][0] == peer.id
        self.absorb(out[1:])

    @precondition(lambda self: self.peers)
    @rule(who=index, graceful=st.booleans(), via_bye=st.booleans(),
          exit_code=st.one_of(st.none(), st.integers(-15, 255)))
    def peer_leaves(self, who: int, graceful: bool, via_bye: bool, exit_code: int | None) -> None:
        """An executor or a client leaves: BYE (graceful), or its death seen by a supervisor."""
        peer = self.pick(list(self.peers.values()), who)
        if via_bye:
            graceful, exit_code = True, None
        self.leave(peer, graceful, exit_code, via_bye)

    @precondition(lambda self: self.busy())
    @rule(who=index, graceful=st.booleans(), exit_code=st.one_of(st.none(), st.integers(-15, 255)))
    def busy_peer_dies(self, who: int, graceful: bool, exit_code: int | None) -> None:
        """A peer that is running tasks goes away: retried elsewhere or failed, never lost."""
        self.leave(self.pick(self.busy(), who), graceful, exit_code, via_bye=False)

    def holders_of_retried_tasks(self) -> list[MPeer]:
        return [peer for peer in self.busy() if any(
            self.tasks[k].retries_left < self.tasks[k].retries for k in peer.in_flight.values())]

    @precondition(lambda self: self.holders_of_retried_tasks())
    @rule(who=index, exit_code=st.one_of(st.none(), st.integers(-15, 255)))
    def retried_task_dies_again(self, who: int, exit_code: int | None) -> None:
        """The executor now running a task that was already retried dies too."""
        event("a retried task's executor died too")
        self.leave(self.pick(self.holders_of_retried_tasks(), who), False, exit_code, via_bye=False)

    def executors_asked_to_cancel(self) -> list[MPeer]:
        return [peer for peer in self.busy() if peer.cancels & set(peer.in_flight)]

    @precondition(lambda self: self.executors_asked_to_cancel())
    @rule(who=index)
    def executor_drops_cancelled(self, who: int) -> None:
        """An executor asked to drop prefetched tasks answers CANCELLED for them."""
        peer = self.pick(self.executors_asked_to_cancel(), who)
        event("executor answered CANCELLED")
        self.report(peer, [(gid, Status.CANCELLED, 7) for gid in peer.cancels & set(peer.in_flight)])

    @precondition(lambda self: self.busy())
    @rule(who=index, picks=st.lists(st.tuples(index, st.sampled_from([0, 1, 2]), st.integers(0, 10**7)),
                                    min_size=1, max_size=6))
    def executor_reports(self, who: int, picks: list[tuple[int, int, int]]) -> None:
        """An executor reports results for some of its tasks: ok, error, or (only for tasks
        the dispatcher asked it to drop) cancelled before it started."""
        peer = self.pick(self.busy(), who)
        gids = list(peer.in_flight)
        self.report(peer, [(gids[i % len(gids)], status, duration) for i, status, duration in picks])

    def report(self, peer: MPeer, reports: list[tuple[int, int, int]]) -> None:
        """``peer`` sends EXEC_DONE for ``reports`` [(gid, status, duration)] of its tasks."""
        results, expected, seen = [], {}, set()
        for gid, status, duration in reports:
            if gid in seen:
                continue
            seen.add(gid)
            status = int(status)  # plain ints on the wire
            if status == Status.CANCELLED and gid not in peer.cancels:
                status = int(Status.ERROR)  # an executor only answers CANCELLED when asked to
            peer.cancels.discard(gid)
            payload = pickle.dumps(("result", gid, status))
            results.append((gid, status, payload, duration, 0, 0))
            key = peer.in_flight.pop(gid)
            task = self.tasks[key]
            if key[0] in self.peers and not task.results:
                assert task.holder == peer.id
                task.holder = None
                expected[key] = (status, same_payload(payload, peer.name))
        self.handle(peer.id, p.ExecDone(results), expected)

    @precondition(lambda self: self.peers and self.tasks)
    @rule(who=index, which=index, status=st.sampled_from([0, 1]))
    def stale_report(self, who: int, which: int, status: int) -> None:
        """A report for a gid the peer is not running (a stale copy): changes nothing."""
        peer = self.pick(list(self.peers.values()), who)
        gids = sorted({t.gid for t in self.tasks.values() if t.gid is not None} - set(peer.in_flight))
        if not gids:
            return
        gid = gids[which % len(gids)]
        self.handle(peer.id, p.ExecDone([(gid, status, b"stale", 5, 0, 0)]))

    # ================================================================ rules: task sets
    @precondition(lambda self: self.clients())
    @rule(
        who=index,
        into_open=st.booleans(),
        which=index,
        specs=st.lists(st.tuples(st.sampled_from(REFS), st.booleans(), st.integers(0, 2)), max_size=6),
        close=st.booleans(),
    )
    def submit(self, who: int, into_open: bool, which: int, specs: list[tuple[str, bool, int]],
               close: bool) -> None:
        client = self.pick(self.clients(), who)
        open_sets = [sid for sid, s in client.sets.items() if not s.closed]
        if into_open and open_sets:
            set_id = open_sets[which % len(open_sets)]
        else:
            set_id = client.next_set_id
            client.next_set_id += 1
            client.sets[set_id] = MSet()
        outstanding = sum(
            1 for t in self.tasks.values() if t.key[0] == client.id and not t.refused and not t.results
        )
        entries, blobs, expected = [], {}, {}
        for ref, is_io, retries in specs:
            task_id = client.next_task_id
            client.next_task_id += 1
            key = (client.id, task_id)
            task = MTask(key, set_id, ref, is_io, retries)
            if outstanding >= CONFIG.client_credit:
                task.refused = True
                expected[key] = (Status.ERROR, refused_check("credit"))
            elif is_io and not client.stdio:
                task.refused = True
                expected[key] = (Status.ERROR, refused_check("foreground executor"))
            else:
                outstanding += 1
            self.tasks[key] = task
            client.sets[set_id].task_ids.append(task_id)
            if ref.startswith("dill:") and ref[5:] not in client.sent_blobs:
                blobs[ref[5:]] = BLOBS[ref[5:]]  # a client sends each code blob once
                client.sent_blobs.add(ref[5:])
            payload = pickle.dumps(("task", client.id, task_id))
            entries.append((task_id, ref, payload, FLAG_IO if is_io else 0, retries))
        if close:
            client.sets[set_id].closed = True
        self.handle(client.id, p.Submit(set_id, entries, blobs, close), expected)

    @precondition(lambda self: self.open_sets())
    @rule(which=index)
    def close_set(self, which: int) -> None:
        client, set_id = self.open_sets()[which % len(self.open_sets())]
        client.sets[set_id].closed = True
        self.handle(client.id, p.Submit(set_id, [], {}, True))

    @precondition(lambda self: self.clients())
    @rule(who=index, picks=st.lists(index, min_size=1, max_size=4), unknown=st.booleans())
    def cancel(self, who: int, picks: list[int], unknown: bool) -> None:
        """Cancel some of a client's tasks: queued ones are cancelled at once; for one running
        on an executor (maybe still in its prefetch queue) the CANCEL is forwarded to it."""
        client = self.pick(self.clients(), who)
        mine = [t for t in self.tasks.values() if t.key[0] == client.id]
        ids = [mine[i % len(mine)].key[1] for i in picks] if mine else []
        if unknown:
            ids.append(10**9)
        expected: dict[Key, Any] = {}
        cancels: list[tuple[bytes, int]] = []
        for task_id in ids:
            task = self.tasks.get((client.id, task_id))
            if task is None or task.refused or task.results or task.key in expected:
                continue
            if task.holder is None:
                expected[task.key] = (Status.CANCELLED, no_check)
                event("queued task cancelled")
            else:
                assert task.gid is not None
                cancels.append((task.holder, task.gid))
                event("cancel of a running task")
        self.handle(client.id, p.Cancel(ids), expected, cancels)

    # ================================================================ rules: time and chatter
    @rule(dt=st.floats(0, 40))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.absorb(self.d.tick(self.now))

    @precondition(lambda self: self.peers)
    @rule(who=index, status=st.booleans())
    def chatter(self, who: int, status: bool) -> None:
        peer = self.pick(list(self.peers.values()), who)
        msg: p.Message = p.StatusRequest() if status else p.Heartbeat()
        out = self.d.handle(peer.id, p.decode(p.encode(msg)), self.now)
        if status:
            assert [type(m) for _, m in out] == [p.StatusReply]
        self.absorb(out)

    # ================================================================ invariants
    @invariant()
    def sets_complete_exactly_when_all_results_are_in(self) -> None:
        for client in self.clients():
            for set_id, s in client.sets.items():
                complete = all(self.tasks[(client.id, t)].results for t in s.task_ids)
                assert s.done_messages == (1 if s.closed and complete else 0), (client.id, set_id)

    @invariant()
    def at_most_one_result_and_one_holder(self) -> None:
        holders: dict[Key, bytes] = {}
        for peer in self.peers.values():
            for key in peer.in_flight.values():
                if key[0] in self.peers and not self.tasks[key].results:
                    assert key not in holders, f"{key} in flight on {holders[key]!r} and {peer.id!r}"
                    holders[key] = peer.id
        for task in self.live_tasks():
            assert len(task.results) <= 1
            assert holders.get(task.key) == task.holder

    @invariant()
    def no_idle_executor_while_work_waits(self) -> None:
        live = self.live_tasks()
        plain_waiting = [t.key for t in live if self.queued(t) and not t.io]
        for peer in self.peers.values():
            if peer.capacity and not peer.io_only and len(peer.in_flight) < peer.capacity:
                assert not plain_waiting, f"{peer.name} idles while {plain_waiting} wait"
        for client in self.clients():
            if not client.stdio:
                continue
            io_waiting = [t for t in live if t.key[0] == client.id and t.io and self.queued(t)]
            io_running = [k for k in client.in_flight.values() if self.tasks[k].io]
            assert len(io_running) <= 1
            if io_waiting:
                assert io_running, f"{client.name} has queued IOTasks but runs none"

    # ================================================================ teardown
    def teardown(self) -> None:
        """Close every set, make sure a plain executor exists, run everything to completion."""
        if sys.exc_info()[0] is not None:
            return  # a step already failed (teardown runs in a finally): keep that report clean
        for client, set_id in self.open_sets():
            client.sets[set_id].closed = True
            self.handle(client.id, p.Submit(set_id, [], {}, True))
        if not any(peer.capacity and not peer.io_only for peer in self.peers.values()):
            self.add_executor(2)
        for _ in range(1000):
            busy = self.busy()
            if not busy:
                break
            for peer in busy:
                self.report(peer, [(gid, Status.OK, 100) for gid in peer.in_flight])
        assert not self.busy()
        for task in self.live_tasks():
            assert len(task.results) == 1, f"task {task.key} was lost: {task}"
        for client in self.clients():
            for set_id, s in client.sets.items():
                assert s.done_messages == 1, f"set {set_id} of {client.name} never completed"
        assert not self.d.has_work()


# ---------------------------------------------------------------------------- result checks
def no_check(payload: bytes, executor: str) -> None:
    assert executor == "server"


def same_payload(sent: bytes, name: str) -> Any:
    def check(payload: bytes, executor: str) -> None:
        assert payload == sent
        assert executor == name

    return check


def died_check(name: str, exit_code: int | None) -> Any:
    def check(payload: bytes, executor: str) -> None:
        assert executor == name
        exc = codec.error_to_exception(codec.decode_error(payload))
        assert type(exc) is ExecutorDiedError
        assert exc.exit_code == exit_code
        assert name in str(exc)

    return check


def refused_check(needle: str) -> Any:
    def check(payload: bytes, executor: str) -> None:
        assert executor == "server"
        exc = codec.error_to_exception(codec.decode_error(payload))
        assert isinstance(exc, SubmissionError)
        assert needle in str(exc)

    return check


DispatcherMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    report_multiple_bugs=False,
)
TestDispatcherMachine = DispatcherMachine.TestCase
# Passing takes a few seconds; a failure is shrunk to a minimal story, which can take minutes:
# give it time rather than let the global timeout hide the report.
TestDispatcherMachine.pytestmark = [pytest.mark.timeout(900)]  # type: ignore[attr-defined]
