"""The live dashboard (``cs-server --dashboard``) and ``cs-server status --watch``, end to end.

Real servers in private runtime dirs, real HTTP on loopback (127.x only), a real browser
(Debian's chromium, headless, driven over its DevTools pipe with the standard library) and a
real pseudo-terminal for Ctrl-C. Waiting is always on a condition, never a fixed sleep.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from taskcs import Client
from taskcs.server import dashboard as d
from taskcs.stdlib_tasks import sleep
from tests.conftest import BIN, run_cli, server_status, wait_until
from tests.federation import nodes_fixture  # noqa: F401 - the `nodes` fixture

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]


# ------------------------------------------------------------------------ helpers
def _get(url: str, path: str = "", host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` (with the URL's query) from the dashboard at ``url``: status, headers, body."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        target = (path or parts.path) + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", target, headers={"Host": host} if host else {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@contextlib.contextmanager
def _events(url: str) -> Iterator[Callable[[], dict[str, Any]]]:
    """Open the dashboard's event stream; yields next(): the next snapshot it sends."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", "/events" + (f"?{parts.query}" if parts.query else ""))
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("Content-Type") == "text/event-stream"

    def next_event() -> dict[str, Any]:
        data = []
        while True:
            line = resp.readline()
            assert line, "the event stream ended"
            if line.startswith(b"data: "):
                data.append(line[6:])
            elif line == b"\n" and data:
                return json.loads(b"".join(data))

    try:
        yield next_event
    finally:
        conn.close()


def _start(start_server: Callable[..., Any], runtime_dir: Path, *dashboard: str, executors: int = 2) -> str:
    """A server with a dashboard; its URL, as STATUS reports it."""
    start_server(executors, 60.0, "--dashboard", *dashboard)
    url = server_status(runtime_dir)["dashboard"]
    assert url and url.startswith("http://127."), url
    return str(url)


@contextlib.contextmanager
def _running_set(n: int = 3000, seconds: float = 0.02) -> Iterator[Client]:
    """A client with a long set of sleeps in flight; abandoned (not waited for) at the end."""
    client = Client(foreground=None)
    try:
        for _ in range(n):
            client.submit(sleep, seconds)
        yield client
    finally:
        client.abort()


def _executor_rows(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    return [ex for ex in snapshot["executors"] if not ex["stdio"]]


# --------------------------------------------------------------- units (no server)
def test_addresses_and_which_binds_need_a_token() -> None:
    assert d.parse_address("127.0.0.1:8787") == ("127.0.0.1", 8787)
    assert d.parse_address(":9000") == ("127.0.0.1", 9000)
    assert d.parse_address("9001") == ("127.0.0.1", 9001)
    assert d.parse_address("[::1]:9002") == ("::1", 9002)
    for bad in ("host:", "127.0.0.1:http", "127.0.0.1:70000"):
        with pytest.raises(d.TaskcsError, match="--dashboard"):
            d.parse_address(bad)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert not d.needs_token(host), host
        assert d.needs_token(host, forced=True)
    for host in ("0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "dashboard.example.org"):
        assert d.needs_token(host), host
    assert d._host_of("127.0.0.1:8787") == "127.0.0.1"
    assert d._host_of("[::1]:8787") == "::1"
    assert d._host_of("evil.example:8787") == "evil.example"


def test_the_feed_publishes_only_while_watched_and_rates_come_from_counter_deltas() -> None:
    clock = [100.0]
    feed = d.Feed(clock=lambda: clock[0])
    stats = {"done": 0, "failed": 0, "cancelled": 0}
    built = []

    def status() -> dict[str, Any]:
        built.append(clock[0])
        return {"stats": dict(stats)}

    for second in range(10):  # nobody watches: samples only, no snapshot built
        clock[0] = 100.0 + second
        stats["done"] = 10 * second
        feed.step(clock[0], stats, status)
    assert built == []
    assert feed.watch(0, timeout=0.0) is None  # marks the feed watched (nothing published yet)
    feed.step(clock[0], stats, status)
    got = feed.watch(0, timeout=0.0)
    assert got is not None and built == [109.0]
    snapshot = json.loads(got[1])
    assert snapshot["rates"] == [10.0] * 9 and snapshot["rate"] == 10.0
    feed.step(clock[0] + 0.1, stats, status)  # within PUBLISH_SECONDS: no second snapshot
    assert len(built) == 1
    clock[0] += d.WATCH_GRACE + 1  # the watcher left: publishing stops
    feed.step(clock[0], stats, status)
    assert len(built) == 1
    assert feed.watch(0, timeout=0.0) is None  # a new watcher is not shown the stale snapshot...
    feed.step(clock[0], stats, status)
    got = feed.watch(0, timeout=0.0)  # ...but the one its arrival caused
    assert got is not None and len(built) == 2 and json.loads(got[1])["rates"][-1] == 0.0


# ------------------------------------------------------------------- real servers
def test_page_stream_and_counters_while_a_set_runs(start_server: Any, runtime_dir: Path) -> None:
    url = _start(start_server, runtime_dir, "127.0.0.1:0")
    status, headers, body = _get(url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"new EventSource(" in body and b"<script src" not in body  # self-contained
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert run_cli("cs-server", "dashboard").stdout.strip() == f"dashboard: {url}"
    assert f"  dashboard: {url}\n" in run_cli("cs-server", "status").stdout
    with _running_set(), _events(url) as next_event:
        first = wait_until(lambda: (s := next_event())["stats"]["done"] > 0 and s, what="a task done")
        assert {ex["name"] for ex in _executor_rows(first)} == {"exec-1", "exec-2"}
        assert any(ex["running"] == ["std:sleep"] for ex in _executor_rows(first)), first["executors"]
        assert len(first["clients"]) == 1
        later = wait_until(lambda: (s := next_event())["stats"]["done"] > first["stats"]["done"] and s,
                           what="the done counter to move")
        assert later["sets"] and later["sets"][0]["done"] > 0 and later["queued"] > 0
        assert later["time"] > first["time"]
        wait_until(lambda: json.loads(_get(url, "/snapshot.json")[2])["stats"]["submitted"] == 3000,
                   what="/snapshot.json to count every task submitted")
    assert _get(url, "/nothing-here")[0] == 404


def test_loopback_without_token_refuses_foreign_host_headers(start_server: Any, runtime_dir: Path) -> None:
    url = _start(start_server, runtime_dir, "127.0.0.1:0")
    port = urlsplit(url).port
    assert _get(url, host=f"localhost:{port}")[0] == 200
    status, _, body = _get(url, host=f"rebound.example:{port}")  # DNS rebinding
    assert status == 403 and b"token" in body
    assert _get(url, "/events", host="rebound.example")[0] == 403


def test_a_token_is_required_on_every_request_when_asked(start_server: Any, runtime_dir: Path) -> None:
    # 127.0.0.2 is loopback too: --dashboard-token takes the path every non-loopback bind takes.
    url = _start(start_server, runtime_dir, "127.0.0.2:0", "--dashboard-token")
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.2" and parts.query.startswith("token=") and len(parts.query) > 20
    bare = f"http://{parts.netloc}/"
    for path in ("/", "/events", "/snapshot.json"):
        assert _get(bare, path)[0] == 403, path
        assert _get(bare + "?token=wrong", path)[0] == 403, path
    assert _get(url)[0] == 200
    with _events(url) as next_event:
        assert len(_executor_rows(next_event())) == 2


def test_bad_or_busy_dashboard_addresses_are_refused_clearly(runtime_dir: Path) -> None:
    done = run_cli("cs-server", "start", "--dashboard", "127.0.0.1:notaport")
    assert done.returncode == 1 and "--dashboard '127.0.0.1:notaport'" in done.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_cli("cs-server", "start", "--executors", "1", "--dashboard", f"127.0.0.1:{port}")
        assert done.returncode == 1, done
        assert f"cannot serve the dashboard on 127.0.0.1:{port}" in done.stderr + done.stdout
    assert run_cli("cs-server", "status").returncode == 1  # nothing was left running
    with socket.socket() as default:  # the default port, busy (ours, or whoever else holds it)
        with contextlib.suppress(OSError):
            default.bind(("127.0.0.1", d.DEFAULT_PORT))
            default.listen()
        done = run_cli("cs-server", "start", "--executors", "1", "--dashboard")
    assert done.returncode == 0 and "\ndashboard: http://127.0.0.1:" in done.stdout, done
    assert f":{d.DEFAULT_PORT}/" not in done.stdout  # it took a free port instead


def test_no_dashboard_says_how_to_get_one(start_server: Any, runtime_dir: Path) -> None:
    start_server(1)
    assert server_status(runtime_dir)["dashboard"] is None
    done = run_cli("cs-server", "dashboard")
    assert done.returncode == 1 and "cs-server start --dashboard" in done.stderr


def test_peers_show_on_the_dashboard(nodes: Any) -> None:
    alpha, beta = nodes("alpha", "beta")
    alpha.start()
    beta.start(alpha, extra=("--dashboard", "127.0.0.1:0"))
    beta.wait_linked("alpha")
    with _events(beta.status()["dashboard"]) as next_event:
        peers = wait_until(lambda: [p for p in next_event()["peers"] if p["connected"]], what="a connected peer")
    assert peers[0]["name"] == "alpha" and peers[0]["endpoint"] == alpha.endpoint
    assert {"capacity", "forwarded", "returned"} <= set(peers[0])


# ------------------------------------------------------------------------ terminal
def test_watch_piped_prints_snapshots_separated_by_blank_lines(start_server: Any, runtime_dir: Path) -> None:
    start_server(1)
    proc = subprocess.Popen([str(BIN / "cs-server"), "status", "--watch", "0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        frames = 0
        while frames < 3:
            line = proc.stdout.readline() if proc.stdout else ""
            assert line, "the watch ended early"
            assert "\x1b" not in line  # no escape codes in a pipe
            frames += line.startswith("cs-server pid")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_watch_on_a_terminal_redraws_and_ctrl_c_exits_0(start_server: Any, runtime_dir: Path) -> None:
    start_server(1)
    pid, fd = pty.fork()
    if pid == 0:  # the child: cs-server on the pseudo-terminal, as in a person's shell
        try:
            os.execv(str(BIN / "cs-server"), ["cs-server", "status", "--watch", "0.1"])
        finally:
            os._exit(127)
    output = b""
    try:
        deadline = time.monotonic() + 20
        while output.count(b"\x1b[H") < 3:  # three frames drawn in place
            assert time.monotonic() < deadline, output
            if select.select([fd], [], [], 1)[0]:
                output += os.read(fd, 65536)
        os.write(fd, b"\x03")  # Ctrl-C, through the terminal's line discipline
        while True:
            assert time.monotonic() < deadline, output
            try:
                if select.select([fd], [], [], 1)[0]:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    output += chunk
            except OSError:  # EIO: the child closed the terminal
                break
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert b"Ctrl-C to quit" in output and b"cs-server pid" in output
    assert b"Traceback" not in output and b"KeyboardInterrupt" not in output, output


# ------------------------------------------------------------------ a real browser
class _Chromium:
    """Headless chromium driven over ``--remote-debugging-pipe`` (DevTools protocol as JSON
    messages ended by NUL on fds 3 and 4): no websocket client, no extra dependency."""

    def __init__(self, profile: Path) -> None:
        to_browser, self._in = os.pipe()
        self._out, from_browser = os.pipe()
        command = (f"exec chromium --headless --no-sandbox --disable-gpu --remote-debugging-pipe "
                   f"--user-data-dir={profile} about:blank 3<&{to_browser} 4>&{from_browser}")
        # bash, not sh: dash takes only one-digit fds in a redirection.
        self.proc = subprocess.Popen(["bash", "-c", command], pass_fds=(to_browser, from_browser),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._id = 0
        self.session: str | None = None

    def call(self, method: str, timeout: float = 20.0, **params: Any) -> dict[str, Any]:
        """Send one command (to the attached page, once there is one) and return its result."""
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._in, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                assert left > 0 and select.select([self._out], [], [], left)[0], f"chromium: no answer to {method}"
                chunk = os.read(self._out, 1 << 20)
                assert chunk, "chromium exited"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # events and other replies are not ours
                assert "error" not in reply, reply["error"]
                return dict(reply["result"])

    def open(self, url: str, width: int = 1280, height: int = 900) -> None:
        """Open ``url`` in a new page of ``width`` x ``height`` and attach to it."""
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def screenshot(self, path: Path) -> None:
        """Save what the page shows as a PNG."""
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        """Close the browser; kill its process group (ours: start_new_session) if it lingers."""
        with contextlib.suppress(AssertionError, OSError):
            self.call("Browser.close", timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=5)
        os.close(self._in)
        os.close(self._out)


#: What the page shows, read from its DOM.
_SHOWN = """document.getElementById("done") && JSON.stringify({state: document.body.dataset.state,
  done: Number(document.getElementById("done").textContent),
  executors: [...document.querySelectorAll("tr.executor")].map((tr) => tr.dataset.name),
  running: [...document.querySelectorAll("tr.executor td.run")].map((td) => td.textContent)})"""


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_a_real_browser_shows_executors_and_a_moving_counter(start_server: Any, runtime_dir: Path,
                                                            tmp_path: Path) -> None:
    url = _start(start_server, runtime_dir, "127.0.0.1:0")
    browser = _Chromium(tmp_path / "profile")
    try:
        with _running_set():
            browser.open(url)

            def shown() -> dict[str, Any]:
                value = browser.evaluate(_SHOWN)  # null until the page has loaded
                return dict(json.loads(value)) if value else {"state": None, "done": 0}

            first = wait_until(lambda: (s := shown())["state"] == "live" and s["done"] > 0 and s, timeout=20,
                               what="the page to show tasks done")
            assert sorted(first["executors"]) == ["exec-1", "exec-2"]
            later = wait_until(lambda: (s := shown())["done"] > first["done"] and s, timeout=20,
                               what="the page's done counter to move by itself")
            assert "std:sleep" in later["running"]
            browser.screenshot(tmp_path / "dashboard.png")
    finally:
        browser.close()
    assert (tmp_path / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("TASKCS_DASHBOARD_SCREENSHOT"):  # to refresh docs/dashboard.png by hand
        shutil.copy(tmp_path / "dashboard.png", os.environ["TASKCS_DASHBOARD_SCREENSHOT"])
