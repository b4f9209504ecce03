"""The pump that connects a transport to the dispatcher; shared by every server flavour."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..runtime import protocol as p
from ..runtime.dispatcher import Dispatcher, Outgoing, PeerId
from ..runtime.transport import ServerTransport

log = logging.getLogger(__name__)

#: The server polls before blocking only with at most this many tasks queued or running.
SPIN_TASKS = 8


class ServerCore:
    """One step = receive what the transport has, let the dispatcher react, send its output.

    ``intercept`` may claim a message before the dispatcher sees it (server-level commands
    such as STATUS and STOP); it returns True when it handled the message.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        transport: ServerTransport,
        clock: Callable[[], float] = time.monotonic,
        intercept: Callable[[PeerId, p.Message, float], bool] | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.transport = transport
        self.clock = clock
        self.intercept = intercept

    def step(self, max_wait: float | None) -> None:
        """Wait up to ``max_wait`` (bounded by the next heartbeat) and process one batch."""
        now = self.clock()
        deadline = self.dispatcher.next_deadline(now)
        wait = max_wait
        if deadline is not None:
            wait = max(0.0, deadline - now) if wait is None else min(wait, max(0.0, deadline - now))
        # Spin before blocking only with a few tasks in flight (a caller waiting on one, say):
        # with many, messages come in batches that amortise a wake-up, and a spin would only
        # take a core from the executors.
        batch = self.transport.recv(wait, spin=self.dispatcher.task_count() <= SPIN_TASKS)
        now = self.clock()
        for peer, msg in batch:
            if self.intercept is not None and self.intercept(peer, msg, now):
                continue
            try:
                out = self.dispatcher.handle(peer, msg, now)
            except Exception:  # a bug must not take the server down for every other peer
                log.exception("dispatcher failed on %s from %r", msg.COMMAND.name, peer[:8])
                out = [(peer, p.Error(f"the server failed to handle {msg.COMMAND.name}; see its log"))]
            self.send(out)
        self.send(self.dispatcher.tick(now))

    def send(self, out: Outgoing) -> None:
        """Deliver the dispatcher's output."""
        send = self.transport.send
        for peer, msg in out:
            send(peer, msg)
