"""Nested clients under tasks sent on a lease (issues 10 + 13): the dispatcher's rules, sans-IO.

A task the direct path sent to a leased executor has no server gid: the server never heard of
it (:mod:`taskcs.runtime.leases`). When such a task calls ``taskcs.Client()``, its subtasks
still need a parent the server knows, for everything :mod:`taskcs.runtime.nesting` promises
(inline running, IOTasks and output at the root client, recursive cancel). Data flow (task T,
the lease holder R's task ``t``, runs on executor E of lease L; K is a nested client in E)::

    K --SUBMIT(flags = DIRECT_PARENT | (t << LEASE_BITS | L) << PARENT_SHIFT)--> dispatcher
        _direct_parent: L exists and is not ending, K's HELLO pid is E's   no: refused
                        yes: T gets a synthetic gid (first time), root = (R, t)
        then _adopt as for any parent: children / root / io_root tables, inline running
    E's loop, after running a task, if a nested submission named a direct task
        --DIRECT_ENDED(L, [t, ...])--> dispatcher: the synthetic parents end, their
        outstanding subtasks are cancelled recursively; each leaves a tombstone, so a
        subtask whose SUBMIT comes later is refused as for an ended server parent
    the lease ends (RELEASE), its executor dies (LEASE_LOST), its holder R leaves (abandoned)
        --> every synthetic parent of L ends likewise

Why the executor says so and not the client: only the executor knows when T ends (it may
have failed, been interrupted, or its result be on its way to R on the direct link), and it
knows it at once, on its own server connection. It reports only tasks a nested submission
named (:mod:`taskcs.executor.nesting` records them when ``current_parent()`` names one), so a
direct task that never nests costs one test of an empty set after it runs (~8 ns measured),
and nothing here.

Why DIRECT_ENDED leaves before the process's inline subtasks are stopped: a stopped inline
subtask's answer frees its nested client's foreground, and a server that did not know yet
that the parent ended would hand that foreground the parent's next queued subtask (seen
under load). Sent first, the end is on the wire before any such answer can be made.

Why (lease, task id) names the parent: the executor knows both for free (its link's lease id,
the task id the client sent), both are unique for the server's life (a task id is sent on one
lease at most: a lost lease's tasks are resubmitted elsewhere), and the pid check is the same
trust as for server parents: only a process the lease lent to R can claim R's tasks as
parents (it cannot prove which of R's tasks it runs; a false claim only harms R's own tree).

Leases and nested clients (the policy of :mod:`taskcs.runtime.leases`): a client living in a
local executor's process (its HELLO pid is an executor's) does not count as "another client":
its work is some root client's tree, and when its subtasks need executors they are queued
here, which revokes the leases anyway. Counting it would revoke the leases when any task
merely opens a Client, and a client joblib keeps for the life of an executor process would
keep the direct path off for good. No lease is granted while a parent with subtasks lives
(``_nest.children``): executors lent in the middle of a tree would be revoked again by its
next subtask, a round trip through the lease holder for nothing. A revoked lease whose task is
a waiting parent is released when that task's result is in, as any revoked lease: its
subtasks never wait behind it (a leased executor takes no server tasks, and subtasks always
go through the server), so no wait can close a cycle. Limit: the lease holder does not know
which of its tasks became parents, so tasks it prefetched on that lease (only measured tiny
ones are) wait behind the parent, where the server path would have kept them elsewhere; they
are never its descendants, so they delay, never deadlock.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import protocol as p
from .dispatch_records import DispatcherState

if TYPE_CHECKING:
    from .dispatcher import PeerId, _Peer

log = logging.getLogger(__name__)

#: A SUBMIT flag (below PARENT_SHIFT; FLAG_IO is bit 0): the parent above PARENT_SHIFT is a
#: task sent on a lease, as ``task_id << LEASE_BITS | lease_id``, not a server gid.
DIRECT_PARENT = 1 << 7
#: Width of the lease id in a direct parent's word (flags are pickled ints: no width limit).
LEASE_BITS = 32
_LEASE_MASK = (1 << LEASE_BITS) - 1
#: Tombstones kept per lease (parents that ended; a subtask's SUBMIT may come after its
#: parent's DIRECT_ENDED): bounded, oldest dropped; a subtask that arrives after its
#: tombstone was dropped makes a parent anew, which is ended with its lease at the latest.
MAX_TOMBSTONES = 4096


def direct_word(lease_id: int, task_id: int) -> int:
    """The parent word naming task ``task_id`` of lease ``lease_id``."""
    if not 0 < lease_id <= _LEASE_MASK or task_id <= 0:
        raise ValueError(f"no direct parent ({lease_id}, {task_id})")
    return task_id << LEASE_BITS | lease_id


class DirectParentRules(DispatcherState):
    """Mixed into :class:`~taskcs.runtime.dispatcher.Dispatcher`; see the module docstring."""

    if TYPE_CHECKING:  # what the Dispatcher and its other rules provide
        def _cancel_subtask(self, gid: int) -> None: ...

    #: lease id -> {task id: synthetic gid}; None until the first direct parent.
    _dparents: dict[int, dict[int, int]] | None = None
    #: lease id -> task ids that ended before (or without) a subtask naming them arrived.
    _dended: dict[int, dict[int, None]] | None = None

    def _direct_parent(self, peer: _Peer, word: int) -> tuple[int, tuple[PeerId, int]] | str:
        """The synthetic gid and root of the direct parent ``word`` that ``peer`` (a nested
        client) names, or why it is refused."""
        lease_id, task_id = word & _LEASE_MASK, word >> LEASE_BITS
        lease = self._leases.get(lease_id)
        executor = self._peers.get(lease.executor) if lease is not None else None
        ended = self._dended.get(lease_id) if self._dended is not None else None
        if (lease is None or executor is None or lease.state not in ("granted", "revoked")
                or executor.hello.pid != peer.hello.pid or (ended is not None and task_id in ended)):
            return (f"names task {task_id} of lease {lease_id} as its parent, but no such task runs "
                    f"in the process of client {peer.name} (pid {peer.hello.pid}): a task's subtasks "
                    "are cancelled when it ends")
        if self._dparents is None:
            self._dparents = {}
        parents = self._dparents.setdefault(lease_id, {})
        gid = parents.get(task_id)
        if gid is None:
            gid = parents[task_id] = self._next_gid
            self._next_gid += 1
            log.info("task %d of lease %d (sent directly) has subtasks: parent gid %d", task_id, lease_id, gid)
        return gid, (lease.client, task_id)

    def _on_direct_ended(self, peer: _Peer, msg: p.DirectEnded, now: float) -> None:
        lease = self._leases.get(msg.lease_id)
        if lease is None or lease.executor != peer.id:
            return  # the lease is over: its parents ended with it
        parents = self._dparents.get(msg.lease_id) if self._dparents is not None else None
        if self._dended is None:
            self._dended = {}
        ended = self._dended.setdefault(msg.lease_id, {})
        for task_id in msg.task_ids:
            # A tombstone either way: a subtask's SUBMIT may still be on its way (the nested
            # client's connection is not the executor's), and must not make a parent anew.
            ended[task_id] = None
            if len(ended) > MAX_TOMBSTONES:
                del ended[next(iter(ended))]
            gid = parents.pop(task_id, None) if parents is not None else None
            if gid is not None:
                self._end_direct_gid(gid)
        if parents is not None and not parents:
            del self._dparents[msg.lease_id]  # type: ignore[union-attr]

    def _direct_lease_over(self, lease_id: int) -> None:
        """Lease ``lease_id`` ended, lost its executor or its holder: its parents end."""
        if self._dended is not None:
            self._dended.pop(lease_id, None)
        parents = self._dparents.pop(lease_id, None) if self._dparents is not None else None
        for gid in sorted((parents or {}).values()):
            self._end_direct_gid(gid)

    def _end_direct_gid(self, gid: int) -> None:
        """The direct parent with synthetic ``gid`` ended: cancel its outstanding subtasks."""
        children = self._nest.children.pop(gid, None) if self._nest is not None else None
        for child in sorted(children or ()):
            self._cancel_subtask(child)  # recursive: each child's end cancels its own


__all__ = ["DIRECT_PARENT", "LEASE_BITS", "DirectParentRules", "direct_word"]
