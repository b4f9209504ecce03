"""The practical limit: a hand-written pyzmq task loop with 2 worker processes.

No scheduler, no credits, no retries, no futures: the least a task runtime on ZeroMQ over
``ipc://`` can do. Data flow::

    client PUSH (tasks) --ipc--> worker PULL -> fn(*args) -> worker PUSH --ipc--> client PULL
    client REQ  (one call) --ipc--> worker REP -> fn(*args) -> reply           (round trips)

A message is ``[pickle((task_id, fn, args, positions)), *big_bytes_frames]``: fn goes by
reference (pickle), and bytes arguments or results of 64 KiB or more travel as frames of
their own instead of inside the pickle, as a tuned hand-written protocol would do.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import zmq

from .systems import System
from .workloads import inc_chunk

BIG = 64 * 1024  # bytes values at least this large get a frame of their own
READY = -1  # task id of a worker's hello on the results channel


def encode(task_id: int, fn: Any, args: tuple[Any, ...]) -> list[bytes]:
    frames: list[bytes] = []
    positions: list[int] = []
    small: list[Any] = []
    for i, arg in enumerate(args):
        if type(arg) is bytes and len(arg) >= BIG:
            positions.append(i)
            frames.append(arg)
            small.append(None)
        else:
            small.append(arg)
    return [pickle.dumps((task_id, fn, tuple(small), positions), 5), *frames]


def decode(frames: list[bytes]) -> tuple[int, Any, tuple[Any, ...]]:
    task_id, fn, small, positions = pickle.loads(frames[0])
    if positions:
        args = list(small)
        for frame, i in zip(frames[1:], positions, strict=True):
            args[i] = frame
        small = tuple(args)
    return task_id, fn, small


def encode_result(task_id: int, value: Any) -> list[bytes]:
    if type(value) is bytes and len(value) >= BIG:
        return [pickle.dumps((task_id, None, True), 5), value]
    return [pickle.dumps((task_id, value, False), 5)]


def decode_result(frames: list[bytes]) -> tuple[int, Any]:
    task_id, value, framed = pickle.loads(frames[0])
    return task_id, frames[1] if framed else value


def worker_main(tasks: str, results: str, rpc: str) -> None:
    """One worker process: serve the task pipeline and round-trip calls until killed."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.rcvhwm = 0
    pull.connect(tasks)
    push = ctx.socket(zmq.PUSH)
    push.sndhwm = 0
    push.connect(results)
    rep = ctx.socket(zmq.REP)
    rep.connect(rpc)
    push.send_multipart(encode_result(READY, os.getpid()))
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(rep, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            task_id, fn, args = decode(sock.recv_multipart())
            out = encode_result(task_id, fn(*args))
            (push if sock is pull else rep).send_multipart(out)


class PipelineSystem(System):
    """What both raw pyzmq references share: tasks out on ``_out``, results in on ``_in``
    (one socket for a DEALER), forked helper processes, and a teardown that always runs."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.ctx: zmq.Context[Any] | None = None
        self.dir = ""
        self._next = 0
        self._done: dict[int, Any] = {}
        self._out: Any = None
        self._in: Any = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> int:
        self._next += 1
        self._out.send_multipart(encode(self._next, fn, args), copy=False)
        return self._next

    def result(self, handle: Any) -> Any:
        return self.gather([handle])[0]

    def gather(self, handles: list[Any]) -> list[Any]:
        done = self._done
        sock = self._in
        for handle in handles:
            while handle not in done:
                task_id, value = decode_result(sock.recv_multipart())
                done[task_id] = value
        return [done.pop(h) for h in handles]

    def map(self, fn: Callable[..., Any], items: list[Any], chunksize: int) -> list[Any]:
        handles = [self.submit(inc_chunk, fn, items[i:i + chunksize])
                   for i in range(0, len(items), chunksize)]
        return [x for chunk in self.gather(handles) for x in chunk]

    def close(self) -> None:
        started = [proc for proc in self.procs if proc.pid is not None]
        for proc in started:
            if proc.is_alive():
                proc.terminate()
        for proc in started:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        if self.ctx is not None:
            self.ctx.destroy(linger=0)
            self.ctx = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class ZmqReference(PipelineSystem):
    """The hand-written pyzmq pipeline (PUSH/PULL) plus a REQ/REP round trip."""

    name = "zmq-reference"
    cold_code = ("from benchmarks.zmq_reference import ZmqReference\nfrom benchmarks.workloads import inc\n"
                 "s = ZmqReference(2)\ns.start()\nprint(s.call(inc, 1), flush=True)\ns.close()\n")

    def __init__(self, workers: int = 2) -> None:
        super().__init__()
        self.workers = workers

    def start(self) -> None:
        # Inside the orchestrator's runtime dir when there is one: it removes that dir even
        # when this process is killed before close().
        self.dir = tempfile.mkdtemp(prefix="bench-zmq-", dir=os.environ.get("TASKCS_RUNTIME_DIR") or None)
        tasks, results, rpc = (f"ipc://{self.dir}/{n}" for n in ("tasks", "results", "rpc"))
        # Fork the workers before this process owns a ZeroMQ context (a context does not
        # survive fork); they connect with retries until the binds below exist.
        mp = multiprocessing.get_context("fork")
        self.procs = [mp.Process(target=worker_main, args=(tasks, results, rpc), daemon=True)
                      for _ in range(self.workers)]
        for proc in self.procs:
            proc.start()
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.sndhwm = 0
        self.push.bind(tasks)
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.rcvhwm = 0
        self.pull.bind(results)
        self._out, self._in = self.push, self.pull
        self.req = self.ctx.socket(zmq.REQ)
        self.req.bind(rpc)
        ready = 0
        while ready < self.workers:
            if not self.pull.poll(30_000):
                raise RuntimeError("zmq reference workers did not start within 30 s")
            task_id, _ = decode_result(self.pull.recv_multipart())
            ready += task_id == READY
        # A worker's hello proves its results socket is up; give its task socket the same
        # moment to finish connecting, or PUSH would deal every task to the first worker.
        time.sleep(0.05)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.req.send_multipart(encode(0, fn, args), copy=False)
        return decode_result(self.req.recv_multipart())[1]
