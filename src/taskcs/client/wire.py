"""The client's side of the protocol: what goes out in one I/O turn, what comes in.

Data flow::

    _cancels (ids; negative: even if running) ---------------------------> CANCEL
    _fg_results (generation, result) -- this server's --------------------> EXEC_DONE
                                     -- a dead server's --> complete here (recovery)
    _outbox (set_id, wire, blob) -- within the credit window, by set -----> SUBMIT
    RESULTS  --> _on_results --> future completed, credit returned
    TASKS    --> _fg_inbox (the foreground executor)
    SET_DONE, OUTPUT, NOT_CANCELLED, CREDIT, BYE, ERROR --> the matching record

Every method here runs in whichever thread does the client's I/O (:mod:`taskcs.client.pump`),
under its I/O lock: only :meth:`_request_cancel` is called from any thread, and it only
appends to a deque and wakes the connection.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import BrokenError
from ..executor.nesting import stop_inline  # issue 13
from ..executor.runner import ResultEntry
from ..runtime import protocol as p
from ..runtime.task import FLAG_IO
from ..runtime.timeline import RETRIED, RawRecord
from .direct import Direct
from .foreground import _NUDGE, _Forget
from .recovery import complete
from .taskset import TaskFuture

log = logging.getLogger(__name__)

#: Most tasks in one SUBMIT: large enough to amortise a message, small enough that the
#: server interleaves other peers' messages between batches.
SUBMIT_BATCH = 2048
#: Digests of code blobs the server has, remembered so each goes once per connection; bounded
#: so a program that sends new code per task does not grow it without end.
SENT_BLOBS_LIMIT = 4096


class Wire(Direct):
    """The part of :class:`~taskcs.client.client.Client` that speaks the protocol.

    Mixed into Client, whose state it shares (declared here and in ServerLoss for the type
    checker).
    """

    _cancels: deque[int]
    _fg_results: deque[tuple[int, ResultEntry]]
    _timeline: deque[RawRecord] | None  # issue 11
    _fg_inbox: queue.SimpleQueue[Any]
    _fg_until: bool
    _credit: tuple[p.Welcome | None, int]
    _refused: dict[int, bool]
    _broken: BaseException | None
    on_output: Callable[[TaskFuture | None, str], None]

    def _request_cancel(self, task_id: int) -> None:
        self._cancels.append(task_id)
        self._conn.wake()

    def _has_pending(self) -> bool:
        # issue 10: a result on the direct path ends a spin too
        return bool(self._outbox or self._cancels or self._fg_results) or (
            self._dsock is not None and self._dsock.readable())

    def _send_pending(self) -> bool:
        sent = False
        if self._cancels:
            ids = []
            while self._cancels:
                ids.append(self._cancels.popleft())
            if self._direct_of:  # issue 10: those of tasks on leases go to their executors
                ids = self._direct_cancels(ids)
            if ids:
                self._conn.send(p.Cancel(ids))
                sent = True
        if self._fg_results:
            results = []
            while self._fg_results:
                gen, result = self._fg_results.popleft()
                if gen == self._gen:
                    self._fg_tasks.pop(result[0], None)
                    results.append(result)
                else:  # run for a server that died: its future completes here
                    self._finish_orphan(gen, result)
            if results:
                self._conn.send(p.ExecDone(results))
                sent = True
        outbox = self._outbox
        if not self._lease_asked and outbox:  # issue 10: a second plain task: ask for executors
            self._maybe_ask_lease()
        # The server's latest CREDIT for this connection, else its WELCOME's.
        credit = self._credit[1] if self._credit[0] is self._welcome else self._welcome.credit
        while outbox and (self._outstanding < credit or outbox[0][1] is None or self._dlive):
            if self._dlive and self._direct_eligible(outbox[0]):  # issue 10: the direct path
                self._direct_take()
                continue
            if self._lease_wait and self._hold_for_lease(outbox[0]):
                break  # leases are on their way
            if self._outstanding >= credit and outbox[0][1] is not None:
                break
            set_id = outbox[0][0]
            stamp = time.time_ns()  # issue 11: when this batch leaves (a clock read per SUBMIT, none per submit)
            tasks: list[tuple[int, str, bytes, int, int]] = []
            blobs: dict[str, bytes] = {}
            close = False
            while outbox and outbox[0][0] == set_id and len(tasks) < SUBMIT_BATCH:
                if outbox[0][1] is None:
                    outbox.popleft()
                    close = True
                    self._closed_sets.add(set_id)
                    break
                if self._outstanding >= credit or ((self._dlive or self._lease_wait)
                                                   and self._direct_eligible(outbox[0])):
                    break
                item = outbox.popleft()
                wire, blob = item[1], item[2]
                assert wire is not None
                fut = self._futures.get(wire[0])
                if fut is None or fut.cancelled():
                    self._futures.pop(wire[0], None)
                    continue  # cancelled before it left: the server never needs to know
                if wire[3] & FLAG_IO:  # to know it again when the server hands it to our foreground
                    self._io_sent.setdefault((wire[1], wire[2]), deque()).append(wire[0])
                if blob is not None and wire[1][5:] not in self._sent_blobs:
                    blobs[wire[1][5:]] = blob
                    if len(self._sent_blobs) >= SENT_BLOBS_LIMIT:
                        self._forget_sent(blobs)
                    self._sent_blobs.add(wire[1][5:])
                tasks.append(wire)
                fut.submitted_ns = stamp
                self._inflight[wire[0]] = item  # until its result: to send again if the server dies
                self._outstanding += 1
            self._conn.send(p.Submit(set_id, tasks, blobs, close))
            sent = True
        if self._dsock is not None:  # issue 10
            if self._dq and self._direct_send():
                sent = True
            self._direct_report()
        return sent

    def _forget_sent(self, keep: dict[str, bytes]) -> None:
        """Start a new memory of the blobs the server has: it may prune the rest (FORGET goes
        first, so this SUBMIT's own blobs, ``keep``, arrive after it and are held again)."""
        gone = self._sent_blobs.difference(keep)
        self._sent_blobs = set(keep)
        if gone:
            self._conn.send(p.Forget(sorted(gone)))

    def _on_message(self, msg: p.Message) -> None:
        if isinstance(msg, p.Results):
            self._on_results(msg.results)
        elif isinstance(msg, p.Tasks):
            if msg.blobs:
                self._fg_inbox.put(msg.blobs)
            for entry in msg.tasks:
                self._claim_foreground(entry)
                self._fg_inbox.put((self._gen, entry))
        elif isinstance(msg, p.SetDone):
            self._closed_sets.discard(msg.set_id)
            ts = self._sets.pop(msg.set_id, None)
            if ts is not None:
                ts.server_counts = (msg.done, msg.failed, msg.cancelled)
        elif isinstance(msg, p.Output):
            for task_id, text in msg.items:
                self.on_output(self._futures.get(task_id), text)
        elif isinstance(msg, p.NotCancelled):  # too late: those tasks run (see _cancel)
            refused = self._refused
            for task_id in msg.ids:
                if task_id in refused:
                    refused[task_id] = True
        elif isinstance(msg, p.Credit):
            self._credit = (self._welcome, msg.credit)
        elif isinstance(msg, (p.Lease, p.Revoke, p.LeaseLost)):  # issue 10
            self._on_lease_message(msg)
        elif isinstance(msg, p.Bye):
            self._break(BrokenError(f"the server closed the connection: {msg.reason}"))
        elif isinstance(msg, p.Error):
            self._lease_wait = 0.0  # issue 10: a server that lends nothing may say so this way
            log.warning("server error: %s", msg.text)
        elif isinstance(msg, p.Interrupt):  # issue 13: a subtask we run inline was cancelled
            stop_inline(msg.gids)
        elif isinstance(msg, p.Forget):  # the server pruned code our foreground had from it
            self._fg_inbox.put(_Forget(msg.digests))

    def _on_results(self, results: list[tuple[int, int, bytes, str, int, int, str, int]]) -> None:
        self._any_result = True  # issue 10: see _maybe_ask_lease
        futures = self._futures
        inflight = self._inflight
        timeline = self._timeline  # issue 11: a bounded ring of raw records, or None
        retried = self._retried
        for task_id, status, payload, executor, start_ns, end_ns, server, flags in results:
            self._outstanding -= 1
            item = inflight.pop(task_id, None)
            fut = futures.pop(task_id, None)
            if fut is not None:
                if timeline is not None:  # ~90 ns a result (measured), in this I/O turn
                    if retried and task_id in retried:  # sent again after its server died
                        retried.discard(task_id)
                        flags |= RETRIED
                    timeline.append((task_id, item[0] if item is not None else 0, fut.label, status,
                                     fut.submitted_ns, start_ns, end_ns, server, executor, flags))
                complete(fut, status, payload, executor)
        if self._fg_until:
            self._fg_inbox.put(_NUDGE)  # a foreground loop waiting on a condition re-checks it

    def _break(self, exc: BaseException) -> None:
        self._broken = exc
        self._inflight.clear()
        self._retried.clear()  # issue 11
        self._direct_of.clear()  # issue 10: their futures fail below with the rest
        self._dq.clear()
        for fut in list(self._futures.values()):
            with contextlib.suppress(cf.InvalidStateError):
                fut.set_exception(BrokenError(f"task {fut.label} lost: {exc}"))
        self._futures.clear()
        if self._watch is not None:
            self._watch.close()
            self._watch = None
