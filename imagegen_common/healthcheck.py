"""`python -m imagegen_common.healthcheck HOST:PORT`: exit 0 when the server's grpc.health.v1 says SERVING.

For container health checks (docker compose, Kubernetes exec probes) without grpcurl in the image. With TLS,
pass --ca (and --cert/--key where the server wants a client certificate); `--service` checks one service's
status instead of the server's overall one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagegen_common.transport import channel_credentials


def check(
    target: str,
    *,
    service: str = "",
    timeout: float = 3.0,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    server_name: str | None = None,
) -> str:
    """The status name (SERVING, NOT_SERVING, ...), or UNREACHABLE: <why>."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = (
        grpc.secure_channel(target, channel_credentials(ca, cert, key), options=options)
        if ca
        else grpc.insecure_channel(target)
    )
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as error:
            return f"UNREACHABLE: {error.code().name} {error.details()}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagegen_common.healthcheck", description=__doc__)
    parser.add_argument("target", help="host:port of a JobService or GeneratorService")
    parser.add_argument("--service", default="", help="a service name; default: the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    parser.add_argument("--ca", type=Path, help="CA certificate (PEM): connect with TLS")
    parser.add_argument("--cert", type=Path, help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--key", type=Path, help="client key (PEM), for mutual TLS")
    parser.add_argument("--server-name", help="the name to expect in the server's certificate")
    args = parser.parse_args(argv)
    status = check(
        args.target,
        service=args.service,
        timeout=args.timeout,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        server_name=args.server_name,
    )
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
