"""``cs-client``: run a task set against the local taskcs server (started if none runs).

    cs-client --tasks FILE             a task file (JSON or TOML, see taskcs.client.taskfile)
    cs-client TASK [ARG ...]           one standard task, e.g. ``cs-client add 1 2``
    --trace FILE.json                  also write when and where each task ran, as a Chrome
                                       trace (Perfetto, chrome://tracing)
    --timeline FILE.html               ... or as one self-contained page

IOTasks run here, on this terminal; output printed by other tasks on the executors is
forwarded and marked with its task. Exit status 0 when every task succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from .._cli import entry_point
from ..errors import TaskcsError


@entry_point
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cs-client``."""
    parser = argparse.ArgumentParser(prog="cs-client", description="Run tasks on the local taskcs server.")
    parser.add_argument("--tasks", metavar="FILE", help="task file (JSON or TOML)")
    parser.add_argument("--server", metavar="ADDRESS", help="server endpoint (skips discovery and auto-start)")
    parser.add_argument("--no-forward-output", action="store_true", help="do not show what tasks print on executors")
    parser.add_argument("--no-autostart", action="store_true", help="fail instead of starting a server")
    # issue 11: the timeline of this run
    parser.add_argument("--trace", metavar="FILE.json",
                        help="write when and where each task ran as a Chrome trace (Perfetto, chrome://tracing)")
    parser.add_argument("--timeline", metavar="FILE.html",
                        help="write when and where each task ran as one self-contained HTML page")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("task", nargs="?", help="a standard task name (quick form)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (JSON values or text)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="cs-client: %(message)s")
    if bool(args.tasks) == bool(args.task):
        parser.error("give either --tasks FILE or a TASK with its arguments")

    from ..client.client import Client
    from ..runtime.timeline import TIMELINE_RECORDS
    from .report import run_and_report
    from .taskfile import check_tasks, load_tasks, parse_cli_task

    try:
        tasks = load_tasks(args.tasks) if args.tasks else [parse_cli_task(args.task, args.args)]
        check_tasks(tasks)
        # With --trace/--timeline, every task of this run is kept (a task file's size).
        keep = max(TIMELINE_RECORDS, len(tasks)) if args.trace or args.timeline else TIMELINE_RECORDS
        client = Client(args.server, foreground="caller", forward_output=not args.no_forward_output,
                        autostart=not args.no_autostart, timeline=keep)
    except TaskcsError as exc:
        print(f"cs-client: {exc}", file=sys.stderr)
        return 2
    try:
        code = run_and_report(client, tasks)
        return _write_timeline(client, args.trace, args.timeline) or code
    except TaskcsError as exc:
        print(f"cs-client: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        client.abort()  # do not wait for running tasks: the server discards their results
        return 130
    except BrokenPipeError:  # stdout's reader left (| head): stop, as a tool killed by SIGPIPE
        client.abort()
        raise
    finally:
        client.shutdown(wait=True, cancel_futures=True)


def _write_timeline(client: Any, trace: str | None, page: str | None) -> int:
    """Issue 11: write the run's timeline where asked; 2 (said why) if it cannot be written."""
    if not trace and not page:
        return 0
    from .trace import write_html, write_trace

    records = client.timeline()
    try:
        if trace:
            write_trace(trace, records)
        if page:
            write_html(page, records, title=f"taskcs timeline: {client.name}")
    except OSError as exc:
        print(f"cs-client: cannot write the timeline: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
