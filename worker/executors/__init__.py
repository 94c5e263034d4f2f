"""Executors: one async callable per job kind, returning an Outcome."""

from __future__ import annotations

from worker.executors import debug
from worker.runner import Executor


def builtin_executors() -> dict[str, Executor]:
    """Every executor this build knows, by kind."""
    return dict(debug.EXECUTORS)
