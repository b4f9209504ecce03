"""The dispatcher's federation rules (phase 4), sans-IO like the rest of the dispatcher.

A peer server is, to the dispatcher, two things at once (DESIGN.md, "Phase 4 direction"):

* a **scheduling target** with ``slots`` (the free capacity it advertises in CAPACITY, sent
  with every heartbeat interval and on change): after the local executors, the dispatcher
  forwards it what they cannot take now, within a credit window, as SUBMIT batches;
* a **source of work** that looks like a client: its forwarded tasks sit in a set of their own
  (``_Set.fwd``) and run on local executors only, never onwards, so work cannot ping-pong;
  their outcomes go back as PEER_DONE, their output as OUTPUT, both keyed by the origin's gid.

Data flow between an origin O and a peer P::

    O: client SUBMIT -> set.pending -> local executors first -> the rest --SUBMIT(gids)--> P
    P: fwd set of O -> P's executors -> EXEC_DONE -> --PEER_DONE(gid, ..., "exec-2")--> O
    O: PEER_DONE -> task still assigned to P?  yes: RESULTS to the client ("P:exec-2")
                                              no (requeued after P was lost): discarded

The origin owns each task until its client has the result: a lost peer's unfinished tasks
are requeued (retries permitting, as for a dead executor) and a late result from a peer
already declared lost is dropped, because a lost peer's record (and so its ``in_flight``)
is gone and a reconnection is a new peer. IOTasks never enter the shared queues, so they
are never forwarded. Code by value goes only to a peer of the same Python minor version;
a peer of other FEATURES is refused, with both versions named in the log.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from .. import __version__
from . import protocol as p
from .dispatch_records import DispatcherState
from .timeline import ClockEstimator

if TYPE_CHECKING:
    from .dispatcher import PeerId, _Peer, _Set, _Task

log = logging.getLogger(__name__)

PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
#: This taskcs's version, told to peer servers (and named when one is refused).
TASKCS = __version__


class FederationRules(DispatcherState):
    """Mixed into :class:`~taskcs.runtime.dispatcher.Dispatcher`; see the module docstring."""

    if TYPE_CHECKING:  # what the Dispatcher provides
        def _emit(self, peer_id: PeerId, msg: p.Message) -> None: ...
        def _flush(self) -> list[tuple[PeerId, p.Message]]: ...
        def _peer_gone(self, peer_id: PeerId, reason: str, exit_code: int | None = None,
                       graceful: bool = False) -> None: ...
        def peer_gone(self, peer_id: PeerId, now: float, reason: str, exit_code: int | None = None,
                      graceful: bool = False) -> list[tuple[PeerId, p.Message]]: ...
        def _sets_of(self, task: _Task) -> _Set: ...
        def _record_duration(self, func_ref: str, duration_us: int) -> None: ...
        def _finish(self, task: _Task, status: int, payload: bytes, executor: str, duration_us: int = 0,
                    start_ns: int = 0, end_ns: int = 0, server: str = "") -> None: ...
        def wall_ns(self, now: float) -> int: ...
        def _window(self, peer: _Peer, estimate_us: float | None) -> int: ...

    # ----------------------------------------------------------- public API
    def introduce(self, peer_id: PeerId, now: float) -> list[tuple[PeerId, p.Message]]:
        """Open a link to a peer server on ``peer_id``: send it our HELLO.

        The other end answers with WELCOME and its own HELLO, which registers it here.
        """
        self._now_hint = now
        self._hello_sent.add(peer_id)
        self._emit(peer_id, self._server_hello())
        return self._flush()

    def forget(self, peer_id: PeerId, now: float, reason: str) -> list[tuple[PeerId, p.Message]]:
        """A link was closed by its owner (lost, refused, reconnecting): drop its state."""
        self._hello_sent.discard(peer_id)
        return self.peer_gone(peer_id, now, reason)

    def server_peers(self) -> list[dict[str, Any]]:
        """One plain record per connected peer server, for ``cs-server status``."""
        out = []
        for peer in self._servers.values():
            stats = self.peer_stats.get(peer.name, {})
            out.append({
                "id": peer.id.hex(), "name": peer.name, "pid": peer.hello.pid, "capacity": peer.slots,
                "in_flight": len(peer.in_flight), "held": len(peer.tasks), "python": peer.hello.python,
                "forwarded": stats.get("forwarded", 0), "returned": stats.get("returned", 0),
                "offered": max(peer.offered, 0),
                **self._clock_status(peer),  # issue 11
            })
        return out

    def peer_name(self, peer_id: PeerId) -> str:
        """The name a registered peer gave in its HELLO ("" if unknown)."""
        peer = self._peers.get(peer_id)
        return peer.name if peer is not None else ""

    def is_server_peer(self, peer_id: PeerId) -> bool:
        """True if ``peer_id`` is a registered peer server."""
        return peer_id in self._servers

    # ------------------------------------------------------------ handlers
    def _server_hello(self) -> p.Hello:
        return p.Hello("server", self.name, self.server_pid, self._offer(None), forward_output=True,
                       python=PYTHON, features=p.FEATURES, taskcs=TASKCS)

    def _refuse_server(self, peer_id: PeerId, hello: p.Hello) -> bool:
        """True (and the peer told why) if a peer server speaks another protocol."""
        if hello.features == p.FEATURES:
            return False
        text = (f"refusing peer server {hello.name!r} (pid {hello.pid}): it speaks taskcs protocol "
                f"{p.VERSION}.{hello.features} (taskcs {hello.taskcs or '?'}), this server "
                f"{p.VERSION}.{p.FEATURES} (taskcs {TASKCS})")
        log.warning("%s", text)
        self._emit(peer_id, p.Error(text))
        self._emit(peer_id, p.Bye(text))
        return True

    def _joined_server(self, peer: _Peer) -> None:
        peer.is_server = True
        peer.slots = max(0, peer.hello.capacity)
        peer.py_ok = peer.hello.python == PYTHON
        peer.credit = self._welcome_credit.pop(peer.id, 0)
        self._servers[peer.id] = peer
        self.peer_stats.setdefault(peer.name, {"forwarded": 0, "returned": 0})
        if not peer.py_ok:
            log.warning("peer server %s runs Python %s and this one %s: code sent by value cannot run there, "
                        "so no work is forwarded to it", peer.name, peer.hello.python, PYTHON)
        log.info("peer server %s joined: taskcs %s, Python %s, offering %d slots", peer.name,
                 peer.hello.taskcs or "?", peer.hello.python, peer.slots)
        if peer.name == self.name:
            log.warning("peer server %s has the same name as this one; name servers with --name", peer.name)
        if peer.id not in self._hello_sent:
            self._hello_sent.add(peer.id)
            self._emit(peer.id, self._server_hello())

    def _on_welcome(self, peer: _Peer, msg: p.Welcome, now: float) -> None:
        if peer.is_server:  # a peer server accepted our HELLO (its own HELLO registered it)
            peer.credit = msg.credit

    def _on_capacity(self, peer: _Peer, msg: p.Capacity, now: float) -> None:
        if peer.is_server:
            peer.slots = max(0, msg.slots)
            if msg.sent_ns:  # issue 11: a heartbeat that closes a round trip
                if peer.clock is None:
                    peer.clock = ClockEstimator()
                peer.clock.received(msg.sent_ns, msg.echo_ns, msg.held_ns, self.wall_ns(now))
        else:
            self._emit(peer.id, p.Error(f"CAPACITY from a {peer.hello.kind}: only peer servers send it"))

    def _on_peer_done(self, peer: _Peer, msg: p.PeerDone, now: float) -> None:
        if not peer.is_server:
            self._emit(peer.id, p.Error(f"PEER_DONE from a {peer.hello.kind}: only peer servers send it"))
            return
        stats = self.peer_stats[peer.name]
        clock = peer.clock
        for gid, status, payload, duration_us, executor, start_ns, end_ns in msg.results:
            peer.in_flight.discard(gid)
            task = self._tasks.get(gid)
            if task is None or task.executor != peer.id:
                continue  # cancelled, its client left, or already requeued elsewhere
            stats["returned"] += 1
            peer.completed += 1
            if status == 0:  # Status.OK
                self._record_duration(task.func_ref, duration_us)
            self._sets_of(task).running -= 1
            if clock is not None:  # issue 11: its clock onto ours, so the timeline's lanes line up
                start_ns, end_ns = clock.to_local(start_ns), clock.to_local(end_ns)
            self._finish(task, status if status in (0, 2) else 1, payload, f"{peer.name}:{executor}", duration_us,
                         start_ns, end_ns, peer.name)

    def _on_error(self, peer: _Peer, msg: p.Error, now: float) -> None:
        log.warning("%s %s says: %s", peer.hello.kind, peer.name, msg.text)
        if peer.is_server and "before HELLO" in msg.text:
            # It no longer knows this link (it restarted, or declared us lost): start afresh.
            self._peer_gone(peer.id, "the peer server no longer knows this link", graceful=True)

    # ---------------------------------------------------------- scheduling
    def _offer(self, peer: _Peer | None) -> int:
        """Slots this server would give ``peer``'s work now: idle ones, none while our own
        clients' work waits (local first) or while stopping."""
        if self.draining or self._pending > self._pending_fwd:
            return 0
        busy = 0
        total = 0
        for ex in self._peers.values():
            if ex.hello.kind == "executor" and not ex.hello.io_only:
                total += ex.slots
                busy += len(ex.in_flight)
        if peer is not None:
            s = peer.sets.get(0)
            busy -= s.running if s is not None else 0  # its own tasks do not crowd it out
        return max(0, min(total, total - busy))

    def _advertise(self) -> None:
        for peer in self._servers.values():
            offer = self._offer(peer)
            if offer != peer.offered:
                peer.offered = offer
                self._emit(peer.id, self._capacity(peer, offer))

    # ---- issue 11: CAPACITY as the link's clock exchange -----------------------------------
    def _capacity(self, peer: _Peer, slots: int) -> p.Capacity:
        """A CAPACITY for ``peer`` stamped for the round trip (see ClockEstimator)."""
        if peer.clock is None:
            peer.clock = ClockEstimator()
        return p.Capacity(slots, *peer.clock.stamp(self.wall_ns(self._now_hint)))

    @staticmethod
    def _clock_status(peer: _Peer) -> dict[str, Any]:
        clock = peer.clock
        rtt = clock.rtt_ns if clock is not None else None
        if clock is None or rtt is None:
            return {"rtt_ms": None, "clock_offset_ms": None}
        return {"rtt_ms": round(rtt / 1e6, 3), "clock_offset_ms": round(clock.offset_ns / 1e6, 3)}
    # ---- end issue 11 ------------------------------------------------------------------------

    def _forward(self, peer: _Peer, entries: list[tuple[int, str, bytes, str]], retries: list[int],
                 blobs: dict[str, bytes]) -> None:
        """Send tasks to a peer server as a client would: no import path (it names our files).

        Each keeps its retries left, so the peer re-runs it after its own executor's death as
        we would; if the peer itself is lost, we requeue it with the retries we still count.
        """
        self.peer_stats[peer.name]["forwarded"] += len(entries)
        tasks = [(gid, ref, payload, 0, n) for (gid, ref, payload, _), n in zip(entries, retries, strict=True)]
        self._emit(peer.id, p.Submit(0, tasks, {k: v for k, v in blobs.items() if not k.startswith("path:")}, False))

    def _remote_targets(self, estimate: float | None) -> list[tuple[_Peer, int]]:
        free = []
        for peer in self._servers.values():
            if peer.py_ok and peer.slots > 0:
                # Never past the credit a server grants one client (the peer's is ours by default):
                # beyond it the peer would refuse tasks instead of queueing them.
                credit = peer.credit or self.config.client_credit
                n = min(self._window(peer, estimate), credit) - len(peer.in_flight)
                if n > 0:
                    free.append((peer, n))
        return free
