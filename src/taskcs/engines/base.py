"""The interface every cluster engine implements, and the checks shared by all of them.

An :class:`Engine` is driven by one thread (the link's engine thread, see
:mod:`taskcs.engines.link`); only the ``done`` callbacks it is given may be called from
other threads (the engine's own).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import TaskcsError
from .runner import BatchOutcome, environment

#: Called once per submitted batch with its key and either its outcome or the exception
#: that ended it (worker lost too often, cancelled, engine gone); from any thread.
DoneCallback = Callable[[str, "BatchOutcome | BaseException"], None]


class EngineError(TaskcsError):
    """An engine cannot be used: bad spec, missing extra, unreachable, wrong versions."""


class EngineRefused(EngineError):
    """The engine answered but must not be used (versions differ): do not retry."""


class EngineLost(EngineError):
    """A batch ended because the engine's scheduler went away (not the task's fault): the
    link treats it as the loss of the whole engine, so the dispatcher requeues its tasks."""


class EngineUnavailable(EngineError):
    """The engine has been unreachable past the server's grace, and nothing else there (no
    executor, no peer server) can run the task, so it fails rather than wait indefinitely."""


class Engine(ABC):
    """A cluster engine that runs batches of taskcs tasks on its workers."""

    #: "dask" or "ray": the link's name among the dispatcher's peers.
    kind: str = "engine"
    #: Where it is, for messages ("tcp://10.0.0.5:8786", "local").
    address: str = ""

    @abstractmethod
    def check_installed(self) -> None:
        """Import the engine's client library; raise EngineError naming the extra if missing.

        Constructors only look the library up (importing Ray takes seconds, and a server
        builds its engine before it accepts connections); this really imports it.
        """

    @abstractmethod
    def connect(self, timeout: float) -> None:
        """Connect (or start an owned cluster); raise EngineError if it cannot."""

    @abstractmethod
    def environments(self) -> dict[str, Any]:
        """Per worker, :func:`taskcs.engines.runner.environment` run there."""

    @abstractmethod
    def slots(self) -> dict[str, int]:
        """Task slots per worker now; raises if the engine is lost."""

    @abstractmethod
    def alive(self) -> bool:
        """False once the engine's scheduler is lost (the link then reconnects)."""

    @abstractmethod
    def submit(self, key: str, entries: list[tuple[int, str, bytes, str]], blobs: dict[str, bytes],
               retries: int, done: DoneCallback) -> None:
        """Run ``runner.run_batch(entries, blobs)`` as one engine task named ``key``.

        ``retries``: how often the engine may re-run it after a worker's death, where the
        engine has such a knob per task (the fewest any of its tasks allows)."""

    @abstractmethod
    def cancel(self, key: str) -> None:
        """Best effort: drop the batch ``key`` if it has not started."""

    @abstractmethod
    def close(self) -> None:
        """Disconnect (and stop an owned cluster); idempotent."""


def describe(env: dict[str, Any]) -> str:
    """``taskcs 0.1.0, Python 3.11, dill 0.3.9``."""
    return f"taskcs {env.get('taskcs', '?')}, Python {env.get('python', '?')}, dill {env.get('dill', '?')}"


def version_problem(engine: Engine, envs: Mapping[str, Any]) -> str | None:
    """One sentence naming both sides if any worker differs from this server, else None."""
    here = environment()
    for worker, env in sorted(envs.items(), key=lambda kv: kv[0]):
        if isinstance(env, BaseException):
            return (f"{engine.kind} worker {worker} at {engine.address} cannot run taskcs's runner ({env!r}); "
                    f"install taskcs there ({describe(here)} on this server)")
        if any(env.get(k) != here[k] for k in here):
            return (f"{engine.kind} worker {worker} at {engine.address} runs {describe(env)}, this server "
                    f"{describe(here)}: install the same versions on the workers")
    return None
