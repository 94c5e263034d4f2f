"""A local server that answers like the vendors' APIs (../shared/CHANNELS.md), for the lead
channel adapters: JSON webhooks, the Telegram Bot API, Bitrix24 inbound webhooks and amoCRM
(leads/complex and its OAuth refresh). What each endpoint answers is chosen by the test through
the path (webhooks), the chat id (Telegram), the webhook code (Bitrix24) or the account name
(amoCRM); every request is recorded."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.helpers import in_a_thread, served

BOT_TOKEN = "123456:AAFakeTokenForTestsOnly_0123456789"


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class AmoAccount:
    """One amoCRM account's OAuth state: each refresh voids the refresh token it was given."""

    access_token: str = "at-0"
    refresh_token: str = "rt-0"
    refreshes: int = 0


@dataclass
class FakeChannels:
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    amo: dict[str, AmoAccount] = field(default_factory=lambda: defaultdict(AmoAccount))
    # Awaited by amoCRM's OAuth endpoint once it has rotated the tokens, before it answers.
    on_refresh: Callable[[], Awaitable[None]] | None = None

    def to(self, path_part: str) -> list[Seen]:
        return [s for s in self.seen if path_part in s.path]


def _telegram(chat_id: Any, calls: int) -> web.Response:
    ok = web.json_response({"ok": True, "result": {"message_id": 7, "chat": {"id": chat_id}}})
    match chat_id:
        case 1001:
            return ok
        case 1002:  # rate limited once
            if calls == 1:
                return web.json_response({"ok": False, "error_code": 429, "description": "Too Many Requests: "
                                          "retry after 0", "parameters": {"retry_after": 0}}, status=429)
            return ok
        case 1003:
            return web.json_response({"ok": False, "error_code": 403,
                                      "description": "Forbidden: bot was blocked by the user"}, status=403)
        case 1004:  # a group that became a supergroup
            return web.json_response({"ok": False, "error_code": 400, "description": "Bad Request: group chat "
                                      "was upgraded to a supergroup chat",
                                      "parameters": {"migrate_to_chat_id": -1001004}}, status=400)
        case -1001004:
            return ok
        case 1005:
            return web.json_response({"ok": False, "error_code": 400,
                                      "description": "Bad Request: chat not found"}, status=400)
    return web.json_response({"ok": False, "error_code": 500, "description": "Internal Server Error"},
                             status=500)


def _bitrix(code: str, calls: int) -> web.Response:
    if code == "okcode" or (code == "busycode" and calls > 1):
        return web.json_response({"result": 17, "time": {"start": 1.0, "finish": 1.1}})
    if code == "busycode":
        return web.json_response({"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"},
                                 status=503)
    if code == "denied":
        return web.json_response({"error": "NO_AUTH_FOUND", "error_description": "Wrong authorization data"},
                                 status=401)
    if code == "overload":
        return web.json_response({"error": "OVERLOAD_LIMIT", "error_description": "REST API is blocked due to "
                                  "overload"}, status=503)
    return web.json_response({"error": "INTERNAL_SERVER_ERROR", "error_description": "oops"}, status=500)


async def _amo(fake: FakeChannels, account: AmoAccount, name: str, path: str, request: web.Request,
               body: bytes) -> web.Response:
    def problem(status: int, title: str, detail: str, **more: Any) -> web.Response:
        return web.json_response({"title": title, "type": "https://httpstatus.es/" + str(status),
                                  "status": status, "detail": detail, **more},
                                 status=status, content_type="application/problem+json")

    if path == "oauth2/access_token":
        grant = json.loads(body)
        await asyncio.sleep(0.05)  # slow enough for concurrent refreshes to overlap
        if grant.get("grant_type") != "refresh_token" or grant.get("refresh_token") != account.refresh_token:
            return problem(400, "Bad Request", "Refresh token has been revoked", hint="invalid_grant")
        account.refreshes += 1
        account.access_token = f"at-{account.refreshes}"
        account.refresh_token = f"rt-{account.refreshes}"  # the old one is void from now on
        if fake.on_refresh is not None:
            await fake.on_refresh()
        return web.json_response({"token_type": "Bearer", "expires_in": 86400,
                                  "access_token": account.access_token, "refresh_token": account.refresh_token})
    if path == "api/v4/account":
        if request.headers.get("Authorization") != f"Bearer {account.access_token}":
            return problem(401, "Unauthorized", "Unauthorized")
        return web.json_response({"id": 31, "name": name, "subdomain": name}, content_type="application/hal+json")
    if path == "api/v4/leads/complex":
        if request.headers.get("Authorization") != f"Bearer {account.access_token}":
            return problem(401, "Unauthorized", "Unauthorized")
        leads = json.loads(body)
        if name == "invalid":
            return problem(400, "Bad Request", "Request validation failed",
                           **{"validation-errors": [{"request_id": leads[0]["request_id"], "errors": [
                               {"code": "NotSupportedChoice", "path": "pipeline_id", "detail": "wrong pipeline"}]}]})
        if name == "tariff":
            return problem(402, "Payment Required", "Your account tariff does not allow this")
        return web.json_response([{"id": 100 + i, "contact_id": 200 + i, "company_id": None,
                                   "request_id": [lead["request_id"]], "merged": name == "dup"}
                                  for i, lead in enumerate(leads)], content_type="application/hal+json")
    return web.Response(status=404, text="no such endpoint")


@contextlib.asynccontextmanager
async def fake_channels() -> AsyncIterator[FakeChannels]:
    fake = FakeChannels()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fake.seen.append(Seen(request.path, dict(request.headers), body))
        fake.calls[request.path] += 1
        parts = request.path.strip("/").split("/")
        if parts[0] == "hook" and parts[1] == "html":  # a proxy's error page
            return web.Response(status=502, content_type="text/html",
                                text="<html>\n<head><title>502 Bad Gateway</title></head>\n<body>\n</body>\n</html>\n")
        if parts[0] == "hook":  # /hook/<status>
            return web.Response(status=int(parts[1]), text=f"answer {parts[1]}")
        if parts[0] == f"bot{BOT_TOKEN}" and parts[1] == "getMe":
            return web.json_response({"ok": True, "result": {"id": 123456, "is_bot": True, "username": "fake_bot"}})
        if parts[0] == f"bot{BOT_TOKEN}" and parts[1] == "getChat":
            chat = json.loads(body)["chat_id"]
            if chat == 1005:
                return web.json_response({"ok": False, "error_code": 400,
                                          "description": "Bad Request: chat not found"}, status=400)
            return web.json_response({"ok": True, "result": {"id": chat, "title": "Sales", "type": "group"}})
        if parts[0] == "rest" and parts[-1] == "profile.json":
            if parts[2] == "okcode":
                return web.json_response({"result": {"ID": "1", "NAME": "Ann", "LAST_NAME": "Admin"}})
            return _bitrix(parts[2], 1)
        if parts[0] == f"bot{BOT_TOKEN}" and parts[1] == "sendMessage":
            chat = json.loads(body)["chat_id"]
            fake.calls[f"chat:{chat}"] += 1
            return _telegram(chat, fake.calls[f"chat:{chat}"])
        if parts[0].startswith("bot") and len(parts) == 2:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        if parts[0] == "rest" and parts[-1] == "crm.lead.add.json":
            return _bitrix(parts[2], fake.calls[request.path])
        if parts[0] == "amo":  # /amo/<account>/...
            return await _amo(fake, fake.amo[parts[1]], parts[1], "/".join(parts[2:]), request, body)
        return web.Response(status=404, text="no such endpoint")

    async with served(handle) as fake.url:
        yield fake


@contextlib.contextmanager
def fake_channels_in_a_thread() -> Iterator[FakeChannels]:
    """The same server on an event loop of its own, for code that runs its own (the CLI)."""
    with in_a_thread(fake_channels()) as fake:
        yield fake
