"""JSON webhooks, signed the Standard Webhooks way when the credential has a secret."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from pgdispatch.worker.channels.delivery import Answer, ChannelIO, CheckFailed, Delivery, done, retry, stop
from pgdispatch.worker.outbound.signing import SigningKey, webhook_headers
from pgdispatch.worker.outcome import Outcome


async def send_webhook(delivery: Delivery, io: ChannelIO) -> Outcome:
    settings = delivery.settings
    body = json.dumps({"type": "lead.created", "data": delivery.lead_document()},
                      ensure_ascii=False, separators=(",", ":")).encode()
    # The same id on every retry: the receiver's idempotency key.
    answer = await _post(io, settings, body, f"lead-delivery-{delivery.delivery_id}")
    sent = f"POST {settings['url']} {body.decode()}"
    if 200 <= answer.status < 300:
        return done(sent, answer)
    if answer.status in (408, 425, 429) or answer.status >= 500:
        return retry(sent, answer, f"webhook answered {answer.status}", answer.retry_after())
    return stop(sent, answer, f"webhook answered {answer.status}: the receiver refuses this lead")


async def check_webhook(settings: Mapping[str, Any], io: ChannelIO) -> str:
    """A signed test event (type pgdispatch.test); the receiver must answer 2xx."""
    body = json.dumps({"type": "pgdispatch.test", "data": {}}).encode()
    answer = await _post(io, settings, body, f"pgdispatch-test-{int(time.time())}")
    if not 200 <= answer.status < 300:
        raise CheckFailed(f"the webhook answered {answer.status}: {answer.text[:200]}")
    signed = " (signed)" if settings.get("secret") else ""
    return f"the webhook answered {answer.status} to a test event{signed}"


async def _post(io: ChannelIO, settings: Mapping[str, Any], body: bytes, message_id: str) -> Answer:
    headers = {"Content-Type": "application/json", **settings.get("headers", {})}
    secret = settings.get("secret")
    if secret:
        key = SigningKey("credential", "HS256", secret, ttl_seconds=0)
        headers.update(webhook_headers(key, message_id=message_id, body=body, now=time.time()))
    else:
        headers["webhook-id"] = message_id
    return await io.request("POST", settings["url"], content=body, headers=headers)
