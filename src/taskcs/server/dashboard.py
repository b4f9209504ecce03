"""The live dashboard: a small HTTP server in the cs-server process (``--dashboard``).

Data flow::

    server loop (the only thread that touches the dispatcher), every SUPERVISE period:
        Feed.step(now, stats, status_fn)
            every SAMPLE_SECONDS: (now, tasks finished) -> a bounded deque (the rate history)
            only while someone watches, every PUBLISH_SECONDS: status_fn() + rates -> JSON
                -> Feed.latest, notify waiting HTTP threads
    browser --GET /--------------> the page (PAGE, self-contained: no network fetches)
    browser --GET /events--------> an HTTP thread: Feed.watch() marks "watched", waits for the
        next published JSON and writes it as a server-sent event; repeat until the page goes
    anyone  --GET /snapshot.json-> one published snapshot, the same JSON

The HTTP threads never read dispatcher state: they only see the plain JSON the loop publishes.
Nobody watching costs the loop one float comparison per supervise period and one deque append
per second; watching costs it one status snapshot and one ``json.dumps`` per half second,
shared by every watcher.

The standard library's ``ThreadingHTTPServer`` is enough: the page is one document, the live
part is one stream of server-sent events (plain HTTP; EventSource reconnects by itself), and a
handful of watchers at most. A websocket or an async framework would be a dependency that buys
nothing here. A bind beyond loopback requires a token in the URL (as Jupyter does), checked on
every request; a loopback bind without a token accepts only loopback Host headers, so a web
page elsewhere cannot read it through DNS rebinding.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import secrets
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import TaskcsError
from .dashboard_page import PAGE, SCRIPT

log = logging.getLogger(__name__)

#: Where ``--dashboard`` with no value binds; a busy default port falls back to a free one.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787
#: Seconds between snapshots while watched: live enough for a person, and a status snapshot
#: (O(executors + sets)) twice a second is nothing next to the scheduler's work.
PUBLISH_SECONDS = 0.5
#: A watcher counts as present this long after it last asked; then publishing stops.
WATCH_GRACE = 2.0
#: A snapshot this old is still shown to a new watcher; an older one is not (it waits for the next).
FRESH_SECONDS = 2 * PUBLISH_SECONDS
#: Rate history: one sample per SAMPLE_SECONDS, RATE_SAMPLES of them (five minutes).
SAMPLE_SECONDS = 1.0
RATE_SAMPLES = 300
#: Concurrent event streams served; more get 503 (each holds a thread).
MAX_STREAMS = 32
#: Seconds a write to a browser may block before that stream is dropped.
WRITE_TIMEOUT = 10.0

_SCRIPT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
#: The page may run only its own inline script and talk only to this server.
_CSP = (f"default-src 'none'; script-src '{_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT``, ``PORT`` or ``[::1]:PORT`` -> (host, port); TaskcsError if bad."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        raise TaskcsError(f"--dashboard {text!r}: expected HOST:PORT, :PORT or PORT") from None
    if not 0 <= port <= 65535:
        raise TaskcsError(f"--dashboard {text!r}: port {port} is out of range")
    return host, port


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; any other name or address is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def needs_token(host: str, forced: bool = False) -> bool:
    """A bind beyond loopback is reachable by other machines: its URL must carry a token."""
    return forced or not is_loopback(host)


class Feed:
    """The hand-off between the server loop (writer) and HTTP threads (readers)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        #: Written by HTTP threads (a float store is atomic), read by the loop.
        self.watched_until = 0.0
        self._samples: deque[tuple[float, int]] = deque(maxlen=RATE_SAMPLES + 1)
        self._next_sample = 0.0
        self._next_publish = 0.0
        self._cond = threading.Condition()
        self._seq = 0
        self._latest = b""
        self._published_at = -1e9
        self.closed = False

    # ------------------------------------------------------------ the loop's side
    def step(self, now: float, stats: Mapping[str, int], status: Callable[[], dict[str, Any]]) -> None:
        """Called by the server loop: sample the counters; publish if someone watches."""
        if now >= self._next_sample:
            self._next_sample = now + SAMPLE_SECONDS
            self._samples.append((now, stats["done"] + stats["failed"] + stats["cancelled"]))
        if now < self.watched_until and now >= self._next_publish:
            self._next_publish = now + PUBLISH_SECONDS
            self.publish(status())

    def publish(self, info: dict[str, Any]) -> None:
        """Encode one snapshot (with the rate history) and wake every waiting watcher."""
        samples = list(self._samples)
        rates = [round((b[1] - a[1]) / max(b[0] - a[0], 1e-9), 2) for a, b in itertools.pairwise(samples)]
        recent = samples[-6:]
        rate = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0]) if len(recent) > 1 else 0.0
        snapshot = {**info, "rates": rates, "rate": round(rate, 2), "rate_interval": SAMPLE_SECONDS,
                    "time": time.time()}
        data = json.dumps(snapshot, separators=(",", ":"), default=str).encode()
        with self._cond:
            self._seq += 1
            self._latest = data
            self._published_at = self.clock()
            self._cond.notify_all()

    def close(self) -> None:
        """Wake every watcher for good (the server is stopping)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    # ----------------------------------------------------------- the HTTP side
    def watch(self, after: int, timeout: float) -> tuple[int, bytes] | None:
        """Mark the feed watched and wait for a snapshot newer than ``after``: (seq, JSON).

        A first look (``after`` 0) takes only a recent snapshot, never one left from the last
        time someone watched. None on timeout or when closed.
        """
        deadline = self.clock() + timeout
        with self._cond:
            while not self.closed:
                now = self.clock()
                self.watched_until = now + WATCH_GRACE
                if self._seq > after and (after or now - self._published_at <= FRESH_SECONDS):
                    return self._seq, self._latest
                if now >= deadline:
                    return None
                self._cond.wait(min(deadline - now, WATCH_GRACE / 2))
        return None


@dataclass(frozen=True, slots=True)
class _Config:
    feed: Feed
    token: str | None
    host: str


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = WRITE_TIMEOUT  # the socket's timeout: a browser that stops reading is dropped

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if not self._allowed(url.query):
            self._send(403, b"forbidden: this dashboard needs the token from its URL "
                            b"(cs-server dashboard prints it)\n", "text/plain; charset=utf-8")
            return
        if url.path in ("/", "/index.html"):
            self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif url.path == "/events":
            self._events()
        elif url.path == "/snapshot.json":
            got = self.server.config.feed.watch(0, timeout=5.0)
            if got is None:
                self._send(503, b"no snapshot yet\n", "text/plain; charset=utf-8")
            else:
                self._send(200, got[1], "application/json")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _allowed(self, query: str) -> bool:
        config = self.server.config
        if config.token is not None:
            given = parse_qs(query).get("token", [""])[0]
            return hmac.compare_digest(given.encode(), config.token.encode())
        # No token (loopback): only a loopback Host, so a rebound DNS name cannot read us.
        return is_loopback(_host_of(self.headers.get("Host") or ""))

    def _headers(self, code: int, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")  # the token is in the URL

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self._headers(code, content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _events(self) -> None:
        if not self.server.streams.acquire(blocking=False):
            self._send(503, b"too many dashboard streams\n", "text/plain; charset=utf-8")
            return
        try:
            self._headers(200, "text/event-stream")
            self.end_headers()
            self.wfile.write(b"retry: 2000\n\n")
            seq = 0
            feed = self.server.config.feed
            while not feed.closed:
                got = feed.watch(seq, timeout=5.0)
                if got is None:
                    self.wfile.write(b": keep-alive\n\n")  # notices a browser that left
                else:
                    seq, data = got
                    self.wfile.write(b"data: " + data + b"\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the page was closed or stopped reading
        finally:
            self.server.streams.release()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard %s: " + format, self.address_string(), *args)


def _host_of(header: str) -> str:
    """The host of a Host header: "127.0.0.1:8787" -> "127.0.0.1", "[::1]:8787" -> "::1"."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stream still open at shutdown must not hold the process
    config: _Config
    streams: threading.BoundedSemaphore

    def server_bind(self) -> None:
        # HTTPServer's own looks the bound address up in DNS (getfqdn), which can stall.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class Dashboard:
    """The dashboard's HTTP server on its own thread; :attr:`feed` is the loop's side."""

    def __init__(self, host: str, port: int, token: str | None) -> None:
        self.feed = Feed()
        self.token = token
        self.httpd = _bind(host, port)
        self.httpd.config = _Config(self.feed, token, host)
        self.httpd.streams = threading.BoundedSemaphore(MAX_STREAMS)
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="taskcs-dashboard", daemon=True)

    @property
    def url(self) -> str:
        """Where to point a browser (with the token, if one is required)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def start(self) -> Dashboard:
        """Begin serving; returns self."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and wake every open stream so its thread ends."""
        self.feed.close()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=2.0)


def _bind(host: str, port: int) -> _HTTPServer:
    cls = _HTTPServer6 if ":" in host else _HTTPServer
    try:
        return cls((host, port), _Handler)
    except OSError as exc:
        if port == DEFAULT_PORT:
            log.info("dashboard port %d is busy (%s): taking a free one", port, exc.strerror)
            return _bind(host, 0)
        raise TaskcsError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}") from None


def start_dashboard(address: str, force_token: bool = False) -> Dashboard:
    """Serve the dashboard on ``address`` (see :func:`parse_address`); a token is required
    beyond loopback, or everywhere with ``force_token``."""
    host, port = parse_address(address)
    token = secrets.token_urlsafe(18) if needs_token(host, force_token) else None
    return Dashboard(host, port, token).start()
