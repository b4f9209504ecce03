"""Task files: a task set written as JSON or TOML, for ``cs-client`` and ``cs-demo --tasks``.

JSON::

    {"tasks": [
        {"task": "add", "args": [1, 2]},
        {"task": "prompt", "args": ["Your name? "]},
        {"task": "mypackage.module:function", "args": [3], "kwargs": {"scale": 2},
         "name": "scaled", "retries": 2, "io": false}
    ]}

TOML (``.toml``)::

    [[tasks]]
    task = "add"
    args = [1, 2]

``task`` is a standard task name (``cs-demo --list``) or ``module:function`` for your own code
(importable from the directory you run the client in). ``args``, ``kwargs``, ``name``,
``retries`` and ``io`` are optional. A bare JSON list of task objects is accepted too.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from ..errors import SubmissionError
from ..runtime.task import Task

_KEYS = {"task", "args", "kwargs", "name", "retries", "io"}


def load_tasks(path: str | Path) -> list[Task]:
    """Read a task file; raise SubmissionError naming the file and entry on any mistake.

    ``module:function`` references resolve from the current directory, as with ``python -m``
    (a console script's own sys.path[0] is its bin directory, not where the user stands).
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise SubmissionError(f"{path}: cannot read task file: {exc}") from exc
    entries = data.get("tasks") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise SubmissionError(f"{path}: expected a non-empty list of tasks under 'tasks'")
    return [_task(path, i, entry) for i, entry in enumerate(entries, 1)]


def _task(path: Path, index: int, entry: Any) -> Task:
    where = f"{path}: task #{index}"
    if not isinstance(entry, dict) or not isinstance(entry.get("task"), str):
        raise SubmissionError(f"{where}: each task needs a 'task' name")
    unknown = set(entry) - _KEYS
    if unknown:
        raise SubmissionError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(_KEYS)})")
    args = entry.get("args", [])
    kwargs = entry.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise SubmissionError(f"{where}: 'args' must be a list and 'kwargs' a table/object")
    return Task(entry["task"], tuple(args), kwargs, entry.get("io"), entry.get("retries"), entry.get("name"))


def parse_cli_task(name: str, raw_args: list[str]) -> Task:
    """The quick command-line form: ``add 1 2``; each argument is JSON if it parses, else text."""
    args = []
    for raw in raw_args:
        try:
            args.append(json.loads(raw))
        except ValueError:
            args.append(raw)
    return Task(name, tuple(args))


def check_tasks(tasks: list[Task]) -> None:
    """Reject unknown task names, unimportable modules and wrong arity before connecting,
    so a bad task file never starts a server; raises SubmissionError naming the task."""
    import inspect

    from ..runtime import codec
    from ..stdlib_tasks import REGISTRY

    for task in tasks:
        ref, _ = codec.function_ref(task.fn)
        fn = REGISTRY[ref[4:]] if ref.startswith("std:") else codec.resolve_import(*ref[4:].split(":", 1))
        try:
            inspect.signature(fn).bind(*task.args, **task.kwargs)
        except TypeError as exc:
            raise SubmissionError(f"task {task.label()}: wrong arguments: {exc}") from None
        except ValueError:
            pass  # no signature to check against (some builtins): the executor will judge
