"""Fixtures shared by the serving tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
import pytest

from adpredict.serving import intake
from adpredict.serving.batcher import BatcherOptions
from adpredict.serving.service import PredictionServicer, ServiceObserver

#: Skip the native front end's tests where it is not built; under CI (``.ci/run`` sets CI=true,
#: and ``make test`` builds it) a missing build fails them instead.
NATIVE_MISSING = pytest.mark.skipif(
    not intake.available() and os.environ.get("CI") != "true",
    reason=f"native intake not built: {intake.unavailable_reason()}",
)
#: Both front ends.
FRONTENDS = ["grpcio", pytest.param("native", marks=NATIVE_MISSING)]

BareServicer = Callable[..., AbstractAsyncContextManager[tuple[str, PredictionServicer]]]


def _bare_servicer(frontend: str) -> BareServicer:
    @contextlib.asynccontextmanager
    async def serve(
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
        if frontend == "native":
            native = intake.NativeFrontend(
                servicer, address="127.0.0.1:0", max_pending=100_000, max_message_bytes=4 << 20
            )
            port = await native.start()
            native.set_serving(True)
            await servicer.start()
            try:
                yield f"127.0.0.1:{port}", servicer
            finally:
                await native.stop(1.0)
                await servicer.close(1.0)
            return
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

    return serve


@pytest.fixture(scope="module", params=FRONTENDS)
def frontend(request: pytest.FixtureRequest) -> str:
    """Each front end in turn: ``grpcio`` (grpc.aio) and ``native`` (the C++ intake)."""
    return request.param


@pytest.fixture
def bare_servicer(frontend: str) -> BareServicer:
    """``async with bare_servicer(runtime, options, observer, sla_s=, max_candidates=) as
    (target, servicer)``: the servicer alone (no health, no model polling) on 127.0.0.1:<any>,
    served by each front end in turn, for runtimes a test wraps (slow, faulty, counting)."""
    return _bare_servicer(frontend)
