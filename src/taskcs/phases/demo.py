"""``cs-demo``: one program that shows each phase of taskcs.

    cs-demo --phase 1            one process: server thread + the client's main thread as the
                                 only executor
    cs-demo --phase 2 [-e N]     as 1, plus N executor threads; IOTasks stay on the client
    cs-demo --phase 3            the local cs-server (auto-started) and its executor processes
    cs-demo --phase 4            two federated servers on loopback (throw-away CURVE keys)
                                 sharing one set; IOTasks still on this terminal
    cs-demo --engine SPEC        a private cs-server whose work goes to a cluster engine
                                 (dask-local, dask://HOST:PORT, ...); IOTasks on this terminal
    cs-demo ... --tasks FILE     your own task set instead of the built-in one
    cs-demo --list               the standard tasks

The built-in set includes an IOTask that prints and one that asks you for a line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from .._cli import entry_point
from ..client.client import Client
from ..client.report import run_and_report
from ..client.taskfile import check_tasks, load_tasks
from ..errors import TaskcsError
from ..runtime.task import Task
from ..stdlib_tasks import REGISTRY, is_io


def builtin_tasks() -> list[Task]:
    """The demo task set: arithmetic, CPU work, sleeps, files and two IOTasks."""
    path = os.path.join(tempfile.gettempdir(), f"taskcs-demo-{os.getpid()}.txt")
    return [
        Task("echo", ("hello", "from", "taskcs")),
        Task("add", (2, 3)),
        Task("multiply", (6, 7)),
        Task("sum_list", (list(range(1, 11)),)),
        Task("count_primes", (30_000,)),
        Task("count_primes", (30_001,)),
        Task("sleep", (0.2,)),
        Task("sleep", (0.2,)),
        Task("write_text", (path, "written by a task\n")),
        Task("print_line", ("This line is printed by an IOTask on the client's terminal.",)),
        Task("prompt", ("What is your name? ", "stranger")),  # the default: when stdin is closed
    ]


def list_tasks() -> None:
    """Print the standard task library."""
    for name, fn in sorted(REGISTRY.items()):
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<14}{' [IO]' if is_io(fn) else '     '} {doc}")


def make_client(phase: int, executors: int) -> Client:
    """The client of each phase, registered as the foreground executor run by this thread."""
    if phase == 1:
        return Client.in_process(executors=0, foreground="caller", io_only=False)
    if phase == 2:
        return Client.in_process(executors=executors, foreground="caller", io_only=False)
    return Client(foreground="caller")


@entry_point
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cs-demo``."""
    parser = argparse.ArgumentParser(prog="cs-demo", description="Show taskcs phase by phase.")
    parser.add_argument("--phase", type=int, choices=(1, 2, 3, 4), default=2)
    parser.add_argument("-e", "--executors", type=int, default=2, help="executor threads in phase 2")
    parser.add_argument("--tasks", metavar="FILE", help="a task file (JSON or TOML) to run instead")
    parser.add_argument("--list", action="store_true", help="list the standard tasks and exit")
    parser.add_argument("--engine", metavar="SPEC", help="run the work on a cluster engine: dask-local, "
                        "dask://HOST:PORT, ... (issue 14)")
    args = parser.parse_args(argv)
    if args.list:
        list_tasks()
        return 0
    if args.engine:
        return _engine_demo(args)
    if args.phase == 4:
        return _phase4(args)
    try:
        tasks = load_tasks(args.tasks) if args.tasks else builtin_tasks()
        check_tasks(tasks)
        client = make_client(args.phase, max(1, args.executors))
    except TaskcsError as exc:
        print(f"cs-demo: {exc}", file=sys.stderr)
        return 2
    where = {1: "the client's main thread only", 2: f"client + {args.executors} executor threads",
             3: f"cs-server pid {client.server_pid} and its executor processes"}[args.phase]
    print(f"taskcs phase {args.phase}: {len(tasks)} tasks on {where}", flush=True)
    try:
        return run_and_report(client, tasks)
    except TaskcsError as exc:
        print(f"cs-demo: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, BrokenPipeError) as exc:
        client.abort()  # running tasks are not waited for: the server discards their results
        if isinstance(exc, BrokenPipeError):
            raise
        return 130
    finally:
        client.shutdown(cancel_futures=True)


def _report_and_close(client: Client, tasks: list[Task]) -> int:
    """Run the set with the report on this terminal; the client is shut down whatever happens."""
    try:
        return run_and_report(client, tasks)
    finally:
        client.shutdown(cancel_futures=True)


def _phase4(args: argparse.Namespace) -> int:
    from .federated import extra_tasks, two_servers

    try:
        tasks = load_tasks(args.tasks) if args.tasks else builtin_tasks() + extra_tasks()
        check_tasks(tasks)
        with two_servers() as (alpha, beta):
            assert alpha.record is not None
            client = Client(alpha.record.endpoint, foreground="caller", autostart=False)
            print(f"taskcs phase 4: {len(tasks)} tasks on server alpha (pid {alpha.record.pid}, {alpha.listen}), "
                  f"federated with beta ({beta.listen}); IOTasks on this terminal", flush=True)
            return _report_and_close(client, tasks)
    except TaskcsError as exc:
        print(f"cs-demo: {exc}", file=sys.stderr)
        return 2


# ---- issue 14
def _engine_demo(args: argparse.Namespace) -> int:
    """A private cs-server with no executors of its own: all but the IOTasks go to the engine."""
    import shutil
    import signal

    from ..engines import EngineError, preflight
    from ..runtime import discovery

    try:
        preflight(args.engine)
        tasks = load_tasks(args.tasks) if args.tasks else builtin_tasks()
        check_tasks(tasks)
    except (TaskcsError, EngineError) as exc:
        print(f"cs-demo: {exc}", file=sys.stderr)
        return 2
    directory = tempfile.mkdtemp(prefix="tcs-demo-")
    record = None
    try:
        record = discovery.spawn_server(Path(directory), ["--executors", "0", "--engine", args.engine,
                                                          "--idle-timeout", "0"])
        client = Client(record.endpoint, foreground="caller", autostart=False)
        print(f"taskcs with engine {args.engine}: {len(tasks)} tasks on cs-server pid {record.pid} (no executors "
              "of its own: the work runs on the engine's workers, IOTasks on this terminal)", flush=True)
        return _report_and_close(client, tasks)
    except TaskcsError as exc:
        print(f"cs-demo: {exc}", file=sys.stderr)
        return 2
    finally:
        if record is not None and discovery.pid_alive(record.pid):
            os.kill(record.pid, signal.SIGTERM)  # the server we started, by its pid
            deadline = time.monotonic() + 30
            while discovery.pid_alive(record.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(directory, ignore_errors=True)
# ---- end issue 14


if __name__ == "__main__":
    sys.exit(main())
