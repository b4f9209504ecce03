"""Phase 3 end to end: the Client API against a real cs-server and its executor processes.

Code travels three ways and each is exercised here: standard tasks by name, importable
functions by reference (even from a module only the client can see), and lambdas/closures
by value. Each test has its own runtime directory and a small server (1-2 executors).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import importlib
import os
import sys
import threading
import time
import types
import uuid
from pathlib import Path
from typing import Any

import pytest

from taskcs import Client as _Client
from taskcs import ClosedError, RemoteTraceback, SubmissionError, Task, io_task
from tests.conftest import server_status, wait_until

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(30)]


def Client(**kwargs: Any) -> _Client:
    """A client without a foreground thread unless a test asks for one."""
    kwargs.setdefault("foreground", None)
    return _Client(**kwargs)


def _status_when(directory: Path, predicate: Any, what: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        status = server_status(directory)
        return status if predicate(status) else None

    return wait_until(probe, what=what)


def _running(status: dict[str, Any]) -> int:
    return sum(ex["in_flight"] for ex in status["executors"] if not ex["stdio"])


# --------------------------------------------------------------------------- code transport
def test_lambdas_and_closures_run_on_executor_processes(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    offset = 100

    def add_offset(x: int) -> int:  # a closure over a local
        return x + offset

    with Client() as client:
        assert client.submit(lambda x, y: x * y, 6, 7).result(timeout=10) == 42
        assert [client.submit(add_offset, i).result(timeout=10) for i in range(3)] == [100, 101, 102]
        pid = client.submit(lambda: os.getpid()).result(timeout=10)
        assert pid not in (os.getpid(), client.server_pid)


def test_function_from_a_module_only_on_the_clients_path(
    runtime_dir: Path, start_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_server(executors=1)  # started with cwd=/ : it cannot see tmp_path
    name = f"usermod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import os\n\n"
        "class Point:\n"
        "    def __init__(self, x, y):\n"
        "        self.x, self.y = x, y\n\n"
        "def scale(point, k):\n"
        "    return Point(point.x * k, point.y * k), os.getpid()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    monkeypatch.setitem(sys.modules, name, module)  # forgotten again at teardown
    with Client() as client:
        # First (before any task has taught the executor the path): map sends the function
        # inside a standard map_chunk task, so the client's path must travel with it too.
        mapped = list(client.map(module.scale, [module.Point(i, i) for i in range(5)], [2] * 5, chunksize=2))
        assert [p.x for p, _ in mapped] == [0, 2, 4, 6, 8]
        point, pid = client.submit(module.scale, module.Point(1, 2), 3).result(timeout=10)
    assert isinstance(point, module.Point) and (point.x, point.y) == (3, 6)
    assert pid != os.getpid()


def test_module_missing_on_the_executor_is_named_in_the_error(
    runtime_dir: Path, start_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_server(executors=1)
    name = f"ghost_{uuid.uuid4().hex[:8]}"
    ghost = types.ModuleType(name)  # exists only in this process's memory
    exec("def answer():\n    return 42\n", ghost.__dict__)
    monkeypatch.setitem(sys.modules, name, ghost)
    with Client() as client:
        fut = client.submit(ghost.answer)
        with pytest.raises(ModuleNotFoundError, match=name) as info:
            fut.result(timeout=10)
        assert "cannot be imported on executor" in str(info.value)
        # a reference by name is checked at submission, before anything is sent
        with pytest.raises(SubmissionError, match="no_such_module_xyz"):
            client.submit("no_such_module_xyz:run")
        assert client.submit("add", 1, 2).result(timeout=10) == 3


def test_remote_exception_reraises_with_the_remote_traceback_as_cause(
    runtime_dir: Path, start_server: Any
) -> None:
    start_server(executors=1)

    def explode(n: int) -> None:
        raise ValueError(f"bad value {n}")

    with Client() as client:
        with pytest.raises(ValueError, match="bad value 3") as info:
            client.submit(explode, 3).result(timeout=10)
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "in explode" in cause.tb and 'raise ValueError(f"bad value {n}")' in cause.tb
        with pytest.raises(RuntimeError, match="on purpose") as info2:
            client.submit("fail").result(timeout=10)
        assert isinstance(info2.value.__cause__, RemoteTraceback)
        assert "stdlib_tasks" in info2.value.__cause__.tb


# ------------------------------------------------------------------------ futures semantics
def test_map_with_chunksize_and_timeout(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=2)
    with Client() as client:
        assert list(client.map(lambda x: x * x, range(50), chunksize=7)) == [x * x for x in range(50)]
        assert list(client.map(pow, range(10), [2] * 10, chunksize=3)) == [x**2 for x in range(10)]
        assert list(client.map(str, [], chunksize=4)) == []
        with pytest.raises(ValueError):
            client.map(str, [1], chunksize=0)
        results = client.map(time.sleep, [1.0], timeout=0.1)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            next(results)
        assert time.monotonic() - started < 0.9


def test_map_with_a_standard_task_name_and_chunksize(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    with Client() as client:
        assert list(client.map("add", range(5), range(5))) == [0, 2, 4, 6, 8]  # chunksize 1 works
        assert list(client.map("add", range(5), range(5), chunksize=2)) == [0, 2, 4, 6, 8]


def test_cancel_pending_futures(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    with Client() as client:
        futs = [client.submit("sleep", 0.3) for _ in range(6)]
        _status_when(runtime_dir, lambda s: s["stats"]["submitted"] == 6 and _running(s) == 1,
                     "all six tasks at the server, one running")
        assert all(f.cancel() for f in futs[2:])
        assert futs[0].result(timeout=10) >= 0.3
        assert futs[1].result(timeout=10) >= 0.3
        assert all(f.cancelled() for f in futs[2:])
        with pytest.raises(cf.CancelledError):
            futs[-1].result(timeout=0)
        status = _status_when(runtime_dir, lambda s: s["stats"]["cancelled"] == 4, "the server to count 4 cancels")
        assert status["stats"]["done"] == 2


def test_shutdown_with_cancel_futures(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    client = Client()
    futs = [client.submit("sleep", 0.4) for _ in range(6)]
    _status_when(runtime_dir, lambda s: s["stats"]["submitted"] == 6 and _running(s) >= 1, "a task running")
    started = time.monotonic()
    client.shutdown(wait=True, cancel_futures=True)
    # only what the executor already holds (the running task and its prefetch) still runs
    assert time.monotonic() - started < 6 * 0.4 - 0.4
    assert all(f.cancelled() for f in futs)
    with pytest.raises(ClosedError):
        client.submit("add", 1, 2)
    status = _status_when(runtime_dir, lambda s: not s["clients"] and not s["queued"], "the client gone")
    stats = status["stats"]
    assert stats["cancelled"] >= 3 and stats["cancelled"] + stats["done"] == 6, stats


def test_many_concurrent_clients(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=2)

    def one_client(k: int) -> list[int]:
        with Client(name=f"client-{k}") as client:
            futs = [client.submit("add", i, k) for i in range(200)]
            return [f.result(timeout=30) for f in futs]

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one_client, range(8)))
    assert results == [[i + k for i in range(200)] for k in range(8)]
    assert server_status(runtime_dir)["stats"]["done"] == 1600


def test_client_works_with_asyncio_and_as_completed(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    with Client() as client:
        futs = [client.submit("multiply", i, 2) for i in range(5)]
        assert sorted(f.result() for f in cf.as_completed(futs, timeout=10)) == [0, 2, 4, 6, 8]

        async def main() -> list[int]:
            loop = asyncio.get_running_loop()
            wrapped = asyncio.wrap_future(client.submit("add", 1, 1))
            via_loop = loop.run_in_executor(client, pow, 2, 10)
            return list(await asyncio.wait_for(asyncio.gather(wrapped, via_loop), timeout=10))

        assert asyncio.run(main()) == [2, 1024]


def test_task_set_results_and_server_counts(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=2)
    with Client() as client:
        ts = client.submit_set([Task("add", (1, 2)), ("multiply", 3, 4), Task("fail", ("nope",), name="broken")])
        assert ts.wait(timeout=10)
        values = ts.results(return_exceptions=True)
        assert values[:2] == [3, 12] and isinstance(values[2], RuntimeError)
        assert ts.counts() == {"pending": 0, "done": 2, "failed": 1, "cancelled": 0}
        wait_until(lambda: ts.server_counts == (2, 1, 0), what="SET_DONE from the server")
        # a bad task rejects its whole set before anything is sent
        with pytest.raises(SubmissionError, match="nope_not_a_task"):
            client.submit_set([Task("add", (1, 2)), Task("nope_not_a_task")])


# --------------------------------------------------------------------- IOTasks and output
def test_iotask_runs_in_the_submitting_client_process(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)

    @io_task
    def where() -> int:
        return os.getpid()

    with Client(foreground="thread") as client:
        fut = client.submit(where)
        assert fut.result(timeout=10) == os.getpid()
        assert fut.executor == client.name
        plain = client.submit(lambda: os.getpid())
        assert plain.result(timeout=10) != os.getpid()


def test_iotask_without_a_foreground_executor_fails(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    with Client(foreground=None) as client:
        exc = client.submit("print_line", "hi").exception(timeout=10)
    assert exc is not None


def test_output_printed_on_an_executor_is_forwarded(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    seen: list[tuple[Any, str]] = []
    lock = threading.Lock()

    def on_output(fut: Any, text: str) -> None:
        with lock:
            seen.append((fut, text))

    with Client(on_output=on_output) as client:
        fut = client.submit("print_text", "hello there")
        assert fut.result(timeout=10) == "hello there"
        wait_until(lambda: seen, what="forwarded output")
    assert [(f, text.strip()) for f, text in seen] == [(fut, "hello there")]

    quiet: list[str] = []
    with Client(forward_output=False, on_output=lambda f, t: quiet.append(t)) as client:
        assert client.submit("print_text", "shh").result(timeout=10) == "shh"
        assert client.submit("add", 1, 1).result(timeout=10) == 2  # the output would have come first
    assert quiet == []


def test_threads_waiting_on_one_client_each_get_their_own_results(runtime_dir: Path, start_server: Any) -> None:
    # Each result() may pump the client's socket itself (Client._pump_until): callers take
    # turns, and a result received by one caller completes another caller's future.
    start_server(executors=2)
    with Client() as client:

        def round_trips(k: int) -> list[int]:
            return [client.submit("add", i, k).result(timeout=30) for i in range(60)]

        with cf.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(round_trips, range(6)))
        assert results == [[i + k for i in range(60)] for k in range(6)]


def test_futures_nobody_calls_result_on_still_complete(runtime_dir: Path, start_server: Any) -> None:
    # Right after a caller pumped, the I/O thread keeps off the socket for a moment; it must
    # come back on its own for results that only callbacks and cf.wait are waiting for.
    start_server(executors=1)
    with Client() as client:
        assert client.submit("add", 1, 1).result(timeout=10) == 2  # a caller pumped just now
        seen: list[int] = []
        fut = client.submit("add", 2, 2)
        fut.add_done_callback(lambda f: seen.append(f.result()))
        done, _ = cf.wait([fut], timeout=10)
        assert done == {fut}
        wait_until(lambda: seen == [4], what="the done callback")


def test_result_timeout_while_pumping_and_a_later_result(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    with Client() as client:
        slow = client.submit("sleep", 0.5)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            slow.result(timeout=0.1)
        assert time.monotonic() - started < 0.45
        assert slow.result(timeout=10) >= 0.5
        assert client.submit("add", 3, 4).result(timeout=10) == 7


def test_big_payloads_in_and_out_mixed_with_small_ones(runtime_dir: Path, start_server: Any) -> None:
    # Payloads of 64 KiB and more travel as ZeroMQ frames of their own (protocol.to_frames).
    import operator

    start_server(executors=2)
    big = os.urandom(3 << 20)
    with Client() as client:
        futs = [client.submit(operator.add, big if i % 3 == 0 else b"s", bytes([i])) for i in range(12)]
        got = [f.result(timeout=30) for f in futs]
    assert got == [(big if i % 3 == 0 else b"s") + bytes([i]) for i in range(12)]
