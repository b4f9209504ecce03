"""The executor processes a server starts, watches and replaces.

Children are started with ``fork`` by default (the server's imports are inherited, so an
executor is ready in milliseconds) or ``spawn`` (a fresh ``python -m taskcs.executor.process``,
for platforms or embedders where fork is unwelcome). Death is detected by ``waitpid``,
not by heartbeats, because a long pure-Python task may starve an executor's socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from ..executor.process import fork_executor

log = logging.getLogger(__name__)

#: Seconds an executor may take to stop a task it was told to interrupt before it is killed
#: and replaced: long enough for a task's clean-up (finally blocks), short enough that a task
#: that ignores KeyboardInterrupt, or sits in C code that never checks for signals, does not
#: hold a slot for long.
INTERRUPT_GRACE = 2.0

#: Minimum seconds between starts of replacement executors when they keep dying at once
#: (a broken environment would otherwise fork in a tight loop).
RESTART_BACKOFF = 0.5


@dataclass(slots=True)
class _Child:
    name: str
    pid: int
    proc: subprocess.Popen[bytes] | None  # spawn mode only
    started: float


class ExecutorPool:
    """Keeps ``size`` executor processes connected to ``endpoint``."""

    def __init__(self, endpoint: str, size: int, start_method: str = "fork") -> None:
        self.endpoint = endpoint
        self.size = size
        self.start_method = start_method
        self.children: dict[int, _Child] = {}
        self._serial = 0
        self._last_restart = 0.0
        self.replaced = 0

    def fill(self, close_fds: tuple[int, ...] = (), method: str | None = None) -> None:
        """Start executors until there are ``size``; ``close_fds`` are closed in forked children."""
        while len(self.children) < self.size:
            self._serial += 1
            name = f"exec-{self._serial}"
            if (method or self.start_method) == "fork":
                pid, proc = fork_executor(self.endpoint, name, close_fds), None
            else:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "taskcs.executor.process", self.endpoint, name, str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                )
                pid = proc.pid
            self.children[pid] = _Child(name, pid, proc, time.monotonic())
            log.info("started executor %s (pid %d)", name, pid)

    def reap(self, now: float) -> list[tuple[int, int]]:
        """Collect exited executors: [(pid, exit code)]; negative codes are signals."""
        dead = []
        for pid, child in list(self.children.items()):
            if child.proc is not None:
                code = child.proc.poll()
            else:
                try:
                    got, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    got, status = pid, 0
                code = os.waitstatus_to_exitcode(status) if got else None
            if code is not None:
                del self.children[pid]
                dead.append((pid, code))
                log.warning("executor %s (pid %d) exited with code %d", child.name, pid, code)
        return dead

    def replace(self, now: float) -> None:
        """Start replacements for dead executors, at most once per RESTART_BACKOFF."""
        if len(self.children) < self.size and now - self._last_restart >= RESTART_BACKOFF:
            self._last_restart = now
            self.replaced += self.size - len(self.children)
            # Once the server holds ZeroMQ sockets, a forked child would inherit them:
            # replacements start as fresh interpreters instead.
            self.fill(method="spawn")

    # ---- issue 9 (item 3): interrupting a task, replacing an executor that does not stop ----
    def interrupt(self, pid: int) -> bool:
        """SIGINT to our executor ``pid`` (its loop raises KeyboardInterrupt in the task it was
        told to stop, and ignores the signal otherwise); False if it is not ours."""
        if pid not in self.children:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        return True

    def kill(self, pid: int) -> bool:
        """SIGKILL our executor ``pid``; :meth:`reap` and :meth:`replace` then do the rest."""
        if pid not in self.children:
            return False
        log.warning("executor %s (pid %d) did not stop an interrupted task in time: replacing it",
                    self.children[pid].name, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return True
    # ---- end issue 9 (item 3) --------------------------------------------------------------

    def stop(self, grace: float = 0.5, term_grace: float = 1.0) -> None:
        """Stop every executor (our own pids only): those that got BYE leave by themselves
        within ``grace``; the rest (busy with an aborted task, or not yet registered and so
        never told) get SIGTERM, then SIGKILL after ``term_grace``."""
        self._wait(grace)
        for sig, wait in ((signal.SIGTERM, term_grace), (signal.SIGKILL, 5.0)):
            for pid in list(self.children):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            self._wait(wait)

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.children:
            self.reap(time.monotonic())
            if not self.children or time.monotonic() >= deadline:
                return
            time.sleep(0.01)  # children exit asynchronously; fork mode has no fd to wait on
