"""The ceiling: a bare grpc.aio unary server that returns the request bytes, on uvloop like the services.

`python -m bench.echo <port>` serves `/bench.Echo/Echo` (raw bytes in, the same bytes out: no protobuf
parsing, no interceptors, no logging). Whatever calls/s the load generator reaches against it is the most
any Python gRPC service on this machine can answer with that load generator.
"""

from __future__ import annotations

import sys
from typing import Any

import grpc
import uvloop

METHOD = "/bench.Echo/Echo"


async def _echo(request: bytes, _context: Any) -> bytes:
    return request


async def main(port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f'{{"port": {bound}}}', flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
