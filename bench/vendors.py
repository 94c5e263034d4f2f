"""Local stand-ins for the lead channels' APIs, with their published limits enforced, for the
leads scenario. Run in its own process:

    python -m pgdispatch.bench.vendors --port 8098 --record FILE

- POST /hook/...: a webhook receiver, always 200.
- POST /bot<token>/sendMessage: Telegram; more than 30 messages in one second to a bot is
  answered 429 with retry_after, as Telegram does.
- POST /rest/<user>/<code>/crm.lead.add.json: Bitrix24; a leaky bucket per portal (webhook
  code) that holds 50 and drains 2 per second; a request that finds it full is answered 503
  QUERY_LIMIT_EXCEEDED.
- POST /crm/<account>/api/v5/telephony/(call/event|calls/upload): RetailCRM; more than 10
  requests in one second with one API key are answered 503 "Rate limit exceeded".
- POST /calls/<enterprise>: a call-event webhook receiver, always 200.

On SIGTERM it writes to FILE, as JSON, per channel: requests accepted and requests refused for
a limit (each refusal is a vendor limit the sender did not respect), and for call events the
seconds from each event to its arrival (the call's id carries the time it was sent:
`ID@EPOCH_SECONDS`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections import defaultdict, deque
from pathlib import Path
from urllib.parse import parse_qs

from aiohttp import web

TELEGRAM_PER_SECOND = 30
BITRIX_BUCKET, BITRIX_DRAIN = 50, 2.0
RETAILCRM_PER_SECOND = 10


class Vendors:
    def __init__(self) -> None:
        self.accepted: dict[str, int] = defaultdict(int)
        self.refused: dict[str, int] = defaultdict(int)
        self._bots: dict[str, deque[float]] = defaultdict(deque)
        self._portals: dict[str, tuple[float, float]] = {}  # code -> (level, when)
        self._keys: dict[str, deque[float]] = defaultdict(deque)
        self.latencies: dict[str, list[float]] = defaultdict(list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        parts = request.path.strip("/").split("/")
        now = time.monotonic()
        if parts[0] == "hook":
            return self._ok("webhooks", web.json_response({"ok": True}))
        if parts[0] == "calls":
            self._arrived("webhook", json.loads(body)["data"]["call_unique_id"])
            return self._ok("webhook", web.json_response({"ok": True}))
        if parts[0] == "crm" and parts[-2:] in (["call", "event"], ["calls", "upload"]):
            sent = self._keys[request.headers.get("X-API-KEY", "")]
            while sent and sent[0] <= now - 1.0:
                sent.popleft()
            if len(sent) >= RETAILCRM_PER_SECOND:
                self.refused["retailcrm"] += 1
                return web.json_response({"success": False, "errorMsg": "Rate limit exceeded"}, status=503)
            sent.append(now)
            form = parse_qs(body.decode())
            call = json.loads(form["event"][0])["callExternalId"] if "event" in form else \
                json.loads(form["calls"][0])[0]["externalId"]
            self._arrived("retailcrm", call)
            return self._ok("retailcrm", web.json_response({"success": True}))
        if parts[0].startswith("bot") and parts[-1] == "sendMessage":
            sent = self._bots[parts[0]]
            while sent and sent[0] <= now - 1.0:
                sent.popleft()
            if len(sent) >= TELEGRAM_PER_SECOND:
                self.refused["telegram"] += 1
                return web.json_response({"ok": False, "error_code": 429, "description": "Too Many Requests: "
                                          "retry after 1", "parameters": {"retry_after": 1}}, status=429)
            sent.append(now)
            return self._ok("telegram", web.json_response({"ok": True, "result": {"message_id": 1}}))
        if parts[0] == "rest" and parts[-1] == "crm.lead.add.json":
            level, when = self._portals.get(parts[2], (0.0, now))
            level = max(0.0, level - (now - when) * BITRIX_DRAIN)
            if level + 1 > BITRIX_BUCKET:
                self._portals[parts[2]] = (level, now)
                self.refused["bitrix24"] += 1
                return web.json_response({"error": "QUERY_LIMIT_EXCEEDED",
                                          "error_description": "Too many requests"}, status=503)
            self._portals[parts[2]] = (level + 1, now)
            return self._ok("bitrix24", web.json_response({"result": 1, "time": {}}))
        return web.Response(status=404)

    def _arrived(self, crm: str, call_unique_id: str) -> None:
        sent_at = call_unique_id.rpartition("@")[2]
        if sent_at:
            self.latencies[crm].append(time.time() - float(sent_at))

    def _ok(self, channel: str, response: web.Response) -> web.Response:
        self.accepted[channel] += 1
        return response


async def serve(port: int) -> Vendors:
    vendors = Vendors()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", vendors.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"vendors listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    return vendors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    args = parser.parse_args()
    vendors = asyncio.run(serve(args.port))
    args.record.write_text(json.dumps({"accepted": vendors.accepted, "refused": vendors.refused,
                                       "latencies": vendors.latencies}))


if __name__ == "__main__":
    main()
