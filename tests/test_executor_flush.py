"""A quick task's result is sent before a slow task queued behind it on the same executor starts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

import taskcs

pytestmark = pytest.mark.multiprocess


def test_a_quick_result_does_not_wait_behind_a_slow_task(start_server: Callable[..., Any]) -> None:
    start_server(1)
    with taskcs.Client(foreground=None) as client:
        for _ in range(3):  # measure `add` as tiny, so the dispatcher prefetches behind it
            assert [f.result() for f in [client.submit("add", i, 1) for i in range(200)]] == list(range(1, 201))
        quick = [client.submit("add", i, 1) for i in range(20)]
        slow = client.submit("sleep", 3.0)
        started = time.monotonic()
        assert [f.result(timeout=2.0) for f in quick] == list(range(1, 21))  # not after the 3 s sleep
        assert time.monotonic() - started < 2.0
        assert not slow.done()
        assert slow.result(timeout=10) >= 3.0
