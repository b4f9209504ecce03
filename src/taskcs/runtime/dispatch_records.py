"""The dispatcher's records: one per accepted task (_Task), per task set (_Set), per peer (_Peer),
and the state the dispatcher's rule mixins share (DispatcherState).

Sans-IO plain data, mutated only by :class:`~taskcs.runtime.dispatcher.Dispatcher` and the rules
mixed into it. A task's ``gid`` is the dispatcher's own id for it; its client names it by
``task_id`` (``_Peer.tasks`` maps one to the other).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import protocol as p
from .task import Status, TaskState
from .timeline import ClockEstimator

if TYPE_CHECKING:
    from .dispatcher import DispatcherConfig
    from .leases import _Lease
    from .nesting import _Nesting

PeerId = bytes

# Plain ints on the hot path: IntEnum construction showed up in profiles.
_OK, _ERROR, _CANCELLED = int(Status.OK), int(Status.ERROR), int(Status.CANCELLED)


@dataclass(slots=True, eq=False)
class _Task:
    gid: int
    client: PeerId
    set_id: int
    task_id: int
    func_ref: str
    payload: bytes
    ctx: str
    io: bool
    retries: int
    state: TaskState = TaskState.QUEUED
    executor: PeerId | None = None
    seq: int = 0  # order in which tasks were sent to executors: who runs first (see _has_started)
    retried: bool = False  # issue 11: sent to an executor again after its first one was lost


@dataclass(slots=True, eq=False)
class _Set:
    client: PeerId
    set_id: int
    pending: deque[int] = field(default_factory=deque)
    fwd: bool = False  # tasks a peer server forwarded: run here, never onwards
    queued: int = 0
    running: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    closed: bool = False
    in_ready: bool = False


@dataclass(slots=True, eq=False)
class _Peer:
    id: PeerId
    hello: p.Hello
    ctx: str
    last_seen: float
    last_sent: float
    supervised: bool = False
    in_flight: set[int] = field(default_factory=set)
    known_blobs: set[str] = field(default_factory=set)  # blobs sent to it (as executor, foreground, server)
    owned_blobs: set[str] = field(default_factory=set)  # blobs it sent and holds (blob_refs)
    tasks: dict[int, int] = field(default_factory=dict)  # client task_id -> gid
    sets: dict[int, _Set] = field(default_factory=dict)
    io_queue: deque[int] = field(default_factory=deque)
    io_running: int = 0
    completed: int = 0
    slots: int = 0  # scheduling capacity: an executor's slots, or what a peer server offers
    is_server: bool = False
    py_ok: bool = True  # a peer server of our Python minor version (code by value may go)
    offered: int = -1  # slots last advertised to this peer server
    #: The connection's credit: for a client, the share we granted it (WELCOME, then CREDIT);
    #: for a peer server, what it accepts from us at once (its WELCOME); 0: not known yet.
    credit: int = 0
    clock: ClockEstimator | None = None  # issue 11: a peer server's round trip and clock offset

    @property
    def name(self) -> str:
        return self.hello.name


class DispatcherState:
    """The dispatcher's state, declared once for the type checker: every rule module mixed into
    :class:`~taskcs.runtime.dispatcher.Dispatcher` derives from this (``Dispatcher.__init__``
    and each rule's ``_..._init`` set the values; a rule's own state stays in its module)."""

    config: DispatcherConfig
    name: str
    server_pid: int
    draining: bool
    stats: dict[str, int]
    peer_stats: dict[str, dict[str, int]]  # per peer server name: tasks forwarded, results back
    stream: deque[tuple[int, str, str, int, int]] | None  # issue 11: the dashboard's task stream
    _peers: dict[PeerId, _Peer]
    _servers: dict[PeerId, _Peer]
    _tasks: dict[int, _Task]
    _ready: deque[_Set]
    _blobs: dict[str, bytes]
    _durations: dict[str, float]
    _clients: int
    _next_gid: int
    _seq: int
    _pending: int
    _pending_fwd: int
    _out: list[tuple[PeerId, p.Message]]
    _now_hint: float
    _hello_sent: set[PeerId]
    _welcome_credit: dict[PeerId, int]
    _nest: _Nesting | None
    _leases: dict[int, _Lease]
    _lease_wants: dict[PeerId, str]
