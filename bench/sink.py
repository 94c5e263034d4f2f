"""A fast HTTP sink for benchmarks: raw asyncio (uvloop), HTTP/1.1 keep-alive, answers every
request with a fixed status. Run in its own process:

    python -m pgdispatch.bench.sink --port 8099 --status 202 [--delay 0.5] [--record FILE]

With --record, it keeps each arrival time and the most requests it held at once, and writes
them as JSON to FILE when it stops (the limits scenario counts rates and caps there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Record:
    arrivals: list[float] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0


class SinkProtocol(asyncio.Protocol):
    def __init__(self, response: bytes, delay: float, record: Record | None = None) -> None:
        self.response = response
        self.delay = delay
        self.record = record
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").lower()
            length = 0
            for line in head.split("\r\n"):
                if line.startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            if self.record is not None:
                self.record.arrivals.append(time.time())
                self.record.in_flight += 1
                self.record.most_in_flight = max(self.record.most_in_flight, self.record.in_flight)
            if self.delay:
                asyncio.get_running_loop().call_later(self.delay, self._answer)
            else:
                self._answer()

    def _answer(self) -> None:
        if self.record is not None:
            self.record.in_flight -= 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.response)


async def serve(port: int, status: int, delay: float, record_to: str | None = None) -> None:
    response = (f"HTTP/1.1 {status} OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n"
                f"Connection: keep-alive\r\n\r\nok").encode()
    loop = asyncio.get_running_loop()
    record = Record() if record_to else None
    server = await loop.create_server(lambda: SinkProtocol(response, delay, record), "127.0.0.1", port,
                                      backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"sink listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await stop.wait()
    if record is not None and record_to:
        await asyncio.to_thread(Path(record_to).write_text, json.dumps({
            "arrivals": record.arrivals, "most_in_flight": record.most_in_flight}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--status", type=int, default=202)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--record")
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.status, args.delay, args.record))


if __name__ == "__main__":
    main()
