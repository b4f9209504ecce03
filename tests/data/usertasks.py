"""User task code for the task-file tests: importable only from this directory (the cwd of the
client under test), never from the server's own path."""

from __future__ import annotations


def triple(x: int) -> int:
    """Return 3 * x."""
    return 3 * x


def greet(name: str, punctuation: str = "!") -> str:
    """Return a greeting."""
    return f"hello {name}{punctuation}"
