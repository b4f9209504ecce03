"""The user's objects anywhere in a task (issue #13, part 1).

The end-to-end property runs from ``tests/scripts/objects_anywhere.py`` as a real ``__main__``
(pytest's own ``__main__`` is pytest), against a phase-3 server in a private runtime dir. The
unit tests here pin the codec's rules: what goes by value, that the fast path's bytes are
exactly the C pickler's, and that the reference cache holds nothing alive.
"""

from __future__ import annotations

import gc
import importlib
import os
import pickle
import subprocess
import sys
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskcs.runtime import byvalue, codec

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture
def vanishing_module(tmp_path: Path) -> Iterator[ModuleType]:
    """A user module imported from a file that is then deleted: only by value can carry it."""
    name = f"taskcs_user_{uuid.uuid4().hex[:12]}"
    path = tmp_path / f"{name}.py"
    path.write_text(
        "import functools\n"
        "class Pair:\n"
        "    def __init__(self, a, b):\n"
        "        self.a, self.b = a, b\n"
        "    def total(self):\n"
        "        return self.a + self.b\n"
        "class Failed(Exception):\n"
        "    pass\n"
        "def scale(x, by):\n"
        "    return x * by\n"
        "def helper_calls_scale(x):\n"
        "    return scale(x, 3)\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
    path.unlink()
    try:
        yield module
    finally:
        sys.modules.pop(name, None)


def _forget(module: ModuleType) -> None:
    """Make ``module`` unimportable here, as on a peer that never had the file."""
    sys.modules.pop(module.__name__, None)
    importlib.invalidate_caches()


# ------------------------------------------------------------------------ which modules
@pytest.mark.parametrize("name", ["json", "os.path", "collections", "taskcs.runtime.codec", "zmq", "pytest"])
def test_stdlib_installed_and_taskcs_modules_are_not_the_users(name: str) -> None:
    importlib.import_module(name)
    assert not codec.is_user_module(name)


def test_main_and_files_of_ones_own_are_user_modules(vanishing_module: ModuleType) -> None:
    assert codec.is_user_module("__main__")
    assert codec.is_user_module(vanishing_module.__name__)
    assert codec.is_user_module(__name__)  # this test file: not installed


def test_a_compiled_extension_of_ones_own_is_not_shipped(tmp_path: Path) -> None:
    """Compiled code cannot travel by value: its objects stay by reference."""
    fake = ModuleType("taskcs_fake_ext")
    fake.__file__ = str(tmp_path / "taskcs_fake_ext.cpython-311-x86_64-linux-gnu.so")
    assert not byvalue._scan._classify(fake.__name__, fake)
    source = ModuleType("taskcs_fake_src")
    source.__file__ = str(tmp_path / "taskcs_fake_src.py")
    assert byvalue._scan._classify(source.__name__, source)


# ------------------------------------------------------------------------------ fast path
@pytest.mark.parametrize("value", [(1, 2), ("text", b"x" * 100, [1.5, None]), {"k": (1, {2, 3})},
                                   (pickle.dumps, os.path.join), (Path("/tmp"), ValueError("x"))])
def test_payload_naming_nothing_of_the_user_is_exactly_the_c_picklers(value: Any) -> None:
    assert codec.dumps(value) == pickle.dumps(value, protocol=codec.PICKLE_PROTOCOL)


def test_a_data_string_that_looks_like_a_module_name_still_round_trips() -> None:
    value = ["__main__", "taskcs_user_x", {"__main__": "__main__"}]
    assert codec.loads(codec.dumps(value)) == value


# ------------------------------------------------------------------------------ by value
def test_user_module_objects_at_any_depth_go_by_value(vanishing_module: ModuleType) -> None:
    m = vanishing_module
    import functools

    payload = codec.encode_inputs("t", ([m.Pair(1, [m.Pair(2, 3)])], {"f": functools.partial(m.scale, by=2)}), {})
    _forget(m)
    (pairs, kw), _ = codec.decode_inputs(payload)
    assert pairs[0].a == 1 and pairs[0].b[0].total() == 5
    assert kw["f"](21) == 42
    assert m.__name__ not in sys.modules  # unpickled without importing it


def test_user_module_function_is_a_code_blob_carrying_its_helpers(vanishing_module: ModuleType) -> None:
    ref, blob = codec.function_ref(vanishing_module.helper_calls_scale)
    assert ref == "dill:" + codec.blob_digest(blob or b"")
    _forget(vanishing_module)
    assert codec.loads(blob or b"")(5) == 15


def test_exception_of_a_user_module_comes_back_as_its_class(vanishing_module: ModuleType) -> None:
    # what the executor got by value (a rebuilt class) goes back by value, and the class
    # tracker gives the client its own class again
    rebuilt = codec.loads(codec.dumps(vanishing_module.Failed))
    assert rebuilt is vanishing_module.Failed  # same process: the tracker resolves it
    info = codec.decode_error(codec.encode_error(vanishing_module.Failed("no")))
    assert type(info.exception) is vanishing_module.Failed and str(info.exception) == "no"


def test_results_of_modules_the_executor_imported_by_name_go_by_reference(vanishing_module: ModuleType) -> None:
    """An executor returns objects of modules it imported itself by reference: a client that
    has the module gets its own class back, not a copy."""
    pair = vanishing_module.Pair(1, 2)
    assert codec.encode_result(pair) == pickle.dumps(pair, protocol=codec.PICKLE_PROTOCOL)


def test_remote_traceback_keeps_the_file_name_of_code_sent_by_value() -> None:
    def fails() -> None:
        raise KeyError("gone")

    _, blob = codec.function_ref(fails)
    fn = codec.loads(blob or b"")
    assert fn.__code__.co_filename == __file__


# ------------------------------------------------------------------------------ the cache
def test_an_import_in_another_thread_mid_check_does_not_fail_a_submit(monkeypatch: pytest.MonkeyPatch) -> None:
    """sys.modules changing between reversed() and next() (another thread's import; seen once in
    3M by-value pickles under a thread importing modules) must not fail the pickling."""

    class Importing(dict):  # type: ignore[type-arg]
        def __reversed__(self) -> Iterator[str]:
            raise RuntimeError("dictionary changed size during iteration")
            yield ""  # a generator: the error comes from next(), as from a dict's iterator

    fake = type(sys)("sys_with_an_import_under_way")
    fake.modules = Importing(sys.modules)  # type: ignore[attr-defined]
    monkeypatch.setattr(byvalue, "sys", fake)
    size, newest = byvalue._modules_signature()
    assert size == len(sys.modules) and newest is None
    monkeypatch.undo()
    ref, blob = codec.function_ref(lambda: 42)  # and the real one still works afterwards
    assert ref.startswith("dill:") and blob


def test_reference_cache_holds_no_callable_alive() -> None:
    def make() -> Any:
        return lambda x: x + 1

    fn = make()
    codec.function_ref(fn)
    assert codec.function_ref(fn) == codec.function_ref(fn)  # cached while alive
    alive = weakref.ref(fn)
    key = id(fn)
    del fn
    gc.collect()
    assert alive() is None
    assert key not in codec._ref_cache or codec._ref_cache[key][0]() is not None


def test_reference_cache_is_bounded() -> None:
    keep = [(lambda i=i: i) for i in range(codec._REF_CACHE_LIMIT + 10)]
    for fn in keep:
        codec.function_ref(fn)
    assert len(codec._ref_cache) <= codec._REF_CACHE_LIMIT


def test_bound_methods_are_not_kept_alive_by_the_cache() -> None:
    class Holder:
        def method(self) -> int:
            return 1

    holder = Holder()
    codec.function_ref(holder.method)
    alive = weakref.ref(holder)
    del holder
    gc.collect()
    assert alive() is None


# ------------------------------------------------------------------------------ end to end
@pytest.mark.multiprocess
def test_user_objects_anywhere_from_a_real_main_script(start_server: Any, tmp_path: Path) -> None:
    """The issue's example and the hypothesis property, from a script that is ``__main__``."""
    start_server(executors=2)
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "objects_anywhere.py")], capture_output=True, text=True,
        timeout=180, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK operator.call(inc, 1) == 2" in proc.stdout
    assert "OK user module without its file" in proc.stdout
    assert "OK property over 60 structures" in proc.stdout


def test_a_main_string_in_data_does_not_send_the_payload_by_value() -> None:
    """warnings.filters holds the string "__main__" (and scikit-learn ships the filters with
    every task): bytes that merely look like a global of __main__ keep the fast path."""
    import warnings

    value = (list(warnings.filters), {"module": "__main__"}, ("__main__", "f"))
    assert codec.dumps(value) == pickle.dumps(value, protocol=codec.PICKLE_PROTOCOL)
    assert codec.encode_result(value) == pickle.dumps(value, protocol=codec.PICKLE_PROTOCOL)


def test_a_user_object_behind_a_main_string_still_goes_by_value(vanishing_module: ModuleType) -> None:
    value = ["__main__", {"pair": vanishing_module.Pair(1, 2)}]
    payload = codec.dumps(value)
    assert payload != pickle.dumps(value, protocol=codec.PICKLE_PROTOCOL)
    _forget(vanishing_module)
    assert codec.loads(payload)[1]["pair"].total() == 3


class _Marker:
    """A class of this (user) module: pickling an instance names this module."""


_MARK = _Marker()


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(st.lists(st.one_of(
    st.integers(), st.binary(max_size=16), st.text(max_size=8), st.just("s" * 70_000),
    st.integers(65_536, 200_000).map(os.urandom), st.integers(65_536, 120_000).map(bytearray),
    st.integers(8_192, 30_000).map(lambda n: __import__("numpy").arange(n, dtype=float)),
    st.just(_MARK), st.just(os.path.join),
), max_size=8))
def test_the_frame_walk_finds_every_user_global_past_large_binaries(items: list[Any]) -> None:
    """Large binaries lie between frames and are skipped; a user global is never missed."""
    data = pickle.dumps(items, protocol=codec.PICKLE_PROTOCOL)
    assert codec.is_user_module(__name__)  # refreshes the markers
    want = any(item is _MARK for item in items)
    assert byvalue._search_frames(byvalue._scan.all_markers, data) is want
