"""A hypothesis state machine over the Dispatcher's nesting rules (issue 13, part 2).

Random trees of tasks that submit tasks: a root client with a terminal, executors (each its own
process id), nested clients in those processes (one shared per process, as joblib keeps, or a
new one per task), subtasks and IOTasks at any depth, completions, failures, forced cancels
and executor deaths. The model is built from what the dispatcher sends, plus what the test sent.

Checked after every step and at the end:

* every accepted task of a connected client gets at most one result, and once everything has
  been run or cancelled, exactly one;
* a subtask never outlives its parent: once a task has its result (or its client or process is
  gone), none of the subtasks linked to it is still queued or running;
* an IOTask only ever goes to the root client's foreground, one live one at a time; a nested
  client's foreground only ever gets its own subtasks, one at a time;
* nothing is sent to an executor while a task it runs has subtasks outstanding;
* the dispatcher's queue count matches the queued tasks, and the machine drains to no work.
"""

from __future__ import annotations

import pickle
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from taskcs.runtime import protocol as p
from taskcs.runtime.dispatcher import Dispatcher, DispatcherConfig
from taskcs.runtime.nesting import flags_with_parent
from taskcs.runtime.task import FLAG_IO, Status, TaskState

CONFIG = DispatcherConfig(heartbeat_interval=None)
index = st.integers(min_value=0, max_value=10**6)


class NestingMachine(RuleBasedStateMachine):
    """See the module docstring."""

    @initialize()
    def setup(self) -> None:
        self.d = Dispatcher(CONFIG, server_pid=1)
        self.pids = iter(range(1000, 10**6))
        self.pid_of: dict[bytes, int] = {}
        self.executors: list[bytes] = []
        self.nested: dict[int, list[bytes]] = {}  # pid -> nested clients in that process
        self.clients: set[bytes] = set()
        self.gone: set[bytes] = set()
        self.ids = iter(range(1, 10**9))
        self.accepted: dict[tuple[bytes, int], int] = {}  # (client, task id) -> gid once known
        self.replies: Counter[tuple[bytes, int]] = Counter()
        self.running: dict[bytes, list[int]] = {}  # runner -> gids sent to it, not answered
        self.io_gids: set[int] = set()
        self.sent_to: dict[int, bytes] = {}  # gid -> runner
        self.owner: dict[int, bytes] = {}  # gid -> client it belongs to (by the payload)
        self.root = b"root"
        self._hello(self.root, p.Hello("client", "root", next(self.pids), 1, True, True))
        self.clients.add(self.root)
        for _ in range(2):
            self._executor()
        self.root_submit(2)

    # -------------------------------------------------------------- plumbing
    def _hello(self, peer: bytes, hello: p.Hello) -> None:
        self.pid_of[peer] = hello.pid
        self._feed(self.d.handle(peer, hello, 0.0))

    def _executor(self) -> None:
        peer = f"e{len(self.pid_of)}".encode()
        self.executors.append(peer)
        self._hello(peer, p.Hello("executor", peer.decode(), next(self.pids), 1))

    def _feed(self, out: list[tuple[bytes, p.Message]]) -> None:
        busy_parents = {self.sent_to[g] for g in self._parents_with_children() if g in self.sent_to}
        for peer, msg in out:
            assert peer not in self.gone, f"{msg} sent to {peer!r}, which is gone"
            assert p.decode(p.encode(msg)) == msg
            if isinstance(msg, p.Tasks):
                if peer in self.executors:
                    assert peer not in busy_parents, "a task was queued behind a waiting parent"
                for gid, ref, payload, _ in msg.tasks:
                    client, task_id = pickle.loads(payload)
                    self.owner[gid] = client
                    self.accepted[(client, task_id)] = gid
                    if ref == "std:prompt":
                        assert peer == self.root, "an IOTask went elsewhere than the root's terminal"
                        self.io_gids.add(gid)
                    elif peer not in self.executors:
                        assert client == peer, "a nested client's foreground got another's task"
                    self.sent_to[gid] = peer
                    self.running.setdefault(peer, []).append(gid)
                if peer not in self.executors:
                    # (a cancelled IOTask may still hold the root's terminal: the root runs its
                    # IOTasks in order, so the next one may be sent meanwhile)
                    live = [g for g in self.running[peer] if g in self.d._tasks]
                    assert len(live) == 1, "a foreground got two tasks at once"
            elif isinstance(msg, p.Results):
                for task_id, *_ in msg.results:
                    self.replies[(peer, task_id)] += 1
                    assert self.replies[(peer, task_id)] == 1, f"two results for {(peer, task_id)}"

    def _parents_with_children(self) -> list[int]:
        nest = self.d._nest
        return [g for g, kids in nest.children.items() if kids] if nest is not None else []

    def _runners(self) -> list[tuple[bytes, int]]:
        return [(peer, gid) for peer, gids in sorted(self.running.items()) for gid in gids
                if peer not in self.gone]

    # -------------------------------------------------------------- rules
    @rule(n=st.integers(1, 3))
    def root_submit(self, n: int) -> None:
        tasks = []
        for _ in range(n):
            task_id = next(self.ids)
            self.accepted[(self.root, task_id)] = 0
            tasks.append((task_id, "std:add", pickle.dumps((self.root, task_id)), 0, 1))
        self._feed(self.d.handle(self.root, p.Submit(0, tasks, {}, False), 0.0))

    @rule(which=index, n=st.integers(1, 3), shared=st.booleans(), io=st.booleans())
    def subtasks(self, which: int, n: int, shared: bool, io: bool) -> None:
        """A running task (not an IOTask) submits ``n`` subtasks from its process."""
        candidates = [(r, g) for r, g in self._runners() if g not in self.io_gids]
        if not candidates:
            return
        runner, parent = candidates[which % len(candidates)]
        self._submit_subtasks(self.pid_of[runner], parent, n, shared, io)

    def _submit_subtasks(self, pid: int, parent: int | tuple[int, int], n: int, shared: bool, io: bool) -> None:
        """``n`` subtasks of ``parent`` (a gid, or a direct task's (lease, task id)) from a
        nested client in process ``pid``: its first one if ``shared``, else a new one."""
        mine = [k for k in self.nested.get(pid, []) if k not in self.gone]
        if shared and mine:
            client = mine[0]
        else:
            client = f"k{len(self.pid_of)}".encode()
            self._hello(client, p.Hello("client", client.decode(), pid, 1, True, True))
            self.nested.setdefault(pid, []).append(client)
            self.clients.add(client)
        tasks = []
        for i in range(n):
            task_id = next(self.ids)
            self.accepted[(client, task_id)] = 0
            ref = "std:prompt" if io and i == 0 else "std:add"
            flags = flags_with_parent(FLAG_IO if ref == "std:prompt" else 0, parent)
            tasks.append((task_id, ref, pickle.dumps((client, task_id)), flags, 1))
        self._feed(self.d.handle(client, p.Submit(0, tasks, {}, False), 0.0))

    @rule(which=index, fail=st.booleans())
    def complete(self, which: int, fail: bool) -> None:
        runners = self._runners()
        if not runners:
            return
        runner, gid = runners[which % len(runners)]
        self.running[runner].remove(gid)
        status = int(Status.ERROR if fail else Status.OK)
        self._feed(self.d.handle(runner, p.ExecDone([(gid, status, b"r", 10, 0, 0)]), 0.0))

    @rule(which=index)
    def force_cancel(self, which: int) -> None:
        open_ = sorted(k for k, g in self.accepted.items() if not self.replies[k] and k[0] not in self.gone)
        if open_:
            client, task_id = open_[which % len(open_)]
            self._feed(self.d.handle(client, p.Cancel([-task_id]), 0.0))

    @rule(which=index)
    def kill_executor(self, which: int) -> None:
        victim = self.executors.pop(which % len(self.executors))
        pid = self.pid_of[victim]
        self.gone.add(victim)
        self.gone.update(self.nested.get(pid, []))
        self.clients.difference_update(self.nested.get(pid, []))
        self._feed(self.d.peer_gone(victim, 0.0, "killed", exit_code=-9))
        self._executor()

    # -------------------------------------------------------------- invariants
    @invariant()
    def no_orphan_subtasks(self) -> None:
        nest = self.d._nest
        if nest is None:
            return
        for child, parent in nest.parent.items():
            assert child in self.d._tasks and parent in self.d._tasks, "a subtask outlived its parent"

    @invariant()
    def queue_count_matches(self) -> None:
        queued = sum(1 for t in self.d._tasks.values() if t.state is TaskState.QUEUED and not t.io)
        assert self.d._pending == queued

    def teardown(self) -> None:
        if not hasattr(self, "d"):
            return
        for _ in range(10_000):  # run everything to its end
            runners = self._runners()
            if not runners:
                break
            self.complete(0, False)
        assert not self.d.has_work(), "work left that nothing will ever run"
        for key, _ in self.accepted.items():
            if key[0] in self.clients:
                assert self.replies[key] == 1, f"{key} got {self.replies[key]} results"


NestingMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_nesting_machine = NestingMachine.TestCase
