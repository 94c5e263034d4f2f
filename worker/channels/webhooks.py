"""JSON webhooks, signed the Standard Webhooks way when the credential has a secret."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from pgdispatch.worker.channels.calls import CallEvent
from pgdispatch.worker.channels.delivery import (
    Answer,
    ChannelIO,
    CheckFailed,
    Delivery,
    Outbound,
    done,
    retry,
    stop,
)
from pgdispatch.worker.channels.secrets import mask_url_path
from pgdispatch.worker.outbound.signing import SigningKey, webhook_headers
from pgdispatch.worker.outcome import Outcome


async def send_webhook(delivery: Delivery, io: ChannelIO) -> Outcome:
    settings = delivery.settings
    body = json.dumps({"type": "lead.created", "data": delivery.lead_document()},
                      ensure_ascii=False, separators=(",", ":")).encode()
    # The same id on every retry: the receiver's idempotency key.
    answer = await _post(io, settings, body, f"lead-delivery-{delivery.delivery_id}")
    # A hook's path may be its credential (/services/T.../B.../...): where it went, not how.
    return _verdict(f"POST {mask_url_path(settings['url'])} {body.decode()}", answer, "lead")


async def send_call_webhook(call: CallEvent, io: Outbound) -> Outcome:
    """A call event as a `call.dial|bridge|hangup|download` webhook: the payload as the
    telephony side sent it, with the enterprise and the call's id."""
    body = json.dumps({"type": f"call.{call.event}", "timestamp": call.sent_at.isoformat(),
                       "data": {"enterprise": call.enterprise, "call_unique_id": call.call_unique_id,
                                **call.payload}},
                      ensure_ascii=False, separators=(",", ":")).encode()
    # One id per (call, event), the same on every retry: the receiver's idempotency key.
    answer = await _post(io, call.settings, body, f"call-{call.call_unique_id}-{call.event}")
    return _verdict(f"POST {mask_url_path(call.settings['url'])} {body.decode()}", answer, "call event")


def _verdict(sent: str, answer: Answer, what: str) -> Outcome:
    if 200 <= answer.status < 300:
        return done(sent, answer)
    if answer.status in (408, 425, 429) or answer.status >= 500:
        return retry(sent, answer, f"webhook answered {answer.status}", answer.retry_after())
    return stop(sent, answer, f"webhook answered {answer.status}: the receiver refuses this {what}")


async def check_webhook(settings: Mapping[str, Any], io: Outbound) -> str:
    """A signed test event (type pgdispatch.test); the receiver must answer 2xx."""
    body = json.dumps({"type": "pgdispatch.test", "data": {}}).encode()
    answer = await _post(io, settings, body, f"pgdispatch-test-{int(time.time())}")
    if not 200 <= answer.status < 300:
        raise CheckFailed(f"the webhook answered {answer.status}: {answer.text[:200]}")
    signed = " (signed)" if settings.get("secret") else ""
    return f"the webhook answered {answer.status} to a test event{signed}"


async def _post(io: Outbound, settings: Mapping[str, Any], body: bytes, message_id: str) -> Answer:
    headers = {"Content-Type": "application/json", **settings.get("headers", {})}
    secret = settings.get("secret")
    if secret:
        key = SigningKey("credential", "HS256", secret, ttl_seconds=0)
        headers.update(webhook_headers(key, message_id=message_id, body=body, now=time.time()))
    else:
        headers["webhook-id"] = message_id
    return await io.request("POST", settings["url"], content=body, headers=headers)
