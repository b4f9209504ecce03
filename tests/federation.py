"""Helpers for phase-4 tests: servers with their own runtime dir, config dir and keys, on loopback.

Each :class:`Node` is one "machine": a private runtime directory (record, ipc socket, log) and
a private config directory (its CURVE key pair, the keys it trusts). Servers are started in the
foreground (``cs-server serve``) as our own children, so they are stopped by their pid, and so
are the executors they report, even when a test fails half-way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from taskcs.runtime import discovery, keys

from .conftest import wait_until

SRC = str(Path(__file__).resolve().parents[1] / "src")


class Node:
    """One federated server's identity and process."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.runtime = root / name / "rt"
        self.config = root / name / "cfg"
        for path in (root / name, self.runtime, self.config):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.key = keys.init(self.config)[0].public.decode()
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""  # the CURVE tcp endpoint it listens on
        self.executor_pids: set[int] = set()

    @property
    def address(self) -> str:
        """KEY@tcp://... as a peer or remote client names this server."""
        return f"{self.key}@{self.endpoint}"

    def env(self) -> dict[str, str]:
        """The environment of a process on this "machine"."""
        env = {**os.environ, "TASKCS_RUNTIME_DIR": str(self.runtime), "TASKCS_CONFIG_DIR": str(self.config)}
        env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("TASKCS_ADDRESS", None)
        return env

    def trust(self, *others: Node) -> None:
        """Let ``others`` connect to this node (as peers or remote clients)."""
        for other in others:
            keys.trust(other.key, self.config)

    def start(self, *peers: Node, executors: int = 1, heartbeat: float = 0.2, listen: bool = True,
              prefix: Sequence[str] = (), extra: Sequence[str] = (), endpoint: str = "tcp://127.0.0.1:*") -> Node:
        """Start ``cs-server serve`` for this node, linked to ``peers``; wait until it serves."""
        cmd = [*prefix, sys.executable, "-m", "taskcs.server.cli", "serve", "--runtime-dir", str(self.runtime),
               "--name", self.name, "--executors", str(executors), "--heartbeat", str(heartbeat),
               # A federated server never idles out by default: should this test process die
               # before its teardown, the server still ends by itself.
               "--idle-timeout", "60", *extra]
        if listen:
            cmd += ["--listen", endpoint]
        for peer in peers:
            cmd += [f"--peer={peer.address}"]
        log = open(self.runtime / "server.log", "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env(),
                                     cwd="/")
        log.close()
        proc = self.proc
        wait_until(lambda: proc.poll() is not None or self._ready(), timeout=20, what=f"server {self.name}")
        assert proc.poll() is None, f"server {self.name} exited {proc.returncode}:\n{self.log()}"
        info = self.status()
        self.endpoint = info["listen"][0] if info.get("listen") else ""
        wait_until(lambda: len(self.status()["executors"]) >= executors, what=f"{self.name}'s executors")
        return self

    def _ready(self) -> bool:
        record = discovery.read_record(self.runtime)
        return record is not None and self.proc is not None and record.pid == self.proc.pid

    def status(self) -> dict[str, Any]:
        """The server's STATUS reply; remembers its executors' pids for cleanup."""
        from taskcs.runtime import protocol
        from taskcs.server.control import request

        record = discovery.read_record(self.runtime)
        assert record is not None, f"no record for {self.name}"
        info = request(record.endpoint, protocol.StatusRequest(), timeout=5)
        # Not the stdio ones: a client's foreground executor is the client (this test) itself.
        self.executor_pids.update(ex["pid"] for ex in info["executors"] if ex.get("pid") and not ex["stdio"])
        return info

    def ipc(self) -> str:
        """The local endpoint of this node's server."""
        record = discovery.read_record(self.runtime)
        assert record is not None
        return record.endpoint

    def peers(self) -> dict[str, dict[str, Any]]:
        """Connected peer records by name."""
        return {p["name"]: p for p in self.status()["peers"] if p["connected"]}

    def wait_linked(self, *names: str, timeout: float = 15) -> None:
        """Until every peer in ``names`` is connected with capacity advertised."""
        wait_until(lambda: all(n in self.peers() for n in names), timeout=timeout,
                   what=f"{self.name} linked to {names}")

    def log(self) -> str:
        """The server's log so far."""
        path = self.runtime / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def signal(self, sig: int) -> None:
        """Send ``sig`` to this node's server (our child)."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        """Stop the server and its executors, by pid, whatever state they are in."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for pid in self.executor_pids:
            if discovery.pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.executor_pids.clear()

    def kill(self) -> None:
        """SIGKILL the server (its executors are cleaned up by :meth:`stop`)."""
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(timeout=5)


@pytest.fixture(name="nodes")
def nodes_fixture() -> Iterator[Any]:
    """Factory of :class:`Node` in a short private directory; every node stopped after the test."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="tcsf-", dir="/tmp"))
    made: list[Node] = []

    def make(*names: str) -> list[Node]:
        new = [Node(root, name) for name in names]
        made.extend(new)
        for node in new:  # everyone trusts everyone made so far (a small private federation)
            node.trust(*[other for other in made if other is not node])
            for other in made:
                if other is not node:
                    other.trust(node)
        return new

    try:
        yield make
    finally:
        for node in made:
            node.stop()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def executors_of(futures: Sequence[Any]) -> set[str]:
    """The server part of each future's executor name ("beta:exec-1" -> "beta", "exec-1" -> "")."""
    return {f.executor.rpartition(":")[0] for f in futures}


def deadline(seconds: float) -> float:
    """A monotonic deadline ``seconds`` from now."""
    return time.monotonic() + seconds
