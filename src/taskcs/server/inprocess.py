"""The in-process server of phases 1 and 2: a dispatcher thread and executor threads.

Data flow::

    client QueueConnection --> hub.inbox --> [server thread: ServerCore(dispatcher)]
    [server thread] --> each peer's queue --> executor threads / the client

With an engine (issue 14) the hub also carries the engine link's messages: the link's
threads wake the server thread through the inbox, and the server thread drains the link
(see taskcs.engines.link), exactly as the ZeroMQ server polls the link's pipe.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from ..executor.loop import ExecutorLoop, start_thread_executor
from ..runtime import protocol as p
from ..runtime.dispatcher import Dispatcher, DispatcherConfig, PeerId
from ..runtime.transport import QueueConnection, QueueHub
from .core import ServerCore

log = logging.getLogger(__name__)


#: Issue 14: how often the server thread wakes to check an engine's absence (see
#: EngineLink.fail_stranded); without an engine it sleeps until a message comes.
ENGINE_CHECK_SECONDS = 0.25


class _EngineHub(QueueHub):
    """A QueueHub that also carries the messages of in-process sources (engine links)."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[Any] = []

    def recv(self, timeout: float | None, spin: bool = True) -> list[tuple[PeerId, p.Message]]:
        """See :meth:`QueueHub.recv`; a source's wake-up arrives in the inbox."""
        items = super().recv(timeout, spin)
        for source in self.sources:
            items.extend(source.drain())
        return items

    def send(self, peer: PeerId, msg: p.Message) -> None:
        """See :meth:`QueueHub.send`; ids starting 0xff 'E' are engine links."""
        if peer[:2] == b"\xffE":
            for source in self.sources:
                source.deliver(peer, msg)
            return
        super().send(peer, msg)


class InProcessServer:
    """A server thread plus ``executors`` executor threads, talking over queue channels.

    ``engine`` (issue 14): a cluster engine spec (``"dask-local"``, ``"dask://HOST:PORT"``,
    ``"ray-local"``, ...) or a ``distributed.Client``, sent work after the executor threads,
    as ``cs-server --engine`` does; ``engine_grace`` as ServerOptions.engine_grace.
    """

    def __init__(self, executors: int = 0, config: DispatcherConfig | None = None, engine: Any = None,
                 engine_grace: float = 30.0) -> None:
        self.engine: Any = None
        self.engine_grace = engine_grace
        if engine is not None:  # checked before any thread starts: a bad spec starts nothing
            from ..engines import make_engine, preflight

            made = preflight(engine) if isinstance(engine, str) else make_engine(engine)
            if not isinstance(engine, str):
                made.check_installed()
        # Queue channels cannot lose a peer silently, so heartbeats are off.
        self.dispatcher = Dispatcher(config or DispatcherConfig(heartbeat_interval=None), os.getpid())
        self.hub = _EngineHub()
        self.core = ServerCore(self.dispatcher, self.hub)
        if engine is not None:
            from ..engines.link import EngineLink

            self.engine = EngineLink(made, self.dispatcher, self.core.send)
            self.engine.also_wake = self.hub.wake
            self.hub.sources.append(self.engine)
            self.engine.start()
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
        engine = self.engine
        wait = None if engine is None else ENGINE_CHECK_SECONDS
        while not self._stop.is_set():
            self.core.step(wait)
            if engine is not None:
                self.core.send(engine.fail_stranded(time.monotonic(), self.engine_grace))
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
        if self.engine is not None:  # issue 14: disconnect, stop an owned cluster
            self.hub.sources.clear()
            self.engine.close()
        self.hub.close()

    def status(self) -> dict[str, Any]:
        """The dispatcher's snapshot, with the engine's row (as ``cs-server status``)."""
        info = self.dispatcher.status()
        if self.engine is not None:
            info["engines"] = [self.engine.status()]
        return info

    def __enter__(self) -> InProcessServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
