"""Finding the local server, starting one, and cleaning up after dead ones.

The server publishes a record, ``server.json`` (pid, endpoint, protocol version, start time,
log file), in a per-user runtime directory of mode 0700:

    $TASKCS_RUNTIME_DIR, else $XDG_RUNTIME_DIR/taskcs, else <tempdir>/taskcs-<uid>

A client trusts a record only if its pid is alive, its protocol version matches and its
socket accepts a connection; otherwise the record is stale and removed. With no live server
the client starts one, detached, under an exclusive ``flock`` on ``start.lock`` so that two
clients racing end up on one server, and waits (bounded) for it to report ready on a pipe.
``TASKCS_ADDRESS`` (or an explicit address) skips discovery and never auto-starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ServerStartError
from .protocol import FEATURES, VERSION

log = logging.getLogger(__name__)

RECORD = "server.json"
SOCKET = "server.sock"
LOCK = "start.lock"
LOG = "server.log"
#: Longest a client waits for a server it started: covers a loaded machine, yet a broken
#: install fails within seconds rather than hanging a script.
START_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """What a running server publishes about itself."""

    pid: int
    endpoint: str
    version: int
    started: float
    log: str = ""
    #: protocol.FEATURES of the server (0: a build from before it was published): a client
    #: of other features would misread its messages, so it does not take this server.
    features: int = 0


def runtime_dir(create: bool = True) -> Path:
    """The per-user runtime directory (mode 0700), created when missing."""
    env = os.environ.get("TASKCS_RUNTIME_DIR")
    if env:
        path = Path(env)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "taskcs"
    else:
        import tempfile  # lazy, like subprocess below: keeps a client's start-up light

        path = Path(tempfile.gettempdir()) / f"taskcs-{os.getuid()}"
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
        if st.st_uid != os.getuid():
            raise ServerStartError(f"runtime directory {path} belongs to another user; set TASKCS_RUNTIME_DIR")
        if st.st_mode & 0o077:
            path.chmod(0o700)  # others must not reach the socket: payloads run code
    return path


def default_endpoint(directory: Path) -> str:
    """The IPC endpoint of the server in ``directory``."""
    return f"ipc://{directory / SOCKET}"


def read_record(directory: Path) -> ServerRecord | None:
    """The record in ``directory``, or None if absent or unreadable."""
    try:
        data = json.loads((directory / RECORD).read_text())
        return ServerRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


def write_record(directory: Path, record: ServerRecord) -> None:
    """Publish ``record`` atomically (write then rename)."""
    tmp = directory / f".{RECORD}.{os.getpid()}"
    tmp.write_text(json.dumps(asdict(record)))
    tmp.chmod(0o600)
    tmp.replace(directory / RECORD)


def remove_record(directory: Path, pid: int) -> None:
    """Remove the record if it still names ``pid`` (never another server's)."""
    record = read_record(directory)
    if record is not None and record.pid == pid:
        with contextlib.suppress(OSError):
            (directory / RECORD).unlink()


def terminate(pid: int, grace: float = 5.0) -> None:
    """Stop a server we started, by its pid: SIGTERM (it finishes or aborts its work and
    says BYE), then SIGKILL if it is still there after ``grace`` seconds."""
    import signal

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)  # not our child (detached): no handle to wait on
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """True if a process with ``pid`` exists (and is not a zombie we could reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie still answers kill(0): look at its state
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def accepts(endpoint: str) -> bool:
    """True if an ipc endpoint has a listener (a plain AF_UNIX connect; tcp is assumed live)."""
    if not endpoint.startswith("ipc://"):
        return True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(endpoint[len("ipc://"):])
        except OSError:
            return False
    return True


def live_record(directory: Path) -> ServerRecord | None:
    """The record of a live, compatible server in ``directory``; stale records are removed."""
    record = read_record(directory)
    if record is None:
        return None
    if record.version != VERSION or record.features != FEATURES:
        log.warning("server %d speaks protocol %d.%d, not %d.%d (another taskcs version); ignoring it",
                    record.pid, record.version, record.features, VERSION, FEATURES)
        return None
    if pid_alive(record.pid) and accepts(record.endpoint):
        return record
    log.info("removing stale server record (pid %d)", record.pid)
    remove_record(directory, record.pid)
    return None


@contextlib.contextmanager
def start_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock held while checking for and starting a server."""
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def ensure_server(
    directory: Path | None = None, args: Sequence[str] = (), timeout: float = START_TIMEOUT
) -> tuple[ServerRecord, bool]:
    """A live server in ``directory``, started if needed; returns (record, started_now)."""
    directory = directory or runtime_dir()
    record = live_record(directory)
    if record is not None:
        return record, False
    with start_lock(directory):
        record = live_record(directory)  # another client may have won the race
        if record is not None:
            return record, False
        return spawn_server(directory, args, timeout), True


def spawn_server(directory: Path, args: Sequence[str] = (), timeout: float = START_TIMEOUT) -> ServerRecord:
    """Start a detached ``cs-server`` and wait until it accepts connections."""
    import subprocess
    rfd, wfd = os.pipe()
    log_path = directory / LOG
    cmd = [sys.executable, "-m", "taskcs.server.cli", "serve", "--detached",
           "--runtime-dir", str(directory), "--ready-fd", str(wfd), *args]
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # keep our own import path in the child
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(wfd,),
            start_new_session=True, env=env, cwd="/",
        )
    os.close(wfd)
    try:
        line = _read_line(rfd, timeout)
    finally:
        os.close(rfd)
    if line.startswith(b"ready"):
        record = read_record(directory)
        if record is not None and record.pid == proc.pid:
            _reap_later(proc)
            return record
    if proc.poll() is None and not line:
        proc.kill()  # it neither failed nor became ready in time: our child, our pid
    proc.wait(timeout=5)
    why = "timed out" if not line else line.decode().strip()
    raise ServerStartError(
        f"could not start cs-server (exit code {proc.returncode}, {why}); "
        f"last lines of {log_path}:\n{tail(log_path)}"
    )


def _reap_later(proc: Any) -> None:
    # The server is detached in its own session but is still our child: if this process lives
    # longer than the server, reap it so it does not linger as a zombie.
    import threading

    threading.Thread(target=proc.wait, daemon=True, name="taskcs-reaper").start()


def _read_line(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return data
        chunk = os.read(fd, 256)
        if not chunk:
            return data
        data += chunk
    return data


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def resolve_address(address: str | None = None, autostart: bool = True) -> str:
    """The endpoint to connect to: explicit, ``TASKCS_ADDRESS``, or the local server."""
    address = address or os.environ.get("TASKCS_ADDRESS")
    if address:
        return address
    directory = runtime_dir()
    if autostart:
        return ensure_server(directory)[0].endpoint
    record = live_record(directory)
    if record is None:
        raise ServerStartError(f"no taskcs server is running in {directory} (start one with `cs-server start`)")
    return record.endpoint


def connect_local(address: str | None = None, autostart: bool = True):  # type: ignore[no-untyped-def]
    """A ZeroMQ connection to ``address`` or the local server (started if needed)."""
    from .zmq_transport import ZmqConnection

    return ZmqConnection(resolve_address(address, autostart))
