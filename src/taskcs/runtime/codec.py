"""Payloads: task inputs, results, errors and function references.

What travels by reference and what by value::

    obj --C pickler--> bytes --names __main__ or a user module?--no--> bytes (the fast path)
             |                            |yes
             +--fails---------------------+--> cloudpickle, user modules by value --fails--> dill

Inputs and results are pickled by reference with the C pickler wherever the receiving side can
import what they name: the standard library and installed distributions. Anything of the
user's ``__main__`` or of a *user module* (a file of their own, not installed; see
:func:`is_user_module`), wherever it sits in the object graph, goes by value: a peer on another
machine, or an executor whose ``__main__`` is the server's, could not resolve it by name. The
check is a scan of the pickled bytes for those module names, so a payload that names none of
them costs one substring search. By value means cloudpickle, whose class tracker also gives a
class sent out and coming back (in a result or an exception) its original identity; dill is the
last resort for objects cloudpickle refuses (locks, for instance).

A callable is turned into a *function reference* once (see :mod:`taskcs.runtime.task`); code
sent by value is a blob named by its SHA-1 digest (``dill:<digest>``, the historical prefix for
"by value"), so a connection carries it once, not once per task. The reference cache holds
nothing alive: weak references, bounded. The user's functions and classes inside a task's
*inputs* become such blobs too, bundled with the task's function (:func:`encode_task`, see
:mod:`taskcs.runtime.coderef`); results and exceptions coming back carry their code inline.

cloudpickle and dill are imported lazily: a run that never meets the user's objects never pays.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import sys
import traceback
import types
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import RemoteTraceback, SubmissionError, TaskError
from . import coderef
from .byvalue import (  # noqa: F401  is_user_module, names_user_objects: part of this module's API
    PICKLE_PROTOCOL,
    _by_value,
    _dill,
    dumps_by_value,
    is_user_module,
    names_user_objects,
    needs_by_value,
)
from .task import ErrorInfo

log = logging.getLogger(__name__)

_c_dumps = pickle.dumps

#: How many distinct callables keep their reference cached. A program that makes a new
#: lambda per task would otherwise grow the cache without end; 4096 keeps every realistic
#: working set while bounding memory.
_REF_CACHE_LIMIT = 4096
#: id(callable) -> (weak reference to it, ref, blob). The weak reference proves an entry still
#: describes the same object (ids are reused) and owns nothing: the entry goes with the callable.
#: Objects that take no weak reference (builtins, some C callables) are not cached: they go by
#: reference, whose lookup is cheap.
_ref_cache: dict[int, tuple[_Ref, str, bytes | None]] = {}

# ------------------------------------------------------------------------------ function refs
def function_ref(fn: Any) -> tuple[str, bytes | None]:
    """The wire reference of ``fn`` and, when it goes by value, its code blob.

    ``fn`` may be a standard task name, a ``"module:function"`` string or a callable.
    Raises :class:`SubmissionError` for unknown names and unserializable callables.
    """
    if isinstance(fn, str):
        return _string_ref(fn), None
    cached = _ref_cache.get(id(fn))
    if cached is not None and cached[0]() is fn:
        return cached[1], cached[2]
    if not callable(fn):
        raise SubmissionError(f"task code must be callable or a task name, not {type(fn).__name__}")
    ref, blob = _callable_ref(fn)
    try:
        wref = _Ref(fn, _forget)
    except TypeError:
        return ref, blob  # takes no weak reference: not cached (see _ref_cache)
    wref.key = id(fn)
    if len(_ref_cache) >= _REF_CACHE_LIMIT:
        _ref_cache.clear()
    _ref_cache[id(fn)] = (wref, ref, blob)
    return ref, blob


class _Ref(weakref.ref):
    """A weak reference that knows its cache key, so its callback finds the entry in O(1)."""

    __slots__ = ("key",)
    key: int


def _forget(dead: _Ref) -> None:
    """Weak-reference callback: drop the dead callable's entry (unless its id was reused)."""
    entry = _ref_cache.get(dead.key)
    if entry is not None and entry[0] is dead:
        _ref_cache.pop(dead.key, None)


def _string_ref(name: str) -> str:
    from ..stdlib_tasks import REGISTRY

    if name in REGISTRY:
        return "std:" + name
    if ":" in name:
        module, _, qualname = name.partition(":")
        resolve_import(module, qualname)  # fail now, at submission, with a clear error
        return f"ref:{module}:{qualname}"
    raise SubmissionError(
        f"unknown task {name!r}: not a standard task (see `cs-demo --list`) "
        "and not a 'module:function' reference"
    )


def _callable_ref(fn: Callable[..., Any]) -> tuple[str, bytes | None]:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    std = getattr(fn, "__taskcs_std__", None)
    if std is not None:
        return "std:" + std, None
    if module and qualname and "<" not in qualname and not is_user_module(module):
        try:
            if _lookup(sys.modules.get(module) or importlib.import_module(module), qualname) is fn:
                return f"ref:{module}:{qualname}", None
        except (ImportError, AttributeError):
            pass  # not importable by name: send it by value below
    try:
        blob = _by_value(fn)
    except Exception as exc:
        raise SubmissionError(f"task {qualname or fn!r}: its code cannot be serialized: {exc}") from exc
    return "dill:" + blob_digest(blob), blob


def local_twin(fn: Any) -> Any:
    """``fn`` rebuilt from a code blob, or this process's own function of the same module,
    name and code if it has one (an in-process executor, or a module it imported itself):
    then the task runs with the module's live globals, as by reference, not with a copy."""
    if type(fn) is not types.FunctionType:
        return fn  # a bound method's twin would be its unbound function: it would lose ``self``
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    qualname = getattr(fn, "__qualname__", None)
    code = getattr(fn, "__code__", None)
    if module is None or not qualname or "<" in qualname or code is None:
        return fn
    try:
        local = _lookup(module, qualname)
    except AttributeError:
        return fn
    return local if getattr(local, "__code__", None) == code else fn


def resolve_ref(ref: str) -> Any:
    """The object a ``std:`` or ``ref:`` function reference names, imported here; ImportError
    (ModuleNotFoundError) or LookupError if there is none."""
    kind, _, rest = ref.partition(":")
    if kind == "std":
        from ..stdlib_tasks import REGISTRY

        try:
            return REGISTRY[rest]
        except KeyError:
            raise LookupError(f"unknown standard task {rest!r}") from None
    if kind == "ref":
        module, _, qualname = rest.partition(":")
        return _lookup(importlib.import_module(module), qualname)
    raise LookupError(f"malformed function reference {ref!r}")


def _lookup(obj: Any, qualname: str) -> Any:
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_import(module: str, qualname: str) -> Any:
    """Import ``module`` and return its attribute ``qualname``; SubmissionError if absent."""
    try:
        return _lookup(importlib.import_module(module), qualname)
    except ImportError as exc:
        raise SubmissionError(f"task {module}:{qualname}: cannot import module {module!r}: {exc}") from exc
    except AttributeError as exc:
        raise SubmissionError(f"task {module}:{qualname}: module {module!r} has no {qualname!r}") from exc


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` as a submitting side does: by reference with the C pickler, unless it
    names ``__main__`` or a user module (then by value), or the C pickler refuses it."""
    try:
        data = _c_dumps(obj, PICKLE_PROTOCOL)
    except Exception:
        return _by_value(obj)
    if 0x93 in data and needs_by_value(data, obj):
        return _by_value(obj)
    return data


def dumps_outcome(obj: Any) -> bytes:
    """Pickle a result or an exception as an executor does.

    Only what cannot be named here goes by value: objects rebuilt from a by-value payload fail
    the C pickler's identity check (or name ``__main__``) and so come back by value, keeping
    their class's identity at the client; objects of a module the executor imported by name
    go by reference, so a client that has that module gets its own classes back.
    """
    try:
        data = _c_dumps(obj, PICKLE_PROTOCOL)
    except Exception:
        return _by_value(obj, register=False)
    if 0x93 in data and needs_by_value(data, obj, user_modules=False):
        return _by_value(obj, register=False)
    return data


def loads(data: bytes) -> Any:
    """Inverse of :func:`dumps`; dill streams load with plain pickle once dill is importable."""
    try:
        return pickle.loads(data)
    except (ModuleNotFoundError, AttributeError) as exc:
        if "dill" in str(exc):
            _dill()
            return pickle.loads(data)
        raise


def encode_inputs(label: str, args: tuple[Any, ...], kwargs: dict[str, Any], by_value: bool = False) -> bytes:
    """Payload of a task's inputs; SubmissionError naming the task if they don't serialize.

    ``by_value``: the caller already knows they name the user's objects (skips the C pickler).
    """
    try:
        value = (args, kwargs) if kwargs else args
        return _by_value(value) if by_value else dumps(value)
    except Exception as exc:
        raise SubmissionError(f"task {label}: its inputs cannot be serialized: {exc}") from exc


def encode_task(label: str, ref: str, blob: bytes | None, args: tuple[Any, ...], kwargs: dict[str, Any],
                by_value: bool = False) -> tuple[str, bytes, bytes | None]:
    """A task's function reference, payload and code blob, its inputs' code named by digest.

    Inputs that name nothing of the user's are the C pickler's bytes and ``ref``/``blob`` come
    back unchanged (the fast path). Otherwise functions and classes of the user's inside them
    become code blobs, carried with the task's function as one bundle blob, so a connection
    carries each once (see :mod:`taskcs.runtime.coderef`). ``by_value``: the caller already
    knows the inputs name the user's objects (skips the C pickler).
    """
    value = (args, kwargs) if kwargs else args
    try:
        if not by_value:
            try:
                data = _c_dumps(value, PICKLE_PROTOCOL)
            except Exception:
                data = None
            if data is not None and not (0x93 in data and needs_by_value(data, value)):
                return ref, data, blob
        payload, code = coderef.dumps_with_code_refs(value)
    except Exception as exc:
        raise SubmissionError(f"task {label}: its inputs cannot be serialized: {exc}") from exc
    if code:
        ref, blob = coderef.bundle(ref, blob, code)
    return ref, payload, blob


def decode_inputs(payload: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inverse of :func:`encode_inputs`."""
    value = loads(payload)
    if type(value) is tuple and len(value) == 2 and type(value[1]) is dict and type(value[0]) is tuple:
        return value[0], value[1]
    return value, {}


def encode_error(exc: BaseException, tb: str | None = None) -> bytes:
    """Payload of a failure: type, message, traceback text and the exception if it pickles."""
    if tb is None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        exc_bytes: bytes | None = dumps_outcome(exc)
        loads(exc_bytes or b"")  # some exceptions pickle but cannot be rebuilt (bad __reduce__)
    except Exception:
        exc_bytes = None
    return pickle.dumps((type(exc).__qualname__, str(exc), tb, exc_bytes), protocol=PICKLE_PROTOCOL)


def decode_error(payload: bytes) -> ErrorInfo:
    """Inverse of :func:`encode_error`; never raises on a well-formed payload."""
    type_name, message, tb, exc_bytes = pickle.loads(payload)
    exc: BaseException | None = None
    if exc_bytes is not None:
        try:
            exc = loads(exc_bytes)
        except Exception as err:  # the exception's class may not exist here
            log.debug("cannot rebuild remote %s: %s", type_name, err)
    return ErrorInfo(type_name, message, tb, exc)


def error_to_exception(info: ErrorInfo) -> BaseException:
    """The exception to raise locally, with the remote traceback as its ``__cause__``."""
    exc = info.exception
    if exc is None:
        exc = TaskError(f"{info.type_name}: {info.message}")
    exc.__cause__ = RemoteTraceback(info.traceback)
    return exc


def encode_result(value: Any) -> bytes:
    """Payload of a successful result."""
    return dumps_outcome(value)


def blob_digest(blob: bytes) -> str:
    """Name of a content-addressed blob."""
    import hashlib  # lazy: only code sent by value and client paths need digests

    return hashlib.sha1(blob).hexdigest()
