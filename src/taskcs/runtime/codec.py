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
nothing alive: weak references, bounded.

cloudpickle and dill are imported lazily: a run that never meets the user's objects never pays.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import pickle
import re
import struct
import sys
import traceback
import types
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import RemoteTraceback, SubmissionError, TaskError
from .task import ErrorInfo

log = logging.getLogger(__name__)

PICKLE_PROTOCOL = 5
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

#: Modules whose objects always go by value: the running script, under either of its names.
_MAIN_NAMES = ("__main__", "__mp_main__")
#: Top-level packages every receiving side has: it runs taskcs.
_ALWAYS_IMPORTABLE = frozenset({"taskcs"})


def _dill() -> Any:
    import dill  # lazy: ~40 ms of import that most runs never need

    return dill


_pickler_class: Any = None


def _by_value_pickler() -> Any:
    """cloudpickle's Pickler, keeping each code object's file name (cloudpickle blanks it to
    "<dynamic-code>", and a remote traceback would lose its file and source lines)."""
    global _pickler_class
    if _pickler_class is None:
        import collections
        import types

        import cloudpickle  # lazy, as dill

        def reduce_code(co: types.CodeType) -> tuple[Any, tuple[Any, ...]]:
            return types.CodeType, (
                co.co_argcount, co.co_posonlyargcount, co.co_kwonlyargcount, co.co_nlocals, co.co_stacksize,
                co.co_flags, co.co_code, co.co_consts, co.co_names, co.co_varnames, co.co_filename, co.co_name,
                co.co_qualname, co.co_firstlineno, co.co_linetable, co.co_exceptiontable, co.co_freevars,
                co.co_cellvars,
            )

        class ByValuePickler(cloudpickle.Pickler):
            dispatch_table = collections.ChainMap({types.CodeType: reduce_code}, cloudpickle.Pickler.dispatch_table)

        _pickler_class = ByValuePickler
    return _pickler_class


# ------------------------------------------------------------------ which modules are the user's
def _modules_signature() -> tuple[int, str | None]:
    """Changes whenever a module is imported: sys.modules's size and its newest key (a dict
    keeps insertion order), so an import right after a removal is noticed too. O(1)."""
    modules = sys.modules
    return len(modules), next(reversed(modules), None)


class _ModuleScan:
    """What of ``sys.modules`` is the user's, rescanned only when ``sys.modules`` changes."""

    def __init__(self) -> None:
        self.seen: tuple[int, str | None] = (-1, None)
        self.kinds: dict[str, bool] = {}  # module name -> is it a user module
        self.user: tuple[str, ...] = ()
        self.all_markers = self.main_markers = _markers(_MAIN_NAMES)
        self.registered: set[str] = set()
        self._install_dirs: tuple[str, ...] | None = None
        self._dists: frozenset[str] | None = None

    def refresh(self) -> None:
        modules = sys.modules
        self.seen = _modules_signature()
        kinds = self.kinds
        for name, module in list(modules.items()):
            if name not in kinds:
                kinds[name] = self._classify(name, module)
        user = tuple(sorted(name for name, mine in kinds.items() if mine and name in modules))
        if user != self.user:
            self.user = user
            self.all_markers = _markers((*_MAIN_NAMES, *user))

    def _classify(self, name: str, module: Any) -> bool:
        if name in _MAIN_NAMES:
            return True
        top = name.partition(".")[0]
        if top in _ALWAYS_IMPORTABLE or top in sys.stdlib_module_names or top in sys.builtin_module_names:
            return False
        path = getattr(module, "__file__", None)
        if not isinstance(path, str):
            return False  # built in, frozen, a namespace package or synthetic: nothing to ship
        if os.path.realpath(path).startswith(self.install_dirs()):
            return False
        return top not in self.distributions()  # an editable install lives outside site-packages

    def install_dirs(self) -> tuple[str, ...]:
        if self._install_dirs is None:
            import site
            import sysconfig

            dirs = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
            dirs.update(site.getsitepackages())
            dirs.add(site.getusersitepackages())
            self._install_dirs = tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)
        return self._install_dirs

    def distributions(self) -> frozenset[str]:
        if self._dists is None:
            import importlib.metadata

            self._dists = frozenset(importlib.metadata.packages_distributions())
        return self._dists


def _markers(names: tuple[str, ...]) -> re.Pattern[bytes]:
    """A pattern finding any of ``names`` as the module string of a pickled global.

    Protocol 4+ writes a global as its module name (SHORT_BINUNICODE, or BINUNICODE past 255
    bytes), its qualified name, then STACK_GLOBAL; matching the opcode and length with the
    name means a user module called ``utils`` is not matched by the data string "utilsx".
    """
    forms = []
    for name in names:
        raw = name.encode()
        head = b"\x8c" + bytes([len(raw)]) if len(raw) < 256 else b"X" + struct.pack("<I", len(raw))
        forms.append(re.escape(head + raw))
    return re.compile(b"|".join(forms))


_scan = _ModuleScan()


def is_user_module(name: str) -> bool:
    """True if objects of module ``name`` go by value: ``__main__``, or a module of the user's
    own (its file is not under the standard library or site-packages, nor an installed
    distribution's), which a receiving side may not be able to import."""
    if _modules_signature() != _scan.seen:
        _scan.refresh()
    kind = _scan.kinds.get(name)
    if kind is None:
        module = sys.modules.get(name)
        return module is not None and _scan._classify(name, module)
    return kind


def _names_user_objects(data: bytes, user_modules: bool) -> bool:
    """Does pickled ``data`` name a global of ``__main__`` (or of a user module)?"""
    if 0x93 not in data:  # no STACK_GLOBAL opcode: it names no global at all
        return False
    if not user_modules:
        return _scan.main_markers.search(data) is not None
    if _modules_signature() != _scan.seen:
        _scan.refresh()
    return _scan.all_markers.search(data) is not None


def names_user_objects(data: bytes) -> bool:
    """Does pickled ``data`` name ``__main__`` or a user module? (Then it must go by value.)"""
    return _names_user_objects(data, True)


def _by_value(obj: Any, register: bool = True) -> bytes:
    """Pickle ``obj`` with the user's modules by value: cloudpickle, else dill."""
    pickler = _by_value_pickler()
    if register:
        if _modules_signature() != _scan.seen:
            _scan.refresh()
        for name in _scan.user:
            module = sys.modules.get(name)
            if name not in _scan.registered and name not in _MAIN_NAMES and module is not None:
                import cloudpickle

                cloudpickle.register_pickle_by_value(module)
                _scan.registered.add(name)
    try:
        buffer = io.BytesIO()
        pickler(buffer, protocol=PICKLE_PROTOCOL).dump(obj)
        return buffer.getvalue()
    except Exception as exc:
        try:
            return _dill().dumps(obj, protocol=PICKLE_PROTOCOL, recurse=True)
        except Exception:
            raise exc from None


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
    if 0x93 in data and _names_user_objects(data, True):
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
    if 0x93 in data and _names_user_objects(data, False):
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
