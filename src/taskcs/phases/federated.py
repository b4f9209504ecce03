"""Phase 4 as a demo: two federated cs-servers on loopback with throw-away keys.

    alpha (1 executor) <==CURVE tcp==> beta (1 executor)      client --ipc--> alpha

Each server gets its own temporary runtime and config directory (as if on two machines), a
fresh CURVE key pair, and trusts only the other's key. The client submits one set to alpha;
alpha runs what its own executor can take and forwards the rest to beta, so the report shows
tasks on ``exec-1`` and on ``beta:exec-1``, while the IOTasks run here, on this terminal.
Both servers are stopped (by their pid) and their directories removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ServerStartError
from ..runtime import discovery, keys
from ..runtime import protocol as p
from ..runtime.task import Task
from ..server.control import request


class DemoServer:
    """One server of the demo, in directories of its own."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.runtime = root / name / "run"
        self.config = root / name / "config"
        for path in (root / name, self.runtime, self.config):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.key = keys.init(self.config)[0].public.decode()
        self.record: discovery.ServerRecord | None = None
        self.listen = ""

    def start(self, *peers: DemoServer | str, executors: int = 1, listen: bool = True) -> None:
        """Start this server detached, linked to ``peers`` (servers, or KEY@tcp://... addresses);
        returns once it accepts connections."""
        args = ["--executors", str(executors), "--name", self.name, "--idle-timeout", "120", "--heartbeat", "0.5"]
        if listen:
            args += ["--listen", "tcp://127.0.0.1:*"]
        for peer in peers:
            args += ["--peer=" + (peer if isinstance(peer, str) else f"{peer.key}@{peer.listen}")]
        saved = os.environ.get("TASKCS_CONFIG_DIR")
        os.environ["TASKCS_CONFIG_DIR"] = str(self.config)  # the child's "machine"
        try:
            self.record = discovery.spawn_server(self.runtime, args)
        finally:
            if saved is None:
                del os.environ["TASKCS_CONFIG_DIR"]
            else:
                os.environ["TASKCS_CONFIG_DIR"] = saved
        self.listen = self.status()["listen"][0] if listen else ""

    def status(self) -> dict[str, Any]:
        """This server's STATUS reply."""
        assert self.record is not None
        return request(self.record.endpoint, p.StatusRequest())

    def linked(self) -> bool:
        """True once a peer is connected."""
        peers = self.status().get("peers") or []
        return any(peer["connected"] for peer in peers)

    def stop(self) -> None:
        """Stop gracefully, then by signal if it does not go."""
        if self.record is None or not discovery.pid_alive(self.record.pid):
            return
        with contextlib.suppress(Exception):
            request(self.record.endpoint, p.Stop(True), timeout=2)
        discovery.terminate(self.record.pid, grace=5)


@contextlib.contextmanager
def two_servers() -> Iterator[tuple[DemoServer, DemoServer]]:
    """alpha and beta, linked and trusting each other; stopped and removed on exit."""
    root = Path(tempfile.mkdtemp(prefix="taskcs-phase4-"))
    alpha, beta = DemoServer(root, "alpha"), DemoServer(root, "beta")
    try:
        keys.trust(beta.key, alpha.config)
        keys.trust(alpha.key, beta.config)
        alpha.start()
        beta.start(alpha)
        deadline = time.monotonic() + 15
        while not (alpha.linked() and beta.linked()):
            if time.monotonic() > deadline:
                raise ServerStartError("the two demo servers did not link within 15s; see their logs in "
                                       f"{root}")
            time.sleep(0.05)
        yield alpha, beta
    finally:
        beta.stop()
        alpha.stop()
        shutil.rmtree(root, ignore_errors=True)


def extra_tasks() -> list[Task]:
    """CPU-bound tasks enough to keep both servers busy, and one that prints on its executor."""
    return [Task("count_primes", (60_000 + i,)) for i in range(6)] + [
        Task("print_text", ("printed by a task on an executor; forwarded to this terminal",)),
    ]
