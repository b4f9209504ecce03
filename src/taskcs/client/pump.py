"""Who owns the connection: the client's I/O thread, or a caller pumping it itself.

Data flow::

    I/O thread: while open: [park while a caller pumps, and PUMP_PARK after] -> _io_step
    fut.result() / fut.cancel() in a caller thread:
        _want_io += 1, wake the socket --> the I/O thread yields _io_cond's lock
        --> the caller runs _io_step until its future is done --> notify, _pump_end
    _io_step: recv (poll or block) -> _on_message each -> _send_pending -> heartbeat
              server dead (pidfd) or silent --> _recover (taskcs.client.recovery)
    Client.map between chunks: _send_now, one _io_step as a pumping caller (never waiting long)

ZeroMQ sockets are not thread-safe, so whoever holds ``_io_cond``'s lock is the only thread
touching the connection. A result handed from the I/O thread to a waiting caller costs a
thread wake-up (~50 us on a VM, a quarter of a round trip): a caller that pumps pays none.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from ..errors import BrokenError, ServerStartError
from ..executor.direct import contended
from ..runtime import protocol as p
from .foreground import _STOP
from .recovery import await_welcome
from .taskset import TaskFuture
from .wire import Wire

log = logging.getLogger(__name__)

#: Seconds the I/O thread leaves the socket to callers after one pumped it (see _pump_until).
PUMP_PARK = 0.002
#: Longest future.cancel() waits for the server's answer (one round trip, normally < 1 ms).
CANCEL_ANSWER_SECONDS = 2.0
#: A pumping caller spins before blocking only with at most this many tasks outstanding.
SPIN_OUTSTANDING = 8
#: Longest Client.map waits for the I/O thread to yield the socket between chunks (_send_now).
SEND_NOW_WAIT = 0.005


class Pump(Wire):
    """The part of :class:`~taskcs.client.client.Client` that runs its I/O turns.

    Mixed into Client, whose state it shares (declared here and in its bases for the type
    checker).
    """

    _io_cond: threading.Condition
    _want_io: int
    _want_lock: threading.Lock
    _pumper: int | None
    _pump_end: float
    _io_done: bool
    _io_ident: int | None
    _io_busy: bool
    _waiting: bool
    _linger: float

    def _await_welcome(self, timeout: float) -> p.Welcome:
        welcome = await_welcome(self._conn, timeout)
        if welcome is not None:
            return welcome
        self._conn.close()
        where = getattr(self._conn, "endpoint", "")
        hint = ""
        if "@tcp://" in where:  # a CURVE handshake the server refused looks exactly like silence
            from ..runtime import keys

            with contextlib.suppress(Exception):
                mine = keys.load().public.decode()
                hint = (f"; if it runs, it may not trust this client's key: run `cs-server keys trust {mine}` "
                        "on the server")
        raise ServerStartError(f"no answer from the server {where} within {timeout:.1f}s{hint}".replace("  ", " "))

    def _io_loop(self) -> None:
        conn = self._conn
        self._io_ident = threading.get_ident()
        if hasattr(conn, "pending"):  # a submission ends a spin at once
            conn.pending = self._has_pending
        cond = self._io_cond
        cond.acquire()
        try:
            while True:
                if self._closed and (self._abandon or not (self._futures or self._outbox or self._fg_results)):
                    break
                # Stay off the socket while a caller pumps it, and for PUMP_PARK after: the next
                # result() of a caller in a loop then finds the socket free, with no wake-up.
                self._io_busy = True  # before the check: see _pump_until
                if self._want_io or (not self._closed and (left := self._pump_end + PUMP_PARK - time.monotonic()) > 0):
                    self._io_busy = False
                    # Bounded: a pumping caller does not notify when it is done (a wake-up per
                    # result() of a caller in a loop); this thread looks again soon anyway.
                    cond.wait(PUMP_PARK if self._want_io else left)
                    continue
                self._io_step(self._hb, spin=False)
                if self._broken is not None:
                    break
            if self._broken is None:
                self._direct_close()  # issue 10: the last totals, before BYE
                self._conn.send(p.Bye("client shut down"))
                self._linger = 1.0  # let BYE reach the server before the socket closes
        except Exception as exc:  # never leave futures hanging on a crashed I/O thread
            log.exception("client I/O thread failed")
            self._break(BrokenError(f"client I/O failed: {exc}"))
        finally:
            self._io_done = True  # under the lock: no caller pumps a closed socket
            self._direct_close()
            cond.release()
            self._fg_inbox.put(_STOP)
            if self._watch is not None:  # its pidfd or socket monitor goes with the connection
                self._watch.close()
                self._watch = None
            self._conn.close(self._linger)  # the connection of now: a server may have been replaced

    def _io_step(self, wait: float | None, spin: bool = True) -> None:
        """One turn of I/O: receive (up to ``wait``), handle, send what is due, keep alive.

        Run by the I/O thread, or by a caller pumping in :meth:`_pump_until`; always under
        ``_io_cond``'s lock, since ZeroMQ sockets are not thread-safe. Only a pumping caller
        spins: the I/O thread spinning would hold the GIL against threads that submit (it
        doubled the client's CPU per task in workload 1).
        """
        conn = self._conn
        self._waiting = True
        if self._outbox or self._cancels or self._fg_results:
            self._waiting = False
        # Poll before blocking only while a few results are due: an idle client never spins,
        # and with many outstanding, results come in batches that amortise a wake-up.
        if self._dsock is not None and wait is not None and (due := self._report_due_in()) is not None:
            wait = min(wait, due)  # issue 10: changed totals reach the server soon
        outstanding = self._outstanding + len(self._direct_of)
        # issue 10: never spin on a machine with no idle core (see executor.direct.contended)
        spin = spin and 0 < outstanding <= SPIN_OUTSTANDING and not contended()
        msgs = conn.recv(0 if not self._waiting else wait, spin=spin)
        self._waiting = False
        direct = self._dsock is not None and self._direct_recv()
        if not msgs and not direct and self._watch is not None and self._watch.dead():
            for msg in conn.recv(0, spin=False):  # what it said last (a BYE?) comes first
                self._on_message(msg)
            if self._broken is None:
                self._recover(self._watch.why)
            return
        now = time.monotonic()
        if msgs:
            self._last_recv = now
        for msg in msgs:
            self._on_message(msg)
        if self._broken is not None:
            return
        if self._send_pending():
            self._last_sent = now
        hb = self._hb
        if hb and now - self._last_sent >= hb:
            conn.send(p.Heartbeat())
            self._last_sent = now
        if hb and now - self._last_recv > hb * self._welcome.liveness:
            self._recover(f"the server has been silent for {now - self._last_recv:.1f}s")

    def _pump_until(self, fut: TaskFuture, timeout: float | None,
                    until: Callable[[], bool] | None = None) -> float | None:
        """Wait for ``fut`` by doing the I/O thread's work in this thread; return the time left.

        A result handed from the I/O thread to a waiting caller costs a thread wake-up, and so
        does a submission handed the other way: ~50 µs each on a VM, a quarter of a round
        trip. A caller that pumps the socket itself pays neither. Callers that cannot pump
        (the I/O thread, a thread already pumping, a closed client) just return.
        """
        me = threading.get_ident()
        if me == self._io_ident or me == self._pumper or self._closed or self._broken is not None:
            return timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        cond = self._io_cond
        with self._want_lock:
            self._want_io += 1
        # The I/O thread may be blocked on the socket, holding the lock: wake it. Not when it
        # is parked (a caller in a loop of result()s, the usual case): a write saved. It sets
        # _io_busy before it reads _want_io, so one of the two threads sees the other's mark.
        if self._io_busy:
            self._conn.wake()
        with cond:
            with self._want_lock:
                self._want_io -= 1
            if not self._io_done:
                self._pumper = me
                try:
                    hb = self._hb
                    while not fut.done() and self._broken is None and not (until is not None and until()):
                        if deadline is None:
                            self._io_step(hb)
                        elif (left := deadline - time.monotonic()) > 0:
                            self._io_step(min(left, hb) if hb else left)
                        else:
                            break
                except Exception as exc:  # as in the I/O thread: fail the futures, never hang
                    log.exception("client I/O failed in a pumping caller")
                    self._break(BrokenError(f"client I/O failed: {exc}"))
                finally:
                    self._pumper = None
                    self._pump_end = time.monotonic()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    # ---- issue 10: map ------------------------------------------------------------------------
    def _send_now(self) -> None:
        """One I/O turn in this thread, as a pumping caller does, so that what the outbox holds
        leaves now rather than when this thread next waits (Client.map, between chunks).

        Never waits long: not at all when another caller pumps (its turns send the outbox),
        and at most SEND_NOW_WAIT for the I/O thread to yield, or this turn is skipped.
        """
        me = threading.get_ident()
        if self._pumper is not None or me == self._io_ident or self._closed or self._broken is not None:
            return
        with self._want_lock:
            self._want_io += 1
        if self._io_busy:
            self._conn.wake()
        got = self._io_cond.acquire(timeout=SEND_NOW_WAIT)
        with self._want_lock:
            self._want_io -= 1
        if not got:
            return
        try:
            if self._io_done:
                return
            self._pumper = me
            try:
                self._io_step(0)
            except Exception as exc:  # as in _pump_until
                log.exception("client I/O failed in a pumping caller")
                self._break(BrokenError(f"client I/O failed: {exc}"))
            finally:
                self._pumper = None
                self._pump_end = time.monotonic()
        finally:
            self._io_cond.release()
    # ---- end issue 10: map --------------------------------------------------------------------

    def _cancel(self, fut: TaskFuture) -> bool:
        """``future.cancel()``: at once for a task still here; for one the server has, ask it
        and wait (one round trip) for CANCELLED or NOT_CANCELLED, pumping the socket as
        ``result()`` does. Where this thread cannot wait (the I/O thread, a callback while
        another thread pumps) or no answer comes in time, the future is cancelled here and the
        task's result, if it still runs, dropped: the behaviour of taskcs before it asked."""
        task_id = fut.task_id
        lease = self._direct_of.get(task_id)
        if lease is not None:  # issue 10: its executor runs its tasks in the order we sent them
            try:
                first = next(iter(lease.inflight))
            except (StopIteration, RuntimeError):  # its result just came (by the I/O thread)
                first = task_id
            return False if first == task_id else fut._cancel_here()
        me = threading.get_ident()
        if (task_id not in self._inflight or me == self._io_ident or me == self._pumper
                or self._closed or self._broken is not None):
            return fut._cancel_here()
        self._refused[task_id] = False
        self._request_cancel(task_id)
        deadline = time.monotonic() + CANCEL_ANSWER_SECONDS
        try:
            while not fut.done() and not self._refused.get(task_id):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if self._pump_until(fut, left, until=lambda: bool(self._refused.get(task_id))) == left:
                    time.sleep(0.001)  # another thread does the I/O: it files the answer for us
        finally:
            refused = self._refused.pop(task_id, False)
        if fut.done():
            return fut.cancelled()
        return False if refused else fut._cancel_here()
