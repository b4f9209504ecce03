"""Code inside a task's arguments travels once per connection, then by digest (issue #13, part 1).

End to end from ``tests/scripts/code_in_args.py`` (a real ``__main__``), through a phase-3 server
and through a phase-4 peer whose executors cannot import the user's module; the unit tests pin
the codec: the fast path is untouched, a stream of tasks shares one bundle, and a receiving
side rebuilds the code once, so a class keeps one identity.
"""

from __future__ import annotations

import functools
import operator
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from taskcs.executor.runner import Resolver, run_task
from taskcs.runtime import codec, coderef
from tests.federation import nodes_fixture  # noqa: F401 - the `nodes` fixture

SCRIPT = Path(__file__).parent / "scripts" / "code_in_args.py"
CASES = ("main_function", "partial_of_unimportable", "list_of_lambdas", "main_class_instances")


def inc(x: int) -> int:
    return x + 1


class Box:
    def __init__(self, v: int) -> None:
        self.v = v


def unbox(b: Box) -> int:
    return b.v


def _run_script(cwd: Path, env: dict[str, str]) -> dict[str, dict[str, str]]:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=180,
                          cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            _, name, *fields = line.split()
            cases[name] = dict(field.split("=", 1) for field in fields)
    assert set(cases) == set(CASES), proc.stdout
    return cases


def _assert_sent_once(cases: dict[str, dict[str, str]]) -> None:
    for name, case in cases.items():
        assert case["results"] == "ok", name
        # 100 tasks: the code is in exactly one blob on the wire, in none of the payloads
        assert (case["blobs"], case["marked_blobs"], case["marked_payloads"]) == ("1", "1", "0"), (name, case)


@pytest.mark.multiprocess
def test_code_in_arguments_is_sent_once_through_a_server(start_server: Any, tmp_path: Path) -> None:
    start_server(executors=2)
    _assert_sent_once(_run_script(tmp_path, {**os.environ, "PYTHONPATH": ""}))


@pytest.mark.multiprocess
def test_code_in_arguments_reaches_a_peer_that_cannot_import_it(nodes: Any, tmp_path: Path) -> None:
    a, b = nodes("alpha", "beta")
    a.start(executors=0)  # every task runs on beta
    b.start(a)
    a.wait_linked("beta")
    cases = _run_script(tmp_path, {**a.env(), "CODE_IN_ARGS_ADDRESS": a.ipc()})
    _assert_sent_once(cases)
    assert {case["executors"] for case in cases.values()} == {"beta"}


# ------------------------------------------------------------------------------ codec
def test_inputs_naming_nothing_of_the_user_keep_the_fast_path() -> None:
    ref, blob = codec.function_ref(operator.add)
    assert codec.encode_task("t", ref, blob, (1, [2.5, "x"]), {}) == (ref, pickle.dumps((1, [2.5, "x"]), 5), blob)


def test_a_stream_of_tasks_shares_one_bundle_and_payloads_name_the_code_by_digest() -> None:
    ref, blob = codec.function_ref(operator.call)
    encoded = [codec.encode_task("t", ref, blob, (inc, i), {}) for i in range(100)]
    assert len({(r, b) for r, _, b in encoded}) == 1
    bundle_ref, _, bundle = encoded[0]
    assert bundle_ref != ref and bundle_ref == "dill:" + codec.blob_digest(bundle or b"")
    code = inc.__code__.co_code
    assert code in (bundle or b"") and not any(code in payload for _, payload, _ in encoded)
    # another function with the same code inside is another bundle, carrying the code again
    other = codec.encode_task("t", *codec.function_ref(operator.truth), (inc,), {})
    assert other[0] not in (ref, bundle_ref)


def test_a_receiving_side_loads_the_code_once_and_a_class_keeps_its_identity(monkeypatch: Any) -> None:
    monkeypatch.setattr(coderef, "_loaded", {})  # a fresh receiving process
    ref, blob = codec.function_ref(unbox)
    first = codec.encode_task("t", ref, blob, (Box(1),), {})
    second = codec.encode_task("t", ref, blob, (Box(2),), {})
    assert first[0] == second[0]
    resolver = Resolver("test")
    resolver.add_blobs({first[0][5:]: first[2] or b""})
    outcomes = [run_task(resolver, (gid, wref, payload, "")) for gid, (wref, payload, _) in enumerate((first, second))]
    assert [codec.loads(out[2]) for out in outcomes] == [1, 2]
    classes = {type(codec.decode_inputs(payload)[0][0]) for _, payload, _ in (first, second)}
    assert len(classes) == 1 and len(coderef._loaded) == 1


def test_code_in_keyword_arguments_and_partials_round_trips() -> None:
    ref, blob = codec.function_ref(operator.call)
    wref, payload, wblob = codec.encode_task("t", ref, blob, (functools.partial(inc, 4),), {"unused": [inc]})
    assert wref != ref and wblob is not None
    assert codec.loads(wblob) is operator.call  # what an executor's resolver does first
    args, kwargs = codec.decode_inputs(payload)
    assert args[0]() == 5 and kwargs["unused"][0](1) == 2


def test_a_payload_naming_code_that_never_came_raises_a_clear_error(monkeypatch: Any) -> None:
    _, payload, _ = codec.encode_task("t", *codec.function_ref(operator.call), (inc, 1), {})
    monkeypatch.setattr(coderef, "_loaded", {})
    with pytest.raises(LookupError, match="never loaded here"):
        codec.decode_inputs(payload)


def _plain(x: int) -> int:
    return x + 1


def test_a_closure_inside_the_arguments_stays_inline_so_per_task_closures_pile_up_nowhere() -> None:
    def make(k: int) -> Any:
        return lambda x: x + k  # a closure over k: a different object (and data) per task

    assert coderef.dumps_with_code_refs((_plain, 1))[1]  # the control: plain code becomes a blob
    for k in range(3):
        payload, code = coderef.dumps_with_code_refs((make(k), 1))
        assert code == {}  # inline: no blob per closure for every hop to keep
        fn, arg = pickle.loads(payload)
        assert fn(arg) == 1 + k
