"""Bitrix24 inbound webhook: crm.lead.add."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pgdispatch.worker.channels.delivery import Answer, ChannelIO, CheckFailed, Delivery, done, retry, stop
from pgdispatch.worker.outcome import Outcome

# Errors Bitrix24 names, and what they mean for a delivery.
RETRY_ERRORS = {"QUERY_LIMIT_EXCEEDED": 1.0, "OPERATION_TIME_LIMIT": 60.0}
STOP_ERRORS = frozenset({"NO_AUTH_FOUND", "INVALID_CREDENTIALS", "insufficient_scope", "ACCESS_DENIED",
                         "OVERLOAD_LIMIT", "ERROR_METHOD_NOT_FOUND", "INVALID_REQUEST"})


def fields(delivery: Delivery) -> dict[str, Any]:
    data, settings = delivery.data, delivery.settings
    lead: dict[str, Any] = {
        "TITLE": str(data.get("title") or f"Lead #{delivery.lead_id}"),
        "SOURCE_ID": str(settings.get("source_id") or "WEB"),
        "SOURCE_DESCRIPTION": f"pgdispatch lead {delivery.lead_id}",
    }
    for key, name in (("name", "NAME"), ("last_name", "LAST_NAME"), ("comment", "COMMENTS")):
        if data.get(key):
            lead[name] = str(data[key])
    if data.get("phone"):
        lead["PHONE"] = [{"VALUE": str(data["phone"]), "VALUE_TYPE": "WORK"}]
    if data.get("email"):
        lead["EMAIL"] = [{"VALUE": str(data["email"]), "VALUE_TYPE": "WORK"}]
    if settings.get("assigned_by_id"):
        lead["ASSIGNED_BY_ID"] = settings["assigned_by_id"]
    for key, value in data.items():
        if str(key).lower().startswith("utm_") and value:
            lead[str(key).upper()] = str(value)
    return lead


def slow_down(answer: Answer) -> float | None:
    """Bitrix24 says "too many" with a 503 QUERY_LIMIT_EXCEEDED (its bucket of 50 is full): a
    pause of the portal's key for every worker, never a breaker failure."""
    reply = answer.json()
    if isinstance(reply, dict) and reply.get("error") == "QUERY_LIMIT_EXCEEDED":
        return answer.retry_after(RETRY_ERRORS["QUERY_LIMIT_EXCEEDED"])
    return None


async def send_bitrix24(delivery: Delivery, io: ChannelIO) -> Outcome:
    url = str(delivery.settings["webhook_url"]).rstrip("/") + "/crm.lead.add.json"
    body = json.dumps({"fields": fields(delivery), "params": {"REGISTER_SONET_EVENT": "Y"}},
                      ensure_ascii=False).encode()
    answer = await io.request("POST", url, content=body, headers={"Content-Type": "application/json"},
                              slow_down=slow_down)
    # The webhook code in the URL is the credential: never written down.
    sent = f"POST .../crm.lead.add.json {body.decode()}"
    reply = answer.json()
    reply = reply if isinstance(reply, dict) else {}
    if answer.status == 200 and reply.get("result"):
        return done(sent, answer)
    code = str(reply.get("error") or "")
    why = f"Bitrix24 {answer.status} {code}: {reply.get('error_description') or answer.text[:200]}".strip()
    if code in RETRY_ERRORS:
        return retry(sent, answer, why, answer.retry_after(RETRY_ERRORS[code]))
    if code in STOP_ERRORS or 400 <= answer.status < 500:
        return stop(sent, answer, why)
    return retry(sent, answer, why)  # 500 and other answers without a known error


async def check_bitrix24(settings: Mapping[str, Any], io: ChannelIO) -> str:
    """profile: whose inbound webhook this is."""
    url = str(settings["webhook_url"]).rstrip("/") + "/profile.json"
    answer = await io.request("POST", url, content=b"{}", headers={"Content-Type": "application/json"})
    reply = answer.json()
    if answer.status != 200 or not isinstance(reply, dict) or not isinstance(reply.get("result"), dict):
        error = reply if isinstance(reply, dict) else {}
        raise CheckFailed(f"Bitrix24 answered {answer.status} {error.get('error', '')}: "
                          f"{error.get('error_description') or answer.text[:200]}")
    user = reply["result"]
    return f"webhook of user {user.get('ID')} {user.get('NAME', '')} {user.get('LAST_NAME', '')}".rstrip()
