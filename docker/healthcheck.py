"""Docker HEALTHCHECK for adpredict: exit 0 only if the server answers gRPC health SERVING.

    python healthcheck.py [HOST:PORT]

The target defaults to 127.0.0.1 and ``ADPREDICT_PORT`` (else 50051), the port the server itself
reads from that variable. The overall health (service ``""``) is checked: a server answers it
only after its models are loaded and warmed, and reports NOT_SERVING while it drains on SIGTERM.
Exit status: 0 SERVING, 1 anything else (not listening, NOT_SERVING, no answer within 2 s).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 2.0


def check(target: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """Return None if ``target`` is SERVING, else a one-line reason."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"{target}: {exc.code().name}: {exc.details()}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else f"127.0.0.1:{os.environ.get('ADPREDICT_PORT', '50051')}"
    problem = check(target)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    print(f"healthy: {target} SERVING")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
