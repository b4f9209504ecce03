"""What a person sees in a real terminal (issue #9, item 4): cs-demo and cs-client run in a
pseudo-terminal, and a small screen model replays what they wrote, as a terminal would.

Checked: the IOTask's prompt stays visible while other results come in; no result or
forwarded output is ever appended to the progress line; after Ctrl-C the cursor is at the
start of a clean line, where the shell's prompt will go.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import BIN, server_status

pytestmark = pytest.mark.multiprocess

#: A progress line, e.g. "[3/6] 0 failed, 0.2s"; after the run none may be left on the screen.
PROGRESS = re.compile(r"\[\d+/\d+\] \d+ failed, \d+\.\ds")
_CSI = re.compile(rb"\x1b\[([0-9;?]*)([@-~])")
_OSC = re.compile(rb"\x1b\][^\x07]*\x07")

# The child becomes a session leader with the pty as its controlling terminal, so Ctrl-C
# typed into the pty reaches it as SIGINT, as in a shell.
_CTTY = ("import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
         "os.execv(sys.argv[1], sys.argv[1:])")


class Screen:
    """A terminal's screen: printable text, CR, LF, backspace and erase-line; other control
    sequences (colours, modes) are ignored. Lines do not wrap (the model has no width)."""

    def __init__(self) -> None:
        self.lines: list[list[str]] = [[]]
        self.row = 0
        self.col = 0
        self._pending = b""

    def feed(self, data: bytes) -> None:
        data = _OSC.sub(b"", self._pending + data)
        self._pending = b""
        i = 0
        while i < len(data):
            byte = data[i:i + 1]
            if byte == b"\x1b":
                m = _CSI.match(data, i)
                if m is None:
                    self._pending = data[i:]  # an escape sequence cut in two: wait for its end
                    return
                if m.group(2) == b"K":
                    mode = m.group(1) or b"0"
                    line = self.lines[self.row]
                    if mode == b"0":
                        del line[self.col:]
                    elif mode == b"2":
                        line[:] = [" "] * min(self.col, len(line))
                i = m.end()
                continue
            if byte == b"\r":
                self.col = 0
            elif byte == b"\n":
                self.row += 1
                if self.row == len(self.lines):
                    self.lines.append([])
            elif byte == b"\b":
                self.col = max(0, self.col - 1)
            elif byte >= b" ":
                # decode a UTF-8 sequence whole
                n = 1 + (byte[0] >= 0xC0) + (byte[0] >= 0xE0) + (byte[0] >= 0xF0)
                ch = data[i:i + n].decode(errors="replace")
                line = self.lines[self.row]
                line.extend(" " * (self.col - len(line)))
                if self.col < len(line):
                    line[self.col] = ch
                else:
                    line.append(ch)
                self.col += 1
                i += n
                continue
            i += 1

    def text(self) -> list[str]:
        """Every line as shown, trailing spaces removed."""
        return ["".join(line).rstrip() for line in self.lines]

    def cursor_line(self) -> str:
        """The line the cursor is on, up to the cursor."""
        return "".join(self.lines[self.row][:self.col])


class Terminal:
    """A child process on a pseudo-terminal, and the screen it draws."""

    def __init__(self, *argv: str) -> None:
        self.master, slave = os.openpty()
        self.screen = Screen()
        self.proc = subprocess.Popen([sys.executable, "-c", _CTTY, str(BIN / argv[0]), *argv[1:]],
                                     stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)

    def pump(self, timeout: float) -> bool:
        """Read what the child wrote within ``timeout``; False once the pty is closed."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every writer has closed the pty
            return False
        self.screen.feed(data)
        return bool(data)

    def wait_for(self, condition: Callable[[], Any], timeout: float = 30, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; screen:\n" + "\n".join(self.screen.text()))
            self.pump(0.05)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self, timeout: float = 30) -> int:
        """Read until the child exits and closes the pty; its exit status."""
        deadline = time.monotonic() + timeout
        while self.pump(0.1) and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                while self.pump(0.05):  # what it wrote just before leaving
                    pass
                break
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)  # our child, by pid
            self.proc.wait(5)
        with contextlib.suppress(OSError):
            os.close(self.master)


@contextlib.contextmanager
def terminal(*argv: str) -> Iterator[Terminal]:
    term = Terminal(*argv)
    try:
        yield term
    finally:
        term.close()


def _no_progress_left(lines: list[str]) -> None:
    leftovers = [line for line in lines if PROGRESS.search(line)]
    assert not leftovers, f"progress line left on the screen (or text appended to it): {leftovers}"


def test_demo_prompt_stays_visible_while_results_arrive(runtime_dir: Path, start_server: Any) -> None:
    start_server(2)
    with terminal("cs-demo", "--phase", "3") as term:
        term.wait_for(lambda: term.screen.cursor_line() == "What is your name? ", what="the prompt")
        # Every other task finishes while the prompt waits: their results reach the client
        # now, and must not overwrite the prompt.
        deadline = time.monotonic() + 30
        while server_status(runtime_dir)["stats"]["done"] < 10 and time.monotonic() < deadline:
            term.pump(0.05)
        term.pump(0.3)
        assert term.screen.cursor_line() == "What is your name? ", "\n".join(term.screen.text())
        term.type("Ada\r")
        assert term.finish() == 0
    lines = term.screen.text()
    assert "What is your name? Ada" in lines, "\n".join(lines)
    assert any("prompt = 'Ada'" in line for line in lines)
    assert any(line.startswith("11/11 tasks succeeded") for line in lines)
    _no_progress_left(lines)
    assert term.screen.cursor_line() == ""  # the shell's prompt starts on a clean line


def test_ctrl_c_leaves_a_clean_line_and_output_is_never_appended_to_progress(
        runtime_dir: Path, start_server: Any, tmp_path: Path) -> None:
    start_server(2)
    tasks = [{"task": "print_text", "args": [f"printed on an executor {i}"]} for i in range(6)]
    tasks += [{"task": "add", "args": [i, i]} for i in range(6)]
    tasks.append({"task": "sleep", "args": [30]})
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"tasks": tasks}))
    with terminal("cs-client", "--tasks", str(path)) as term:
        # (Results may wait behind the 30 s sleep in its executor's batch; forwarded output
        # never does: it leaves the executor as soon as its task ends.)
        term.wait_for(lambda: sum("] printed on an executor" in line for line in term.screen.text()) == 6
                      and PROGRESS.fullmatch(term.screen.cursor_line()),
                      what="all forwarded output, and the progress line")
        term.type("\x03")  # Ctrl-C, through the terminal's line discipline
        assert term.finish() == 130
    lines = term.screen.text()
    forwarded = [line for line in lines if re.fullmatch(r"\[print_text#\d+\] printed on an executor \d", line)]
    results = [line for line in lines if re.match(r"\[ +\d+\] print_text = 'printed on an executor \d'", line)]
    assert len(forwarded) == 6, lines  # each on a line of its own, never on the progress line
    assert all(line.endswith(("on exec-1", "on exec-2")) for line in results), lines
    _no_progress_left(lines)
    assert term.screen.cursor_line() == "" and lines[term.screen.row] == "", lines


def test_ctrl_c_at_a_prompt_leaves_a_clean_line(runtime_dir: Path, start_server: Any, tmp_path: Path) -> None:
    start_server(1)
    tasks = [{"task": "add", "args": [i, i]} for i in range(5)] + [{"task": "prompt", "args": ["Your name? "]}]
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"tasks": tasks}))
    with terminal("cs-client", "--tasks", str(path)) as term:
        term.wait_for(lambda: term.screen.cursor_line() == "Your name? ", what="the prompt")
        term.type("\x03")
        assert term.finish() == 130
    lines = term.screen.text()
    prompt = [line for line in lines if line.startswith("Your name?")]
    assert prompt in (["Your name? ^C"], ["Your name?"]), lines  # nothing written after it on its line
    _no_progress_left(lines)
    assert term.screen.cursor_line() == "" and lines[term.screen.row] == "", lines
