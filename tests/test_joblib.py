"""The joblib backend "taskcs" against a real phase-3 server, and scikit-learn on it (#13 part 3)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import server_status, wait_until

joblib = pytest.importorskip("joblib")
pytest.importorskip("sklearn")

import numpy as np  # noqa: E402
from joblib import Parallel, delayed, parallel_config  # noqa: E402
from sklearn.base import BaseEstimator, ClassifierMixin  # noqa: E402
from sklearn.datasets import load_iris  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.svm import SVC  # noqa: E402

import taskcs  # noqa: E402
import taskcs.joblib  # noqa: E402  registers the backend

pytestmark = pytest.mark.multiprocess


def square(x: int) -> int:
    return x * x


def fail_at(i: int, bad: int, go: str, wait_max: float = 30.0) -> int:
    """Fails at ``bad``; every other call waits for the file ``go`` (so it cannot finish first)."""
    if i == bad:
        raise KeyError(f"call {i} failed")
    deadline = time.monotonic() + wait_max
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return i


class FailingClassifier(ClassifierMixin, BaseEstimator):
    """A classifier of this (user) module whose fit fails when asked to."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def fit(self, X: Any, y: Any) -> FailingClassifier:
        if self.fail:
            raise ValueError("this fit was told to fail")
        self.classes_ = np.unique(y)
        self.majority_ = np.bincount(y).argmax()
        return self

    def predict(self, X: Any) -> Any:
        return np.full(len(X), self.majority_)


@pytest.fixture
def server(start_server: Any) -> Any:
    return start_server(executors=2)


def test_parallel_gives_the_sequential_results_with_auto_batching(server: Any) -> None:
    with parallel_config(backend="taskcs", n_jobs=-1):
        got = Parallel()(delayed(square)(i) for i in range(3000))
    assert got == [i * i for i in range(3000)]


def test_batches_of_trivial_calls_stay_small_enough_to_die_young(server: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    submit = taskcs.joblib.TaskcsBackend.submit

    def recording_submit(self: Any, func: Any, callback: Any = None) -> Any:
        sizes.append(len(func))
        return submit(self, func, callback)

    monkeypatch.setattr(taskcs.joblib.TaskcsBackend, "submit", recording_submit)
    with parallel_config(backend="taskcs", n_jobs=2):
        assert Parallel()(delayed(square)(i) for i in range(20_000)) == [i * i for i in range(20_000)]
    # joblib alone grows them past 1,000 calls here (taskcs.joblib.MAX_BATCH_CALLS says why not)
    assert sum(sizes) == 20_000 and max(sizes) == taskcs.joblib.MAX_BATCH_CALLS == 256, sizes


def test_the_batch_cap_keeps_joblibs_own_sizing_below_it() -> None:
    backend = taskcs.joblib.TaskcsBackend()
    backend.parallel = type("P", (), {"verbose": 0})()
    cap = taskcs.joblib.MAX_BATCH_CALLS
    backend._effective_batch_size, backend._smoothed_batch_duration = cap - 1, 0.001  # too fast: grow
    assert backend.compute_batch_size() == cap and backend._effective_batch_size == cap
    backend.batch_completed(cap, 10.0)  # a batch of that size took 10 s: joblib shrinks it
    assert backend.compute_batch_size() == 2 * int(cap * 0.2 / 10.0)


def test_lambda_and_closure_of_the_caller_run_remotely(server: Any) -> None:
    offset = 7
    with parallel_config(backend="taskcs", n_jobs=2):
        got = Parallel()(delayed(lambda x: x + offset)(i) for i in range(50))
    assert got == [i + 7 for i in range(50)]


def test_n_jobs_minus_one_is_the_servers_capacity(start_server: Any) -> None:
    start_server(executors=3)
    with parallel_config(backend="taskcs"):
        assert joblib.effective_n_jobs(-1) == 3
        assert joblib.effective_n_jobs(-2) == 2
        assert joblib.effective_n_jobs(None) == 3  # the backend's default: the whole server
        assert joblib.effective_n_jobs(5) == 5


def test_the_callers_function_travels_once_for_every_batch(server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from taskcs.runtime import protocol as p

    def tagged(x: int, tag: str = "joblib-code-marker-51c") -> int:  # a local function: by value
        return x + 1

    conn = taskcs.joblib._client(None)._conn  # the client every Parallel call here shares
    sent: list[tuple[int, int]] = []  # per SUBMIT: (blobs carrying the code, payloads carrying it)
    send = conn.send

    def recording_send(msg: Any) -> Any:
        if isinstance(msg, p.Submit):
            sent.append((sum(b"joblib-code-marker-51c" in b for b in msg.blobs.values()),
                         sum(b"joblib-code-marker-51c" in t[2] for t in msg.tasks)))
        return send(msg)

    monkeypatch.setattr(conn, "send", recording_send)
    with parallel_config(backend="taskcs", n_jobs=2):
        got = Parallel(batch_size=25)(delayed(tagged)(i) for i in range(500))
    assert got == [i + 1 for i in range(500)]
    assert sum(n for n, _ in sent) == 1 and sum(n for _, n in sent) == 0, sent  # 20 batches, code once


def test_return_as_generators_stream(server: Any) -> None:
    with parallel_config(backend="taskcs", n_jobs=2):
        ordered = Parallel(return_as="generator")(delayed(square)(i) for i in range(200))
        assert not isinstance(ordered, list)
        assert list(ordered) == [i * i for i in range(200)]
        unordered = Parallel(return_as="generator_unordered")(delayed(square)(i) for i in range(200))
        assert sorted(unordered) == [i * i for i in range(200)]


def test_an_exception_aborts_the_rest_and_reraises_with_the_remote_traceback(
    server: Any, runtime_dir: Path, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    n = 100
    with parallel_config(backend="taskcs", n_jobs=2), pytest.raises(KeyError, match="call 0 failed") as info:
        Parallel(batch_size=1, pre_dispatch="all")(delayed(fail_at)(i, 0, str(go)) for i in range(n))
    cause = info.value.__cause__
    assert isinstance(cause, taskcs.RemoteTraceback) and "fail_at" in cause.tb
    # all but the failed one were cancelled: the queued ones before they ran, and the (at most
    # two) running ones interrupted on their executors, without the file that would end them
    wait_until(lambda: server_status(runtime_dir)["stats"]["cancelled"] >= n - 1, what="the rest to be cancelled")
    wait_until(lambda: not any(ex["in_flight"] for ex in server_status(runtime_dir)["executors"]),
               timeout=15, what="the running calls to be interrupted")
    go.touch()


def test_grid_search_gives_the_sequential_results(server: Any) -> None:
    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1.0, 10.0], "gamma": ["scale", 0.1]}
    sequential = GridSearchCV(SVC(), grid, cv=3, n_jobs=1).fit(X, y)
    with parallel_config(backend="taskcs", n_jobs=-1):
        remote = GridSearchCV(SVC(), grid, cv=3).fit(X, y)
    assert remote.best_params_ == sequential.best_params_
    np.testing.assert_array_equal(remote.cv_results_["mean_test_score"], sequential.cv_results_["mean_test_score"])
    assert remote.score(X, y) == sequential.score(X, y)


def test_cross_val_score_gives_the_sequential_results(server: Any) -> None:
    X, y = load_iris(return_X_y=True)
    sequential = cross_val_score(SVC(C=0.5), X, y, cv=5, n_jobs=1)
    with parallel_config(backend="taskcs"):
        remote = cross_val_score(SVC(C=0.5), X, y, cv=5, n_jobs=-1)
    np.testing.assert_array_equal(remote, sequential)


def test_a_failing_fit_aborts_the_search_with_the_tasks_exception(server: Any) -> None:
    X, y = load_iris(return_X_y=True)
    search = GridSearchCV(FailingClassifier(), {"fail": [False, True]}, cv=3, error_score="raise")
    with parallel_config(backend="taskcs", n_jobs=-1), pytest.raises(ValueError, match="told to fail") as info:
        search.fit(X, y)
    assert isinstance(info.value.__cause__, taskcs.RemoteTraceback)
    assert "in fit" in info.value.__cause__.tb


def inner_sum(n: int) -> int:
    """A task that runs its own Parallel: joblib gives it the backend's nested one (threads)."""
    return sum(Parallel(n_jobs=2)(delayed(square)(i) for i in range(n)))


def test_a_nested_parallel_inside_a_task_runs_there(server: Any) -> None:
    with parallel_config(backend="taskcs", n_jobs=2):
        got = Parallel()(delayed(inner_sum)(n) for n in range(1, 9))
    assert got == [sum(i * i for i in range(n)) for n in range(1, 9)]


def test_parallel_timeout_is_honoured(server: Any, tmp_path: Path) -> None:
    never = str(tmp_path / "never")  # fail_at(1, ...) waits for this file (here at most 3 s)
    with parallel_config(backend="taskcs", n_jobs=2), pytest.raises(multiprocessing.TimeoutError):
        Parallel(timeout=0.5)(delayed(fail_at)(1, 0, never, 3.0) for _ in range(2))
