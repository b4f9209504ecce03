"""The standard task library: tasks addressed by name on the wire (``std:<name>``).

Every task is a module-level function with a one-line docstring. IOTasks (marked with
:func:`io_task`) need the terminal of the client that submitted them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: name -> function, for every standard task.
REGISTRY: dict[str, Callable[..., Any]] = {}


def io_task(fn: F) -> F:
    """Mark ``fn`` as an IOTask: it runs on the submitting client's foreground executor."""
    fn.__taskcs_io__ = True  # type: ignore[attr-defined]
    return fn


def _std(fn: F) -> F:
    fn.__taskcs_std__ = fn.__name__  # type: ignore[attr-defined]
    REGISTRY[fn.__name__] = fn
    return fn


def is_io(fn: Any) -> bool:
    """True if ``fn`` was marked as an IOTask."""
    return bool(getattr(fn, "__taskcs_io__", False))


@_std
def identity(value: Any) -> Any:
    """Return the input unchanged."""
    return value


@_std
def echo(*values: Any) -> str:
    """Return the inputs joined by spaces, as text."""
    return " ".join(str(v) for v in values)


@_std
def add(a: Any, b: Any) -> Any:
    """Return a + b."""
    return a + b


@_std
def multiply(a: Any, b: Any) -> Any:
    """Return a * b."""
    return a * b


@_std
def sum_list(values: list[Any]) -> Any:
    """Return the sum of a list of numbers."""
    return sum(values)


@_std
def sleep(seconds: float) -> float:
    """Sleep for ``seconds`` and return how long it actually slept."""
    start = time.monotonic()
    time.sleep(seconds)
    return time.monotonic() - start


@_std
def count_primes(n: int) -> int:
    """Count the primes below ``n`` by trial division (CPU-bound on purpose)."""
    count = 0
    for candidate in range(2, n):
        divisor = 2
        while divisor * divisor <= candidate:
            if candidate % divisor == 0:
                break
            divisor += 1
        else:
            count += 1
    return count


@_std
def burn(seconds: float) -> int:
    """Spin pure-Python arithmetic for about ``seconds`` of CPU time; return the loop count."""
    end = time.thread_time() + seconds
    loops = 0
    while time.thread_time() < end:
        for _ in range(1000):
            loops += 1
    return loops


@_std
def fail(message: str = "this task fails on purpose") -> None:
    """Raise RuntimeError(message)."""
    raise RuntimeError(message)


@_std
def exit_process(code: int = 13) -> None:
    """Kill the executor's process with ``os._exit(code)`` (for fault-injection tests)."""
    sys.stdout.flush()
    os._exit(code)


@_std
def print_text(text: str) -> str:
    """Print a line on the executor's stdout (a plain task: output is forwarded) and return it."""
    print(text, flush=True)
    return text


@_std
@io_task
def print_line(text: str) -> str:
    """Print a line on the client's terminal (IOTask) and return it."""
    print(text, flush=True)
    return text


@_std
@io_task
def prompt(question: str = "> ", default: str | None = None) -> str:
    """Ask the person at the client's terminal for one line (IOTask) and return it.

    With no line to read (stdin closed, as under CI or ``< /dev/null``) it returns
    ``default``, or fails with EOFError when there is none.
    """
    sys.stdout.write(question)
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:
        if default is None:
            raise EOFError("stdin closed before a line was read")
        print(f"{default} (stdin closed: the default)", flush=True)
        return default
    return line.rstrip("\n")


@_std
def read_text(path: str) -> str:
    """Return the text of the file at ``path`` (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return f.read()


@_std
def write_text(path: str, text: str) -> int:
    """Write ``text`` to the file at ``path`` (UTF-8); return the number of characters."""
    with open(path, "w", encoding="utf-8") as f:
        return f.write(text)


@_std
def pid() -> int:
    """Return the executor's process id."""
    return os.getpid()


@_std
def payload(data: bytes) -> bytes:
    """Return the bytes unchanged (for payload-size benchmarks)."""
    return data


_chunk_fns: dict[bytes, Callable[..., Any]] = {}


@_std
def map_chunk(fn: Any, items: list[Any], star: bool = True) -> list[Any]:
    """Apply ``fn`` to each item of a chunk, unpacking argument tuples if ``star`` (Client.map)."""
    if isinstance(fn, bytes):  # code sent by value: unpickle it once per executor
        cached = _chunk_fns.get(fn)
        if cached is None:
            from ..runtime.codec import loads

            if len(_chunk_fns) > 256:
                _chunk_fns.clear()
            cached = _chunk_fns[fn] = loads(fn)
        fn = cached
    if star:
        return [fn(*args) for args in items]
    return [fn(item) for item in items]
