"""The task timeline's pieces that need no client: records, flags, and the clock estimator.

Where the times come from (issue 11)::

    executor: time.time_ns() around each run --EXEC_DONE (start_ns, end_ns)--> its server
    peer server P --PEER_DONE (start_ns, end_ns in P's clock)--> origin O
        O: t - ClockEstimator(P).offset_ns  (P's clock -> O's clock)
    O --RESULTS (start_ns, end_ns in O's clock, server, executor, flags)--> client
    client: submitted_ns (its own clock) + the above --> TaskRecord, kept in a bounded ring

A local client shares its server's clock (same machine: ipc); a peer server's times are moved
onto the origin's clock with the offset its CAPACITY heartbeats give (:class:`ClockEstimator`),
so every lane of one timeline shares one time axis.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: RESULTS flags: the task was sent to an executor more than once (its executor or peer died);
#: the client sets it too on a task it sent again to a new server after its server died.
RETRIED = 1
#: RESULTS flags: the task ran on a peer server (phase 4), not on one of its server's executors.
FORWARDED = 2
#: RESULTS flags: an IOTask, run by the client's own foreground executor.
IO = 4

#: Round-trip samples a link keeps: the offset comes from the one with the least delay among
#: them (NTP's clock filter keeps 8; with one sample per heartbeat, 16 cover ~16 s, long
#: enough to ride out a burst of queueing delay, short enough that clock drift (ppm) is nil).
CLOCK_SAMPLES = 16


#: Finished tasks a client remembers by default (``Client(timeline=...)``): the latest ones,
#: in a ring, so a client running millions of tasks stays flat (a raw record is at most ~370
#: bytes, measured: under 4 MB). ``cs-client --trace/--timeline`` raise it for their run.
TIMELINE_RECORDS = 10_000

#: What the client's I/O thread keeps per result (a tuple: the cheapest thing to build there):
#: (task_id, set_id, name, status, submitted_ns, started_ns, finished_ns, server, executor, flags).
RawRecord = tuple[int, int, str, int, int, int, int, str, str, int]

_STATUS = {0: "ok", 1: "error", 2: "cancelled"}


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """When and where one task ran, as its client saw it (``Client.timeline()``).

    Times are wall-clock nanoseconds since the epoch (``time.time_ns()``) on the client's
    server's clock; a time the task never reached (it was cancelled while queued) is 0.
    ``submitted_ns`` is when the task left the client for its server (the SUBMIT batch it went
    in; stamped there so that ``submit()`` itself reads no clock), ``started_ns`` and
    ``finished_ns`` are its executor's, moved onto the origin server's clock if a peer ran it.
    ``server`` and ``executor`` name where it ran: an executor of a server ("exec-2"), a
    worker of an engine, or, for an IOTask, the client itself ("foreground").
    """

    task_id: int
    set_id: int
    name: str
    status: str  # "ok", "error" or "cancelled"
    submitted_ns: int
    started_ns: int
    finished_ns: int
    server: str
    executor: str
    retried: bool = False
    forwarded: bool = False
    io: bool = False

    @property
    def lane(self) -> str:
        """The lane the task is drawn in: ``server/executor``."""
        return f"{self.server}/{self.executor}"

    @property
    def duration(self) -> float:
        """Seconds the task ran (0.0 if it never ran)."""
        if not self.started_ns or self.finished_ns < self.started_ns:
            return 0.0
        return (self.finished_ns - self.started_ns) / 1e9


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One NTP-style exchange: round-trip delay and the peer's clock minus ours, in ns."""

    rtt_ns: int
    offset_ns: int


def exchange(t1: int, t2: int, t3: int, t4: int) -> ClockSample:
    """The classic NTP computation for one round trip.

    ``t1`` we sent (our clock), ``t2`` the peer received it and ``t3`` it answered (its
    clock), ``t4`` we received the answer (ours). The delay excludes the peer's hold time
    (t3 - t2); the offset is exact when both legs take equally long, and wrong by at most
    half the round trip otherwise.
    """
    return ClockSample((t4 - t1) - (t3 - t2), ((t2 - t1) + (t3 - t4)) // 2)


class ClockEstimator:
    """A link's round trip and clock offset from the timestamps its CAPACITY messages carry.

    Each side stamps its CAPACITY with its send time, and echoes the send time of the last
    CAPACITY it received with how long it held it (:meth:`stamp`): so every message that
    answers one of ours closes a round trip (:meth:`received`). A one-way difference
    (receive time minus send time) would mix the offset with the network delay; the round
    trip separates them. The estimate is the offset of the sample of least delay among the
    last CLOCK_SAMPLES (its error is at most half that delay: NTP's "minimum filter"), since
    queueing only ever adds delay and a long leg skews the offset.
    """

    def __init__(self) -> None:
        self._samples: deque[ClockSample] = deque(maxlen=CLOCK_SAMPLES)
        self._their_sent = 0  # the peer's last send time (its clock), to echo back
        self._received_at = 0  # when we received it (ours)
        self.last: ClockSample | None = None

    def stamp(self, now_ns: int) -> tuple[int, int, int]:
        """(sent_ns, echo_ns, held_ns) for a CAPACITY we send at ``now_ns``."""
        if not self._their_sent:
            return now_ns, 0, 0
        return now_ns, self._their_sent, max(0, now_ns - self._received_at)

    def received(self, sent_ns: int, echo_ns: int, held_ns: int, now_ns: int) -> ClockSample | None:
        """Take a CAPACITY's stamps, received at ``now_ns``; the new sample, if it closed one."""
        if sent_ns <= 0:
            return None  # a sender that does not stamp (an engine link)
        self._their_sent, self._received_at = sent_ns, now_ns
        if echo_ns <= 0:
            return None
        sample = exchange(echo_ns, sent_ns - held_ns, sent_ns, now_ns)
        if sample.rtt_ns < 0:
            return None  # a clock stepped between the stamps: nothing to learn from it
        self.last = sample
        self._samples.append(sample)
        return sample

    @property
    def offset_ns(self) -> int:
        """The peer's clock minus ours (0 until one round trip completed)."""
        if not self._samples:
            return 0
        return min(self._samples, key=lambda s: s.rtt_ns).offset_ns

    @property
    def rtt_ns(self) -> int | None:
        """The latest round trip's delay, None before the first."""
        return None if self.last is None else self.last.rtt_ns

    def to_local(self, peer_ns: int) -> int:
        """A time of the peer's clock on ours (0 stays 0: "never")."""
        return peer_ns - self.offset_ns if peer_ns else 0


def to_record(raw: RawRecord, client: str) -> TaskRecord:
    """The public record of one raw one, received by the client named ``client``."""
    task_id, set_id, name, status, submitted, started, finished, server, executor, flags = raw
    forwarded = bool(flags & FORWARDED)
    if forwarded and executor.startswith(server + ":"):
        executor = executor[len(server) + 1:]  # "B:exec-2" (future.executor) -> lane exec-2 of B
    io = bool(flags & IO)
    if io or (executor == client and not forwarded):  # the client's own foreground ran it (phase 1 too)
        server, executor = client, "foreground"
    return TaskRecord(task_id, set_id, name, _STATUS.get(status, str(status)), submitted, started, finished,
                      server, executor, bool(flags & RETRIED), forwarded, io)


class SpanClock:
    """An engine worker's clock offset, bounded by the batches it ran (issue 14's lanes).

    No heartbeat reaches an engine's workers, but every batch is a round trip: it left the
    server at ``sent_ns`` and came back at ``received_ns`` (server clock), so the worker's
    first start and last end (worker clock, minus the offset) must fall between them: the
    offset (worker minus server) lies in ``[last_end - received_ns, first_start - sent_ns]``,
    and a worker time ``t`` maps to ``t - offset``. The bounds of every batch intersect (queueing
    only widens a batch's window), and the offset used is the one nearest 0 inside them: a
    worker on this machine, whose clock is ours, is never shifted. If the intersection
    empties (a clock stepped), it restarts from the latest batch.
    """

    def __init__(self) -> None:
        self.low = -(1 << 62)
        self.high = 1 << 62

    def batch(self, sent_ns: int, received_ns: int, first_start_ns: int, last_end_ns: int) -> None:
        """Take one batch's window (server clock) and its tasks' span (worker clock)."""
        if not (sent_ns and received_ns and first_start_ns and last_end_ns):
            return
        low, high = last_end_ns - received_ns, first_start_ns - sent_ns
        if low > high:
            return  # the span is longer than the window: the worker's clock runs oddly; skip
        if low > self.high or high < self.low:
            self.low, self.high = low, high  # a clock stepped: start again
        else:
            self.low, self.high = max(self.low, low), min(self.high, high)

    @property
    def offset_ns(self) -> int:
        """The worker's clock minus the server's: the value nearest 0 the batches allow."""
        return min(max(0, self.low), self.high)
