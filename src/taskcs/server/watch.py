"""``cs-server status --watch``: redraw a text frame every few seconds, like ``top``.

On a terminal each frame overwrites the last in place (cursor home, every line cleared to its
end, the rest of the screen cleared: no flicker, and the last frame stays on screen after
Ctrl-C). Piped, frames follow each other separated by a blank line, so a log of them reads
as a sequence of snapshots. Ctrl-C ends it with exit code 0 and no traceback.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Callable
from typing import TextIO

from ..errors import TaskcsError

_HOME = "\x1b[H"
_CLEAR_LINE = "\x1b[K"
_CLEAR_BELOW = "\x1b[J"


def watch(frame: Callable[[], int], interval: float, out: TextIO | None = None) -> int:
    """Call ``frame()`` (which prints one frame, returns an exit code) every ``interval`` s.

    Returns 0 on Ctrl-C, or the first non-zero code of a frame (the server went away, say).
    """
    out = out or sys.stdout
    tty = out.isatty()
    if tty:
        out.write(_HOME + "\x1b[2J")
    try:
        while True:
            buffer = io.StringIO()
            try:
                with contextlib.redirect_stdout(buffer):
                    code = frame()
            except TaskcsError as exc:
                code = 1
                buffer.write(f"cs-server: {exc}\n")
            text = buffer.getvalue()
            if code:
                out.write(("\n" if tty else "") + text)  # below the last frame, which stays
                out.flush()
                return code
            if tty:
                header = f"every {interval:g}s, Ctrl-C to quit    {time.strftime('%H:%M:%S')}\n"
                lines = (header + text).splitlines()
                out.write(_HOME + "".join(line + _CLEAR_LINE + "\n" for line in lines) + _CLEAR_BELOW)
            else:
                out.write(text + "\n")
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):
            out.flush()
        return 0
