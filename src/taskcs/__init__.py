"""taskcs: run sets of tasks concurrently, from threads to a local server to several machines.

The public API::

    Client          a concurrent.futures.Executor backed by a taskcs server (or threads)
    Task, TaskSet   describe a task / a submitted set of tasks
    TaskFuture      the future Client returns (a concurrent.futures.Future)
    io_task         mark a function as an IOTask (runs on the client's terminal)
    errors          TaskcsError and its subclasses
"""

from __future__ import annotations

from .client.client import Client
from .client.taskset import TaskFuture, TaskSet
from .errors import (
    BrokenError,
    ClosedError,
    ExecutorDiedError,
    ProtocolError,
    RemoteTraceback,
    ServerStartError,
    SubmissionError,
    TaskcsError,
    TaskError,
)
from .runtime.task import Task
from .stdlib_tasks import io_task

__all__ = [
    "BrokenError",
    "Client",
    "ClosedError",
    "ExecutorDiedError",
    "ProtocolError",
    "RemoteTraceback",
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
