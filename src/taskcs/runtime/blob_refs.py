"""Code blobs are kept while someone needs them, then pruned: the dispatcher's rules, sans-IO.

A function sent by value is a code blob named by digest (:mod:`taskcs.runtime.codec`); the
server keeps it so each connection sends it once, and sends it on once to each executor (or
peer server, or foreground) that runs a task of it. A program that makes new code per task
(``submit(lambda: f(i))`` in a loop: each closure is a blob of its own) would otherwise grow
the server and every executor for the life of the server. Data flow::

    SUBMIT(blobs) / HELLO(sys_path)  --> the sending connection holds each blob (_Peer.owned_blobs)
    FORGET(digests) from a client     --> it no longer holds those (its memory of what it sent is
                                          bounded: client.wire.SENT_BLOBS_LIMIT; it sends a blob
                                          again before a task needs it)
    the connection goes               --> it holds nothing
    a blob no connection holds        --> a candidate; pruned once no live task names it: at the
                                          next tick (one pass over the live tasks per heartbeat
                                          interval, none on any task's path), or at once when
                                          no task is live
    pruned                            --> dropped here; FORGET(digests) to every executor, client
                                          foreground and peer server it was sent to, which drop
                                          it too (the server sends it again if it comes back)

Why a connection holds its blobs and not its tasks: a task's blob must outlive the task's
SUBMIT message but the client decides when it will send it again; counting tasks would cost
every task a dictionary update both ways, and a connection's tasks never outlive it (they are
dropped with it), so only blobs a live client forgot wait for the pass over the live tasks.

Why a peer that is sent FORGET can simply drop the blob: the server sends FORGET only for blobs
no live task names, and a task sent later brings its blob again (``known_blobs`` is cleared), in
order, on the same connection. A task the executor still holds that its server has dropped
(cancelled, its client gone) may then fail to find its code: its result is dropped anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import protocol as p
from .dispatch_records import DispatcherState

if TYPE_CHECKING:
    from .dispatch_records import PeerId, _Peer


class BlobRules(DispatcherState):
    """Who holds each code blob, and pruning those nobody needs (mixed into the Dispatcher,
    whose state it shares)."""

    if TYPE_CHECKING:
        def _emit(self, peer_id: PeerId, msg: p.Message) -> None: ...

    #: digest -> connections holding it; only blobs someone holds are counted
    _blob_holders: dict[str, int]
    #: blobs no connection holds, pruned once no live task names them
    _blob_orphans: set[str]
    #: when tick may next pass over the live tasks for orphans (the server ticks after every batch)
    _blob_sweep_at: float

    def _blobs_init(self) -> None:
        self._blob_holders = {}
        self._blob_orphans = set()
        self._blob_sweep_at = 0.0

    def _hold_blobs(self, peer: _Peer, digests: Iterable[str]) -> None:
        """``peer`` sent these blobs (a SUBMIT's, a HELLO's path): it holds them."""
        owned, holders = peer.owned_blobs, self._blob_holders
        for digest in digests:
            if digest not in owned:
                owned.add(digest)
                holders[digest] = holders.get(digest, 0) + 1
                self._blob_orphans.discard(digest)

    def _unhold_blobs(self, peer: _Peer, digests: Iterable[str]) -> None:
        """``peer`` no longer holds these blobs (its FORGET, or it is gone)."""
        owned, holders = peer.owned_blobs, self._blob_holders
        for digest in list(digests):  # a copy: ``digests`` may be ``peer.owned_blobs`` itself
            if digest in owned:
                owned.discard(digest)
                left = holders[digest] - 1
                if left:
                    holders[digest] = left
                else:
                    del holders[digest]
                    self._blob_orphans.add(digest)
        if not self._tasks:
            self._prune_blobs()

    def _on_forget(self, peer: _Peer, msg: p.Forget, now: float) -> None:
        self._unhold_blobs(peer, msg.digests)

    def _prune_blobs(self) -> None:
        """Drop the orphans no live task names; tell everyone that has them to drop them too."""
        orphans = self._blob_orphans
        if not orphans:
            return
        if self._tasks:
            named = set()
            for task in self._tasks.values():
                ref = task.func_ref
                if ref[5:] in orphans and ref.startswith("dill:"):
                    named.add(ref[5:])
                if task.ctx in orphans:
                    named.add(task.ctx)
            prune = orphans - named
            orphans &= named  # named ones wait for the next pass
        else:
            prune, self._blob_orphans = orphans, set()
        if not prune:
            return
        for digest in prune:
            self._blobs.pop(digest, None)
        for peer in self._peers.values():
            known = peer.known_blobs
            if known and not known.isdisjoint(prune):
                gone = known & prune
                known -= gone
                self._emit(peer.id, p.Forget(sorted(gone)))
