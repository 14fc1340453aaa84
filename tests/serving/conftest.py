"""Fixtures shared by the serving tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
import pytest

from adpredict.serving.batcher import BatcherOptions
from adpredict.serving.service import PredictionServicer, ServiceObserver

BareServicer = Callable[..., AbstractAsyncContextManager[tuple[str, PredictionServicer]]]


@contextlib.asynccontextmanager
async def _bare_servicer(
    runtime: Any,
    options: BatcherOptions,
    observer: ServiceObserver | None = None,
    *,
    sla_s: float = 5.0,
    max_candidates: int = 512,
) -> AsyncIterator[tuple[str, PredictionServicer]]:
    servicer = PredictionServicer(
        runtime, options, sla_s=sla_s, max_candidates=max_candidates, observer=observer
    )
    server = grpc.aio.server()
    servicer.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await servicer.close(1.0)
        await server.stop(None)


@pytest.fixture
def bare_servicer() -> BareServicer:
    """``async with bare_servicer(runtime, options, observer, sla_s=, max_candidates=) as
    (target, servicer)``: the servicer alone (no health, no model polling) on a grpc.aio server
    on 127.0.0.1:<any>, for runtimes a test wraps (slow, faulty, counting)."""
    return _bare_servicer
