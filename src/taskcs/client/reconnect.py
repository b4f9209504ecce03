"""Noticing the server's death at once, and connecting to its successor (issue #9, item 2).

Data flow::

    WELCOME(server_pid) --> ServerWatch: a pidfd of the local server, polled with the socket
    server exits        --> pidfd readable --> the client's I/O step sees it --> Client._recover
    Client._recover     --> reconnect(): connect, HELLO, WELCOME, with backoff, bounded
                            (the local server: started again as at start-up; a named
                            server: the same address, until RECONNECT_TIMEOUT)

A pidfd says "that process has exited" the moment it has, with no false alarm from a slow
server: heartbeat silence stays the fallback for servers whose process this machine cannot
see (tcp endpoints). The watch joins the connection's poller, so a client blocked waiting for
results wakes on the death as it would on a message.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable
from typing import Any

from ..errors import BrokenError, ServerStartError, TaskcsError
from ..runtime import protocol as p
from ..runtime.transport import Connection

log = logging.getLogger(__name__)

#: How long a client keeps trying to reach a named server that went away before it fails the
#: futures: long enough for a restart (`cs-server stop; cs-server start`), short enough that
#: a script whose server is gone for good ends with a clear error.
RECONNECT_TIMEOUT = 30.0
#: First pause between attempts, doubled after each up to MAX_DELAY (Guide: backoff).
FIRST_DELAY = 0.05
MAX_DELAY = 2.0
#: Longest one attempt waits for WELCOME before it starts again on a fresh socket.
ATTEMPT_TIMEOUT = 2.0


class ServerWatch:
    """Becomes readable when the local server's process exits (a Linux pidfd)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = None
        self._poll = select.poll()
        try:
            self.fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return  # already gone: dead() says so at once
        self._poll.register(self.fd, select.POLLIN)

    def attach(self, conn: Connection) -> None:
        """Wake ``conn``'s blocking receive when the server dies (a ZeroMQ poller takes fds)."""
        poller = getattr(conn, "poller", None)
        if poller is not None and self.fd is not None:
            import zmq

            poller.register(self.fd, zmq.POLLIN)

    def dead(self) -> bool:
        """True once the process has exited (one non-blocking poll)."""
        return self.fd is None or bool(self._poll.poll(0))

    def close(self) -> None:
        """Release the pidfd."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def watch_server(conn: Connection, server_pid: int) -> ServerWatch | None:
    """A watch on the server behind ``conn`` if it runs on this machine (an ipc endpoint)."""
    endpoint = str(getattr(conn, "endpoint", ""))
    if not endpoint.startswith("ipc://") or server_pid <= 0 or server_pid == os.getpid():
        return None
    if not hasattr(os, "pidfd_open"):
        return None  # not Linux >= 5.3: heartbeat silence still tells
    try:
        watch = ServerWatch(server_pid)
    except OSError as exc:  # e.g. ENOSYS in a sandbox
        log.debug("cannot watch server pid %d: %s", server_pid, exc)
        return None
    watch.attach(conn)
    return watch


def await_welcome(conn: Connection, timeout: float) -> p.Welcome | None:
    """The server's WELCOME within ``timeout`` seconds, or None; ServerStartError if refused."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        for msg in conn.recv(left):
            if isinstance(msg, p.Welcome):
                return msg
            if isinstance(msg, p.Error):
                raise ServerStartError(f"server refused the connection: {msg.text}")
    return None


def reconnect(connect: Callable[[], Connection], hello: p.Hello, where: str, why: str,
              timeout: float = RECONNECT_TIMEOUT,
              give_up: Callable[[], bool] = lambda: False) -> tuple[Connection, p.Welcome]:
    """Connect again: ``connect()`` then HELLO until a WELCOME, with backoff, for at most
    ``timeout`` seconds; BrokenError naming ``where`` and ``why`` when none answers."""
    deadline = time.monotonic() + timeout
    delay = FIRST_DELAY
    error = "no answer"
    while True:
        conn: Any = None
        try:
            conn = connect()
            conn.send(hello)
            welcome = await_welcome(conn, min(ATTEMPT_TIMEOUT, max(0.05, deadline - time.monotonic())))
            if welcome is not None:
                return conn, welcome
            error = "no answer"
        except (TaskcsError, OSError) as exc:
            error = str(exc)
        except Exception as exc:  # zmq.ZMQError and the like: try again, as for OSError
            error = f"{type(exc).__name__}: {exc}"
        if conn is not None:
            conn.close()
        left = deadline - time.monotonic()
        if left <= 0 or give_up():
            raise BrokenError(f"lost the server at {where} ({why}), and no server answered there "
                              f"within {timeout:g}s: {error}")
        log.info("server at %s not back yet (%s); retrying in %.2fs", where, error, min(delay, left))
        time.sleep(min(delay, left))
        delay = min(delay * 2, MAX_DELAY)
