"""JSON webhooks, signed the Standard Webhooks way when the credential has a secret."""

from __future__ import annotations

import json
import time

from pgdispatch.worker.channels.delivery import ChannelIO, Delivery, done, retry, stop
from pgdispatch.worker.outbound.signing import SigningKey, webhook_headers
from pgdispatch.worker.outcome import Outcome


async def send_webhook(delivery: Delivery, io: ChannelIO) -> Outcome:
    settings = delivery.settings
    body = json.dumps({"type": "lead.created", "data": delivery.lead_document()},
                      ensure_ascii=False, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", **settings.get("headers", {})}
    # The same id on every retry: the receiver's idempotency key.
    message_id = f"lead-delivery-{delivery.delivery_id}"
    secret = settings.get("secret")
    if secret:
        key = SigningKey(f"credential:{delivery.credential_id}", "HS256", secret, ttl_seconds=0)
        headers.update(webhook_headers(key, message_id=message_id, body=body, now=time.time()))
    else:
        headers["webhook-id"] = message_id
    answer = await io.post(settings["url"], content=body, headers=headers)
    sent = f"POST {settings['url']} {body.decode()}"
    if 200 <= answer.status < 300:
        return done(sent, answer)
    if answer.status in (408, 425, 429) or answer.status >= 500:
        return retry(sent, answer, f"webhook answered {answer.status}", answer.retry_after())
    return stop(sent, answer, f"webhook answered {answer.status}: the receiver refuses this lead")
