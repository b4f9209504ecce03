"""Rate-limited logging of dropped input, per peer, so no peer can fill the server's disk.

    drop(peer, text, now) --first FIRST of a peer, within a global budget--> one full log line
                          --beyond that--> counted per peer
    flush(now)            --every PERIOD--> one summary line per counting peer (a few, then
                                            one line for all the others)

A flood of 100,000 malformed frames thus writes a handful of lines a minute, whatever the
number of connections (identities) it comes from, and the count of what was dropped is kept.
"""

from __future__ import annotations

import logging

#: Full log lines per peer before its drops are only counted: enough to diagnose a buggy peer.
FIRST = 5
#: Seconds between summary lines; also the period of the global budget of full lines.
PERIOD = 60.0
#: Full lines per PERIOD over all peers: a flood from many identities (each connection is a
#: new one) must not get FIRST lines each.
BUDGET = 50
#: Peers named in one round of summaries; the rest are summed in one line.
SUMMARY_PEERS = 10
#: Peers tracked at once; beyond it, new peers are counted together (bounded memory).
MAX_PEERS = 4096
_OTHERS = b"<other peers>"


def _name(peer: bytes) -> str:
    return peer[:8].hex() or "-"


class DropLog:
    """Counts and logs dropped messages, the first few per peer in full, then in summaries."""

    def __init__(self, logger: logging.Logger, what: str = "malformed message") -> None:
        self.log = logger
        self.what = what
        self.total = 0
        self._logged: dict[bytes, int] = {}  # peer -> full lines written about it
        self._counted: dict[bytes, int] = {}  # peer -> drops not logged in full since the last summary
        self._budget = BUDGET
        self._period_start: float | None = None

    def drop(self, peer: bytes, reason: str, now: float) -> None:
        """Record one dropped message from ``peer`` because of ``reason``."""
        self.total += 1
        if self._period_start is None:
            self._period_start = now
        elif now - self._period_start >= PERIOD:
            self.flush(now)
        logged = self._logged.get(peer, 0)
        if logged < FIRST and self._budget > 0 and (logged or len(self._logged) < MAX_PEERS):
            self._logged[peer] = logged + 1
            self._budget -= 1
            tail = (f" (further ones from this peer are counted, one summary every {PERIOD:.0f}s)"
                    if logged + 1 == FIRST or self._budget == 0 else "")
            self.log.warning("dropped %s from peer %s: %s%s", self.what, _name(peer), reason, tail)
            return
        key = peer if peer in self._counted or len(self._counted) < MAX_PEERS else _OTHERS
        self._counted[key] = self._counted.get(key, 0) + 1

    def flush(self, now: float) -> None:
        """Write the summaries that are due (call it now and then; it is cheap when nothing is)."""
        if self._period_start is None or now - self._period_start < PERIOD:
            return
        elapsed = now - self._period_start
        counted = sorted(self._counted.items(), key=lambda kv: -kv[1])
        for peer, count in counted[:SUMMARY_PEERS]:
            label = peer.decode() if peer is _OTHERS else f"peer {_name(peer)}"
            self.log.warning("dropped %d more %ss from %s in the last %.0fs", count, self.what, label, elapsed)
        rest = counted[SUMMARY_PEERS:]
        if rest:
            self.log.warning("dropped %d more %ss from %d other peers in the last %.0fs",
                             sum(c for _, c in rest), self.what, len(rest), elapsed)
        self._counted.clear()
        if len(self._logged) >= MAX_PEERS:
            self._logged.clear()  # bounded; a peer still flooding then gets FIRST lines again
        self._budget = BUDGET
        self._period_start = now if counted else None
