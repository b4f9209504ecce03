"""The wire protocol: every message round-trips, and malformed input only ever raises ProtocolError.

Strategies are derived from each class's ``SCHEMA`` so a new message kind is covered by the
round-trip test as soon as it is added to ``MESSAGE_TYPES``.
"""

from __future__ import annotations

import contextlib
import copyreg
import os
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskcs.errors import ProtocolError
from taskcs.runtime import protocol as p

PROFILE = settings(derandomize=True, max_examples=60, deadline=None)

ALL_CLASSES = sorted(p.MESSAGE_TYPES.values(), key=lambda cls: int(cls.COMMAND))
UNKNOWN_COMMANDS = [b for b in range(256) if b not in p.MESSAGE_TYPES]


# --------------------------------------------------------------------------- strategies
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
#: What a STATUS_REPLY may carry: any tree of plain values under string keys.
plain_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=10), children, max_size=4),
    ),
    max_leaves=12,
)


def strategy_for(form: Any) -> st.SearchStrategy[Any]:
    """Values matching one SCHEMA entry (the forms documented in ``protocol._check``)."""
    if form is bool:
        return st.booleans()
    if form is int:
        return st.integers(min_value=-(2**70), max_value=2**70)
    if form is str:
        return st.text(max_size=30)
    if form is bytes:
        return st.binary(max_size=64)
    if form is dict:
        return st.dictionaries(st.text(max_size=10), plain_values, max_size=5)
    if isinstance(form, list):
        items = strategy_for(form[0])
        # lists and tuples are both accepted for a [form]; pickle keeps which one it was
        return st.one_of(st.lists(items, max_size=5), st.lists(items, max_size=5).map(tuple))
    if isinstance(form, tuple):
        return st.tuples(*(strategy_for(f) for f in form))
    if isinstance(form, dict):
        ((key_form, value_form),) = form.items()
        return st.dictionaries(strategy_for(key_form), strategy_for(value_form), max_size=5)
    raise AssertionError(f"no strategy for schema form {form!r}")


def message_strategy(cls: type[p.Message]) -> st.SearchStrategy[p.Message]:
    return st.builds(cls, *(strategy_for(form) for form in cls.SCHEMA))


def frames_for(cls: type[p.Message], values: tuple[Any, ...], protocol: int = 5) -> list[bytes]:
    return [p.HEADER, bytes([cls.COMMAND]), pickle.dumps(values, protocol=protocol)]


def field_values(msg: p.Message) -> tuple[Any, ...]:
    return tuple(getattr(msg, name) for name in p.field_names(type(msg)))


def example_values(cls: type[p.Message]) -> tuple[Any, ...]:
    """A fixed well-formed value per field, for the malformed-input tests."""
    examples = {bool: True, int: 7, str: "text", bytes: b"bytes", dict: {"k": 1}}

    def one(form: Any) -> Any:
        if isinstance(form, type):
            return examples[form]
        if isinstance(form, list):
            return [one(form[0])]
        if isinstance(form, tuple):
            return tuple(one(f) for f in form)
        ((kf, vf),) = form.items()
        return {one(kf): one(vf)}

    return tuple(one(form) for form in cls.SCHEMA)


def wrong_value(form: Any) -> Any:
    """A value that must not pass as ``form``."""
    if form is bool:
        return 1  # an int is not a bool
    if form is int:
        return "1"
    if form is str:
        return b"not text"
    if form is bytes:
        return "not bytes"
    if form is dict:
        return [("k", 1)]
    if isinstance(form, list):
        return {"not": "a list"}
    if isinstance(form, tuple):
        return list(example_values_of(form))  # right contents, wrong container
    return [("k", "v")]  # a dict form given a list


def example_values_of(form: tuple[Any, ...]) -> tuple[Any, ...]:
    examples = {bool: True, int: 7, str: "text", bytes: b"bytes"}
    return tuple(examples[f] for f in form)


def assert_rejected(frames: list[bytes]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        p.decode(frames)
    return info.value


_tripwire_calls: list[tuple[Any, ...]] = []


def _tripwire(*args: Any) -> str:
    """Stands in for os.system: decoding must never reach it."""
    _tripwire_calls.append(args)
    return "called"


class _Evil:
    """Pickles to a call of _tripwire, like a classic pickle exploit calling os.system."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_tripwire, ("echo pwned",))


@pytest.fixture
def tripwire() -> Iterator[list[tuple[Any, ...]]]:
    _tripwire_calls.clear()
    yield _tripwire_calls
    _tripwire_calls.clear()


# --------------------------------------------------------------------------- the schema itself
def test_every_command_has_exactly_one_message_class() -> None:
    assert set(p.MESSAGE_TYPES) == {int(c) for c in p.Command}
    for command, cls in p.MESSAGE_TYPES.items():
        assert command == cls.COMMAND


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_schema_has_one_entry_per_field(cls: type[p.Message]) -> None:
    assert len(cls.SCHEMA) == len(p.field_names(cls))


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@PROFILE
@given(data=st.data())
def test_round_trip(cls: type[p.Message], data: st.DataObject) -> None:
    msg = data.draw(message_strategy(cls))
    frames = p.encode(msg)
    assert len(frames) == 3
    assert frames[0] == p.HEADER
    assert frames[1] == bytes([cls.COMMAND])
    assert all(type(f) is bytes for f in frames)
    decoded = p.decode(frames)
    assert type(decoded) is cls
    assert decoded == msg


def test_round_trip_defaults() -> None:
    for msg in (p.Hello("client", "c", 1), p.Bye(), p.Stop(), p.Heartbeat(), p.StatusRequest()):
        assert p.decode(p.encode(msg)) == msg


def test_round_trip_large_batch() -> None:
    tasks = [(i, "std:add", pickle.dumps((i, i)), 0, 1) for i in range(5000)]
    msg = p.Submit(3, tasks, {"a" * 40: b"\0" * 1000}, True)
    assert p.decode(p.encode(msg)) == msg


# --------------------------------------------------------------------------- framing errors
@PROFILE
@given(frames=st.lists(st.binary(max_size=16), max_size=6).filter(lambda f: len(f) != 3))
def test_wrong_frame_count_rejected(frames: list[bytes]) -> None:
    err = assert_rejected(frames)
    assert "frames" in str(err)


def test_extra_frame_rejected() -> None:
    frames = p.encode(p.Heartbeat())
    assert_rejected([b"identity", *frames])
    assert_rejected([*frames, b""])


@pytest.mark.parametrize("header", [b"", b"TCS", b"TCS0", b"TCS2", b"tcs1", b"MDPC01", b"TCS1\0"])
def test_wrong_header_rejected(header: bytes) -> None:
    _, cmd, body = p.encode(p.Bye("x"))
    err = assert_rejected([header, cmd, body])
    assert "header" in str(err)


@pytest.mark.parametrize("command", UNKNOWN_COMMANDS[:4] + UNKNOWN_COMMANDS[-2:])
def test_unknown_command_byte_rejected(command: int) -> None:
    body = pickle.dumps((), protocol=5)
    err = assert_rejected([p.HEADER, bytes([command]), body])
    assert "unknown command" in str(err)


def test_every_unknown_command_byte_rejected() -> None:
    body = pickle.dumps((), protocol=5)
    for command in UNKNOWN_COMMANDS:
        assert_rejected([p.HEADER, bytes([command]), body])


@pytest.mark.parametrize("cmd", [b"", b"\x01\x01", b"\x0a\x00", b"HELLO"])
def test_command_frame_of_wrong_length_rejected(cmd: bytes) -> None:
    assert_rejected([p.HEADER, cmd, pickle.dumps((), protocol=5)])


# --------------------------------------------------------------------------- body errors
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@PROFILE
@given(body=st.binary(max_size=200))
def test_garbage_body_never_raises_anything_but_protocol_error(
    cls: type[p.Message], body: bytes
) -> None:
    try:
        msg = p.decode([p.HEADER, bytes([cls.COMMAND]), body])
    except ProtocolError:
        return
    # by chance a valid body (e.g. b")." is HEARTBEAT's empty tuple): it must then be well-formed
    assert type(msg) is cls
    assert p.decode(p.encode(msg)) == msg


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@PROFILE
@given(data=st.data())
def test_truncated_or_corrupted_body_rejected_cleanly(cls: type[p.Message], data: st.DataObject) -> None:
    """Damage to a real body: cut it short or flip a byte; only ProtocolError may come out."""
    header, cmd, body = p.encode(data.draw(message_strategy(cls)))
    cut = data.draw(st.integers(0, len(body) - 1))
    damaged = [body[:cut]]
    pos = data.draw(st.integers(0, len(body) - 1))
    damaged.append(body[:pos] + bytes([body[pos] ^ data.draw(st.integers(1, 255))]) + body[pos + 1:])
    for bad in damaged:
        try:
            msg = p.decode([header, cmd, bad])
        except ProtocolError:
            continue
        assert type(msg) is cls


def test_pickled_global_refused(tripwire: list[tuple[Any, ...]]) -> None:
    for body in (pickle.dumps(os.system), pickle.dumps(_tripwire), pickle.dumps(ProtocolError)):
        err = assert_rejected([p.HEADER, bytes([p.Command.BYE]), body])
        assert "not allowed" in str(err)
    assert tripwire == []


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_exploit_refused_without_calling_anything(
    tripwire: list[tuple[Any, ...]], protocol: int
) -> None:
    # as a whole body, and hidden inside an otherwise well-formed field tuple
    for values in (_Evil(), (_Evil(),), ("client", "c", 1, 1, False, False, [_Evil()], True)):
        for command in (p.Command.BYE, p.Command.HELLO, p.Command.STATUS_REPLY):
            body = pickle.dumps(values, protocol=protocol)
            assert_rejected([p.HEADER, bytes([command]), body])
    assert tripwire == []


@pytest.mark.parametrize(
    "body",
    [
        # GLOBAL + REDUCE, the textbook os.system exploit (protocol 0)
        b"cos\nsystem\n(S'echo pwned'\ntR.",
        # INST opcode: looks the class up and calls it in one step
        b"(S'echo pwned'\nios\nsystem\n.",
        # STACK_GLOBAL (protocol 4)
        b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x0becho pwned\x85R.",
        # OBJ opcode
        b"\x80\x02(cos\nsystem\nS'echo pwned'\no.",
    ],
    ids=["GLOBAL+REDUCE", "INST", "STACK_GLOBAL", "OBJ"],
)
def test_handcrafted_exploit_bodies_refused(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[Any] = []

    def fake_system(*args: Any) -> int:
        called.append(args)
        return 0

    monkeypatch.setattr(os, "system", fake_system)
    for command in (p.Command.BYE, p.Command.STATUS_REPLY):
        assert_rejected([p.HEADER, bytes([command]), body])
    assert called == []


def test_extension_registry_opcode_refused(tripwire: list[tuple[Any, ...]]) -> None:
    code = 0xF0
    copyreg.add_extension(__name__, "_tripwire", code)
    try:
        body = b"\x80\x02\x82" + bytes([code]) + b")R\x85."  # EXT1 code, (), REDUCE, 1-tuple
        pickle.loads(body)  # an ordinary unpickle elsewhere in the process warms the cache
        tripwire.clear()
        assert_rejected([p.HEADER, bytes([p.Command.BYE]), body])
        assert tripwire == []
    finally:
        copyreg.remove_extension(__name__, "_tripwire", code)
        copyreg.clear_extension_cache()


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_wrong_field_count_rejected(cls: type[p.Message]) -> None:
    values = example_values(cls)
    assert type(p.decode(frames_for(cls, values))) is cls  # the baseline is well-formed
    for bad in ((*values, 1), values[:-1] if values else ("extra",), values + values):
        if bad == values:
            continue
        err = assert_rejected(frames_for(cls, bad))
        assert cls.__name__ in str(err)


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_body_not_a_tuple_rejected(cls: type[p.Message]) -> None:
    values = example_values(cls)
    for bad in (list(values), dict(enumerate(values)), None, 0, "text", b"bytes"):
        assert_rejected(frames_for(cls, bad))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cls", "index"),
    [(cls, i) for cls in ALL_CLASSES for i in range(len(cls.SCHEMA))],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_wrong_field_type_rejected(cls: type[p.Message], index: int) -> None:
    values = list(example_values(cls))
    values[index] = wrong_value(cls.SCHEMA[index])
    err = assert_rejected(frames_for(cls, tuple(values)))
    field_name = p.field_names(cls)[index]
    assert repr(field_name) in str(err)


SUBMIT_OK = (1, "std:add", b"payload", 0, 1)


@pytest.mark.parametrize(
    "task",
    [
        (1, "std:add", "payload as str", 0, 1),  # str where bytes are expected
        (1, b"std:add", b"payload", 0, 1),  # bytes where str is expected
        ("1", "std:add", b"payload", 0, 1),  # str task id
        (1.0, "std:add", b"payload", 0, 1),  # float task id
        (1, "std:add", b"payload", None, 1),  # None flags
        (1, "std:add", b"payload", 0),  # a field short
        (1, "std:add", b"payload", 0, 1, 0),  # a field too many
        [1, "std:add", b"payload", 0, 1],  # a list, not a tuple
        (1, "std:add", bytearray(b"payload"), 0, 1),  # bytearray is not bytes
        None,
    ],
)
def test_malformed_submit_task_entry_rejected(task: Any) -> None:
    assert p.decode(frames_for(p.Submit, (1, [SUBMIT_OK], {}, True))) == p.Submit(1, [SUBMIT_OK], {}, True)
    err = assert_rejected(frames_for(p.Submit, (1, [SUBMIT_OK, task], {}, True)))
    assert "'tasks'" in str(err)


@pytest.mark.parametrize(
    ("cls", "values"),
    [
        (p.Submit, (1, [], {"digest": "not bytes"}, True)),
        (p.Submit, (1, [], {b"digest": b"blob"}, True)),
        (p.Submit, (1, [], {}, 1)),  # int where bool is expected
        (p.Tasks, ([(1, "std:add", b"x", None)], {})),
        (p.ExecDone, ([(1, 0, "not bytes", 10, 0, 0)],)),
        (p.Results, ([(1, 0, b"x", b"name")],)),
        (p.Cancel, (["1"],)),
        (p.Cancel, ([1, 2, None],)),
        (p.Output, ([(1, b"text")],)),
        (p.Hello, ("client", "c", 1, 0, False, False, [b"/path"], True)),
        (p.Hello, ("client", "c", 1, 0, False, False, "/path", True)),
        (p.StatusReply, ([("k", 1)],)),
        (p.Stop, ("yes",)),
    ],
)
def test_malformed_nested_field_rejected(cls: type[p.Message], values: tuple[Any, ...]) -> None:
    assert_rejected(frames_for(cls, values))


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
@PROFILE
@given(data=st.data())
def test_random_well_typed_body_of_another_command_rejected_or_valid(
    cls: type[p.Message], data: st.DataObject
) -> None:
    """The body of one message under another command byte: reject or decode, never crash."""
    other = data.draw(st.sampled_from(ALL_CLASSES))
    body = p.encode(data.draw(message_strategy(other)))[2]
    try:
        msg = p.decode([p.HEADER, bytes([cls.COMMAND]), body])
    except ProtocolError:
        return
    assert type(msg) is cls


# ------------------------------------------------------------------ the single wire frame
@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_wire_frame_round_trip(cls: type[p.Message]) -> None:
    msg = cls(*example_values(cls))
    frame = p.to_wire(msg)
    assert type(frame) is bytes and frame[:4] == p.HEADER and frame[4] == cls.COMMAND
    assert p.from_wire(frame) == msg
    assert b"".join(p.encode(msg)) == frame  # the same three parts, concatenated


@given(frame=st.binary(max_size=64))
def test_malformed_wire_frames_raise_protocol_error_only(frame: bytes) -> None:
    with contextlib.suppress(ProtocolError):  # anything else escaping fails the test
        p.from_wire(frame)


@pytest.mark.parametrize(
    "frame", [b"", b"TCS1", b"TCS1\x0a", b"TCS2\x0a" + pickle.dumps(()), b"TCS1\xff" + pickle.dumps(())]
)
def test_short_or_foreign_wire_frames_rejected(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.from_wire(frame)


# ------------------------------------------------------------ big payloads as their own frames
BIG = bytes(range(256)) * (p.OOB_BYTES // 256 + 1)  # just over the threshold
_BULK_MESSAGES = [
    lambda pay: p.Submit(1, [(1, "std:echo", pay, 0, 1), (2, "std:echo", b"small", 0, 1)], {}, False),
    lambda pay: p.Tasks([(7, "std:echo", b"small", "ctx"), (8, "std:echo", pay, "ctx")], {}),
    lambda pay: p.ExecDone([(7, 0, pay, 12, 0, 0)]),
    lambda pay: p.Results([(1, 0, pay, "exec-1", 1, 2, "s", 0), (2, 1, pay + b"!", "exec-2", 0, 0, "s", 3)]),
]


@pytest.mark.parametrize("make", _BULK_MESSAGES, ids=["Submit", "Tasks", "ExecDone", "Results"])
def test_big_payloads_travel_as_frames_of_their_own(make: Any) -> None:
    msg = make(BIG)
    frames = p.to_frames(msg)
    big = sum(len(getattr(msg, name)) for name in ("tasks", "results") if hasattr(msg, name))
    assert 2 <= len(frames) <= 1 + big
    assert len(frames[0]) < p.OOB_BYTES  # the body no longer holds the payloads
    assert all(bytes(f) in (BIG, BIG + b"!") for f in frames[1:])
    received = [bytes(f) for f in frames]  # what a socket hands over
    decoded = p.from_wire(received[0], received[1:])
    assert decoded == msg
    entries = getattr(decoded, "tasks", None) or decoded.results  # type: ignore[attr-defined]
    assert all(type(entry[2]) is bytes for entry in entries)  # the schema's type, unchanged


@pytest.mark.parametrize("make", _BULK_MESSAGES, ids=["Submit", "Tasks", "ExecDone", "Results"])
def test_small_payloads_stay_in_the_single_frame(make: Any) -> None:
    msg = make(b"tiny")
    assert p.to_frames(msg) == [p.to_wire(msg)]


def test_a_body_naming_a_missing_payload_frame_is_rejected() -> None:
    frames = p.to_frames(p.ExecDone([(7, 0, BIG, 12, 0, 0)]))
    with pytest.raises(ProtocolError, match="out-of-band"):
        p.from_wire(bytes(frames[0]))  # the payload frame did not come


def test_payload_frames_received_as_memoryviews_decode_without_a_copy() -> None:
    msg = p.Tasks([(8, "std:echo", BIG, "ctx"), (9, "std:echo", b"small", "ctx")], {})
    frames = p.to_frames(msg)
    views = [memoryview(bytes(f)) for f in frames[1:]]  # as a socket hands them over
    decoded = p.from_wire(bytes(frames[0]), views)
    assert decoded == msg
    assert decoded.tasks[0][2] is views[0]  # the very buffer: not copied
    assert type(decoded.tasks[1][2]) is bytes


def test_an_out_of_band_buffer_is_refused_outside_a_payload_slot() -> None:
    # Only task payloads may arrive as views; a code blob must still be bytes.
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps((1, [], {"digest": pickle.PickleBuffer(BIG)}, False), protocol=5,
                        buffer_callback=buffers.append)
    frame = p.HEADER + bytes([p.Command.SUBMIT]) + body
    with pytest.raises(ProtocolError, match="blobs"):
        p.from_wire(frame, [memoryview(bytes(b.raw())) for b in buffers])
