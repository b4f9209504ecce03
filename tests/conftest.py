"""Shared fixtures: a private runtime directory per test, and cleanup of any server in it.

Every test that may start a cs-server gets its own TASKCS_RUNTIME_DIR (short, so the ipc
socket path stays under the 107-byte limit). At teardown the server recorded there, if any,
is stopped by its pid: SIGTERM, then SIGKILL after a grace period; executor processes exit
by themselves when their parent goes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskcs.runtime import discovery

BIN = Path(sys.executable).parent


def _stop_server_in(directory: Path) -> None:
    record = discovery.read_record(directory)
    if record is None or not discovery.pid_alive(record.pid):
        return
    os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while discovery.pid_alive(record.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if discovery.pid_alive(record.pid):
        os.kill(record.pid, signal.SIGKILL)


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
