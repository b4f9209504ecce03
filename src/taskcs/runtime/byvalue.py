"""What travels by value, and how: the user's modules, and the by-value pickler.

A *user module* is ``__main__`` or a module of the user's own files: not in the standard
library, not under site-packages, not an installed distribution (an editable install counts
as installed), not compiled. A receiving side (an executor whose ``__main__`` is the server's,
a peer on another machine) may not be able to import it, so its objects go by value.

Which modules are the user's is worked out once per module and kept; ``sys.modules`` is
rescanned only when it changes (:func:`_modules_signature`, O(1)). The check of a pickled
payload is a regex over the module strings of its globals, run only if the payload has a
STACK_GLOBAL opcode at all (see :mod:`taskcs.runtime.codec` for the data flow).

By value means cloudpickle with every user module registered by value; dill is the last
resort for what cloudpickle refuses.
"""

from __future__ import annotations

import contextlib
import copyreg
import io
import os
import pickle
import re
import struct
import sys
from typing import Any

PICKLE_PROTOCOL = 5

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
            # A plain dict, not cloudpickle's ChainMap: the C pickler looks the table up once
            # per object, and a ChainMap lookup is a Python call (half the time of a big
            # payload in profiles). Rebuilt when copyreg gains reducers (see _by_value).
            dispatch_table: dict[Any, Any] = {}

        _pickler_class = ByValuePickler
        _pickler_class.extra = {types.CodeType: reduce_code}
        _pickler_class.cloudpickle_table = cloudpickle.Pickler._dispatch_table
        _pickler_class.copyreg_size = -1
    if _pickler_class.copyreg_size != len(copyreg.dispatch_table):
        _pickler_class.copyreg_size = len(copyreg.dispatch_table)
        _pickler_class.dispatch_table = {**copyreg.dispatch_table, **_pickler_class.cloudpickle_table,
                                         **_pickler_class.extra}
    return _pickler_class


class _Found(Exception):
    """Raised by the detector at the first object of the user's."""


class _Discard:
    """A file that keeps nothing: the detector's output is never used."""

    def write(self, data: bytes) -> int:
        return len(data)


_detector_classes: dict[bool, Any] = {}


def _detector(user_modules: bool) -> Any:
    """A C pickler that raises :class:`_Found` at the first class, function or instance of
    ``__main__`` (and, if ``user_modules``, of a user module): the exact answer, for payloads
    whose bytes merely *look* as if they named one (a "__main__" string in warnings.filters,
    which scikit-learn ships in every task, for instance)."""
    cls = _detector_classes.get(user_modules)
    if cls is None:
        function_type = type(_detector)

        def reducer_override(self: Any, obj: Any) -> Any:
            kind = type(obj)
            of = obj if kind is type or kind is function_type or isinstance(obj, type) else kind
            module = getattr(of, "__module__", None)
            if isinstance(module, str) and (module in _MAIN_NAMES or (user_modules and is_user_module(module))):
                raise _Found
            return NotImplemented

        cls = _detector_classes[user_modules] = type("Detector", (pickle.Pickler,), {
            "reducer_override": reducer_override})
    return cls


def _confirm(obj: Any, user_modules: bool) -> bool:
    """Does ``obj`` really hold an object of the user's? (One more C-pickler pass.)"""
    try:
        _detector(user_modules)(_Discard(), protocol=PICKLE_PROTOCOL).dump(obj)
    except _Found:
        return True
    except Exception:
        return True  # let the by-value pickler have its say (and raise if it must)
    return False


# ------------------------------------------------------------------ which modules are the user's
def _modules_signature() -> tuple[int, str | None]:
    """Changes whenever a module is imported: sys.modules's size and its newest key (a dict
    keeps insertion order), so an import right after a removal is noticed too. O(1)."""
    modules = sys.modules
    try:
        newest = next(reversed(modules), None)
    except RuntimeError:  # another thread imported between reversed() and next(): it changed
        newest = None  # a signature no scan recorded: the caller rescans (seen once in 3M calls)
    return len(modules), newest


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
        # A copy: another thread submitting may be in refresh() too, adding to kinds
        user = tuple(sorted(name for name, mine in list(kinds.items()) if mine and name in modules))
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
        if not isinstance(path, str) or not path.endswith((".py", ".pyc")):
            return False  # built in, frozen, a namespace package, synthetic, or compiled: nothing to ship
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
        """Top-level names of editable installs: the only installed code outside install_dirs.

        Not importlib.metadata.packages_distributions(): it reads every distribution's file
        list (150 ms with 29 installed, measured), paid by the first task of a script that
        names its own code. Not importlib.metadata at all: importing it costs 18 ms of a
        25 ms first task (measured, warm). Here each ``*.dist-info`` directory on sys.path
        is listed as importlib.metadata would find it, and only its direct_url.json read; names
        only for editable ones. A name missed here means that code goes by value: still
        correct, only slower.
        """
        if self._dists is None:
            import json

            names: set[str] = set()
            for entry in dict.fromkeys(sys.path):
                try:
                    infos = [d for d in os.scandir(entry or ".") if d.name.endswith(".dist-info")]
                except OSError:
                    continue  # not a directory (a zip, say): no editable install there
                for info in infos:
                    try:
                        with open(os.path.join(info.path, "direct_url.json"), "rb") as f:
                            url = json.loads(f.read() or b"{}")
                        if not url.get("dir_info", {}).get("editable"):
                            continue
                        top_level = os.path.join(info.path, "top_level.txt")
                        with contextlib.suppress(FileNotFoundError), open(top_level) as f:
                            names.update(f.read().split())
                        names.add(info.name.partition("-")[0].lower().replace("-", "_").replace(".", "_"))
                    except (ValueError, AttributeError, OSError):
                        continue  # no record, or a broken one: treat its code as the user's (by value)
            self._dists = frozenset(names)
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
        return _search_frames(_scan.main_markers, data)
    if _modules_signature() != _scan.seen:
        _scan.refresh()
    return _search_frames(_scan.all_markers, data)


#: Below this size a payload is searched whole; above it, frame by frame (see _search_frames).
_SEARCH_WHOLE_BELOW = 1 << 16
# Protocol 5 opcodes by the size of their argument, to step over what lies between frames.
_NO_ARG = frozenset(b"(.012NRabdelostu}])\x81\x85\x86\x87\x88\x89\x8f\x90\x91\x92\x93\x94\x97\x98")
_FIXED_ARG = {ord("K"): 1, ord("h"): 1, ord("q"): 1, ord("M"): 2, ord("J"): 4, ord("j"): 4, ord("r"): 4,
              ord("G"): 8, 0x82: 1, 0x83: 2, 0x84: 4}
_LENGTH_PREFIX = {ord("C"): 1, 0x8C: 1, ord("U"): 1, 0x8A: 1, ord("B"): 4, ord("X"): 4, ord("T"): 4, 0x8B: 4,
                  0x8D: 8, 0x8E: 8, 0x96: 8}
_FRAME = 0x95


def _search_frames(pattern: re.Pattern[bytes], data: bytes) -> bool:
    """``pattern.search(data)``, minus the large binary objects a C pickler writes *between*
    frames (bytes, bytearrays, numpy buffers of 64 KiB or more): the module string of a global
    is always inside a frame, and scanning 10 MB of random bytes cost 5x the pickling itself.

    Steps from frame to frame by opcode sizes; an opcode it does not know makes it search the
    rest whole, so it can only ever search more than it must, never less.
    """
    size = len(data)
    if size < _SEARCH_WHOLE_BELOW:
        return pattern.search(data) is not None
    pos = 2 if data[0] == 0x80 else 0  # PROTO n
    while pos < size:
        op = data[pos]
        if op == _FRAME:
            start = pos + 9
            end = start + int.from_bytes(data[pos + 1:start], "little")
            if pattern.search(data, start, end) is not None:
                return True
            pos = end
        elif op in _NO_ARG:
            pos += 1
        elif op in _FIXED_ARG:
            pos += 1 + _FIXED_ARG[op]
        elif op in _LENGTH_PREFIX:
            start = pos + 1 + _LENGTH_PREFIX[op]
            end = start + int.from_bytes(data[pos + 1:start], "little")
            if end - pos < 512 and pattern.search(data, pos, end) is not None:
                return True  # a short string left out of a frame: cheap to look at, so look
            pos = end
        else:
            return pattern.search(data, pos) is not None
    return False


def needs_by_value(data: bytes, obj: Any, user_modules: bool = True) -> bool:
    """Must ``obj``, which the C pickler pickled as ``data``, go by value?

    A scan of the bytes first (nearly free); only if it matches, the exact check.
    """
    return _names_user_objects(data, user_modules) and _confirm(obj, user_modules)


def names_user_objects(data: bytes, obj: Any) -> bool:
    """Does ``obj`` (pickled as ``data``) hold objects of ``__main__`` or a user module?"""
    return needs_by_value(data, obj)


def dumps_by_value(obj: Any) -> bytes:
    """Pickle ``obj`` with ``__main__`` and the user's modules by value (for a caller that
    knows it names them; :func:`dumps` finds out by itself)."""
    return _by_value(obj)


def register_user_modules() -> None:
    """Have cloudpickle pickle every user module's objects by value (``__main__`` it does anyway)."""
    if _modules_signature() != _scan.seen:
        _scan.refresh()
    for name in _scan.user:
        module = sys.modules.get(name)
        if name not in _scan.registered and name not in _MAIN_NAMES and module is not None:
            import cloudpickle

            cloudpickle.register_pickle_by_value(module)
            _scan.registered.add(name)


def _by_value(obj: Any, register: bool = True) -> bytes:
    """Pickle ``obj`` with the user's modules by value: cloudpickle, else dill."""
    pickler = _by_value_pickler()
    if register:
        register_user_modules()
    try:
        buffer = io.BytesIO()
        pickler(buffer, protocol=PICKLE_PROTOCOL).dump(obj)
        return buffer.getvalue()
    except Exception as exc:
        try:
            return _dill().dumps(obj, protocol=PICKLE_PROTOCOL, recurse=True)
        except Exception:
            raise exc from None
