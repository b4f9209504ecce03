"""cs-client end to end: a real cs-client process against a real cs-server (phase 3).

IOTasks run in the cs-client process on its own stdin/stdout; the other tasks run on the
server's executors and what they print is forwarded back, marked with its task.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from taskcs.runtime import discovery
from tests.conftest import run_cli, server_status, wait_until

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(30)]

DATA = Path(__file__).parent / "data"


def _result_lines(stdout: str) -> dict[str, str]:
    """{label: "value  on executor"} from the reporter's ``[   n] label = value  on x`` lines.

    Searched, not matched: a prompt without a newline shares its line with the next result.
    """
    out = {}
    for line in stdout.splitlines():
        m = re.search(r"\[\s*\d+\] (\S+) (?:= |FAILED )(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def test_cs_client_autostarts_a_server_and_runs_one_task(runtime_dir: Path) -> None:
    proc = run_cli("cs-client", "add", "1", "2")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\] add = 3 +on exec-\d+", proc.stdout), proc.stdout
    assert "1/1 tasks succeeded" in proc.stdout
    record = discovery.read_record(runtime_dir)
    assert record is not None and discovery.pid_alive(record.pid)  # the server outlives its client
    # let the auto-started pool finish joining, so teardown does not race it
    wait_until(lambda: len(server_status(runtime_dir)["executors"]) == (os.cpu_count() or 1),
               what="the auto-started executors")


def test_iotask_reads_the_line_piped_into_cs_client(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    proc = run_cli("cs-client", "prompt", "name? ", input="Alice\n")
    assert proc.returncode == 0, proc.stderr
    assert "name? " in proc.stdout
    assert re.search(r"\] prompt = 'Alice' +on client-\d+", proc.stdout), proc.stdout


def test_iotask_with_stdin_closed_fails_with_exit_code_1(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    proc = run_cli("cs-client", "prompt", input="")
    assert proc.returncode == 1
    assert "EOFError: stdin closed before a line was read" in proc.stderr


@pytest.mark.parametrize("task_file", ["tasks.json", "tasks.toml"])
def test_task_file(runtime_dir: Path, start_server: Any, task_file: str) -> None:
    start_server(executors=2)
    proc = run_cli("cs-client", "--tasks", task_file, input="Bob\n", cwd=DATA)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = _result_lines(proc.stdout)
    flavour = task_file.rsplit(".", 1)[1]
    assert results["add"].startswith("3 ")
    assert results["product"].startswith("42 ")
    assert re.match(r"15 +on exec-\d+$", results["usertasks:triple"])  # user code ran on an executor
    assert results["usertasks:greet"].startswith(f"'hello {flavour}?'")
    assert re.match(r"'Bob' +on client-\d+$", results["prompt"])
    assert re.match(r"'printed by an IOTask' +on client-\d+$", results["print_line"])
    # printed raw on the client's terminal (print() writes text and newline separately, so another
    # thread's line may land in between: only the text is checked), and forwarded output is marked
    assert "printed by an IOTask" in proc.stdout.replace("'printed by an IOTask'", "")
    assert re.search(r"\[print_text#5\] printed on an executor$", proc.stdout, re.M), proc.stdout
    assert "7/7 tasks succeeded" in proc.stdout


def test_failing_task_exits_1_with_the_remote_traceback(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    proc = run_cli("cs-client", "fail", "boom")
    assert proc.returncode == 1
    assert re.search(r"\] fail FAILED on exec-\d+: RuntimeError: boom", proc.stdout), proc.stdout
    assert "0/1 tasks succeeded" in proc.stdout
    assert "--- task 1 (fail) failed on exec-" in proc.stderr
    assert "Traceback (most recent call last):" in proc.stderr
    assert re.search(r'File ".*stdlib_tasks.*", line \d+, in fail', proc.stderr), proc.stderr
    assert "RuntimeError: boom" in proc.stderr


def test_forwarded_output_is_marked_with_its_task(runtime_dir: Path, start_server: Any) -> None:
    start_server(executors=1)
    shown = run_cli("cs-client", "print_text", "hello")
    assert shown.returncode == 0, shown.stderr
    assert "[print_text#1] hello" in shown.stdout.splitlines()
    hidden = run_cli("cs-client", "--no-forward-output", "print_text", "hello")
    assert hidden.returncode == 0, hidden.stderr
    assert "[print_text#1] hello" not in hidden.stdout.splitlines()
    assert "print_text = 'hello'" in hidden.stdout  # the result itself is still reported


def test_explicit_server_address(runtime_dir: Path, start_server: Any) -> None:
    record = start_server(executors=1)
    proc = run_cli("cs-client", "--server", record.endpoint, "multiply", "3", "4")
    assert proc.returncode == 0, proc.stderr
    assert "multiply = 12" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", str(DATA / "unknown_task.json")], "unknown task 'no_such_task'"),
        (["no_such_task", "1"], "unknown task 'no_such_task'"),
        (["add", "1"], "wrong arguments"),
        (["nomodule_xyz:f"], "cannot import module 'nomodule_xyz'"),
        (["--tasks", str(DATA / "missing.json")], "missing.json: cannot read task file"),
    ],
    ids=["unknown-in-file", "unknown-quick-form", "wrong-arity", "missing-module", "missing-file"],
)
def test_rejected_tasks_exit_2_with_a_clear_error(
    runtime_dir: Path, start_server: Any, args: list[str], message: str
) -> None:
    start_server(executors=1)
    proc = run_cli("cs-client", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert server_status(runtime_dir)["stats"]["submitted"] == 0  # nothing of the set was sent


def test_bad_task_files_exit_2_naming_the_file_and_entry(runtime_dir: Path, tmp_path: Path) -> None:
    cases = {
        "syntax.json": ('{"tasks": [', "cannot read task file"),
        "empty.json": ('{"tasks": []}', "expected a non-empty list"),
        "nameless.json": ('[{"args": [1]}]', "task #1: each task needs a 'task' name"),
        "extra.toml": ('[[tasks]]\ntask = "add"\nargs = [1, 2]\ncolour = "red"\n', "task #1: unknown keys ['colour']"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        proc = run_cli("cs-client", "--tasks", str(tmp_path / name))
        assert proc.returncode == 2, (name, proc.stderr)
        assert f"{tmp_path / name}: " in proc.stderr and message in proc.stderr, (name, proc.stderr)
    assert discovery.read_record(runtime_dir) is None  # rejected before any server was needed


def test_usage_errors_exit_2(runtime_dir: Path) -> None:
    neither = run_cli("cs-client")
    assert neither.returncode == 2 and "give either --tasks FILE or a TASK" in neither.stderr
    both = run_cli("cs-client", "--tasks", "x.json", "add")
    assert both.returncode == 2


def test_no_autostart_without_a_server_exits_2(runtime_dir: Path) -> None:
    proc = run_cli("cs-client", "--no-autostart", "add", "1", "2")
    assert proc.returncode == 2
    assert "no taskcs server is running" in proc.stderr
    assert discovery.read_record(runtime_dir) is None


def test_non_loopback_tcp_bind_is_refused_without_force(runtime_dir: Path) -> None:
    out = run_cli("cs-server", "--endpoint", "tcp://0.0.0.0:5999", "--executors", "1")
    assert out.returncode == 1 and "refusing to bind" in out.stderr and "--insecure-bind" in out.stderr
    assert discovery.read_record(runtime_dir) is None  # nothing was started


@pytest.mark.multiprocess
def test_loopback_tcp_endpoint_serves_clients_by_address(runtime_dir: Path) -> None:
    import socket

    import taskcs

    with socket.socket() as s:  # a free loopback port, released for the server to take
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    out = run_cli("cs-server", "start", "--endpoint", address, "--executors", "1")
    assert out.returncode == 0, out.stderr
    with taskcs.Client(address, foreground=None, autostart=False) as client:
        assert client.submit("multiply", 6, 7).result(timeout=10) == 42
