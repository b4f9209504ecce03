"""The dispatcher's handlers of the core messages: those of clients, executors and control.

Data flow::

    HELLO of a new peer -> _register: its _Peer, then WELCOME (a client's credit is its share
        of the server budget: CREDIT to the others); refused: ERROR (another protocol build)
    SUBMIT -> one _Task per entry, in the client's _Set -> its pending deque (scheduling), or
        its io_queue if an IOTask, or held under its parent (issue 13, nesting._adopt);
        refused (credit, unknown code, no foreground executor): an error result at once
    EXEC_DONE -> the function's run time measured, then _finish (outcomes) -> RESULTS
    CANCEL -> queued: cancelled now; in an executor's prefetch queue: cancelled now and CANCEL
        to the executor; running, or on a foreground executor: NOT_CANCELLED; forwarded:
        CANCEL to the peer server; a negative id: stop it even if running (_cancel_running)
    NOT_CANCELLED, OUTPUT -> relayed to the tasks' clients (a subtask's output to its root's)
    BYE -> the peer is gone (_peer_gone);  STATUS -> STATUS_REPLY;  HEARTBEAT -> nothing
        (every message counts as one)

Which method takes which message is the Dispatcher's ``_HANDLERS`` table. Mixed into
:class:`~taskcs.runtime.dispatcher.Dispatcher`, sans-IO like it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import TaskcsError
from . import protocol as p
from .codec import blob_digest, encode_error
from .direct_parents import DIRECT_PARENT
from .dispatch_records import _CANCELLED, _ERROR, _OK, DispatcherState, PeerId, _Peer, _Set, _Task
from .federation import TASKCS as _TASKCS
from .nesting import PARENT_SHIFT, PARENT_UNIT
from .task import FLAG_IO, TaskState

if TYPE_CHECKING:
    from collections import deque
    from collections.abc import Iterable

log = logging.getLogger(__name__)


class CoreHandlers(DispatcherState):
    """Mixed into :class:`~taskcs.runtime.dispatcher.Dispatcher`; see the module docstring."""

    if TYPE_CHECKING:  # what the Dispatcher and its other rules provide
        def status(self) -> dict[str, object]: ...
        def _emit(self, peer_id: PeerId, msg: p.Message) -> None: ...
        def _peer_gone(self, peer_id: PeerId, reason: str, exit_code: int | None = None,
                       graceful: bool = False) -> None: ...
        def _credit_share(self) -> int: ...
        def _share_credit(self) -> None: ...
        def _sets_of(self, task: _Task) -> _Set: ...
        def _enqueue(self, s: _Set, gid: int, front: bool = False) -> None: ...
        def _record_duration(self, func_ref: str, duration_us: int) -> None: ...
        def _refuse(self, peer: _Peer, s: _Set, task_id: int, reason: str) -> None: ...
        def _finish(self, task: _Task, status: int, payload: bytes, executor: str, duration_us: int = 0,
                    start_ns: int = 0, end_ns: int = 0, server: str = "") -> None: ...
        def _reply(self, client: _Peer, task_id: int, status: int, payload: bytes, executor: str,
                   duration_us: int = 0, start_ns: int = 0, end_ns: int = 0, server: str = "",
                   flags: int = 0) -> None: ...
        def _maybe_set_done(self, client: _Peer, s: _Set) -> None: ...
        def _hold_blobs(self, peer: _Peer, digests: Iterable[str]) -> None: ...
        def _cancel_running(self, peer: _Peer, task_id: int, now: float) -> None: ...
        def _refuse_server(self, peer_id: PeerId, hello: p.Hello) -> bool: ...
        def _joined_server(self, peer: _Peer) -> None: ...
        def _lease_client_joined(self, client: _Peer) -> None: ...
        def _adopt(self, peer: _Peer, s: _Set, task: _Task, parent_gid: int, direct: int = 0) -> bool: ...
        def _io_queue(self, task: _Task) -> deque[int]: ...

    def _register(self, peer_id: PeerId, hello: p.Hello, now: float) -> None:
        ctx = ""
        if hello.sys_path:
            blob = "\0".join(hello.sys_path).encode()
            ctx = "path:" + blob_digest(blob)
            self._blobs[ctx] = blob
        if hello.kind == "server" and self._refuse_server(peer_id, hello):
            return
        if hello.kind == "client" and hello.features != p.FEATURES:
            # Another taskcs build: each side would misread the other's messages (RESULTS
            # entries changed shape), so say so now rather than drop every result later.
            self._emit(peer_id, p.Error(
                f"this server speaks taskcs protocol {p.VERSION}.{p.FEATURES} (taskcs {_TASKCS}), the client "
                f"{p.VERSION}.{hello.features} (taskcs {hello.taskcs or 'older'}): use the same taskcs version on both "
                "sides (`cs-server stop` ends this server; a client starts its own)"))
            return
        peer = self._peers[peer_id] = _Peer(peer_id, hello, ctx, now, now, slots=max(0, hello.capacity))
        if ctx:
            self._hold_blobs(peer, (ctx,))
        log.info("%s %s (pid %d) joined, capacity %d%s", hello.kind, hello.name, hello.pid,
                 hello.capacity, ", foreground with stdio" if hello.stdio else "")
        interval = self.config.heartbeat_interval
        if hello.kind == "client":
            self._clients += 1
            peer.credit = self._credit_share()
            self._lease_client_joined(peer)  # issues 10 + 13: one in an executor's process is no rival
        self._emit(peer_id, p.Welcome(
            hello.name, int((interval or 0) * 1000), self.config.liveness, peer.credit or self.config.client_credit,
            self.server_pid,
        ))
        if hello.kind == "client":
            self._share_credit()
        if hello.kind == "server":
            self._joined_server(peer)

    def _on_hello(self, peer: _Peer, msg: p.Hello, now: float) -> None:
        self._emit(peer.id, p.Error("HELLO twice on one connection"))

    def _on_submit(self, peer: _Peer, msg: p.Submit, now: float) -> None:
        if self.draining and not peer.is_server:  # forwarded work, accepted, is finished
            reason = "the server is stopping and accepts no new tasks; start a new server"
            for task_id, *_ in msg.tasks:
                self._reply(peer, task_id, _ERROR, encode_error(TaskcsError(reason), reason), "server")
            return
        if msg.blobs:
            self._blobs.update(msg.blobs)
            self._hold_blobs(peer, msg.blobs)
        s = peer.sets.get(msg.set_id)
        if s is None:
            s = peer.sets[msg.set_id] = _Set(peer.id, msg.set_id, fwd=peer.is_server)
        credit = self.config.client_credit
        for task_id, func_ref, payload, flags, retries in msg.tasks:
            if task_id in peer.tasks:
                self._emit(peer.id, p.Error(f"task id {task_id} is already in use; ignored"))
                continue
            io = bool(flags & FLAG_IO)
            self.stats["submitted"] += 1
            if len(peer.tasks) >= credit:
                self._refuse(peer, s, task_id, f"task {task_id}: client exceeded its credit of {credit} tasks")
                continue
            if func_ref.startswith("dill:") and func_ref[5:] not in self._blobs:
                self._refuse(peer, s, task_id, (
                    f"task {task_id}: its code ({func_ref[:17]}...) was never sent on this connection"))
                continue
            if io and not peer.hello.stdio:
                self._refuse(peer, s, task_id, (
                    f"IOTask {task_id} ({func_ref}) needs the foreground executor of its client, "
                    f"and client {peer.name} registered none (connect with a foreground executor)"))
                continue
            gid = self._next_gid
            self._next_gid += 1
            # Every task carries its client's import path, standard ones too: their inputs may
            # be instances of the user's classes (or, for map_chunk, the user's function).
            task = _Task(gid, peer.id, msg.set_id, task_id, func_ref, payload, peer.ctx, io, retries)
            self._tasks[gid] = task
            peer.tasks[task_id] = gid
            s.queued += 1
            if flags >= PARENT_UNIT and self._adopt(peer, s, task, flags >> PARENT_SHIFT,
                                                    flags & DIRECT_PARENT):  # issue 13 (+ 10: a direct parent)
                continue
            if io:
                peer.io_queue.append(gid)
            else:
                self._enqueue(s, gid)
        if msg.close:
            s.closed = True
            self._maybe_set_done(peer, s)

    def _on_exec_done(self, peer: _Peer, msg: p.ExecDone, now: float) -> None:
        for gid, status, payload, duration_us, start_ns, end_ns in msg.results:
            peer.in_flight.discard(gid)
            peer.completed += 1
            task = self._tasks.get(gid)
            if task is None or task.executor != peer.id:
                continue  # cancelled, its client left, or a stale copy after a retry
            if status == _OK:
                self._record_duration(task.func_ref, duration_us)
            if task.io:
                peer.io_running -= 1
            self._sets_of(task).running -= 1
            self._finish(task, status if status in (_OK, _CANCELLED) else _ERROR, payload, peer.name, duration_us,
                         start_ns, end_ns)

    def _on_cancel(self, peer: _Peer, msg: p.Cancel, now: float) -> None:
        for task_id in msg.task_ids:
            if task_id < 0:  # issue 9: "stop it even if it is running"
                self._cancel_running(peer, -task_id, now)
                continue
            gid = peer.tasks.get(task_id)
            task = self._tasks.get(gid) if gid is not None else None
            if task is None:
                continue  # already finished: its result is on its way
            if task.state is TaskState.RUNNING:
                executor = self._peers.get(task.executor) if task.executor else None
                if executor is not None and executor.is_server:
                    # The peer server decides at once by the same rules, for its own queue.
                    self._emit(executor.id, p.Cancel([gid]))  # type: ignore[list-item]
                elif executor is None or executor.hello.kind != "executor" or self._has_started(executor, task):
                    # It runs (or is an IOTask on its client's own foreground): cancel() is False.
                    self._emit(peer.id, p.NotCancelled([task_id]))
                else:
                    # It waits in the executor's prefetch queue: cancelled now, and the executor
                    # drops it (had it just started, its result is discarded); its slot stays
                    # taken until the executor answers.
                    self._emit(executor.id, p.Cancel([gid]))  # type: ignore[list-item]
                    self._sets_of(task).running -= 1
                    self._finish(task, _CANCELLED, b"", executor.name)
                continue
            s = self._sets_of(task)
            if task.io:
                self._io_queue(task).remove(gid)  # type: ignore[arg-type]  # issue 13: a root's, for a subtask
            else:
                self._pending -= 1  # the gid stays in its deque and is skipped when reached
                self._pending_fwd -= s.fwd
            s.queued -= 1
            self._finish(task, _CANCELLED, b"", "server")

    def _has_started(self, executor: _Peer, task: _Task) -> bool:
        """True if ``task`` is among the first ``slots`` of ``executor``'s in-flight tasks (it
        runs them in the order sent); tasks whose record is gone count as ahead of it."""
        ahead = 0
        for gid in executor.in_flight:
            other = self._tasks.get(gid)
            if gid != task.gid and (other is None or other.seq < task.seq):
                ahead += 1
        return ahead < max(1, executor.slots)

    def _on_not_cancelled(self, peer: _Peer, msg: p.NotCancelled, now: float) -> None:
        """An executor or peer server could not cancel these gids: tell their clients."""
        per_client: dict[PeerId, list[int]] = {}
        for gid in msg.ids:
            task = self._tasks.get(gid)
            if task is not None and task.executor == peer.id:
                per_client.setdefault(task.client, []).append(task.task_id)
        for client_id, ids in per_client.items():
            if client_id in self._peers:
                self._emit(client_id, p.NotCancelled(ids))

    def _on_output(self, peer: _Peer, msg: p.Output, now: float) -> None:
        per_client: dict[PeerId, list[tuple[int, str]]] = {}
        for gid, text in msg.items:
            task = self._tasks.get(gid)
            client = self._peers.get(task.client) if task else None
            task_id = task.task_id if task else 0
            if task and self._nest is not None and gid in self._nest.root:
                root_id, task_id = self._nest.root[gid]  # issue 13: a subtask's output goes to the root
                client = self._peers.get(root_id)
            if task and client and client.hello.forward_output:
                per_client.setdefault(client.id, []).append((task_id, text))
        for client_id, items in per_client.items():
            self._emit(client_id, p.Output(items))

    def _on_heartbeat(self, peer: _Peer, msg: p.Heartbeat, now: float) -> None:
        pass  # last_seen was updated for every message

    def _on_bye(self, peer: _Peer, msg: p.Bye, now: float) -> None:
        self._peer_gone(peer.id, msg.reason or "said BYE", graceful=True)

    def _on_status(self, peer: _Peer, msg: p.StatusRequest, now: float) -> None:
        self._emit(peer.id, p.StatusReply(self.status()))
