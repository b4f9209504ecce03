"""The cs-server process: dispatcher + ZeroMQ ROUTER + executor pool + idle exit.

Data flow::

    clients, executors, control --DEALER--> ROUTER (ZmqServerTransport)
        --> ServerCore: STATUS/STOP answered here, everything else -> Dispatcher
    Dispatcher --> ROUTER --> peers
    ExecutorPool: waitpid each tick; a dead executor -> dispatcher.peer_gone(exit code)
        and a replacement
    peer servers (phase 4) --CURVE tcp--> the same ROUTER (``listen``), and our own links
        to the ``peers`` --DEALER--> theirs (LinkTransport/LinkManager in links.py)
    --dashboard (dashboard.py): each supervise period the loop hands counters to its Feed and,
        only while a browser watches, a status snapshot that HTTP threads send as events

The loop wakes on a message or at the next deadline (heartbeat, supervision, idle check);
it never sleeps on a fixed period while there is traffic.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from ..runtime import discovery, keys
from ..runtime import protocol as p
from ..runtime.dispatcher import Dispatcher, DispatcherConfig, PeerId
from ..runtime.zmq_transport import ZmqServerTransport
from .core import ServerCore
from .links import LinkManager, LinkTransport, parse_peer
from .pool import INTERRUPT_GRACE, ExecutorPool
from .security import start_authenticator

if TYPE_CHECKING:
    from .dashboard import Dashboard  # issue 11 (imported when used: http.server costs start-up time)

log = logging.getLogger(__name__)

#: How often executors are checked for exits: the delay before a crashed executor's task
#: is retried elsewhere, against a waitpid per child per period.
SUPERVISE_SECONDS = 0.1
#: Default seconds with no clients and no work before the server exits by itself.
DEFAULT_IDLE_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Everything ``cs-server`` can be told."""

    runtime_dir: Path
    endpoint: str | None = None
    executors: int = os.cpu_count() or 1
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    heartbeat: float = 1.0
    start_method: str = "fork"
    stop_timeout: float = 30.0
    client_credit: int = 16384  # as DispatcherConfig
    #: µs the server polls before blocking; None: $TASKCS_SPIN_US or DEFAULT_SPIN_US.
    spin_us: int | None = None
    # --- issue 11: the live dashboard
    #: HOST:PORT to serve the dashboard on (dashboard.parse_address), None: no dashboard.
    dashboard: str | None = None
    #: Require the URL's token even on a loopback bind (always required beyond loopback).
    dashboard_token: bool = False
    # --- end issue 11
    #: CURVE tcp endpoints to bind for peer servers and remote clients (phase 4).
    listen: tuple[str, ...] = ()
    #: Peer servers to link to, each ``PUBLIC_KEY@tcp://host:port``.
    peers: tuple[str, ...] = ()
    #: This server's name among its peers (``future.executor`` reads "name:exec-2").
    name: str = ""
    #: Config directory with the key pair and trusted keys; None: keys.config_dir().
    config_dir: Path | None = None
    #: Seconds an executor may take to stop an abandoned task before it is replaced (issue 9).
    interrupt_grace: float = INTERRUPT_GRACE
    #: Issue 14: a cluster engine to send work to ("dask://host:8786", "dask-local", ...,
    #: or a distributed.Client); see taskcs.engines.
    engine: Any = None
    #: Issue 14: seconds the engine may be away, with nothing else able to run queued work,
    #: before that work fails naming the engine (a scheduler restart should not fail a set).
    engine_grace: float = 30.0


class Server:
    """A long-running taskcs server; :meth:`serve` runs it in the calling thread."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.endpoint = options.endpoint or discovery.default_endpoint(options.runtime_dir)
        config = DispatcherConfig(heartbeat_interval=options.heartbeat, client_credit=options.client_credit)
        self.dispatcher = Dispatcher(config, os.getpid(), options.name or socket.gethostname())
        self.links: LinkManager | None = None
        self.keypair: keys.KeyPair | None = None
        if options.listen or options.peers:
            # Before any fork or socket: a missing or unsafe key pair is refused up front.
            self.keypair = keys.load(options.config_dir)
        self._peer_links = [parse_peer(address, i) for i, address in enumerate(options.peers)]
        # ---- issue 14: an engine link (its spec is checked now: a bad one starts nothing)
        self.engine: Any = None
        self._engine: Any = None
        if options.engine is not None:
            from ..engines import make_engine

            self._engine = make_engine(options.engine)
        # ---- end issue 14
        self.pool = ExecutorPool(self.endpoint, options.executors, options.start_method)
        self.started = time.time()
        self.dashboard: Dashboard | None = None  # issue 11
        self._stopping: str | None = None  # None, "graceful" or "now"
        self._stop_deadline = 0.0
        self._idle_since = time.monotonic()
        self._replacing: set[int] = set()  # issue 9: executors killed for not stopping a task

    def serve(self, ready_fd: int | None = None) -> int:
        """Publish the record, start executors, and run until stopped or idle; return 0."""
        # Fork the first executors before any ZeroMQ context exists, so children inherit no
        # sockets (an inherited listener would keep a dead server's endpoint "alive").
        self.pool.fill(close_fds=(ready_fd,) if ready_fd is not None else ())
        self.context: zmq.Context[Any] = zmq.Context()
        if self.endpoint.startswith("ipc://"):
            Path(self.endpoint[6:]).unlink(missing_ok=True)  # a dead server's socket file
        spin = None if self.options.spin_us is None else max(0, self.options.spin_us) / 1e6
        self.transport = ZmqServerTransport(self.endpoint, self.context, spin=spin)
        self.endpoint = self.transport.endpoint
        self.listening = [self._listen(endpoint) for endpoint in self.options.listen]
        self.links_transport = LinkTransport(self.transport)
        self.core = ServerCore(self.dispatcher, self.links_transport, intercept=self._intercept)
        if self._peer_links:
            assert self.keypair is not None
            self.links = LinkManager(self._peer_links, self.links_transport, self.dispatcher, self.context,
                                     self.keypair, self.options.heartbeat * self.dispatcher.config.liveness,
                                     self.core.send)
        if self._engine is not None:  # issue 14
            from ..engines.link import EngineLink

            self.engine = EngineLink(self._engine, self.dispatcher, self.core.send)
            self.links_transport.add_source(self.engine)
            self.engine.start()
        self._start_dashboard(ready_fd is None)  # issue 11
        record = discovery.ServerRecord(
            os.getpid(), self.endpoint, p.VERSION, self.started,
            str(self.options.runtime_dir / discovery.LOG), p.FEATURES,
        )
        discovery.write_record(self.options.runtime_dir, record)
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop(now=False))
        signal.signal(signal.SIGINT, lambda *_: self.request_stop(now=False))
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        log.info("cs-server %d listening on %s with %d executors", os.getpid(), self.endpoint, self.pool.size)
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _listen(self, endpoint: str) -> str:
        assert self.keypair is not None
        if not hasattr(self, "auth"):
            directory = self.options.config_dir or keys.config_dir()
            self.auth, self.trusted = start_authenticator(self.context, directory)
        bound = self.transport.listen_curve(endpoint, self.keypair)
        log.info("listening for peer servers and remote clients on %s (CURVE, key %s)",
                 bound, self.keypair.public.decode())
        return bound

    def request_stop(self, now: bool) -> None:
        """Begin a graceful (finish accepted work) or immediate stop."""
        if now:
            self._stopping = "now"
        elif self._stopping is None:
            self._stopping = "graceful"
            self._stop_deadline = time.monotonic() + self.options.stop_timeout
        self.dispatcher.draining = True

    def _loop(self) -> None:
        next_supervise = 0.0
        while True:
            now = time.monotonic()
            if now >= next_supervise:
                self._supervise(now)
                next_supervise = now + SUPERVISE_SECONDS
                # issue 11: the wall clock for CAPACITY's stamps, kept current (NTP may slew it)
                self.dispatcher.wall_offset = time.time() - now
                if self.dashboard is not None:  # issue 11: samples; a snapshot only while watched
                    self.dispatcher.watch_stream(now < self.dashboard.feed.watched_until)
                    self.dashboard.feed.step(now, self.dispatcher.stats, self.status_info)
            if self.links is not None:
                self.links.step(now)
            if self._stopping == "now" or (self._stopping == "graceful" and (
                    not self.dispatcher.has_work() or now > self._stop_deadline)):
                return
            if self._idle_expired(now):
                log.info("idle for %.0fs with no clients or work: exiting", self.options.idle_timeout)
                return
            self.core.step(max(0.0, next_supervise - now))

    def _idle_expired(self, now: float) -> bool:
        if self.dispatcher.client_count() or self.dispatcher.has_work():
            self._idle_since = now
            return False
        return self.options.idle_timeout > 0 and now - self._idle_since > self.options.idle_timeout

    def _supervise(self, now: float) -> None:
        for pid, code in self.pool.reap(now):
            peer = self.dispatcher.peer_by_pid(pid)
            if peer is not None:
                reason = f"executor process {pid} exited with code {code}"
                # issue 9: one we killed had started only the task it was told to stop; the
                # others it held were never started, so they go back without using a retry.
                graceful = pid in self._replacing
                self.core.send(self.dispatcher.peer_gone(peer, now, reason, exit_code=code, graceful=graceful))
            self._replacing.discard(pid)
        self._stop_abandoned(now)  # issue 9
        if self.engine is not None:  # issue 14: work only the engine could run fails past a grace
            self.core.send(self.engine.fail_stranded(now, self.options.engine_grace))
        if self._stopping is None:
            self.pool.replace(now)
        for pid in self.pool.children:
            self.dispatcher.mark_supervised(pid)

    # ---- issue 9 (item 3): stop abandoned work --------------------------------------------
    def _stop_abandoned(self, now: float) -> None:
        """Signal executors running a task they were told to stop; replace overdue ones.

        A connection that vanished (its process died) is noticed here too: the transport saw
        a send to it fail, so its client's work is dropped at once, not after heartbeats expire.
        """
        for peer in self.transport.take_unreachable():
            self.core.send(self.dispatcher.peer_gone(peer, now, "its connection closed"))
        # Every supervision period: the signal may land before the INTERRUPT naming the task.
        for pid, since in self.dispatcher.interrupted():
            if pid in self._replacing:
                continue
            if now - since > self.options.interrupt_grace:
                if self.pool.kill(pid):
                    self._replacing.add(pid)
            else:
                self.pool.interrupt(pid)
    # ---- end issue 9 (item 3) ------------------------------------------------------------------

    def _intercept(self, peer: PeerId, msg: p.Message, now: float) -> bool:
        if isinstance(msg, p.StatusRequest):
            self.transport.send(peer, p.StatusReply(self.status_info()))
            return True
        if isinstance(msg, p.Stop):
            log.info("stop requested (%s)", "now" if msg.now else "graceful")
            self.request_stop(msg.now)
            self.transport.send(peer, p.StatusReply({"stopping": "now" if msg.now else "graceful"}))
            return True
        return False

    def status_info(self) -> dict[str, Any]:
        """What STATUS replies, and what the dashboard shows: a plain, JSON-able snapshot."""
        info = self.dispatcher.status()
        info.update({
            "pid": os.getpid(), "endpoint": self.endpoint, "uptime": time.time() - self.started,
            "version": p.VERSION, "idle_timeout": self.options.idle_timeout,
            "executors_replaced": self.pool.replaced, "dropped_messages": self.transport.dropped,
            "listen": self.listening, "peers": self._peers_status(self.dispatcher.server_peers()),
            "dashboard": self.dashboard.url if self.dashboard is not None else None,  # issue 11
        })
        if self.engine is not None:  # issue 14: the engine is a row of its own, not a peer
            peers: list[dict[str, Any]] = info["peers"]  # type: ignore[assignment]
            info["peers"] = [x for x in peers if not str(x.get("id", "")).startswith("ff45")]
            info["engines"] = [self.engine.status()]
        return info

    # --- issue 11: the live dashboard
    def _start_dashboard(self, foreground: bool) -> None:
        """Serve the dashboard if asked to (after the first fork: children inherit no listener)."""
        if self.options.dashboard is None:
            return
        from ..errors import TaskcsError
        from .dashboard import start_dashboard

        try:
            self.dashboard = start_dashboard(self.options.dashboard, self.options.dashboard_token)
        except TaskcsError:
            self.pool.stop(grace=0.0)  # nothing else of ours is running yet
            raise
        log.info("dashboard on %s", self.dashboard.url)
        if foreground:
            print(f"dashboard: {self.dashboard.url}", flush=True)
    # --- end issue 11

    def _peers_status(self, connected: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every peer server: our configured links (connected or not) and those that linked to us."""
        by_id = {peer["id"]: peer for peer in connected}
        out = []
        for link in self.links.status() if self.links is not None else []:
            peer = by_id.pop(link["id"], None) if link["connected"] else None
            stats = self.dispatcher.peer_stats.get(link["name"], {})
            record = {"capacity": 0, "forwarded": stats.get("forwarded", 0), "returned": stats.get("returned", 0),
                      **(peer or {}), **link}
            record["connected"] = peer is not None
            out.append(record)
        for peer in by_id.values():
            out.append({**peer, "endpoint": "(linked to us)", "connected": True})
        return out

    def _shutdown(self) -> None:
        if self.dashboard is not None:  # issue 11
            self.dashboard.close()
        if self.dispatcher.has_work():
            self.core.send(self.dispatcher.abort("the server stopped before this task finished"))
        self.core.send(self.dispatcher.goodbye("server stopping"))
        if self.links is not None:
            self.links.close()
        if self.engine is not None:  # issue 14: disconnect, stop an owned cluster
            self.links_transport.remove_source(self.engine)
            self.engine.close()
        discovery.remove_record(self.options.runtime_dir, os.getpid())
        # After an abort the executors may be busy with tasks nobody wants: no grace then.
        self.pool.stop(grace=0.0 if self._stopping == "now" else 0.5)
        if self.endpoint.startswith("ipc://"):
            Path(self.endpoint[6:]).unlink(missing_ok=True)
        self.links_transport.close(linger=0.5)  # let the BYEs reach clients that are still connected
        if hasattr(self, "auth"):
            self.auth.stop()
        self.context.term()
        log.info("cs-server %d stopped after %.1fs", os.getpid(), time.time() - self.started)
