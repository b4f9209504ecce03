"""The engine thread: the half of an engine link that may block on the engine's client.

It connects (with backoff), checks the workers' versions, polls capacity and health, and
runs the link's commands (submit, cancel, reconnect); what it learns goes back to the server
loop as events through ``post`` (see :mod:`taskcs.engines.link`)::

    link --commands: ("submit", gen, key, entries, blobs, retries) | ("cancel", gen, key)
                     | ("reconnect", gen, reason) | None (stop)--> EngineThread
    link <--events: ("up", gen, slots) | ("capacity", gen, slots) | ("done", gen, key, outcome)
                    | ("lost", gen, reason) | ("unreachable", 0, text, attempt)
                    | ("refused", gen, text) | ("warning", gen, text)-- EngineThread and the engine's callbacks

``gen`` counts connections: a command for an earlier one is dropped.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .base import Engine, EngineError, version_problem

#: Seconds between polls of the engine's workers (capacity) and health.
POLL_SECONDS = 0.25
#: First and longest wait before reconnecting to a lost or unreachable engine.
BACKOFF_MIN = 0.5
BACKOFF_MAX = 10.0
#: Seconds to wait for an engine's scheduler when connecting.
CONNECT_TIMEOUT = 10.0


class EngineThread:
    """Drives one :class:`Engine` on a daemon thread of its own; see the module docstring."""

    def __init__(self, engine: Engine, post: Callable[..., None]) -> None:
        self.engine = engine
        self._post = post
        self.commands: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"taskcs-engine-{engine.kind}", daemon=True)

    def start(self) -> None:
        """Start connecting in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; it disconnects (and stops an owned cluster) on its way out."""
        self._stop.set()
        self.commands.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        backoff = BACKOFF_MIN
        attempts = 0
        generation = 0
        engine = self.engine
        while not self._stop.is_set():
            attempts += 1
            try:
                engine.connect(CONNECT_TIMEOUT)
                problem = version_problem(engine, engine.environments())
                slots = engine.slots()
            except Exception as exc:
                engine.close()
                text = str(exc) if isinstance(exc, EngineError) else f"cannot use {engine.address}: {exc!r}"
                self._post("unreachable", 0, text, attempts)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if problem is not None:
                engine.close()
                self._post("refused", generation, problem)
                return
            generation += 1
            backoff, attempts = BACKOFF_MIN, 0
            self._post("up", generation, slots)
            reason = self._serve(generation, slots)
            engine.close()
            if reason is not None:
                self._post("lost", generation, reason)
                self._stop.wait(backoff)
        engine.close()

    def _serve(self, generation: int, slots: dict[str, int]) -> str | None:
        """Run commands until the engine is lost (its reason) or the link stops (None)."""
        engine = self.engine
        next_poll = time.monotonic() + POLL_SECONDS
        while not self._stop.is_set():
            try:
                command = self.commands.get(timeout=max(0.0, next_poll - time.monotonic()))
            except queue.Empty:
                command = ()
            while command:
                if command[1] == generation:
                    try:
                        if command[0] == "submit":
                            _, _, key, entries, blobs, retries = command
                            engine.submit(key, entries, blobs, retries,
                                          functools.partial(self._post, "done", generation))
                        elif command[0] == "reconnect":
                            return str(command[2])
                        else:
                            engine.cancel(command[2])
                    except Exception as exc:
                        if command[0] == "submit":
                            self._post("done", generation, command[2], exc)
                try:
                    command = self.commands.get_nowait()
                except queue.Empty:
                    command = ()
            if command is None:
                return None
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + POLL_SECONDS
                try:
                    if not engine.alive():
                        return f"the {engine.kind} scheduler at {engine.address} is gone"
                    now_slots = engine.slots()
                except Exception as exc:
                    return f"the {engine.kind} scheduler at {engine.address} failed: {exc!r}"
                if now_slots != slots:
                    if set(now_slots) - set(slots):
                        self._check_new_workers(generation)
                    slots = now_slots
                    self._post("capacity", generation, slots)
        return None

    def _check_new_workers(self, generation: int) -> None:
        """Workers that joined after the connection are checked too; a mismatch is logged
        (the engine schedules on them all the same: taskcs cannot keep work off one worker)."""
        try:
            problem = version_problem(self.engine, self.engine.environments())
        except Exception as exc:
            problem = f"cannot check the versions of new {self.engine.kind} workers: {exc!r}"
        if problem is not None:
            self._post("warning", generation, problem)
