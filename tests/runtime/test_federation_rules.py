"""Federation rules (issue #8) in the sans-IO dispatcher: two or three Dispatchers wired
together by hand, each with its own executors and clients, driven with an explicit ``now``.

A link between two dispatchers is a pair of peer ids, one on each side (the connector's link
id and the listener's routing id, as in ``server/links.py``); whatever one side emits to its
id is delivered to the other as coming from the other id, in order. ``Fed.hold`` keeps those
messages on the wire, ``Fed.cut`` loses them, and a message emitted to the id of a cut link
is filed as a dead letter in its sender's inbox, where a test can look at it.

The tests at the end are bugs found here (now fixed): the peer's credit, retries on the peer.
"""

from __future__ import annotations

import logging
import pickle
from collections import defaultdict, deque
from typing import Any

import pytest

from taskcs.errors import ExecutorDiedError
from taskcs.runtime import codec
from taskcs.runtime import protocol as p
from taskcs.runtime.dispatcher import Dispatcher, DispatcherConfig
from taskcs.runtime.federation import PYTHON
from taskcs.runtime.task import FLAG_IO, Status

PeerId = bytes
Spec = tuple[int, str, int, int]  # (task_id, func_ref, flags, retries)
Entry = tuple[int, str, bytes, str]


def payload_of(task_id: int) -> bytes:
    return pickle.dumps(("input", task_id))


def wire(msg: p.Message) -> p.Message:
    """Exactly what the other end of a socket would decode."""
    out = p.decode(p.encode(msg))
    assert out == msg, f"{msg!r} does not survive the wire"
    return out


def normal(tid: int, retries: int = 1, ref: str = "std:add") -> Spec:
    return (tid, ref, 0, retries)


def io(tid: int) -> Spec:
    return (tid, "std:prompt", FLAG_IO, 1)


class Node:
    """One dispatcher, and the inboxes of the clients and executors connected to it."""

    def __init__(self, fed: Fed, name: str, config: DispatcherConfig, pid: int) -> None:
        self.fed = fed
        self.name = name
        self.d = Dispatcher(config, server_pid=pid, name=name)
        self.inbox: dict[PeerId, list[p.Message]] = defaultdict(list)

    # -------------------------------------------------------------- driving
    def send(self, peer: PeerId, msg: p.Message) -> None:
        self.fed.route(self, self.d.handle(peer, wire(msg), self.fed.now))
        self.fed.pump()

    def gone(self, peer: PeerId, graceful: bool = False, reason: str = "test") -> None:
        self.fed.route(self, self.d.peer_gone(peer, self.fed.now, reason, graceful=graceful))
        self.fed.pump()

    def tick(self) -> None:
        self.fed.route(self, self.d.tick(self.fed.now))
        self.fed.pump()

    def executor(self, name: str, capacity: int = 1) -> PeerId:
        peer = name.encode()
        self.send(peer, p.Hello("executor", name, self.fed.next_pid(), capacity))
        assert isinstance(self.inbox[peer].pop(0), p.Welcome)
        return peer

    def client(self, name: str, stdio: bool = False, io_only: bool = True, **kwargs: Any) -> PeerId:
        """A client; with ``stdio`` it is also its own foreground executor (capacity 1)."""
        peer = name.encode()
        self.send(peer, p.Hello("client", name, self.fed.next_pid(), 1 if stdio else 0, stdio,
                                io_only and stdio, **kwargs))
        assert isinstance(self.inbox[peer].pop(0), p.Welcome)
        return peer

    def submit(self, client: PeerId, set_id: int, specs: list[Spec], close: bool = True,
               blobs: dict[str, bytes] | None = None) -> None:
        tasks = [(tid, ref, payload_of(tid), flags, retries) for tid, ref, flags, retries in specs]
        self.send(client, p.Submit(set_id, tasks, blobs or {}, close))

    def complete(self, executor: PeerId, gids: list[int], status: int = Status.OK,
                 duration_us: int = 1000) -> None:
        results = [(gid, int(status), pickle.dumps(("result", self.name, gid)), duration_us, 0, 0) for gid in gids]
        self.send(executor, p.ExecDone(results))

    # -------------------------------------------------------------- reading inboxes
    def take(self, peer: PeerId, cls: type[p.Message]) -> list[Any]:
        box = self.inbox[peer]
        mine = [m for m in box if isinstance(m, cls)]
        box[:] = [m for m in box if not isinstance(m, cls)]
        return mine

    def tasks(self, peer: PeerId) -> list[Entry]:
        return [entry for msg in self.take(peer, p.Tasks) for entry in msg.tasks]

    def run(self, executor: PeerId) -> dict[int, int]:
        """The tasks just sent to ``executor``: client task id (from the payload) -> gid here."""
        return {pickle.loads(payload)[1]: gid for gid, _, payload, _ in self.tasks(executor)}

    def results(self, client: PeerId) -> list[tuple[int, int, bytes, str]]:
        return [r[:4] for msg in self.take(client, p.Results) for r in msg.results]  # the timing: test_timeline

    def outcomes(self, client: PeerId) -> dict[int, tuple[int, str]]:
        """task id -> (status, executor) of the results just sent to ``client``; one each."""
        out: dict[int, tuple[int, str]] = {}
        for task_id, status, _, executor in self.results(client):
            assert task_id not in out, f"two results for task {task_id}"
            out[task_id] = (status, executor)
        return out

    def peer_record(self, name: str) -> dict[str, Any]:
        (record,) = [r for r in self.d.status()["peers"] if r["name"] == name]
        return record

    def set_record(self, client: str) -> dict[str, Any]:
        (record,) = [s for s in self.d.status()["sets"] if s["client"] == client]
        return record


class Fed:
    """Dispatchers and the links between them; server-to-server messages are delivered in
    order per direction, at once unless ``hold`` is set."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.links: dict[tuple[str, PeerId], tuple[Node, PeerId]] = {}
        self.in_flight: deque[tuple[Node, PeerId, p.Message]] = deque()
        self.delivered: list[tuple[str, str, p.Message]] = []  # (from, to, message)
        self.now = 0.0
        self.hold = False
        self._gen = 0
        self._pid = 100

    def next_pid(self) -> int:
        self._pid += 1
        return self._pid

    def node(self, name: str, **config: Any) -> Node:
        config.setdefault("heartbeat_interval", None)
        node = self.nodes[name] = Node(self, name, DispatcherConfig(**config), self.next_pid())
        return node

    def route(self, node: Node, out: list[tuple[PeerId, p.Message]]) -> None:
        for peer, msg in out:
            if (node.name, peer) in self.links:
                self.in_flight.append((node, peer, msg))
            else:
                node.inbox[peer].append(wire(msg))

    def pump(self) -> None:
        while self.in_flight and not self.hold:
            src, peer, msg = self.in_flight.popleft()
            dst = self.links.get((src.name, peer))
            if dst is None:
                continue  # the link was cut while this was on its way
            node, their_id = dst
            self.delivered.append((src.name, node.name, msg))
            self.route(node, node.d.handle(their_id, wire(msg), self.now))

    def link(self, a: Node, b: Node) -> tuple[PeerId, PeerId]:
        """``a`` opens a link to ``b`` (``a`` was told ``--peer b``): (a's id, b's id) for it."""
        self._gen += 1
        a_id, b_id = b"\xffL%d" % self._gen, b"\x00R%d" % self._gen
        self.links[(a.name, a_id)] = (b, b_id)
        self.links[(b.name, b_id)] = (a, a_id)
        self.route(a, a.d.introduce(a_id, self.now))
        self.pump()
        return a_id, b_id

    def cut(self, a: Node, a_id: PeerId) -> None:
        """The link is cut: nothing more travels on it either way (in flight: lost)."""
        b, b_id = self.links.pop((a.name, a_id))
        del self.links[(b.name, b_id)]

    def release(self) -> None:
        self.hold = False
        self.pump()

    def sent(self, src: str, dst: str, cls: type[p.Message]) -> list[Any]:
        return [m for s, d, m in self.delivered if (s, d) == (src, dst) and isinstance(m, cls)]

    def forwarded(self, src: str, dst: str) -> list[int]:
        """Client task ids (from the payloads) of the tasks ``src`` forwarded to ``dst``."""
        return [pickle.loads(t[2])[1] for m in self.sent(src, dst, p.Submit) for t in m.tasks]


def died(payload: bytes) -> ExecutorDiedError:
    exc = codec.error_to_exception(codec.decode_error(payload))
    assert type(exc) is ExecutorDiedError
    return exc


def warm_up(a: Node, c: PeerId, remote: Node, executor: PeerId, task_id: int = 999) -> None:
    """Run one std:add task through ``remote`` so ``a`` has measured its run time (1 ms)
    and forwards a prefetch window (5x the peer's slots) from then on."""
    a.submit(c, 99, [normal(task_id)])
    remote.complete(executor, list(remote.run(executor).values()))
    assert a.outcomes(c)[task_id][0] == Status.OK
    a.take(c, p.SetDone)


# --------------------------------------------------------------------------- the link
def test_link_registers_each_server_on_the_other() -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B")
    b.executor("eb", capacity=3)
    a_id, b_id = fed.link(a, b)
    assert a.d.is_server_peer(a_id) and b.d.is_server_peer(b_id)
    assert a.d.peer_name(a_id) == "B" and b.d.peer_name(b_id) == "A"
    assert a.peer_record("B")["capacity"] == 3  # B's idle slots, from its HELLO
    assert b.peer_record("A")["capacity"] == 0  # A has no executors
    (hello,) = fed.sent("A", "B", p.Hello)
    assert (hello.kind, hello.python, hello.features) == ("server", PYTHON, p.FEATURES)
    assert len(fed.sent("B", "A", p.Hello)) == 1  # one HELLO each way: no HELLO ping-pong
    assert a.d.client_count() == b.d.client_count() == 0  # a peer server is not a client


def test_a_heartbeat_to_a_peer_server_is_its_capacity() -> None:
    fed = Fed()
    a, b = fed.node("A", heartbeat_interval=1.0), fed.node("B", heartbeat_interval=1.0)
    a.executor("ea", capacity=2)
    fed.link(a, b)
    before = len(fed.sent("A", "B", p.Capacity))
    fed.now = 1.0
    a.tick()
    assert [m.slots for m in fed.sent("A", "B", p.Capacity)[before:]] == [2]  # sent again, unchanged
    assert fed.sent("A", "B", p.Heartbeat) == []


# --------------------------------------------------------------------------- forwarding
def test_only_the_overflow_of_the_local_executors_is_forwarded() -> None:
    fed = Fed()
    # no prefetch at A: once a run time is measured, ea's window would take task 4 ahead
    a, b = fed.node("A", prefetch_seconds=0.0), fed.node("B")
    ea = a.executor("ea")
    eb1, eb2 = b.executor("eb1"), b.executor("eb2")
    fed.link(a, b)
    c = a.client("c")
    a.submit(c, 1, [normal(i) for i in range(1, 5)])
    on_ea = a.run(ea)
    assert list(on_ea) == [1]  # local first
    assert fed.forwarded("A", "B") == [2, 3]  # then B's two idle slots
    on_eb1, on_eb2 = b.run(eb1), b.run(eb2)
    assert sorted([*on_eb1, *on_eb2]) == [2, 3]
    assert a.d.status()["queued"] == 1  # task 4 waits: nobody has room
    (submit,) = fed.sent("A", "B", p.Submit)
    assert submit.set_id == 0 and all(flags == 0 for *_, flags, _ in submit.tasks)

    (tid, gid), = on_eb1.items()
    b.complete(eb1, [gid])
    ((task_id, status, payload, executor),) = a.results(c)
    assert (task_id, status, executor) == (tid, Status.OK, "B:eb1")
    assert pickle.loads(payload) == ("result", "B", gid)  # B's executor's payload, untouched
    assert fed.forwarded("A", "B") == [2, 3, 4]  # the freed slot at B takes the last task
    b.complete(eb1, list(b.run(eb1).values()))
    b.complete(eb2, list(on_eb2.values()))
    a.complete(ea, list(on_ea.values()))
    outcomes = a.outcomes(c)
    assert outcomes[1] == (Status.OK, "ea")
    assert {outcomes[t][1] for t in outcomes if t != 1} <= {"B:eb1", "B:eb2"}
    assert len(outcomes) == 3
    assert a.take(c, p.SetDone) == [p.SetDone(1, 4, 0, 0)]
    assert not a.d.has_work() and not b.d.has_work()
    record = a.peer_record("B")
    assert (record["forwarded"], record["returned"], record["in_flight"]) == (3, 3, 0)


def test_nothing_is_forwarded_while_the_local_executors_have_room() -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B")
    ea = a.executor("ea", capacity=2)
    eb = b.executor("eb", capacity=4)
    fed.link(a, b)
    c = a.client("c")
    a.submit(c, 1, [normal(1), normal(2)])
    assert sorted(a.run(ea)) == [1, 2]
    assert fed.sent("A", "B", p.Submit) == [] and b.tasks(eb) == []
    assert a.peer_record("B")["forwarded"] == 0


def test_a_peer_offering_no_capacity_gets_nothing_until_it_offers_again() -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B")
    eb = b.executor("eb")
    fed.link(a, b)
    cb = b.client("cb")
    b.submit(cb, 1, [normal(101), normal(102)])  # B's own work fills it and waits: it offers 0
    assert fed.sent("B", "A", p.Capacity)[-1].slots == 0
    assert a.peer_record("B")["capacity"] == 0
    c = a.client("c")
    a.submit(c, 1, [normal(1), normal(2)])
    assert fed.sent("A", "B", p.Submit) == []
    assert a.d.status()["queued"] == 2

    b.complete(eb, list(b.run(eb).values()))  # 102 starts: still no idle slot at B
    assert fed.sent("A", "B", p.Submit) == []
    b.complete(eb, list(b.run(eb).values()))
    assert fed.sent("B", "A", p.Capacity)[-1].slots == 1
    assert fed.forwarded("A", "B") == [1]  # one slot offered, one task
    assert list(b.run(eb)) == [1]


def test_forwarded_work_never_travels_onwards_to_a_third_server() -> None:
    fed = Fed()
    a, b, c3 = fed.node("A"), fed.node("B", prefetch_seconds=0.0), fed.node("C")
    eb = b.executor("eb")
    ec1, ec2 = c3.executor("ec1"), c3.executor("ec2")
    fed.link(a, b)
    fed.link(b, c3)
    c = a.client("c")
    warm_up(a, c, b, eb)
    a.submit(c, 1, [normal(i) for i in range(1, 9)])
    assert fed.forwarded("A", "B")[1:] == [1, 2, 3, 4, 5]  # B's one slot and a prefetch window
    running = b.run(eb)
    assert list(running) == [1]
    assert b.set_record("A")["queued"] == 4  # waiting at B for B's executor, C idle or not
    assert fed.sent("B", "C", p.Submit) == []
    assert c3.tasks(ec1) == [] and c3.tasks(ec2) == []

    cb = b.client("cb")
    b.submit(cb, 1, [normal(101)])  # B's own client's overflow may go to C: only that
    assert fed.forwarded("B", "C") == [101]
    assert sorted([*c3.run(ec1), *c3.run(ec2)]) == [101]
    assert a.set_record("c")["queued"] == 3  # A keeps what B has no room for

    done: dict[int, tuple[int, str]] = {}
    for _ in range(20):
        if not running:
            break
        b.complete(eb, list(running.values()))
        done.update(a.outcomes(c))
        running = b.run(eb)
    assert sorted(done) == list(range(1, 9))
    assert {executor for _, executor in done.values()} == {"B:eb"}
    assert fed.forwarded("B", "C") == [101]  # nothing of A's ever reached C
    assert c3.peer_record("B")["forwarded"] == 0 and c3.d.status()["stats"]["submitted"] == 1


def test_io_tasks_stay_on_their_clients_terminal() -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B")
    eb = b.executor("eb", capacity=4)
    fed.link(a, b)
    c = a.client("c", stdio=True, io_only=True)
    a.submit(c, 1, [io(1), normal(2), io(3), normal(4)])
    assert fed.forwarded("A", "B") == [2, 4]
    on_b = b.run(eb)
    assert sorted(on_b) == [2, 4]
    first = a.run(c)
    assert list(first) == [1]  # one prompt at a time, on the client
    b.complete(eb, list(on_b.values()))
    a.complete(c, list(first.values()))
    assert list(a.run(c)) == [3]
    assert fed.forwarded("A", "B") == [2, 4]
    outcomes = a.outcomes(c)
    assert outcomes == {1: (Status.OK, "c"), 2: (Status.OK, "B:eb"), 4: (Status.OK, "B:eb")}


def test_a_forwarded_task_carries_code_once_per_link_and_never_the_clients_path() -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B")
    eb = b.executor("eb", capacity=4)
    a_id, _ = fed.link(a, b)
    code = b"code of a user's function"
    digest = codec.blob_digest(code)
    c = a.client("c", sys_path=["/home/u/project"])
    a.submit(c, 1, [normal(1, ref="dill:" + digest)], blobs={digest: code})
    (first,) = fed.sent("A", "B", p.Submit)
    assert first.blobs == {digest: code}  # the code, not the client's import path
    ((gid, ref, _, ctx),) = b.tasks(eb)
    assert (ref, ctx) == ("dill:" + digest, "")
    assert b.inbox[eb] == [] and b.d._blobs[digest] == code
    a.submit(c, 2, [normal(2, ref="dill:" + digest)])
    assert fed.sent("A", "B", p.Submit)[1].blobs == {}  # B has it already
    b.complete(eb, [gid, *b.run(eb).values()])

    fed.cut(a, a_id)  # a new link is a new connection: the code travels again
    a.gone(a_id)
    fed.link(a, b)
    a.submit(c, 3, [normal(3, ref="dill:" + digest)])
    assert fed.sent("A", "B", p.Submit)[-1].blobs == {digest: code}


def test_output_of_a_forwarded_task_reaches_its_client() -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B")
    eb = b.executor("eb")
    fed.link(a, b)
    c = a.client("c")
    a.submit(c, 1, [normal(7)])
    (gid,) = b.run(eb).values()
    b.send(eb, p.Output([(gid, "hello from B\n")]))
    assert a.take(c, p.Output) == [p.Output([(7, "hello from B\n")])]


# --------------------------------------------------------------------------- peer loss
def test_lost_peers_tasks_are_requeued_and_one_without_retries_fails() -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B")
    ea = a.executor("ea")
    eb = b.executor("eb", capacity=2)
    a_id, _ = fed.link(a, b)
    c = a.client("c")
    a.submit(c, 1, [normal(1), normal(2, retries=1), normal(3, retries=0)])
    on_ea = a.run(ea)
    assert list(on_ea) == [1] and sorted(b.run(eb)) == [2, 3]
    fed.hold = True
    a.gone(a_id, reason="silent for 5.1s")  # A declares B lost
    ((task_id, status, payload, executor),) = a.results(c)
    assert (task_id, status, executor) == (3, Status.ERROR, "B")
    exc = died(payload)
    assert "peer server B" in str(exc) and "task 3" in str(exc) and "silent for 5.1s" in str(exc)
    assert a.d.status()["queued"] == 1 and a.d.status()["stats"]["retried"] == 1
    assert a.d.status()["peers"] == []
    fed.release()  # A's BYE reaches B: B drops A's tasks, its executor's results go nowhere
    assert [m.reason for m in fed.sent("A", "B", p.Bye)] == ["declared lost: silent for 5.1s"]
    assert not b.d.has_work() and b.d.status()["peers"] == []
    b.complete(eb, [g for g in b.d._peers[eb].in_flight])
    assert fed.sent("B", "A", p.PeerDone) == []

    a.complete(ea, list(on_ea.values()))
    a.complete(ea, list(a.run(ea).values()))  # task 2, requeued, runs locally now
    assert a.outcomes(c) == {1: (Status.OK, "ea"), 2: (Status.OK, "ea")}
    assert a.take(c, p.SetDone) == [p.SetDone(1, 2, 1, 0)]
    assert not a.d.has_work()


def test_a_silent_peer_expires_at_both_ends_and_its_work_runs_elsewhere() -> None:
    fed = Fed()
    cfg = {"heartbeat_interval": 1.0, "liveness": 3}
    a, b = fed.node("A", **cfg), fed.node("B", **cfg)
    ea = a.executor("ea")
    eb = b.executor("eb")
    for node in (a, b):
        node.d.mark_supervised(node.d._peers[ea if node is a else eb].hello.pid)
    a_id, _ = fed.link(a, b)
    c = a.client("c")
    a.submit(c, 1, [normal(1), normal(2)])
    on_ea, on_eb = a.run(ea), b.run(eb)
    assert (list(on_ea), list(on_eb)) == ([1], [2])
    fed.cut(a, a_id)  # B freezes, or the network goes: nothing arrives either way
    for now in (1.0, 2.0, 3.0, 3.5):
        fed.now = now
        a.send(c, p.Heartbeat())  # the client is alive; the peer server is silent
        a.tick()
        b.tick()
    assert a.d.status()["peers"] == [] and b.d.status()["peers"] == []
    assert not b.d.has_work()  # B dropped A's task (its executor may still finish it)
    assert a.results(c) == []  # task 2 was requeued (one retry), not failed
    a.complete(ea, list(on_ea.values()))
    a.complete(ea, list(a.run(ea).values()))
    assert a.outcomes(c) == {1: (Status.OK, "ea"), 2: (Status.OK, "ea")}


def test_a_peer_leaving_gracefully_consumes_no_retry() -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B")
    eb = b.executor("eb")
    fed.link(a, b)
    c = a.client("c")
    a.submit(c, 1, [normal(1, retries=0)])
    assert list(b.run(eb)) == [1]
    fed.route(b, b.d.goodbye("server stopping"))
    fed.pump()
    assert a.results(c) == []  # requeued: a server that says BYE did not die mid-task
    assert a.d.status()["queued"] == 1 and a.d.status()["stats"]["retried"] == 0
    ea = a.executor("ea")
    a.complete(ea, list(a.run(ea).values()))
    assert a.outcomes(c) == {1: (Status.OK, "ea")}


def test_a_peer_stopping_now_fails_its_own_clients_tasks_and_hands_ours_back() -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B")
    eb = b.executor("eb", capacity=2)
    fed.link(a, b)
    c, cb = a.client("c"), b.client("cb")
    a.submit(c, 1, [normal(1, retries=0)])
    b.submit(cb, 1, [normal(101), normal(102)])
    assert sorted(b.run(eb)) == [1, 101]
    fed.route(b, b.d.abort("server stopping now"))  # cs-server stop --now at B
    fed.route(b, b.d.goodbye("stopping"))
    fed.pump()
    assert {t: s for t, (s, _) in b.outcomes(cb).items()} == {101: Status.ERROR, 102: Status.ERROR}
    assert a.results(c) == [] and a.d.status()["queued"] == 1  # requeued: B left, it did not die
    ea = a.executor("ea")
    a.complete(ea, list(a.run(ea).values()))
    assert a.outcomes(c) == {1: (Status.OK, "ea")}


def test_tasks_of_a_server_that_leaves_are_dropped_where_they_wait_or_run() -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B", prefetch_seconds=0.0)
    eb = b.executor("eb")
    fed.link(a, b)
    c = a.client("c")
    warm_up(a, c, b, eb)
    a.submit(c, 1, [normal(i) for i in range(1, 4)])
    running = b.run(eb)
    assert b.set_record("A")["queued"] == 2
    fed.route(a, a.d.goodbye("stopping"))
    fed.pump()
    assert not b.d.has_work() and b.d.status()["sets"] == []
    assert b.d._pending == 0 and b.d._pending_fwd == 0
    b.complete(eb, list(running.values()))  # its result has nobody to go to
    assert fed.sent("B", "A", p.PeerDone)[1:] == [] and b.tasks(eb) == []
    cb = b.client("cb")
    b.submit(cb, 1, [normal(101)])  # B serves its own clients as before
    assert list(b.run(eb)) == [101]


def test_a_late_result_from_a_peer_declared_lost_is_discarded() -> None:
    """B (the connector) froze; A (the listener) declared it lost, but B's socket stays the
    same, so B's late PEER_DONE arrives under the old routing id."""
    fed = Fed()
    a, b = fed.node("A"), fed.node("B")
    ea = a.executor("ea")
    eb = b.executor("eb")
    b_link, a_rid = fed.link(b, a)
    c = a.client("c")
    a.submit(c, 1, [normal(1), normal(2)])
    on_ea, on_eb = a.run(ea), b.run(eb)
    assert (list(on_ea), list(on_eb)) == ([1], [2])
    fed.hold = True
    a.gone(a_rid, reason="silent")
    fed.in_flight.clear()  # A's BYE is lost too
    fed.release()
    b.complete(eb, list(on_eb.values()))  # B wakes up and reports
    assert a.results(c) == []  # nobody asked A for a result of the old link
    assert a.d.peers() == [ea, c]
    (error,) = fed.sent("A", "B", p.Error)
    assert "PEER_DONE before HELLO" in error.text
    assert not b.d.is_server_peer(b_link)  # so B starts afresh (its LinkManager reconnects)
    fed.link(b, a)  # task 2, requeued at A, goes to B again on the new link
    assert a.peer_record("B")["returned"] == 0 and a.peer_record("B")["forwarded"] == 2
    on_b2 = b.run(eb)
    assert list(on_b2) == [2] and on_b2[2] != on_eb[2]
    a.complete(ea, list(on_ea.values()))
    b.complete(eb, list(on_b2.values()))
    assert a.outcomes(c) == {1: (Status.OK, "ea"), 2: (Status.OK, "B:eb")}
    assert a.take(c, p.SetDone) == [p.SetDone(1, 2, 0, 0)]


def test_a_result_from_a_peer_no_longer_holding_the_task_is_discarded() -> None:
    """Task 1 went to B; B was lost and the task went on to C. A PEER_DONE about it from B's
    new link (a stale or confused peer) must not reach the client: C's result does."""
    fed = Fed()
    a, b, c3 = fed.node("A"), fed.node("B"), fed.node("C")
    eb, ec = b.executor("eb"), c3.executor("ec")
    ab, _ = fed.link(a, b)
    c = a.client("c")
    a.submit(c, 1, [normal(1)])  # B and C both idle: the first peer gets it
    assert fed.forwarded("A", "B") == [1]
    (gid,) = [t[0] for m in fed.sent("A", "B", p.Submit) for t in m.tasks]
    fed.cut(a, ab)
    a.gone(ab)
    fed.link(a, c3)
    assert fed.forwarded("A", "C") == [1]
    ab2, _ = fed.link(a, b)
    a.send(ab2, p.PeerDone([(gid, int(Status.OK), b"stale", 5, "eb", 0, 0)]))
    assert a.results(c) == []
    assert a.peer_record("B")["returned"] == 0
    c3.complete(ec, list(c3.run(ec).values()))
    assert a.outcomes(c) == {1: (Status.OK, "C:ec")}
    assert b.tasks(eb)  # B's stale copy of the old link still runs there, harmlessly


# --------------------------------------------------------------------------- cancellation
def test_cancel_reaches_a_forwarded_task_queued_or_running_at_the_peer() -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B", prefetch_seconds=0.0)
    eb = b.executor("eb")
    fed.link(a, b)
    c = a.client("c")
    warm_up(a, c, b, eb)
    a.submit(c, 1, [normal(1), normal(2), normal(3)])
    assert fed.forwarded("A", "B")[1:] == [1, 2, 3]
    gids_at_a = {pickle.loads(t[2])[1]: t[0] for t in fed.sent("A", "B", p.Submit)[-1].tasks}
    on_eb = b.run(eb)
    assert list(on_eb) == [1]

    a.send(c, p.Cancel([3]))  # queued at B: B answers CANCELLED at once
    assert fed.sent("A", "B", p.Cancel) == [p.Cancel([gids_at_a[3]])]  # by A's gid
    assert a.outcomes(c) == {3: (Status.CANCELLED, "B:server")}

    a.send(c, p.Cancel([1]))  # running on B's executor: B says so, and future.cancel() is False
    assert b.take(eb, p.Cancel) == []
    assert a.take(c, p.NotCancelled) == [p.NotCancelled([1])]
    b.complete(eb, [on_eb[1]])  # its result comes as usual
    assert a.outcomes(c) == {1: (Status.OK, "B:eb")}

    on_eb = b.run(eb)
    assert list(on_eb) == [2]
    a.send(c, p.Cancel([2]))
    assert a.take(c, p.NotCancelled) == [p.NotCancelled([2])]
    b.complete(eb, list(on_eb.values()))
    assert a.outcomes(c) == {2: (Status.OK, "B:eb")}
    assert a.take(c, p.SetDone) == [p.SetDone(1, 2, 0, 1)]
    assert not a.d.has_work() and not b.d.has_work()
    assert a.peer_record("B")["returned"] == 4


# --------------------------------------------------------------------------- versions
def test_a_peer_speaking_other_features_is_refused_naming_both_versions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fed = Fed()
    b = fed.node("B")
    b.executor("eb")
    other = p.FEATURES + 1
    caplog.set_level(logging.WARNING)
    out = b.d.handle(b"\x00R1", wire(p.Hello("server", "A", 77, 2, python=PYTHON, features=other)), 0.0)
    assert [type(m) for _, m in out] == [p.Error, p.Bye]
    text = out[0][1].text
    assert f"{p.VERSION}.{other}" in text and f"{p.VERSION}.{p.FEATURES}" in text and "'A'" in text
    assert any(f"{p.VERSION}.{other}" in r.getMessage() and f"{p.VERSION}.{p.FEATURES}" in r.getMessage()
               for r in caplog.records)
    assert b.d.peers() == [b"eb"] and b.d.status()["peers"] == []
    out = b.d.handle(b"\x00R1", wire(p.Submit(0, [(1, "std:add", b"", 0, 0)], {}, True)), 0.0)
    assert [type(m) for _, m in out] == [p.Error]  # nothing runs for it
    assert not b.d.has_work()


def test_our_hello_answered_by_other_features_is_refused_too() -> None:
    fed = Fed()
    a = fed.node("A")
    out = a.d.introduce(b"\xffL1", 0.0)
    assert [type(m) for _, m in out] == [p.Hello]
    out = a.d.handle(b"\xffL1", wire(p.Hello("server", "B", 78, 4, python=PYTHON, features=p.FEATURES - 1)), 0.0)
    assert [type(m) for _, m in out] == [p.Error, p.Bye]
    assert f"{p.VERSION}.{p.FEATURES - 1}" in out[0][1].text
    assert not a.d.is_server_peer(b"\xffL1")


def test_a_peer_of_another_python_minor_gets_nothing_forwarded(caplog: pytest.LogCaptureFixture) -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B")
    eb = b.executor("eb")
    caplog.set_level(logging.WARNING)
    other_python = "3.10" if PYTHON != "3.10" else "3.12"
    odd = b"\x00Rodd"
    a.send(odd, p.Hello("server", "Old", 79, 8, python=other_python, features=p.FEATURES))
    assert a.d.is_server_peer(odd)  # linked (it may still forward us its own work) ...
    assert a.peer_record("Old")["python"] == other_python and a.peer_record("Old")["capacity"] == 8
    assert any(other_python in r.getMessage() and PYTHON in r.getMessage() for r in caplog.records)
    c = a.client("c")
    a.submit(c, 1, [normal(1), normal(2)])
    assert not any(isinstance(m, p.Submit) for m in a.inbox[odd])  # ... but gets no work
    assert a.d.status()["queued"] == 2
    fed.link(a, b)  # a peer of our Python takes it
    assert sorted(b.run(eb)) == [1]


# --------------------------------------------------------------------------- status
def test_status_counts_forwarded_and_returned_per_peer_name_across_reconnections() -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B")
    eb = b.executor("eb", capacity=3)
    a_id, _ = fed.link(a, b)
    c = a.client("c")
    a.submit(c, 1, [normal(1), normal(2), normal(3)], close=False)
    on_eb = b.run(eb)
    b.complete(eb, [on_eb[1], on_eb[2]])
    record = a.peer_record("B")
    assert (record["forwarded"], record["returned"], record["in_flight"]) == (3, 2, 1)
    # B's idle slots, where A's own running tasks count as idle: A's window is this minus in_flight
    assert record["capacity"] == 3 and record["python"] == PYTHON
    assert b.peer_record("A")["forwarded"] == 0 and b.peer_record("A")["held"] == 1
    fed.cut(a, a_id)
    a.gone(a_id)  # task 3 requeued (one retry), and B forgets it when it notices the loss
    fed.link(a, b)
    assert a.peer_record("B")["forwarded"] == 4  # same name, same counters
    b.complete(eb, list(b.run(eb).values()))
    assert a.peer_record("B")["returned"] == 3
    assert sorted(a.outcomes(c)) == [1, 2, 3]


# ------------------------------------------------------- bugs these tests found (fixed)
def test_forwarding_never_exceeds_the_peers_credit() -> None:
    """With the default config the same happens to a peer with >= 32 executor slots, trivial
    tasks (measured <= 7 us) and more than 16384 tasks waiting at the origin over its clients."""
    fed = Fed()
    a, b = fed.node("A", client_credit=10), fed.node("B", client_credit=10)
    eb = b.executor("eb", capacity=2)
    fed.link(a, b)
    c1, c2 = a.client("c1"), a.client("c2")
    a.submit(c1, 99, [normal(999)])
    b.complete(eb, list(b.run(eb).values()), duration_us=1)  # A's window for B: 2 + 512 * 2
    assert a.outcomes(c1) == {999: (Status.OK, "B:eb")}
    a.submit(c1, 1, [normal(i) for i in range(1, 11)])  # each client within its credit at A
    a.submit(c2, 1, [normal(i) for i in range(1, 11)])
    assert a.results(c1) == [] and a.results(c2) == []  # actual: c2's ten fail, "B:server"
    done: dict[int, tuple[int, str]] = {}
    for _ in range(5):
        b.complete(eb, list(b.run(eb).values()))
        done.update({(1, t): r for t, r in a.outcomes(c1).items()})
        done.update({(2, t): r for t, r in a.outcomes(c2).items()})
    assert sorted(done.values()) == [(Status.OK, "B:eb")] * 20


def test_a_forwarded_task_whose_executor_at_the_peer_dies_is_retried() -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B")
    eb = b.executor("eb")
    fed.link(a, b)
    c = a.client("c")
    a.submit(c, 1, [normal(1, retries=1)])
    assert list(b.run(eb)) == [1]
    b.gone(eb, reason="killed by signal 9")
    # actual: [(1, ERROR, ExecutorDiedError("executor eb died while running task 1 ..."), "B:eb")]
    assert a.results(c) == []
    eb2 = b.executor("eb2")  # retried at B or requeued at A and forwarded again: it runs here
    b.complete(eb2, list(b.run(eb2).values()))
    assert a.outcomes(c) == {1: (Status.OK, "B:eb2")}
