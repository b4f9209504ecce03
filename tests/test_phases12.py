"""cs-demo end to end, phase by phase, plus the in-process (phase 1-2) Client API.

Phases 1 and 2 run wholly inside the cs-demo process (queue transport, executor threads);
phase 3 auto-starts a cs-server. In every phase the prompt IOTask must read the line we feed
on stdin in the client's own process, and the report must say which executor ran each task.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest

from taskcs import Client, RemoteTraceback, Task, io_task
from taskcs.runtime import discovery
from tests.conftest import run_cli, server_status, wait_until

DATA = Path(__file__).parent / "data"

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def demo_env(tmp_path: Path) -> dict[str, str]:
    """The built-in demo writes a file into the temp dir: keep it in this test's tmp_path."""
    return {"TMPDIR": str(tmp_path)}


def _executors_by_label(stdout: str) -> dict[str, list[str]]:
    """{task label: [executor names]} from the reporter's ``[   n] label = value  on x`` lines."""
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"\[\s*\d+\] (\S+) = .*?  on (\S+)$", stdout, re.M):
        out.setdefault(m.group(1), []).append(m.group(2))
    return out


def _settle_autostarted(runtime_dir: Path) -> None:
    """Wait for an auto-started server's pool to finish joining, so teardown does not race it."""
    wait_until(lambda: len(server_status(runtime_dir)["executors"]) == (os.cpu_count() or 1),
               what="the auto-started executors")


def _check_demo_output(stdout: str) -> dict[str, list[str]]:
    assert "What is your name? " in stdout
    assert re.search(r"\] prompt = 'Alice' +on client-\d+$", stdout, re.M), stdout
    # in the output, though not always on a line of its own: print() writes the text and its
    # newline separately, and a result line from another thread may land in between
    assert "This line is printed by an IOTask on the client's terminal." in stdout
    assert "11/11 tasks succeeded" in stdout
    where = _executors_by_label(stdout)
    assert sum(len(v) for v in where.values()) == 11, stdout
    assert all(name.startswith("client-") for name in where["prompt"] + where["print_line"])
    return where


@pytest.mark.parametrize("executors", ["1", "2"])
def test_demo_phase_1_runs_everything_on_the_clients_main_thread(
    runtime_dir: Path, demo_env: dict[str, str], executors: str
) -> None:
    proc = run_cli("cs-demo", "--phase", "1", "-e", executors, input="Alice\n", timeout=30, env=demo_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "taskcs phase 1: 11 tasks on the client's main thread only" in proc.stdout
    where = _check_demo_output(proc.stdout)
    assert {name for names in where.values() for name in names} == {where["prompt"][0]}
    assert discovery.read_record(runtime_dir) is None  # no server in phase 1


def test_demo_phase_2_uses_executor_threads_and_keeps_iotasks_on_the_client(
    runtime_dir: Path, demo_env: dict[str, str]
) -> None:
    proc = run_cli("cs-demo", "--phase", "2", "-e", "2", input="Alice\n", timeout=30, env=demo_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "taskcs phase 2: 11 tasks on client + 2 executor threads" in proc.stdout
    where = _check_demo_output(proc.stdout)
    used = {name for names in where.values() for name in names}
    assert used & {"thread-1", "thread-2"}, used
    assert used <= {"thread-1", "thread-2", where["prompt"][0]}
    assert discovery.read_record(runtime_dir) is None  # still no server in phase 2


@pytest.mark.multiprocess
def test_demo_phase_3_autostarts_a_server_with_executor_processes(
    runtime_dir: Path, demo_env: dict[str, str]
) -> None:
    proc = run_cli("cs-demo", "--phase", "3", input="Alice\n", timeout=30, env=demo_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = discovery.read_record(runtime_dir)
    assert record is not None
    assert f"taskcs phase 3: 11 tasks on cs-server pid {record.pid} and its executor processes" in proc.stdout
    where = _check_demo_output(proc.stdout)
    plain = [name for label, names in where.items() if label not in ("prompt", "print_line") for name in names]
    assert plain and all(re.fullmatch(r"exec-\d+", name) for name in plain), where
    _settle_autostarted(runtime_dir)


def test_demo_list_shows_the_standard_tasks(runtime_dir: Path) -> None:
    proc = run_cli("cs-demo", "--list")
    assert proc.returncode == 0
    assert re.search(r"^\s+prompt\s+\[IO\] ", proc.stdout, re.M)
    assert re.search(r"^\s+add\s+Return a \+ b\.", proc.stdout, re.M)


@pytest.mark.parametrize("phase", ["1", "2"])
@pytest.mark.parametrize("task_file", ["tasks.json", "tasks.toml"])
def test_demo_with_a_user_task_file(runtime_dir: Path, phase: str, task_file: str) -> None:
    proc = run_cli("cs-demo", "--phase", phase, "--tasks", task_file, input="Carol\n", cwd=DATA, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usertasks:triple = 15" in proc.stdout  # a module:function from the user's directory
    assert f"usertasks:greet = 'hello {task_file.split('.')[1]}?'" in proc.stdout
    assert "prompt = 'Carol'" in proc.stdout
    assert "7/7 tasks succeeded" in proc.stdout


@pytest.mark.parametrize("phase", ["1", "2", pytest.param("3", marks=pytest.mark.multiprocess)])
def test_demo_unknown_task_in_file_exits_2(runtime_dir: Path, phase: str) -> None:
    proc = run_cli("cs-demo", "--phase", phase, "--tasks", str(DATA / "unknown_task.json"), timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cs-demo: unknown task 'no_such_task'" in proc.stderr
    assert "Traceback" not in proc.stderr
    if phase == "3" and discovery.read_record(runtime_dir) is not None:
        _settle_autostarted(runtime_dir)


# --------------------------------------------------------------- the API, in process
def test_phase1_client_is_its_own_only_executor() -> None:
    with Client.in_process(executors=0, foreground="caller", io_only=False) as client:
        ts = client.submit_set([Task("add", (1, 2)), Task(lambda: threading.current_thread().name)])
        client.run_foreground(until=ts.done)
        assert ts.results(timeout=0) == [3, threading.current_thread().name]
        assert {f.executor for f in ts.futures} == {client.name}


def test_phase2_threads_run_plain_tasks_and_the_client_runs_iotasks() -> None:
    @io_task
    def where() -> str:
        return threading.current_thread().name

    with Client.in_process(executors=2) as client:  # foreground: a thread of this client
        plain = [client.submit(lambda: threading.current_thread().name) for _ in range(4)]
        io = client.submit(where)
        assert io.result(timeout=10) == "taskcs-foreground"
        assert io.executor == client.name
        assert all(f.result(timeout=10) != "taskcs-foreground" for f in plain)
        assert {f.executor for f in plain} <= {"thread-1", "thread-2"}  # known once done
        assert list(client.map(lambda x: x + 1, range(20), chunksize=6)) == list(range(1, 21))

        def explode() -> None:
            raise KeyError("missing")

        with pytest.raises(KeyError, match="missing") as info:
            client.submit(explode).result(timeout=10)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "in explode" in info.value.__cause__.tb


def test_demo_with_stdin_closed_still_succeeds(demo_env: dict[str, str]) -> None:
    # `make demo` under CI or `< /dev/null`: the prompt IOTask falls back to its default.
    proc = run_cli("cs-demo", "--phase", "2", input="", env=demo_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\] prompt = 'stranger' +on client-\d+$", proc.stdout, re.M), proc.stdout
    assert "11/11 tasks succeeded" in proc.stdout
