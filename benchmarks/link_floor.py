"""The floor of a two-process link on this machine: why the direct path is a Unix socket.

    python -m benchmarks.link_floor [ROUND_TRIPS]

A parent and a forked child ping-pong one small pickled task and its result, both blocking,
over (1) a Unix stream socketpair, (2) a ZeroMQ PAIR pair over ipc://, and, in the same run,
(3) ``ProcessPoolExecutor(2)`` submitting ``inc`` and waiting for each result. Prints p50 and
p99 of each, in µs. ZeroMQ hands every message to its I/O thread on both sides, two thread
wake-ups per hop beside the kernel's; a plain socket has none (``taskcs.runtime.stream``).
Not part of ``make bench``: its numbers are quoted in benchmarks/README.md.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from .workloads import inc


def _stats(samples: list[float]) -> str:
    samples.sort()
    return f"p50 {samples[len(samples) // 2] * 1e6:6.0f} µs   p99 {samples[int(len(samples) * 0.99)] * 1e6:6.0f} µs"


def unix_socket(n: int) -> str:
    """Round trips over a socketpair: sendall one pickle, recv the answer."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the child echoes until the parent closes its end
        a.close()
        while data := b.recv(65536):
            b.sendall(pickle.dumps(pickle.loads(data)))
        os._exit(0)
    b.close()
    lat = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            a.sendall(pickle.dumps(("inc", (i,))))
            pickle.loads(a.recv(65536))
            lat.append(time.perf_counter() - t0)
    finally:
        a.close()
        os.waitpid(pid, 0)
    return _stats(lat)


def zmq_pair(n: int) -> str:
    """Round trips over ZeroMQ PAIR sockets on ipc:// (a fresh context in each process)."""
    import zmq

    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/floor.sock"
        pid = os.fork()
        if pid == 0:
            ctx = zmq.Context()
            sock = ctx.socket(zmq.PAIR)
            sock.connect(endpoint)
            while (msg := sock.recv()) != b"":
                sock.send(pickle.dumps(pickle.loads(msg)))
            sock.close(linger=0)
            os._exit(0)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        sock.bind(endpoint)
        lat = []
        try:
            for i in range(n):
                t0 = time.perf_counter()
                sock.send(pickle.dumps(("inc", (i,))))
                pickle.loads(sock.recv())
                lat.append(time.perf_counter() - t0)
            sock.send(b"")  # the child leaves
        finally:
            os.waitpid(pid, 0)
            sock.close(linger=0)
            ctx.term()
    return _stats(lat)


def process_pool(n: int) -> str:
    """Round trips of ``inc`` through ProcessPoolExecutor(2), warmed up first."""
    with ProcessPoolExecutor(2) as ex:
        for i in range(200):
            ex.submit(inc, i).result()
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            ex.submit(inc, i).result()
            lat.append(time.perf_counter() - t0)
    return _stats(lat)


def main() -> None:
    """Two rounds of the three, interleaved (the machine's speed drifts)."""
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    for _ in range(2):
        print("unix socketpair     ", unix_socket(n))
        print("zmq PAIR over ipc   ", zmq_pair(n))
        print("ProcessPoolExecutor ", process_pool(n))


if __name__ == "__main__":
    main()
