"""The frames of :mod:`taskcs.runtime.protocol`'s messages: encoding, decoding, validation.

    to_wire(msg)                  -> one frame: header, command byte, body        sending
    to_frames(msg, scatter)       -> that frame, then one per big payload (OOB_BYTES)
    from_wire(frame, buffers)     -> the Message, or ProtocolError                receiving
    encode(msg) / decode(frames)  -> the three parts as separate frames

The format is specified in the protocol module's docstring, which also lists every command.
A body is decoded by an unpickler that refuses every global (_PlainUnpickler; for peers not
yet welcomed, the bomb-proof _SafePlainUnpickler), then each field is checked against its
message's SCHEMA by a validator compiled once per form (_compile, _check).

This module reads the protocol module's tables (MESSAGE_TYPES, _FIELDS), so the protocol
module cannot import it at its top; it re-exports these names instead, importing this module
on their first use: ``protocol.to_frames``, ``protocol.Scattered`` etc. are the API.
"""

from __future__ import annotations

import copyreg
import io
import operator
import pickle
from collections.abc import Sequence
from typing import Any

from ..errors import ProtocolError
from .protocol import _FIELDS, HEADER, MESSAGE_TYPES, Command, ExecDone, Message, Results, Submit, Tasks


class _PlainUnpickler(pickle.Unpickler):
    """Refuses every global, so only plain containers and scalars can be decoded."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a message body")


# ---- issue 9 (item 5): bodies from peers the server has not welcomed ----------------------
class _SafePlainUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, refusing every global, for input from unwelcomed peers.

    The C unpickler grows its memo to twice a LONG_BINPUT index, so a 12-byte body could make
    it allocate and zero 16 GB (46 s of a stalled server, measured; found by a flood of garbage
    SUBMITs). The pure-Python one keeps its memo in a dict; it is ~10x slower, which only the
    first message of each connection (its HELLO) and garbage pay.
    """

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a message body")
# ---- end issue 9 (item 5) ------------------------------------------------------------------


def encode(msg: Message) -> list[bytes]:
    """Frames of ``msg``: header, command byte, body."""
    values = tuple(getattr(msg, name) for name in _FIELDS[type(msg)])
    return [HEADER, _CMD_BYTES[msg.COMMAND], pickle.dumps(values, protocol=5)]


_CMD_BYTES = {cmd: bytes([cmd]) for cmd in Command}
_PREFIX = {cmd: HEADER + bytes([cmd]) for cmd in Command}


def to_wire(msg: Message) -> bytes:
    """``msg`` as the single frame sent on a socket: header, command byte, body."""
    values = tuple(getattr(msg, name) for name in _FIELDS[type(msg)])
    return _PREFIX[msg.COMMAND] + pickle.dumps(values, protocol=5)


#: Payloads at least this big leave the message frame and travel as frames of their own
#: (pickle protocol 5 out-of-band buffers): pickling them into the body and out again cost
#: three extra copies per hop, about a third of the time of a 10 MB task.
OOB_BYTES = 1 << 16


class Scattered:
    """A big payload kept as the pickler's parts, never joined (issue 10).

    Pickling to a writer, the C pickler hands a big bytes object to ``write()`` as it is, so
    a 1 MB argument pickles to three parts: a few header bytes, the caller's own bytes object,
    a few trailing bytes. Joining them copies the megabyte (and faults in a fresh buffer for
    it); a stream link (:mod:`taskcs.runtime.stream`) instead hands the parts to one
    ``sendmsg`` as one frame, which the receiver reads into one contiguous buffer as before.
    Only the direct path's two ends make these (the client for a task that may go on a lease,
    an executor for a result to its lease holder), only for payloads of plain data of at least
    :data:`OOB_BYTES`; every other transport, and :func:`to_frames` unless told, joins them.
    """

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.nbytes = sum(memoryview(part).nbytes for part in parts)

    def __len__(self) -> int:
        return self.nbytes

    def join(self) -> bytes:
        """The payload as one bytes object (a copy)."""
        return b"".join(self.parts)


def to_frames(msg: Message, scatter: bool = False) -> list[Any]:
    """``msg`` as the frames sent on a socket: :func:`to_wire`'s frame, then one frame per
    payload of at least :data:`OOB_BYTES` (memoryviews of the payloads: not copied).

    A :class:`Scattered` payload is joined, or with ``scatter`` left as its list of parts:
    one frame in several pieces, for a transport that sends a frame from pieces."""
    values = tuple(getattr(msg, name) for name in _FIELDS[type(msg)])
    bulk = _BULK.get(type(msg))
    if bulk is not None:
        field, index = bulk
        items = values[field]
        if items and max(map(len, map(_itemgetters[index], items))) >= OOB_BYTES:
            pieces: dict[int, list[Any]] = {}

            def wrap(payload: Any) -> pickle.PickleBuffer:
                if type(payload) is not Scattered:
                    return pickle.PickleBuffer(payload)
                if not scatter:
                    return pickle.PickleBuffer(payload.join())
                holder = pickle.PickleBuffer(b"")  # its place in the body; the parts go as its frame
                pieces[id(holder)] = payload.parts
                return holder

            wrapped = [
                (*it[:index], wrap(it[index]), *it[index + 1:]) if len(it[index]) >= OOB_BYTES else it
                for it in items
            ]
            buffers: list[pickle.PickleBuffer] = []
            body = pickle.dumps((*values[:field], wrapped, *values[field + 1:]), protocol=5,
                                buffer_callback=buffers.append)
            return [_PREFIX[msg.COMMAND] + body, *(pieces.get(id(buf)) or buf.raw() for buf in buffers)]
    return [_PREFIX[msg.COMMAND] + pickle.dumps(values, protocol=5)]


def from_wire(frame: bytes, buffers: Sequence[bytes] = (), untrusted: bool = False) -> Message:
    """Inverse of :func:`to_wire` and :func:`to_frames` (``buffers``: the frames after the
    first); raise :class:`ProtocolError` on any malformed input. ``untrusted``: the sender
    has not been welcomed, so decode with the bomb-proof unpickler (see _SafePlainUnpickler)."""
    if len(frame) < 6:
        raise ProtocolError(f"a {len(frame)}-byte frame is too short for a message")
    stream = io.BytesIO(frame)  # shares the bytes: the body is not copied
    stream.seek(5)
    return _decode(frame[:4], frame[4:5], stream, buffers, untrusted)


def decode(frames: list[bytes]) -> Message:
    """Decode and validate the three parts; raise :class:`ProtocolError` on any malformed input."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}")
    header, cmd, body = frames
    return _decode(header, cmd, io.BytesIO(body))


def _decode(header: bytes, cmd: bytes, stream: io.BytesIO, buffers: Sequence[bytes] = (),
            untrusted: bool = False) -> Message:
    if header != HEADER:
        raise ProtocolError(f"bad protocol header {bytes(header[:8])!r} (expected {HEADER!r})")
    if len(cmd) != 1 or cmd[0] not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown command {bytes(cmd[:4])!r}")
    cls = MESSAGE_TYPES[cmd[0]]
    try:
        if copyreg._extension_registry:  # type: ignore[attr-defined]
            _refuse_extension_codes(stream.getvalue()[stream.tell():])
        # Out-of-band buffers come back as the very objects received (bytes, or memoryviews of
        # ZeroMQ frames): nothing is copied.
        unpickler = _SafePlainUnpickler if untrusted else _PlainUnpickler
        values = unpickler(stream, buffers=buffers).load()
    except Exception as exc:  # any unpickling failure is the peer's fault, never ours
        raise ProtocolError(f"{cls.__name__}: undecodable body: {exc}") from None
    checks = _CHECKS[cls]
    if type(values) is not tuple or len(values) != len(checks):
        raise ProtocolError(f"{cls.__name__}: expected {len(checks)} fields")
    for value, check, name in zip(values, checks, _FIELDS[cls], strict=True):
        if not check(value):
            raise ProtocolError(f"{cls.__name__}: field {name!r} is malformed")
    return cls(*values)


def _refuse_extension_codes(body: bytes) -> None:
    """EXT1/2/4 opcodes name globals through copyreg's cache without calling find_class, so
    once this process has registered extensions, a body must not contain them. (Scanning is
    slow; it only happens in processes that registered extensions, which is rare.)"""
    import pickletools

    for opcode, _, _ in pickletools.genops(body):
        if opcode.name in ("EXT1", "EXT2", "EXT4"):
            raise pickle.UnpicklingError("pickle extension codes are not allowed in a message body")


def _compile(form: Any) -> Any:
    """A fast validator for ``form``.

    Batches of task tuples are the hot path (one entry per task), so a list of flat tuples
    gets a generated loop of exact type tests; about 20x faster than the generic walk.
    """
    if isinstance(form, list) and isinstance(form[0], tuple) and all(
        isinstance(f, type) for f in form[0]
    ):
        names = [f"a{i}" for i in range(len(form[0]))]
        # A payload (bytes in an entry) may also be a memoryview: out-of-band buffers are
        # received as views of ZeroMQ's frames. Only an out-of-band buffer can produce one.
        tests = " or ".join(
            f"(type({n}) is not bytes and type({n}) is not memoryview)" if t is bytes
            else f"type({n}) is not {t.__name__}"
            for n, t in zip(names, form[0], strict=True)
        )
        src = (
            "def check(items):\n"
            "    if type(items) is not list and type(items) is not tuple:\n"
            "        return False\n"
            "    for it in items:\n"
            f"        if type(it) is not tuple or len(it) != {len(names)}:\n"
            "            return False\n"
            f"        {', '.join(names)}, = it\n"
            f"        if {tests}:\n"
            "            return False\n"
            "    return True\n"
        )
        scope: dict[str, Any] = {}
        exec(src, scope)  # generated from our own constant schemas, never from input
        return scope["check"]
    return lambda value: _check(value, form)


def _check(value: Any, form: Any) -> bool:
    """True if ``value`` matches ``form``: a type, [form] (list), (f1, f2..) or {k: v}."""
    if isinstance(form, type):
        if form is int:
            return type(value) is int or type(value) is bool
        return isinstance(value, form)
    if isinstance(form, list):
        if type(value) not in (list, tuple):
            return False
        inner = form[0]
        return all(_check(item, inner) for item in value)
    if isinstance(form, tuple):
        if type(value) is not tuple or len(value) != len(form):
            return False
        return all(_check(v, f) for v, f in zip(value, form, strict=True))
    if isinstance(form, dict):
        if type(value) is not dict:
            return False
        ((kf, vf),) = form.items()
        return all(_check(k, kf) and _check(v, vf) for k, v in value.items())
    raise TypeError(f"bad schema form {form!r}")  # pragma: no cover - programming error


#: Messages carrying user payloads: (field holding the entries, payload index in an entry).
_BULK: dict[type[Message], tuple[int, int]] = {Submit: (1, 2), Tasks: (0, 2), ExecDone: (0, 2), Results: (0, 2)}
_itemgetters = {2: operator.itemgetter(2)}

_CHECKS: dict[type[Message], tuple[Any, ...]] = {
    cls: tuple(_compile(form) for form in cls.SCHEMA) for cls in MESSAGE_TYPES.values()
}
