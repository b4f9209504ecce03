"""Running one task: resolve its function reference, decode inputs, call, encode the outcome.

Shared by every executor flavour, so a task behaves the same on an executor thread, an
executor process and a client's foreground executor.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import TaskError
from ..runtime import codec
from ..runtime.protocol import Scattered
from ..runtime.task import Status

log = logging.getLogger(__name__)

#: (gid, func_ref, payload, ctx) as carried by a TASKS message.
TaskEntry = tuple[int, str, bytes, str]
#: (gid, status, payload, duration in µs, start_ns, end_ns) as carried by EXEC_DONE; the
#: times are this machine's wall clock (time.time_ns) around the run, for the timeline (#11).
ResultEntry = tuple[int, int, bytes, int, int, int]

#: Bytes and bytearrays at least this big are pickled through a writer (:func:`dumps_large`).
LARGE_BYTES = 1 << 16
_BYTES_TYPES = (bytes, bytearray)


class _Parts:
    __slots__ = ("write",)


def dumps_large(obj: Any, protocol: int = codec.PICKLE_PROTOCOL, scatter: bool = False) -> Any:
    """``pickle.dumps(obj)`` for an object holding big buffers (issue 10).

    Writing to a file, the C pickler hands a buffer of 64 KiB or more to ``write()`` as it is,
    where ``pickle.dumps`` grows its own buffer around it copy after copy: a 1 MB bytes
    pickled in 420 µs that way, in 28 µs this way (10 MB: 6 ms -> 0.6 ms), measured here.
    Only for plain data: it skips the by-value checks of :func:`taskcs.runtime.codec.dumps`.

    ``scatter``: return the parts unjoined, as a :class:`~taskcs.runtime.protocol.Scattered`
    (only for a payload that goes on the direct path's stream link). A part that is not an
    immutable bytes object (a bytearray handed through) is copied: the caller may change it
    after submitting, and the task must see what was submitted.
    """
    parts: list[Any] = []
    writer = _Parts()
    writer.write = parts.append  # type: ignore[attr-defined]
    pickle.Pickler(writer, protocol).dump(obj)  # type: ignore[arg-type]
    if scatter:
        return Scattered([part if type(part) is bytes else bytes(part) for part in parts])
    return b"".join(parts)


class Resolver:
    """Turns function references into callables, caching each one.

    ``ctx`` names a blob holding the submitting client's ``sys.path``: when a module cannot be
    imported here (the server was started from another directory), those paths are appended
    and the import is tried once more, so the user's own modules work on a shared server.

    Blobs come from *holders*: the server (0) and each direct link (its lease id). A blob is
    dropped, with the function resolved from it, once every holder that sent it has said
    FORGET or ended (:mod:`taskcs.runtime.blob_refs`): each keeps its own account of what this
    executor has, so one's FORGET must not take what another still counts on.
    """

    def __init__(self, name: str = "executor") -> None:
        self.name = name
        self._fns: dict[str, Callable[..., Any]] = {}
        self._blobs: dict[str, bytes] = {}
        self._holders: dict[str, set[int]] = {}  # digest -> holders that sent it
        self._held: dict[int, set[str]] = {}  # holder -> digests it sent
        self._paths_added: set[str] = set()

    def add_blobs(self, blobs: dict[str, bytes], holder: int = 0) -> None:
        """Remember code and path blobs sent with a TASKS message by ``holder``."""
        if not blobs:
            return
        self._blobs.update(blobs)
        held = self._held.get(holder)
        if held is None:
            held = self._held[holder] = set()
        held.update(blobs)
        holders = self._holders
        for digest in blobs:
            who = holders.get(digest)
            if who is None:
                holders[digest] = {holder}
            else:
                who.add(holder)

    def forget(self, digests: Iterable[str], holder: int = 0) -> None:
        """``holder`` no longer counts on these blobs (its FORGET): drop those nobody holds."""
        held = self._held.get(holder)
        if not held:
            return
        for digest in digests:
            if digest in held:
                held.discard(digest)
                who = self._holders.get(digest)
                if who is not None:
                    who.discard(holder)
                    if not who:
                        del self._holders[digest]
                        self._blobs.pop(digest, None)
                        self._fns.pop("dill:" + digest, None)

    def drop_holder(self, holder: int) -> None:
        """``holder`` (a direct link) ended: forget everything it sent."""
        held = self._held.get(holder)
        if held:
            self.forget(list(held), holder)
        self._held.pop(holder, None)

    @property
    def blob_count(self) -> int:
        """How many code and path blobs this executor keeps (for tests and status)."""
        return len(self._blobs)

    def resolve(self, ref: str, ctx: str) -> Callable[..., Any]:
        """The callable for ``ref``; raises ImportError/LookupError with a clear message."""
        fn = self._fns.get(ref)
        if fn is None:
            fn = self._with_client_path(ctx, lambda: self._load(ref))
            self._fns[ref] = fn
        return fn

    def decode_inputs(self, payload: bytes, ctx: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Inputs of a task; the client's path helps unpickle instances of the user's classes."""
        return self._with_client_path(ctx, lambda: codec.decode_inputs(payload))

    def _load(self, ref: str) -> Callable[..., Any]:
        kind, _, rest = ref.partition(":")
        if kind == "dill":
            blob = self._blobs.get(rest)
            if blob is None:
                raise LookupError(f"code blob {rest[:12]} was never sent to executor {self.name}")
            return codec.local_twin(codec.loads(blob))
        try:
            return codec.resolve_ref(ref)
        except LookupError as exc:
            raise LookupError(f"{exc} on executor {self.name}") from None

    def _with_client_path(self, ctx: str, load: Callable[[], Any]) -> Any:
        try:
            return load()
        except ModuleNotFoundError as exc:
            blob = self._blobs.get(ctx) if ctx else None
            if blob is None or ctx in self._paths_added:
                raise ModuleNotFoundError(
                    f"module {exc.name!r} cannot be imported on executor {self.name}: {exc}", name=exc.name
                ) from None
            self._paths_added.add(ctx)
            for path in blob.decode().split("\0"):
                if path not in sys.path:
                    sys.path.append(path)  # append: never shadow the server's own modules
            importlib.invalidate_caches()
            try:
                return load()
            except ModuleNotFoundError as exc2:
                raise ModuleNotFoundError(
                    f"module {exc2.name!r} cannot be imported on executor {self.name}, "
                    f"not even with the client's import path: {exc2}", name=exc2.name
                ) from None


def run_task(resolver: Resolver, entry: TaskEntry, scatter: bool = False) -> ResultEntry:
    """Run one task and return its result entry; never raises (but for KeyboardInterrupt).

    ``scatter``: the result goes to a direct-path client on a stream link, so a big bytes
    result may stay in pieces (see :func:`dumps_large`)."""
    gid, ref, payload, ctx = entry
    # Wall clock for the timeline (comparable across processes), perf_counter for the duration
    # the scheduler learns from (immune to clock steps): ~60 ns of clock reads per task.
    start_ns = time.time_ns()
    start = time.perf_counter()
    try:
        fn = resolver.resolve(ref, ctx)
        args, kwargs = resolver.decode_inputs(payload, ctx)
        value = fn(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit in a task is the task's failure, not ours
        out = codec.encode_error(exc)
        return gid, int(Status.ERROR), out, int((time.perf_counter() - start) * 1e6), start_ns, time.time_ns()
    try:
        if type(value) in _BYTES_TYPES and len(value) >= LARGE_BYTES:
            out = dumps_large(value, scatter=scatter)  # plain bytes name no code: nothing to check
        else:
            out = codec.encode_result(value)
        status = int(Status.OK)
    except Exception as exc:
        err = TaskError(f"the result of {ref} ({type(value).__name__}) cannot be serialized: {exc}")
        out = codec.encode_error(err)
        status = int(Status.ERROR)
    return gid, status, out, int((time.perf_counter() - start) * 1e6), start_ns, time.time_ns()
