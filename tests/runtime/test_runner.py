"""executor.runner: one task in, one result entry out, whatever the task does."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskcs.errors import TaskError
from taskcs.executor.runner import Resolver, run_task
from taskcs.runtime import codec
from taskcs.runtime.task import ErrorInfo, Status


def returns_a_generator() -> Any:
    return (i for i in range(3))


def raises_system_exit() -> None:
    raise SystemExit(7)


def inputs(*args: Any, **kwargs: Any) -> bytes:
    return codec.encode_inputs("test", args, kwargs)


def run(resolver: Resolver, ref: str, payload: bytes, ctx: str = "", gid: int = 1) -> tuple[int, Any]:
    """Run a task; return (status, decoded value or ErrorInfo)."""
    got_gid, status, out, duration, start_ns, end_ns = run_task(resolver, (gid, ref, payload, ctx))
    assert 0 < start_ns <= end_ns  # issue 11: the wall-clock span the timeline draws
    assert got_gid == gid
    assert type(status) is int  # plain int: an IntEnum would not pass the protocol check
    assert duration >= 0
    if status == Status.OK:
        return status, codec.loads(out)
    return status, codec.decode_error(out)


@pytest.fixture
def resolver() -> Resolver:
    return Resolver("test-executor")


def test_std_task_ok(resolver: Resolver) -> None:
    assert run(resolver, "std:add", inputs(2, 3)) == (Status.OK, 5)
    assert run(resolver, "std:echo", inputs("a", 1, None)) == (Status.OK, "a 1 None")
    assert run(resolver, "std:identity", inputs(value={"k": [1]})) == (Status.OK, {"k": [1]})


def test_ref_task_ok(resolver: Resolver) -> None:
    assert run(resolver, "ref:json:dumps", inputs([1, 2])) == (Status.OK, "[1, 2]")
    assert run(resolver, "ref:os.path:join", inputs("a", "b")) == (Status.OK, "a/b")


def test_raising_task_is_an_error_with_the_right_exception(resolver: Resolver) -> None:
    status, info = run(resolver, "std:fail", inputs("it broke"))
    assert status == Status.ERROR
    assert isinstance(info, ErrorInfo)
    assert info.type_name == "RuntimeError"
    exc = codec.error_to_exception(info)
    assert type(exc) is RuntimeError
    assert str(exc) == "it broke"
    assert "in fail" in info.traceback  # the remote frame of the task is in the traceback


def test_wrong_arguments_are_the_tasks_error(resolver: Resolver) -> None:
    status, info = run(resolver, "std:add", inputs(1))
    assert status == Status.ERROR
    assert type(codec.error_to_exception(info)) is TypeError


def test_system_exit_in_a_task_is_its_failure(resolver: Resolver) -> None:
    status, info = run(resolver, f"ref:{__name__}:raises_system_exit", inputs())
    assert status == Status.ERROR
    exc = codec.error_to_exception(info)
    assert type(exc) is SystemExit
    assert exc.code == 7


def test_unpicklable_result_is_an_error_naming_it(resolver: Resolver) -> None:
    ref = f"ref:{__name__}:returns_a_generator"
    status, info = run(resolver, ref, inputs())
    assert status == Status.ERROR
    exc = codec.error_to_exception(info)
    assert type(exc) is TaskError
    assert ref in str(exc)
    assert "generator" in str(exc)
    assert "cannot be serialized" in str(exc)


def test_dill_blob_function(resolver: Resolver) -> None:
    offset = 100
    ref, blob = codec.function_ref(lambda x: x + offset)
    assert ref.startswith("dill:") and blob is not None
    resolver.add_blobs({ref[5:]: blob})
    assert run(resolver, ref, inputs(1)) == (Status.OK, 101)
    assert run(resolver, ref, inputs(2), gid=2) == (Status.OK, 102)  # cached callable


def test_dill_blob_never_sent_is_an_error(resolver: Resolver) -> None:
    status, info = run(resolver, "dill:" + "0" * 40, inputs())
    assert status == Status.ERROR
    assert info.type_name == "LookupError"
    assert "never sent" in info.message and "test-executor" in info.message


@pytest.mark.parametrize(
    ("ref", "type_name", "needle"),
    [
        ("std:no_such_task", "LookupError", "no_such_task"),
        ("weird:thing", "LookupError", "weird:thing"),
        ("ref:json:no_such_function", "AttributeError", "no_such_function"),
    ],
)
def test_unresolvable_refs_are_errors(resolver: Resolver, ref: str, type_name: str, needle: str) -> None:
    status, info = run(resolver, ref, inputs())
    assert status == Status.ERROR
    assert info.type_name == type_name
    assert needle in info.message


def test_module_not_found_names_the_module(resolver: Resolver) -> None:
    status, info = run(resolver, "ref:no_such_module_zz9:f", inputs())
    assert status == Status.ERROR
    exc = codec.error_to_exception(info)
    assert isinstance(exc, ModuleNotFoundError)
    assert exc.name == "no_such_module_zz9"
    assert "'no_such_module_zz9'" in str(exc)
    assert "test-executor" in str(exc)


# --------------------------------------------------------------------------- client sys.path
@pytest.fixture
def user_module(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A module in a directory that is not on sys.path; sys.path and sys.modules restored after."""
    name = f"taskcs_user_mod_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(
        "class Point:\n"
        "    def __init__(self, x):\n"
        "        self.x = x\n"
        "\n"
        "def triple(x):\n"
        "    return 3 * x\n"
        "\n"
        "def get_x(point):\n"
        "    return point.x\n"
    )
    saved_path = list(sys.path)
    try:
        yield name, tmp_path
    finally:
        sys.path[:] = saved_path
        sys.modules.pop(name, None)


def path_ctx(*paths: str) -> tuple[str, dict[str, bytes]]:
    """The ctx name and blob the dispatcher makes from a client's HELLO sys_path."""
    blob = "\0".join(paths).encode()
    ctx = "path:" + codec.blob_digest(blob)
    return ctx, {ctx: blob}


def test_client_sys_path_fallback(user_module: tuple[str, Path]) -> None:
    name, directory = user_module
    assert str(directory) not in sys.path
    ref = f"ref:{name}:triple"

    # without the client's path: a clear error naming the module
    plain = Resolver("plain")
    status, info = run(plain, ref, inputs(2))
    assert status == Status.ERROR
    exc = codec.error_to_exception(info)
    assert isinstance(exc, ModuleNotFoundError) and exc.name == name
    assert name not in sys.modules

    # with a ctx naming a path blob it was never sent: still the same clear error
    ctx, blobs = path_ctx("/nonexistent-dir", str(directory))
    status, info = run(plain, ref, inputs(2), ctx=ctx)
    assert status == Status.ERROR and info.type_name == "ModuleNotFoundError"

    # with the client's path blob: imported via the fallback, appended (never prepended)
    resolver = Resolver("with-ctx")
    resolver.add_blobs(blobs)
    assert run(resolver, ref, inputs(2), ctx=ctx) == (Status.OK, 6)
    assert sys.path[-1] == str(directory)
    assert sys.path[-2] == "/nonexistent-dir"
    assert name in sys.modules


def test_user_class_instance_input_needs_no_client_path(user_module: tuple[str, Path]) -> None:
    """An instance of a user module's class travels by value (#13): the executor needs neither
    the module's file nor the client's import path to unpickle it."""
    name, directory = user_module
    sys.path.append(str(directory))
    module = __import__(name)
    payload = inputs(module.Point(5))
    sys.path.remove(str(directory))
    del sys.modules[name]

    resolver = Resolver("no-ctx")
    assert run(resolver, "std:identity", payload)[0] == Status.OK
    (point,), _ = codec.decode_inputs(payload)
    assert point.x == 5 and type(point).__name__ == "Point"
    assert name not in sys.modules  # by value: the module was never imported here


def test_client_sys_path_that_does_not_help(user_module: tuple[str, Path], tmp_path: Path) -> None:
    name, _ = user_module
    empty = tmp_path / "empty"
    empty.mkdir()
    ctx, blobs = path_ctx(str(empty))
    resolver = Resolver("with-ctx")
    resolver.add_blobs(blobs)
    status, info = run(resolver, f"ref:{name}:triple", inputs(1), ctx=ctx)
    assert status == Status.ERROR
    assert "not even with the client's import path" in info.message
    assert name in info.message
