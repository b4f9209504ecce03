"""Code blobs are pruned once nobody needs them (taskcs.runtime.blob_refs), sans-IO, and the
executor's Resolver drops them only when every holder that sent one has let it go."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from taskcs.executor.runner import Resolver, run_task
from taskcs.runtime import codec
from taskcs.runtime import protocol as p
from taskcs.runtime.dispatcher import DispatcherConfig
from taskcs.runtime.task import Status
from tests.conftest import wait_until

from .test_dispatcher import Harness, normal
from .test_federation_rules import Fed


def _blob(value: int) -> tuple[str, bytes]:
    """A real code blob (a function by value) and its digest."""
    fn = eval(f"lambda: {value}")  # a fresh function per value: its own bytes, its own digest
    ref, blob = codec.function_ref(fn)
    assert ref.startswith("dill:") and blob is not None
    return ref[5:], blob


@pytest.fixture
def hb() -> Harness:
    """With heartbeats, so tick() runs (and prunes): the server's own configuration."""
    return Harness(DispatcherConfig(heartbeat_interval=1.0))


def test_a_blob_is_pruned_when_its_client_forgets_it_and_its_executor_is_told(hb: Harness) -> None:
    digest, blob = _blob(1)
    c = hb.client("c")
    e = hb.executor("e")
    hb.submit(c, 1, [normal(1, ref="dill:" + digest)], blobs={digest: blob})
    sent = hb.take(e, p.Tasks)
    assert sent[0].blobs == {digest: blob}
    hb.complete(e, [sent[0].tasks[0][0]])
    hb.send(c, p.Forget([digest]))  # no live task names it: pruned at once
    assert hb.d.status()["blobs"] == 0
    assert hb.take(e, p.Forget) == [p.Forget([digest])]
    # It comes back with the next task that needs it, and goes to the executor again.
    hb.submit(c, 2, [normal(2, ref="dill:" + digest)], blobs={digest: blob})
    assert hb.take(e, p.Tasks)[0].blobs == {digest: blob}


def test_a_blob_a_live_task_names_waits_for_the_task_then_the_next_tick(hb: Harness) -> None:
    digest, blob = _blob(2)
    c = hb.client("c")
    e = hb.executor("e")
    hb.submit(c, 1, [normal(1, ref="dill:" + digest)], blobs={digest: blob})
    gid = hb.take(e, p.Tasks)[0].tasks[0][0]
    hb.send(c, p.Forget([digest]))
    hb.tick(0.5)
    assert hb.d.status()["blobs"] == 1, "a running task's code was pruned"
    assert hb.take(e, p.Forget) == []
    hb.complete(e, [gid])
    hb.tick(1.0)  # the last pass over the live tasks was at 0.5: the next is due at 1.5
    assert hb.d.status()["blobs"] == 1
    hb.tick(1.5)
    assert hb.d.status()["blobs"] == 0
    assert hb.take(e, p.Forget) == [p.Forget([digest])]


def test_a_blob_two_clients_sent_lives_until_both_let_go(hb: Harness) -> None:
    digest, blob = _blob(3)
    a, b = hb.client("a"), hb.client("b")
    hb.submit(a, 1, [], blobs={digest: blob})
    hb.submit(b, 1, [], blobs={digest: blob})
    hb.gone(a)
    hb.tick(1.0)
    assert hb.d.status()["blobs"] == 1
    # b still counts on it: its task goes without the blob and runs
    e = hb.executor("e")
    hb.submit(b, 2, [normal(1, ref="dill:" + digest)])
    assert hb.errors(b) == [] and [entry[1] for entry in hb.tasks(e)] == ["dill:" + digest]
    hb.gone(b)
    hb.tick(2.0)
    assert hb.d.status()["blobs"] == 0


def test_a_gone_clients_blobs_and_import_path_are_pruned(hb: Harness) -> None:
    digest, blob = _blob(4)
    c = hb.client("c", sys_path=["/somewhere/else"])
    e = hb.executor("e")
    hb.submit(c, 1, [normal(1, ref="dill:" + digest)], blobs={digest: blob})
    assert set(hb.take(e, p.Tasks)[0].blobs) == {digest, next(k for k in hb.d._blobs if k.startswith("path:"))}
    hb.gone(c)  # its running task is interrupted and dropped with it: nothing names the code
    assert hb.d.status()["blobs"] == 0
    [forget] = hb.take(e, p.Forget)
    assert digest in forget.digests and any(d.startswith("path:") for d in forget.digests)


def test_a_forget_names_only_what_its_sender_holds(hb: Harness) -> None:
    digest, blob = _blob(5)
    a, b = hb.client("a"), hb.client("b")
    hb.submit(a, 1, [], blobs={digest: blob})
    hb.send(b, p.Forget([digest, "no-such-digest"]))  # b never sent it: nothing changes
    hb.tick(1.0)
    assert hb.d.status()["blobs"] == 1
    hb.send(a, p.Forget([digest]))
    assert hb.d.status()["blobs"] == 0


def test_forwarded_code_is_pruned_on_both_servers_and_their_executors() -> None:
    fed = Fed()
    a, b = fed.node("A"), fed.node("B")
    eb = b.executor("eb", capacity=4)
    fed.link(a, b)
    digest, code = _blob(6)
    c = a.client("c")
    a.submit(c, 1, [normal(1, ref="dill:" + digest)], blobs={digest: code})
    ((gid, _, _, _),) = b.tasks(eb)
    assert b.d.status()["blobs"] == 1
    b.complete(eb, [gid])
    assert a.outcomes(c)[1][0] == Status.OK
    a.send(c, p.Forget([digest]))  # A prunes it, tells B, which prunes it and tells eb
    assert a.d.status()["blobs"] == 0 and b.d.status()["blobs"] == 0
    assert fed.sent("A", "B", p.Forget) == [p.Forget([digest])]
    assert b.take(eb, p.Forget) == [p.Forget([digest])]
    # The next task of that code carries it over the link again and runs.
    a.submit(c, 2, [normal(2, ref="dill:" + digest)], blobs={digest: code})
    assert fed.sent("A", "B", p.Submit)[-1].blobs == {digest: code}
    assert [entry[1] for entry in b.tasks(eb)] == ["dill:" + digest]


def test_resolver_keeps_a_blob_while_any_holder_counts_on_it() -> None:
    ref, blob = codec.function_ref(lambda x: x + 1)
    digest = ref[5:]
    r = Resolver("t")
    r.add_blobs({digest: blob}, 0)  # the server sent it
    r.add_blobs({digest: blob}, 7)  # and the client of lease 7
    entry = (1, ref, pickle.dumps((41,)), "")
    assert run_task(r, entry)[1] == Status.OK
    r.forget([digest], 0)
    assert r.blob_count == 1 and run_task(r, entry)[1] == Status.OK
    r.forget([digest], 3)  # a holder that never sent it changes nothing
    assert r.blob_count == 1
    r.drop_holder(7)  # the lease ended
    assert r.blob_count == 0
    result = run_task(r, entry)
    assert result[1] == Status.ERROR and b"never sent" in result[2]


def test_resolver_forgets_the_function_resolved_from_a_blob() -> None:
    ref, blob = codec.function_ref(lambda x: x * 3)
    r = Resolver("t")
    r.add_blobs({ref[5:]: blob})
    assert r.resolve(ref, "")(2) == 6
    r.forget([ref[5:]])
    with pytest.raises(LookupError, match="never sent"):
        r.resolve(ref, "")


def test_an_engine_batch_holds_its_code_while_it_runs_and_lets_it_go() -> None:
    import threading
    import time

    from taskcs.engines import runner

    def nap(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    ref, blob = codec.function_ref(lambda s: nap(s))
    blobs = {ref[5:]: blob}
    runner.run_batch([], {})  # the worker's resolver exists
    assert runner._resolver is not None
    before = runner._resolver.blob_count
    slow: list[Any] = []
    a = threading.Thread(target=lambda: slow.append(runner.run_batch(
        [(1, ref, pickle.dumps((0.3,)), ""), (2, ref, pickle.dumps((0.0,)), "")], blobs)))
    a.start()
    # a holds the code (and runs its first task); b runs the same code and ends meanwhile
    wait_until(lambda: runner._resolver is not None and runner._resolver._holders.get(ref[5:]), what="a to start")
    _, quick, _ = runner.run_batch([(3, ref, pickle.dumps((0.0,)), "")], blobs)
    a.join(10)
    assert quick[0][1] == Status.OK
    assert [r[1] for r in slow[0][1]] == [Status.OK, Status.OK], "b's end took a's code"
    assert runner._resolver.blob_count == before
