"""Run as a real ``__main__`` (by tests/test_objects_anywhere.py): the user's objects anywhere in
a task, through the phase-3 server named by TASKCS_RUNTIME_DIR.

Checks, printing ``OK <what>`` for each and exiting non-zero on the first failure:

* the issue's example, ``submit(operator.call, inc, 1)`` is 2 (twice: the second takes the
  client's fast path);
* a hypothesis property: random nested structures of ``__main__`` functions, lambdas,
  closures, partials, classes and instances and standard-library objects, as arguments and
  in results, give through the server what calling locally gives;
* a ``__main__`` exception class raised in a task re-raises as that very class;
* functions, classes and instances of a user module whose file no longer exists anywhere
  (so neither the executor nor the client's import path can provide it).
"""

from __future__ import annotations

import datetime
import decimal
import fractions
import functools
import importlib
import operator
import os
import sys
import tempfile
import uuid
import warnings
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning

import taskcs


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


square = lambda x: x * x  # noqa: E731


def make_adder(n: int) -> Any:
    def adder(x: int) -> int:
        return x + n

    return adder


class Point:
    def __init__(self, x: int) -> None:
        self.x = x

    def moved(self) -> Point:
        return Point(self.x + 1)


class Box:
    """An instance whose attribute holds more of the user's objects."""

    def __init__(self, child: Any) -> None:
        self.child = child


class Oops(Exception):
    pass


def pair(left: Any, right: Any) -> tuple[Any, Any]:
    return left, right


def transform(value: Any) -> Any:
    """Walks a structure: calls what is callable, rebuilds instances, returns user objects too."""
    if isinstance(value, type):
        return (value.__name__, value)
    if isinstance(value, Point):
        return value.moved()
    if isinstance(value, Box):
        return Box(transform(value.child))
    if callable(value):
        return ("called", value(2), value)
    if isinstance(value, list):
        return [transform(v) for v in value]
    if isinstance(value, tuple):
        return tuple(transform(v) for v in value)
    if isinstance(value, dict):
        return {k: transform(v) for k, v in value.items()}
    return value


def same(a: Any, b: Any) -> bool:
    """Equality that compares functions by behaviour and instances by class and state."""
    if isinstance(a, type) or isinstance(b, type):
        return a is b  # a class sent by value comes back as the very same class
    if isinstance(a, (Point, Box)) or isinstance(b, (Point, Box)):
        return type(a) is type(b) and same(vars(a), vars(b))
    if callable(a) and callable(b):
        return same(a(5), b(5))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


leaves = st.one_of(
    st.integers(-10**6, 10**6),
    st.text(max_size=8),
    st.none(),
    st.sampled_from([inc, square, make_adder(3), make_adder(7), functools.partial(add, 10),
                     Point, Box, Oops, datetime.date(2020, 2, 29), fractions.Fraction(3, 7),
                     decimal.Decimal("1.25"), Counter("abca"), OrderedDict(a=1)]),
    st.builds(Point, st.integers(-100, 100)),
)
structures = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=4), children, max_size=3),
        st.builds(Box, children),
        st.builds(lambda c: functools.partial(pair, c), children),
    ),
    max_leaves=12,
)


def check_property(client: taskcs.Client) -> int:
    count = [0]

    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(structures)
    def remote_equals_local(structure: Any) -> None:
        local = transform(structure)
        remote = client.submit(transform, structure).result(timeout=60)
        assert same(remote, local), (structure, remote, local)
        # the same structure inside the function rather than the arguments
        assert same(client.submit(functools.partial(transform, structure)).result(timeout=60), local)
        count[0] += 1

    remote_equals_local()
    return count[0]


def raise_oops(payload: Any) -> None:
    raise Oops(payload)


def check_exception(client: taskcs.Client) -> None:
    try:
        client.submit(raise_oops, [Point(1)]).result(timeout=60)
    except Oops as exc:
        assert type(exc) is Oops and type(exc.args[0][0]) is Point and exc.args[0][0].x == 1
        assert isinstance(exc.__cause__, taskcs.RemoteTraceback) and "raise_oops" in exc.__cause__.tb
    else:
        raise AssertionError("raise_oops did not raise")


def check_vanished_user_module(client: taskcs.Client) -> None:
    directory = Path(tempfile.mkdtemp(prefix="taskcs-user-"))
    name = f"helpers_{uuid.uuid4().hex[:10]}"
    (directory / f"{name}.py").write_text(
        "class Celsius:\n"
        "    def __init__(self, degrees):\n"
        "        self.degrees = degrees\n"
        "    def __eq__(self, other):\n"
        "        return type(other) is Celsius and other.degrees == self.degrees\n"
        "def warmer(c, by):\n"
        "    return Celsius(c.degrees + by)\n"
    )
    sys.path.insert(0, str(directory))
    module = importlib.import_module(name)
    sys.path.remove(str(directory))
    os.unlink(directory / f"{name}.py")  # nowhere to import it from: only by value can work
    os.rmdir(directory)
    got = client.submit(module.warmer, module.Celsius(20), 5).result(timeout=60)
    assert type(got) is module.Celsius and got == module.Celsius(25), got
    got = client.submit(operator.call, module.warmer, [module.Celsius(1)][0], 2).result(timeout=60)
    assert got == module.Celsius(3)


def main() -> None:
    warnings.simplefilter("ignore", HypothesisWarning)  # reprs of nested partials grow long
    with taskcs.Client() as client:
        assert client.submit(inc, 1).result(timeout=60) == 2
        for _ in range(2):  # the second call takes the client's fast path
            assert client.submit(operator.call, inc, 1).result(timeout=60) == 2
        print("OK operator.call(inc, 1) == 2")
        check_exception(client)
        print("OK __main__ exception class")
        check_vanished_user_module(client)
        print("OK user module without its file")
        print(f"OK property over {check_property(client)} structures")


if __name__ == "__main__":
    main()
