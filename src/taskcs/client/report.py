"""Running a task set in the foreground and reporting it to a person (cs-client, cs-demo).

Every line goes through one :class:`~taskcs.client.console.Console`: result lines (written by
the client's I/O thread as futures complete), output forwarded from executors, log lines, and
the progress line; the foreground executor (this thread) lends the terminal to each task it
runs. See that module for the rules that keep the screen readable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TextIO

from ..errors import RemoteTraceback
from ..runtime.task import Task
from .client import Client, format_output
from .console import Console
from .taskset import TaskFuture

#: Seconds into a set before the progress line adds a rate and the time left: a short set
#: would only flicker with meaningless estimates.
ESTIMATE_AFTER = 1.0


def progress_text(done: int, total: int, failed: int, elapsed: float) -> str:
    """``[3/6] 0 failed, 0.2s``; past ESTIMATE_AFTER also ``, 15/s, ~0.2s left``."""
    text = f"[{done}/{total}] {failed} failed, {elapsed:.1f}s"
    if elapsed >= ESTIMATE_AFTER and 0 < done < total:
        rate = done / elapsed
        left = (total - done) / rate
        shown = f"{rate:,.0f}/s" if rate >= 10 else f"{rate:.1f}/s"
        text += f", {shown}, ~{_duration(left)} left"
    return text


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes}m{sec:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Reporter:
    """Prints each result as it completes, with a progress line on a terminal."""

    def __init__(self, total: int, out: TextIO | None = None, err: TextIO | None = None,
                 console: Console | None = None) -> None:
        self.total = total
        self.console = console or Console(out, err)
        self.out = self.console.out
        self.err = self.console.err
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self.lock = threading.Lock()

    @property
    def progress(self) -> bool:
        """True when a progress line is shown (stderr is a terminal)."""
        return self.console.progress_enabled

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
            self.console.write(line + "\n")
            self.console.progress(progress_text(self.done, self.total, self.failed,
                                                time.monotonic() - self.started))

    def finish(self, futures: Sequence[TaskFuture]) -> int:
        """Print failures' remote tracebacks and a summary; return the exit status."""
        self.console.close()
        for fut in futures:
            exc = None if fut.cancelled() else fut.exception()
            if exc is not None:
                cause = exc.__cause__
                tb = cause.tb if isinstance(cause, RemoteTraceback) else f"{type(exc).__name__}: {exc}\n"
                self.console.write(f"--- task {fut.task_id} ({fut.label}) failed on {fut.executor}:\n{tb}", self.err)
        ok = self.total - self.failed
        self.console.write(f"{ok}/{self.total} tasks succeeded in {time.monotonic() - self.started:.2f}s\n")
        if self.console.broken:
            raise BrokenPipeError("stdout was closed")
        return 0 if self.failed == 0 else 1


@contextlib.contextmanager
def _logging_through(console: Console) -> Iterator[None]:
    """Route log lines bound for stderr through ``console`` (so they never land on the
    progress line), restoring the handlers afterwards."""
    swapped = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is console.err:
            swapped.append((handler, handler.setStream(console.stream(console.err))))
    try:
        yield
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)


def run_and_report(client: Client, tasks: Sequence[Task], out: TextIO | None = None) -> int:
    """Submit ``tasks`` as a set, run IOTasks in this thread, print results; exit status.

    Raises KeyboardInterrupt (after leaving the terminal on a clean line) and BrokenPipeError
    (when stdout's reader went away) for the caller to abort the client.
    """
    console = Console(out)
    client.on_output = lambda fut, text: console.write(format_output(fut, text))
    with _logging_through(console):
        ts = client.submit_set(tasks)
        reporter = Reporter(len(ts), console=console)
        for fut in ts.futures:
            fut.add_done_callback(reporter)  # type: ignore[arg-type]
        try:
            client.run_foreground(until=lambda: ts.done() or console.broken, around=console.owned_by_task)
        except KeyboardInterrupt:
            console.interrupted()
            raise
        if console.broken:
            raise BrokenPipeError("stdout was closed")
        return reporter.finish(ts.futures)
