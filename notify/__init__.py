"""LISTEN/NOTIFY: the listener, wake-ups, and the caches it keeps fresh."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

JOBS_CHANNEL = "dispatch_jobs"
CONFIG_CHANNEL = "dispatch_config"
# dispatch.cancel_jobs_v1: {"worker": ID, "tokens": [lease tokens]}, for the worker holding them.
CANCEL_CHANNEL = "dispatch_cancel"


def config_message(payload: str | None) -> dict[str, Any]:
    """A config-channel payload, {"table": ..., ...}; {} when there is none (after a
    reconnect: everything may have changed) or it cannot be read."""
    try:
        message = json.loads(payload) if payload else {}
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def log_failure(log: logging.Logger, what: str) -> Callable[[asyncio.Future[Any]], None]:
    """A done-callback for a background task nobody awaits: its failure is logged, as `what: error`."""
    def done(task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s: %s", what, task.exception())
    return done
