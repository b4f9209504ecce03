"""Code sent by value does not pile up (taskcs.runtime.blob_refs): with real servers, executors
and clients, a program that makes new code per task leaves the server and its executors with
a bounded number of code blobs while it runs, and none once it has gone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import taskcs
from tests.conftest import server_status, wait_until
from tests.test_direct_path import _leased

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]


def _blob_count() -> tuple[int, int]:
    """On an executor: (its pid, how many code and path blobs it keeps). By reference: no blob."""
    from taskcs.executor import nesting

    return os.getpid(), nesting._loop.resolver.blob_count


def _executor_counts(client: taskcs.Client, executors: int) -> dict[int, int]:
    """Blob counts of every executor, each read by a task that ran there (by reference)."""
    counts: dict[int, int] = {}
    for _ in range(50):
        for fut in [client.submit(_blob_count) for _ in range(4 * executors)]:
            pid, count = fut.result(timeout=20)
            counts[pid] = count
        if len(counts) >= executors:
            break
    assert len(counts) == executors, f"probes reached {len(counts)} of {executors} executors"
    return counts


def _assert_a_new_client_finds_them_dropped() -> None:
    """After a client has gone: the executors keep only a new client's probe code and import path."""
    with taskcs.Client(foreground=None, direct=False) as probe:
        counts = _executor_counts(probe, 2)
        assert max(counts.values()) <= 2, counts


def _waves(client: taskcs.Client, waves: int, per_wave: int) -> None:
    """``waves`` x ``per_wave`` tasks, each of its own function (a closure over its number)."""
    for w in range(waves):
        futs = []
        for i in range(per_wave):
            k = w * per_wave + i
            futs.append(client.submit(lambda k=k: k * 2))
        assert [f.result(timeout=30) for f in futs] == [2 * (w * per_wave + i) for i in range(per_wave)]


def test_server_path_keeps_a_bounded_number_of_blobs_and_none_after_the_client(
        runtime_dir: Path, start_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from taskcs.client import wire

    monkeypatch.setattr(wire, "SENT_BLOBS_LIMIT", 8)
    start_server(executors=2)
    with taskcs.Client(foreground=None, direct=False) as client:
        _waves(client, 10, 20)  # 200 functions, 20 to a SUBMIT
        # The client's memory of what it sent is at most the limit or its last SUBMIT's blobs:
        # the server keeps those and its import path, and has pruned the other 180.
        blobs = server_status(runtime_dir)["blobs"]
        assert blobs <= 20 + 1, blobs
        # The probe's own code makes the client forget the last wave too: then the executors
        # keep only the probe's code and the client's import path (without FORGET: ~100 each).
        counts = _executor_counts(client, 2)
        assert max(counts.values()) <= 2, counts
    wait_until(lambda: server_status(runtime_dir)["blobs"] <= 2, what="the gone client's code pruned")
    _assert_a_new_client_finds_them_dropped()


def test_direct_path_forgets_what_no_task_in_flight_needs(
        runtime_dir: Path, start_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from taskcs.client import direct

    monkeypatch.setattr(direct, "LEASE_BLOBS_LIMIT", 8)
    start_server(executors=2)
    with taskcs.Client(foreground=None, direct=True) as client:
        _leased(client, 2)
        _waves(client, 15, 20)  # 300 functions, at most 20 in flight
        # Each leased executor keeps what the limit and the tasks in flight at the last FORGET
        # allow, and the client's import path (without FORGET: ~150 each).
        counts = _executor_counts(client, 2)
        assert client._dlive == 2, "the tasks left the direct path"
        assert max(counts.values()) <= 8 + 20 + 1, counts
    # The leases ended with the client: the executors dropped what only it had sent.
    _assert_a_new_client_finds_them_dropped()


def test_the_foreground_drops_code_of_iotasks_the_server_pruned(
        runtime_dir: Path, start_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from taskcs.client import wire

    monkeypatch.setattr(wire, "SENT_BLOBS_LIMIT", 4)
    start_server(executors=1)
    with taskcs.Client() as client:  # with its foreground executor: IOTasks run here
        for w in range(5):
            futs = [client.submit_task(taskcs.Task(lambda k=k: k + 1, io=True)) for k in range(w * 4, w * 4 + 4)]
            assert [f.result(timeout=20) for f in futs] == list(range(w * 4 + 1, w * 4 + 5))
        # Each wave's SUBMIT made the client forget the one before: the server pruned that
        # code and told the foreground, which keeps the last wave's (4) and the import path.
        wait_until(lambda: client._resolver.blob_count <= 4 + 1, what="the foreground to drop pruned code")
        assert server_status(runtime_dir)["blobs"] <= 4 + 1
