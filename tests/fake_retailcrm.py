"""A local server that answers like RetailCRM's API v5 (../shared/CHANNELS.md), for the call
event adapter and smart redirect. The account is the first part of the path
(api_url = http://127.0.0.1:PORT/ACCOUNT) and chooses the behaviour:

- ok:      everything succeeds; uploads of a call already uploaded answer duplicateCalls
- off:     HTTP 200 with "success": false (telephony not enabled for the account)
- html:    an HTML page (the account does not exist)
- bad:     400 "Errors in the entity format"
- busy:    503 "Rate limit exceeded" with Retry-After: 1 on the first request, then as ok
- proxy:   a proxy's HTML 502 page on the first request, then as ok
- down:    500 while `down` is set, then as ok
- slow:    answers after `delay` seconds
A wrong X-API-KEY is answered 403 `Wrong "apiKey" value.` Every request is recorded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from tests.helpers import served

API_KEY = "crm-key-PLANTED-0123456789"
MANAGERS = {"+79990001122": {"id": 16, "firstName": "Ann", "lastName": "Lee", "code": "900"},
            "+79990003344": {"id": 77, "firstName": "Bob", "code": "512"},
            "+79990005566": {"id": 78, "firstName": "Cid"}}


@dataclass
class Seen:
    account: str
    method: str  # telephony/call/event, telephony/calls/upload, telephony/manager, credentials
    form: dict[str, Any]
    at: float


@dataclass
class FakeRetailCrm:
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    down: bool = True
    delay: float = 5.0
    uploaded: set[str] = field(default_factory=set)
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def api_url(self, account: str) -> str:
        return f"{self.url}/{account}"

    def to(self, method: str, account: str | None = None) -> list[Seen]:
        return [s for s in self.seen if s.method == method and account in (None, s.account)]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        account, _, method = request.path.strip("/").partition("/api/")
        if method.startswith("v5/"):
            method = method.removeprefix("v5/")
            if method in UNVERSIONED:  # as RetailCRM: /api/credentials has no version
                return web.json_response({"success": False, "errorMsg": "Method not found"}, status=404)
        elif method not in UNVERSIONED:
            return web.json_response({"success": False, "errorMsg": "API version is not specified"}, status=404)
        raw = parse_qs((await request.read()).decode()) if request.method == "POST" else parse_qs(request.query_string)
        form = {k: _maybe_json(v[0]) for k, v in raw.items()}
        self.seen.append(Seen(account, method, form, time.monotonic()))
        self.calls[account] += 1
        if request.headers.get("X-API-KEY") != API_KEY:
            return web.json_response({"success": False, "errorMsg": 'Wrong "apiKey" value.'}, status=403)
        match account:
            case "html":
                return web.Response(status=404, text="<html><body>Account does not exist.</body></html>",
                                    content_type="text/html")
            case "off":
                return web.json_response({"success": False, "errorMsg": "Telephony is not enabled"})
            case "bad":
                return web.json_response({"success": False, "errorMsg": "Errors in the entity format",
                                          "errors": {"phone": "This value should not be blank."}}, status=400)
            case "busy" if self.calls[account] == 1:
                return web.json_response({"success": False, "errorMsg": "Rate limit exceeded"}, status=503,
                                         headers={"Retry-After": "1"})
            case "proxy" if self.calls[account] == 1:
                return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>",
                                    content_type="text/html")
            case "down" if self.down:
                return web.json_response({"success": False, "errorMsg": "Internal error"}, status=500)
            case "flaky-upload" if method == "telephony/calls/upload" and self.calls[account + method] == 0:
                self.calls[account + method] += 1
                return web.json_response({"success": False, "errorMsg": "Internal error"}, status=500)
            case "slow":
                await asyncio.sleep(self.delay)
        return self._ok(method, form)

    def _ok(self, method: str, form: dict[str, Any]) -> web.Response:
        if method == "telephony/manager":
            manager = MANAGERS.get(str(form.get("phone")))
            if manager is None:
                return web.json_response({"success": False, "errorMsg": "Not found"}, status=404)
            return web.json_response({"success": True, "manager": manager, "customer": {}, "links": {}})
        if method == "telephony/calls/upload":
            ids = [c["externalId"] for c in form["calls"]]
            duplicates = [i for i in ids if i in self.uploaded]
            self.uploaded.update(ids)
            body: dict[str, Any] = {"success": True, "processedCallsCount": len(ids) - len(duplicates)}
            if duplicates:
                body["duplicateCalls"] = duplicates
            return web.json_response(body)
        if method == "credentials":
            return web.json_response({"success": True, "credentials": ["telephony_write", "telephony_read"],
                                      "siteAccess": "access_full"})
        return web.json_response({"success": True})


UNVERSIONED = ("credentials", "api-versions")


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


@contextlib.asynccontextmanager
async def fake_retailcrm() -> AsyncIterator[FakeRetailCrm]:
    fake = FakeRetailCrm()
    async with served(fake.handle) as url:
        fake.url = url
        yield fake
