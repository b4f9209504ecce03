"""The timeline written out: Chrome's Trace Event format, and one self-contained HTML page.

Data flow::

    Client.timeline() / taskcs.timeline() -> [TaskRecord]
        -> lanes(): one lane per (server, executor); an IOTask's is its client's ("foreground")
        -> trace_events(): {"traceEvents": [metadata "M" + complete "X" events]} -> write_trace
        -> write_html(): the same lanes as JSON inside one page (timeline_page) that draws them

The trace is what Perfetto (ui.perfetto.dev) and chrome://tracing open: each server is a
process, each of its executors a thread (so Perfetto groups a server's lanes), each task a
complete event ("ph": "X") with its run time. Times are microseconds from the earliest
submission, so the numbers stay readable; ``otherData.t0_ns`` says when that was.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..runtime.timeline import TaskRecord
from .timeline_page import page

log = logging.getLogger(__name__)

#: Trace Event "cname"s (chrome://tracing's reserved colours) by status.
_COLOUR = {"error": "terrible", "cancelled": "grey"}


def lanes(records: Iterable[TaskRecord]) -> list[tuple[str, str]]:
    """Every (server, executor) that ran one of ``records``: IOTasks' lanes (their client's)
    first, then servers and their executors in name order."""
    seen = {(r.server, r.executor): r.io for r in records if r.started_ns}
    return sorted(seen, key=lambda lane: (not seen[lane], lane[0], _natural(lane[1])))


def _natural(name: str) -> tuple[Any, ...]:
    """"exec-10" after "exec-9"."""
    head = name.rstrip("0123456789")
    tail = name[len(head):]
    return (head, int(tail) if tail else -1)


def _origin(records: Sequence[TaskRecord]) -> int:
    times = [t for r in records for t in (r.submitted_ns, r.started_ns) if t]
    return min(times) if times else 0


def trace_events(records: Sequence[TaskRecord]) -> dict[str, Any]:
    """``records`` as a Trace Event format object (JSON-able)."""
    t0 = _origin(records)
    order = lanes(records)
    servers = list(dict.fromkeys(server for server, _ in order))
    pids = {server: i + 1 for i, server in enumerate(servers)}
    tids: dict[tuple[str, str], int] = {}
    events: list[dict[str, Any]] = []
    for i, server in enumerate(servers):
        io = any(lane[0] == server and lane[1] == "foreground" for lane in order)
        events.append({"name": "process_name", "ph": "M", "pid": pids[server], "tid": 0, "ts": 0,
                       "args": {"name": f"client {server}" if io else f"server {server}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": pids[server], "tid": 0, "ts": 0,
                       "args": {"sort_index": i}})
    for j, (server, executor) in enumerate(order):
        tid = tids[(server, executor)] = j + 1
        events.append({"name": "thread_name", "ph": "M", "pid": pids[server], "tid": tid, "ts": 0,
                       "args": {"name": executor}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": pids[server], "tid": tid, "ts": 0,
                       "args": {"sort_index": j}})
    for r in records:
        if not r.started_ns:
            continue  # it never ran (cancelled while queued, refused): nothing to draw
        event: dict[str, Any] = {
            "name": r.name, "cat": "io" if r.io else "task", "ph": "X",
            "ts": (r.started_ns - t0) / 1e3, "dur": max(0, r.finished_ns - r.started_ns) / 1e3,
            "pid": pids[r.server], "tid": tids[(r.server, r.executor)],
            "args": {"task_id": r.task_id, "set_id": r.set_id, "status": r.status,
                     "queued_ms": round(max(0, r.started_ns - r.submitted_ns) / 1e6, 3) if r.submitted_ns else None,
                     "retried": r.retried, "forwarded": r.forwarded},
        }
        if r.status in _COLOUR:
            event["cname"] = _COLOUR[r.status]
        events.append(event)
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"producer": "taskcs", "t0_ns": t0, "tasks": len(records)}}


def write_trace(path: str | Path, records: Sequence[TaskRecord]) -> None:
    """Write ``records`` to ``path`` as a Chrome trace (open it in Perfetto or chrome://tracing)."""
    Path(path).write_text(json.dumps(trace_events(records), separators=(",", ":")))


def page_data(records: Sequence[TaskRecord]) -> dict[str, Any]:
    """What the HTML page draws: lane names and, per task that ran, one compact row."""
    t0 = _origin(records)
    order = lanes(records)
    index = {lane: i for i, lane in enumerate(order)}
    tasks = [[index[(r.server, r.executor)], (r.started_ns - t0) / 1e6, max(0, r.finished_ns - r.started_ns) / 1e6,
              r.name, r.status, r.task_id, r.set_id, int(r.retried) | int(r.forwarded) << 1]
             for r in records if r.started_ns]
    return {"lanes": [f"{server} / {executor}" for server, executor in order], "tasks": tasks,
            "t0_ns": t0, "count": len(records)}


def write_html(path: str | Path, records: Sequence[TaskRecord], title: str = "taskcs timeline") -> None:
    """Write ``records`` to ``path`` as one self-contained page (it fetches nothing) drawing
    one lane per executor, with each task's name and duration on hover."""
    data = json.dumps(page_data(records), separators=(",", ":"))
    # Inside <script type="application/json">: "</" must not close the element early.
    Path(path).write_text(page(html.escape(title), data.replace("</", "<\\/")))
