"""Every command's output may be piped into ``head`` (issue #9, item 6): a reader that goes
away ends the command quietly (status 141, as a tool killed by SIGPIPE), never a traceback."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from taskcs._cli import EXIT_BROKEN_PIPE

from .conftest import BIN


def _run_into_closed_pipe(*args: str, timeout: float = 60) -> tuple[int, str]:
    """Run a console script with stdout a real pipe whose reader has already gone."""
    rfd, wfd = os.pipe()
    os.close(rfd)  # no reader: the command's first write to stdout fails with EPIPE
    try:
        proc = subprocess.run([str(BIN / args[0]), *args[1:]], stdout=wfd, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True, timeout=timeout)
    finally:
        os.close(wfd)
    return proc.returncode, proc.stderr


def _run_into_head(command: str, lines: int = 1) -> tuple[int, str, str]:
    """``command | head -N`` through a real shell pipeline; (status of command, head's output, stderr)."""
    script = f'{command} 2>"$ERR" | head -{lines}; echo "status=${{PIPESTATUS[0]}}"'
    err = Path(os.environ.get("TMPDIR", "/tmp")) / f"pipe-err-{os.getpid()}"
    try:
        out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "ERR": str(err), "PATH": f"{BIN}:{os.environ['PATH']}"}).stdout
        return int(out.rsplit("status=", 1)[1]), out, err.read_text()
    finally:
        err.unlink(missing_ok=True)


def test_cs_demo_list_into_a_closed_pipe() -> None:
    code, err = _run_into_closed_pipe("cs-demo", "--list")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code == EXIT_BROKEN_PIPE


@pytest.mark.multiprocess
def test_cs_server_status_into_head(runtime_dir: Path, start_server: Any) -> None:
    start_server(2)
    code, err = _run_into_closed_pipe("cs-server", "status")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code == EXIT_BROKEN_PIPE
    status, out, err = _run_into_head("cs-server status", 1)  # and through a real `head`
    assert out.startswith("cs-server pid ") and "Traceback" not in err, err
    assert status in (0, EXIT_BROKEN_PIPE)  # 0 when head took it all before leaving
    code, err = _run_into_closed_pipe("cs-server", "start")
    assert "Traceback" not in err and code == EXIT_BROKEN_PIPE, err


@pytest.mark.multiprocess
def test_cs_client_into_a_closed_pipe_stops_quietly(runtime_dir: Path, start_server: Any) -> None:
    start_server(1)
    code, err = _run_into_closed_pipe("cs-client", "add", "1", "2")
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code == EXIT_BROKEN_PIPE
