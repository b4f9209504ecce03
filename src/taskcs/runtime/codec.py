"""Payloads: task inputs, results, errors and function references.

Inputs and results are pickled by reference where the standard pickler can (fast, C), and
by value with dill where it cannot (lambdas, closures, ``__main__`` objects). A callable is
turned into a *function reference* once (see :mod:`taskcs.runtime.task`); code sent by value is
a blob named by its SHA-1 digest, so a connection carries it once, not once per task.

dill is imported lazily: a client that only runs standard or importable tasks never pays for it.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import sys
import traceback
from collections.abc import Callable
from typing import Any

from ..errors import RemoteTraceback, SubmissionError, TaskError
from .task import ErrorInfo

log = logging.getLogger(__name__)

PICKLE_PROTOCOL = 5

#: How many distinct callables keep their reference cached. A program that makes a new
#: lambda per task would otherwise grow the cache without end; 4096 keeps every realistic
#: working set while bounding memory.
_REF_CACHE_LIMIT = 4096
_ref_cache: dict[int, tuple[Any, str, bytes | None]] = {}


def _dill() -> Any:
    import dill  # lazy: ~40 ms of import that most runs never need

    return dill


def function_ref(fn: Any) -> tuple[str, bytes | None]:
    """The wire reference of ``fn`` and, when it goes by value, its code blob.

    ``fn`` may be a standard task name, a ``"module:function"`` string or a callable.
    Raises :class:`SubmissionError` for unknown names and unserializable callables.
    """
    if isinstance(fn, str):
        return _string_ref(fn), None
    cached = _ref_cache.get(id(fn))
    if cached is not None and cached[0] is fn:
        return cached[1], cached[2]
    if not callable(fn):
        raise SubmissionError(f"task code must be callable or a task name, not {type(fn).__name__}")
    ref, blob = _callable_ref(fn)
    if len(_ref_cache) >= _REF_CACHE_LIMIT:
        _ref_cache.clear()
    _ref_cache[id(fn)] = (fn, ref, blob)
    return ref, blob


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
    if module and qualname and module != "__main__" and "<" not in qualname:
        try:
            if _lookup(sys.modules.get(module) or importlib.import_module(module), qualname) is fn:
                return f"ref:{module}:{qualname}", None
        except (ImportError, AttributeError):
            pass  # not importable by name: send it by value below
    try:
        blob = _dill().dumps(fn, protocol=PICKLE_PROTOCOL, recurse=True)
    except Exception as exc:
        raise SubmissionError(f"task {qualname or fn!r}: its code cannot be serialized: {exc}") from exc
    return "dill:" + blob_digest(blob), blob


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
    """Pickle ``obj``: by reference with the C pickler, falling back to dill by value."""
    try:
        return pickle.dumps(obj, protocol=PICKLE_PROTOCOL)
    except Exception:
        return _dill().dumps(obj, protocol=PICKLE_PROTOCOL, recurse=True)


def loads(data: bytes) -> Any:
    """Inverse of :func:`dumps`; dill streams load with plain pickle once dill is importable."""
    try:
        return pickle.loads(data)
    except (ModuleNotFoundError, AttributeError) as exc:
        if "dill" in str(exc):
            _dill()
            return pickle.loads(data)
        raise


def encode_inputs(label: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Payload of a task's inputs; SubmissionError naming the task if they don't serialize."""
    try:
        return dumps((args, kwargs) if kwargs else args)
    except Exception as exc:
        raise SubmissionError(f"task {label}: its inputs cannot be serialized: {exc}") from exc


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
        exc_bytes: bytes | None = dumps(exc)
        loads(dumps(exc))  # some exceptions pickle but cannot be rebuilt (bad __reduce__)
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
    return dumps(value)


def blob_digest(blob: bytes) -> str:
    """Name of a content-addressed blob."""
    import hashlib  # lazy: only code sent by value and client paths need digests

    return hashlib.sha1(blob).hexdigest()
