"""The person's terminal, shared by result lines, forwarded output, log lines and a progress line.

Data flow::

    I/O thread: results, forwarded output --write()-->  Console --> stdout / stderr
    logging (StreamHandler on stderr)      --write()-->     |       (erase the progress line,
    reporter --progress("[3/6] ...")---------------------->  |        write, draw it again)
    foreground executor: with console.owned_by_task():  hold every write until the task ends

Three rules keep the screen readable (issue #9, item 4): the progress line (on stderr, only
when it is a terminal) is erased before anything else is written, so nothing is appended to
it; while a foreground task (an IOTask) owns the terminal, the progress line stays away and
other writes wait, so a prompt such as "What is your name? " stays visible; after Ctrl-C the
cursor is left at the start of a clean line. A closed stdout (``| head``) sets ``broken`` and
points stdout at /dev/null, so no thread raises BrokenPipeError and the caller can stop.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

from .._cli import silence_stdout

_ERASE = "\r\033[K"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Console:
    """Serialises everything written to ``out`` and ``err`` around a progress line."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.progress_enabled = _isatty(self.err)
        self.broken = False  # stdout's reader went away
        self._status = ""
        self._shown = False  # the progress line is on the screen now
        self._held: list[tuple[TextIO, str]] | None = None  # writes waiting for a foreground task
        self._closed = False  # no more progress line (finished or interrupted)
        self._lock = threading.RLock()

    def write(self, text: str, stream: TextIO | None = None) -> None:
        """Write ``text`` (whole lines) to ``stream`` (stdout by default), clear of the progress line."""
        with self._lock:
            target = stream or self.out
            if self._held is not None:
                self._held.append((target, text))
                return
            self._put(target, text)
            self._draw()

    def progress(self, text: str) -> None:
        """Show ``text`` as the progress line (a terminal only), replacing the previous one."""
        with self._lock:
            self._status = text
            if self._held is None:
                self._draw()

    @contextlib.contextmanager
    def owned_by_task(self) -> Iterator[None]:
        """While the block runs, a task owns the terminal: no progress line, other writes wait."""
        with self._lock:
            self._erase()
            self._held = []
        try:
            yield
        except BaseException:  # Ctrl-C inside the task (at a prompt?): its line is unfinished
            self.interrupted()
            raise
        with self._lock:
            self._release()
            self._draw()

    def interrupted(self) -> None:
        """Ctrl-C: leave the cursor at the start of a clean line, and no progress line after."""
        with self._lock:
            self._closed = True
            if self._held is not None:  # a task had the terminal: its line may be unfinished
                self._put(self.err, "\n")
                self._release()
            self._erase()

    def close(self) -> None:
        """Erase the progress line for good; later writes go out plainly."""
        with self._lock:
            self._closed = True
            self._release()
            self._erase()

    def stream(self, target: TextIO) -> _ConsoleStream:
        """A file-like object whose writes go through this console to ``target`` (for logging)."""
        return _ConsoleStream(self, target)

    # ----------------------------------------------------------------- internals
    def _release(self) -> None:
        held, self._held = self._held, None
        for target, text in held or ():
            self._put(target, text)

    def _put(self, target: TextIO, text: str) -> None:
        self._erase()
        try:
            target.write(text)
            target.flush()
        except BrokenPipeError:
            self._pipe_closed(target)
        except ValueError:  # closed at interpreter exit: nothing left to show it to
            pass

    # _shown is True whenever the line may be on screen (set before drawing, cleared after
    # erasing): a KeyboardInterrupt between the write and the flag's change then costs an
    # extra erase at worst, never a progress line that interrupted() thinks is not there.
    def _erase(self) -> None:
        if self._shown:
            self._put_err(_ERASE)
            self._shown = False

    def _draw(self) -> None:
        if self.progress_enabled and self._status and not self._closed and self._held is None:
            self._shown = True
            self._put_err(_ERASE + self._status)

    def _put_err(self, text: str) -> None:
        try:
            self.err.write(text)
            self.err.flush()
        except (BrokenPipeError, ValueError):
            self.progress_enabled = False

    def _pipe_closed(self, target: TextIO) -> None:
        if target is self.out:
            self.broken = True
            silence_stdout()
            with contextlib.suppress(BrokenPipeError, ValueError):
                target.flush()  # what was buffered now goes to /dev/null
        else:
            self.progress_enabled = False


class _ConsoleStream:
    """Adapts :class:`Console` to the ``write``/``flush`` a logging handler expects."""

    def __init__(self, console: Console, target: TextIO) -> None:
        self.console = console
        self.target = target

    def write(self, text: str) -> int:
        self.console.write(text, self.target)
        return len(text)

    def flush(self) -> None:
        """Every write is flushed already."""
