"""The dispatcher's scheduling: queued tasks to executors first, then to peer servers.

Data flow::

    _enqueue(set, gid) -> the set's pending deque; the set joins _ready (round robin over sets)
    _dispatch, after every input:
        leases (issue 10); IOTasks, one at a time, to their client's foreground executor;
        subtasks a nested client runs inline (issue 13); then while tasks are queued:
        a window per executor (slots, plus prefetch by the head task's measured run time)
        -> _spread evenly -> _take (FAIRNESS_QUANTUM from each set in turn) -> _send_tasks
        -> TASKS, with the code and path blobs that executor has not had yet;
        what the local executors cannot take now goes to peer servers (federation._forward)
    _requeue: a task whose executor or peer server was lost goes back to its set's front
    _record_duration: EWMA run time per function, from EXEC_DONE and PEER_DONE

Mixed into :class:`~taskcs.runtime.dispatcher.Dispatcher`, sans-IO like it.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from . import protocol as p
from .dispatch_records import DispatcherState, PeerId, _Peer, _Set, _Task
from .task import TaskState

#: Tasks taken from one set before moving to the next: small enough that a small set
#: submitted after a huge one starts at once, large enough to keep batches efficient.
FAIRNESS_QUANTUM = 32


class SchedulingRules(DispatcherState):
    """Mixed into :class:`~taskcs.runtime.dispatcher.Dispatcher`; see the module docstring."""

    if TYPE_CHECKING:  # what the Dispatcher and its other rules provide
        def _emit(self, peer_id: PeerId, msg: p.Message) -> None: ...
        def _sets_of(self, task: _Task) -> _Set: ...
        def _lease_step(self) -> None: ...
        def _dispatch_inline(self) -> None: ...
        def _without_waiting_parents(self, free: list[tuple[_Peer, int]]) -> list[tuple[_Peer, int]]: ...
        def _forward(self, peer: _Peer, entries: list[tuple[int, str, bytes, str]], retries: list[int],
                     blobs: dict[str, bytes]) -> None: ...
        def _remote_targets(self, estimate: float | None) -> list[tuple[_Peer, int]]: ...

    def _enqueue(self, s: _Set, gid: int, front: bool = False) -> None:
        if front:
            s.pending.appendleft(gid)
        else:
            s.pending.append(gid)
        self._pending += 1
        self._pending_fwd += s.fwd
        if not s.in_ready:
            s.in_ready = True
            self._ready.append(s)

    def _requeue(self, task: _Task) -> None:
        task.state = TaskState.QUEUED
        task.executor = None
        s = self._sets_of(task)
        s.queued += 1
        client = self._peers[task.client]
        if task.io:
            client.io_queue.appendleft(task.gid)
        else:
            self._enqueue(s, task.gid, front=True)

    def _record_duration(self, func_ref: str, duration_us: int) -> None:
        durations = self._durations
        old = durations.get(func_ref)
        if old is None and len(durations) >= 65536:
            durations.clear()  # bounded: a stream of distinct lambdas must not grow it forever
        durations[func_ref] = duration_us if old is None else 0.8 * old + 0.2 * duration_us

    def _head_estimate(self) -> float | None:
        """Measured duration (µs) of the function of the next task to dispatch, if known."""
        if self._ready:
            for gid in itertools.islice(self._ready[0].pending, 8):
                task = self._tasks.get(gid)
                if task is not None:
                    return self._durations.get(task.func_ref)
        return None

    def _window(self, peer: _Peer, estimate_us: float | None) -> int:
        cap = peer.slots
        if estimate_us is None:
            return cap
        ahead = int(self.config.prefetch_seconds * 1e6 / max(estimate_us, 1.0))
        return cap + min(ahead, self.config.max_prefetch) * cap

    def _dispatch(self) -> None:
        if self._leases or self._lease_wants:  # issue 10
            self._lease_step()
        for peer in self._peers.values():
            if peer.io_queue and peer.hello.stdio and peer.io_running == 0:
                task = self._tasks[peer.io_queue.popleft()]
                peer.io_running += 1
                self._send_tasks(peer, [task])
        if self._nest is not None and self._pending:
            self._dispatch_inline()  # issue 13: a nested client runs its own subtasks first
        # The windows depend on the head task's measured duration, and taking tasks moves the
        # head: go round again while that lets more go, or a task whose function is known to be
        # tiny would wait behind an unknown one until some unrelated message came in.
        estimate: float | None = -1.0  # no estimate yet
        while self._pending:
            before, previous = self._pending, estimate
            estimate = self._head_estimate()
            if estimate == previous:
                return  # the same windows again: nothing more would go
            free = [
                (peer, self._window(peer, estimate) - len(peer.in_flight))
                for peer in self._peers.values()
                if peer.slots and not peer.hello.io_only and not peer.is_server
            ]
            if self._nest is not None and self._nest.children:
                free = self._without_waiting_parents(free)  # issue 13: nothing queues behind a parent
            self._spread([(peer, n) for peer, n in free if n > 0], remote=False)
            # Local first: peer servers get only what the local executors could not take now,
            # and never tasks that a peer server forwarded here.
            if self._servers and self._pending > self._pending_fwd:
                self._spread(self._remote_targets(estimate), remote=True)
            if self._pending == before:
                return

    def _spread(self, free: list[tuple[_Peer, int]], remote: bool) -> None:
        while free and (self._pending > self._pending_fwd if remote else self._pending):
            share = -(-self._pending // len(free))  # ceil: spread evenly, then top up
            left = []
            for peer, n in free:
                batch = self._take(min(n, share), remote)
                if batch:
                    self._send_tasks(peer, batch)
                if n - len(batch) > 0 and self._pending and batch:
                    left.append((peer, n - len(batch)))
            free = left

    def _take(self, k: int, remote: bool = False) -> list[_Task]:
        """Up to ``k`` queued tasks, round robin over sets with FAIRNESS_QUANTUM from each;
        ``remote``: for a peer server, so none of the sets a peer server forwarded here."""
        taken: list[_Task] = []
        ready = self._ready
        tasks = self._tasks
        fwd_taken = 0
        skipped = 0
        while k > 0 and ready and skipped < len(ready):
            s = ready[0]
            if remote and s.fwd:
                ready.rotate(-1)
                skipped += 1
                continue
            skipped = 0
            quantum = min(k, FAIRNESS_QUANTUM)
            pending = s.pending
            n = len(taken)
            while quantum and pending:
                task = tasks.get(pending.popleft())
                if task is None or task.state is not TaskState.QUEUED:
                    continue  # cancelled or dropped after it was queued
                taken.append(task)
                quantum -= 1
                k -= 1
            if s.fwd:
                fwd_taken += len(taken) - n
            ready.popleft()
            if pending:
                ready.append(s)
            else:
                s.in_ready = False
        self._pending -= len(taken)
        self._pending_fwd -= fwd_taken
        return taken

    def _send_tasks(self, peer: _Peer, batch: list[_Task]) -> None:
        blobs: dict[str, bytes] = {}
        known = peer.known_blobs
        entries = []
        seq = self._seq
        for task in batch:
            seq += 1
            task.seq = seq
            task.state = TaskState.RUNNING
            task.executor = peer.id
            s = self._sets_of(task)
            s.queued -= 1
            s.running += 1
            peer.in_flight.add(task.gid)
            ref = task.func_ref
            if ref.startswith("dill:") and ref[5:] not in known:
                blobs[ref[5:]] = self._blobs[ref[5:]]
                known.add(ref[5:])
            if task.ctx and task.ctx not in known:
                blobs[task.ctx] = self._blobs[task.ctx]
                known.add(task.ctx)
            entries.append((task.gid, ref, task.payload, task.ctx))
        self._seq = seq
        if peer.is_server:
            self._forward(peer, entries, [task.retries for task in batch], blobs)
        else:
            self._emit(peer.id, p.Tasks(entries, blobs))
