"""Payload codec: function references, inputs, and errors carried across the wire."""

from __future__ import annotations

import json
import pickle
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from taskcs.errors import (
    ExecutorDiedError,
    RemoteTraceback,
    SubmissionError,
    TaskcsError,
    TaskError,
)
from taskcs.runtime import codec
from taskcs.stdlib_tasks import REGISTRY, add


def module_level_double(x: int) -> int:
    """An importable function: goes by reference."""
    return 2 * x


class Holder:
    @staticmethod
    def triple(x: int) -> int:
        return 3 * x


class NeedsTwoArgs(Exception):
    """Pickles fine, but unpickling calls __init__ with one argument and fails."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} and {b}")


class CarriesAGenerator(Exception):
    """Neither pickle nor dill can serialize a generator attribute."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.gen = (i for i in range(3))


def _raise(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


# --------------------------------------------------------------------------- function_ref
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_std_name_is_a_std_ref(name: str) -> None:
    assert codec.function_ref(name) == ("std:" + name, None)


def test_std_function_object_is_a_std_ref() -> None:
    assert codec.function_ref(add) == ("std:add", None)
    assert codec.function_ref(REGISTRY["prompt"]) == ("std:prompt", None)


@pytest.mark.parametrize(
    ("name", "ref"),
    [
        ("json:dumps", "ref:json:dumps"),
        ("os.path:join", "ref:os.path:join"),
        ("collections:OrderedDict.fromkeys", "ref:collections:OrderedDict.fromkeys"),
        (f"{__name__}:module_level_double", f"ref:{__name__}:module_level_double"),
    ],
)
def test_module_function_string_is_a_ref(name: str, ref: str) -> None:
    assert codec.function_ref(name) == (ref, None)


def test_importable_function_goes_by_reference() -> None:
    import os.path

    assert codec.function_ref(json.dumps) == ("ref:json:dumps", None)
    assert codec.function_ref(os.path.join) == ("ref:posixpath:join", None)


def test_user_module_function_goes_by_value() -> None:
    """This test module is the user's own file (not installed): a peer may not have it (#13)."""
    for fn, arg, want in ((module_level_double, 4, 8), (Holder.triple, 2, 6)):
        ref, blob = codec.function_ref(fn)
        assert ref.startswith("dill:") and blob is not None
        assert codec.loads(blob)(arg) == want


def test_lambda_goes_by_value_and_loads_back() -> None:
    fn = lambda x: x + 41  # noqa: E731
    ref, blob = codec.function_ref(fn)
    assert ref.startswith("dill:")
    assert blob is not None
    assert ref == "dill:" + codec.blob_digest(blob)
    assert codec.loads(blob)(1) == 42


def test_closure_goes_by_value_with_its_captured_state() -> None:
    def make(offset: int) -> Callable[[int], int]:
        def shifted(x: int) -> int:
            return x + offset

        return shifted

    ten, twenty = make(10), make(20)
    ref10, blob10 = codec.function_ref(ten)
    ref20, blob20 = codec.function_ref(twenty)
    assert ref10.startswith("dill:") and ref20.startswith("dill:")
    assert ref10 != ref20  # different captured state, different code blob
    assert blob10 is not None and blob20 is not None
    assert codec.loads(blob10)(1) == 11
    assert codec.loads(blob20)(1) == 21


def test_same_function_object_same_digest() -> None:
    fn = lambda: "hi"  # noqa: E731
    first = codec.function_ref(fn)
    second = codec.function_ref(fn)
    assert first == second
    assert first[0] == "dill:" + codec.blob_digest(first[1])


def test_local_function_goes_by_value() -> None:
    def local(x: int) -> int:
        return x * x

    ref, blob = codec.function_ref(local)
    assert ref.startswith("dill:")
    assert codec.loads(blob)(7) == 49


@pytest.mark.parametrize(
    "name", ["no_such_std_task", "definitely_not_a_module_xyz:f", "json:no_such_function", ""]
)
def test_unknown_name_raises_submission_error_naming_it(name: str) -> None:
    with pytest.raises(SubmissionError) as info:
        codec.function_ref(name)
    assert repr(name) in str(info.value) or name.split(":")[0] in str(info.value)
    assert isinstance(info.value, ValueError)  # SubmissionError is also a ValueError


def test_unknown_module_error_names_the_module_and_task() -> None:
    with pytest.raises(SubmissionError, match="definitely_not_a_module_xyz"):
        codec.function_ref("definitely_not_a_module_xyz:f")
    with pytest.raises(SubmissionError, match=r"json:no_such_function.*'no_such_function'"):
        codec.function_ref("json:no_such_function")


def test_not_callable_rejected() -> None:
    with pytest.raises(SubmissionError, match="callable"):
        codec.function_ref(42)


def test_unserializable_callable_rejected_naming_it() -> None:
    gen = (i for i in range(3))

    def uses_generator() -> int:
        return next(gen)  # the closure captures a generator: dill cannot carry it

    with pytest.raises(SubmissionError, match="uses_generator"):
        codec.function_ref(uses_generator)


# --------------------------------------------------------------------------- inputs
@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        ((1, "two", b"three", [4.0], {"five": 5}), {}),
        ((1,), {"key": "value"}),
        ((lambda x: x,), {}),  # by value via dill
        (((1, {}),), {}),  # a tuple that looks like (args, kwargs) must stay an argument
    ],
)
def test_inputs_round_trip(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    got_args, got_kwargs = codec.decode_inputs(codec.encode_inputs("t", args, kwargs))
    assert got_kwargs == kwargs
    assert len(got_args) == len(args)
    for got, sent in zip(got_args, args, strict=True):
        if callable(sent):
            assert got(5) == sent(5)
        else:
            assert got == sent


def test_ambiguous_single_tuple_argument_without_kwargs() -> None:
    """Known ambiguity: args == ((), {}) with no kwargs decodes as args=(), kwargs={}."""
    args: tuple[Any, ...] = ((), {})
    got = codec.decode_inputs(codec.encode_inputs("t", args, {}))
    assert got == ((), {}) or got == (args, {})


def test_unserializable_inputs_raise_submission_error_naming_the_task() -> None:
    gen = (i for i in range(3))
    with pytest.raises(SubmissionError, match="task my_task: its inputs cannot be serialized"):
        codec.encode_inputs("my_task", (gen,), {})
    with pytest.raises(SubmissionError, match="my_task"):
        codec.encode_inputs("my_task", (), {"g": gen})


def test_lock_input_is_carried_by_value_not_refused() -> None:
    """A threading.Lock is not refused: dill rebuilds a *separate* lock, in the same state.

    Documented so a change of behaviour is noticed: the task gets a copy, so the lock does
    not synchronise anything with the client; a lock held at submission arrives held, and a
    task that acquires it blocks forever.
    """
    for held in (False, True):
        lock = threading.Lock()
        if held:
            lock.acquire()
        (copy,), _ = codec.decode_inputs(codec.encode_inputs("locker", (lock,), {}))
        assert copy is not lock
        assert copy.locked() is held
        if held:
            copy.release()
            assert lock.locked()  # independent of the original
            lock.release()


# --------------------------------------------------------------------------- errors
@pytest.fixture
def remote_error() -> Iterator[BaseException]:
    yield _raise(ValueError("bad value 42"))


def test_error_round_trip_keeps_type_message_and_traceback(remote_error: BaseException) -> None:
    info = codec.decode_error(codec.encode_error(remote_error))
    assert info.type_name == "ValueError"
    assert info.message == "bad value 42"
    assert "ValueError: bad value 42" in info.traceback
    assert "_raise" in info.traceback  # the remote frames are there
    exc = codec.error_to_exception(info)
    assert type(exc) is ValueError
    assert exc.args == ("bad value 42",)
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert exc.__cause__.tb == info.traceback
    assert "_raise" in str(exc.__cause__)


@pytest.mark.parametrize(
    "exc",
    [
        KeyError("missing"),
        ZeroDivisionError("division by zero"),
        SubmissionError("nope"),
        ExecutorDiedError("executor e1 died", 137),
        ModuleNotFoundError("no module named x", name="x"),
        SystemExit(3),
        TaskcsError("root"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_error_round_trip_many_types(exc: BaseException) -> None:
    raised = _raise(exc)
    out = codec.error_to_exception(codec.decode_error(codec.encode_error(raised)))
    assert type(out) is type(exc)
    assert out.args == exc.args
    assert isinstance(out.__cause__, RemoteTraceback)
    if isinstance(exc, ExecutorDiedError):
        assert out.exit_code == 137  # type: ignore[attr-defined]
    if isinstance(exc, ModuleNotFoundError):
        assert out.name == "x"  # type: ignore[attr-defined]


def test_explicit_traceback_text_is_kept() -> None:
    info = codec.decode_error(codec.encode_error(RuntimeError("x"), "custom traceback text"))
    assert info.traceback == "custom traceback text"
    exc = codec.error_to_exception(info)
    assert exc.__cause__.tb == "custom traceback text"


@pytest.mark.parametrize(
    ("exc", "type_name", "message"),
    [
        (NeedsTwoArgs("a", "b"), "NeedsTwoArgs", "a and b"),
        (CarriesAGenerator("has a generator"), "CarriesAGenerator", "has a generator"),
    ],
)
def test_unpicklable_exception_degrades_to_task_error(
    exc: BaseException, type_name: str, message: str
) -> None:
    info = codec.decode_error(codec.encode_error(_raise(exc)))
    assert info.exception is None
    assert info.type_name == type_name
    assert info.message == message
    assert type_name in info.traceback
    out = codec.error_to_exception(info)
    assert type(out) is TaskError
    assert str(out) == f"{type_name}: {message}"
    assert isinstance(out.__cause__, RemoteTraceback)


def test_exception_whose_class_is_missing_here_degrades() -> None:
    """The client may not have the class the executor raised: decode still succeeds."""
    payload = codec.encode_error(_raise(KeyError("k")))
    # rewrite the pickled exception to name a module that does not exist on this side
    type_name, message, tb, exc_bytes = pickle.loads(payload)
    fake = exc_bytes.replace(b"builtins", b"nomodule")
    assert fake != exc_bytes
    broken = pickle.dumps((type_name, message, tb, fake))
    info = codec.decode_error(broken)
    assert info.exception is None
    assert type(codec.error_to_exception(info)) is TaskError


# --------------------------------------------------------------------------- plain values
@pytest.mark.parametrize("value", [None, 0, "text", b"\0" * 10, [1, (2, {3: 4})], {1, 2}])
def test_result_round_trip(value: Any) -> None:
    assert codec.loads(codec.encode_result(value)) == value


def test_dumps_falls_back_to_dill() -> None:
    fn = lambda: 5  # noqa: E731
    with pytest.raises(Exception):  # noqa: B017 - the C pickler refuses lambdas
        pickle.dumps(fn)
    assert codec.loads(codec.dumps(fn))() == 5


def test_blob_digest_is_sha1_hex() -> None:
    assert codec.blob_digest(b"") == "da39a3ee5e6b4b0d3255bfef95601890afd80709"
