"""The scheduling state machine, sans-IO (in the manner of h11).

    handle(peer, message, now) -> [(peer, message), ...]
    tick(now)                  -> [(peer, message), ...]   heartbeats and expiry
    peer_gone(peer, now, ...)  -> [(peer, message), ...]   a transport/supervisor saw it go

It never sleeps, never reads a clock and never touches a socket: every transport (queue
channels, ZeroMQ ipc/tcp) pumps the same instance, and tests drive it directly.

Data flow::

    client --SUBMIT--> [set.pending deques] --round robin over sets--> executor --TASKS-->
    client <--RESULTS-- [task record popped] <--EXEC_DONE-- executor
    client <--SET_DONE-- when a closed set has nothing queued or running

IOTasks never enter the shared queues: each waits in its client's own ``io_queue`` and goes
only to that client's foreground (``stdio``) executor, one at a time so prompts keep their order.
Every task the dispatcher accepts gets exactly one reply to its client: a result (ok, error or
cancelled), unless the client itself has gone.

Peer servers (phase 4) are targets after the local executors and sources of work like
clients; their rules live in :mod:`taskcs.runtime.federation`.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..errors import ExecutorDiedError, TaskcsError
from . import protocol as p
from .codec import blob_digest, encode_error
from .direct_parents import DIRECT_PARENT, DirectParentRules  # issues 10 + 13: parents sent on a lease
from .dispatch_records import _CANCELLED, _ERROR, _OK, PeerId, _Peer, _Set, _Task
from .federation import TASKCS as _TASKCS
from .federation import FederationRules
from .leases import LeaseRules  # issue 10
from .nesting import PARENT_SHIFT, PARENT_UNIT, NestingRules  # issue 13: tasks that submit tasks
from .outcomes import OutcomeRules
from .scheduling import FAIRNESS_QUANTUM as FAIRNESS_QUANTUM  # re-exported: tests take it from here
from .scheduling import SchedulingRules
from .task import FLAG_IO, TaskState

log = logging.getLogger(__name__)

Outgoing = list[tuple[PeerId, p.Message]]


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    """Tunables of the dispatcher; each default carries its trade-off."""

    #: Seconds between heartbeats; None disables them (in-process queues cannot lose peers).
    heartbeat_interval: float | None = 1.0
    #: Missed intervals before a silent peer is declared gone (Guide: 3-5).
    liveness: int = 5
    #: Tasks a client may have queued or running at once. Bounds server memory per client
    #: (flow control) while leaving enough in flight to keep every executor busy.
    client_credit: int = 16384
    #: Tasks all clients together may have queued or running: each client's credit is its
    #: share of it (never more than client_credit, never less than min_credit), so the
    #: server's memory stays flat however many clients submit at once.
    server_budget: int = 65536
    #: Enough to keep a few executors busy with prefetched tiny tasks.
    min_credit: int = 1024
    #: Work queued ahead per executor slot, in seconds of measured task time (per function):
    #: hides the round trip for tiny tasks, but is 0 for long ones so the tail stays balanced.
    #: A function not yet measured gets no prefetch: it may be long, and guessing wrong would
    #: leave one executor with a queue while another idles.
    prefetch_seconds: float = 0.004
    max_prefetch: int = 512


class Dispatcher(SchedulingRules, OutcomeRules, FederationRules, NestingRules, LeaseRules, DirectParentRules):
    """Accepts task sets from clients and spreads their tasks over registered executors."""

    def __init__(self, config: DispatcherConfig | None = None, server_pid: int = 0, name: str = "server") -> None:
        self.config = config or DispatcherConfig()
        self.server_pid = server_pid
        self.name = name
        self._peers: dict[PeerId, _Peer] = {}
        self._tasks: dict[int, _Task] = {}
        self._ready: deque[_Set] = deque()
        self._pending = 0  # non-IO tasks queued in sets
        self._pending_fwd = 0  # of which in sets forwarded by peer servers
        self._clients = 0  # connected clients: the server budget's sharers
        self._seq = 0  # tasks sent to executors so far (_Task.seq)
        self._servers: dict[PeerId, _Peer] = {}
        self._hello_sent: set[PeerId] = set()  # peer servers we sent our HELLO
        self._welcome_credit: dict[PeerId, int] = {}  # their credit, until their HELLO registers them
        #: Per peer server name (stable across reconnections): tasks forwarded, results back.
        self.peer_stats: dict[str, dict[str, int]] = {}
        self._blobs: dict[str, bytes] = {}
        self._durations: dict[str, float] = {}  # func_ref -> EWMA of run time in µs
        self._next_gid = 1
        self._out: Outgoing = []
        self.draining = False
        self.stats = {"submitted": 0, "done": 0, "failed": 0, "cancelled": 0, "retried": 0}
        self._leases_init()  # issue 10

    # ------------------------------------------------------------------ inputs
    def handle(self, peer_id: PeerId, msg: p.Message, now: float) -> Outgoing:
        """Process one message from ``peer_id``; return the messages to send."""
        self._now_hint = now
        peer = self._peers.get(peer_id)
        if peer is None:
            if isinstance(msg, p.Hello):
                self._register(peer_id, msg, now)
                self._dispatch()  # a new executor may take tasks that were waiting
            elif isinstance(msg, p.Error):
                log.warning("unregistered peer %r says: %s", peer_id[:8], msg.text)  # never answer an error
            elif isinstance(msg, p.Welcome) and peer_id in self._hello_sent:
                self._welcome_credit[peer_id] = msg.credit  # a peer server's WELCOME precedes its HELLO
            elif not isinstance(msg, (p.Bye, p.Heartbeat, p.Welcome)):  # WELCOME precedes a peer server's HELLO
                self._emit(peer_id, p.Error(f"{msg.COMMAND.name} before HELLO: say HELLO first"))
            return self._flush()
        peer.last_seen = now
        handler = self._HANDLERS.get(type(msg))
        if handler is None:
            log.warning("unexpected %s from %s", msg.COMMAND.name, peer.name)
            self._emit(peer_id, p.Error(f"unexpected command {msg.COMMAND.name} from a {peer.hello.kind}"))
        else:
            handler(self, peer, msg, now)
        self._dispatch()
        if self._servers:
            self._advertise()
        return self._flush()

    def peer_gone(
        self, peer_id: PeerId, now: float, reason: str, exit_code: int | None = None, graceful: bool = False
    ) -> Outgoing:
        """A peer left (BYE), went silent, or its process died: recover its work."""
        self._now_hint = now
        self._peer_gone(peer_id, reason, exit_code, graceful)
        self._dispatch()
        if self._servers:
            self._advertise()
        return self._flush()

    def _peer_gone(self, peer_id: PeerId, reason: str, exit_code: int | None = None, graceful: bool = False) -> None:
        self._hello_sent.discard(peer_id)
        self._welcome_credit.pop(peer_id, None)
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        log.info("%s %s gone: %s", peer.hello.kind, peer.name, reason)
        self._lease_peer_gone(peer, reason, exit_code, graceful)  # issue 10
        if peer.hello.kind == "client":
            self._clients -= 1
            self._share_credit()
        if self._servers.pop(peer_id, None) is not None and not graceful:
            self._emit(peer_id, p.Bye(f"declared lost: {reason}"))  # it starts afresh if it still lives
        if peer.hello.kind == "executor" and exit_code is not None:
            self._nest_process_gone(peer.hello.pid, reason)  # issue 13: its process died, its nested clients too
        self._drop_client_work(peer)
        for gid in peer.in_flight:
            task = self._tasks.get(gid)
            if task is None:
                continue  # its client left or it was cancelled meanwhile
            self._sets_of(task).running -= 1
            if graceful or task.retries > 0:
                if not graceful:
                    task.retries -= 1
                    self.stats["retried"] += 1
                task.retried = True  # issue 11: the timeline marks it
                self._requeue(task)
            else:
                what = "peer server" if peer.is_server else "executor"
                msg = f"{what} {peer.name} died while running task {task.task_id} ({reason})"
                self._finish(task, _ERROR, encode_error(ExecutorDiedError(msg, exit_code), msg), peer.name)

    def tick(self, now: float) -> Outgoing:
        """Expire silent peers and send due heartbeats."""
        self._now_hint = now
        interval = self.config.heartbeat_interval
        if interval is None:
            return []
        expiry = interval * self.config.liveness
        for peer in list(self._peers.values()):
            if not peer.supervised and now - peer.last_seen > expiry:
                self._peer_gone(peer.id, f"silent for {now - peer.last_seen:.1f}s")
            elif now - peer.last_sent >= interval:
                # A peer server's heartbeat is its capacity (the Guide's heartbeats carry credit).
                self._emit(peer.id, self._capacity(peer, max(peer.offered, 0)) if peer.is_server else p.Heartbeat())
        self._dispatch()  # work recovered from expired peers goes to the living
        if self._servers:
            self._advertise()
        return self._flush()

    def next_deadline(self, now: float) -> float | None:
        """When :meth:`tick` next has work, or None if never (no heartbeats)."""
        interval = self.config.heartbeat_interval
        if interval is None or not self._peers:
            return None
        return min(peer.last_sent for peer in self._peers.values()) + interval

    # ----------------------------------------------------------------- queries
    def mark_supervised(self, pid: int) -> PeerId | None:
        """Liveness of the executor with ``pid`` is watched by its parent, not heartbeats."""
        for peer in self._peers.values():
            if peer.hello.pid == pid and peer.hello.kind == "executor":
                peer.supervised = True
                return peer.id
        return None

    def peer_by_pid(self, pid: int) -> PeerId | None:
        """The id of the executor peer whose process is ``pid``."""
        for peer in self._peers.values():
            if peer.hello.pid == pid and peer.hello.kind == "executor":
                return peer.id
        return None

    def has_work(self) -> bool:
        """True while any accepted task is queued or running."""
        return bool(self._tasks) or bool(self._leases)  # issue 10: lent executors' work is not known here

    def task_count(self) -> int:
        """Accepted tasks queued or running."""
        return len(self._tasks)

    def client_count(self) -> int:
        """Connected clients (not executors or control connections)."""
        return sum(1 for peer in self._peers.values() if peer.hello.kind == "client")

    def peers(self) -> list[PeerId]:
        """Every registered peer."""
        return list(self._peers)

    def status(self) -> dict[str, object]:
        """A plain snapshot for ``cs-server status``."""
        executors = []
        sets = []
        for peer in self._peers.values():
            if peer.hello.capacity and not peer.is_server:
                running = [self._tasks[g].func_ref for g in list(peer.in_flight)[:3] if g in self._tasks]
                executors.append({
                    "name": peer.name, "pid": peer.hello.pid, "capacity": peer.hello.capacity,
                    "stdio": peer.hello.stdio, "in_flight": len(peer.in_flight),
                    "completed": peer.completed, "running": running,
                })
            for s in peer.sets.values():
                sets.append({
                    "client": peer.name, "set_id": s.set_id, "queued": s.queued, "running": s.running,
                    "done": s.done, "failed": s.failed, "cancelled": s.cancelled, "closed": s.closed,
                })
        clients = [peer.name for peer in self._peers.values() if peer.hello.kind == "client"]
        info: dict[str, object] = {
            "executors": executors, "sets": sets, "clients": clients, "stats": dict(self.stats),
            "queued": self._pending, "draining": self.draining, "peers": self.server_peers(), "name": self.name}
        if self.stream is not None:  # issue 11: only while a dashboard watches
            info["stream"] = [list(entry) for entry in self.stream]
        self._lease_status(info)  # issue 10
        return info

    # ------------------------------------------------------------- lifecycle
    def abort(self, reason: str) -> Outgoing:
        """Fail every accepted task with ``reason`` (server stopping now)."""
        err = encode_error(TaskcsError(reason), reason)
        for task in list(self._tasks.values()):
            if task.gid not in self._tasks:
                continue  # issue 13: a subtask cancelled with its parent a moment ago
            client = self._peers.get(task.client)
            if client is not None and client.is_server:
                self._drop_client_work(client)  # its origin requeues them on our BYE
                continue
            if client is not None:
                s = client.sets[task.set_id]
                if task.state is TaskState.RUNNING:
                    s.running -= 1
                else:
                    s.queued -= 1
                    if task.io:
                        self._io_queue(task).remove(task.gid)  # issue 13: a root's, for a subtask
                    else:
                        self._pending -= 1
            if task.gid in self._tasks:
                self._finish(task, _ERROR, err, "server")
        return self._flush()

    def goodbye(self, reason: str) -> Outgoing:
        """Tell every peer the server is leaving."""
        for peer_id in self._peers:
            self._emit(peer_id, p.Bye(reason))
        return self._flush()

    # ---- issue 14: queued work that nothing here can run (an engine down, no executor) ----
    def queued_count(self) -> int:
        """Queued non-IO tasks (waiting for an executor, a peer server or an engine)."""
        return self._pending

    def can_place(self) -> bool:
        """True while some executor, peer server or engine could take queued non-IO work."""
        return bool(self._servers) or any(
            peer.slots and not peer.hello.io_only and not peer.is_server for peer in self._peers.values())

    def fail_queued(self, error: TaskcsError) -> Outgoing:
        """Fail every queued non-IO task with ``error``: the server knows none can run them."""
        err = encode_error(error, str(error))
        for task in self._take(self._pending):
            self._sets_of(task).queued -= 1
            self._finish(task, _ERROR, err, "server")
        return self._flush()
    # ---- end issue 14 ----

    # ---------------------------------------------------------------- handlers
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
        self._blobs.update(msg.blobs)
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

    _HANDLERS: dict[type, Any] = {
        p.Hello: _on_hello, p.Submit: _on_submit, p.ExecDone: _on_exec_done, p.Cancel: _on_cancel,
        p.Output: _on_output, p.Heartbeat: _on_heartbeat, p.Bye: _on_bye, p.StatusRequest: _on_status,
        p.Welcome: FederationRules._on_welcome, p.Capacity: FederationRules._on_capacity,
        p.PeerDone: FederationRules._on_peer_done, p.Error: FederationRules._on_error,
        p.NotCancelled: _on_not_cancelled,
        # issue 10
        p.Lease: LeaseRules._on_lease, p.Release: LeaseRules._on_release,
        p.LeaseStop: LeaseRules._on_lease_stop, p.LeaseCounts: LeaseRules._on_lease_counts,
        p.DirectEnded: DirectParentRules._on_direct_ended,  # issues 10 + 13
    }

    # ---- flat memory with many clients: each client's credit is a share of one budget ----------
    def _credit_share(self) -> int:
        cfg = self.config
        share = cfg.server_budget // max(1, self._clients)
        return max(min(cfg.min_credit, cfg.client_credit), min(cfg.client_credit, share))

    def _share_credit(self) -> None:
        """Tell clients whose share changed (a client joined or left). A client may still have
        sent up to its old credit; those tasks are accepted (the hard limit is client_credit)."""
        share = self._credit_share()
        for peer in self._peers.values():
            if peer.hello.kind == "client" and peer.credit != share:
                peer.credit = share
                self._emit(peer.id, p.Credit(share))

    def _emit(self, peer_id: PeerId, msg: p.Message) -> None:
        self._out.append((peer_id, msg))
        peer = self._peers.get(peer_id)
        if peer is not None:
            peer.last_sent = self._now_hint

    _now_hint = 0.0

    # ---- issue 11: the timeline's clocks and the dashboard's task stream ----------------------
    #: Seconds to add to ``now`` (the driver's monotonic clock) for the wall clock: the server
    #: keeps it current, so the dispatcher can stamp CAPACITY without reading a clock itself.
    wall_offset = 0.0
    #: The last finished tasks (100 by default), (end_ns, func_ref, executor, status, duration_us),
    #: while a dashboard watches (:meth:`watch_stream`); None otherwise, so costing nothing.
    stream: deque[tuple[int, str, str, int, int]] | None = None

    def watch_stream(self, on: bool, size: int = 100) -> None:
        """Keep the last ``size`` finished tasks for :meth:`status` (``on``) or stop (and forget)."""
        if on and self.stream is None:
            self.stream = deque(maxlen=size)
        elif not on:
            self.stream = None

    def wall_ns(self, now: float) -> int:
        """``now`` (the driver's clock) as wall-clock ns, by :attr:`wall_offset`."""
        return int((now + self.wall_offset) * 1e9)
    # ---- end issue 11 ------------------------------------------------------------------------

    def _flush(self) -> Outgoing:
        out, self._out = self._out, []
        return out
