"""An engine attached to a cs-server as an in-process pseudo peer server.

To the dispatcher an engine is one more peer server (:mod:`taskcs.runtime.federation`): it
is introduced on a link id of its own, answers HELLO with WELCOME and a HELLO whose capacity
is DEPTH x the workers' total slots (refreshed as workers come and go), answers each CAPACITY
heartbeat with its own, receives SUBMIT and CANCEL, and answers PEER_DONE and OUTPUT.
So every federation rule holds unchanged: local executors first, credits, requeue on loss
(retries permitting), one result per task, late results discarded, IOTasks never leave.

Two halves, two threads::

    server loop thread                                 engine thread (blocking engine client)
    dispatcher --(link id, SUBMIT)--> deliver()
        batches by measured duration  --commands-->    engine.submit(key, run_batch(...))
    dispatcher <--(link id, PEER_DONE, OUTPUT)--       engine's done callback (its own thread)
        drain() <--events + one byte on a pipe--       connect / versions / capacity / loss
                                                       (taskcs.engines.driver)

The pipe's read end is polled with the server's sockets (LinkTransport.add_source), so the
server loop never blocks on the engine. Each connection is a new generation and a new link
id: after a loss (the dispatcher forgets the link and requeues its tasks) nothing from the
old connection can be taken for the new one. The engine thread reconnects with backoff.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import ExecutorDiedError
from ..runtime import protocol as p
from ..runtime.codec import encode_error
from ..runtime.dispatcher import Dispatcher, Outgoing, PeerId
from ..runtime.federation import PYTHON
from ..runtime.timeline import SpanClock
from .base import Engine, EngineLost, EngineUnavailable
from .driver import EngineThread

log = logging.getLogger(__name__)

#: Engine tasks are sized to about this much measured work: an engine pays ~1 ms or more per
#: task it schedules, so tiny tasks travel many to one engine task; longer ones go alone so
#: the engine can balance them. Unmeasured functions go alone (they may be long).
TARGET_BATCH_US = 20_000.0
#: Most taskcs tasks in one engine task.
MAX_BATCH = 2048
#: Engine tasks per worker slot the dispatcher may keep in flight: the capacity advertised
#: is DEPTH x the workers' slots, so the next engine task waits in the engine's queue while
#: one runs, and the engine's per-task latency (~1-10 ms) is hidden; the dispatcher's
#: prefetch still bounds how much measured work is in flight.
DEPTH = 2

_OK, _ERROR, _CANCELLED = 0, 1, 2


class EngineLink:
    """One engine, seen by the dispatcher as a peer server; see the module docstring."""

    def __init__(self, engine: Engine, dispatcher: Dispatcher, send: Callable[[Outgoing], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.dispatcher = dispatcher
        self.send = send
        self.clock = clock
        self.fd, self._wake_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._wake_fd, False)
        self._fd_lock = threading.Lock()
        self._fds_closed = False
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._replies: list[p.Message] = []
        self._driver = EngineThread(engine, self._post)
        self._commands = self._driver.commands
        # Server-thread state (only the server loop thread touches it).
        self.id: PeerId = b""
        self.generation = 0
        self.state = "connecting"  # connecting | up | down (reconnecting) | refused
        self.problem = ""
        #: When the engine was last seen going away (or this link began): None while it is up.
        self.down_since: float | None = clock()
        self.workers: dict[str, int] = {}
        self._batches: dict[str, list[int]] = {}
        self._gid_batch: dict[int, str] = {}
        self._refs: dict[int, tuple[str, bytes]] = {}  # gid -> (func_ref, payload) while in flight
        self._cancelled: set[int] = set()
        self._blobs: dict[str, bytes] = {}
        self._durations: dict[str, float] = {}
        self._held: list[tuple[int, str, bytes]] = []  # tiny tasks waiting to fill a batch
        self._retries: dict[int, int] = {}  # gid -> retries left, as the dispatcher forwarded them
        self._keys = 0
        # issue 11/14: when each batch left (wall ns), and each worker's clock bounded by them
        self._sent_ns: dict[str, int] = {}
        self._clocks: dict[str, SpanClock] = {}
        self._reintroduce = False
        self.stats = {"batches": 0, "done": 0, "failed": 0, "connections": 0}

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the engine thread (it connects in the background)."""
        self._driver.start()

    def close(self) -> None:
        """Stop the engine thread, disconnect, stop an owned cluster; idempotent."""
        self._driver.stop()
        with self._fd_lock:  # a late engine callback must never write to a reused fd number
            if not self._fds_closed:
                self._fds_closed = True
                os.close(self.fd)
                os.close(self._wake_fd)

    @property
    def total_slots(self) -> int:
        """The capacity the dispatcher sees: DEPTH x the workers' total task slots."""
        return DEPTH * sum(self.workers.values())

    def status(self) -> dict[str, Any]:
        """A plain record for ``cs-server status``."""
        return {"kind": self.engine.kind, "address": self.engine.address, "state": self.state,
                "problem": self.problem, "workers": len(self.workers), "slots": sum(self.workers.values()),
                "capacity": self.total_slots,
                "in_flight": len(self._gid_batch), "batches_in_flight": len(self._batches), **self.stats}

    def fail_stranded(self, now: float, grace: float) -> Outgoing:
        """Fail queued work that nothing can run once the engine has been away ``grace`` s.

        With ``--executors 0`` and no peer servers the engine is the only place non-IO work
        can go; while it reconnects, tasks wait (a scheduler restart should not fail a
        set), but past the grace they fail with an error naming the engine rather than wait
        forever. Called by the server loop every supervision period.
        """
        since, dispatcher = self.down_since, self.dispatcher
        if since is None or now - since < grace or not dispatcher.queued_count() or dispatcher.can_place():
            return []
        problem = f": {self.problem}" if self.problem else ""
        error = EngineUnavailable(
            f"engine {self.engine.kind} at {self.engine.address} has been unavailable for {now - since:.0f} s"
            f"{problem}; nothing else on this server can run the task (the server keeps reconnecting)")
        log.error("%s; failing %d queued tasks", error, dispatcher.queued_count())
        return dispatcher.fail_queued(error)

    # ----------------------------------------------- server thread: from the dispatcher
    def deliver(self, peer_id: PeerId, msg: p.Message) -> None:
        """A message the dispatcher sends to this link (called by the transport)."""
        if peer_id != self.id or self.state != "up":
            return  # an earlier connection's id: it has nowhere to go
        if isinstance(msg, p.Submit):
            self._submit(msg)
        elif isinstance(msg, p.Cancel):
            self._cancel(msg.task_ids)
        elif isinstance(msg, p.Forget):  # the dispatcher pruned code no task of ours names
            for digest in msg.digests:
                self._blobs.pop(digest, None)
        elif isinstance(msg, p.Capacity):
            self._reply(p.Capacity(self.total_slots))  # its heartbeat: ours is our capacity
        elif isinstance(msg, p.Hello):
            self._reply(p.Welcome(self.engine.kind, 0, 0, 0, os.getpid()))
            self._reply(p.Hello("server", self.engine.kind, os.getpid(), self.total_slots, forward_output=True,
                                python=PYTHON, features=p.FEATURES))
        elif isinstance(msg, p.Bye) and msg.reason.startswith("declared lost"):
            # The server loop stalled past the liveness window: the dispatcher requeued this
            # link's tasks, so start afresh under a new id. (Other BYEs: the server is stopping.)
            log.warning("the dispatcher dropped engine %s: %s; re-attaching", self.engine.kind, msg.reason)
            self._reintroduce = True
            self._wake()
        elif isinstance(msg, p.Error):
            log.debug("dispatcher to engine %s: %s", self.engine.kind, msg.text)

    def _post(self, *event: Any) -> None:
        """From the engine thread (or the engine's callbacks): an event for :meth:`drain`."""
        self._events.put(event)
        self._wake()

    def _reply(self, msg: p.Message) -> None:
        self._replies.append(msg)
        self._wake()

    #: Called after every wake-up byte, from any thread: the in-process server's loop waits
    #: on a queue, not on the pipe (taskcs.server.inprocess).
    also_wake: Callable[[], None] | None = None

    def _wake(self) -> None:
        with self._fd_lock, contextlib.suppress(OSError):  # full: the server loop wakes anyway
            if not self._fds_closed:
                os.write(self._wake_fd, b"x")
        if self.also_wake is not None:
            self.also_wake()

    def _submit(self, msg: p.Submit) -> None:
        self._blobs.update(msg.blobs)
        small: list[tuple[int, str, bytes]] = []
        for gid, ref, payload, _flags, retries in msg.tasks:
            self._retries[gid] = retries
            estimate = self._durations.get(ref)
            if estimate is None or estimate >= TARGET_BATCH_US:
                self._send_batch([(gid, ref, payload)])
            else:
                small.append((gid, ref, payload))
        for item in small:
            self._gid_batch[item[0]] = ""  # held here, not yet an engine task
        self._held.extend(small)
        self._flush_held()

    def _flush_held(self) -> None:
        """Send the held tiny tasks as engine tasks of about one capacity slot's share each.

        Of everything in flight here, about one engine task per slot of the capacity (every
        worker has one running and one waiting), each at most TARGET_BATCH_US of work. Sized
        on what is in flight, not on one SUBMIT: the dispatcher refills its window a few tasks
        at a time, and a batch per refill would end in singles. So, as Nagle's algorithm does,
        a short remainder is held while every slot has an engine task, and goes as soon as
        one returns. Nothing waits forever: while anything is held, every slot has an engine
        task in flight, and each of those returns or is lost.
        """
        held = self._held
        if not held:
            return
        slots = max(1, self.total_slots)
        most = min(MAX_BATCH, max(1, math.ceil(len(self._gid_batch) / slots)))
        batch: list[tuple[int, str, bytes]] = []
        work = 0.0
        start = 0
        for i, item in enumerate(held):
            cost = max(self._durations.get(item[1], 1.0), 1.0)
            if batch and (len(batch) >= most or work + cost > TARGET_BATCH_US):
                self._send_batch(batch)
                batch, work, start = [], 0.0, i
            batch.append(item)
            work += cost
        if batch and len(self._batches) < slots:
            self._send_batch(batch)
            start = len(held)
        del held[:start]

    def _send_batch(self, items: list[tuple[int, str, bytes]]) -> None:
        self._keys += 1
        key = f"taskcs-{os.getpid()}-{self.generation}-{self._keys}"
        blobs = {}
        gids = []
        for gid, ref, _payload in items:
            gids.append(gid)
            self._gid_batch[gid] = key
            self._refs[gid] = (ref, _payload)
            if ref.startswith("dill:") and ref[5:] in self._blobs:
                blobs[ref[5:]] = self._blobs[ref[5:]]
        self._batches[key] = gids
        self._sent_ns[key] = time.time_ns()
        self.stats["batches"] += 1
        entries = [(gid, ref, payload, "") for gid, ref, payload in items]
        # The engine's own re-runs after a worker's death: never more than any task allows.
        retries = min(self._retries.get(gid, 0) for gid in gids)
        self._commands.put(("submit", self.generation, key, entries, blobs, retries))

    def _cancel(self, gids: list[int]) -> None:
        # The task may be running on a worker (an engine cannot stop it): it is answered
        # CANCELLED now and its result, when it comes, is dropped.
        answered = []
        for gid in gids:
            key = self._gid_batch.get(gid)
            if key == "":  # still held here: it never reaches the engine
                self._held = [item for item in self._held if item[0] != gid]
                del self._gid_batch[gid]
                self._retries.pop(gid, None)
                answered.append((gid, _CANCELLED, b"", 0, "engine", 0, 0))
                continue
            if key is None or gid in self._cancelled:
                continue
            self._cancelled.add(gid)
            answered.append((gid, _CANCELLED, b"", 0, "engine", 0, 0))
            if all(g in self._cancelled for g in self._batches[key]):
                self._commands.put(("cancel", self.generation, key))
                self._drop_batch(key)
                self._flush_held()
        if answered:
            self._reply(p.PeerDone(answered))

    def _drop_batch(self, key: str) -> list[int]:
        gids = self._batches.pop(key, [])
        self._sent_ns.pop(key, None)
        for gid in gids:
            self._gid_batch.pop(gid, None)
            self._refs.pop(gid, None)
            self._retries.pop(gid, None)
            self._cancelled.discard(gid)
        return gids

    # ------------------------------------------------- server thread: to the dispatcher
    def drain(self) -> list[tuple[PeerId, p.Message]]:
        """What the engine thread has for the dispatcher (called when :attr:`fd` is readable)."""
        try:
            while os.read(self.fd, 65536):
                pass
        except (BlockingIOError, OSError):
            pass
        out: list[tuple[PeerId, p.Message]] = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            out.extend(self._on_event(event))
        if self._reintroduce and self.state == "up":
            self._reintroduce = False
            self._attach(self.generation, sub=True)
        replies, self._replies = self._replies, []
        out.extend((self.id, msg) for msg in replies)
        return out

    def _on_event(self, event: tuple[Any, ...]) -> list[tuple[PeerId, p.Message]]:
        kind, generation = event[0], event[1]
        if kind == "up":
            self.workers = event[2]
            self.problem = ""
            self.stats["connections"] += 1
            self._attach(generation)
            log.info("engine %s at %s attached: %d workers, %d slots", self.engine.kind, self.engine.address,
                     len(self.workers), self.total_slots)
        elif generation != self.generation or self.state != "up":
            pass  # from a connection already given up
        elif kind == "done":
            out = self._finished(event[2], event[3])
            if self.state == "up":
                self._flush_held()  # a slot came free
            return out
        elif kind == "capacity":
            self.workers = event[2]
            return [(self.id, p.Capacity(self.total_slots))]
        elif kind == "lost":
            self._detach(event[2])
        elif kind == "warning":
            self.problem = event[2]
            log.error("engine %s: %s", self.engine.kind, event[2])
        if kind == "unreachable":
            self.problem = event[2]
            attempts = event[3]
            if attempts in (1, 3) or attempts % 10 == 0:
                log.warning("engine %s: %s (attempt %d); retrying with backoff", self.engine.kind, event[2], attempts)
        elif kind == "refused":
            self.problem = event[2]
            if self.state == "up":
                self._detach(event[2])
            self.state = "refused"
            log.error("engine %s refused: %s", self.engine.kind, event[2])
        return []

    def _attach(self, generation: int, sub: bool = False) -> None:
        if sub:  # a new id for the same engine connection; its old tasks were requeued
            self.send(self.dispatcher.forget(self.id, self.clock(), "re-attaching"))
            self._forget_batches()
        self.generation = generation
        self._blobs.clear()  # a new link id is a new peer: the dispatcher sends its code again
        self.id = b"\xffE" + struct.pack(">IQ", generation, self._keys)
        self.state = "up"
        self.down_since = None
        self.send(self.dispatcher.introduce(self.id, self.clock()))

    def _detach(self, reason: str) -> None:
        self.state = "down"
        self.down_since = self.clock()
        log.warning("engine %s at %s lost: %s; its unfinished tasks are requeued; reconnecting",
                    self.engine.kind, self.engine.address, reason)
        old, self.id = self.id, b""
        self.send(self.dispatcher.forget(old, self.clock(), f"engine {self.engine.kind} at "
                                         f"{self.engine.address} lost: {reason}"))
        self._forget_batches()

    def _forget_batches(self) -> None:
        for key in list(self._batches):
            self._commands.put(("cancel", self.generation, key))
        self._batches.clear()
        self._sent_ns.clear()
        self._held.clear()
        self._retries.clear()
        self._gid_batch.clear()
        self._refs.clear()
        self._cancelled.clear()

    def _finished(self, key: str, outcome: Any) -> list[tuple[PeerId, p.Message]]:
        refs = {gid: self._refs.get(gid, ("", b"")) for gid in self._batches.get(key, ())}
        sent_ns = self._sent_ns.get(key, 0)
        left = {gid: self._retries.get(gid, 0) for gid in refs}
        cancelled = set(self._cancelled)
        gids = self._drop_batch(key)
        if not gids:
            return []
        live = [gid for gid in gids if gid not in cancelled]
        if isinstance(outcome, EngineLost):
            # Not this batch's failure: the engine is gone. Forgetting the link requeues its
            # tasks (retries permitting) as for a lost peer; the engine thread reconnects.
            self._commands.put(("reconnect", self.generation, str(outcome)))
            self._detach(str(outcome))
            return []
        if isinstance(outcome, BaseException) and len(live) > 1:
            # The engine gave up on the whole engine task (e.g. Dask's KilledWorker after a
            # task killed worker after worker): run its tasks again one per engine task, so
            # only the one at fault fails and its batch-mates get their results.
            log.warning("engine %s could not run a batch of %d tasks (%r): running them one by one",
                        self.engine.kind, len(live), outcome)
            for gid in live:
                self._retries[gid] = left[gid]
                self._send_batch([(gid, *refs[gid])])
            return []
        if isinstance(outcome, BaseException):
            text = f"engine {self.engine.kind} at {self.engine.address} could not run the task: {outcome!r}"
            payload = encode_error(ExecutorDiedError(text), text)
            self.stats["failed"] += len(live)
            return [(self.id, p.PeerDone([(gid, _ERROR, payload, 0, "engine", 0, 0) for gid in live]))]
        where, results, output = outcome
        shift = self._worker_offset(where, sent_ns, results)
        out: list[tuple[PeerId, p.Message]] = []
        printed = [(gid, t) for gid, t in output if gid not in cancelled]
        if printed:
            out.append((self.id, p.Output(printed)))  # before the result, as executors do
        done = []
        for gid, status, payload, duration_us, start_ns, end_ns in results:
            if gid in cancelled:
                continue
            if status == _OK:
                self._record(refs.get(gid, ("", b""))[0], duration_us)
                self.stats["done"] += 1
            else:
                self.stats["failed"] += 1
            if start_ns:  # issue 11: times, moved from the worker's clock onto ours
                start_ns, end_ns = start_ns - shift, end_ns - shift
            done.append((gid, status, payload, duration_us, where, start_ns, end_ns))
        if done:
            out.append((self.id, p.PeerDone(done)))
        return out

    def _worker_offset(self, where: str, sent_ns: int, results: list[tuple[Any, ...]]) -> int:
        """The worker's clock minus ours, bounded by this and earlier batches (SpanClock)."""
        starts = [r[4] for r in results if r[4]]
        if not starts:
            return 0
        clock = self._clocks.get(where)
        if clock is None:
            if len(self._clocks) >= 4096:  # workers come and go: keep the table bounded
                self._clocks.clear()
            clock = self._clocks[where] = SpanClock()
        clock.batch(sent_ns, time.time_ns(), min(starts), max(r[5] for r in results if r[4]))
        return clock.offset_ns

    def _record(self, ref: str, duration_us: int) -> None:
        old = self._durations.get(ref)
        if old is None and len(self._durations) >= 65536:
            self._durations.clear()
        self._durations[ref] = duration_us if old is None else 0.8 * old + 0.2 * duration_us
