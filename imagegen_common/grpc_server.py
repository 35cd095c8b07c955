"""What both gRPC servers have in common: health, reflection, TLS and binding to a port."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

# Keepalive policy. Clients (JobService -> generator in particular) ping every ~10 s so a dead peer is
# noticed in seconds; gRPC's default policy answers pings more often than every 5 minutes with a
# GOAWAY "too_many_pings", which kills every stream on the connection, including a 30 s Generate.
# The server pings idle clients too, to drop connections whose peer vanished without closing them.
KEEPALIVE_SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)

# grpc-core cancels (CANCELLED, no message) calls that arrive while more than 1,000 wait for the Python
# server to pick them up, as a burst of thousands of CreateJob and WatchJob calls does: 2,000 jobs
# submitted at once lost 7-9 % of their CreateJobs that way. They are cheap once picked up; queue them.
BURST_SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.server.max_pending_requests", 20_000),)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS listener; with `client_ca` set, clients must present a certificate it signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
            require_client_auth=self.client_ca is not None,
        )


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: Sequence[str]

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Reports NOT_SERVING (so balancers drain first), then lets in-flight RPCs finish within `grace`."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    *,
    add_servicers: Sequence[Callable[[grpc.aio.Server], None]],
    service_names: Sequence[str],
    host: str,
    port: int,
    tls: TlsFiles | None,
    interceptors: Sequence[Any] = (),
    options: Sequence[tuple[str, Any]] = (),
) -> RunningServer:
    """Starts a grpc.aio server with health and reflection; port 0 picks a free port (tests)."""
    server = grpc.aio.server(
        interceptors=list(interceptors), options=[*KEEPALIVE_SERVER_OPTIONS, *BURST_SERVER_OPTIONS, *options]
    )
    for add in add_servicers:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, tls.server_credentials()) if tls else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    running = RunningServer(server, bound, health_servicer, service_names)
    await running.set_serving(True)
    return running
