"""future.cancel() keeps the concurrent.futures meaning: True before the task runs, False once it runs."""

from __future__ import annotations

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
                   what="the first task to be handed to the executor")
        assert running.cancel() is False  # the first of its executor's slots: the server says it runs
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
        server = client._owned[0]
        wait_until(lambda: server.dispatcher.status()["executors"][0]["in_flight"] == 1,
                   what="the first task on the executor thread")
        assert running.cancel() is False
        assert queued.cancel() is True
        assert running.result(timeout=10) >= 0.5
