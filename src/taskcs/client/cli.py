"""``cs-client``: run a task set against the local taskcs server (started if none runs).

    cs-client --tasks FILE             a task file (JSON or TOML, see taskcs.client.taskfile)
    cs-client TASK [ARG ...]           one standard task, e.g. ``cs-client add 1 2``

IOTasks run here, on this terminal; output printed by other tasks on the executors is
forwarded and marked with its task. Exit status 0 when every task succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys

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
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("task", nargs="?", help="a standard task name (quick form)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (JSON values or text)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="cs-client: %(message)s")
    if bool(args.tasks) == bool(args.task):
        parser.error("give either --tasks FILE or a TASK with its arguments")

    from ..client.client import Client
    from .report import run_and_report
    from .taskfile import check_tasks, load_tasks, parse_cli_task

    try:
        tasks = load_tasks(args.tasks) if args.tasks else [parse_cli_task(args.task, args.args)]
        check_tasks(tasks)
        client = Client(args.server, foreground="caller", forward_output=not args.no_forward_output,
                        autostart=not args.no_autostart)
    except TaskcsError as exc:
        print(f"cs-client: {exc}", file=sys.stderr)
        return 2
    try:
        return run_and_report(client, tasks)
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


if __name__ == "__main__":
    sys.exit(main())
