"""Shared fixtures: a private runtime directory per test, and cleanup of any server in it.

Every test that may start a cs-server gets its own TASKCS_RUNTIME_DIR (short, so the ipc
socket path stays under the 107-byte limit). At teardown the server recorded there, if any,
is stopped by its pid: SIGTERM, then SIGKILL after a grace period; executor processes exit
by themselves when their parent goes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskcs.runtime import discovery

BIN = Path(sys.executable).parent


def _stop_server_in(directory: Path) -> None:
    record = discovery.read_record(directory)
    if record is not None and discovery.pid_alive(record.pid):
        discovery.terminate(record.pid, grace=5)


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh private runtime directory set as TASKCS_RUNTIME_DIR; its server is stopped after."""
    path = Path(tempfile.mkdtemp(prefix="tcs-", dir="/tmp"))
    monkeypatch.setenv("TASKCS_RUNTIME_DIR", str(path))
    monkeypatch.delenv("TASKCS_ADDRESS", raising=False)
    try:
        yield path
    finally:
        _stop_server_in(path)
        shutil.rmtree(path, ignore_errors=True)


def run_cli(*args: str, input: str | None = None, timeout: float = 60, env: dict[str, str] | None = None,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a console script of this package (cs-server, cs-client, cs-demo) to completion."""
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], input=input, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=cwd,
    )


# ---------------------------------------------------------------- end-to-end helpers
def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
               what: str = "a condition") -> Any:
    """Poll ``condition()`` until it returns something truthy (returned) or fail after ``timeout``.

    For conditions with nothing to block on (another process's state); never a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def server_status(directory: Path, timeout: float = 5.0) -> dict[str, Any]:
    """The STATUS reply of the server recorded in ``directory``."""
    from taskcs.runtime import protocol
    from taskcs.server.control import request

    record = discovery.read_record(directory)
    assert record is not None, f"no server record in {directory}"
    return request(record.endpoint, protocol.StatusRequest(), timeout=timeout)


@pytest.fixture
def start_server(runtime_dir: Path) -> Callable[..., discovery.ServerRecord]:
    """Factory: start a detached cs-server in ``runtime_dir`` (1 executor by default); its record.

    Returns once every executor has joined, so a test never races the pool's start-up (and a
    server stopped right away does not wait for executors it has not met). The server is
    stopped by the ``runtime_dir`` fixture at teardown.
    """

    def start(executors: int = 1, idle_timeout: float = 60.0, *extra: str) -> discovery.ServerRecord:
        args = ["--executors", str(executors), "--idle-timeout", str(idle_timeout), *extra]
        record, started = discovery.ensure_server(runtime_dir, args)
        assert started, "a server was already running in a fresh runtime dir"
        wait_until(lambda: len([ex for ex in server_status(runtime_dir)["executors"] if not ex["stdio"]]) == executors,
                   what=f"{executors} executors to join the server")
        return record

    return start
