"""adpredict.client: request building, example requests, and round trips against a real server."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from adpredict.client import (
    AsyncPredictionClient,
    PredictionClient,
    build_request,
    example_request,
    predict_example,
)
from adpredict.errors import InvalidRequestError, ModelNotFoundError, RequestError
from adpredict.schema import Schema, load_schema
from adpredict.serving.batcher import BatcherOptions
from adpredict.serving.codec import RequestCodec
from adpredict.serving.runtime import ModelRuntime
from adpredict.serving.service import PredictionServicer

SMALL_SCHEMA = Path(__file__).parent / "fixtures" / "rtb_small.toml"


# ------------------------------------------------------------------------- building requests


@pytest.mark.parametrize("spec", ["rtb", "criteo", str(SMALL_SCHEMA)])
@pytest.mark.parametrize("k", [1, 32, 300])
def test_example_request_is_valid_for_its_schema(spec: str, k: int) -> None:
    schema = load_schema(spec)
    ex = example_request(schema, k=k, seed=3)
    assert len(ex.candidates) == k
    assert set(ex.context) == {f.name for f in schema.context_fields}
    parsed = RequestCodec(schema).decode(build_request(ex.context, ex.candidates))
    assert parsed.size == k
    assert parsed.missing == 0


def test_example_request_looks_like_the_synthetic_data_and_is_deterministic() -> None:
    schema = load_schema("rtb")
    ex = example_request(schema, k=50, seed=1)
    assert ex == example_request(schema, k=50, seed=1)
    assert ex != example_request(schema, k=50, seed=2)
    assert ex.context["site_domain"].startswith("site") and ex.context["site_domain"].endswith(
        ".example"
    )
    assert ex.context["exchange"] in {"adx", "openx", "pubmatic", "magnite", "index", "xandr",
                                      "sovrn", "triplelift"}  # fmt: skip
    assert ex.context["country"].startswith("C") and len(ex.context["country"]) == 4
    assert 0 <= int(ex.context["hour_of_day"]) < 24
    assert all(s.startswith("seg-") for s in ex.context["user_segments"])
    assert all(c["creative_id"].startswith("cr-") for c in ex.candidates)
    assert all(float(c["bid_cpm"]) > 0 for c in ex.candidates)
    assert len({c["creative_id"] for c in ex.candidates}) > 5  # not one ad repeated


def test_build_request_lays_out_columns() -> None:
    request = build_request(
        {"site": "a.com", "segs": ["s1", "s2"], "temp": 21.5},
        [
            {"ad": "x", "tags": ["t1", "t2"], "bid": 1.25},
            {"tags": "t3"},
            {"ad": b"z", "bid": "3"},
        ],
        model="m",
        request_id="r1",
    )
    assert (request.model, request.request_id, request.num_candidates) == ("m", "r1", 3)
    assert list(request.context["site"].values) == [b"a.com"]
    assert list(request.context["segs"].values) == [b"s1", b"s2"]
    assert list(request.context["temp"].values) == [b"21.5"]
    assert list(request.candidates["ad"].values) == [b"x", b"", b"z"]
    assert list(request.candidates["ad"].counts) == []
    assert list(request.candidates["bid"].values) == [b"1.25", b"", b"3"]
    assert list(request.candidates["tags"].values) == [b"t1", b"t2", b"t3"]
    assert list(request.candidates["tags"].counts) == [2, 1, 0]


def test_build_request_refuses_values_it_cannot_encode() -> None:
    with pytest.raises(TypeError, match="candidates\\['ad'\\]"):
        build_request({}, [{"ad": None}])  # type: ignore[dict-item]


# ------------------------------------------------------------------------------ round trips


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_asyncio.fixture
async def target(small_model_root: Path) -> AsyncIterator[str]:
    runtime = ModelRuntime(small_model_root, poll_interval_s=3600.0, warmup_batches=1)
    await runtime.start()
    servicer = PredictionServicer(
        runtime, BatcherOptions(max_wait_s=0.001), sla_s=5.0, max_candidates=256
    )
    server = grpc.aio.server()
    servicer.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await servicer.close(1.0)
        await server.stop(None)
        await runtime.stop()


@pytest.mark.asyncio
async def test_async_client_round_trip(target: str) -> None:
    schema = load_schema(SMALL_SCHEMA)
    ex = example_request(schema, k=16, seed=0)
    async with AsyncPredictionClient(target, timeout_s=10.0) as client:
        info = await client.metadata()
        result = await client.predict(ex.context, ex.candidates, request_id="abc")
        with pytest.raises(InvalidRequestError, match="candidates\\['nope'\\]"):
            await client.predict(ex.context, [{**c, "nope": "1"} for c in ex.candidates])
        with pytest.raises(ModelNotFoundError, match="'other'"):
            await client.predict(ex.context, ex.candidates, model="other")
    assert isinstance(info.schema, Schema)
    assert info.schema.to_dict() == schema.to_dict()
    assert info.schema_fingerprint == schema.fingerprint() == info.schema.fingerprint()
    assert (info.model, info.version, info.max_candidates) == ("small", 1, 256)
    assert "holdout" in info.metrics
    json.dumps(info.to_dict())
    assert len(result.probabilities) == 16
    assert all(0.0 < p < 1.0 for p in result.probabilities)
    assert (result.model, result.version, result.request_id) == ("small", 1, "abc")
    assert result.compute_us > 0


@pytest.mark.asyncio
async def test_sync_client_and_predict_example(target: str) -> None:
    """The blocking client runs in a thread: the server lives on this test's event loop."""
    schema = load_schema(SMALL_SCHEMA)
    ex = example_request(schema, k=8, seed=5)

    def use_sync_client() -> tuple[list[float], list[float]]:
        with PredictionClient(target, timeout_s=10.0) as client:
            first = client.predict(ex.context, ex.candidates).probabilities
            again = client.predict_request(build_request(ex.context, ex.candidates))
            return first, again.probabilities

    first, again = await asyncio.to_thread(use_sync_client)
    assert len(first) == 8 and first == again

    answer = await asyncio.to_thread(predict_example, target, k=300)
    json.dumps(answer)
    assert answer["model"] == "small" and answer["version"] == 1
    assert answer["candidates"] == 256  # capped at the server's max_candidates
    assert len(answer["predictions"]) == 256
    assert all(0.0 < p["probability"] < 1.0 for p in answer["predictions"])


def test_unreachable_server_is_a_request_error() -> None:
    client = PredictionClient(f"127.0.0.1:{_free_port()}", timeout_s=2.0)
    with client, pytest.raises(RequestError, match="UNAVAILABLE") as info:
        client.metadata()
    assert isinstance(info.value.__cause__, grpc.RpcError)
