"""LISTEN/NOTIFY: the listener, wake-ups, and the caches it keeps fresh."""

from __future__ import annotations

import json
from typing import Any

JOBS_CHANNEL = "dispatch_jobs"
CONFIG_CHANNEL = "dispatch_config"


def config_message(payload: str | None) -> dict[str, Any]:
    """A config-channel payload, {"table": ..., ...}; {} when there is none (after a
    reconnect: everything may have changed) or it cannot be read."""
    try:
        message = json.loads(payload) if payload else {}
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}
