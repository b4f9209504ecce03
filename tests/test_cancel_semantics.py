"""future.cancel() keeps the concurrent.futures meaning: True before the task runs, False once it runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

import taskcs
from tests.conftest import server_status, wait_until

pytestmark = pytest.mark.multiprocess


def test_cancel_is_false_once_running_and_true_while_queued(start_server: Callable[..., Any], runtime_dir: Any) -> None:
    start_server(1)
    with taskcs.Client(foreground=None) as client:
        running = client.submit("sleep", 1.0)
        queued = client.submit("sleep", 1.0)
        wait_until(lambda: any(ex["in_flight"] for ex in server_status(runtime_dir)["executors"] if not ex["stdio"]),
                   what="the first task to start")
        time.sleep(0.1)  # it is in time.sleep on the executor by now
        assert running.cancel() is False  # the executor said it had started
        assert not running.cancelled()
        assert queued.cancel() is True  # still on the server's queue
        assert queued.cancelled()
        assert running.result(timeout=10) >= 1.0  # it ran to its end: cancel() never stops a task
        assert running.cancel() is False  # done: as concurrent.futures
        done = client.submit("add", 1, 2)
        assert done.result(timeout=10) == 3 and done.cancel() is False


def test_in_process_cancel_of_a_running_task_is_false() -> None:
    with taskcs.Client.in_process(executors=1, foreground=None) as client:
        running = client.submit("sleep", 0.5)
        queued = client.submit("sleep", 0.5)
        time.sleep(0.2)
        assert running.cancel() is False
        assert queued.cancel() is True
        assert running.result(timeout=10) >= 0.5
