"""Phase 4 end to end: federated cs-servers on loopback TCP with CURVE, real processes.

Every server has its own runtime dir, config dir and key pair (tests/federation.py); tasks
are asserted by where they ran (``future.executor`` names the peer server).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import os
import re
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

import taskcs
from taskcs.runtime import keys
from taskcs.runtime import protocol as p
from tests.conftest import run_cli, wait_until
from tests.federation import Node, executors_of, nodes_fixture  # noqa: F401 - the `nodes` fixture

pytestmark = pytest.mark.multiprocess


def client_of(node: Node, **kwargs: Any) -> taskcs.Client:
    """A local client of ``node``'s server (ipc, no auto-start)."""
    return taskcs.Client(node.ipc(), autostart=False, **kwargs)


def test_a_set_spreads_over_three_servers_in_order_with_iotasks_on_the_client(nodes: Any) -> None:
    a, b, c = nodes("alpha", "beta", "gamma")
    a.start()
    b.start(a)
    c.start(a, b)
    a.wait_linked("beta", "gamma")
    b.wait_linked("alpha", "gamma")
    printed: list[str] = []
    with client_of(a, on_output=lambda fut, text: printed.append(text)) as client:
        tasks = [taskcs.Task("sleep", (0.3,)) for _ in range(9)]
        tasks.insert(4, taskcs.Task("print_line", ("an IOTask on the client's terminal",)))
        ts = client.submit_set(tasks)
        results = ts.results()
        futures = list(ts.futures)
    assert len(results) == 10
    assert results[4] == "an IOTask on the client's terminal"
    assert all(isinstance(r, float) and r >= 0.3 for i, r in enumerate(results) if i != 4)
    ran = collections.Counter(f.executor.rpartition(":")[0] for i, f in enumerate(futures) if i != 4)
    assert set(ran) == {"", "beta", "gamma"}, ran  # "" = alpha's own executor
    assert futures[4].executor == client.name  # the IOTask ran on this client's own terminal
    peers = a.peers()
    assert peers["beta"]["forwarded"] == peers["beta"]["returned"] == ran["beta"]


def test_output_cancellation_and_status_across_servers(nodes: Any) -> None:
    a, b = nodes("alpha", "beta")
    a.start(executors=0)  # everything runs on the peer
    b.start(a)
    a.wait_linked("beta")
    printed: list[str] = []
    with client_of(a, on_output=lambda fut, text: printed.append(text)) as client:
        fut = client.submit("print_text", "printed on beta")
        assert fut.result(timeout=20) == "printed on beta"
        assert fut.executor.startswith("beta:exec-")
        wait_until(lambda: any("printed on beta" in t for t in printed), what="output forwarded from beta")
        running = client.submit("sleep", 1.5)
        queued = [client.submit("sleep", 5) for _ in range(3)]
        # beta's one executor runs the first; unmeasured tasks get a window of one, so the rest
        # wait at alpha (or at beta): either way cancel() cancels them
        wait_until(lambda: _busy_executors(b) == 1, what="a task on beta")
        assert [q.cancel() for q in queued] == [True, True, True]
        assert running.cancel() is False
        assert running.result(timeout=20) >= 1.5
        for q in queued:
            with pytest.raises(cf.CancelledError):
                q.result(timeout=20)
    info = a.status()
    assert info["stats"]["cancelled"] >= 1
    out = run_cli("cs-server", "status", env=a.env())
    assert "beta" in out.stdout and "peers (1)" in out.stdout, out.stdout
    js = json.loads(run_cli("cs-server", "status", "--json", env=a.env()).stdout)
    peer = js["peers"][0]
    assert {"name", "endpoint", "connected", "capacity", "forwarded", "returned"} <= set(peer)
    assert peer["forwarded"] >= 2 and peer["returned"] >= 2
    bjs = json.loads(run_cli("cs-server", "status", "--json", env=b.env()).stdout)
    assert bjs["peers"][0]["endpoint"].startswith("tcp://127.0.0.1:")
    assert bjs["peers"][0]["connected"] is True


def test_remote_client_with_a_trusted_key(nodes: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    a, me = nodes("alpha", "laptop")
    a.start()
    monkeypatch.setenv("TASKCS_CONFIG_DIR", str(me.config))
    with taskcs.Client(a.address, autostart=False) as client:
        assert client.submit("add", 2, 3).result(timeout=20) == 5
    out = run_cli("cs-client", "--server", a.address, "add", "1", "2", env=me.env())
    assert out.returncode == 0 and "= 3" in out.stdout, out.stdout + out.stderr
    stranger = tempfile.mkdtemp(prefix="tcs-stranger-", dir="/tmp")
    try:
        pair, _ = keys.init(Path(stranger))
        monkeypatch.setenv("TASKCS_CONFIG_DIR", stranger)
        with pytest.raises(taskcs.ServerStartError, match="keys trust " + re.escape(pair.public.decode())):
            taskcs.Client(a.address, autostart=False, connect_timeout=1.5, reconnect_timeout=0)
    finally:
        import shutil

        shutil.rmtree(stranger, ignore_errors=True)


def _raw_submit_mkdir(endpoint: str, target: Path, curve: tuple[bytes, bytes, bytes] | None) -> None:
    """Try to run os.mkdir(target) on a server with a hand-made connection."""
    import pickle

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
    sock.connect(endpoint)
    try:
        sock.send(p.to_wire(p.Hello("client", "intruder", os.getpid())))
        payload = pickle.dumps((str(target),), protocol=5)
        sock.send(p.to_wire(p.Submit(1, [(1, "ref:os:mkdir", payload, 0, 0)], {}, True)))
        sock.poll(1500)
    finally:
        sock.close(linger=0)


def test_unknown_key_no_key_and_plaintext_run_nothing(nodes: Any, tmp_path: Path) -> None:
    a, friend = nodes("alpha", "friend")
    a.start()
    server_key = a.key.encode()
    stranger_pub, stranger_sec = zmq.curve_keypair()
    friend_pair = keys.load(friend.config)
    wrong_server_pub, _ = zmq.curve_keypair()
    attempts = {
        "plaintext": None,
        "untrusted key": (server_key, stranger_pub, stranger_sec),
        "wrong server key": (wrong_server_pub, friend_pair.public, friend_pair.secret),
    }
    for what, curve in attempts.items():
        marker = tmp_path / what.replace(" ", "-")
        for _ in range(3):
            _raw_submit_mkdir(a.endpoint, marker, curve)
        assert not marker.exists(), f"{what}: a task ran"
    # The control: the same hand-made submission with a trusted key does run.
    ok = tmp_path / "trusted"
    _raw_submit_mkdir(a.endpoint, ok, (server_key, friend_pair.public, friend_pair.secret))
    wait_until(ok.exists, what="the trusted submission to run")
    refusals = [line for line in a.log().splitlines() if "refused a connection from untrusted key" in line]
    assert len(refusals) == 1, refusals  # rate-limited: one line per key a minute
    assert stranger_pub.decode() in refusals[0]


def test_listen_without_keys_is_refused_and_says_what_to_run(tmp_path: Path) -> None:
    env = {"TASKCS_CONFIG_DIR": str(tmp_path / "cfg"), "TASKCS_RUNTIME_DIR": str(tmp_path / "rt")}
    out = run_cli("cs-server", "serve", "--listen", "tcp://127.0.0.1:*", env=env, timeout=30)
    assert out.returncode == 1
    assert "cs-server keys init" in out.stderr


def test_keys_commands_and_unsafe_permissions(tmp_path: Path) -> None:
    env = {"TASKCS_CONFIG_DIR": str(tmp_path / "cfg")}
    first = run_cli("cs-server", "keys", "init", env=env)
    assert first.returncode == 0 and keys.valid_key(first.stdout.strip())
    assert run_cli("cs-server", "keys", "init", env=env).stdout == first.stdout  # kept, not replaced
    assert run_cli("cs-server", "keys", "show", env=env).stdout == first.stdout
    assert oct((tmp_path / "cfg" / keys.SECRET).stat().st_mode & 0o777) == "0o600"
    other = zmq.curve_keypair()[0].decode()
    assert run_cli("cs-server", "keys", "trust", other, env=env).returncode == 0
    assert other in run_cli("cs-server", "keys", "list", env=env).stdout
    bad = run_cli("cs-server", "keys", "trust", "not-a-key", env=env)
    assert bad.returncode == 1 and "not a CURVE public key" in bad.stderr
    dashed = next(k for k in iter(lambda: zmq.curve_keypair()[0].decode(), "") if k.startswith("-"))
    assert run_cli("cs-server", "keys", "trust", dashed, env=env).returncode == 0  # not taken for an option
    assert dashed in run_cli("cs-server", "keys", "list", env=env).stdout
    os.chmod(tmp_path / "cfg" / keys.SECRET, 0o644)
    unsafe = run_cli("cs-server", "keys", "show", env=env)
    assert unsafe.returncode == 1 and "chmod 600" in unsafe.stderr
    os.chmod(tmp_path / "cfg" / keys.SECRET, 0o600)
    os.chmod(tmp_path / "cfg", 0o755)
    assert "chmod 700" in run_cli("cs-server", "keys", "show", env=env).stderr


def test_a_peer_of_another_protocol_is_refused_with_both_versions(nodes: Any) -> None:
    a, friend = nodes("alpha", "friend")
    a.start()
    pair = keys.load(friend.config)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = a.key.encode(), pair.public, pair.secret
    sock.connect(a.endpoint)
    try:
        sock.send(p.to_wire(p.Hello("server", "future", os.getpid(), 4, python="3.11", features=p.FEATURES + 7)))
        replies = []
        while sock.poll(5000):
            replies.append(p.from_wire(sock.recv()))
            if isinstance(replies[-1], p.Bye):
                break
    finally:
        sock.close(linger=0)
    errors = [m.text for m in replies if isinstance(m, p.Error)]
    assert errors and f"{p.VERSION}.{p.FEATURES + 7}" in errors[0] and f"{p.VERSION}.{p.FEATURES}" in errors[0]
    assert "refusing peer server 'future'" in a.log()
    assert "future" not in a.peers()


def _sleepy_set(client: taskcs.Client, n: int, seconds: float) -> list[Any]:
    return [client.submit("sleep", seconds) for _ in range(n)]


def test_sigkill_of_a_peer_mid_set_loses_and_duplicates_nothing(nodes: Any) -> None:
    a, b = nodes("alpha", "beta")
    a.start()
    b.start(a)
    a.wait_linked("beta")
    with client_of(a) as client:
        futures = [client.submit("identity", i) for i in range(5)]  # warm up: durations unknown still
        assert [f.result(timeout=20) for f in futures] == list(range(5))
        slow = [client.submit("burn", 0.15) for _ in range(16)]
        wait_until(lambda: a.peers()["beta"]["in_flight"] > 0, what="work forwarded to beta")
        b.status()  # remember beta's executor pids for cleanup
        b.kill()
        results = [f.result(timeout=60) for f in slow]
    assert all(isinstance(r, int) and r > 0 for r in results)
    info = a.status()
    assert info["stats"]["done"] == 21 and info["stats"]["failed"] == 0, info["stats"]
    assert info["stats"]["retried"] >= 1  # beta's unfinished tasks ran again here
    # A restarted peer with the same key is accepted again.
    b.start(a)
    a.wait_linked("beta")


def test_sigstop_past_liveness_then_sigcont(nodes: Any) -> None:
    a, b = nodes("alpha", "beta")
    a.start()
    b.start(a)
    a.wait_linked("beta")
    with client_of(a) as client:
        futures = [client.submit("multiply", i, 3) for i in range(3)]
        assert [f.result(timeout=20) for f in futures] == [0, 3, 6]
        slow = [client.submit("burn", 0.2) for _ in range(12)]
        wait_until(lambda: a.peers()["beta"]["in_flight"] > 0, what="work forwarded to beta")
        b.signal(signal.SIGSTOP)
        # liveness is 5 heartbeats of 0.2 s: wait until alpha has declared beta lost
        wait_until(lambda: "beta" not in a.peers(), timeout=15, what="beta declared lost")
        b.signal(signal.SIGCONT)
        results = [f.result(timeout=60) for f in slow]
        assert all(isinstance(r, int) and r > 0 for r in results)
        a.wait_linked("beta")  # it comes back by itself
        again = [client.submit("add", i, 1) for i in range(40)]
        assert [f.result(timeout=30) for f in again] == [i + 1 for i in range(40)]
    stats = a.status()["stats"]
    assert stats["failed"] == 0 and stats["done"] == 3 + 12 + 40, stats


def test_work_flows_both_ways_over_one_link(nodes: Any) -> None:
    a, b = nodes("alpha", "beta")
    a.start()
    b.start(a)  # beta dialled alpha; alpha's work still reaches beta, and beta's alpha
    a.wait_linked("beta")
    b.wait_linked("alpha")
    for origin, other in ((a, "beta"), (b, "alpha")):
        with client_of(origin) as client:
            futures = _sleepy_set(client, 6, 0.3)
            [f.result(timeout=30) for f in futures]
        assert other in executors_of(futures), (origin.name, [f.executor for f in futures])


def test_the_phase4_demo_spreads_one_set_over_two_servers_and_cleans_up() -> None:
    out = run_cli("cs-demo", "--phase", "4", timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " on exec-1" in out.stdout and " on beta:exec-1" in out.stdout, out.stdout
    assert "18/18 tasks succeeded" in out.stdout
    assert "What is your name? " in out.stdout
    import subprocess

    left = subprocess.run(["pgrep", "-f", "taskcs-phase4-"], capture_output=True, text=True).stdout.split()
    assert not left, f"demo servers left running: {left}"


USERLIB = (Path(__file__).parent / "data" / "userlib.py").read_text()

USER_SCRIPT = '''
import operator, os, sys
import taskcs
from userlib import Point, norm, scaled

with taskcs.Client(os.environ["ALPHA"], autostart=False, foreground=None) as c:
    a = c.submit(norm, Point(3, 4))
    b = c.submit(operator.call, norm, Point(6, 8))
    d = c.submit(scaled, Point(1, 2), 3)
    e = c.submit("read_text", os.path.abspath("userlib.py"))
    print("norm", a.result(timeout=30), a.executor)
    print("call", b.result(timeout=30), b.executor)
    p = d.result(timeout=30)
    print("scaled", type(p).__module__, p.x, p.y, d.executor)
    try:
        e.result(timeout=30)
        print("read", "readable", e.executor)
    except Exception as exc:
        print("read", type(exc).__name__, e.executor)
'''


def _can_unshare() -> str | None:
    import shutil
    import subprocess

    if os.geteuid() != 0:
        return "needs root for a mount namespace (unshare -m)"
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return None if probe.returncode == 0 else f"unshare -m fails here: {probe.stderr.decode().strip()}"


@pytest.mark.skipif(_can_unshare() is not None, reason=str(_can_unshare()))
def test_code_travels_to_a_peer_that_cannot_read_the_users_module(nodes: Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    project = Path(tempfile.mkdtemp(prefix="tcs-user-", dir="/tmp"))
    try:
        (project / "userlib.py").write_text(USERLIB)
        (project / "script.py").write_text(USER_SCRIPT)
        a, b = nodes("alpha", "beta")
        a.start(executors=0)  # every task must run on beta
        # beta lives in its own mount namespace with an empty tmpfs over the user's project.
        b.start(a, prefix=["unshare", "-m", "sh", "-c", f'mount -t tmpfs tmpfs {project} && exec "$@"', "sh"])
        a.wait_linked("beta")
        env = {**a.env(), "ALPHA": a.ipc()}
        out = subprocess.run([sys.executable, "script.py"], cwd=project, env=env, capture_output=True,
                             text=True, timeout=90)
    finally:
        import shutil

        shutil.rmtree(project, ignore_errors=True)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()}
    assert lines["read"][0] == "FileNotFoundError" and lines["read"][1].startswith("beta:")  # beta cannot see it
    assert lines["norm"][0] == "5.0" and lines["norm"][1].startswith("beta:")
    assert lines["call"][0] == "10.0" and lines["call"][1].startswith("beta:")
    assert lines["scaled"][:3] == ["userlib", "3", "6"] and lines["scaled"][3].startswith("beta:")


def test_a_restarted_listener_with_the_same_key_is_linked_again(nodes: Any) -> None:
    a, b = nodes("alpha", "beta")
    a.start()
    b.start(a)
    b.wait_linked("alpha")
    endpoint = a.endpoint
    a.status()
    a.kill()
    a.stop()  # its executors too
    a.start(endpoint=endpoint)  # same key, same port: beta's link must find it again by itself
    a.wait_linked("beta")
    b.wait_linked("alpha")
    with client_of(b) as client:
        futures = _sleepy_set(client, 6, 0.3)
        [f.result(timeout=30) for f in futures]
    assert "alpha" in executors_of(futures)


def _busy_executors(node: Node) -> int:
    return sum(ex["in_flight"] for ex in node.status()["executors"] if not ex["stdio"])


def test_forced_cancel_a_leaving_client_and_stop_now_reach_forwarded_tasks(nodes: Any) -> None:
    a, b = nodes("alpha", "beta")
    a.start(executors=0)  # every task runs on beta
    b.start(a)
    a.wait_linked("beta")
    with client_of(a) as client:
        fut = client.submit("sleep", 60)
        wait_until(lambda: _busy_executors(b) == 1, what="the task running on beta")
        started = time.monotonic()
        assert fut.cancel() is False  # it runs on beta: as concurrent.futures, cancel() says no
        assert time.monotonic() - started < 1.5  # beta answered; no time-out
        assert client.cancel(fut, force=True)
        wait_until(lambda: _busy_executors(b) == 0, timeout=15, what="beta's executor to stop the task")
        assert client.submit("add", 1, 1).result(timeout=20) == 2  # beta's executor serves again
        client.submit("sleep", 60)
        wait_until(lambda: _busy_executors(b) == 1, what="a second task running on beta")
        client.shutdown(wait=False, cancel_futures=True)  # the client leaves with its task running
    wait_until(lambda: _busy_executors(b) == 0, timeout=15, what="beta to stop the gone client's task")
    with client_of(a) as client:
        client.submit("sleep", 60)
        wait_until(lambda: _busy_executors(b) == 1, what="a third task running on beta")
        assert run_cli("cs-server", "stop", "--now", env=a.env()).returncode == 0
    wait_until(lambda: _busy_executors(b) == 0, timeout=15, what="beta to stop the stopped origin's task")
    assert "alpha" not in b.peers()


def test_start_on_a_running_server_says_its_new_options_are_not_applied(nodes: Any) -> None:
    (a,) = nodes("alpha")
    first = run_cli("cs-server", "start", "--executors", "1", "--idle-timeout", "30", env=a.env())
    assert first.returncode == 0 and "started" in first.stdout, first.stdout + first.stderr
    try:
        again = run_cli("cs-server", "start", "--listen", "tcp://127.0.0.1:*", env=a.env())
        assert again.returncode == 0 and "already running" in again.stdout
        assert "not applied" in again.stderr, again.stderr
        assert not a.status().get("listen")
    finally:
        run_cli("cs-server", "stop", "--now", env=a.env())


def test_a_dead_listener_is_noticed_by_its_connection_closing_not_heartbeat_silence(nodes: Any) -> None:
    a, b = nodes("alpha", "beta")
    # Heartbeats 5 s apart: silence alone would take 25 s (5 x liveness) to declare alpha lost.
    a.start(heartbeat=5.0)
    b.start(a, executors=0, heartbeat=5.0)  # beta dials alpha and runs nothing itself
    b.wait_linked("alpha")
    client = client_of(b)
    try:
        [client.submit("sleep", 30) for _ in range(2)]
        wait_until(lambda: b.peers()["alpha"]["in_flight"] > 0, what="work forwarded to alpha")
        a.status()  # remember alpha's executor pids for cleanup
        a.kill()
        # beta's link sees the TCP connection close and requeues at once; the tasks wait for
        # alpha to come back (beta has no executor of its own)
        wait_until(lambda: b.status()["stats"]["retried"] >= 1, timeout=10, what="beta to requeue alpha's tasks")
        assert "alpha" not in b.peers()
    finally:
        client.shutdown(wait=False, cancel_futures=True)  # nothing could run them: do not wait


def test_a_peer_key_that_starts_with_a_dash_is_a_value_not_an_option() -> None:
    from taskcs.server.cli import _keys_as_values

    key = "-" + "a" * 39
    assert keys.valid_key(key)
    assert _keys_as_values(["start", "--peer", f"{key}@tcp://127.0.0.1:7700", "-v"]) == [
        "start", f"--peer={key}@tcp://127.0.0.1:7700", "-v"]
    assert _keys_as_values(["keys", "trust", key]) == ["keys", "trust", "--", key]
    assert _keys_as_values(["start", "--peer", "-v"]) == ["start", "--peer", "-v"]  # not a key: argparse says so
