"""The floor of a brokered design: hand-written pyzmq with a broker process and 2 workers.

taskcs phase 3 makes the same 4 ipc hops (client -> cs-server -> executor -> cs-server ->
client); this is the least such a design can cost, with nothing but forwarding in the broker:
no scheduler state beyond a per-worker in-flight count, no credits, no retries, no futures.
Data flow::

    client DEALER --ipc--> broker ROUTER (front) -> least-loaded worker
                           broker ROUTER (back)  --ipc--> worker DEALER -> fn(*args)
    client DEALER <--ipc-- broker ROUTER (front) <--ipc-- worker DEALER  (result)

Every receive blocks (the broker blocks in ``zmq.Poller.poll()`` with no timeout): no
busy-polling anywhere. Tasks and results use the encoding of :mod:`benchmarks.zmq_reference`
(pickle, bytes of 64 KiB or more in frames of their own), and the broker forwards the big
frames without copying them. Messages:

- worker -> broker: ``[b""]`` once (hello), then ``[client_id, *result_frames]``;
- broker -> worker: ``[client_id, *task_frames]``;
- client -> broker: ``[b""]`` once (hello: answered ``[b""]`` when every worker has said
  hello), then ``task_frames``; broker -> client: ``result_frames``.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from collections.abc import Callable
from typing import Any

import zmq

from .zmq_reference import PipelineSystem, decode, encode_result

HELLO = b""


def _recv_relay(sock: zmq.Socket[Any]) -> list[Any]:
    """One message as ``[sender id, first frame, *big frames]``: the small leading frames as
    bytes (cheaper than Frame objects), the big payload frames as zero-copy ``zmq.Frame``."""
    parts: list[Any] = [sock.recv(), sock.recv()]
    while sock.rcvmore:
        parts.append(sock.recv(copy=False))
    return parts


def broker_main(front_addr: str, back_addr: str, workers: int) -> None:
    """The broker process: relay tasks to the least-loaded worker and results back, forever."""
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.ROUTER)
    for sock in (front, back):
        sock.sndhwm = sock.rcvhwm = 0
        sock.router_mandatory = True  # an unroutable message is an error, not a silent drop
    front.bind(front_addr)
    back.bind(back_addr)
    load: dict[bytes, int] = {}  # worker id -> tasks sent to it and not answered yet
    waiting: list[bytes] = []  # clients whose hello waits for the workers
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            if sock is back:
                msg = _recv_relay(back)
                worker = msg[0]
                if len(msg) == 2 and msg[1] == HELLO:  # hello
                    load[worker] = 0
                    if len(load) == workers:
                        for client in waiting:
                            front.send_multipart([client, HELLO])
                        waiting.clear()
                    continue
                load[worker] -= 1
                front.send_multipart(msg[1:], copy=False)
            else:
                msg = _recv_relay(front)
                if len(msg) == 2 and msg[1] == HELLO:  # a client's hello
                    client = msg[0]
                    if len(load) == workers:
                        front.send_multipart([client, HELLO])
                    else:
                        waiting.append(client)
                    continue
                worker = min(load, key=load.__getitem__)
                load[worker] += 1
                back.send_multipart([worker, *msg], copy=False)


def worker_main(back_addr: str) -> None:
    """One worker process: run every task the broker sends, until killed."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.sndhwm = sock.rcvhwm = 0
    sock.connect(back_addr)
    sock.send(HELLO)
    while True:
        client, *frames = sock.recv_multipart()
        task_id, fn, args = decode(frames)
        sock.send_multipart([client, *encode_result(task_id, fn(*args))], copy=False)


class ZmqBrokerReference(PipelineSystem):
    """The hand-written pyzmq broker: client DEALER -> broker ROUTER/ROUTER -> worker DEALERs."""

    name = "zmq-broker-reference"
    cold_code = ("from benchmarks.zmq_broker_reference import ZmqBrokerReference\n"
                 "from benchmarks.workloads import inc\n"
                 "s = ZmqBrokerReference(2)\ns.start()\nprint(s.call(inc, 1), flush=True)\ns.close()\n")

    def __init__(self, workers: int = 2) -> None:
        super().__init__()
        self.workers = workers
        self.broker: Any = None

    def start(self) -> None:
        # Inside the orchestrator's runtime dir when there is one: it removes that dir even
        # when this process is killed before close().
        self.dir = tempfile.mkdtemp(prefix="bench-zbr-", dir=os.environ.get("TASKCS_RUNTIME_DIR") or None)
        front, back = f"ipc://{self.dir}/front", f"ipc://{self.dir}/back"
        # Fork the broker and the workers before this process owns a ZeroMQ context (a
        # context does not survive fork); connects retry until the broker's binds exist.
        mp = multiprocessing.get_context("fork")
        self.broker = mp.Process(target=broker_main, args=(front, back, self.workers), daemon=True)
        self.procs = [self.broker, *(mp.Process(target=worker_main, args=(back,), daemon=True)
                                     for _ in range(self.workers))]
        for proc in self.procs:
            proc.start()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.sndhwm = self.sock.rcvhwm = 0
        self.sock.connect(front)
        self._out = self._in = self.sock
        self.sock.send(HELLO)
        if not self.sock.poll(30_000):
            raise RuntimeError("zmq broker reference: broker and workers not up within 30 s")
        if self.sock.recv() != HELLO:
            raise RuntimeError("zmq broker reference: unexpected reply to hello")

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.gather([self.submit(fn, *args)])[0]

    def server_pid(self) -> int | None:
        return int(self.broker.pid) if self.broker is not None and self.broker.pid else None
