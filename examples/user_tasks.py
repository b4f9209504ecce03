"""A user module: run `cs-client --tasks examples/tasks.json` from the repository root."""


def scale(x: float, by: float = 1.0) -> float:
    """Return x * by."""
    return x * by
