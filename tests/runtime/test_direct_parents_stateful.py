"""A hypothesis state machine over nested clients under tasks sent on a lease (issues 10 + 13).

The nesting machine of test_nesting_stateful.py, with a root client that leases executors and
sends tasks to them directly (the server never sees those; the model does), nested clients in
the leased executors' processes naming those tasks as parents, the executors' DIRECT_ENDED,
revocations, releases and executor deaths. Checked after every step and at the end, besides
the nesting machine's invariants:

* a direct task's synthetic parent record lives exactly while that task runs (it is gone once
  the task ended, its lease ended or its executor died), and so do its subtasks;
* a leased executor never gets a server task; every revoked lease is released once the tasks
  sent on it are done, and the server takes its executor back;
* once every task has ended, nothing is left queued, running or linked.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, rule

from taskcs.runtime import protocol as p
from taskcs.runtime.dispatcher import Dispatcher

from .test_nesting_stateful import NestingMachine, index

ENDPOINT = "unix:///tmp/x/direct-1-1.sock"


class DirectNestingMachine(NestingMachine):
    """See the module docstring."""

    @initialize()
    def setup(self) -> None:
        self.lease_exec: dict[int, bytes] = {}  # lease id -> its executor (as the server said)
        self.leased: set[bytes] = set()  # executors lent, until they answer RELEASE
        self.root_leases: dict[int, str] = {}  # the root's view: "live" or "revoked"
        self.direct: dict[int, list[int]] = {}  # lease id -> root task ids running / queued there
        self.named: set[tuple[int, int]] = set()  # direct tasks a nested client named as parent
        super().setup()
        while self._runners():  # the nesting machine's first tasks: done, so executors can be lent
            self.complete(0, False)
        self._feed(self.d.handle(self.root, p.Lease(0, ENDPOINT, "", 0), 0.0))
        assert len(self.root_leases) == 2

    # -------------------------------------------------------------- plumbing
    def _feed(self, out: list[tuple[bytes, p.Message]]) -> None:
        for peer, msg in out:
            if isinstance(msg, p.Tasks) and peer in self.executors:
                assert peer not in self.leased, "a leased executor got a server task"
        super()._feed(out)
        answers: list[tuple[bytes, p.Message]] = []
        for peer, msg in out:
            if isinstance(msg, p.Lease) and peer in self.executors:
                self.lease_exec[msg.lease_id] = peer
                self.leased.add(peer)
            elif isinstance(msg, p.Lease) and peer == self.root and msg.lease_id:
                self.root_leases[msg.lease_id] = "live"
            elif isinstance(msg, p.Revoke):
                self.root_leases[msg.lease_id] = "revoked"
                answers.extend(self._maybe_release(msg.lease_id))
            elif isinstance(msg, p.LeaseLost):
                self.root_leases.pop(msg.lease_id, None)
                for task_id in self.direct.pop(msg.lease_id, []):
                    self.named.discard((msg.lease_id, task_id))  # the root fails or resubmits it
            elif isinstance(msg, p.Release) and peer in self.executors:
                assert msg.abandon or not self.direct.get(msg.lease_id), "released with work on it"
                self.leased.discard(peer)
                answers.append((peer, p.Release(msg.lease_id, False)))
        for peer, msg in answers:
            self._feed(self.d.handle(peer, msg, 0.0))

    def _maybe_release(self, lease_id: int) -> list[tuple[bytes, p.Message]]:
        if self.root_leases.get(lease_id) == "revoked" and not self.direct.get(lease_id):
            del self.root_leases[lease_id]
            return [(self.root, p.Release(lease_id, False))]
        return []

    def _direct_running(self) -> list[tuple[int, int]]:
        return [(lease, t) for lease, ids in sorted(self.direct.items()) for t in ids
                if self.lease_exec[lease] not in self.gone]

    def _end_direct(self, lease_id: int, task_id: int) -> None:
        """The direct task ends (done, failed or interrupted): as the executor and root do."""
        self.direct[lease_id].remove(task_id)
        executor = self.lease_exec[lease_id]
        if (lease_id, task_id) in self.named:
            self.named.discard((lease_id, task_id))
            self._feed(self.d.handle(executor, p.DirectEnded(lease_id, [task_id]), 0.0))
        for peer, msg in self._maybe_release(lease_id):
            self._feed(self.d.handle(peer, msg, 0.0))

    # -------------------------------------------------------------- rules
    @rule(n=st.integers(1, 2), which=index)
    def direct_send(self, n: int, which: int) -> None:
        live = sorted(lease for lease, state in self.root_leases.items() if state == "live")
        if live:
            lease = live[which % len(live)]
            self.direct.setdefault(lease, []).extend(next(self.ids) for _ in range(n))

    @rule(which=index, n=st.integers(1, 3), shared=st.booleans(), io=st.booleans())
    def direct_subtasks(self, which: int, n: int, shared: bool, io: bool) -> None:
        """A task sent on a lease (the first on its lease runs; the rest wait) submits subtasks."""
        running = [(lease, ids[0]) for lease, ids in sorted(self.direct.items())
                   if ids and self.lease_exec[lease] not in self.gone]
        if not running:
            return
        lease, task_id = running[which % len(running)]
        self.named.add((lease, task_id))
        self._submit_subtasks(self.pid_of[self.lease_exec[lease]], (lease, task_id), n, shared, io)

    @rule(which=index)
    def direct_finish(self, which: int) -> None:
        running = [(lease, ids[0]) for lease, ids in sorted(self.direct.items())
                   if ids and self.lease_exec[lease] not in self.gone]
        if running:
            self._end_direct(*running[which % len(running)])

    # -------------------------------------------------------------- invariants
    @invariant()
    def no_orphan_subtasks(self) -> None:
        """As the nesting machine's, a parent being a task or a live direct task's record."""
        nest = self.d._nest
        if nest is None:
            return
        synthetic = {gid for parents in (self.d._dparents or {}).values() for gid in parents.values()}
        for child, parent in nest.parent.items():
            assert child in self.d._tasks, "a subtask's record outlived it"
            assert parent in self.d._tasks or parent in synthetic, "a subtask outlived its parent"

    @invariant()
    def synthetic_parents_live_with_their_tasks(self) -> None:
        d: Dispatcher = self.d
        synthetic = {}
        for lease, parents in (d._dparents or {}).items():
            for task_id, gid in parents.items():
                assert task_id in self.direct.get(lease, []), f"parent ({lease}, {task_id}) outlived its task"
                synthetic[gid] = (lease, task_id)
        nest = d._nest
        if nest is None:
            return
        for parent in nest.children:
            assert parent in d._tasks or parent in synthetic, "a parent record outlived its task"

    def teardown(self) -> None:
        if not hasattr(self, "d"):
            return
        for _ in range(10_000):  # the direct tasks end too (their results go to the root directly)
            running = self._direct_running()
            if not running and not self._runners():
                break
            if running:
                self._end_direct(*running[0])
            else:
                self.complete(0, False)
        d = self.d
        assert d.task_count() == 0 and not d._pending
        assert not (d._nest and d._nest.children) and not any((d._dparents or {}).values())
        assert all(state == "granted" for state in (lease.state for lease in d._leases.values())), \
            "a lease was left revoked or ending with nothing on it"
        for key in self.accepted:
            if key[0] in self.clients:
                assert self.replies[key] == 1, f"{key} got {self.replies[key]} results"
        self.direct.clear()
        self.gone.add(self.root)
        self._feed(d.peer_gone(self.root, 0.0, "bye", graceful=True))  # its leases are abandoned
        assert not d.has_work(), "an abandoned lease was never given back"


DirectNestingMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None, report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_direct_nesting_machine = DirectNestingMachine.TestCase
