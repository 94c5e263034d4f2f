"""A fast HTTP sink for benchmarks: raw asyncio (uvloop), HTTP/1.1 keep-alive, answers every
request with a fixed status and records nothing but a count. Run in its own process:

    python -m bench.sink --port 8099 --status 202 [--delay 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import signal


class SinkProtocol(asyncio.Protocol):
    def __init__(self, response: bytes, delay: float) -> None:
        self.response = response
        self.delay = delay
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
            if self.delay:
                asyncio.get_running_loop().call_later(self.delay, self._answer)
            else:
                self._answer()

    def _answer(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.response)


async def serve(port: int, status: int, delay: float) -> None:
    response = (f"HTTP/1.1 {status} OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n"
                f"Connection: keep-alive\r\n\r\nok").encode()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(response, delay), "127.0.0.1", port,
                                      backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"sink listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--status", type=int, default=202)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    import uvloop

    uvloop.run(serve(args.port, args.status, args.delay))


if __name__ == "__main__":
    main()
