"""Client.map with a chunksize (issue 10): each chunk is one map_chunk task, submitted without
submit()'s second pickling, so what decides whether a chunk goes by value is looked at here:
objects of a module the executors cannot import must still reach them, on either path.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
import types
import uuid
from pathlib import Path
from typing import Any

import pytest

import taskcs
from tests.conftest import wait_until
from tests.test_direct_path import _leased

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(60)]


@pytest.fixture
def ghost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A module of the user's (a file) on no import path: an executor cannot import it."""
    name = f"ghost_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "hidden" / f"{name}.py"
    path.parent.mkdir()
    path.write_text("class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n\n"
                    "def triple(x):\n    return 3 * x\n")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # forgotten again at teardown
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "server"])
def test_chunks_holding_objects_of_an_unimportable_module_go_by_value(
    runtime_dir: Path, start_server: Any, ghost: types.ModuleType, direct: bool
) -> None:
    start_server(executors=2)
    points = [ghost.Point(i, 2 * i) for i in range(23)]  # a list: sliced, 23 = 7 chunks of 3 and 2
    with taskcs.Client(foreground=None, direct=direct) as client:
        if direct:
            _leased(client, 2)
        # The function goes by value (a lambda), and its pickle names this test's module: the
        # items must be looked at on their own, or the ghost's Points would go by reference.
        assert list(client.map(lambda p: p.x + p.y, points, chunksize=3)) == [3 * i for i in range(23)]
        # A function of the ghost's, by value too, over items that name nothing.
        assert list(client.map(ghost.triple, list(range(10)), chunksize=4)) == [3 * i for i in range(10)]
        # Chunks that are not lists (an iterator; tuples of two iterables) give the same.
        assert list(client.map(ghost.triple, iter(range(10)), chunksize=4)) == [3 * i for i in range(10)]
        assert list(client.map(pow, range(7), [2] * 7, chunksize=3)) == [i * i for i in range(7)]


def test_chunked_map_times_out_and_cancels_what_it_did_not_reach(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    with taskcs.Client(foreground=None) as client:
        _leased(client, 1)
        results = client.map(time.sleep, [0.4] * 6, chunksize=2, timeout=0.1)
        waiting = [fut for fut in client._futures.values()]  # the three chunks' futures
        assert len(waiting) == 3
        with pytest.raises(TimeoutError):
            next(results)
        # The two chunks waiting behind the first (one at a time: a new function's duration
        # is not known yet) were cancelled on the way out.
        assert [fut.cancelled() for fut in waiting[1:]] == [True, True]
        assert list(client.map(abs, [-1, -2, -3], chunksize=2)) == [1, 2, 3]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "server"])
def test_a_map_of_many_chunks_does_not_wait_for_another_threads_result(
    runtime_dir: Path, start_server: Any, direct: bool
) -> None:
    """map sends its chunks every SEND_EVERY as it submits them, taking the socket as a caller
    that waits for a result does; while another thread holds it, waiting for a long task,
    map must not wait for that thread (it sends what map submitted anyway)."""
    from taskcs.client.submission import SEND_EVERY

    start_server(executors=2)
    with taskcs.Client(foreground=None, direct=direct) as client:
        if direct:
            _leased(client, 2)
        slow = client.submit(time.sleep, 2.0)
        waiter = threading.Thread(target=slow.result, kwargs={"timeout": 30})
        waiter.start()
        try:
            wait_until(lambda: client._pumper == waiter.ident, what="the other thread to pump the socket")
            chunks = 4 * SEND_EVERY + 1
            results = client.map(abs, range(-2 * chunks, 0), chunksize=2)
            assert not slow.done()  # map did not wait for it (it would have, holding no socket)
            assert list(results) == list(range(2 * chunks, 0, -1))
        finally:
            waiter.join(timeout=30)


def test_a_map_of_many_chunks_in_process() -> None:
    """The sends between chunks work with executor threads too (phase 2: no server)."""
    from taskcs.client.submission import SEND_EVERY

    with taskcs.Client.in_process(executors=2, foreground=None) as client:
        n = 2 * (3 * SEND_EVERY + 5)  # chunks of 2: three sends while submitting
        assert list(client.map(abs, range(-n, 0), chunksize=2)) == list(range(n, 0, -1))
        assert list(client.map(abs, list(range(-n, 0)), chunksize=2)) == list(range(n, 0, -1))
