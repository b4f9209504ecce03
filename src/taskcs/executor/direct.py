"""A leased executor's connection to its client (issue 10; see :mod:`taskcs.runtime.leases`).

Data flow::

    server --LEASE(id, endpoint)--> ExecutorLoop --> DirectLink: a Unix stream socket
        connected to the client's listener; its routing id (LEASE_ID_PREFIX + id), then HELLO
    client --TASKS/CANCEL/INTERRUPT--> DirectLink.recv --> the loop's pending queue
    the loop --EXEC_DONE/OUTPUT/NOT_CANCELLED--> DirectLink.send --> client
    server --RELEASE--> the loop closes the link and answers RELEASE to the server

The link's descriptor joins the server connection's poller, so the loop blocks on both at once.
Only the owner of the 0700 runtime directory can reach the client's socket, so bodies are
decoded with the fast unpickler, as a server decodes its welcomed peers'.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ..errors import ProtocolError
from ..runtime import protocol as p
from ..runtime import shm
from ..runtime.stream import StreamLink
from .runner import ResultEntry

log = logging.getLogger(__name__)


#: Seconds a reading of the machine's run queue stays valid (see :func:`contended`).
CONTENTION_SECONDS = 0.05
_contention = [0.0, False]  # (when read, contended)
_NCPU = os.cpu_count() or 1


def contended() -> bool:
    """True while more processes want to run than there are cores (``/proc/loadavg``'s
    running count, read at most every CONTENTION_SECONDS).

    A receiver that spins (sched_yield) on a machine with no idle core hands its core to
    another process for a whole time slice: a round trip went from ~280 µs blocking to
    ~900-1300 µs spinning with a test suite running beside it (2 cores). Spinning pays only
    when a core would otherwise idle; the running count (which includes the spinners
    themselves) tells that at once, where the load average lags by a minute.
    """
    now = time.monotonic()
    if now - _contention[0] < CONTENTION_SECONDS:
        return bool(_contention[1])
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        running = 0
    busy = running > _NCPU
    _contention[0], _contention[1] = now, busy
    return busy


class ServerOrigin:
    """Where tasks from the server came from: results go back on the server connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.results: list[ResultEntry] = []
        self.closing = False

    def send(self, msg: p.Message) -> None:
        """Send on the server connection."""
        self.conn.send(msg)


class DirectLink:
    """A connection to a client that leased this executor; tasks and their results travel on
    it (a Unix stream socket: :mod:`taskcs.runtime.stream` says why not ZeroMQ)."""

    def __init__(self, lease_id: int, endpoint: str, name: str, capacity: int) -> None:
        if not endpoint.startswith("unix://"):
            raise ProtocolError(f"lease {lease_id}: {endpoint!r} is not a unix:// endpoint")
        self.lease_id = lease_id
        self.results: list[ResultEntry] = []
        #: The lease was abandoned (its client is gone): nothing more is sent on it.
        self.closing = False
        self.done = [0, 0, 0]  # ok, error, cancelled: for the log
        self.link = StreamLink.connect(endpoint[len("unix://"):])
        self.fd = self.link.fd
        self.watching_write = False  # its poller registration includes POLLOUT
        # Our results' arena first (RELEASED: the client gives regions back as it unpickles);
        # the client's tasks may arrive in its own (ACKED), which this side only reads.
        self.link.offer_arena(shm.RELEASED)
        self.link.send_frames([p.LEASE_ID_PREFIX + str(lease_id).encode()])  # who we are
        self.send(p.Hello("executor", name, os.getpid(), capacity))

    @property
    def wants_write(self) -> bool:
        """True while bytes wait for the kernel (the loop then polls for POLLOUT)."""
        return self.link.wants_write

    def send(self, msg: p.Message) -> None:
        """Send ``msg`` to the client (dropped if the lease is being abandoned or the client is
        gone: the server ends the lease then)."""
        if self.closing:
            return
        if not self.link.send(msg):
            log.info("lease %d: the client is gone; dropped %s", self.lease_id, msg.COMMAND.name)

    def flush(self) -> None:
        """Send what the kernel did not take before."""
        self.link.flush()

    def recv(self) -> list[p.Message]:
        """Every message waiting (never blocks)."""
        return self.link.recv()

    def close(self) -> None:
        """Close the socket (the client has every result it waits for, or is gone)."""
        self.link.close()
