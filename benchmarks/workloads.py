"""The task functions every system runs: module-level, importable, free of dependencies.

They live here (not in ``__main__``) so that every system can pickle them by reference:
executors import ``benchmarks.workloads`` instead of receiving code by value.
"""

from __future__ import annotations

import time
from typing import Any


def inc(x: int) -> int:
    """The trivial task: x + 1."""
    return x + 1


def inc_chunk(fn: Any, chunk: list[Any]) -> list[Any]:
    """Apply ``fn`` to every item of ``chunk``: the chunking used where a system has no map."""
    return [fn(x) for x in chunk]


def burn(seconds: float) -> float:
    """Spin pure Python for ``seconds`` of this thread's CPU time; return the CPU time used.

    Measuring thread CPU time (not wall time) inside the task means a task that has to share
    a core, or the GIL, runs longer in wall time but reports the same useful work.
    """
    start = time.thread_time()
    deadline = start + seconds
    x = 0
    while True:
        for _ in range(2000):  # check the clock rarely: the loop, not the clock, is the work
            x += 1
        now = time.thread_time()
        if now >= deadline:
            return now - start


def echo_bytes(data: bytes) -> bytes:
    """Take a payload and return one of the same size (so it travels both ways)."""
    return data
