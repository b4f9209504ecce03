"""Leases: the server lends idle executors to a client, which then sends them tasks directly.

Data flow (issue 10; the client's half is :mod:`taskcs.client.direct`)::

    client --LEASE(endpoint)--> server            a standing request, once per connection;
                                                  LEASE(0) back if none can be lent now
    server: the client is alone, nothing queued, an executor idle
        --LEASE(id, endpoint)--> executor         it connects a DEALER to the client's ROUTER
        --LEASE(id, name, pid)--> client
    client <--TASKS/CANCEL/INTERRUPT--> executor <--EXEC_DONE/OUTPUT/NOT_CANCELLED--  (2 hops)
    client --LEASE_COUNTS--> server               totals, folded into stats and status
    server --REVOKE--> client --(results of what it sent are in)--RELEASE--> server
        --RELEASE--> executor --RELEASE--> server  the executor takes server tasks again
    executor dies (waitpid) --> LEASE_LOST --> client resubmits (retries) or fails its tasks
    client gone --> RELEASE(abandon) --> executor, signalled (LEASE_STOP's table) until it
        answers, killed after the interrupt grace: abandoned work is stopped as on the server path

Policy, the simplest that is correct with several clients: executors are lent only to a
client that is the server's **only** client, while no peer server or engine is linked, the
server is not draining, and no task waits in the server's queue. Every lease is revoked the
moment any of that stops being true (a second client connects, the server starts to stop, a
task set or a retry is queued at the server), and granted again once it holds anew and the
executor is idle. Several clients therefore share executors through the server exactly as
before; one client alone with plain tasks (the common case, and every benchmark) gets the
direct path. A leased executor has no scheduling slots (``slots = 0``), so the dispatcher never
sends it server tasks; they come back when the executor itself says RELEASE.

Issues 10 + 13: a client in a local executor's process (a nested ``Client()`` in a task, or
one a task left behind) is not counted as another client, and nothing is lent while a task
with subtasks lives; tasks sent on a lease may be parents. Why, and how their subtasks are
tied to them: :mod:`taskcs.runtime.direct_parents`.

The state lives here, mixed into :class:`~taskcs.runtime.dispatcher.Dispatcher`, sans-IO like it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import protocol as p
from .dispatch_records import DispatcherState

if TYPE_CHECKING:
    from .dispatcher import _Peer

log = logging.getLogger(__name__)

PeerId = bytes


@dataclass(slots=True, eq=False)
class _Lease:
    id: int
    client: PeerId
    executor: PeerId
    #: granted -> revoked (REVOKE sent) -> ending (the client RELEASEd; the executor told)
    #: -> gone when the executor answers; or abandoned (its client left) -> gone likewise.
    state: str = "granted"
    in_flight: int = 0  # as the client last reported (LEASE_COUNTS)
    running: str = ""  # the function of the task running there, as last reported


class LeaseRules(DispatcherState):
    """The lease half of the dispatcher (mixed in; shares its state)."""

    # The dispatcher's, declared for the type checker.

    def _emit(self, peer_id: PeerId, msg: p.Message) -> None:
        raise NotImplementedError  # the dispatcher's

    if TYPE_CHECKING:  # issues 10 + 13 (taskcs.runtime.direct_parents): its other rules'
        def _direct_lease_over(self, lease_id: int) -> None: ...

    def _leases_init(self) -> None:
        self._lease_wants: dict[PeerId, str] = {}  # client -> its direct endpoint
        self._leases: dict[int, _Lease] = {}
        self._lease_of: dict[PeerId, int] = {}  # executor -> lease id
        self._lease_stops: dict[int, float] = {}  # lease id -> since when it is signalled
        self._lease_counts: dict[PeerId, tuple[int, int, int, int, int]] = {}  # client -> totals
        self._lease_waiting: dict[PeerId, int] = {}  # client -> tasks it holds for its leases
        self._lease_serial = 0
        self._in_executor: set[PeerId] = set()  # issues 10 + 13: clients in a local executor's process

    # ------------------------------------------------------------------ handlers
    def _on_lease(self, peer: _Peer, msg: p.Lease, now: float) -> None:
        if peer.hello.kind != "client" or not msg.endpoint.startswith("unix://"):
            self._emit(peer.id, p.Error("LEASE is for local clients, with a unix:// endpoint"))
            return
        self._lease_wants[peer.id] = msg.endpoint
        if not self._grant_idle(peer, msg.endpoint):
            # None now: say so, so the client stops holding its tasks for a lease (the request
            # stands: executors come when they can).
            self._emit(peer.id, p.Lease(0, "", "", 0))

    def _on_release(self, peer: _Peer, msg: p.Release, now: float) -> None:
        lease = self._leases.get(msg.lease_id)
        if lease is None:
            return
        if peer.id == lease.executor:
            self._end_lease(lease)
        elif peer.id == lease.client and lease.state in ("granted", "revoked"):
            lease.state = "ending"
            lease.in_flight = 0
            self._emit(lease.executor, p.Release(lease.id, False))

    def _on_lease_stop(self, peer: _Peer, msg: p.LeaseStop, now: float) -> None:
        lease = self._leases.get(msg.lease_id)
        if lease is None or lease.client != peer.id:
            return
        if msg.on:
            self._lease_stops.setdefault(lease.id, now)
        else:
            self._lease_stops.pop(lease.id, None)

    def _on_lease_counts(self, peer: _Peer, msg: p.LeaseCounts, now: float) -> None:
        if peer.hello.kind != "client":
            return
        new = (msg.submitted, msg.done, msg.failed, msg.cancelled, msg.retried)
        old = self._lease_counts.get(peer.id, (0, 0, 0, 0, 0))
        self._lease_counts[peer.id] = new
        stats = self.stats
        for key, a, b in zip(("submitted", "done", "failed", "cancelled", "retried"), old, new, strict=True):
            stats[key] += b - a
        self._lease_waiting[peer.id] = msg.in_flight.get(0, 0)
        for lease_id, n in msg.in_flight.items():
            lease = self._leases.get(lease_id)
            if lease is not None and lease.client == peer.id and lease.state in ("granted", "revoked"):
                lease.in_flight = n
                lease.running = msg.running.get(lease_id, "") if n else ""

    # ------------------------------------------------------------------ decisions
    def _lease_step(self) -> None:
        """Grant idle executors to a lone client; revoke when it is no longer alone."""
        exclusive = self._clients - len(self._in_executor) == 1 and not self._servers and not self.draining
        if self._leases and (not exclusive or self._pending):
            for lease in self._leases.values():
                if lease.state == "granted":
                    self._revoke(lease)
        if (not exclusive or self._pending or not self._lease_wants
                or (self._nest is not None and self._nest.children)):  # issues 10 + 13: a task tree lives
            return
        for client_id, endpoint in self._lease_wants.items():
            client = self._peers.get(client_id)
            if client is not None:
                self._grant_idle(client, endpoint)

    def _grant_idle(self, client: _Peer, endpoint: str) -> int:
        """Lend ``client`` every idle executor if the policy allows; how many were lent."""
        if (self._clients - len(self._in_executor) != 1 or self._servers or self.draining or self._pending
                or (self._nest is not None and self._nest.children)):  # issues 10 + 13: a task tree lives
            return 0
        granted = 0
        for peer in list(self._peers.values()):
            if (peer.hello.kind == "executor" and peer.slots > 0 and not peer.in_flight
                    and not peer.hello.io_only and peer.id not in self._lease_of
                    and peer.hello.pid != self.server_pid):
                self._grant(client, peer, endpoint)
                granted += 1
        return granted

    def _grant(self, client: _Peer, executor: _Peer, endpoint: str) -> None:
        self._lease_serial += 1
        lease = _Lease(self._lease_serial, client.id, executor.id)
        self._leases[lease.id] = lease
        self._lease_of[executor.id] = lease.id
        executor.slots = 0  # the dispatcher sends it nothing while it is lent
        log.info("lease %d: executor %s lent to client %s", lease.id, executor.name, client.name)
        self._emit(executor.id, p.Lease(lease.id, endpoint, client.name, client.hello.pid))
        self._emit(client.id, p.Lease(lease.id, "", executor.name, executor.hello.pid))

    def _revoke(self, lease: _Lease) -> None:
        lease.state = "revoked"
        log.info("lease %d revoked", lease.id)
        self._emit(lease.client, p.Revoke(lease.id))

    def _end_lease(self, lease: _Lease) -> None:
        del self._leases[lease.id]
        self._lease_of.pop(lease.executor, None)
        self._lease_stops.pop(lease.id, None)
        self._direct_lease_over(lease.id)  # issues 10 + 13: its tasks' subtasks are cancelled
        executor = self._peers.get(lease.executor)
        if executor is not None:
            executor.slots = max(0, executor.hello.capacity)
        log.info("lease %d ended", lease.id)

    def _lease_peer_gone(self, peer: _Peer, reason: str, exit_code: int | None, graceful: bool) -> None:
        """A peer left: a lease holder's executors are told to drop its work; a leased
        executor's death is its client's to handle (LEASE_LOST)."""
        self._in_executor.discard(peer.id)  # issues 10 + 13
        if not self._leases and not self._lease_wants:
            return
        self._lease_wants.pop(peer.id, None)
        self._lease_counts.pop(peer.id, None)
        self._lease_waiting.pop(peer.id, None)
        lease_id = self._lease_of.pop(peer.id, None)
        if lease_id is not None:
            lease = self._leases.pop(lease_id)
            self._lease_stops.pop(lease_id, None)
            if lease.state != "abandoned" and lease.client in self._peers:
                self._emit(lease.client, p.LeaseLost(lease_id, reason, exit_code or 0, graceful))
            self._direct_lease_over(lease_id)  # issues 10 + 13: its tasks' subtasks are cancelled
        for lease in list(self._leases.values()):
            if lease.client == peer.id and lease.state != "abandoned":
                lease.state = "abandoned"
                lease.in_flight = 0
                self._emit(lease.executor, p.Release(lease.id, True))
                # Until it answers: its running task is interrupted as on the server path.
                self._lease_stops[lease.id] = self._now_hint
                self._direct_lease_over(lease.id)  # issues 10 + 13: and its tasks' subtasks cancelled

    def _lease_client_joined(self, client: _Peer) -> None:
        """Issues 10 + 13: a client in a local executor's process (a nested one, or one a task
        left behind) is not "another client" for the lease policy; see runtime.direct_parents."""
        pid = client.hello.pid
        if pid != self.server_pid and any(peer.hello.kind == "executor" and peer.hello.pid == pid
                                          for peer in self._peers.values()):
            self._in_executor.add(client.id)

    # ------------------------------------------------------------------ queries
    def _lease_interrupted(self) -> list[tuple[int, float]]:
        """Leased executors to signal (a forced cancel, or an abandoned lease): [(pid, since)]."""
        out = []
        for lease_id, since in self._lease_stops.items():
            lease = self._leases.get(lease_id)
            executor = self._peers.get(lease.executor) if lease is not None else None
            if executor is not None:
                out.append((executor.hello.pid, since))
        return out

    def _lease_status(self, info: dict[str, Any]) -> None:
        """Add the leases to a status snapshot: a leased executor shows its client's tasks in
        flight there, and a client's direct-path tasks count in its set 0, whichever path they took."""
        rows = []
        by_pid: dict[int, tuple[str, int, str]] = {}
        running: dict[PeerId, int] = {}
        for lease in self._leases.values():
            client = self._peers.get(lease.client)
            executor = self._peers.get(lease.executor)
            name = client.name if client is not None else "?"
            rows.append({"id": lease.id, "client": name, "state": lease.state, "in_flight": lease.in_flight,
                         "executor": executor.name if executor is not None else "?"})
            if executor is not None:
                by_pid[executor.hello.pid] = (name, lease.in_flight, lease.running)
            running[lease.client] = running.get(lease.client, 0) + lease.in_flight
        info["leases"] = rows
        for row in info.get("executors", []):
            if row.get("pid") in by_pid:
                row["leased_to"], row["in_flight"], ref = by_pid[row["pid"]]
                row["running"] = [ref] if ref else []
        waiting = sum(self._lease_waiting.values())
        if waiting:  # a lone client's tasks waiting for room on its leases are queued too
            info["queued"] = int(info.get("queued", 0)) + waiting
        sets = info.get("sets", [])
        for client_id, (_, done, failed, cancelled, _) in self._lease_counts.items():
            client = self._peers.get(client_id)
            if client is None:
                continue
            row = next((s for s in sets if s["client"] == client.name and s["set_id"] == 0), None)
            if row is None:
                row = {"client": client.name, "set_id": 0, "queued": 0, "running": 0, "done": 0, "failed": 0,
                       "cancelled": 0, "closed": False}
                sets.append(row)
            row["queued"] += self._lease_waiting.get(client_id, 0)
            row["running"] += running.get(client_id, 0)
            row["done"] += done
            row["failed"] += failed
            row["cancelled"] += cancelled
