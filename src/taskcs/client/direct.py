"""The direct path: tasks go straight to executors the server lent this client (issue 10).

Data flow (the server's half and the policy: :mod:`taskcs.runtime.leases`)::

    WELCOME --> listen at unix://<runtime dir>/direct-<pid>-<n>.sock --LEASE--> server
    server --LEASE(id, executor)--> _leases[id]; the executor connects and says HELLO: live
    I/O turn: outbox (plain, non-IO tasks: set 0) --> _dq (counted submitted here)
              _dq --> the lease with the fewest in flight, within its window --TASKS--> executor
              (at most LEASE_BYTES of big payloads in flight each; in shared memory: runtime/shm.py)
    executor --EXEC_DONE--> _on_direct_results --> future (executor named as on the server path)
    executor --OUTPUT / NOT_CANCELLED--> on_output / future.cancel()'s answer
              (those three in :mod:`taskcs.client.lease_results`)
    fut.cancel() --CANCEL--> executor;  cancel(force=True) --INTERRUPT--> executor, and
              --LEASE_STOP(on)--> server, which signals it (killed after its grace) until the
              result is in (LEASE_STOP(off))
    REVOKE --> send no more there; once its results are in --RELEASE--> server
    LEASE_LOST --> its unfinished tasks: resubmitted (retries permitting) or failed, exactly as
              the server fails them ("executor X died while running task N")
    totals --LEASE_COUNTS (at most every REPORT_SECONDS, and before BYE)--> server's stats

Task sets, IOTasks and everything of a client that is not alone on its server take the server
path as before. A result is taken only from the lease its task was sent to, and only once: one
that arrives after its task was resubmitted elsewhere is dropped. Code blobs and the import path
go once per lease connection.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque

from ..runtime import codec
from ..runtime import protocol as p
from ..runtime.task import FLAG_IO
from .lease_results import LeaseResults
from .leased import DirectSocket, Totals, _Leased, _load
from .recovery import Item

log = logging.getLogger(__name__)

#: Work queued ahead per leased executor, in seconds of measured task time, and its cap: the
#: server's prefetch rule (DispatcherConfig), so a lease balances as the server would.
PREFETCH_SECONDS = 0.004
MAX_PREFETCH = 512
#: Longest plain tasks wait for the answer to LEASE (one round trip, and the executors'
#: HELLO): sent through the server meanwhile, they would be queued behind executors lent to
#: this very client, whose leases would then be revoked and granted again.
LEASE_WAIT = 0.2
#: Big-payload bytes past which a TASKS message to a lease is sent and the next one begun,
#: so its executor starts on the first while the next is on its way: one 32 MB message of 32
#: tasks left it idle until the last byte came (1 MB echo at 1.0x PPE's rate, measured).
BATCH_BYTES = 1 << 20
#: Big-payload bytes in flight to one lease past which no more go there (one task always may).
LEASE_BYTES = 8 << 20
#: Digests of blobs a leased executor has from us, remembered so each goes once per lease;
#: past this many, FORGET the ones no task in flight there names and start again
#: (taskcs.runtime.blob_refs: the executor drops them; a task that needs one brings it again).
LEASE_BLOBS_LIMIT = 4096


class Direct(LeaseResults):
    """The part of :class:`~taskcs.client.client.Client` that drives its leases: asks for
    them and sends them tasks (what comes back: :class:`LeaseResults`).

    Mixed into Client, whose state it shares; runs in whichever thread does the client's I/O.
    """

    def _direct_init(self, enabled: bool) -> None:
        self._dsock = None
        self._leases: dict[int, _Leased] = {}
        self._lease_idents: dict[bytes, _Leased] = {}
        self._hellos: set[bytes] = set()  # executors connected before their grant came
        self._direct_of: dict[int, _Leased] = {}  # task_id -> the lease it was sent to
        self._dq: deque[Item] = deque()  # submitted to the direct path, not sent yet
        self._dlive = 0  # live, unrevoked leases
        self._totals = Totals()
        self._dcounts = self._totals.counts  # submitted, done, failed, cancelled, retried
        self._durations: dict[str, float] = {}  # func_ref -> EWMA of its run time (µs)
        self._lease_wait = 0.0  # until when plain tasks wait for an answer to LEASE
        self._lease_asked = True  # until _direct_attach: nothing to ask for
        self._any_result = False
        blob = "\0".join(self._hello.sys_path).encode()
        self._dctx = ("path:" + codec.blob_digest(blob), blob) if blob else ("", b"")
        endpoint = str(getattr(self._conn, "endpoint", ""))
        self._ddir = os.path.dirname(endpoint[6:]) if endpoint.startswith("ipc://") else None
        if enabled and self._ddir is not None and hasattr(self._conn, "poller"):
            self._lease_asked = False  # once there is a reason to (_maybe_ask_lease)

    def _direct_attach(self) -> None:
        """After a reconnection: watch the ROUTER with the new connection's poller, and ask
        the new server for leases when there is a reason to."""
        if self._dsock is None:
            return
        poller = getattr(self._conn, "poller", None)
        if poller is None:
            return
        self._dsock.attach(poller)
        self._lease_asked = False

    def _maybe_ask_lease(self) -> None:
        """Ask for leases when a plain task is about to leave after this client has had a
        result and has nothing at the server: a client that submits one task and leaves (a
        cold start, `cs-client run`) never binds a socket, and a first burst is not split
        between paths. The task then waits (LEASE_WAIT at most) for the answer."""
        if (self._lease_asked or not self._any_result or self._outstanding or not self._outbox
                or not self._direct_eligible(self._outbox[0])):
            return
        self._lease_asked = True
        if self._dsock is None:
            try:
                assert self._ddir is not None
                self._dsock = DirectSocket(self._ddir)
            except OSError as exc:  # a path too long for a socket, say: the server path remains
                log.info("no direct path (%s): every task goes through the server", exc)
                return
            self._dsock.attach(self._conn.poller)  # type: ignore[attr-defined]
        self._conn.send(p.Lease(0, self._dsock.endpoint, "", 0))
        self._lease_wait = time.monotonic() + LEASE_WAIT

    # ------------------------------------------------------------------ server messages
    def _on_lease_message(self, msg: p.Message) -> None:
        if isinstance(msg, p.Lease):
            if msg.lease_id == 0:  # none now
                self._lease_wait = 0.0
                return
            lease = _Leased(msg.lease_id, msg.name, p.LEASE_ID_PREFIX + str(msg.lease_id).encode())
            self._leases[lease.id] = lease
            self._lease_idents[lease.ident] = lease
            if lease.ident in self._hellos:
                self._hellos.discard(lease.ident)
                self._go_live(lease)
        elif isinstance(msg, p.Revoke):
            revoked = self._leases.get(msg.lease_id)
            if revoked is None:
                self._conn.send(p.Release(msg.lease_id, False))
                return
            if revoked.live and not revoked.revoked:
                self._dlive -= 1
            revoked.revoked = True
            self._maybe_release(revoked)
            self._hand_back_if_no_lease()
        elif isinstance(msg, p.LeaseLost):
            self._lease_lost(msg)

    def _hold_for_lease(self, item: Item) -> bool:
        """Should this plain task wait in the outbox: a LEASE is unanswered, not for long."""
        if not self._lease_wait or not self._direct_eligible(item):
            return False
        if time.monotonic() < self._lease_wait:
            return True
        self._lease_wait = 0.0
        return False

    # ------------------------------------------------------------------ sending
    def _direct_eligible(self, item: Item) -> bool:
        wire = item[1]
        return item[0] == 0 and wire is not None and not wire[3] & FLAG_IO

    def _direct_take(self) -> None:
        """Move the plain tasks at the outbox's front to the direct queue."""
        outbox, dq = self._outbox, self._dq
        n = 0
        while outbox and self._direct_eligible(outbox[0]):
            dq.append(outbox.popleft())
            n += 1
        self._dcounts[0] += n

    def _direct_send(self) -> bool:
        """Send what the leases' windows take; True if anything went."""
        leases = [lease for lease in self._leases.values() if lease.live and not lease.revoked]
        if not leases or not self._dq:
            return False
        dq, futures, durations = self._dq, self._futures, self._durations
        batches: dict[int, tuple[list[tuple[int, str, bytes, str]], dict[str, bytes]]] = {}
        size: dict[int, int] = {}  # payload bytes per batch so far
        sent = False
        assert self._dsock is not None
        ctx, ctx_blob = self._dctx
        stamp = time.time_ns()
        direct_of, inflight_all = self._direct_of, self._inflight
        last_ref, window = None, 1  # tasks of one function come in runs: its window once per run
        while dq:
            item = dq[0]
            wire = item[1]
            assert wire is not None
            task_id, ref = wire[0], wire[1]
            fut = futures.get(task_id)
            if fut is None or fut.cancelled():
                dq.popleft()
                futures.pop(task_id, None)
                self._dcounts[3] += 1
                continue
            lease = min(leases, key=_load) if len(leases) > 1 else leases[0]
            if ref is not last_ref:
                est = durations.get(ref)
                window = 1 if est is None else 1 + min(int(PREFETCH_SECONDS * 1e6 / max(est, 1.0)), MAX_PREFETCH)
                last_ref = ref
            if len(lease.inflight) >= window or (lease.big >= LEASE_BYTES and lease.inflight):
                break
            dq.popleft()
            batch = batches.get(lease.id)
            if batch is None:
                batch = batches[lease.id] = ([], {})
            known = lease.known
            if ctx and ctx not in known:
                batch[1][ctx] = ctx_blob
                known.add(ctx)
            blob = item[2]
            if blob is not None and ref[5:] not in known:
                if len(known) >= LEASE_BLOBS_LIMIT:
                    self._forget_leased(lease, batch[1])
                    known = lease.known
                batch[1][ref[5:]] = blob
                known.add(ref[5:])
            batch[0].append((task_id, ref, wire[2], ctx))
            fut.submitted_ns = stamp  # issue 11: when it left for its executor
            lease.inflight[task_id] = item
            direct_of[task_id] = lease
            inflight_all[task_id] = item  # a server death kills its executors: resubmitted then
            if len(wire[2]) >= p.OOB_BYTES:  # big payloads: a message of its own each BATCH_BYTES
                lease.big += len(wire[2])
                total = size[lease.id] = size.get(lease.id, 0) + len(wire[2])
                if total >= BATCH_BYTES:
                    entries, blobs = batches.pop(lease.id)
                    self._dsock.send(lease.ident, p.Tasks(entries, blobs), [e[0] for e in entries])
                    del size[lease.id]
                    sent = True
        for lease_id, (entries, blobs) in batches.items():
            # Tagged with its task ids when it may go through shared memory (DirectSocket.ack).
            tags = [e[0] for e in entries] if lease_id in size else ()
            self._dsock.send(self._leases[lease_id].ident, p.Tasks(entries, blobs), tags)
        return sent or bool(batches)

    def _forget_leased(self, lease: _Leased, keep: dict[str, bytes]) -> None:
        """Let ``lease``'s executor drop the blobs we sent it that no task in flight there
        names (nor the TASKS being built, ``keep``): the FORGET goes before that TASKS."""
        assert self._dsock is not None
        keep_all = set(keep)
        keep_all.add(self._dctx[0])
        for _, wire, _ in lease.inflight.values():
            if wire is not None:
                keep_all.add(wire[1][5:])
        gone = lease.known - keep_all
        lease.known = lease.known & keep_all
        if gone:
            self._dsock.send(lease.ident, p.Forget(sorted(gone)))

    def _direct_cancels(self, ids: list[int]) -> list[int]:
        """Send cancels of tasks on leases to their executors; the rest are the server's."""
        rest: list[int] = []
        per: dict[int, tuple[list[int], list[int]]] = {}
        for task_id in ids:
            lease = self._direct_of.get(abs(task_id))
            if lease is None:
                rest.append(task_id)
                continue
            plain, forced = per.setdefault(lease.id, ([], []))
            (forced if task_id < 0 else plain).append(abs(task_id))
        assert self._dsock is not None
        for lease_id, (plain, forced) in per.items():
            lease = self._leases[lease_id]
            if plain:
                self._dsock.send(lease.ident, p.Cancel(plain))
            if forced:
                self._dsock.send(lease.ident, p.Interrupt(forced))
                if not lease.stopping:  # the task sees KeyboardInterrupt once the server signals
                    self._conn.send(p.LeaseStop(lease.id, True))
                lease.stopping.update(forced)
        return rest

    def _report_due_in(self) -> float | None:
        """Seconds until a changed total must be reported, or None if nothing changed."""
        return None if self._dsock is None else self._totals.due_in()

    # ------------------------------------------------------------------ lifecycle
    def _direct_reset(self) -> None:
        """The server died (its executors with it): forget every lease; tasks waiting for one
        go back to the outbox (in-flight ones are resubmitted by ServerLoss)."""
        self._leases.clear()
        self._lease_idents.clear()
        self._hellos.clear()
        self._direct_of.clear()
        self._dlive = 0
        if self._timeline is not None:  # issue 11: sent again after their server died, as the rest
            self._retried.update(item[1][0] for item in self._dq if item[1] is not None)
        self._hand_back_if_no_lease()
        self._totals.reset()  # the new server counts from zero

    def _direct_close(self) -> None:
        if self._dsock is None:
            return
        if self._broken is None:
            self._direct_report(force=True)
        self._dsock.close()
        self._dsock = None
