"""A cache keyed by a callable's identity that never keeps the callable (or anything) alive.

The client remembers, per function, what it learned on the first submission (its wire
reference, arity, IO flag) so that a stream of calls to one function costs one dict lookup.
Keyed by ``id(fn)`` holding ``fn`` itself, that cache kept every callable it ever saw alive,
with everything the callable references: a bound method is a new object on every attribute
access, so ``submit(obj.method, i)`` pinned every ``obj`` (issue #9: 300 objects of 1 MB took
a client from 19 MB to 598 MB). Here an entry holds only a weak reference, and the callable's
death removes its entry at once, so neither the callable nor the value outlives it.

Task names (``submit("add", 1, 2)``) are strings, which take no weak reference but own
nothing either: they are held strongly. Other callables that take no weak reference
(instances of classes with ``__slots__`` and no ``__weakref__``) are not cached: they take the
slow path on every call.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

V = TypeVar("V")

#: Most entries kept: a program that makes a new long-lived callable per task still has a
#: bounded cache (entries of dead callables leave at once; this bounds the living ones).
LIMIT = 4096


class CallableCache(Generic[V]):
    """``fn -> value`` by identity, holding ``fn`` weakly; bounded to :data:`LIMIT` entries."""

    __slots__ = ("_entries", "_limit")

    def __init__(self, limit: int = LIMIT) -> None:
        self._entries: dict[int, tuple[Callable[[], Any], V]] = {}
        self._limit = limit

    def get(self, fn: Any) -> V | None:
        """The value stored for ``fn`` (this very object), or None."""
        entry = self._entries.get(id(fn))
        if entry is not None and entry[0]() is fn:
            return entry[1]
        return None

    def put(self, fn: Any, value: V) -> bool:
        """Store ``value`` for ``fn``; False (nothing stored) if ``fn`` takes no weak reference."""
        entries = self._entries
        key = id(fn)
        ref: Callable[[], Any]
        try:
            ref = weakref.ref(fn, _evictor(entries, key))
        except TypeError:
            if type(fn) is not str:
                return False
            ref = _strong(fn)
        if len(entries) >= self._limit:
            entries.clear()
        entries[key] = (ref, value)
        return True

    def __len__(self) -> int:
        return len(self._entries)

    def raw(self) -> dict[int, tuple[Callable[[], Any], V]]:
        """The entries themselves, for a hot path that inlines :meth:`get` (read only)."""
        return self._entries


def _strong(obj: str) -> Callable[[], str]:
    # Answers like a live weak reference, for strings: they own no other object.
    return lambda: obj


def _evictor(entries: dict[int, tuple[Callable[[], Any], Any]], key: int) -> Callable[[weakref.ref[Any]], None]:
    # The callback closes over the dict, not the cache or the client: nothing of the user's
    # is reachable from it. It runs while the callable is being freed, before its id can be
    # reused, and removes the entry only if it is still this callable's.
    def evict(ref: weakref.ref[Any]) -> None:
        entry = entries.get(key)
        if entry is not None and entry[0] is ref:
            del entries[key]

    return evict
