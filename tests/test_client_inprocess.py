"""The Client API over the in-process wiring of phase 2 (executor threads, no server process)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
from collections.abc import Iterator

import pytest

import taskcs
from taskcs import Task


@pytest.fixture
def client() -> Iterator[taskcs.Client]:
    c = taskcs.Client.in_process(executors=2)
    try:
        yield c
    finally:
        c.shutdown(cancel_futures=True)


def square(x: int) -> int:
    return x * x


def test_submit_by_name_reference_and_value(client: taskcs.Client) -> None:
    assert client.submit("add", 2, 3).result(5) == 5
    assert client.submit(square, 7).result(5) == 49
    offset = 10
    assert client.submit(lambda x: x + offset, 1).result(5) == 11
    assert client.submit(pow, 2, 8).result(5) == 256


def test_executor_names_show_which_thread_ran_the_task(client: taskcs.Client) -> None:
    futs = [client.submit("sleep", 0.02) for _ in range(6)]
    cf.wait(futs, timeout=5)
    assert {f.executor for f in futs} <= {"thread-1", "thread-2"}
    assert len({f.executor for f in futs}) == 2  # spread over both threads


def test_remote_exception_reraises_with_traceback_cause(client: taskcs.Client) -> None:
    with pytest.raises(RuntimeError, match="boom") as info:
        client.submit("fail", "boom").result(5)
    assert isinstance(info.value.__cause__, taskcs.RemoteTraceback)
    assert "in fail" in info.value.__cause__.tb


def test_bad_submissions_are_rejected_with_the_task_named(client: taskcs.Client) -> None:
    ok = client.submit("add", 1, 1)
    with pytest.raises(taskcs.SubmissionError, match="no_such_task"):
        client.submit("no_such_task", 1)
    with pytest.raises(taskcs.SubmissionError, match="add"):
        client.submit("add", 1)
    with pytest.raises(taskcs.SubmissionError, match="square"):
        client.submit(square, (x for x in range(3)))  # generators pickle neither way
    with pytest.raises(taskcs.SubmissionError, match="add"):
        client.submit_set([Task("echo", ("x",)), Task("add", (1, 2, 3))])
    assert ok.result(5) == 2  # nothing already submitted is lost


def test_map_with_chunks_and_timeout(client: taskcs.Client) -> None:
    assert list(client.map(square, range(50), chunksize=7)) == [x * x for x in range(50)]
    assert list(client.map(lambda a, b: a + b, [1, 2], [10, 20], chunksize=2)) == [11, 22]
    with pytest.raises(cf.TimeoutError):
        list(client.map(taskcs.client.client.REGISTRY["sleep"], [2.0], timeout=0.05))


def test_task_set_orders_and_completion(client: taskcs.Client) -> None:
    ts = client.submit_set([Task("sleep", (0.15,)), Task("add", (1, 2)), Task("fail", ("bad",))])
    first = next(iter(ts.as_completed(timeout=5)))
    assert first is not ts.futures[0]  # the fast tasks complete before the sleep
    values = ts.results(timeout=5, return_exceptions=True)
    assert values[1] == 3 and isinstance(values[2], RuntimeError) and values[0] > 0.1
    assert ts.counts() == {"pending": 0, "done": 2, "failed": 1, "cancelled": 0}
    with pytest.raises(RuntimeError, match="bad"):
        ts.results()


def test_futures_work_with_wait_as_completed_callbacks_and_asyncio(client: taskcs.Client) -> None:
    futs = [client.submit("sleep", 0.01 * i) for i in range(5)]
    assert len(list(cf.as_completed(futs, timeout=5))) == 5
    seen: list[int] = []
    done = threading.Event()
    fut = client.submit("add", 20, 22)
    fut.add_done_callback(lambda f: (seen.append(f.result()), done.set()))
    assert done.wait(5) and seen == [42]

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        a = await asyncio.wrap_future(client.submit("add", 1, 2))
        b = await loop.run_in_executor(client, square, 5)
        return a, b

    assert asyncio.run(main()) == (3, 25)


def test_cancel_pending_futures() -> None:
    with taskcs.Client.in_process(executors=1) as c:
        blocker = c.submit("sleep", 0.3)
        later = [c.submit("add", i, 0) for i in range(20)]
        cancelled = [f.cancel() for f in later[5:]]
        assert all(cancelled)
        assert all(f.cancelled() for f in later[5:])
        assert [f.result(5) for f in later[:5]] == [0, 1, 2, 3, 4]
        assert blocker.result(5) > 0.2


def test_shutdown_cancel_futures_and_closed_errors() -> None:
    c = taskcs.Client.in_process(executors=1)
    running = c.submit("sleep", 0.2)
    queued = [c.submit("sleep", 1) for _ in range(5)]
    c.shutdown(wait=True, cancel_futures=True)
    assert running.done()
    assert sum(f.cancelled() for f in queued) >= 4
    with pytest.raises(taskcs.ClosedError):
        c.submit("add", 1, 2)


def test_iotask_runs_on_the_foreground_thread(client: taskcs.Client, capsys: pytest.CaptureFixture[str]) -> None:
    fut = client.submit("print_line", "hello terminal")
    assert fut.result(5) == "hello terminal"
    assert fut.executor is not None and fut.executor.startswith("client-")
    assert "hello terminal" in capsys.readouterr().out


def test_iotask_without_foreground_fails_clearly() -> None:
    with taskcs.Client.in_process(executors=1, foreground=None) as c:
        with pytest.raises(taskcs.SubmissionError, match="foreground executor"):
            c.submit("print_line", "nowhere").result(5)
        assert c.submit("add", 1, 2).result(5) == 3


def test_user_io_task_decorator_and_task_option(client: taskcs.Client) -> None:
    @taskcs.io_task
    def where() -> str:
        return threading.current_thread().name

    assert client.submit(where).result(5) == "taskcs-foreground"
    fut = client.submit_task(Task(threading.current_thread, io=False, name="thread-name"))
    assert fut.label == "thread-name"


def test_phase1_client_is_the_only_executor() -> None:
    with taskcs.Client.in_process(executors=0, foreground="caller") as c:
        ts = c.submit_set([Task("add", (1, 2)), Task("multiply", (3, 4)), Task("print_line", ("p1",))])
        c.run_foreground(until=ts.done)
        assert ts.results() == [3, 12, "p1"]
        assert {f.executor for f in ts.futures} == {c.name}


RAN: list[int] = []


def record(i: int, pause: float = 0.0) -> int:
    time.sleep(pause)
    RAN.append(i)
    return i


def test_cancel_reaches_tasks_prefetched_by_an_executor() -> None:
    RAN.clear()
    with taskcs.Client.in_process(executors=1) as c:
        list(c.map(record, range(200)))  # measured tiny: the server now prefetches many of them
        RAN.clear()
        blocker = c.submit(record, -1, 0.3)  # same function, so it is prefetched like the rest
        later = [c.submit(record, i) for i in range(50)]
        server = c._owned[0]
        # Wait until the server has handed a batch to the executor (prefetch), then cancel.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            status = server.dispatcher.status()
            if status["stats"]["submitted"] == 251 and status["executors"][0]["in_flight"] > 10:
                break  # the executor holds the blocker and a prefetched batch behind it
            time.sleep(0.01)
        assert all(f.cancel() for f in later)
        assert blocker.result(5) == -1
        c.submit("add", 0, 0).result(5)  # a barrier: everything before it has been answered
        assert server.dispatcher.stats["cancelled"] == 50
    assert RAN == [-1]  # none of the cancelled tasks ran, though the executor held them
