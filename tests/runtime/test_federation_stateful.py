"""A hypothesis state machine over two or three federated Dispatchers (issue #8).

Each dispatcher has 0-2 simulated executors and some clients (some with a foreground stdio
executor for IOTasks). Links between dispatchers are opened by a connector, as
``server/links.py`` does: each opening has new peer ids at both ends. Messages between
dispatchers queue per direction and are delivered in order (one ZeroMQ connection each way),
interleaved at random with everything else. A link can be cut (what is in flight is lost, the
listener notices only by expiry), either end can declare the other lost while the link still
carries messages (a frozen peer: its late messages arrive under an id no longer registered),
and the connector closes its socket and reconnects once its dispatcher has dropped the link.

Checked after every step and once everything has quiesced:

* every task a still-connected client submitted gets exactly one result (a second result
  fails at once; a missing one at the end), and each closed set one SET_DONE after them;
* a result reported by an executor reaches the client with that executor's status and
  name, prefixed by its server's name when it ran on a peer;
* an IOTask is only ever sent to its own client's foreground executor; a task runs on a
  dispatcher other than its origin only after that origin forwarded it there directly, and a
  server forwards only its own clients' tasks (never onwards, never an IOTask);
* nothing is sent to a client or executor that has left;
* the dispatchers' counters are never negative and match their task records (``_pending``,
  ``_pending_fwd``, every set's queued and running); at the end no dispatcher holds work.
"""

from __future__ import annotations

import pickle
import sys
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from taskcs.runtime import protocol as p
from taskcs.runtime.dispatcher import Dispatcher, DispatcherConfig
from taskcs.runtime.task import FLAG_IO, Status, TaskState
from tests.runtime.test_dispatcher_stateful import MSet  # the same model of a task set

#: Heartbeats (CAPACITY between servers) flow when the tick rule reaches the interval, but
#: nobody expires by the clock: expiry is the declare_lost rule, at a moment hypothesis picks.
CONFIG = DispatcherConfig(heartbeat_interval=50.0, liveness=10**9)
NAMES = "ABC"
Key = tuple[str, int]  # (client name, task id)
index = st.integers(min_value=0, max_value=15)  # picks among few things: small draws
T = TypeVar("T")


def wire(msg: p.Message) -> p.Message:
    out = p.decode(p.encode(msg))
    assert out == msg, f"{msg!r} does not survive the wire"
    return out


def key_of(payload: bytes) -> Key:
    kind, client, task_id = pickle.loads(payload)
    assert kind == "task"
    return client, task_id


@dataclass
class MTask:
    key: Key
    origin: int
    io: bool
    set_id: int
    results: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class MExec:
    """An executor, or a client's foreground executor (``client``)."""

    node: int
    id: bytes
    capacity: int
    io_only: bool = False
    client: bool = False
    in_flight: dict[int, Key] = field(default_factory=dict)  # gid at its node -> task
    cancels: set[int] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.id.decode()


@dataclass
class MClient:
    node: int
    id: bytes
    stdio: bool
    sets: dict[int, MSet] = field(default_factory=dict)
    next_task_id: int = 1
    next_set_id: int = 1

    @property
    def name(self) -> str:
        return self.id.decode()


@dataclass
class MLink:
    """One opening of a link: ``a`` connected to ``b``; queues and flags keyed by receiver."""

    a: int
    b: int
    a_id: bytes
    b_id: bytes
    state: str = "connecting"  # the connector's view: connecting | connected | closed
    to: dict[int, deque[p.Message]] = field(default_factory=dict)
    accept: dict[int, bool] = field(default_factory=dict)  # new messages towards it still travel

    def __post_init__(self) -> None:
        self.to = {self.a: deque(), self.b: deque()}
        self.accept = {self.a: True, self.b: True}

    def id_at(self, node: int) -> bytes:
        return self.a_id if node == self.a else self.b_id

    def other(self, node: int) -> int:
        return self.b if node == self.a else self.a

    def silent_towards(self, node: int) -> bool:
        """Nothing will ever again arrive at ``node`` on this link."""
        return not self.accept[node] and not self.to[node]


class FederationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[Dispatcher] = []
        self.now = 0.0
        self.execs: dict[tuple[int, bytes], MExec] = {}  # connected executors, by (node, id)
        self.clients: dict[bytes, MClient] = {}  # connected clients (ids are unique overall)
        self.gone: set[tuple[int, bytes]] = set()  # clients and executors that left
        self.links: list[MLink] = []
        self.by_id: dict[tuple[int, bytes], MLink] = {}
        self.current: dict[tuple[int, int], MLink] = {}  # pair -> the connector's latest link
        self.connector: dict[tuple[int, int], int] = {}
        self.tasks: dict[Key, MTask] = {}
        self.arrived: set[tuple[int, Key]] = set()  # (node, task): forwarded there by its origin
        self.reports: dict[bytes, tuple[Key, int, str, int]] = {}  # payload -> task, node, executor, status
        self.counter = 0
        self.remote_results = 0

    # ================================================================ plumbing
    def new_id(self, prefix: str) -> bytes:
        self.counter += 1
        return f"{prefix}{self.counter}".encode()

    def pick(self, items: list[T], i: int) -> T:
        return items[i % len(items)]

    def send(self, node: int, peer_id: bytes, msg: p.Message) -> None:
        self.route(node, self.nodes[node].handle(peer_id, wire(msg), self.now))

    def route(self, node: int, out: list[tuple[bytes, p.Message]]) -> None:
        for peer_id, msg in out:
            msg = wire(msg)
            link = self.by_id.get((node, peer_id))
            if link is not None:
                self.check_server_message(node, msg)
                to = link.other(node)
                if link.accept[to]:
                    link.to[to].append(msg)
                continue
            assert (node, peer_id) not in self.gone, f"{msg!r} sent by {NAMES[node]} to {peer_id!r}, which left"
            ex = self.execs.get((node, peer_id))
            client = self.clients.get(peer_id)
            if isinstance(msg, p.Tasks):
                assert ex is not None, f"TASKS to {peer_id!r}, not an executor"
                self.on_tasks(ex, msg)
            elif isinstance(msg, p.Cancel):
                assert ex is not None and not ex.client, f"CANCEL to {peer_id!r}"
                for gid in msg.task_ids:
                    assert gid in ex.in_flight, f"CANCEL of gid {gid}, not on {ex.name}"
                    ex.cancels.add(gid)
            elif isinstance(msg, p.Interrupt):  # a gone client's or force-cancelled running task
                assert ex is not None and not ex.client, f"INTERRUPT to {peer_id!r}"
                for gid in msg.gids:
                    assert gid in ex.in_flight, f"INTERRUPT of gid {gid}, not on {ex.name}"
                    ex.cancels.add(gid)  # it answers CANCELLED, and the dispatcher drops that
            elif isinstance(msg, p.Results):
                assert client is not None and client.node == node
                self.on_results(client, msg)
            elif isinstance(msg, p.SetDone):
                assert client is not None and client.node == node
                self.on_set_done(client, msg)
            elif isinstance(msg, p.NotCancelled):  # a cancel came too late: the task runs somewhere
                assert client is not None and client.node == node
                for task_id in msg.ids:
                    assert (client.name, task_id) in self.tasks, f"NOT_CANCELLED of unknown task {task_id}"
            elif isinstance(msg, p.Credit):  # a client's share of its server's budget
                assert client is not None and client.node == node and msg.credit > 0
            elif not isinstance(msg, (p.Welcome, p.Heartbeat)):
                raise AssertionError(f"unexpected {msg!r} from {NAMES[node]} to {peer_id!r}")

    def check_server_message(self, node: int, msg: p.Message) -> None:
        if isinstance(msg, (p.Cancel, p.PeerDone)):
            event(f"{type(msg).__name__} sent to a peer server")
        if isinstance(msg, p.Submit):
            assert msg.set_id == 0 and msg.tasks
            for _, _, payload, flags, _ in msg.tasks:
                task = self.tasks[key_of(payload)]
                assert task.origin == node, f"{NAMES[node]} forwarded {task.key} of {NAMES[task.origin]} onwards"
                assert not task.io and flags == 0, f"IOTask {task.key} forwarded"

    def on_tasks(self, ex: MExec, msg: p.Tasks) -> None:
        for gid, _, payload, _ in msg.tasks:
            key = key_of(payload)
            task = self.tasks[key]
            if task.io:
                assert ex.client and ex.name == key[0] and ex.node == task.origin, f"IOTask {key} sent to {ex.name}"
                assert not any(self.tasks[k].io for k in ex.in_flight.values()), "two IOTasks at once"
            else:
                assert not ex.io_only, f"plain task {key} sent to io_only {ex.name}"
            if ex.node != task.origin:
                assert (ex.node, key) in self.arrived, f"{key} runs on {NAMES[ex.node]} without being forwarded there"
            assert gid not in ex.in_flight
            ex.in_flight[gid] = key

    def on_results(self, client: MClient, msg: p.Results) -> None:
        for task_id, status, payload, executor, *_ in msg.results:
            task = self.tasks[(client.name, task_id)]
            assert not task.results, f"second result for {task.key}: {status} from {executor}, had {task.results}"
            report = self.reports.get(payload)
            if report is not None:
                key, node, name, reported = report
                assert key == task.key and status == reported
                assert executor == (name if node == task.origin else f"{NAMES[node]}:{name}"), executor
                if node != task.origin:
                    self.remote_results += 1
            elif ":" in executor:
                event(f"result from a peer server: {Status(status).name}")
            task.results.append((status, executor))

    def on_set_done(self, client: MClient, msg: p.SetDone) -> None:
        s = client.sets[msg.set_id]
        assert s.closed and s.done_messages == 0, f"SET_DONE {msg.set_id} of {client.name}"
        statuses = []
        for task_id in s.task_ids:
            results = self.tasks[(client.name, task_id)].results
            assert len(results) == 1, f"SET_DONE {msg.set_id} before the result of task {task_id}"
            statuses.append(results[0][0])
        assert (msg.done, msg.failed, msg.cancelled) == tuple(statuses.count(x) for x in Status)
        s.done_messages += 1

    def deliver(self, link: MLink, to: int, n: int) -> None:
        queue = link.to[to]
        for _ in range(n):
            if not queue:
                return
            msg = queue.popleft()
            if isinstance(msg, p.Submit):
                self.arrived.update((to, key_of(t[2])) for t in msg.tasks)
            if not self.nodes[to].is_server_peer(link.id_at(to)) and not isinstance(msg, (p.Hello, p.Welcome)):
                event(f"{type(msg).__name__} arrived on a link its receiver no longer knows")
            self.send(to, link.id_at(to), msg)

    def close_link(self, link: MLink, reason: str) -> None:
        """The connector closes its socket: what it sent is on the wire, the rest is lost."""
        link.state = "closed"
        self.route(link.a, self.nodes[link.a].forget(link.a_id, self.now, reason))
        link.accept[link.a] = link.accept[link.b] = False
        link.to[link.a].clear()

    def plain_executors(self, node: int) -> list[MExec]:
        return [ex for ex in self.execs.values() if ex.node == node and not ex.client]

    # ================================================================ rules: set-up and peers
    @initialize(
        n=st.sampled_from([2, 3, 3]),
        capacities=st.lists(st.lists(st.integers(1, 2), max_size=2), min_size=3, max_size=3),
        starved=st.sampled_from([True, True, False]),
        clients=st.lists(st.tuples(st.sampled_from([0, 0, 1, 2]), st.booleans(), st.booleans()),
                         min_size=1, max_size=3),
        links=st.lists(st.tuples(st.booleans(), st.sampled_from([True, True, True, False])),
                       min_size=3, max_size=3),
        first=st.integers(0, 8),
        prefetch=st.lists(st.sampled_from([CONFIG.prefetch_seconds, 0.0]), min_size=3, max_size=3),
    )
    def start(self, n: int, capacities: list[list[int]], starved: bool, clients: list[tuple[int, bool, bool]],
              links: list[tuple[bool, bool]], first: int, prefetch: list[float]) -> None:
        """Most runs start with their links up, and many with the first dispatcher (where
        half the clients are) without executors: its work must travel. A dispatcher without
        prefetch forwards no more than its peers' slots but queues work forwarded to it (from
        a peer's window) rather than prefetch it to its executors."""
        self.nodes = [Dispatcher(replace(CONFIG, prefetch_seconds=prefetch[i]), server_pid=i + 1, name=NAMES[i])
                      for i in range(n)]
        for node in range(n):
            for capacity in capacities[node] if node or not starved else []:
                self.add_executor(node, capacity)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        for (i, j), (flip, now) in zip(pairs, links, strict=False):
            self.connector[(i, j)] = j if flip else i
            if now:
                self.open(i, j)
        while self.queues():
            link, to = self.queues()[0]
            self.deliver(link, to, 1)
        self.link_manager_step()
        for node, stdio, io_only in clients:
            self.add_client(node, stdio, io_only)
        if first:  # every run has work from its start
            self.submit(0, False, 0, False, [(i % 5 == 4, 1) for i in range(first)])

    @rule(node=index, capacity=st.integers(1, 2))
    def add_executor(self, node: int, capacity: int) -> None:
        node %= len(self.nodes)
        if len(self.plain_executors(node)) >= 2:
            return
        ex = MExec(node, self.new_id("e"), capacity)
        self.execs[(node, ex.id)] = ex
        self.send(node, ex.id, p.Hello("executor", ex.name, self.counter, capacity))

    @rule(node=index, stdio=st.booleans(), io_only=st.booleans())
    def add_client(self, node: int, stdio: bool, io_only: bool) -> None:
        node %= len(self.nodes)
        client = MClient(node, self.new_id("c"), stdio)
        self.clients[client.id] = client
        if stdio:
            self.execs[(node, client.id)] = MExec(node, client.id, 1, io_only, client=True)
        self.send(node, client.id, p.Hello("client", client.name, self.counter, int(stdio), stdio, io_only and stdio))

    @precondition(lambda self: any(not ex.client for ex in self.execs.values()))
    @rule(who=index, how=st.sampled_from(["bye", "killed", "graceful"]), exit_code=st.sampled_from([None, -9, 1]))
    def executor_leaves(self, who: int, how: str, exit_code: int | None) -> None:
        ex = self.pick([ex for ex in self.execs.values() if not ex.client], who)
        event(f"executor leaves ({how}) with {len(ex.in_flight)} tasks")
        del self.execs[(ex.node, ex.id)]
        self.gone.add((ex.node, ex.id))
        if how == "bye":
            self.send(ex.node, ex.id, p.Bye("leaving"))
        else:
            d = self.nodes[ex.node]
            self.route(ex.node, d.peer_gone(ex.id, self.now, "test", exit_code, graceful=how == "graceful"))

    @precondition(lambda self: self.clients)
    @rule(who=index)
    def client_leaves(self, who: int) -> None:
        client = self.pick(list(self.clients.values()), who)
        del self.clients[client.id]
        self.execs.pop((client.node, client.id), None)
        self.gone.add((client.node, client.id))
        self.route(client.node, self.nodes[client.node].peer_gone(client.id, self.now, "test"))

    # ================================================================ rules: executors
    def busy(self) -> list[MExec]:
        return [ex for ex in self.execs.values() if ex.in_flight]

    def report(self, ex: MExec, picks: list[tuple[int, int]], duration_us: int) -> None:
        gids = list(ex.in_flight)
        results = []
        for i, status in picks:
            gid = gids[i % len(gids)]
            if gid not in ex.in_flight:
                continue
            key = ex.in_flight.pop(gid)
            if status == Status.CANCELLED and gid not in ex.cancels:
                status = Status.ERROR  # an executor answers CANCELLED only when asked
            payload = b""
            if status != Status.CANCELLED:
                self.counter += 1
                payload = pickle.dumps(("result", ex.node, ex.name, gid, self.counter))
                self.reports[payload] = (key, ex.node, ex.name, int(status))
            ex.cancels.discard(gid)
            results.append((gid, int(status), payload, duration_us, 0, 0))
        self.send(ex.node, ex.id, p.ExecDone(results))

    @precondition(lambda self: self.busy())
    @rule(who=index, picks=st.lists(st.tuples(index, st.sampled_from([0, 0, 1, 2])), min_size=1, max_size=4),
          duration_us=st.sampled_from([100, 1000, 10**6]))
    def executor_reports(self, who: int, picks: list[tuple[int, int]], duration_us: int) -> None:
        """Some results: ok, error, or (for tasks it was asked to drop) cancelled."""
        self.report(self.pick(self.busy(), who), picks, duration_us)

    # ================================================================ rules: clients
    @precondition(lambda self: self.clients)
    @rule(who=index, into_open=st.booleans(), which=index, close=st.booleans(),
          specs=st.lists(st.tuples(st.sampled_from([False, False, False, True]), st.integers(0, 2)),
                                min_size=1, max_size=8))
    def submit(self, who: int, into_open: bool, which: int, close: bool, specs: list[tuple[bool, int]]) -> None:
        client = self.pick(list(self.clients.values()), who)
        open_sets = [sid for sid, s in client.sets.items() if not s.closed]
        if into_open and open_sets:
            set_id = self.pick(open_sets, which)
        else:
            set_id = client.next_set_id
            client.next_set_id += 1
            client.sets[set_id] = MSet()
        entries = []
        for is_io, retries in specs:
            task_id = client.next_task_id
            client.next_task_id += 1
            self.tasks[(client.name, task_id)] = MTask((client.name, task_id), client.node, is_io, set_id)
            client.sets[set_id].task_ids.append(task_id)
            payload = pickle.dumps(("task", client.name, task_id))
            ref = "std:prompt" if is_io else "std:add"
            entries.append((task_id, ref, payload, FLAG_IO if is_io else 0, retries))
        client.sets[set_id].closed |= close
        self.send(client.node, client.id, p.Submit(set_id, entries, {}, close))

    @precondition(lambda self: any(not s.closed for c in self.clients.values() for s in c.sets.values()))
    @rule(which=index)
    def close_set(self, which: int) -> None:
        client, set_id = self.pick([(c, sid) for c in self.clients.values()
                                    for sid, s in c.sets.items() if not s.closed], which)
        client.sets[set_id].closed = True
        self.send(client.node, client.id, p.Submit(set_id, [], {}, True))

    @precondition(lambda self: self.clients)
    @rule(who=index, picks=st.lists(index, min_size=1, max_size=3))
    def cancel(self, who: int, picks: list[int]) -> None:
        client = self.pick(list(self.clients.values()), who)
        if client.next_task_id > 1:
            self.send(client.node, client.id, p.Cancel([1 + i % (client.next_task_id - 1) for i in picks]))

    # ================================================================ rules: links
    def pairs(self) -> list[tuple[int, int]]:
        return list(self.connector)

    @rule(which=index)
    def open_link(self, which: int) -> None:
        """The connector (re)opens its link to a pair's other end: new ids at both ends."""
        self.open(*self.pick(self.pairs(), which))

    def open(self, i: int, j: int) -> None:
        pair = (i, j)
        old = self.current.get(pair)
        if old is not None and old.state != "closed":
            return
        a = self.connector[pair]
        b = j if a == i else i
        self.counter += 1
        link = MLink(a, b, b"\xffL%d" % self.counter, b"\x00R%d" % self.counter)
        self.links.append(link)
        self.current[pair] = link
        self.by_id[(a, link.a_id)] = link
        self.by_id[(b, link.b_id)] = link
        event("link opened" if old is None else "link re-opened")
        self.route(a, self.nodes[a].introduce(link.a_id, self.now))

    def live_links(self) -> list[MLink]:
        return [link for link in self.links if link.accept[link.a] or link.accept[link.b]]

    @precondition(lambda self: self.live_links())
    @rule(which=index)
    def cut_link(self, which: int) -> None:
        """The network goes: everything in flight is lost, nothing more travels."""
        link = self.pick(self.live_links(), which)
        event(f"link cut with {len(link.to[link.a]) + len(link.to[link.b])} messages in flight")
        for node in (link.a, link.b):
            link.accept[node] = False
            link.to[node].clear()

    def server_peers(self) -> list[tuple[int, bytes]]:
        return [(i, sid) for i, d in enumerate(self.nodes) for sid in d._servers]

    @precondition(lambda self: self.server_peers())
    @rule(which=index)
    def declare_lost(self, which: int) -> None:
        """A dispatcher declares a peer server lost (it was silent past its liveness), whether
        or not the link still carries the peer's messages."""
        node, sid = self.pick(self.server_peers(), which)
        event(f"lost peer held {min(len(self.nodes[node]._peers[sid].in_flight), 2)}+ tasks")
        event("lost peer declared on a live link" if not self.by_id[(node, sid)].silent_towards(node)
              else "lost peer declared on a dead link")
        self.route(node, self.nodes[node].peer_gone(sid, self.now, "silent"))

    def busy_server_peers(self) -> list[tuple[int, bytes]]:
        return [(i, sid) for i, sid in self.server_peers() if self.nodes[i]._servers[sid].in_flight]

    @precondition(lambda self: self.busy_server_peers())
    @rule(which=index)
    def busy_peer_declared_lost(self, which: int) -> None:
        """As declare_lost, for a peer running some of our tasks: they are requeued (or fail
        without retries left), and the peer's late results must be discarded."""
        node, sid = self.pick(self.busy_server_peers(), which)
        self.route(node, self.nodes[node].peer_gone(sid, self.now, "silent"))

    @rule()
    def link_manager_step(self) -> None:
        """Each connector's LinkManager: notice links its dispatcher dropped, or that can
        never answer, and close them (they re-open by the open_link rule)."""
        for link in list(self.current.values()):
            d = self.nodes[link.a]
            if link.state == "connecting" and d.is_server_peer(link.a_id):
                link.state = "connected"
            elif link.state == "connected" and not d.is_server_peer(link.a_id):
                self.close_link(link, "lost")
            elif link.state == "connecting" and link.silent_towards(link.a):
                self.close_link(link, "no answer")

    def queues(self) -> list[tuple[MLink, int]]:
        return [(link, to) for link in self.links for to in (link.a, link.b) if link.to[to]]

    @precondition(lambda self: self.queues())
    @rule(which=index, n=st.integers(1, 4), manage=st.booleans())
    def deliver_some(self, which: int, n: int, manage: bool) -> None:
        """The next ``n`` messages one way on one link; then maybe a LinkManager step."""
        link, to = self.pick(self.queues(), which)
        self.deliver(link, to, n)
        if manage:
            self.link_manager_step()

    @rule(node=index, dt=st.floats(0, 60))
    def tick(self, node: int, dt: float) -> None:
        self.now += dt
        node %= len(self.nodes)
        self.route(node, self.nodes[node].tick(self.now))

    # ================================================================ invariants
    @invariant()
    def counters_match_the_task_records(self) -> None:
        for d in self.nodes:
            assert 0 <= d._pending_fwd <= d._pending, (d.name, d._pending, d._pending_fwd)
            queued = [t for t in d._tasks.values() if t.state is TaskState.QUEUED and not t.io]
            assert d._pending == len(queued), (d.name, d._pending, len(queued))
            assert d._pending_fwd == sum(1 for t in queued if d._peers[t.client].is_server)
            for peer in d._peers.values():
                for s in peer.sets.values():
                    mine = [t.state for t in d._tasks.values() if t.client == peer.id and t.set_id == s.set_id]
                    assert s.queued >= 0 and s.running >= 0, (d.name, peer.name, s)
                    assert (s.queued, s.running) == (mine.count(TaskState.QUEUED), mine.count(TaskState.RUNNING))

    # ================================================================ teardown
    def settle(self) -> None:
        """Deliver everything, let executors finish everything, expire silent links, until
        nothing moves."""
        for _ in range(1000):
            moved = False
            self.link_manager_step()
            while self.queues():
                link, to = self.queues()[0]
                self.deliver(link, to, len(link.to[to]))
                moved = True
            for ex in self.busy():
                self.report(ex, [(i, 0) for i in range(len(ex.in_flight))], 1000)
                moved = True
            for node, sid in self.server_peers():
                if self.by_id[(node, sid)].silent_towards(node):
                    self.route(node, self.nodes[node].peer_gone(sid, self.now, "silent"))
                    moved = True
            if not moved:
                break
        assert not self.queues() and not self.busy(), "no quiescence"

    def teardown(self) -> None:
        """Close every set, give every dispatcher an executor, let every silent link expire,
        and run until nothing moves: then every task has exactly one result."""
        if sys.exc_info()[0] is not None or not self.nodes:
            return  # a step already failed: keep its report clean
        for c in list(self.clients.values()):
            for set_id, s in c.sets.items():
                if not s.closed:
                    s.closed = True
                    self.send(c.node, c.id, p.Submit(set_id, [], {}, True))
        self.settle()
        for pair in self.pairs():  # every connector re-opens its link: peers take the overflow
            self.open(*pair)
        self.settle()
        for node in range(len(self.nodes)):  # and whatever no peer could take runs at home
            if not self.plain_executors(node):
                self.add_executor(node, 2)
        self.settle()
        event(f"tasks submitted: {min(len(self.tasks) // 5 * 5, 30)}+")
        event(f"results of tasks run on a peer: {min(self.remote_results, 10)}" + "+" * (self.remote_results >= 10))
        for c in self.clients.values():
            for set_id, s in c.sets.items():
                for task_id in s.task_ids:
                    assert len(self.tasks[(c.name, task_id)].results) == 1, f"task {(c.name, task_id)} was lost"
                assert s.done_messages == 1, f"set {set_id} of {c.name} never completed"
        for d in self.nodes:
            assert not d.has_work(), f"{d.name} still holds {list(d._tasks.values())[:3]}"


FederationMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    report_multiple_bugs=False,
)
TestFederationMachine = FederationMachine.TestCase
# A failure is shrunk to a minimal story, which can take minutes: let it.
TestFederationMachine.pytestmark = [pytest.mark.timeout(900)]  # type: ignore[attr-defined]
