"""The floor of a refusal as a Python client sees it: round trips of calls the server answers
without any work, on an otherwise idle server.

    taskset -c 0 .venv/bin/python -m adpredict serve --frontend native --model-dir models &
    taskset -c 1 .venv/bin/python benchmarks/probe_roundtrip.py --target localhost:50051

Each call is to a method the server does not have (``/probe.Nothing/Call``): the native intake
answers UNIMPLEMENTED from its own thread, as it answers an overload refusal, so the time is
loopback, both gRPC stacks and the thread wake-ups between them, nothing of the model. Measured
with grpcio's blocking client and with grpc.aio (what ``adpredict loadtest`` uses), each with
``--gap-ms`` between calls (threads sleep between calls, as at moderate load) and back to back.
Why: bench_overload's refusal latency from the client's send includes this floor; the server's
own part is in ``adpredict_request_duration_seconds`` (model=""). Prints p50 / p90 / p99 ms;
nothing is written.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc
import numpy as np

METHOD = "/probe.Nothing/Call"


def _expect_unimplemented(exc: grpc.RpcError, target: str) -> None:
    """The answer every probe call must get; anything else means a wrong --target."""
    if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
        raise SystemExit(f"--target {target}: {exc.code().name} {exc.details()}") from None


def blocking(target: str, calls: int, gap_s: float) -> np.ndarray:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        out = []
        for _ in range(calls):
            t0 = time.monotonic()
            try:
                call(b"", timeout=5.0)
            except grpc.RpcError as exc:
                _expect_unimplemented(exc, target)
            out.append(time.monotonic() - t0)
            if gap_s:
                time.sleep(gap_s)
    return np.array(out)


async def asyncio_client(target: str, calls: int, gap_s: float) -> np.ndarray:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        out = []
        for _ in range(calls):
            t0 = time.monotonic()
            try:
                await call(b"", timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                _expect_unimplemented(exc, target)
            out.append(time.monotonic() - t0)
            if gap_s:
                await asyncio.sleep(gap_s)
    return np.array(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="localhost:50051")
    p.add_argument("--calls", type=int, default=500, help="per measurement (500)")
    p.add_argument("--gap-ms", type=float, default=5.0, help="pause between calls (5)")
    args = p.parse_args()
    if args.calls < 20 or args.gap_ms < 0:
        p.error("--calls must be >= 20 and --gap-ms >= 0")
    warm = 10  # the first calls connect and warm up
    runs = {
        f"blocking, {args.gap_ms:g} ms apart": lambda: blocking(
            args.target, args.calls + warm, args.gap_ms / 1e3
        ),
        f"grpc.aio, {args.gap_ms:g} ms apart": lambda: asyncio.run(
            asyncio_client(args.target, args.calls + warm, args.gap_ms / 1e3)
        ),
        "blocking, back to back": lambda: blocking(args.target, args.calls + warm, 0.0),
    }
    for label, measure in runs.items():
        ms = measure()[warm:] * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        print(f"{label:28s} p50 {p50:.3f}  p90 {p90:.3f}  p99 {p99:.3f} ms  ({len(ms)} calls)")


if __name__ == "__main__":
    main()
