"""Talking to a running server as a control peer: STATUS and STOP."""

from __future__ import annotations

import os
import time
from typing import Any

from ..errors import BrokenError
from ..runtime import protocol as p
from ..runtime.zmq_transport import ZmqConnection


def request(endpoint: str, msg: p.Message, timeout: float = 5.0) -> dict[str, Any]:
    """Send ``msg`` from a fresh control connection and return the server's StatusReply."""
    conn = ZmqConnection(endpoint)
    try:
        conn.send(p.Hello("control", f"control-{os.getpid()}", os.getpid()))
        conn.send(msg)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            for reply in conn.recv(left):
                if isinstance(reply, p.StatusReply):
                    conn.send(p.Bye("control done"))
                    conn.close(linger=0.2)
                    return reply.info
                if isinstance(reply, p.Error):
                    raise BrokenError(f"server refused: {reply.text}")
        raise BrokenError(f"no answer from the server at {endpoint} within {timeout:.0f}s")
    finally:
        conn.close()
