"""The task timeline (issue 11): records through real servers, the trace, the page, the clocks.

Real servers (phase 3 in a private runtime dir, phase 4 as tests/federation.py's nodes), a real
browser for the page (tests/test_dashboard.py's headless chromium over its DevTools pipe), and
the clock estimator as a unit with made-up clocks. No assertion depends on how fast anything ran.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

import taskcs
from taskcs.client.trace import lanes, trace_events, write_html, write_trace
from taskcs.runtime.timeline import ClockEstimator, SpanClock, TaskRecord, exchange
from tests.conftest import run_cli, server_status, wait_until
from tests.federation import nodes_fixture  # noqa: F401 - the `nodes` fixture
from tests.test_dashboard import _Chromium, _events

pytestmark = pytest.mark.timeout(120)

SECOND = 1_000_000_000


def die_once(marker: str) -> str:
    """Kill the executor running it the first time (so the server retries it), then succeed."""
    if not os.path.exists(marker):
        Path(marker).write_text("died once")
        os._exit(3)
    return "second time lucky"


# ------------------------------------------------------------------ the clock estimator
def test_one_exchange_is_exact_when_both_legs_take_as_long() -> None:
    offset, leg, hold = 5 * SECOND, 2_000_000, 300_000  # the peer's clock is 5 s ahead
    t1 = 1_000 * SECOND
    t2 = t1 + leg + offset
    t3 = t2 + hold
    t4 = t3 - offset + leg
    assert exchange(t1, t2, t3, t4) == exchange(t1, t2, t3, t4)
    sample = exchange(t1, t2, t3, t4)
    assert sample.rtt_ns == 2 * leg  # the peer's hold time is not delay
    assert sample.offset_ns == offset


def _round_trip(ours: ClockEstimator, theirs: ClockEstimator, t: int, offset: int, out: int, back: int,
                hold: int) -> tuple[int, Any]:
    """We stamp at our time ``t``; it arrives ``out`` later, waits ``hold``, comes back ``back`` later."""
    sent = ours.stamp(t)
    theirs.received(*sent, now_ns=t + out + offset)
    answer = theirs.stamp(t + out + hold + offset)
    return t + out + hold + back, ours.received(*answer, now_ns=t + out + hold + back)


def test_the_estimator_takes_the_offset_of_the_least_delayed_round_trip() -> None:
    offset = -3 * SECOND + 123_456  # the peer's clock is ~3 s behind ours
    ours, theirs = ClockEstimator(), ClockEstimator()
    assert ours.rtt_ns is None and ours.offset_ns == 0 and ours.to_local(42) == 42
    assert ours.received(*ClockEstimator().stamp(10), now_ns=20) is None  # no echo yet: no round trip
    ours = ClockEstimator()
    t = 1_000 * SECOND
    # Queueing makes legs long and lopsided; one exchange in the middle is quick and even.
    legs = [(40_000_000, 1_000_000), (1_000_000, 30_000_000), (500_000, 500_000), (25_000_000, 2_000_000)]
    samples = []
    for out, back in legs:
        t, sample = _round_trip(ours, theirs, t + SECOND, offset, out, back, hold=200_000)
        if sample is not None:
            samples.append(sample)
    assert samples, "no exchange closed a round trip"
    best = min(samples, key=lambda s: s.rtt_ns)
    assert best.rtt_ns == 1_000_000 and ours.offset_ns == best.offset_ns
    assert abs(ours.offset_ns - offset) <= best.rtt_ns // 2  # NTP's bound: half the round trip
    assert ours.rtt_ns == samples[-1].rtt_ns  # what the dashboard shows: the latest round trip
    assert ours.to_local(5 * SECOND) == 5 * SECOND - ours.offset_ns
    assert ours.to_local(0) == 0  # "never ran" stays never


def test_a_clock_step_between_stamps_is_not_a_sample() -> None:
    ours = ClockEstimator()
    ours.received(100 * SECOND, 0, 0, now_ns=50 * SECOND)  # their stamp, to echo
    before = ours.offset_ns
    # An answer "received" before we sent what it echoes: our clock stepped back.
    assert ours.received(101 * SECOND, 60 * SECOND, 0, now_ns=55 * SECOND) is None
    assert ours.offset_ns == before and ours.rtt_ns is None


def test_an_engine_workers_offset_is_bounded_by_its_batches_windows() -> None:
    ms = 1_000_000
    same = SpanClock()  # a worker on this machine: its spans always fit; never shifted
    for t in (10 * SECOND, 20 * SECOND):
        same.batch(t, t + 50 * ms, t + 5 * ms, t + 40 * ms)
        assert same.offset_ns == 0
    ahead = SpanClock()  # a worker whose clock is 5 s ahead of the server's
    skew = 5 * SECOND
    windows = [(100 * SECOND, 30 * ms, 2 * ms, 20 * ms), (110 * SECOND, 12 * ms, 1 * ms, 10 * ms)]
    for sent, window, start, end in windows:
        ahead.batch(sent, sent + window, sent + start + skew, sent + end + skew)
        shift = ahead.offset_ns
        # Mapped back, this batch's span lies inside its window, and the shift is near the skew.
        assert sent <= sent + start + skew - shift and sent + end + skew - shift <= sent + window
    assert skew - 2 * ms <= ahead.offset_ns <= skew + 1 * ms  # the tighter window bounds it to ~1 ms
    ahead.batch(200 * SECOND, 200 * SECOND + 10 * ms, 200 * SECOND + ms, 200 * SECOND + 9 * ms)
    assert ahead.offset_ns == 0  # its clock was stepped back to ours: the bounds start again
    ahead.batch(0, 5, 1, 4)  # a batch that carried no times tells nothing
    assert ahead.offset_ns == 0


# --------------------------------------------------------------- phases 1 and 2 (threads)
def test_records_in_process_name_the_threads_and_the_clients_own_lane() -> None:
    with taskcs.Client.in_process(executors=2) as client:
        ts = client.submit_set([taskcs.Task("sleep", (0.01,)) for _ in range(4)]
                               + [taskcs.Task("print_line", ("an IOTask",))])
        ts.results()
        records = client.timeline()
    assert {r.lane for r in records if not r.io} <= {"server/thread-1", "server/thread-2"}
    (io,) = [r for r in records if r.io]
    assert io.lane == f"{client.name}/foreground" and io.name == "print_line"
    assert all(0 < r.started_ns <= r.finished_ns and r.set_id == ts.set_id for r in records)
    with taskcs.Client.in_process(executors=0, timeline=2) as client:  # phase 1: the client runs everything
        assert [client.submit("add", i, 1).result() for i in range(3)] == [1, 2, 3]
        records = client.timeline()
    assert [r.lane for r in records] == [f"{client.name}/foreground"] * 2  # the latest two: a bounded ring
    assert [r.task_id for r in records] == [2, 3]
    with taskcs.Client.in_process(executors=1, timeline=0) as client:
        client.submit("add", 1, 1).result()
        assert client.timeline() == []  # kept nothing


# ------------------------------------------------------------------ phase 3, end to end
def _check_trace(trace: dict[str, Any], records: list[TaskRecord]) -> None:
    """The Trace Event format's required keys, and one lane (thread) per executor."""
    assert isinstance(trace["traceEvents"], list) and trace["displayTimeUnit"] in ("ms", "ns")
    names: dict[tuple[int, int], str] = {}
    processes: dict[int, str] = {}
    complete = []
    for event in trace["traceEvents"]:
        assert {"name", "ph", "pid", "tid", "ts"} <= set(event), event
        assert isinstance(event["ts"], (int, float)) and isinstance(event["pid"], int), event
        if event["ph"] == "M":
            assert event["name"] in ("process_name", "thread_name", "process_sort_index", "thread_sort_index")
            if event["name"] == "thread_name":
                names[(event["pid"], event["tid"])] = event["args"]["name"]
            elif event["name"] == "process_name":
                processes[event["pid"]] = event["args"]["name"]
        else:
            assert event["ph"] == "X" and isinstance(event["dur"], (int, float)) and event["dur"] >= 0, event
            assert event["ts"] >= 0
            complete.append(event)
    ran = [r for r in records if r.started_ns]
    assert len(complete) == len(ran)
    for event, record in zip(sorted(complete, key=lambda e: e["args"]["task_id"]),
                             sorted(ran, key=lambda r: r.task_id), strict=True):
        assert event["name"] == record.name and event["args"]["set_id"] == record.set_id
        lane = names[(event["pid"], event["tid"])]
        assert lane == record.executor
        assert processes[event["pid"]].endswith(record.server)
    assert sorted(names.values()) == sorted(executor for _, executor in lanes(records))


@pytest.mark.multiprocess
def test_records_of_a_phase3_set_say_where_and_when_each_task_ran(start_server: Any, runtime_dir: Path,
                                                                  tmp_path: Path) -> None:
    start_server(2)
    server_name = server_status(runtime_dir)["name"]
    marker = str(tmp_path / "died")
    with taskcs.Client() as client:
        ts = client.submit_set([taskcs.Task("sleep", (0.05,)) for _ in range(6)]
                               + [taskcs.Task(die_once, (marker,), retries=1),
                                  taskcs.Task("print_line", ("an IOTask",))])
        assert ts.results()[-2:] == ["second time lucky", "an IOTask"]
        single = client.submit("add", 1, 2)
        assert single.result() == 3
        records = client.timeline()
        assert taskcs.timeline(client) == records and set(records) <= set(taskcs.timeline())  # every client's
    assert len(records) == 9
    by_id = {r.task_id: r for r in records}
    in_set = [by_id[f.task_id] for f in ts.futures]
    assert {r.set_id for r in in_set} == {ts.set_id} and by_id[single.task_id].set_id == 0
    for r in records:
        assert r.status == "ok" and r.submitted_ns > 0 and 0 < r.started_ns <= r.finished_ns, r
        assert not r.forwarded
    sleeps, died, io = in_set[:6], in_set[6], in_set[7]
    assert {r.name for r in sleeps} == {"sleep"} and died.name == "die_once"
    assert {r.server for r in sleeps} == {server_name}
    assert {r.executor for r in sleeps} <= {"exec-1", "exec-2", "exec-3"}  # exec-3: die_once's replacement
    assert died.retried and not any(r.retried for r in sleeps)
    assert io.io and (io.server, io.executor) == (client.name, "foreground") and io.lane == f"{client.name}/foreground"
    assert sorted(records, key=lambda r: r.started_ns) == records  # in order of their start
    # The trace: valid Trace Event JSON, one lane per executor, the IOTask on the client's lane.
    write_trace(tmp_path / "run.json", records)
    trace = json.loads((tmp_path / "run.json").read_text())
    _check_trace(trace, records)
    assert lanes(records)[0] == (client.name, "foreground")
    assert trace == trace_events(records)


@pytest.mark.multiprocess
def test_tasks_a_client_sends_again_after_its_server_died_are_marked_retried(start_server: Any,
                                                                             runtime_dir: Path) -> None:
    import signal

    from taskcs.runtime import discovery

    # Heartbeats 30 s apart: only the server's pidfd tells the client, at once.
    record = start_server(1, 60.0, "--heartbeat", "30")
    with taskcs.Client(foreground=None) as client:
        done = client.submit("add", 1, 1)
        assert done.result() == 2
        slow = [client.submit("sleep", 0.3) for _ in range(3)]
        wait_until(lambda: any(ex["in_flight"] for ex in server_status(runtime_dir)["executors"]),
                   what="a sleep to run")
        os.kill(record.pid, signal.SIGKILL)  # the server we started, by its pid
        wait_until(lambda: (r := discovery.live_record(runtime_dir)) and r.pid != record.pid, timeout=30,
                   what="a new server")
        assert all(f.result(timeout=60) >= 0.3 for f in slow)  # each slept its 0.3 s (on the new server)
        records = {r.task_id: r for r in client.timeline()}
    assert not records[done.task_id].retried
    assert all(records[f.task_id].retried and records[f.task_id].started_ns for f in slow)


@pytest.mark.multiprocess
def test_cs_client_writes_the_trace_and_the_page(start_server: Any, runtime_dir: Path, tmp_path: Path) -> None:
    start_server(1)
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps({"tasks": [{"task": "sleep", "args": [0.01]}, {"task": "add", "args": [2, 3]},
                                           {"task": "fail", "args": ["on purpose"]}]}))
    done = run_cli("cs-client", "--tasks", str(tasks), "--trace", str(tmp_path / "t.json"),
                   "--timeline", str(tmp_path / "t.html"), "--no-autostart",
                   env={"TASKCS_RUNTIME_DIR": str(runtime_dir)})
    assert done.returncode == 1, done.stderr  # one task failed on purpose
    trace = json.loads((tmp_path / "t.json").read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert sorted(e["name"] for e in events) == ["add", "fail", "sleep"]
    assert {e["args"]["status"] for e in events} == {"ok", "error"}
    page = (tmp_path / "t.html").read_text()
    fetched = page.replace('"http://www.w3.org/2000/svg"', "")  # a namespace name, never fetched
    assert "<script>" in page and "http" not in fetched and " src=" not in page and "href" not in page
    bad = run_cli("cs-client", "--no-autostart", "--trace", str(tmp_path / "no" / "such" / "dir.json"), "add", "1",
                  "2", env={"TASKCS_RUNTIME_DIR": str(runtime_dir)})
    assert bad.returncode == 2 and "cs-client:" in bad.stderr and "Traceback" not in bad.stderr


# ----------------------------------------------------------------- phase 4, forwarded
@pytest.mark.multiprocess
def test_forwarded_tasks_carry_the_peers_executor_and_the_link_its_round_trip(nodes: Any) -> None:
    a, b = nodes("alpha", "beta")
    a.start(executors=1)
    b.start(a, executors=2)
    a.wait_linked("beta")
    b.wait_linked("alpha")
    with taskcs.Client(a.ipc(), autostart=False) as client:
        ts = client.submit_set([taskcs.Task("sleep", (0.3,)) for _ in range(6)])
        ts.results()
        records = {r.task_id: r for r in client.timeline()}
    forwarded = [records[f.task_id] for f in ts.futures if f.executor.startswith("beta:")]
    local = [records[f.task_id] for f in ts.futures if not f.executor.startswith("beta:")]
    assert forwarded and local, [f.executor for f in ts.futures]
    for r, f in ((records[f.task_id], f) for f in ts.futures):
        assert 0 < r.started_ns <= r.finished_ns and r.set_id == ts.set_id
        assert f.executor == (f"beta:{r.executor}" if r.forwarded else r.executor)
    assert all(r.forwarded and r.server == "beta" and r.executor in ("exec-1", "exec-2") for r in forwarded)
    assert all(not r.forwarded and (r.server, r.executor) == ("alpha", "exec-1") for r in local)
    # Both ends measured the link from CAPACITY heartbeats; one machine: the clocks agree.
    for node, other in ((a, "beta"), (b, "alpha")):
        peer = wait_until(lambda n=node, o=other: (p := n.peers()[o])["rtt_ms"] is not None and p, timeout=10,
                          what=f"{node.name}'s round trip to {other}")
        assert peer["rtt_ms"] >= 0 and abs(peer["clock_offset_ms"]) < 1000
    shown = run_cli("cs-server", "status", env=a.env())
    assert shown.returncode == 0 and "rtt" in shown.stdout and "ms" in shown.stdout.split("rtt", 1)[1]
    trace = trace_events(list(records.values()))
    _check_trace(trace, list(records.values()))


# ---------------------------------------------------------------- a real browser
def _record(task_id: int, executor: str, start: int, length: int, **kw: Any) -> TaskRecord:
    base = 1_700_000_000 * SECOND
    return TaskRecord(task_id, 1, kw.pop("name", f"task{task_id}"), kw.pop("status", "ok"), base,
                      base + start, base + start + length, kw.pop("server", "alpha"), executor, **kw)


_DRAWN = """document.body.dataset.drawn && JSON.stringify({
  drawn: Number(document.body.dataset.drawn),
  lanes: [...document.querySelectorAll("g.lane")].map((g) => g.dataset.lane),
  names: [...document.querySelectorAll("rect.task")].map((r) => r.dataset.name),
  widths: [...document.querySelectorAll("rect.task")].map((r) => Number(r.getAttribute("width"))),
  titles: [...document.querySelectorAll("rect.task title")].map((t) => t.textContent)})"""


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_the_page_draws_lanes_and_names_and_says_durations_on_hover(tmp_path: Path) -> None:
    records = [
        _record(1, "exec-1", 0, 20_000_000, name="load </script><b>x</b>"),  # markup stays text
        _record(2, "exec-2", 5_000_000, 40_000_000, name="train"),
        _record(3, "exec-1", 25_000_000, 10_000_000, name="save", status="error", retried=True),
        _record(4, "exec-1", 30_000_000, 5_000_000, name="remote", server="beta", forwarded=True),
        _record(5, "foreground", 50_000_000, 1_000_000, name="ask", server="client-7", io=True),
        TaskRecord(6, 1, "never", "cancelled", 1_700_000_000 * SECOND, 0, 0, "alpha", "server"),
    ]
    path = tmp_path / "timeline.html"
    write_html(path, records, title="a <test> run")
    browser = _Chromium(tmp_path / "profile")
    try:
        browser.open(path.as_uri())
        value = wait_until(lambda: browser.evaluate(_DRAWN), timeout=20, what="the page to draw")
        shown = json.loads(value)
        assert shown["lanes"] == ["client-7 / foreground", "alpha / exec-1", "alpha / exec-2", "beta / exec-1"]
        assert sorted(shown["names"]) == sorted(["load </script><b>x</b>", "train", "save", "remote", "ask"])
        assert shown["drawn"] == 5  # the cancelled task never ran: no bar
        assert max(shown["widths"]) == shown["widths"][shown["names"].index("train")]  # the longest
        assert any("train #2" in t and "40.00 ms" in t for t in shown["titles"])
        assert browser.evaluate('document.querySelectorAll("b").length') == 5  # the legend's only
        hover = ('(() => { const r = [...document.querySelectorAll("rect.task")].find((e) => e.dataset.name === '
                 '"save"); r.dispatchEvent(new MouseEvent("mouseover")); '
                 'return document.getElementById("info").textContent; })()')
        info = browser.evaluate(hover)
        assert "save #3" in info and "10.00 ms" in info and "error" in info and "retried" in info
        assert browser.evaluate("document.title") == "a <test> run"
        write_html(tmp_path / "empty.html", [])  # nothing ran: an empty page, not a broken one
        browser.open((tmp_path / "empty.html").as_uri())
        wait_until(lambda: browser.evaluate("document.body.dataset.drawn") == "0", timeout=20, what="the empty page")
        assert browser.evaluate('document.getElementById("summary").textContent') == "no tasks recorded"
    finally:
        browser.close()


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (Debian: apt-get install -y chromium)")
@pytest.mark.multiprocess
def test_the_dashboard_shows_the_task_stream_and_each_links_round_trip(nodes: Any, tmp_path: Path) -> None:
    a, b = nodes("alpha", "beta")
    a.start(executors=1, extra=["--dashboard", "127.0.0.1:0"])
    b.start(a, executors=1)
    a.wait_linked("beta")
    url = a.status()["dashboard"]
    assert "stream" not in a.status()  # nobody watches: no stream kept
    browser = _Chromium(tmp_path / "profile")
    try:
        with taskcs.Client(a.ipc(), autostart=False, foreground=None) as client:
            browser.open(url)
            futures = [client.submit("sleep", 0.05) for _ in range(8)]
            for f in futures:
                f.result()
            shown_js = """document.querySelector("tr.peer") && JSON.stringify({
              stream: [...document.querySelectorAll("tr.stream")].map((tr) => [tr.dataset.task,
                       tr.children[2].textContent]),
              rtt: [...document.querySelectorAll("tr.peer td.rtt")].map((td) => td.textContent)})"""

            def shown() -> dict[str, Any] | None:
                value = browser.evaluate(shown_js)
                got = json.loads(value) if value else None
                return got if got and got["stream"] and got["rtt"] and got["rtt"][0].endswith(" ms") else None

            # The page asks for events; the next tasks to finish then enter the stream.
            wait_until(lambda: "stream" in a.status(), timeout=20, what="the stream to start while watched")
            more = [client.submit("sleep", 0.05) for _ in range(4)]
            for f in more:
                f.result()
            got = wait_until(shown, timeout=20, what="the page to show the stream and the round trip")
            assert {task for task, _ in got["stream"]} == {"std:sleep"}
            assert {ex for _, ex in got["stream"]} <= {"exec-1", "beta:exec-1"}
            with _events(url) as next_event:
                snapshot = next_event()
            assert snapshot["stream"] and all(len(entry) == 5 for entry in snapshot["stream"])
            assert snapshot["peers"][0]["rtt_ms"] is not None
    finally:
        browser.close()


# ------------------------------------------------- the dispatcher's rules, sans-IO
def _alpha_with_a_peer(peer_hello: Any) -> tuple[Any, list[Any]]:
    """A dispatcher "alpha" (wall clock = now + 1000 s), a client c1, and a peer server "P"."""
    from taskcs.runtime import protocol as p
    from taskcs.runtime.dispatcher import Dispatcher, DispatcherConfig

    d = Dispatcher(DispatcherConfig(), server_pid=1, name="alpha")
    d.wall_offset = 1000.0
    out = d.handle(b"P", peer_hello, now=1.0)
    out += d.handle(b"c1", p.Hello("client", "c1", 2), now=1.0)
    out += d.handle(b"c1", p.Submit(1, [(7, "std:add", b"", 0, 1)], {}, True), now=1.0)
    return d, out


def test_an_engines_worker_name_becomes_the_lane_and_a_peers_clock_is_corrected() -> None:
    from taskcs.runtime import protocol as p
    from taskcs.runtime.federation import PYTHON
    from taskcs.runtime.timeline import to_record

    # An engine link: a peer "server" that stamps nothing; its worker names pass through as lanes.
    d, out = _alpha_with_a_peer(p.Hello("server", "dask", 3, 4, python=PYTHON, features=p.FEATURES))
    (submit,) = [m for peer, m in out if peer == b"P" and isinstance(m, p.Submit)]
    gid = submit.tasks[0][0]
    worker = "worker-tcp://127.0.0.1:4001"
    out = d.handle(b"P", p.PeerDone([(gid, 0, b"\x80\x05N.", 10, worker, 1_500, 2_500)]), now=2.0)
    ((_, results),) = [(peer, m) for peer, m in out if isinstance(m, p.Results)]
    (entry,) = results.results
    assert entry[3:] == (f"dask:{worker}", 1_500, 2_500, "dask", 2)  # no clock exchange: times as sent
    record = to_record((7, 1, "add", *entry[1:2], 99, *entry[4:6], entry[6], entry[3], entry[7]), "c1")
    assert (record.server, record.executor, record.forwarded, record.lane) == ("dask", worker, True,
                                                                               f"dask/{worker}")

    # A peer server whose clock is 5 s ahead: one CAPACITY exchange, then its times are ours.
    d, out = _alpha_with_a_peer(p.Hello("server", "beta", 3, 4, python=PYTHON, features=p.FEATURES))
    ours = [m for peer, m in out if peer == b"P" and isinstance(m, p.Capacity)][-1]
    t1 = ours.sent_ns
    assert t1 == 1001 * SECOND and ours.echo_ns == 0  # wall clock = now + wall_offset, nothing to echo yet
    leg, hold, ahead = 1_000_000, 500_000, 5 * SECOND
    t3 = t1 + leg + ahead + hold  # beta received ours at t1 + leg (its clock: + 5 s), held it 0.5 ms
    d.handle(b"P", p.Capacity(4, t3, t1, hold), now=1.0 + (2 * leg + hold) / 1e9)
    (peer,) = d.status()["peers"]
    assert peer["rtt_ms"] == 2.0 and peer["clock_offset_ms"] == 5000.0
    (submit,) = [m for peer_id, m in out if peer_id == b"P" and isinstance(m, p.Submit)]
    gid = submit.tasks[0][0]
    start = 1010 * SECOND + ahead  # beta's clock
    out = d.handle(b"P", p.PeerDone([(gid, 0, b"\x80\x05N.", 10, "exec-1", start, start + 3_000)]), now=11.0)
    ((_, results),) = [(peer_id, m) for peer_id, m in out if isinstance(m, p.Results)]
    assert results.results[0][3:] == ("beta:exec-1", 1010 * SECOND, 1010 * SECOND + 3_000, "beta", 2)
    # And the next CAPACITY alpha sends echoes beta's stamp, with how long alpha held it.
    again = d._capacity(d._servers[b"P"], 0)
    assert again.echo_ns == t3 and 9.9 * SECOND < again.held_ns < 10 * SECOND  # received at ~1.0, now 11.0
