"""Task, IOTask, result and task-set records shared by every phase.

A task is a reference to code plus inputs. On the wire the code is named by a *function
reference* string, one of::

    std:<name>                a task of the standard task library (taskcs.stdlib_tasks)
    ref:<module>:<qualname>   an importable Python callable, imported by the executor
    dill:<sha1 hex>           a callable sent by value (dill); the blob travels once per connection

and the inputs travel as one opaque payload (see :mod:`taskcs.runtime.codec`), so the
dispatcher never unpickles user data.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class TaskState(enum.Enum):
    """Where a task is in its life, as the dispatcher sees it."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Status(enum.IntEnum):
    """Outcome of a task carried in a result entry (one byte on the wire)."""

    OK = 0
    ERROR = 1
    CANCELLED = 2


#: Task flag bits carried on the wire.
FLAG_IO = 1

#: Retries after an executor dies mid-task, unless a task says otherwise. One retry
#: covers an unlucky executor crash; more would let a task that kills its process
#: take down executor after executor.
DEFAULT_RETRIES = 1


@dataclass(frozen=True, slots=True)
class Task:
    """A task as the user describes it: code, inputs and options.

    ``fn`` is a standard-library task name (``"add"``), a ``"module:function"`` string or a
    Python callable. ``io`` marks an IOTask (it needs the terminal of the submitting client);
    ``None`` means "as the function declares" (see :func:`taskcs.io_task`).

    ``retries`` (default :data:`DEFAULT_RETRIES`) is how often the task may run again after
    whatever ran it died mid-task: an executor, the server (the client resubmits), a peer
    server (the origin requeues it). ``retries=0`` means it never runs twice under taskcs's
    own rules; on a Ray engine it becomes ``max_retries``, but a Dask cluster may re-run a
    task by itself when its worker dies (Dask has no per-task knob for that).
    """

    fn: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    io: bool | None = None
    retries: int | None = None
    name: str | None = None

    def label(self) -> str:
        """A short human name for messages: the explicit name or the function's name."""
        if self.name:
            return self.name
        if isinstance(self.fn, str):
            return self.fn
        return getattr(self.fn, "__qualname__", None) or repr(self.fn)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A failure carried back to the client: the exception (if it pickled) and its traceback."""

    type_name: str
    message: str
    traceback: str
    exception: BaseException | None = None
