"""Executors: resolve a task's code, run it, report the outcome (thread, process, foreground)."""

from .runner import Resolver, run_task

__all__ = ["Resolver", "run_task"]
