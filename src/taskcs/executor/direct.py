"""A leased executor's connection to its client (issue 10; see :mod:`taskcs.runtime.leases`).

Data flow::

    server --LEASE(id, endpoint)--> ExecutorLoop --> DirectLink: a DEALER, routing id
        LEASE_ID_PREFIX + id, connected to the client's ROUTER; HELLO on it at once
    client --TASKS/CANCEL/INTERRUPT--> DirectLink.recv --> the loop's pending queue
    the loop --EXEC_DONE/OUTPUT/NOT_CANCELLED--> DirectLink.send --> client
    server --RELEASE--> the loop closes the link and answers RELEASE to the server

The link's socket joins the server connection's poller, so the loop blocks on both at once.
Only the owner of the 0700 runtime directory can reach the client's socket, so bodies are
decoded with the fast unpickler, as a server decodes its welcomed peers'.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import zmq

from ..errors import ProtocolError
from ..runtime import protocol as p
from ..runtime.zmq_transport import ZERO_COPY_BYTES, _recv_message, _send_parts, _tune
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
    """A DEALER to a client that leased this executor; tasks and their results travel on it."""

    def __init__(self, lease_id: int, endpoint: str, context: zmq.Context[Any], name: str,
                 capacity: int) -> None:
        self.lease_id = lease_id
        self.results: list[ResultEntry] = []
        #: The lease was abandoned (its client is gone): nothing more is sent on it.
        self.closing = False
        self.done = [0, 0, 0]  # ok, error, cancelled: for the log
        self.sock = context.socket(zmq.DEALER)
        _tune(self.sock)
        self.sock.routing_id = p.LEASE_ID_PREFIX + str(lease_id).encode()
        self.sock.connect(endpoint)
        self.send(p.Hello("executor", name, os.getpid(), capacity))

    def send(self, msg: p.Message) -> None:
        """Send ``msg`` to the client (dropped if the lease is being abandoned)."""
        if self.closing:
            return
        frames = p.to_frames(msg)
        try:
            if len(frames) == 1:
                self.sock.send(frames[0], zmq.NOBLOCK, copy=len(frames[0]) < ZERO_COPY_BYTES)
            else:
                _send_parts(self.sock, frames)
        except zmq.Again:  # the client is gone and its pipe full: the server ends the lease
            log.warning("lease %d: the client does not read; dropped %s", self.lease_id, msg.COMMAND.name)

    def recv(self) -> list[p.Message]:
        """Every message waiting (never blocks)."""
        out: list[p.Message] = []
        sock = self.sock
        while sock.get(zmq.EVENTS) & zmq.POLLIN:  # not a failed receive at the end (~3 µs)
            try:
                frames = _recv_message(sock, False)
            except zmq.Again:
                break
            try:
                out.append(p.from_wire(frames[0], frames[1:]))
            except ProtocolError as exc:
                log.warning("lease %d: dropped a malformed message: %s", self.lease_id, exc)
        return out

    def close(self) -> None:
        """Close the socket (the client has every result it waits for, or is gone)."""
        self.sock.close(linger=0)
