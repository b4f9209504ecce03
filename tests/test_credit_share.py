"""Clients keep to the share of the server's budget that CREDIT gives them (flat server memory)."""

from __future__ import annotations

import taskcs
from taskcs.runtime.dispatcher import DispatcherConfig
from taskcs.server.inprocess import InProcessServer
from tests.conftest import wait_until


def test_a_client_holds_back_what_its_share_does_not_cover_and_sends_it_when_the_share_grows() -> None:
    config = DispatcherConfig(heartbeat_interval=None, client_credit=64, server_budget=64, min_credit=4)
    with InProcessServer(executors=0, config=config) as server:
        c1 = taskcs.Client(connection=server.connect(), foreground=None)
        c2 = taskcs.Client(connection=server.connect(), foreground=None)
        try:
            futures = [c1.submit("add", i, 1) for i in range(200)]  # no executor: nothing runs
            wait_until(lambda: server.dispatcher.task_count() == 32, what="c1's share (32) on the server")
            assert c1._outstanding == 32  # the rest waits in the client, not on the server
            c2.shutdown()
            wait_until(lambda: server.dispatcher.task_count() == 64, what="c1's grown share (64) on the server")
            assert not any(f.done() for f in futures)  # held back, never refused
        finally:
            c1.shutdown(wait=False, cancel_futures=True)
            c2.shutdown(wait=False, cancel_futures=True)
