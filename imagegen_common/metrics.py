"""Prometheus metrics for both services: a registry per app instance, served over HTTP by asyncio.

Nothing here is created at import time: each app builds its own CollectorRegistry (so several apps can run
in one process, as the tests do) and hands the metric objects to the parts that update them. The HTTP
endpoint runs on the service's own event loop, so gauges that need the database are refreshed, with a
time limit, right before a scrape is answered.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

# Unary calls take milliseconds; a Generate or WatchJob stream lives as long as a provider call (5-30 s, more
# with retries), so the buckets reach minutes.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

Refresher = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class RpcMetrics:
    """gRPC calls served (and, for JobService, made to the generator), by method and status code."""

    server_seconds: Histogram
    server_in_flight: Gauge
    client_seconds: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry) -> RpcMetrics:
        return cls(
            server_seconds=Histogram(
                "grpc_server_handling_seconds",
                "Time to handle an RPC (a whole server stream; one attempt of a GenerateMany stream), by method, code.",
                ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
                buckets=RPC_BUCKETS,
                registry=registry,
            ),
            server_in_flight=Gauge(
                "grpc_server_in_flight",
                "RPCs being handled right now.",
                ["grpc_service", "grpc_method"],
                registry=registry,
            ),
            client_seconds=Histogram(
                "grpc_client_handling_seconds",
                "Time of a call made (a whole server stream; one attempt of a GenerateMany stream), by method, code.",
                ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
                buckets=RPC_BUCKETS,
                registry=registry,
            ),
        )


GC_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class GcPauses(Collector):
    """`python_gc_pause_seconds`: how long each collection of Python's cycle collector stopped the process.

    A full collection stops the event loop for as long as it walks the heap (20-40 ms before the services froze
    their start-up objects), which shows in every latency percentile. The collector's callback runs inside the
    collection, in whatever thread allocated; it only adds to plain integers and floats (no lock, no tracked
    object), and the histogram is built when scraped.
    """

    def __init__(self) -> None:
        self._counts = [[0] * (len(GC_PAUSE_BUCKETS) + 1) for _ in range(3)]
        self._sums = [0.0, 0.0, 0.0]
        self._started = 0.0

    def attach(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def detach(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        pause = time.perf_counter() - self._started
        self._sums[generation] += pause
        self._counts[generation][bisect.bisect_left(GC_PAUSE_BUCKETS, pause)] += 1

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "python_gc_pause_seconds",
            "Time each collection of Python's cycle collector stopped the process, by generation (2 = full).",
            labels=["generation"],
        )
        for generation in range(3):
            counts, running = self._counts[generation], 0
            buckets: list[tuple[str, float]] = []
            for edge, count in zip((*GC_PAUSE_BUCKETS, float("inf")), counts, strict=True):
                running += count
                buckets.append(("+Inf" if edge == float("inf") else str(edge), running))
            family.add_metric([str(generation)], buckets, self._sums[generation])
        yield family


class MetricsServer:
    """`GET /metrics` in the Prometheus text format, on the running event loop.

    `refreshers` run before each scrape is answered (concurrent scrapes share one run), each bounded by
    `refresh_timeout`; one that fails or is slow leaves its gauges at their last values and counts in
    `imagegen_metrics_refresh_errors_total`.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        refreshers: Sequence[Refresher] = (),
        refresh_timeout: float = 2.0,
    ) -> None:
        self._registry = registry
        self._host = host
        self._port = port
        self._refreshers = list(refreshers)
        self._refresh_timeout = refresh_timeout
        self._refreshing: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        self._refresh_errors = Counter(
            "imagegen_metrics_refresh_errors",
            "Scrapes whose database-derived gauges could not be refreshed (they kept their last values).",
            registry=registry,
        )
        # The process itself, as prometheus-client serves it by default (its global registry is not used here).
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self._gc_pauses = GcPauses()
        registry.register(self._gc_pauses)

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> MetricsServer:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        self._gc_pauses.attach()
        return self

    async def stop(self) -> None:
        self._gc_pauses.detach()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def render(self) -> bytes:
        await self._refresh()
        return generate_latest(self._registry)

    async def _refresh(self) -> None:
        if not self._refreshers:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh_all())
        await asyncio.shield(self._refreshing)

    async def _refresh_all(self) -> None:
        async def one(refresh: Refresher) -> None:
            try:
                await asyncio.wait_for(refresh(), self._refresh_timeout)
            except Exception as exc:
                self._refresh_errors.inc()
                log.warning("metrics refresh failed", refresher=getattr(refresh, "__qualname__", "?"), error=repr(exc))

        await asyncio.gather(*(one(refresh) for refresh in self._refreshers))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            method, target, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, content_type, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path in ("/metrics", "/"):
                status, content_type, body = "200 OK", CONTENT_TYPE_LATEST, await self.render()
            else:
                status, content_type, body = "404 Not Found", "text/plain", b"see /metrics\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("latin-1")
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass  # a client that hung up or sent nonsense: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
