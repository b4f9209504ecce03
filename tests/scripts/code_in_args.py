"""Run as a real ``__main__`` (by tests/test_code_in_args.py): code inside a task's arguments
travels once per connection, not once per task.

Connects to the server at ``$CODE_IN_ARGS_ADDRESS`` (else the local one), and watches what its
client puts on the wire: every SUBMIT's blobs and payloads. For each case, 100 tasks whose
*arguments* hold the user's code (the task's function is a standard-library one):

* ``operator.call(inc, i)``: a ``__main__`` function;
* ``operator.call(functools.partial(scale, i))``: a partial of a user-module function whose
  file is deleted before anything runs, so no executor or peer can import it;
* ``apply_all([lambda, lambda], i)``: a list of lambdas;
* ``operator.methodcaller("total")(Acc(i))``: instances of a ``__main__`` class.

Prints ``CASE <name> results=<ok|WRONG> blobs=<n> marked_blobs=<n> marked_payloads=<n>
executors=<names>``: ``marked`` counts the wire items that carry the code (its marker string).
"""

from __future__ import annotations

import functools
import importlib
import operator
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import taskcs
from taskcs.runtime import protocol as p

N = 100
MARK = b"code-in-args-marker-7f3a"


def inc(x: int, tag: str = "code-in-args-marker-7f3a") -> int:
    return x + 1


class Acc:
    """A ``__main__`` class: its code (the method's default) carries the marker."""

    def __init__(self, n: int) -> None:
        self.n = n

    def total(self, tag: str = "code-in-args-marker-7f3a") -> int:
        return self.n * 10


LAMBDAS = [lambda x, tag="code-in-args-marker-7f3a": x * 2, lambda x: x - 1]


def apply_all(fns: list[Any], x: int) -> list[Any]:
    return [f(x) for f in fns]


def vanishing_module() -> Any:
    """A user module imported from a file that is then deleted: nobody else can import it."""
    where = Path(tempfile.mkdtemp(prefix="tcs-cia-"))
    (where / "cia_userlib.py").write_text(
        "def scale(x, by=3, tag='code-in-args-marker-7f3a'):\n    return x * by\n")
    sys.path.insert(0, str(where))
    try:
        module = importlib.import_module("cia_userlib")
    finally:
        sys.path.remove(str(where))
        shutil.rmtree(where)
    importlib.invalidate_caches()
    return module


class Wire:
    """Records the blobs and payloads of every SUBMIT the client sends."""

    def __init__(self, client: Any) -> None:
        self.blobs: list[bytes] = []
        self.payloads: list[bytes] = []
        conn = client._conn
        send = conn.send

        def recording_send(msg: Any) -> Any:
            if isinstance(msg, p.Submit):
                self.blobs.extend(msg.blobs.values())
                self.payloads.extend(task[2] for task in msg.tasks)
            return send(msg)

        conn.send = recording_send

    def take(self) -> tuple[int, int, int]:
        out = (len(self.blobs), sum(MARK in b for b in self.blobs), sum(MARK in b for b in self.payloads))
        self.blobs.clear()
        self.payloads.clear()
        return out


def main() -> int:
    userlib = vanishing_module()
    cases: dict[str, tuple[Any, list[tuple[Any, ...]], list[Any]]] = {
        "main_function": (operator.call, [(inc, i) for i in range(N)], [i + 1 for i in range(N)]),
        "partial_of_unimportable": (operator.call, [(functools.partial(userlib.scale, i),) for i in range(N)],
                                    [i * 3 for i in range(N)]),
        "list_of_lambdas": (apply_all, [(LAMBDAS, i) for i in range(N)], [[i * 2, i - 1] for i in range(N)]),
        "main_class_instances": (operator.methodcaller("total"), [(Acc(i),) for i in range(N)],
                                 [i * 10 for i in range(N)]),
    }
    address = os.environ.get("CODE_IN_ARGS_ADDRESS") or None
    # The server path: what this script counts is what crosses the server's wire (the direct
    # path sends the same blobs once per lease connection, tested in test_direct_path.py).
    with taskcs.Client(address, direct=False) as client:
        wire = Wire(client)
        for name, (fn, calls, expected) in cases.items():
            futures = [client.submit(fn, *args) for args in calls]
            got = [f.result(timeout=60) for f in futures]
            blobs, marked_blobs, marked_payloads = wire.take()
            executors = sorted({f.executor.rpartition(":")[0] or "local" for f in futures})
            print(f"CASE {name} results={'ok' if got == expected else 'WRONG'} blobs={blobs} "
                  f"marked_blobs={marked_blobs} marked_payloads={marked_payloads} executors={','.join(executors)}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
