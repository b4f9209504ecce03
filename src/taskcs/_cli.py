"""What every console entry point (cs-server, cs-client, cs-demo) shares: a closed pipe.

``cs-server status | head -3`` closes the pipe after three lines; Python ignores SIGPIPE, so
the next write raises BrokenPipeError and, unhandled, ended the command with a traceback. As
the CPython documentation of ``signal`` recommends, the entry point catches it, points stdout
at /dev/null (so the interpreter's own flush at exit cannot fail again) and exits with 141,
the status a shell reports for a process killed by SIGPIPE, as ``yes | head`` does.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

#: 128 + SIGPIPE: what a tool killed by a closed pipe exits with.
EXIT_BROKEN_PIPE = 141

F = TypeVar("F", bound=Callable[..., int])


def silence_stdout() -> None:
    """Point stdout's file descriptor at /dev/null (after its reader went away)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def entry_point(main: F) -> F:
    """Decorate a console entry point: a closed stdout ends it quietly with status 141."""

    @functools.wraps(main)
    def run(*args: object, **kwargs: object) -> int:
        try:
            code = main(*args, **kwargs)
            sys.stdout.flush()  # output still buffered must fail here, not at interpreter exit
            return code
        except BrokenPipeError:
            silence_stdout()
            return EXIT_BROKEN_PIPE

    return run  # type: ignore[return-value]
