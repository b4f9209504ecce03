"""Tasks that submit tasks (issue 13, part 2): the dispatcher's rules, sans-IO.

A task may call ``taskcs.Client()`` (or joblib, or ``Client.map``) and submit to the server it
runs under. Its executor exports that server's address (``TASKCS_ADDRESS``, see
:mod:`taskcs.executor.nesting`), so the nested client finds its own server without being told,
also on a phase-4 peer running a forwarded task, and never auto-starts another one.

Data flow (P runs on executor E, whose process also holds the nested client K)::

    K --SUBMIT(flags = FLAG_IO | parent_gid << PARENT_SHIFT)--> dispatcher
        _adopt: P runs in K's process? (P's runner has K's pid)  no: refused, clear error
                yes: child -> parent -> root (the client of the outermost task, and its id)
    child queued in K's set --> (1) K's own foreground thread, while it has none running
                                    ("inline": the blocked parent's process runs its children)
                                (2) any free executor, as every task
    IOTask child  --> the ROOT client's io_queue --> the root's foreground (its terminal);
                      its result goes back to K like any result
    OUTPUT of a child --> the root client, under the outermost task's id
    a task leaves (done, failed, cancelled, plain or forced, its client gone, its executor
    dead) --> its outstanding children are cancelled, recursively: queued ones dropped,
    running ones interrupted (INTERRUPT to their executor)

Why the parent rides in the flags: the submitting thread knows which task it runs for (the
executor process keeps the gid of the task each of its threads runs), but the server could
only guess from a connection (a client may outlive a task: joblib keeps one per process, and
a finished task's result may still sit in the executor's batch). So each task names its
parent gid in the high bits of its SUBMIT flags; no new command, nothing for other clients.
The server trusts the claim only if that gid runs right now in the submitting client's
process (HELLO carries the pid): a task cannot adopt another client's work.

Giving the slot back: of the two designs the lead proposed, (b) is implemented. A nested
client's foreground thread is an executor of one slot for its own non-IO subtasks only, and
the dispatcher serves it before the shared executors. Whatever the depth, a parent whose
children are queued has a thread in its own process to run them, so no nesting depth
deadlocks even with every executor running a parent, and the pool never grows. The proof
is an ordering argument: a task only ever waits for its descendants, an inline task always
started after the tasks below it on its process's stack, so waits follow strictly increasing
start times and cannot form a cycle. Only the client's own subtasks run inline: taking
unrelated work would bury a parent under a long stranger.

"While it waits" is presumed, as Dask's ``worker_client`` presumes it: whether a thread
blocks cannot be seen in general (``cf.wait``, joblib's polling loop, ``as_completed``), so a
parent with subtasks outstanding lends its process. At most one inline task runs per nested
client, and one level's inline task only runs while the level below it waits or computes,
so a process holds at most one runnable thread per nesting level. Design (a), a temporary
replacement executor per waiting parent, was left out: (b) already keeps every process
busy on a fan-out, and a fork per wait would cost more than the work of small subtasks.

Limits: an inline task is stopped by an asynchronous KeyboardInterrupt (at its next Python
bytecode, so not inside a C call), not by a signal; a thread the user's task starts itself
submits as its task's executor thread does (its parent is the executor's running task).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import SubmissionError
from . import protocol as p
from .codec import encode_error
from .direct_parents import DIRECT_PARENT, direct_word  # issues 10 + 13
from .dispatch_records import DispatcherState
from .task import Status, TaskState

if TYPE_CHECKING:
    from .dispatcher import PeerId, _Peer, _Set, _Task

log = logging.getLogger(__name__)

#: The parent's gid travels in a SUBMIT entry's flags above this bit (FLAG_IO is bit 0).
PARENT_SHIFT = 8
#: Flags at or above this carry a parent.
PARENT_UNIT = 1 << PARENT_SHIFT

_ERROR, _CANCELLED = int(Status.ERROR), int(Status.CANCELLED)
_NO_QUEUE: deque[int] = deque(maxlen=0)  # issues 10 + 13: the io_queue of a root client that left


@dataclass(slots=True, eq=False)
class _Nesting:
    """Links between tasks; only subtasks (and their parents) have entries."""

    parent: dict[int, int] = field(default_factory=dict)  # child gid -> parent gid
    children: dict[int, set[int]] = field(default_factory=dict)  # parent gid -> child gids
    root: dict[int, tuple[PeerId, int]] = field(default_factory=dict)  # gid -> (root client, root task id)
    io_root: dict[int, PeerId] = field(default_factory=dict)  # IOTask gid -> the root client running it
    clients: set[PeerId] = field(default_factory=set)  # nested clients that may take inline work


class NestingRules(DispatcherState):
    """Mixed into :class:`~taskcs.runtime.dispatcher.Dispatcher`; see the module docstring."""

    if TYPE_CHECKING:  # what the Dispatcher provides
        def _finish(self, task: _Task, status: int, payload: bytes, executor: str, duration_us: int = 0) -> None: ...
        def _send_tasks(self, peer: _Peer, batch: list[_Task]) -> None: ...
        def _interrupt(self, executor_id: PeerId, gids: list[int]) -> None: ...
        def _emit(self, peer_id: PeerId, msg: p.Message) -> None: ...
        def _peer_gone(self, peer_id: PeerId, reason: str, exit_code: int | None = None,
                       graceful: bool = False) -> None: ...
        def _direct_parent(self, peer: _Peer, word: int) -> tuple[int, tuple[PeerId, int]] | str: ...

    #: None until the first subtask: every hook in the dispatcher's hot paths tests only this.
    _nest: _Nesting | None = None

    # ------------------------------------------------------------ submission
    def _adopt(self, peer: _Peer, s: _Set, task: _Task, parent_gid: int, direct: int = 0) -> bool:
        """Link a just-accepted ``task`` of ``peer`` to its parent; True if it was queued or
        refused here (an IOTask goes to the root client's queue), False to queue it as usual.
        ``direct``: ``parent_gid`` names a task sent on a lease (taskcs.runtime.direct_parents)."""
        if direct:  # issues 10 + 13: the parent gets a synthetic gid, its root is the lease holder
            found = self._direct_parent(peer, parent_gid)
            if isinstance(found, str):
                self._refuse_subtask(s, task, f"task {task.task_id} {found}")
                return True
            parent_gid, root = found
        else:
            parent = self._tasks.get(parent_gid)
            runner = self._peers.get(parent.executor) if parent is not None and parent.executor else None
            if (parent is None or parent.state is not TaskState.RUNNING or runner is None or runner.is_server
                    or runner.hello.pid != peer.hello.pid):
                self._refuse_subtask(s, task, (
                    f"task {task.task_id} names task {parent_gid} as its parent, but no such task runs "
                    f"in the process of client {peer.name} (pid {peer.hello.pid}): a task's subtasks are "
                    "cancelled when it ends"))
                return True
            root = (parent.client, parent.task_id)
        nest = self._nest
        if nest is None:
            nest = self._nest = _Nesting()
        gid = task.gid
        root = nest.root.get(parent_gid) or root
        nest.parent[gid] = parent_gid
        nest.children.setdefault(parent_gid, set()).add(gid)
        nest.root[gid] = root
        nest.clients.add(peer.id)
        if not task.io:
            return False
        owner = self._peers.get(root[0])
        if owner is None or owner.is_server or not owner.hello.stdio:
            where = "a peer server" if owner is not None and owner.is_server else "a client without one"
            self._refuse_subtask(s, task, (
                f"IOTask {task.task_id} ({task.func_ref}) runs on the foreground executor of the client "
                f"that submitted the outermost task, and that is {where}"))
            return True
        nest.io_root[gid] = owner.id
        owner.io_queue.append(gid)
        return True

    def _refuse_subtask(self, s: _Set, task: _Task, reason: str) -> None:
        s.queued -= 1
        self._finish(task, _ERROR, encode_error(SubmissionError(reason), reason), "server")

    def _io_queue(self, task: _Task) -> deque[int]:
        """The io_queue holding the queued IOTask ``task``: its root client's, if a subtask."""
        owner = self._nest.io_root.get(task.gid) if self._nest is not None else None
        peer = self._peers.get(owner or task.client)
        return peer.io_queue if peer is not None else _NO_QUEUE  # a root that left has none

    # ------------------------------------------------------------ scheduling
    def _dispatch_inline(self) -> None:
        """Give each nested client with a free foreground one of its own queued subtasks."""
        nest = self._nest
        assert nest is not None
        for client_id in list(nest.clients):
            client = self._peers.get(client_id)
            if client is None or not client.tasks:
                nest.clients.discard(client_id)  # back when it submits a subtask again
                continue
            if client.in_flight or not client.slots:
                continue
            task = self._take_own(client)
            if task is not None:
                self._send_tasks(client, [task])
            if not self._pending:
                return

    def _without_waiting_parents(self, free: list[tuple[_Peer, int]]) -> list[tuple[_Peer, int]]:
        """``free`` less the executors running a task with subtasks outstanding: a task
        prefetched there would wait behind that parent, and if it is one of the subtasks the
        parent waits for, forever."""
        nest = self._nest
        assert nest is not None
        tasks = self._tasks
        busy = set()
        for gid, children in nest.children.items():
            task = tasks.get(gid) if children else None
            if task is not None and task.executor is not None:
                busy.add(task.executor)
        return [(peer, n) for peer, n in free if peer.id not in busy] if busy else free

    def _take_own(self, client: _Peer) -> _Task | None:
        """The first queued non-IO task of ``client``'s sets (its _Set may stay in _ready:
        _take skips what was taken here and drops sets left empty)."""
        tasks = self._tasks
        for s in client.sets.values():
            pending = s.pending
            while pending:
                task = tasks.get(pending.popleft())
                if task is not None and task.state is TaskState.QUEUED:
                    self._pending -= 1
                    self._pending_fwd -= s.fwd
                    return task
        return None

    # ------------------------------------------------------------ endings
    def _nest_finished(self, task: _Task) -> None:
        """``task`` left the dispatcher (its record is gone): unlink it, cancel its children."""
        nest = self._nest
        assert nest is not None
        gid = task.gid
        parent_gid = nest.parent.pop(gid, None)
        if parent_gid is not None:
            siblings = nest.children.get(parent_gid)
            if siblings is not None:
                siblings.discard(gid)
            del nest.root[gid]
            nest.io_root.pop(gid, None)
        children = nest.children.pop(gid, None)
        if children:
            for child in sorted(children):
                self._cancel_subtask(child)

    def _cancel_subtask(self, gid: int) -> None:
        """Cancel the subtask ``gid`` because its parent ended; its client gets CANCELLED."""
        task = self._tasks.get(gid)
        if task is None:
            return
        client = self._peers.get(task.client)
        s = client.sets.get(task.set_id) if client is not None else None
        if task.state is TaskState.QUEUED:
            if s is not None:
                s.queued -= 1
            if task.io:
                queue = self._io_queue(task)
                if gid in queue:
                    queue.remove(gid)
            else:
                self._pending -= 1  # its gid stays in its deque and is skipped when reached
                self._pending_fwd -= bool(s is not None and s.fwd)
            self._finish(task, _CANCELLED, b"", "server")
            return
        runner = self._peers.get(task.executor) if task.executor else None
        if s is not None:
            s.running -= 1
        if task.io and runner is not None and runner.hello.kind == "client":
            # On the root's terminal: it answers when the prompt is done and that answer is
            # dropped; its foreground may take the next IOTask meanwhile (it runs them in order).
            runner.io_running -= 1
        self._finish(task, _CANCELLED, b"", "server")
        if runner is not None and runner.hello.kind in ("executor", "server"):
            self._interrupt(runner.id, [gid])
        elif runner is not None and not task.io:
            # Inline in a nested client's thread: the client stops it (its slot stays taken
            # until it answers). Its executor process also stops every inline task when the
            # task they descend from is interrupted or ends (taskcs.executor.nesting).
            self._emit(runner.id, p.Interrupt([gid]))

    def _nest_dropping(self, peer: _Peer) -> None:
        """``peer``'s work is being dropped without replies (it left): fix the root clients'
        queues for its IOTasks and cancel the children of its tasks."""
        nest = self._nest
        assert nest is not None
        for gid in list(peer.tasks.values()):
            task = self._tasks.get(gid)
            if task is None:
                continue
            owner_id = nest.io_root.get(gid)
            owner = self._peers.get(owner_id) if owner_id is not None else None
            if owner is not None and owner is not peer:
                if task.state is TaskState.QUEUED and gid in owner.io_queue:
                    owner.io_queue.remove(gid)
                elif task.state is TaskState.RUNNING and task.executor == owner.id:
                    owner.io_running -= 1
            self._nest_finished(task)  # _drop_client_work pops the task and fixes the counters

    def _nest_process_gone(self, pid: int, reason: str) -> None:
        """An executor process died: so did the nested clients in it (their sockets go quiet
        only at the heartbeat expiry)."""
        doomed = {peer.id for peer in self._peers.values() if peer.hello.kind == "client" and peer.hello.pid == pid}
        for peer_id in doomed:
            self._peer_gone(peer_id, f"its executor process died ({reason})")
        if doomed:  # what one's leaving told the others of the same dead process goes nowhere
            self._out[:] = [(peer, msg) for peer, msg in self._out if peer not in doomed]


def flags_with_parent(flags: int, parent_gid: int | tuple[int, int]) -> int:
    """SUBMIT flags naming ``parent_gid`` (0: none) as the task's parent; a (lease id, task
    id) pair names a task sent on a lease (issues 10 + 13: taskcs.runtime.direct_parents)."""
    if type(parent_gid) is tuple:
        return flags | DIRECT_PARENT | direct_word(*parent_gid) << PARENT_SHIFT
    return flags | (parent_gid << PARENT_SHIFT) if parent_gid > 0 else flags  # type: ignore[operator]


__all__ = ["PARENT_SHIFT", "PARENT_UNIT", "NestingRules", "flags_with_parent"]
