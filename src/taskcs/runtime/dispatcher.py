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

Where each part lives. This module: the state (made in ``Dispatcher.__init__``), the calls
above, the queries and lifecycle calls the server makes, the table of which method takes each
message (``_HANDLERS``), credit shares and the clocks. The rest is mixed into :class:`Dispatcher`, one
module of ``taskcs.runtime`` each, with its own data flow; the state they share is declared once,
as ``DispatcherState``, which each derives from::

    dispatch_records    _Task, _Set, _Peer: one record per accepted task, task set, peer;
                        DispatcherState
    handlers            HELLO, SUBMIT, EXEC_DONE, CANCEL, OUTPUT... of clients and executors
    scheduling          queued tasks -> executors (windows, fairness), then peer servers
    outcomes            a task's end -> its one reply, SET_DONE; stopping abandoned work (issue 9)
    federation          peer servers (phase 4)
    leases              executors lent to a lone client: the direct path (issue 10)
    nesting             tasks that submit tasks (issue 13); direct_parents: such a task sent
                        on a lease (issues 10 + 13)
    blob_refs           which connection holds each code blob; pruning those nobody needs
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..errors import ExecutorDiedError, TaskcsError
from . import protocol as p
from .blob_refs import BlobRules
from .codec import encode_error
from .direct_parents import DirectParentRules  # issues 10 + 13: parents sent on a lease
from .dispatch_records import _ERROR, PeerId, _Peer, _Set, _Task
from .federation import FederationRules
from .handlers import CoreHandlers
from .leases import LeaseRules  # issue 10
from .nesting import NestingRules  # issue 13: tasks that submit tasks
from .outcomes import OutcomeRules
from .scheduling import FAIRNESS_QUANTUM as FAIRNESS_QUANTUM  # re-exported: tests take it from here
from .scheduling import SchedulingRules
from .task import TaskState

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


class Dispatcher(CoreHandlers, SchedulingRules, OutcomeRules,  # messages in, work placed, results out
                 FederationRules, NestingRules, LeaseRules, DirectParentRules, BlobRules):
    """Accepts task sets from clients and spreads their tasks over registered executors.

    The methods here are the public API and the glue; the rules are in the mixins (see the
    module docstring for which holds what).
    """

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
        self._blobs_init()

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
        if peer.owned_blobs:
            self._unhold_blobs(peer, peer.owned_blobs)
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
        if self._blob_orphans and now >= self._blob_sweep_at:  # code nobody holds, once no live task names it
            self._blob_sweep_at = now + interval  # a pass over the live tasks: once per interval at most
            self._prune_blobs()
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
            "queued": self._pending, "draining": self.draining, "peers": self.server_peers(), "name": self.name,
            "blobs": len(self._blobs), "blob_bytes": sum(map(len, self._blobs.values()))}
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
    #: Which method takes each message from a registered peer (a new peer's HELLO: _register).
    _HANDLERS: dict[type, Any] = {
        p.Hello: CoreHandlers._on_hello, p.Submit: CoreHandlers._on_submit,
        p.ExecDone: CoreHandlers._on_exec_done, p.Cancel: CoreHandlers._on_cancel,
        p.Output: CoreHandlers._on_output, p.Heartbeat: CoreHandlers._on_heartbeat,
        p.Bye: CoreHandlers._on_bye, p.StatusRequest: CoreHandlers._on_status,
        p.Welcome: FederationRules._on_welcome, p.Capacity: FederationRules._on_capacity,
        p.PeerDone: FederationRules._on_peer_done, p.Error: FederationRules._on_error,
        p.NotCancelled: CoreHandlers._on_not_cancelled,
        # issue 10
        p.Lease: LeaseRules._on_lease, p.Release: LeaseRules._on_release,
        p.LeaseStop: LeaseRules._on_lease_stop, p.LeaseCounts: LeaseRules._on_lease_counts,
        p.DirectEnded: DirectParentRules._on_direct_ended,  # issues 10 + 13
        p.Forget: BlobRules._on_forget,
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
