"""amoCRM API v4: leads/complex, with its OAuth refresh.

Every refresh returns a new refresh token and voids the old one, so two workers refreshing the
same credential at once would leave one of them (and then everyone) locked out, and a new pair
that is not stored is a dead credential. A refresh is therefore done under the credential's
refresh lease (one worker of all at a time; the others wait for it, then find the new token and
do not refresh again), with no database connection held across the call, and the new pair is
stored the moment it is in: both tokens in one short transaction that a cancellation cannot
stop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from pgdispatch.worker.channels.delivery import (
    Answer,
    ChannelIO,
    CheckFailed,
    Delivery,
    NotSent,
    done,
    retry,
    stop,
)
from pgdispatch.worker.outcome import Discard, Outcome, Retry

EARLY = 60.0  # refresh an access token this long before it expires

log = logging.getLogger(__name__)


def lead_complex(delivery: Delivery) -> list[dict[str, Any]]:
    data, settings = delivery.data, delivery.settings
    contact: dict[str, Any] = {"first_name": str(data.get("name") or f"Lead #{delivery.lead_id}")}
    custom = [{"field_code": code, "values": [{"value": str(data[key]), "enum_code": "WORK"}]}
              for key, code in (("phone", "PHONE"), ("email", "EMAIL")) if data.get(key)]
    if custom:
        contact["custom_fields_values"] = custom
    lead: dict[str, Any] = {"name": str(data.get("title") or f"Lead #{delivery.lead_id}"),
                            "request_id": f"lead-delivery-{delivery.delivery_id}",
                            "_embedded": {"contacts": [contact]}}
    if settings.get("pipeline_id"):
        lead["pipeline_id"] = settings["pipeline_id"]
    return [lead]


async def send_amocrm(delivery: Delivery, io: ChannelIO) -> Outcome:
    settings = delivery.settings
    base = str(settings["base_url"]).rstrip("/")
    body = json.dumps(lead_complex(delivery), ensure_ascii=False).encode()
    sent = f"POST {base}/api/v4/leads/complex {body.decode()}"
    long_lived = settings.get("long_lived_token")
    token = long_lived or _fresh_access_token(settings)
    if token is None:
        token = await _refresh(io, base, stale=settings.get("access_token"))
    answer = await _post(io, base, body, token)
    if answer.status == 401 and not long_lived:
        # The official client's rule: refresh once on a 401, then send again.
        token = await _refresh(io, base, stale=token)
        answer = await _post(io, base, body, token)
    if answer.status == 200:
        return done(sent, answer)  # merged: true (a duplicate merged into an existing lead) too
    why = f"amoCRM answered {answer.status}: {_problem(answer)}"
    if answer.status == 429 or answer.status >= 500:
        return retry(sent, answer, why, answer.retry_after())
    if answer.status == 401:
        return stop(sent, answer, why + (" (long-lived token)" if long_lived else " (after a token refresh)"))
    return stop(sent, answer, why)  # 400 validation, 402 tariff, 403 IP blocked


def _fresh_access_token(settings: Any) -> str | None:
    token = settings.get("access_token")
    expires_at = settings.get("expires_at")
    if not token or not isinstance(expires_at, int | float) or expires_at - EARLY <= time.time():
        return None
    return str(token)


async def _refresh(io: ChannelIO, base: str, *, stale: str | None) -> str:
    """A fresh access token. Once begun, a refresh runs to its end even when the job is
    cancelled meanwhile (its timeout, a shutdown): amoCRM voids the old refresh token the moment
    it answers, so the answer must be read and stored whatever becomes of the caller."""
    refreshing = asyncio.ensure_future(_refresh_now(io, base, stale=stale))
    refreshing.add_done_callback(_log_failure)
    return await asyncio.shield(refreshing)


def _log_failure(task: asyncio.Future[str]) -> None:
    if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), NotSent):
        log.warning("amoCRM token refresh failed: %s", task.exception())


async def _refresh_now(io: ChannelIO, base: str, *, stale: str | None) -> str:
    async with io.credential_refresh() as credential:
        current = credential.settings
        fresh = _fresh_access_token(current)
        if fresh is not None and fresh != stale:
            return fresh  # another worker refreshed while this one waited for the lock
        request = {"client_id": current["client_id"], "client_secret": current["client_secret"],
                   "grant_type": "refresh_token", "refresh_token": current["refresh_token"],
                   "redirect_uri": current["redirect_uri"]}
        answer = await io.request("POST", f"{base}/oauth2/access_token", content=json.dumps(request).encode(),
                               headers={"Content-Type": "application/json"})
        granted = answer.json()
        if answer.status != 200 or not isinstance(granted, dict) or not granted.get("access_token"):
            why = f"amoCRM OAuth refresh answered {answer.status}: {_problem(answer)}"
            if answer.status == 429 or answer.status >= 500:
                raise NotSent(Retry(error=why, status=answer.status))
            raise NotSent(Discard("discarded", error=f"{why} (re-authorise the integration)",
                                  status=answer.status))
        await credential.save(access_token=granted["access_token"], refresh_token=granted["refresh_token"],
                              expires_at=int(time.time()) + int(granted.get("expires_in", 86400)))
        return str(granted["access_token"])


async def _post(io: ChannelIO, base: str, body: bytes, token: str) -> Answer:
    return await io.request("POST", f"{base}/api/v4/leads/complex", content=body,
                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})


def _problem(answer: Answer) -> str:
    """The API's own words: a problem+json title/detail, validation errors, or the text."""
    body = answer.json()
    if not isinstance(body, dict):
        return answer.text[:200] or "no body"
    parts = [str(body[k]) for k in ("title", "detail", "hint") if body.get(k)]
    if body.get("validation-errors"):
        parts.append(json.dumps(body["validation-errors"], ensure_ascii=False)[:300])
    return "; ".join(parts) or json.dumps(body)[:200]


async def check_amocrm(settings: Mapping[str, Any], io: ChannelIO) -> str:
    """GET account, refreshing the access token first when it is due."""
    base = str(settings["base_url"]).rstrip("/")
    token = settings.get("long_lived_token") or _fresh_access_token(settings)
    if token is None:
        try:
            token = await _refresh(io, base, stale=settings.get("access_token"))
        except NotSent as not_sent:
            raise CheckFailed(str(not_sent)) from None
    answer = await io.request("GET", f"{base}/api/v4/account", headers={"Authorization": f"Bearer {token}"})
    account = answer.json()
    if answer.status != 200 or not isinstance(account, dict):
        raise CheckFailed(f"amoCRM answered {answer.status}: {_problem(answer)}")
    return f"account {account.get('name')} (id {account.get('id')})"
