"""What an adapter is given: the delivery (lead and credential) and a way to POST."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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
        value = self.headers.get("retry-after", "")
        try:
            return max(0.0, float(value))
        except ValueError:
            return default


# POST a JSON body (or form fields) to a URL through the worker's shared HTTP pool and limits;
# raises NotSent (with the outcome to return) when nothing could be exchanged.
Post = Callable[..., Awaitable[Answer]]


class NotSent(Exception):
    """No answer (a timeout, a refused connection, a forbidden address, a limit): the outcome."""

    def __init__(self, outcome: Retry | Discard | Postpone) -> None:
        super().__init__(outcome.reason if isinstance(outcome, Postpone) else outcome.error)
        self.outcome = outcome


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
