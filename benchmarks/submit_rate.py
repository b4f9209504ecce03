"""Submit rate through a real local server, and the codec's cost per payload (issue #13).

    python -m benchmarks.submit_rate [--n 50000] [--rounds 5]

Guards the fast path of "the user's objects anywhere" (codec.dumps checks every payload for
``__main__`` and user-module names): prints the best of ``--rounds`` for

* ``submit``: ``Client.submit(inc, i)`` N times on a phase-3 server (submissions per second,
  the same shape as ``make bench`` workload 1), and the gather that follows;
* ``dumps``: ``codec.dumps((i,))`` against the bare C pickler, in ns per call.

The server lives in a private temporary runtime directory and is stopped by pid at the end.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import signal
import tempfile
import time
from pathlib import Path

from .workloads import inc


def _codec_ns(rounds: int, n: int = 200_000) -> tuple[float, float]:
    from taskcs.runtime import codec

    best_codec = best_pickle = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(n):
            codec.dumps((i,))
        t1 = time.perf_counter()
        for i in range(n):
            pickle.dumps((i,), protocol=5)
        t2 = time.perf_counter()
        best_codec, best_pickle = min(best_codec, (t1 - t0) / n * 1e9), min(best_pickle, (t2 - t1) / n * 1e9)
    return best_codec, best_pickle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runtime = tempfile.mkdtemp(prefix="tcs-bench-", dir="/tmp")
    os.environ["TASKCS_RUNTIME_DIR"] = runtime
    os.environ.pop("TASKCS_ADDRESS", None)
    import taskcs
    from taskcs.runtime import discovery

    try:
        submit_best = gather_best = 0.0
        with taskcs.Client() as client:
            client.submit(inc, 0).result()  # warm: the connection, the executors, the code blob
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                futures = [client.submit(inc, i) for i in range(args.n)]
                t1 = time.perf_counter()
                assert [f.result() for f in futures] == [i + 1 for i in range(args.n)]
                t2 = time.perf_counter()
                submit_best = max(submit_best, args.n / (t1 - t0))
                gather_best = max(gather_best, args.n / (t2 - t0))
        codec_ns, pickle_ns = _codec_ns(args.rounds)
        print(f"submit: {submit_best:,.0f} tasks/s submitted, {gather_best:,.0f} tasks/s submitted+gathered "
              f"(n={args.n}, best of {args.rounds})")
        print(f"dumps: codec.dumps((i,)) {codec_ns:.0f} ns, pickle.dumps((i,)) {pickle_ns:.0f} ns")
    finally:
        record = discovery.read_record(Path(runtime))
        if record is not None and discovery.pid_alive(record.pid):
            os.kill(record.pid, signal.SIGTERM)
        shutil.rmtree(runtime, ignore_errors=True)


if __name__ == "__main__":
    main()
