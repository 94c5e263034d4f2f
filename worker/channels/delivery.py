"""What an adapter is given: the delivery (lead and credential) and its way out (ChannelIO)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pgdispatch.worker.outbound.destinations import Destinations
from pgdispatch.worker.outbound.transport import MAX_RETRY_AFTER, retry_after_seconds
from pgdispatch.worker.outcome import Discard, Done, Postpone, Retry

EXCERPT_CHARS = 2048


@dataclass(frozen=True, slots=True)
class Delivery:
    delivery_id: int
    credential_id: int
    type: str
    settings: Mapping[str, Any]  # secrets inside: never logged, never put in an outcome
    lead_id: int
    external_entity_id: int | None
    external_project_id: int | None
    data: Mapping[str, Any]
    created_at: datetime

    def lead_document(self) -> dict[str, Any]:
        """The lead as JSON for webhooks: its ids and its data."""
        return {"id": self.lead_id, "external_entity_id": self.external_entity_id,
                "external_project_id": self.external_project_id,
                "created_at": self.created_at.isoformat(), "data": dict(self.data)}

    def lead_lines(self) -> list[tuple[str, str]]:
        """The lead as (field, value) lines for people (messages, e-mail)."""
        return [(str(key), _text(value)) for key, value in self.data.items() if value not in (None, "")]


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any:
        """The body as JSON; None when it is not JSON (an HTML error page, say)."""
        try:
            return json.loads(self.text)
        except ValueError:
            return None

    def retry_after(self, default: float | None = None) -> float | None:
        """Its Retry-After header, else the `retry_after` of a JSON answer's `parameters` (where
        Telegram says it), in seconds, at most a day."""
        seconds = retry_after_seconds(self.headers.get("retry-after"), time.time())
        if seconds is None and self.status == 429:
            reply = self.json()
            parameters = reply.get("parameters") if isinstance(reply, dict) else None
            given = parameters.get("retry_after") if isinstance(parameters, dict) else None
            if isinstance(given, int | float) and not isinstance(given, bool) and given >= 0:
                seconds = min(float(given), MAX_RETRY_AFTER)
        return default if seconds is None else seconds


class CredentialRefresh(Protocol):
    """A credential's settings while this worker holds its refresh lease (one worker of all at a
    time; no database connection is held meanwhile, so the vendor's HTTP call holds none)."""

    settings: dict[str, Any]

    async def save(self, **changes: Any) -> None:
        """Merge `changes` into the settings at once, in a short transaction of its own that a
        cancellation cannot stop (a rotated refresh token is void the moment the vendor answers:
        losing the new one would leave a dead credential)."""


class Outbound(Protocol):
    """What an adapter may do besides computing: send through the worker's shared HTTP pool,
    destinations policy and shared limits (raising NotSent when nothing was exchanged)."""

    destinations: Destinations

    async def request(self, method: str, url: str, *, content: bytes | None = None,
                      headers: Mapping[str, str] | None = None,
                      slow_down: Callable[[Answer], float | None] | None = None) -> Answer:
        """`slow_down` reads a vendor's own "too many requests" from an answer that is not a
        429 (Bitrix24's 503 QUERY_LIMIT_EXCEEDED): seconds to pause the key, or None."""


class ChannelIO(Outbound, Protocol):
    """A lead adapter's way out: Outbound, and refreshing its credential's tokens (tokens that
    rotate), one worker at a time."""

    def credential_refresh(self) -> AbstractAsyncContextManager[CredentialRefresh]: ...


class NotSent(Exception):
    """No answer (a timeout, a refused connection, a forbidden address, a limit): the outcome."""

    def __init__(self, outcome: Retry | Discard | Postpone) -> None:
        super().__init__(outcome.reason if isinstance(outcome, Postpone) else outcome.error)
        self.outcome = outcome


class CheckFailed(Exception):
    """`credentials test`: what is wrong with a credential, in the API's own words."""


def excerpt(text: str) -> str:
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"


def logged(request: str, answer: Answer) -> dict[str, Any]:
    """What integration_logs keeps of an attempt."""
    return {"request": excerpt(request), "response": excerpt(answer.text)}


def done(request: str, answer: Answer) -> Done:
    return Done(status=answer.status, detail=logged(request, answer))


def retry(request: str, answer: Answer, error: str, after: float | None = None) -> Retry:
    detail = logged(request, answer)
    if after is not None:
        detail["retry_after"] = after
    return Retry(after=after, error=error, status=answer.status, detail=detail)


def stop(request: str, answer: Answer, error: str) -> Discard:
    return Discard("discarded", error=error, status=answer.status, detail=logged(request, answer))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
