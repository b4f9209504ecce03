"""A client holds no reference to a callable, its arguments or its result once the future is
done and the caller dropped it (issue #9, item 1). Checked with weak references, not RSS."""

from __future__ import annotations

import functools
import gc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import taskcs
from taskcs.client.callcache import CallableCache
from taskcs.runtime import codec

MB = 1 << 20


class Holder:
    """A user object of 1 MB whose bound method is the task (a new callable at every access)."""

    def __init__(self, size: int) -> None:
        self.data = b"x" * size

    def method(self, arg: Arg) -> Answer:
        return Answer(arg.value * 2, len(self.data))


class Arg:
    def __init__(self, value: int) -> None:
        self.value = value


class Answer:
    def __init__(self, value: int, size: int) -> None:
        self.value = value
        self.size = size


def _bound(obj: Holder) -> Callable[..., Any]:
    return obj.method  # a new callable at every access, holding obj


def _partial(obj: Holder) -> Callable[..., Any]:
    return functools.partial(Holder.method, obj)  # likewise


def _run_and_drop(client: taskcs.Client, count: int, size: int,
                  task: Callable[[Holder], Callable[..., Any]] = _bound) -> tuple[list[Any], list[Any], list[Any]]:
    """Submit ``count`` x ``task(Holder(size))(Arg(i))``, check the results, drop everything;
    return weak references to every holder, argument and result."""
    holders, args, answers, futures = [], [], [], []
    for i in range(count):
        obj, arg = Holder(size), Arg(i)
        holders.append(weakref.ref(obj))
        args.append(weakref.ref(arg))
        futures.append(client.submit(task(obj), arg))
        del obj, arg
    for i, fut in enumerate(futures):
        answer = fut.result(timeout=60)
        assert (answer.value, answer.size) == (2 * i, size)
        answers.append(weakref.ref(answer))
        del answer
    del futures, fut
    gc.collect()
    return holders, args, answers


def _alive(refs: list[Any]) -> int:
    return sum(ref() is not None for ref in refs)


@pytest.mark.parametrize("task", [_bound, _partial])
def test_in_process_client_keeps_no_callable_argument_or_result(task: Callable[[Holder], Any]) -> None:
    # codec's module-level reference cache is not the client's: emptied here, so this test
    # sees exactly what the client itself keeps.
    with taskcs.Client.in_process(executors=1, foreground=None) as client:
        getattr(codec, "_ref_cache", {}).clear()
        holders, args, answers = _run_and_drop(client, 300, 64 * 1024, task)
        getattr(codec, "_ref_cache", {}).clear()
        gc.collect()
        assert (_alive(holders), _alive(args), _alive(answers)) == (0, 0, 0)
        assert len(client._fast) == 0 and len(client._futures) == 0
        assert client.submit(pow, 2, 10).result(10) == 1024  # still serving, fast path and all


@pytest.mark.multiprocess
def test_300_bound_methods_of_1mb_objects_are_freed(runtime_dir: Path, start_server: Any) -> None:
    """The issue's case, end to end through a real server: 300 x submit(obj.method, i)."""
    start_server(1)
    with taskcs.Client(foreground=None) as client:
        holders, args, answers = _run_and_drop(client, 300, MB)
        assert _alive(holders) == 0, "the client keeps the callables' objects alive"
        assert _alive(args) == 0 and _alive(answers) == 0


def test_callable_cache_holds_nothing_alive_and_is_bounded() -> None:
    cache: CallableCache[int] = CallableCache(limit=8)

    def make() -> Any:
        return lambda: None

    fn = make()
    assert cache.put(fn, 1) and cache.get(fn) == 1
    ref = weakref.ref(fn)
    del fn
    gc.collect()
    assert ref() is None and len(cache) == 0  # its death removed its entry
    keep = [make() for _ in range(20)]
    for i, f in enumerate(keep):
        cache.put(f, i)
    assert len(cache) <= 8
    assert cache.put("add", 5) and cache.get("add") == 5  # names are held: they own nothing

    class Slotted:
        __slots__ = ()

        def __call__(self) -> None: ...

    assert not cache.put(Slotted(), 1)  # no weak reference: not cached at all
