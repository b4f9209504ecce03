"""Submit rate before/after a change to the codec, side by side in one run (issue #13, part 1).

    git archive main src | tar -x -C /tmp/before        # the tree to compare against
    python -m benchmarks.code_in_args --before /tmp/before/src [--n 20000] [--rounds 3]

Alternates runs of each tree (``PYTHONPATH`` first on the path; each run its own private
server), ``--rounds`` times each, and prints the best submissions per second and the submitting
thread's CPU per submit for three shapes of task:

* ``inc``: ``submit(inc, i)``, the fast path (the function a code blob, its inputs plain data);
* ``abs``: ``submit(abs, i)``, by reference;
* ``call``: ``submit(operator.call, inc, i)``, the user's code inside the arguments.

Without ``--before``, measures only this tree.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .workloads import inc

ROOT = Path(__file__).resolve().parents[1]
SHAPES: dict[str, tuple[Any, Any]] = {
    "inc": (inc, lambda i: (i,)),
    "abs": (abs, lambda i: (i,)),
    "call": (operator.call, lambda i: (inc, i)),
}


def one(n: int) -> dict[str, tuple[float, float]]:
    """{shape: (submits per second, submitting thread's CPU µs per submit)} on a private server."""
    runtime = tempfile.mkdtemp(prefix="tcs-cia-", dir="/tmp")
    os.environ["TASKCS_RUNTIME_DIR"] = runtime
    os.environ.pop("TASKCS_ADDRESS", None)
    import taskcs
    from taskcs.runtime import discovery

    out = {}
    try:
        with taskcs.Client() as client:
            for shape, (fn, make) in SHAPES.items():
                calls = [make(i) for i in range(n)]
                client.submit(fn, *calls[0]).result()  # warm: connection, executors, code blobs
                t0, c0 = time.perf_counter(), time.thread_time()
                futures = [client.submit(fn, *args) for args in calls]
                t1, c1 = time.perf_counter(), time.thread_time()
                for f in futures:
                    f.result()
                out[shape] = (n / (t1 - t0), (c1 - c0) / n * 1e6)
    finally:
        record = discovery.read_record(Path(runtime))
        if record is not None and discovery.pid_alive(record.pid):
            os.kill(record.pid, signal.SIGTERM)
        shutil.rmtree(runtime, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="the src directory of the tree to compare against")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.n)))
        return 0
    trees = {"after": ROOT / "src"}
    if args.before:
        trees = {"before": args.before.resolve(), **trees}
    best: dict[str, dict[str, tuple[float, float]]] = {tree: {} for tree in trees}
    for r in range(args.rounds):
        for tree, src in (trees.items() if r % 2 == 0 else reversed(trees.items())):
            env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}"}
            run = subprocess.run([sys.executable, "-m", "benchmarks.code_in_args", "--one", "--n", str(args.n)],
                                 env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
            for shape, (rate, cpu) in json.loads(run.stdout.splitlines()[-1]).items():
                old = best[tree].get(shape, (0.0, float("inf")))
                best[tree][shape] = (max(old[0], rate), min(old[1], cpu))
    print(f"best of {args.rounds} alternating runs, n={args.n}; load average {os.getloadavg()[0]:.2f}")
    print(f"| shape | {' | '.join(f'{t} submits/s | {t} CPU µs/submit' for t in trees)} |")
    print("|---|" + "---|" * (2 * len(trees)))
    for shape in SHAPES:
        cells = " | ".join(f"{best[t][shape][0]:,.0f} | {best[t][shape][1]:.2f}" for t in trees)
        print(f"| {shape} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
