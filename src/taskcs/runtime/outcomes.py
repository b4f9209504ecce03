"""The dispatcher's outcomes: each accepted task's one reply, and stopping abandoned work.

Data flow::

    _finish(task, status, ...) -> stats and the set's counts -> _reply:
        to a client: RESULTS, coalesced into the last one queued for it (one per batch)
        to a peer server that forwarded the task: PEER_DONE
        -> SET_DONE once a closed set has nothing queued or running (_maybe_set_done)
    _refuse: a task refused at SUBMIT is answered at once with a SubmissionError
    a client or peer server leaves -> _drop_client_work: its queued tasks dropped, its
        running ones interrupted (no result goes anywhere)
    CANCEL of -id (issue 9) -> _cancel_running: cancelled now, its executor interrupted
    _interrupt -> INTERRUPT to an executor (a forced CANCEL to a peer server); interrupted()
        lists executors still running what they were told to stop, for the server to signal
        and, past the grace, replace

Callers fix a task's queued/running counts first. Mixed into
:class:`~taskcs.runtime.dispatcher.Dispatcher`, sans-IO like it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import SubmissionError
from . import protocol as p
from .codec import encode_error
from .dispatch_records import _CANCELLED, _ERROR, _OK, DispatcherState, PeerId, _Peer, _Set, _Task
from .task import TaskState
from .timeline import FORWARDED as _FORWARDED
from .timeline import IO as _RAN_IO

log = logging.getLogger(__name__)


class OutcomeRules(DispatcherState):
    """Mixed into :class:`~taskcs.runtime.dispatcher.Dispatcher`; see the module docstring."""

    if TYPE_CHECKING:  # what the Dispatcher and its other rules provide
        def _emit(self, peer_id: PeerId, msg: p.Message) -> None: ...
        def wall_ns(self, now: float) -> int: ...
        def _on_cancel(self, peer: _Peer, msg: p.Cancel, now: float) -> None: ...
        def _nest_finished(self, task: _Task) -> None: ...
        def _nest_dropping(self, peer: _Peer) -> None: ...
        def _cancel_subtask(self, gid: int) -> None: ...
        def _lease_interrupted(self) -> list[tuple[int, float]]: ...

    def _sets_of(self, task: _Task) -> _Set:
        return self._peers[task.client].sets[task.set_id]

    def _refuse(self, peer: _Peer, s: _Set, task_id: int, reason: str) -> None:
        s.failed += 1
        self.stats["failed"] += 1
        self._reply(peer, task_id, _ERROR, encode_error(SubmissionError(reason), reason), "server")

    def _finish(self, task: _Task, status: int, payload: bytes, executor: str, duration_us: int = 0,
                start_ns: int = 0, end_ns: int = 0, server: str = "") -> None:
        """Record a task's outcome and reply to its client (callers fix queued/running).

        ``start_ns``/``end_ns``: when it ran, on this server's clock; ``server``: the peer
        server it ran on, "" for this one (issue 11: the timeline).
        """
        del self._tasks[task.gid]
        if self.stream is not None:  # issue 11: the dashboard's task stream, only while watched
            self.stream.append((end_ns or self.wall_ns(self._now_hint), task.func_ref, executor, status,
                                duration_us))
        if self._nest is not None:
            self._nest_finished(task)  # issue 13: unlink it, cancel its outstanding subtasks
        client = self._peers.get(task.client)
        if client is None:
            return
        del client.tasks[task.task_id]
        s = client.sets[task.set_id]
        stats = self.stats
        if status == _OK:
            task.state = TaskState.DONE
            s.done += 1
            stats["done"] += 1
        elif status == _ERROR:
            task.state = TaskState.FAILED
            s.failed += 1
            stats["failed"] += 1
        else:
            task.state = TaskState.CANCELLED
            s.cancelled += 1
            stats["cancelled"] += 1
        # issue 11: RESULTS flags (timeline.RETRIED is 1: the bool)
        flags = task.retried | (_FORWARDED if server else 0) | (_RAN_IO if task.io else 0)
        self._reply(client, task.task_id, status, payload, executor, duration_us, start_ns, end_ns, server, flags)
        if s.closed:
            self._maybe_set_done(client, s)

    def _reply(self, client: _Peer, task_id: int, status: int, payload: bytes, executor: str,
               duration_us: int = 0, start_ns: int = 0, end_ns: int = 0, server: str = "", flags: int = 0) -> None:
        # Coalesce into the last RESULTS message queued for this client: one message per batch.
        out = self._out
        if client.is_server:  # a forwarded task: its origin learns the run time and span too
            entry = (task_id, status, payload, duration_us, executor, start_ns, end_ns)
            if out and out[-1][0] == client.id and isinstance(out[-1][1], p.PeerDone):
                out[-1][1].results.append(entry)
            else:
                self._emit(client.id, p.PeerDone([entry]))
            return
        result = (task_id, status, payload, executor, start_ns, end_ns, server or self.name, flags)
        if out and out[-1][0] == client.id and isinstance(out[-1][1], p.Results):
            out[-1][1].results.append(result)
        else:
            self._emit(client.id, p.Results([result]))

    def _maybe_set_done(self, client: _Peer, s: _Set) -> None:
        if s.closed and s.queued == 0 and s.running == 0:
            del client.sets[s.set_id]
            self._emit(client.id, p.SetDone(s.set_id, s.done, s.failed, s.cancelled))

    def _drop_client_work(self, peer: _Peer) -> None:
        if self._nest is not None:
            self._nest_dropping(peer)  # issue 13: its tasks' subtasks, its IOTasks at a root
        running: dict[PeerId, list[int]] = {}  # issue 9: executor -> its tasks to interrupt
        for gid in peer.tasks.values():
            task = self._tasks.pop(gid, None)
            if task is not None and task.state is TaskState.QUEUED and not task.io:
                self._pending -= 1
                self._pending_fwd -= peer.is_server
            elif task is not None and task.state is TaskState.RUNNING and task.executor is not None:
                running.setdefault(task.executor, []).append(gid)
        for executor_id, gids in running.items():
            self._interrupt(executor_id, gids)
        peer.tasks.clear()
        peer.io_queue.clear()
        for s in peer.sets.values():
            s.pending.clear()  # its _Set may still sit in _ready; _take skips and drops it
        peer.sets.clear()

    # ---- issue 9 (item 3): stopping abandoned and force-cancelled running tasks ---------------
    # A task whose client left, or that its client cancelled with force, is detached at once
    # (no result will be sent for it) and its executor is told to interrupt it; the gid stays
    # in the executor's in_flight until the executor answers, so its slot is not reused early.
    # The server signals executors in interrupted() and replaces one that overstays its grace.
    _interrupts: dict[int, tuple[PeerId, float]] | None = None  # gid -> (executor, since)

    def _cancel_running(self, peer: _Peer, task_id: int, now: float) -> None:
        gid = peer.tasks.get(task_id)
        task = self._tasks.get(gid) if gid is not None else None
        if task is None:
            return  # finished, or already cancelled by the CANCEL of the same id
        if task.state is not TaskState.RUNNING:
            self._on_cancel(peer, p.Cancel([task_id]), now)
            return
        executor = self._peers.get(task.executor) if task.executor else None
        if self._nest is not None and executor is not None and executor.id in self._nest.clients and not task.io:
            self._cancel_subtask(task.gid)  # issue 13: inline in a nested client's process
            return
        if executor is None or executor.hello.kind not in ("executor", "server"):
            return  # an IOTask on the client's own foreground executor: the client stops it
        self._sets_of(task).running -= 1
        self._finish(task, _CANCELLED, b"", "server")
        self._interrupt(executor.id, [task.gid])

    def _interrupt(self, executor_id: PeerId, gids: list[int]) -> None:
        executor = self._peers.get(executor_id)
        if executor is not None and executor.is_server:
            # Forwarded: the peer server stops them on its own executors (a forced CANCEL).
            self._emit(executor_id, p.Cancel([-gid for gid in gids]))
            return
        if executor is None or executor.hello.kind != "executor":
            return  # a client's foreground executor: that client is the one leaving
        if self._interrupts is None:
            self._interrupts = {}
        elif len(self._interrupts) > 4 * len(self._peers) + 1024:
            self.interrupted()  # prunes answered entries: bounded even if nobody asks (phase 2)
        for gid in gids:
            self._interrupts[gid] = (executor_id, self._now_hint)
        log.info("asking executor %s to stop %d task(s) nobody waits for", executor.name, len(gids))
        self._emit(executor_id, p.Interrupt(gids))

    def interrupted(self) -> list[tuple[int, float]]:
        """Executors still running a task they were told to stop: [(pid, since when)].

        Entries whose executor answered (the gid left its in_flight) or went are forgotten.
        """
        if not self._interrupts:
            return self._lease_interrupted()  # issue 10
        since: dict[int, float] = {}
        for gid, (executor_id, when) in list(self._interrupts.items()):
            executor = self._peers.get(executor_id)
            if executor is None or gid not in executor.in_flight:
                del self._interrupts[gid]
            else:
                pid = executor.hello.pid
                since[pid] = min(when, since.get(pid, when))
        return list(since.items()) + self._lease_interrupted()  # issue 10
    # ---- end issue 9 (item 3) ------------------------------------------------------------------
