"""Example user code referenced by examples/tasks.json."""
