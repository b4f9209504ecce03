"""Every message taskcs peers exchange, and its encoding (in the manner of ZeroMQ 7/MDP).

A message has three parts (:func:`encode` / :func:`decode`)::

    part 0    b"TCS1"          protocol header and version; anything else is dropped
    part 1    one command byte (see Command)
    part 2    the body: a pickle of a tuple of plain values (int, str, bytes, bool,
              list, tuple, dict) decoded with an unpickler that refuses every global,
              so a body can never run code; user payloads inside it stay opaque bytes

On a ZeroMQ socket the three parts travel concatenated in ONE frame (:func:`to_wire` /
:func:`from_wire`; a ROUTER prepends the peer's identity frame): the header and command
have fixed sizes, and a multipart send cost ~3x a single-frame send in pyzmq (measured
11.7 us vs 3.2 us), paid four times per task round trip. Payloads of at least 64 KiB are
the exception (:func:`to_frames`): each follows as a frame of its own, referenced from the
body as a pickle protocol 5 out-of-band buffer, so it is never copied into or out of a body.
The code that encodes, decodes and validates frames is :mod:`taskcs.runtime.wire_codec`; its
functions are re-exported here, so ``protocol.to_frames`` etc. remain the API.

Commands and their body fields (-> direction):

    HELLO       peer -> server    kind, name, pid, capacity, stdio, io_only, sys_path,
                                  forward_output, python, features, taskcs.  kind is "client",
                                  "executor", "control" or "server"; capacity > 0 makes the
                                  peer an executor with that many slots (for a server: the
                                  slots it offers); stdio marks a client's foreground
                                  executor; python is "3.11"; features is FEATURES;
                                  taskcs is the sender's taskcs version.
                                  Between servers both ends send HELLO (see federation).
    WELCOME     server -> peer    peer_name, heartbeat_ms, liveness, credit, server_pid
    SUBMIT      client -> server  set_id, tasks [(task_id, func_ref, payload, flags, retries)],
                                  blobs {digest: bytes}, close (no more tasks in this set).
                                  flags: bit 0 FLAG_IO; from a client inside a task, flags >> 8
                                  is the gid of the task it runs for (issue 13: runtime.nesting);
                                  with bit 7 (DIRECT_PARENT), task_id << 32 | lease_id of a task
                                  sent on a lease (issues 10 + 13: runtime.direct_parents)
    TASKS       server -> exec    tasks [(gid, func_ref, payload, ctx)], blobs {digest: bytes}
    EXEC_DONE   exec -> server    results [(gid, status, payload, duration_us, start_ns, end_ns)]:
                                  start_ns/end_ns are the executor's wall clock (time.time_ns)
                                  around the run, 0 if it never ran (issue 11: the timeline)
    RESULTS     server -> client  results [(task_id, status, payload, executor_name, start_ns,
                                  end_ns, server_name, flags)]: issue 11, the task ran from
                                  start_ns to end_ns (this server's wall clock; 0: never ran)
                                  on executor_name of server_name; flags: 1 retried (sent to
                                  an executor again), 2 forwarded (ran on a peer server), 4 an
                                  IOTask (ran on the client's foreground executor)
    SET_DONE    server -> client  set_id, done, failed, cancelled
    CANCEL      client -> server  task_ids [int];  server -> exec: gids still in its prefetch queue.
                                  From a client, -id (negative) asks to stop task id even if it
                                  is running (Client.cancel(future, force=True); issue 9)
    OUTPUT      exec -> server    items [(gid, text)];  server -> client: [(task_id, text)]
    HEARTBEAT   both ways         (no fields)
    BYE         both ways         reason; the sender is leaving
    ERROR       server -> peer    text; a well-formed but unexpected or refused command
    STATUS      control -> server (no fields)
    STATUS_REPLY server -> control info {str: plain values}
    STOP        control -> server now (abort instead of finishing queued work)
    CAPACITY    server -> server  slots, sent_ns, echo_ns, held_ns: slots is how many tasks the
                                  sender would take from the receiver now (its idle executor
                                  slots); sent on change and with every heartbeat interval.
                                  Issue 11: sent_ns is the sender's wall clock at sending,
                                  echo_ns the last sent_ns it received from the receiver and
                                  held_ns how long ago it received it (0, 0 before any): one
                                  NTP-style round trip per message, for the link's round trip
                                  and clock offset (taskcs.runtime.timeline.ClockEstimator)
    PEER_DONE   server -> server  results [(gid, status, payload, duration_us, executor,
                                  start_ns, end_ns)] of tasks the receiver forwarded (gid: the
                                  receiver's; times in the sender's clock, as in EXEC_DONE)
    NOT_CANCELLED exec -> server -> client  ids [int]: these could not be cancelled (already
                                  running or done): gids from executors and peer servers,
                                  task ids to clients, so ``future.cancel()`` can answer False
    CREDIT      server -> client  credit: how many tasks this client may have queued or running
                                  from now on (the server's budget shared by its clients; it
                                  shrinks as clients join and grows as they leave)
    INTERRUPT   server -> exec    gids [int]: stop these tasks; the running one sees
                                  KeyboardInterrupt (the server also signals the process, so a
                                  task in time.sleep or C code that checks signals is reached).
                                  server -> nested client (issue 13): stop these subtasks it
                                  runs inline (KeyboardInterrupt at their next bytecode)
    -- issue 10: the direct path (leases; see taskcs.runtime.leases) --
    LEASE       client -> server  lease_id 0, endpoint (the client's direct ROUTER, ipc://), "", 0:
                                  lend me idle executors (a standing request)
                server -> exec    lease_id, the client's endpoint, client name, client pid:
                                  connect a DEALER there (routing id LEASE_ID_PREFIX + lease_id)
                                  and take TASKS / CANCEL / INTERRUPT from it, answering on it
                server -> client  lease_id, "", executor name, executor pid: granted;
                                  lease_id 0: none now (the request stands)
    REVOKE      server -> client  lease_id: send no more there; RELEASE it once drained
    RELEASE     client -> server  lease_id, False: drained, give it back
                server -> exec    lease_id, abandon: end it (abandon: its client is gone:
                                  drop its queued tasks, stop its running one)
                exec -> server    lease_id, False: ended; the executor is the server's again
    LEASE_LOST  server -> client  lease_id, reason, exit_code, graceful: its executor died
                                  (graceful: killed for not stopping a task: no retry spent)
    LEASE_STOP  client -> server  lease_id, on: signal that executor (as for INTERRUPT) while
                                  on; it is killed and replaced after the interrupt grace
    LEASE_COUNTS client -> server submitted, done, failed, cancelled, retried, {lease_id: in flight}
                                  (key 0: tasks waiting in the client for room on a lease),
                                  {lease_id: func_ref of the task running there}:
                                  this client's direct-path totals (absolute, so a late one
                                  does no harm), folded into the server's stats and status
    -- issues 10 + 13: a nested client in a task sent on a lease (taskcs.runtime.direct_parents) --
    DIRECT_ENDED exec -> server   lease_id, task_ids [int]: these tasks of the lease's client,
                                  sent directly and named as parents by a nested client's
                                  SUBMIT (flag DIRECT_PARENT), ended: cancel their subtasks.
                                  Only for tasks that became parents; never on the hot path
    -- code blobs are pruned (taskcs.runtime.blob_refs) --
    FORGET      client -> server  digests [str]: this connection no longer counts on the server
                                  keeping these blobs (its bounded memory of sent blobs was
                                  cleared: it sends any of them again when a task needs it)
                server -> exec, client (its foreground), peer server: the sender pruned these
                                  blobs (no connection holds them, no live task names them):
                                  drop them; the sender sends one again before a task needs it
                client -> exec    on a direct link: the same, for blobs sent on that link

Federation (phase 4): a link between two servers is one ZeroMQ connection, DEALER on the
server that was told ``--peer``, ROUTER on the other, CURVE-encrypted; work goes both ways.
Each end sends HELLO(kind="server") and answers the other's with WELCOME. A server forwards
tasks as SUBMIT(set_id=0, tasks=[(its gid, func_ref, payload, 0, 0)], blobs) without the
client's import path; the receiver runs them on its own executors only (never onwards) and
answers with PEER_DONE and OUTPUT (items keyed by the sender's gid); CANCEL carries gids.
Code by value travels only between servers of the same Python minor version.

Any message received counts as a heartbeat from its sender.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ProtocolError as ProtocolError  # what from_wire raises; p.ProtocolError
from .frozen_record import FrozenMessageError as FrozenMessageError  # what a field assignment raises
from .frozen_record import _record

if TYPE_CHECKING:  # re-exported at the end of this module, from where they live
    from .wire_codec import OOB_BYTES as OOB_BYTES
    from .wire_codec import Scattered as Scattered
    from .wire_codec import decode as decode
    from .wire_codec import encode as encode
    from .wire_codec import from_wire as from_wire
    from .wire_codec import to_frames as to_frames
    from .wire_codec import to_wire as to_wire

HEADER = b"TCS1"
VERSION = 1
#: What a server speaks beyond the framing VERSION; servers refuse a peer whose FEATURES
#: differ (naming both), since a federation rule it lacks would lose or duplicate work.
# 3: issue 11, timing in EXEC_DONE/PEER_DONE/RESULTS, timestamps in CAPACITY; 4: issue 10, the
# direct path over unix:// sockets, and a direct parent in SUBMIT flags with DIRECT_ENDED (+ 13);
# 5: issue 10, shared-memory arenas offered first on a direct link (runtime/shm.py)
FEATURES = 6


class Command(enum.IntEnum):
    """One byte naming a message kind."""

    HELLO = 1
    WELCOME = 2
    SUBMIT = 3
    TASKS = 4
    EXEC_DONE = 5
    RESULTS = 6
    SET_DONE = 7
    CANCEL = 8
    OUTPUT = 9
    HEARTBEAT = 10
    BYE = 11
    ERROR = 12
    STATUS = 13
    STATUS_REPLY = 14
    STOP = 15
    # federation (#8): 16-19
    CAPACITY = 16
    PEER_DONE = 17
    # issue 9 (items 3, 5): 20-23
    INTERRUPT = 20
    CREDIT = 21
    NOT_CANCELLED = 22
    # issue 10 (the direct path): 28-33
    LEASE = 28
    REVOKE = 29
    RELEASE = 30
    LEASE_LOST = 31
    LEASE_STOP = 32
    LEASE_COUNTS = 33
    # issues 10 + 13 (a nested client under a direct task): 34-35
    DIRECT_ENDED = 34
    # code blobs pruned
    FORGET = 35


class Message:
    """Base of every message record; ``COMMAND`` and ``SCHEMA`` describe its wire form."""

    __slots__ = ()
    COMMAND: ClassVar[Command]
    #: One schema entry per field, in order; see wire_codec._check for the forms.
    SCHEMA: ClassVar[tuple[Any, ...]]


def field_names(cls: type[Message]) -> tuple[str, ...]:
    """The fields of a message class, in wire order."""
    return _FIELDS[cls]


def _msg(cmd: Command, *schema: Any) -> Any:
    def wrap(cls: type) -> type:
        cls.COMMAND = cmd  # type: ignore[attr-defined]
        cls.SCHEMA = schema  # type: ignore[attr-defined]
        return cls

    return wrap


@_msg(Command.HELLO, str, str, int, int, bool, bool, [str], bool, str, int, str)
@_record
class Hello(Message):
    """A peer introduces itself; see the module docstring."""

    kind: str
    name: str
    pid: int
    capacity: int = 0
    stdio: bool = False
    io_only: bool = False
    sys_path: list[str] | tuple[str, ...] = ()
    forward_output: bool = True
    python: str = ""
    #: The sender's FEATURES: a client or peer server of other features is refused (a build
    #: of another taskcs would misread the messages); builds of this one send their own.
    features: int = FEATURES
    taskcs: str = ""


@_msg(Command.WELCOME, str, int, int, int, int)
@_record
class Welcome(Message):
    """The server accepts a peer and tells it the connection's parameters."""

    peer_name: str
    heartbeat_ms: int
    liveness: int
    credit: int
    server_pid: int


@_msg(Command.SUBMIT, int, [(int, str, bytes, int, int)], {str: bytes}, bool)
@_record
class Submit(Message):
    """Tasks for a set (more may follow unless ``close``)."""

    set_id: int
    tasks: list[tuple[int, str, bytes, int, int]]
    blobs: dict[str, bytes]
    close: bool


@_msg(Command.TASKS, [(int, str, bytes, str)], {str: bytes})
@_record
class Tasks(Message):
    """Tasks for an executor, with the code/path blobs it does not have yet."""

    tasks: list[tuple[int, str, bytes, str]]
    blobs: dict[str, bytes]


@_msg(Command.EXEC_DONE, [(int, int, bytes, int, int, int)])  # issue 11: + start_ns, end_ns
@_record
class ExecDone(Message):
    """Results from an executor: (gid, status, payload, duration in µs, start_ns, end_ns)."""

    results: list[tuple[int, int, bytes, int, int, int]]


@_msg(Command.RESULTS, [(int, int, bytes, str, int, int, str, int)])  # issue 11: + start_ns .. flags
@_record
class Results(Message):
    """Results for a client: (task_id, status, payload, executor name, start_ns, end_ns,
    server name, flags)."""

    results: list[tuple[int, int, bytes, str, int, int, str, int]]


@_msg(Command.SET_DONE, int, int, int, int)
@_record
class SetDone(Message):
    """Every task of a closed set has its result."""

    set_id: int
    done: int
    failed: int
    cancelled: int


@_msg(Command.CANCEL, [int])
@_record
class Cancel(Message):
    """Remove queued tasks (by the client's task ids)."""

    task_ids: list[int]


@_msg(Command.OUTPUT, [(int, str)])
@_record
class Output(Message):
    """Text a task printed: (gid, text) from executors, (task_id, text) to clients."""

    items: list[tuple[int, str]]


@_msg(Command.HEARTBEAT)
@_record
class Heartbeat(Message):
    """I am alive."""


@_msg(Command.BYE, str)
@_record
class Bye(Message):
    """The sender is leaving."""

    reason: str = ""


@_msg(Command.ERROR, str)
@_record
class Error(Message):
    """A refusal or an unexpected command, explained for a person."""

    text: str


@_msg(Command.STATUS)
@_record
class StatusRequest(Message):
    """Ask the server what it is doing."""


@_msg(Command.STATUS_REPLY, dict)
@_record
class StatusReply(Message):
    """The server's answer to STATUS."""

    info: dict[str, Any]


@_msg(Command.STOP, bool)
@_record
class Stop(Message):
    """Ask the server to stop, gracefully or (``now``) at once."""

    now: bool = False


# ---------------------------------------------------------------- federation (#8)
@_msg(Command.CAPACITY, int, int, int, int)  # issue 11: + sent_ns, echo_ns, held_ns
@_record
class Capacity(Message):
    """How many tasks the sending server would take from the receiving one now; with the
    timestamps of one NTP-style exchange (issue 11; see the module docstring)."""

    slots: int
    sent_ns: int = 0
    echo_ns: int = 0
    held_ns: int = 0


@_msg(Command.PEER_DONE, [(int, int, bytes, int, str, int, int)])  # issue 11: + start_ns, end_ns
@_record
class PeerDone(Message):
    """Results of forwarded tasks: (gid, status, payload, duration in µs, executor name,
    start_ns, end_ns)."""

    results: list[tuple[int, int, bytes, int, str, int, int]]


# ---- issue 9 (item 3): stopping abandoned work -------------------------------------------
@_msg(Command.INTERRUPT, [int])
@_record
class Interrupt(Message):
    """Stop these tasks (server -> executor): drop them if queued, interrupt the running one."""

    gids: list[int]


@_msg(Command.CREDIT, int)
@_record
class Credit(Message):
    """The client's new credit (server -> client): its share of the server's task budget."""

    credit: int


@_msg(Command.NOT_CANCELLED, [int])
@_record
class NotCancelled(Message):
    """A CANCEL came too late for these (already running or done): gids, or a client's task ids."""

    ids: list[int]
# ---- end issue 9 (item 3) ------------------------------------------------------------------


# ---- issue 10: the direct path (client <-> leased executor) ---------------------------------
#: A leased executor's DEALER on its client's ROUTER has this routing id, then the lease id.
LEASE_ID_PREFIX = b"lease:"


@_msg(Command.LEASE, int, str, str, int)
@_record
class Lease(Message):
    """A lease asked for, ordered or granted; see the module docstring for each direction."""

    lease_id: int
    endpoint: str
    name: str
    pid: int


@_msg(Command.REVOKE, int)
@_record
class Revoke(Message):
    """The server wants this executor back (server -> client)."""

    lease_id: int


@_msg(Command.RELEASE, int, bool)
@_record
class Release(Message):
    """A lease ends: drained (client), ordered to end (server -> exec), ended (exec)."""

    lease_id: int
    abandon: bool = False


@_msg(Command.LEASE_LOST, int, str, int, bool)
@_record
class LeaseLost(Message):
    """The leased executor died (server -> client)."""

    lease_id: int
    reason: str
    exit_code: int
    graceful: bool


@_msg(Command.LEASE_STOP, int, bool)
@_record
class LeaseStop(Message):
    """Signal the leased executor while ``on``: a task running there was cancelled with force."""

    lease_id: int
    on: bool


@_msg(Command.LEASE_COUNTS, int, int, int, int, int, {int: int}, {int: str})
@_record
class LeaseCounts(Message):
    """A client's direct-path totals since it connected; in flight per lease."""

    submitted: int
    done: int
    failed: int
    cancelled: int
    retried: int
    in_flight: dict[int, int]
    running: dict[int, str]
# ---- end issue 10 ----------------------------------------------------------------------------


# ---- issues 10 + 13: nested clients under tasks sent directly (taskcs.runtime.direct_parents) --
@_msg(Command.DIRECT_ENDED, int, [int])
@_record
class DirectEnded(Message):
    """Tasks sent on lease ``lease_id`` that had subtasks have ended (exec -> server)."""

    lease_id: int
    task_ids: list[int]
# ---- end issues 10 + 13 --------------------------------------------------------------------


@_msg(Command.FORGET, [str])
@_record
class Forget(Message):
    """Code blobs the receiver may drop (see the module docstring for each direction)."""

    digests: list[str]


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.COMMAND: cls
    for cls in (
        Hello, Welcome, Submit, Tasks, ExecDone, Results, SetDone, Cancel, Output,
        Heartbeat, Bye, Error, StatusRequest, StatusReply, Stop, Capacity, PeerDone,
        Interrupt, Credit, NotCancelled,  # issue 9
        Lease, Revoke, Release, LeaseLost, LeaseStop, LeaseCounts,  # issue 10
        DirectEnded,  # issues 10 + 13
        Forget,
    )
}
_FIELDS: dict[type[Message], tuple[str, ...]] = {
    cls: cls.FIELDS for cls in MESSAGE_TYPES.values()  # type: ignore[attr-defined]
}


# ---- the frames: encoding and decoding live in taskcs.runtime.wire_codec -----------------
# It reads the tables above, so it cannot be imported at the top of this module; its names are
# re-exported here on first use instead (PEP 562), then kept as this module's attributes, so
# ``protocol.to_frames`` and ``from .protocol import Scattered`` work as they always did.
_WIRE_CODEC = frozenset({"OOB_BYTES", "Scattered", "decode", "encode", "from_wire", "to_frames", "to_wire"})

if not TYPE_CHECKING:  # the type checker sees the imports at the top instead

    def __getattr__(name: str) -> Any:
        if name not in _WIRE_CODEC:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from . import wire_codec

        value = globals()[name] = getattr(wire_codec, name)
        return value
