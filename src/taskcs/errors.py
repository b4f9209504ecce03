"""The taskcs exception tree.

One root, :class:`TaskcsError`, then a handful of precise meanings::

    TaskcsError
     +-- ProtocolError        a malformed or unexpected message
     +-- SubmissionError      a task was rejected before it ran (unknown name, wrong arity,
     |                        unserializable inputs); also a ValueError
     +-- ClosedError          you closed the client/server and then used it
     +-- BrokenError          a peer, server or executor died or vanished
     |    +-- ExecutorDiedError   the executor running a task died (carries the exit code)
     +-- TaskError            a task failed without raising a Python exception of its own
     +-- ServerStartError     no local server could be found or started
     +-- SecurityError        a CURVE key is missing, malformed or readable by others
"""

from __future__ import annotations


class TaskcsError(Exception):
    """Root of every error taskcs raises itself."""


class ProtocolError(TaskcsError):
    """A message was malformed, of an unknown version, or unexpected in this state."""


class SubmissionError(TaskcsError, ValueError):
    """A task was rejected at submission; nothing already submitted is affected."""


class ClosedError(TaskcsError, RuntimeError):
    """The client or server was closed by its owner and cannot take more work."""


class BrokenError(TaskcsError, RuntimeError):
    """A peer, the server or an executor died or vanished; work in flight may have failed."""


class ExecutorDiedError(BrokenError):
    """The executor running a task died; ``exit_code`` is its exit status when known."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.exit_code))


class TaskError(TaskcsError):
    """A task failed; raised when the original exception could not be carried back."""


class ServerStartError(TaskcsError, RuntimeError):
    """No local server was found and one could not be started."""


class SecurityError(TaskcsError):
    """A CURVE key is missing, malformed or unsafe (readable by others); says what to run."""


class RemoteTraceback(Exception):
    """Carries the traceback text of an exception raised on another executor.

    It is attached as ``__cause__`` of the re-raised exception, so the remote frames are
    printed under "The above exception was the direct cause of ...".
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'
