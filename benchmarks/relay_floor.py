"""The floor of a brokered round trip on this machine: client -> broker -> worker -> broker ->
client over ZeroMQ ipc with no work at all, once with blocking receives and once with every
process busy-polling its socket (what taskcs's spin approximates).

    python -m benchmarks.relay_floor [rounds]

Prints p50/p90/p99 per mode for 2,000 round trips, the modes alternating ``rounds`` times so
both see the same stretches of this shared machine. Not part of ``make bench``: it answers
one question (how far can a broker design go here), recorded in benchmarks/README.md.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time

import zmq

N = 2000
WARM = 200


def _recv(sock: zmq.Socket[bytes], spin: bool) -> list[bytes]:
    if not spin:
        return sock.recv_multipart()
    while True:
        try:
            return sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            os.sched_yield()


def _broker(address: str, spin: bool) -> None:
    router = zmq.Context().socket(zmq.ROUTER)
    router.bind(address)
    workers: list[bytes] = []
    while True:
        frames = _recv(router, spin)
        if frames[1] == b"W":  # a worker says hello
            workers.append(frames[0])
        elif frames[1] == b"R":  # a result: back to its client
            router.send_multipart([frames[2], frames[3]])
        else:  # a task: to the worker
            router.send_multipart([workers[0], frames[0], frames[2]])


def _worker(address: str, spin: bool) -> None:
    dealer = zmq.Context().socket(zmq.DEALER)
    dealer.connect(address)
    dealer.send(b"W")
    while True:
        client, body = _recv(dealer, spin)
        dealer.send_multipart([b"R", client, body])


def measure(spin: bool) -> tuple[float, float, float]:
    """(p50, p90, p99) in µs of N round trips through a fresh broker and worker."""
    address = f"ipc://{tempfile.mkdtemp(prefix='relay-')}/b"
    kids = []
    for role in (_broker, _worker):  # forked before this process has any ZeroMQ context
        pid = os.fork()
        if pid == 0:
            try:
                role(address, spin)
            finally:
                os._exit(0)
        kids.append(pid)
    ctx = zmq.Context()
    client = ctx.socket(zmq.DEALER)
    client.linger = 0
    client.connect(address)
    try:
        time.sleep(0.5)  # the worker's hello reaches the broker
        times = []
        for _ in range(N + WARM):
            t0 = time.perf_counter()
            client.send_multipart([b"T", b"x"])
            _recv(client, spin)
            times.append(time.perf_counter() - t0)
    finally:
        client.close()
        ctx.term()
        for pid in kids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    ordered = sorted(times[WARM:])
    return tuple(ordered[int(len(ordered) * q)] * 1e6 for q in (0.5, 0.9, 0.99))  # type: ignore[return-value]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    for _ in range(rounds):
        for spin in (False, True):
            p50, p90, p99 = measure(spin)
            mode = 'busy-poll' if spin else 'blocking'
            print(f"{mode:9}  p50 {p50:5.0f} µs  p90 {p90:5.0f}  p99 {p99:5.0f}", flush=True)


if __name__ == "__main__":
    main()
