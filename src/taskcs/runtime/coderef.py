"""Code inside a task's inputs: sent once per connection, then named by digest.

A task's own function already travels as a code blob named by digest (``dill:<digest>``), which
every hop (client, server, peer, executor) sends once per connection. A function or class of
the user's inside the *arguments* (``submit(operator.call, inc, 1)``, a ``functools.partial``
of a ``__main__`` function, a list of lambdas, instances of a ``__main__`` class) used to be
pickled by value into every task's payload. Here it becomes a code blob too::

    client:   args --C pickler--> names the user's objects? --no--> payload (as before)
                                          |yes
              _CodeRefPickler: each function/class of a user module --> _code(digest)
              (its blob is codec.function_ref's, cached by identity: pickled once per process)
              task's ref + the payloads's {digest: blob} --> one *bundle* blob, "dill:<digest>"

    executor: Resolver.resolve("dill:<bundle>") --> _load_bundle: each code blob loaded into
              _loaded[digest] (once per process), returns the task's function
              decode_inputs(payload) --> _code(digest) --> _loaded[digest]

The bundle is the task's function reference as far as every hop is concerned, so it travels
with no change to the server, federation or engines: each hop already sends a ``dill:`` blob
once per connection, and resolves a task's function before it decodes its inputs. A bundle is
content-addressed by the task's function and the *set* of code in its inputs, so a stream of
tasks calling ``inc`` through ``operator.call`` carries ``inc``'s code once; a new combination
(another function with the same code inside) is a new bundle and carries its code again.

Results and exceptions coming back are pickled as before (by value when they must be,
see :func:`taskcs.runtime.codec.dumps_outcome`): a client keeps no table of what it received.
"""

from __future__ import annotations

import io
import logging
import pickle
import types
from typing import Any

from .byvalue import PICKLE_PROTOCOL, _by_value_pickler, _dill, is_user_module, register_user_modules

log = logging.getLogger(__name__)

#: Bundles remembered by (task's function ref, code digests): a stream of tasks with the same
#: combination builds its bundle (and hashes its bytes) once. Keys are strings: they keep
#: nothing of the user's alive. Bounded like the reference cache.
_BUNDLE_CACHE_LIMIT = 4096
_bundles: dict[tuple[str, tuple[str, ...]], tuple[str, bytes]] = {}
#: Receiving side: digest -> the function or class its blob holds, loaded once per process so a
#: class keeps one identity for every task that names it. Not bounded, as an executor's
#: resolved functions are not: a task's payload may name any code its bundle ever brought.
_loaded: dict[str, Any] = {}

_pickler_class: Any = None


def _code_ref_pickler() -> Any:
    """The by-value pickler, with the user's functions and classes replaced by digests."""
    global _pickler_class
    base = _by_value_pickler()  # also refreshes its dispatch table when copyreg grows
    if _pickler_class is None:
        function_type = types.FunctionType

        class CodeRefPickler(base):  # type: ignore[misc, valid-type]
            code: dict[str, bytes]

            def reducer_override(self, obj: Any) -> Any:
                kind = type(obj)
                if kind is function_type or isinstance(obj, type):
                    module = getattr(obj, "__module__", None)
                    if isinstance(module, str) and is_user_module(module):
                        digest = _code_digest(obj, self.code)
                        if digest is not None:
                            return _code, (digest,)
                return super().reducer_override(obj)

        _pickler_class = CodeRefPickler
    return _pickler_class


def _code_digest(obj: Any, code: dict[str, bytes]) -> str | None:
    """The digest of ``obj``'s code blob (recorded in ``code``), or None to pickle it inline."""
    from .codec import function_ref  # codec imports this module

    if getattr(obj, "__closure__", None):
        # A closure carries data, not only code, and usually differs per task: as a blob it
        # would be kept by every hop for good (blobs are never pruned), so it stays inline.
        return None
    try:
        ref, blob = function_ref(obj)
    except Exception:
        return None  # cloudpickle (or dill, inline) will say what is wrong with it
    if blob is None or not ref.startswith("dill:"):
        return None
    code[ref[5:]] = blob
    return ref[5:]


def dumps_with_code_refs(value: Any) -> tuple[bytes, dict[str, bytes]]:
    """Pickle ``value`` by value, its user functions and classes as digests of code blobs.

    Returns the payload and ``{digest: blob}`` of the code it names (empty if none). Falls back
    to dill, all inline, for what cloudpickle refuses.
    """
    pickler_class = _code_ref_pickler()
    register_user_modules()
    buffer = io.BytesIO()
    pickler = pickler_class(buffer, protocol=PICKLE_PROTOCOL)
    pickler.code = {}
    try:
        pickler.dump(value)
    except Exception as exc:
        try:
            return _dill().dumps(value, protocol=PICKLE_PROTOCOL, recurse=True), {}
        except Exception:
            raise exc from None
    return buffer.getvalue(), pickler.code


def bundle(ref: str, blob: bytes | None, code: dict[str, bytes]) -> tuple[str, bytes]:
    """The function reference and blob of a task whose inputs name ``code``: the task's own
    function (``ref``, ``blob``) and every code blob, as one content-addressed blob."""
    digests = tuple(sorted(code))
    key = (ref, digests)
    cached = _bundles.get(key)
    if cached is not None:
        return cached
    from .codec import blob_digest

    fn_spec: str | bytes = blob if blob is not None and ref.startswith("dill:") else ref
    data = pickle.dumps(_Bundle(fn_spec, tuple((d, code[d]) for d in digests)), PICKLE_PROTOCOL)
    result = "dill:" + blob_digest(data), data
    if len(_bundles) >= _BUNDLE_CACHE_LIMIT:
        _bundles.clear()
    _bundles[key] = result
    return result


class _Bundle:
    """Pickles as a call of :func:`_load_bundle` (the receiving side never sees this class)."""

    __slots__ = ("code", "fn_spec")

    def __init__(self, fn_spec: str | bytes, code: tuple[tuple[str, bytes], ...]) -> None:
        self.fn_spec = fn_spec
        self.code = code

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _load_bundle, (self.fn_spec, self.code)


def _load_bundle(fn_spec: str | bytes, code: tuple[tuple[str, bytes], ...]) -> Any:
    """Receiving side: load the code blobs a task's inputs name, return the task's function."""
    from .codec import loads, local_twin, resolve_ref

    for digest, blob in code:
        if digest not in _loaded:
            obj = loads(blob)
            # A function this process has itself (an in-process executor) runs with its live
            # module globals, as the task's own function does.
            _loaded[digest] = local_twin(obj)
    if isinstance(fn_spec, bytes):
        return local_twin(loads(fn_spec))
    return resolve_ref(fn_spec)


def _code(digest: str) -> Any:
    """Receiving side: the function or class named ``digest`` in a payload."""
    try:
        return _loaded[digest]
    except KeyError:
        raise LookupError(f"code {digest[:12]} named in a task's inputs was never loaded here: "
                          "it travels with the task's function reference") from None
