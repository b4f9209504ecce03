"""The in-process server of phases 1 and 2: a dispatcher thread and executor threads.

Data flow::

    client QueueConnection --> hub.inbox --> [server thread: ServerCore(dispatcher)]
    [server thread] --> each peer's queue --> executor threads / the client
"""

from __future__ import annotations

import logging
import os
import threading

from ..executor.loop import ExecutorLoop, start_thread_executor
from ..runtime.dispatcher import Dispatcher, DispatcherConfig
from ..runtime.transport import QueueConnection, QueueHub
from .core import ServerCore

log = logging.getLogger(__name__)


class InProcessServer:
    """A server thread plus ``executors`` executor threads, talking over queue channels."""

    def __init__(self, executors: int = 0, config: DispatcherConfig | None = None) -> None:
        # Queue channels cannot lose a peer silently, so heartbeats are off.
        self.dispatcher = Dispatcher(config or DispatcherConfig(heartbeat_interval=None), os.getpid())
        self.hub = QueueHub()
        self.core = ServerCore(self.dispatcher, self.hub)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taskcs-server", daemon=True)
        self._thread.start()
        self.executors: list[tuple[threading.Thread, ExecutorLoop]] = [
            start_thread_executor(self.hub.connect(), f"thread-{i + 1}") for i in range(executors)
        ]

    def connect(self) -> QueueConnection:
        """A connection for a client (or any other peer) of this server."""
        return self.hub.connect()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.core.step(None)
        self.core.send(self.dispatcher.goodbye("server stopped"))

    def close(self) -> None:
        """Stop the server thread and its executors (they receive BYE)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.hub.wake()
        self._thread.join(timeout=10)
        for thread, _loop in self.executors:
            thread.join(timeout=10)
        self.hub.close()

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
