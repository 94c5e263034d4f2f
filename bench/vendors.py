"""Local stand-ins for the lead channels' APIs, with their published limits enforced, for the
leads scenario. Run in its own process:

    python -m pgdispatch.bench.vendors --port 8098 --record FILE

- POST /hook/...: a webhook receiver, always 200.
- POST /bot<token>/sendMessage: Telegram; more than 30 messages in one second to a bot is
  answered 429 with retry_after, as Telegram does.
- POST /rest/<user>/<code>/crm.lead.add.json: Bitrix24; a leaky bucket per portal (webhook
  code) that holds 50 and drains 2 per second; a request that finds it full is answered 503
  QUERY_LIMIT_EXCEEDED.

On SIGTERM it writes to FILE, as JSON, per channel: requests accepted and requests refused for
a limit (each refusal is a vendor limit the sender did not respect).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections import defaultdict, deque
from pathlib import Path

from aiohttp import web

TELEGRAM_PER_SECOND = 30
BITRIX_BUCKET, BITRIX_DRAIN = 50, 2.0


class Vendors:
    def __init__(self) -> None:
        self.accepted: dict[str, int] = defaultdict(int)
        self.refused: dict[str, int] = defaultdict(int)
        self._bots: dict[str, deque[float]] = defaultdict(deque)
        self._portals: dict[str, tuple[float, float]] = {}  # code -> (level, when)

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        parts = request.path.strip("/").split("/")
        now = time.monotonic()
        if parts[0] == "hook":
            return self._ok("webhooks", web.json_response({"ok": True}))
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
    args.record.write_text(json.dumps({"accepted": vendors.accepted, "refused": vendors.refused}))


if __name__ == "__main__":
    main()
