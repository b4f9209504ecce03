"""taskcs: run sets of tasks concurrently, from threads to a local server to several machines.

The public API::

    Client          a concurrent.futures.Executor backed by a taskcs server (or threads)
    Task, TaskSet   describe a task / a submitted set of tasks
    TaskFuture      the future Client returns (a concurrent.futures.Future)
    io_task         mark a function as an IOTask (runs on the client's terminal)
    timeline        when and where recent tasks ran (TaskRecord each); see also Client.timeline
    TaskRecord      one task's record: submitted/started/finished, server, executor, status
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
    from .runtime.timeline import TaskRecord
    from .stdlib_tasks import io_task

# The client side loads on first use (PEP 562): cs-server and its executors import this
# package too, and pulling in the client made a server's start-up ~80 ms slower.
_LAZY = {
    "Client": ".client.client",
    "TaskFuture": ".client.taskset",
    "TaskSet": ".client.taskset",
    "Task": ".runtime.task",
    "io_task": ".stdlib_tasks",
    "TaskRecord": ".runtime.timeline",  # issue 11
}


def timeline(client: Client | None = None) -> list[TaskRecord]:
    """When and where recent tasks ran: ``client``'s (:meth:`Client.timeline`), or, without
    one, those of every client open in this process, in order of their start."""
    import sys

    if client is not None:
        return client.timeline()
    module = sys.modules.get(__name__ + ".client.client")  # no client was ever made: nothing ran
    if module is None:
        return []
    records = [r for c in list(module._live_clients) for r in c.timeline()]
    records.sort(key=lambda r: (r.started_ns or r.submitted_ns, r.task_id))
    return records


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
    "TaskRecord",
    "TaskSet",
    "TaskcsError",
    "io_task",
    "timeline",
]
__version__ = "0.1.0"
