"""What comes back from a client's leases (issue 10): results, executors lost, the totals.

The base of :class:`~taskcs.client.direct.Direct` (which sends; see its docstring for the
whole flow). Here, in whichever thread does the client's I/O::

    executor --EXEC_DONE--> _on_direct_results --> future (executor named as on the server path)
             (its TASKS regions acknowledged; the executor's result regions released after)
    executor --OUTPUT / NOT_CANCELLED / HELLO--> on_output / cancel()'s answer / the lease live
    server --LEASE_LOST--> _lease_lost: unfinished tasks resubmitted (retries permitting) or
              failed, exactly as the server fails them
    totals --LEASE_COUNTS--> server (_direct_report)
"""

from __future__ import annotations

import logging
import queue
from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import ExecutorDiedError
from ..runtime import codec
from ..runtime import protocol as p
from ..runtime.task import Status
from ..runtime.timeline import RETRIED
from .foreground import _NUDGE
from .leased import DirectSocket, Totals, _Leased
from .recovery import Item, ServerLoss, complete
from .taskset import TaskFuture

log = logging.getLogger(__name__)

_OK, _CANCELLED = int(Status.OK), int(Status.CANCELLED)  # plain ints: compared per result


class LeaseResults(ServerLoss):
    """Mixed into Client through :class:`~taskcs.client.direct.Direct`, whose state (set up
    by its ``_direct_init``) it shares."""

    _dsock: DirectSocket | None
    _broken: BaseException | None
    _refused: dict[int, bool]
    _fg_until: bool
    _fg_inbox: queue.SimpleQueue[Any]
    on_output: Callable[[TaskFuture | None, str], None]
    _leases: dict[int, _Leased]
    _lease_idents: dict[bytes, _Leased]
    _hellos: set[bytes]
    _direct_of: dict[int, _Leased]
    _dq: deque[Item]
    _dlive: int
    _totals: Totals
    _dcounts: list[int]
    _durations: dict[str, float]
    _lease_wait: float

    # ------------------------------------------------------------------ the leases' state
    def _go_live(self, lease: _Leased) -> None:
        lease.live = True
        if not lease.revoked:
            self._dlive += 1
            self._lease_wait = 0.0

    def _maybe_release(self, lease: _Leased) -> None:
        if lease.revoked and not lease.inflight:
            self._drop_lease(lease)
            self._conn.send(p.Release(lease.id, False))

    def _drop_lease(self, lease: _Leased) -> None:
        self._leases.pop(lease.id, None)
        self._lease_idents.pop(lease.ident, None)
        if lease.live and not lease.revoked:
            self._dlive -= 1

    def _hand_back_if_no_lease(self) -> None:
        """No live lease left: what waits for one goes the server's way (no longer counted)."""
        if self._dlive == 0 and self._dq:
            self._dcounts[0] -= len(self._dq)
            self._outbox.extendleft(reversed(self._dq))
            self._dq.clear()

    # ------------------------------------------------------------------ losses
    def _lease_lost(self, msg: p.LeaseLost) -> None:
        self._direct_recv()  # results already here are taken first
        lease = self._leases.get(msg.lease_id)
        if lease is None:
            return
        self._drop_lease(lease)
        again: list[Item] = []
        for task_id, item in sorted(lease.inflight.items()):
            self._direct_of.pop(task_id, None)
            self._inflight.pop(task_id, None)
            fut = self._futures.get(task_id)
            wire = item[1]
            assert wire is not None
            if fut is None:
                continue
            if fut.cancelled():
                del self._futures[task_id]
                self._dcounts[3] += 1
                continue
            if msg.graceful or wire[4] > 0:  # killed for not stopping another task: no retry spent
                if not msg.graceful:
                    item = (item[0], (*wire[:4], wire[4] - 1), item[2])
                    self._dcounts[4] += 1
                    if self._timeline is not None:
                        self._retried.add(task_id)  # issue 11: its record says so
                self._dcounts[0] -= 1  # handed back: counted again wherever it goes
                again.append(item)
                continue
            del self._futures[task_id]
            self._dcounts[2] += 1
            if self._timeline is not None:
                self._record(fut, int(Status.ERROR), 0, 0, lease.name)
            text = f"executor {lease.name} died while running task {task_id} ({msg.reason})"
            complete(fut, int(Status.ERROR), codec.encode_error(ExecutorDiedError(text, msg.exit_code), text),
                     lease.name)
        lease.inflight.clear()
        log.warning("lost leased executor %s (%s): %d tasks sent again", lease.name, msg.reason, len(again))
        self._outbox.extendleft(reversed(again))
        self._hand_back_if_no_lease()

    # ------------------------------------------------------------------ receiving
    def _direct_report(self, force: bool = False) -> bool:
        """LEASE_COUNTS to the server if the totals changed and one is due; True if sent."""
        msg = self._totals.report(self._leases.values(), len(self._dq), force)
        if msg is not None:
            self._conn.send(msg)
        return msg is not None

    def _direct_recv(self) -> bool:
        """Handle what the leased executors sent; True if anything came."""
        if self._dsock is None:
            return False
        msgs = self._dsock.recv()
        for ident, msg in msgs:
            lease = self._lease_idents.get(ident)
            if isinstance(msg, p.ExecDone):
                self._dsock.ack(ident, msg.results)
                if lease is not None:
                    self._on_direct_results(lease, msg.results)
            elif isinstance(msg, p.Output):
                if self._hello.forward_output:
                    for task_id, text in msg.items:
                        self.on_output(self._futures.get(task_id), text)
            elif isinstance(msg, p.NotCancelled):
                for task_id in msg.ids:
                    if task_id in self._refused:
                        self._refused[task_id] = True
            elif isinstance(msg, p.Hello):
                if lease is None:
                    self._hellos.add(ident)  # before its grant: remembered (bounded by leases)
                elif not lease.live:
                    self._go_live(lease)
        # Every result is unpickled (complete()): the executors' shared regions are free.
        self._dsock.release()
        return bool(msgs)

    def _on_direct_results(self, lease: _Leased, results: list[tuple[int, int, bytes, int, int, int]]) -> None:
        futures, inflight, counts = self._futures, lease.inflight, self._dcounts
        direct_of, inflight_all, durations = self._direct_of, self._inflight, self._durations
        done: list[tuple[TaskFuture, int, bytes]] = []
        timeline = self._timeline  # issue 11: the same records as from RESULTS
        for task_id, status, payload, duration_us, start_ns, end_ns in results:
            item = inflight.pop(task_id, None)
            if item is None:
                continue  # not (or no longer) this lease's: sent again elsewhere after a loss
            del direct_of[task_id]
            inflight_all.pop(task_id, None)
            wire = item[1]
            if lease.big and wire is not None and len(wire[2]) >= p.OOB_BYTES:
                lease.big -= len(wire[2])
            if status == _OK:
                ref = wire[1] if wire is not None else ""
                old = durations.get(ref)
                if old is None and len(durations) >= 4096:
                    durations.clear()  # bounded: a stream of distinct lambdas
                durations[ref] = duration_us if old is None else 0.8 * old + 0.2 * duration_us
            if lease.stopping and task_id in lease.stopping:
                lease.stopping.discard(task_id)
                if not lease.stopping:
                    self._conn.send(p.LeaseStop(lease.id, False))
            fut = futures.pop(task_id, None)
            if fut is None:
                continue
            if fut.cancelled() or status == _CANCELLED:
                counts[3] += 1
            elif status == _OK:
                counts[1] += 1
            else:
                counts[2] += 1
            done.append((fut, status, payload))
            if timeline is not None:
                self._record(fut, status, start_ns, end_ns, lease.name)
        self._direct_report()  # before the futures: a caller then sees the server's counts too
        name = lease.name
        for fut, status, payload in done:
            complete(fut, status, payload, name)
        if lease.revoked:
            self._maybe_release(lease)
        if self._fg_until:
            self._fg_inbox.put(_NUDGE)  # a foreground loop waiting on a condition re-checks it

    def _record(self, fut: TaskFuture, status: int, start_ns: int, end_ns: int, executor: str) -> None:
        """Issue 11: the timeline's raw record of a task finished on the direct path (as
        :meth:`Wire._on_results` makes from RESULTS; no server name: a local executor)."""
        assert self._timeline is not None
        task_id = fut.task_id
        flags = 0
        if task_id in self._retried:
            self._retried.discard(task_id)
            flags = RETRIED
        self._timeline.append((task_id, 0, fut.label, status, fut.submitted_ns, start_ns, end_ns, "", executor,
                               flags))
