"""A local image provider speaking Imagen's `:predict` wire format, with configurable latency per model.

`python -m bench.provider '<json config>'` serves, on 127.0.0.1:<port>:

- `POST /v1beta/models/{model}:predict` (the Gemini API shape the gemini-imagen provider calls):
  request  {"instances": [{"prompt"}], "parameters": {"sampleCount", "aspectRatio", "sampleImageSize", ...}}
  response {"predictions": [{"bytesBase64Encoded", "mimeType"}, ...]}, after a latency drawn uniformly from
  the model's [min, max] seconds. Images are cached PNGs of exactly the size the generator expects for the
  aspect ratio and size (bench.images), so the answer costs this process almost nothing.
- `GET /bench/sent`: {prompt: unix time the answer was written} for every answered prompt (fan-out timing).
- `GET /bench/stats`: requests, answers, peak concurrent requests, the longest latency applied.

It is a minimal HTTP/1.1 server on asyncio streams (keep-alive, Content-Length bodies), which is all that
httpx sends; anything it cannot parse closes the connection.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sys
import time
from typing import Any

import uvloop

from bench.images import image_bytes
from generator_service.domain import image_dimensions


class Provider:
    def __init__(self, models: dict[str, list[float]]) -> None:
        self.models = models  # model -> [min latency, max latency] in seconds
        self._bodies: dict[tuple[int, int, int, str], bytes] = {}
        self.sent: dict[str, float] = {}
        self.requests = 0
        self.answered = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.max_latency = 0.0

    def body(self, width: int, height: int, count: int, mime_type: str) -> bytes:
        key = (width, height, count, mime_type)
        body = self._bodies.get(key)
        if body is None:
            predictions = [
                {
                    # Large images: one picture repeated (each costs seconds to make the first time).
                    "bytesBase64Encoded": base64.b64encode(
                        image_bytes(width, height, i % 4 if max(width, height) < 1792 else 0, mime_type)
                    ).decode(),
                    "mimeType": mime_type,
                }
                for i in range(count)
            ]
            body = self._bodies[key] = json.dumps({"predictions": predictions}).encode()
        return body

    def warm(self, sizes: list[tuple[str, str]]) -> None:
        for aspect_ratio, image_size in sizes:
            width, height = image_dimensions(aspect_ratio, image_size)
            self.body(width, height, 4, "image/png")

    async def predict(self, model: str, request: dict[str, Any]) -> tuple[int, bytes, str]:
        latency_range = self.models.get(model)
        if latency_range is None:
            error = {"error": {"code": 404, "message": f"model {model} not found", "status": "NOT_FOUND"}}
            return 404, json.dumps(error).encode(), ""
        parameters = request.get("parameters") or {}
        prompt = str((request.get("instances") or [{}])[0].get("prompt", ""))
        count = int(parameters.get("sampleCount", 4))
        size = "2K" if parameters.get("sampleImageSize") == "2K" else "1K"
        mime_type = (parameters.get("outputOptions") or {}).get("mimeType", "image/png")
        width, height = image_dimensions(parameters.get("aspectRatio", "1:1"), size)
        body = self.body(width, height, count, mime_type)
        low, high = latency_range
        latency = random.uniform(low, high) if high > 0 else 0.0
        if latency > 0:
            await asyncio.sleep(latency)
        self.max_latency = max(self.max_latency, latency)
        return 200, body, prompt

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "answered": self.answered,
            "peak_in_flight": self.peak_in_flight,
            "max_latency_seconds": self.max_latency,
        }


async def handle(provider: Provider, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path, _version = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            raw = await reader.readexactly(length) if length else b""
            prompt = ""
            if method == "POST" and path.endswith(":predict"):
                model = path.rsplit("/", 1)[-1].removesuffix(":predict")
                provider.requests += 1
                provider.in_flight += 1
                provider.peak_in_flight = max(provider.peak_in_flight, provider.in_flight)
                try:
                    status, body, prompt = await provider.predict(model, json.loads(raw))
                finally:
                    provider.in_flight -= 1
            elif path == "/bench/sent":
                status, body = 200, json.dumps(provider.sent).encode()
            elif path == "/bench/stats":
                status, body = 200, json.dumps(provider.stats()).encode()
            else:
                status, body = 404, b'{"error": {"code": 404, "message": "no such path", "status": "NOT_FOUND"}}'
            writer.write(
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            )
            if prompt:
                provider.sent[prompt] = time.time()
                provider.answered += 1
            writer.write(body)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def main(config: dict[str, Any]) -> None:
    provider = Provider({name: list(r) for name, r in config["models"].items()})
    provider.warm([(s[0], s[1]) for s in config.get("warm", [])])
    server = await asyncio.start_server(
        lambda r, w: handle(provider, r, w), "127.0.0.1", int(config.get("port", 0)), backlog=4096
    )
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port}), flush=True)  # the bench reads the port from the first line
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(json.loads(sys.argv[1])))
