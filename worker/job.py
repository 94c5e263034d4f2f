"""A claimed job, as executors see it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID


@dataclass(slots=True)
class Job:
    id: int
    queue: str
    kind: str
    args: dict[str, Any]
    priority: int
    attempt: int
    max_attempts: int
    tenant: str | None
    run_at: datetime
    expire_at: datetime | None
    created_at: datetime
    lease_token: UUID
    expired: bool
