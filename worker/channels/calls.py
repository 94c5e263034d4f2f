"""What a CRM adapter is given for a call event (seed 004): the event as the telephony side sent
it to dispatch.call_event, and the enterprise's settings for that CRM.

The payload's fields (all optional but `phone`, each adapter says what it needs):
  phone        the customer's number
  direction    "in" (default) or "out"
  extensions   the internal extensions ringing (dial); `extension` for one (bridge, hangup)
  line         the enterprise's own number the call came in on or went out from
  status       on hangup: answered, busy, cancel, failed or no_answer
  started_at   when the call started, ISO 8601 (default: when the event was sent)
  duration     seconds of talk; `waiting` seconds of ringing
  record_url   on download: where the recording is
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pgdispatch.worker.outcome import Discard

EVENTS = ("dial", "bridge", "hangup", "download")
STATUSES = ("answered", "busy", "cancel", "failed", "no_answer")


@dataclass(frozen=True, slots=True)
class CallEvent:
    enterprise: str
    integration: str
    event: str
    call_unique_id: str
    payload: Mapping[str, Any]
    sent_at: datetime  # when dispatch.call_event took it: the same on every retry
    settings: Mapping[str, Any] = field(repr=False)  # the CRM's config: its API key inside
    # The requests of this event an earlier attempt got through (by name): not sent again.
    delivered: frozenset[str] = frozenset()

    def text(self, name: str) -> str | None:
        value = self.payload.get(name)
        return None if value is None or value == "" else str(value)

    def direction(self) -> str:
        return "out" if self.payload.get("direction") == "out" else "in"

    def extensions(self) -> list[str]:
        many = self.payload.get("extensions")
        if isinstance(many, list):
            return [str(e) for e in many if e not in (None, "")]
        one = self.text("extension")
        return [one] if one else []

    def status(self) -> str:
        status = self.payload.get("status", "answered")
        if status not in STATUSES:
            raise BadEvent(f"payload.status must be one of {', '.join(STATUSES)}, got {status!r}")
        return str(status)

    def seconds(self, name: str) -> int:
        value = self.payload.get(name, 0)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise BadEvent(f"payload.{name} must be a number of seconds, got {value!r}")
        return int(value)

    def started_at(self) -> datetime:
        value = self.payload.get("started_at")
        if value is None:
            return self.sent_at
        try:
            started = datetime.fromisoformat(str(value))
        except ValueError:
            raise BadEvent(f"payload.started_at must be an ISO 8601 time, got {value!r}") from None
        return started if started.tzinfo else started.replace(tzinfo=UTC)


class BadEvent(Exception):
    """The payload cannot be delivered as it is: the job stops with this reason."""

    def outcome(self) -> Discard:
        return Discard("invalid", error=str(self))
