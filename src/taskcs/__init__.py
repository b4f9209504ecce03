"""taskcs: run sets of tasks concurrently, from threads to a local server to several machines.

The public API::

    Client          a concurrent.futures.Executor backed by a taskcs server (or threads)
    Task, TaskSet   describe a task / a submitted set of tasks
    TaskFuture      the future Client returns (a concurrent.futures.Future)
    io_task         mark a function as an IOTask (runs on the client's terminal)
    errors          TaskcsError and its subclasses
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    BrokenError,
    ClosedError,
    ExecutorDiedError,
    ProtocolError,
    RemoteTraceback,
    SecurityError,
    ServerStartError,
    SubmissionError,
    TaskcsError,
    TaskError,
)

if TYPE_CHECKING:
    from .client.client import Client
    from .client.taskset import TaskFuture, TaskSet
    from .runtime.task import Task
    from .stdlib_tasks import io_task

# The client side loads on first use (PEP 562): cs-server and its executors import this
# package too, and pulling in the client made a server's start-up ~80 ms slower.
_LAZY = {
    "Client": ".client.client",
    "TaskFuture": ".client.taskset",
    "TaskSet": ".client.taskset",
    "Task": ".runtime.task",
    "io_task": ".stdlib_tasks",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'taskcs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "BrokenError",
    "Client",
    "ClosedError",
    "ExecutorDiedError",
    "ProtocolError",
    "RemoteTraceback",
    "SecurityError",
    "ServerStartError",
    "SubmissionError",
    "Task",
    "TaskError",
    "TaskFuture",
    "TaskSet",
    "TaskcsError",
    "io_task",
]
__version__ = "0.1.0"
