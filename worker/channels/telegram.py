"""Telegram Bot API sendMessage."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

from pgdispatch.worker.channels.delivery import Answer, ChannelIO, CheckFailed, Delivery, done, retry, stop
from pgdispatch.worker.outcome import Outcome

TEXT_LIMIT = 4096
DEFAULT_BASE_URL = "https://api.telegram.org"


def message(delivery: Delivery) -> str:
    lines = [f"<b>New lead #{delivery.lead_id}</b>"]
    lines += [f"<b>{html.escape(key)}:</b> {html.escape(value)}" for key, value in delivery.lead_lines()]
    text = "\n".join(lines)
    if len(text) > TEXT_LIMIT:
        # Cut before Telegram refuses it ("message is too long"), at a line: never inside a tag.
        text = text[:max(0, text.rfind("\n", 0, TEXT_LIMIT - 2))] + "\n…"
    return text


async def send_telegram(delivery: Delivery, io: ChannelIO) -> Outcome:
    settings = delivery.settings
    url = f"{_bot_url(settings)}/sendMessage"
    payload: dict[str, Any] = {"chat_id": settings["chat_id"], "text": message(delivery),
                               "parse_mode": "HTML", "link_preview_options": {"is_disabled": True}}
    answer, body, sent = await _send(io, url, payload)
    migrated = _parameters(body).get("migrate_to_chat_id")
    if answer.status == 400 and migrated is not None:
        # The group became a supergroup: Telegram names its new id; send there at once.
        payload["chat_id"] = migrated
        answer, body, sent = await _send(io, url, payload)
        if answer.status == 200:
            note = f" (chat {settings['chat_id']} is now {migrated}: update the credential's chat_id)"
            return done(sent + note, answer)
    description = str(body.get("description") or answer.text[:200])
    if answer.status == 200 and body.get("ok") is True:
        return done(sent, answer)
    if answer.status == 429:
        after = _parameters(body).get("retry_after")
        return retry(sent, answer, f"Telegram: {description}",
                     float(after) if isinstance(after, int | float) else answer.retry_after(5.0))
    if answer.status >= 500 or answer.status == 200:  # 200 without ok: a broken answer, try again
        return retry(sent, answer, f"Telegram answered {answer.status}: {description}")
    if answer.status in (401, 404):
        return stop(sent, answer, f"Telegram: {description} (a wrong bot token)")
    return stop(sent, answer, f"Telegram: {description}")


async def check_telegram(settings: Mapping[str, Any], io: ChannelIO) -> str:
    """getMe (is the token a bot's?) and getChat (can it see the chat?)."""
    me = await _call(io, f"{_bot_url(settings)}/getMe", {})
    chat = await _call(io, f"{_bot_url(settings)}/getChat", {"chat_id": settings["chat_id"]})
    title = chat.get("title") or chat.get("username") or chat.get("id")
    return f"bot @{me.get('username')} sees chat {title}"


def _bot_url(settings: Mapping[str, Any]) -> str:
    return f"{str(settings.get('base_url') or DEFAULT_BASE_URL).rstrip('/')}/bot{settings['bot_token']}"


async def _send(io: ChannelIO, url: str, payload: dict[str, Any]) -> tuple[Answer, dict[str, Any], str]:
    """The answer, its JSON object (empty when it is none) and what is logged of the request."""
    body = json.dumps(payload, ensure_ascii=False).encode()
    answer = await io.request("POST", url, content=body, headers={"Content-Type": "application/json"})
    parsed = answer.json()
    # The token is part of the URL: it is never written down.
    method = url.rsplit("/", 1)[1]
    return answer, parsed if isinstance(parsed, dict) else {}, f"POST /bot***/{method} {body.decode()}"


async def _call(io: ChannelIO, url: str, payload: dict[str, Any]) -> dict[str, Any]:
    answer, body, _ = await _send(io, url, payload)
    if body.get("ok") is not True:
        why = body.get("description") or answer.text[:200]
        raise CheckFailed(f"Telegram answered {answer.status}: {why}")
    result = body.get("result")
    return result if isinstance(result, dict) else {}


def _parameters(body: dict[str, Any]) -> dict[str, Any]:
    parameters = body.get("parameters")
    return parameters if isinstance(parameters, dict) else {}
