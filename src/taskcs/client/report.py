"""Running a task set in the foreground and reporting it to a person (cs-client, cs-demo)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

from ..errors import RemoteTraceback
from ..runtime.task import Task
from .client import Client
from .taskset import TaskFuture


class Reporter:
    """Prints each result as it completes, with a progress line on a terminal."""

    def __init__(self, total: int, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.total = total
        self.out = out
        self.err = err
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.progress = err.isatty()

    def __call__(self, fut: TaskFuture) -> None:
        with self.lock:
            self.done += 1
            where = f"on {fut.executor}" if fut.executor else ""
            if fut.cancelled():
                line = f"[{fut.task_id:>4}] {fut.label}: cancelled"
            elif fut.exception() is not None:
                self.failed += 1
                exc = fut.exception()
                line = f"[{fut.task_id:>4}] {fut.label} FAILED {where}: {type(exc).__name__}: {exc}"
            else:
                line = f"[{fut.task_id:>4}] {fut.label} = {fut.result()!r}  {where}"
            if self.progress:
                self.err.write("\r\033[K")
            self.out.write(line + "\n")
            self.out.flush()
            if self.progress:
                self.err.write(f"[{self.done}/{self.total}] {self.failed} failed, "
                               f"{time.monotonic() - self.started:.1f}s")
                self.err.flush()

    def finish(self, futures: Sequence[TaskFuture]) -> int:
        """Print failures' remote tracebacks and a summary; return the exit status."""
        if self.progress:
            self.err.write("\r\033[K")
        for fut in futures:
            exc = None if fut.cancelled() else fut.exception()
            if exc is not None:
                cause = exc.__cause__
                tb = cause.tb if isinstance(cause, RemoteTraceback) else f"{type(exc).__name__}: {exc}\n"
                self.err.write(f"--- task {fut.task_id} ({fut.label}) failed on {fut.executor}:\n{tb}")
        ok = self.total - self.failed
        self.out.write(f"{ok}/{self.total} tasks succeeded in {time.monotonic() - self.started:.2f}s\n")
        self.out.flush()
        return 0 if self.failed == 0 else 1


def run_and_report(client: Client, tasks: Sequence[Task], out: TextIO = sys.stdout) -> int:
    """Submit ``tasks`` as a set, run IOTasks in this thread, print results; exit status."""
    ts = client.submit_set(tasks)
    reporter = Reporter(len(ts), out)
    for fut in ts.futures:
        fut.add_done_callback(reporter)  # type: ignore[arg-type]
    client.run_foreground(until=ts.done)
    return reporter.finish(ts.futures)
