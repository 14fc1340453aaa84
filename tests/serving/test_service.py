"""PredictionServicer on a real grpc.aio server (loopback, ephemeral port) with the trained model.

Answers are compared with the SavedModel's own outputs for the same raw features, computed
here without the codec. Batching is made deterministic by configuration, not by sleeping: with
``max_wait_s`` far beyond the test and ``max_batch_size`` equal to the total load, a batch can
only close when every request is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
import tensorflow as tf

from adpredict.client import ExampleRequest, build_request, example_request
from adpredict.model.export import METADATA_FILE, SIGNATURE, load_signature
from adpredict.schema import Schema
from adpredict.serving.batcher import BatcherOptions
from adpredict.serving.runtime import ModelRuntime
from adpredict.serving.service import (
    Outcome,
    PendingPredict,
    PredictionServicer,
    ServiceObserver,
)
from adpredict.v1 import prediction_service_pb2 as pb
from adpredict.v1 import prediction_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.asyncio(loop_scope="module")

RPC_TIMEOUT_S = 20.0
NEVER_S = 60.0  # a max_wait no test reaches: batches close only when full
INVALID = grpc.StatusCode.INVALID_ARGUMENT


# -------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, small_model_root: Path) -> Path:
    root = tmp_path_factory.mktemp("service") / "models"
    shutil.copytree(small_model_root, root)
    return root


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runtime(repo: Path) -> AsyncIterator[ModelRuntime]:
    rt = ModelRuntime(repo, poll_interval_s=3600.0, warmup_batches=1)
    await rt.start()
    yield rt
    await rt.stop()


@pytest.fixture(scope="module")
def direct(small_model_root: Path) -> tuple[Any, Schema]:
    """The exported signature, loaded on its own, and its schema."""
    fn, schema, _ = load_signature(small_model_root / "small" / "1")
    return fn, schema


def _b(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def direct_probabilities(direct: tuple[Any, Schema], example: ExampleRequest) -> np.ndarray:
    """The SavedModel's answer for one request's raw features (absent fields -> b'')."""
    fn, schema = direct
    feed: dict[str, np.ndarray] = {}
    for f in schema.context_fields:
        value = example.context.get(f.name, "")
        if f.is_multi:
            feed[f.name] = np.array([[_b(v) for v in value] or [b""]], dtype=object)
        else:
            feed[f.name] = np.array([_b(value)], dtype=object)
    for f in schema.candidate_fields:
        feed[f.name] = np.array([_b(c.get(f.name, "")) for c in example.candidates], dtype=object)
    feed["request_index"] = np.zeros(len(example.candidates), np.int32)
    return fn(**{k: tf.constant(v) for k, v in feed.items()})["probability"].numpy()


class CountingRuntime:
    """The real runtime, with every compute call's size recorded (and optionally slowed), and
    its layout and version in ``fed``. With ``gate``, the first call holds its batch until the
    test sets it (``entered`` says it got there)."""

    def __init__(
        self, runtime: ModelRuntime, delay_s: float = 0.0, gate: threading.Event | None = None
    ) -> None:
        self.runtime = runtime
        self.delay_s = delay_s
        self.gate = gate
        self.entered = threading.Event()
        self.calls: list[int] = []
        self.fed: list[tuple[bool, int]] = []  # (fed table rows?, version) per call

    def get(self, name: str = "") -> Any:
        return _CountingModel(self.runtime.get(name), self)

    def names(self) -> list[str]:
        return self.runtime.names()


class _CountingModel:
    def __init__(self, model: Any, owner: CountingRuntime) -> None:
        self._model = model
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def predict(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        owner = self._owner
        owner.calls.append(len(feed["request_index"]))
        owner.fed.append(("context_rows" in feed, self._model.version))
        if owner.gate is not None and not owner.entered.is_set():
            owner.entered.set()
            assert owner.gate.wait(60), "the test never opened the gate"
        if owner.delay_s:
            time.sleep(owner.delay_s)  # a slow model, not synchronisation
        return self._model.predict(feed)


class Recorder(ServiceObserver):
    def __init__(self) -> None:
        self.decoded: list[tuple[str, int, int]] = []
        self.done: list[tuple[str, str, grpc.StatusCode]] = []

    def request_decoded(self, model: str, candidates: int, missing: int) -> None:
        self.decoded.append((model, candidates, missing))

    def request_done(self, method: str, model: str, code: grpc.StatusCode, seconds: float) -> None:
        self.done.append((method, model, code))


@contextlib.asynccontextmanager
async def serving(
    runtime: Any,
    options: BatcherOptions | None = None,
    *,
    sla_s: float = 5.0,
    max_candidates: int = 512,
    server_options: Sequence[tuple[str, Any]] = (),
    observer: ServiceObserver | None = None,
) -> AsyncIterator[tuple[pb_grpc.PredictionServiceStub, PredictionServicer]]:
    """A started server on 127.0.0.1:<ephemeral> and a stub connected to it."""
    servicer = PredictionServicer(
        runtime,
        options or BatcherOptions(max_wait_s=0.001),
        sla_s=sla_s,
        max_candidates=max_candidates,
        observer=observer,
    )
    server = grpc.aio.server(options=list(server_options))
    servicer.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.PredictionServiceStub(channel), servicer
    finally:
        await channel.close()
        await servicer.close(1.0)
        await server.stop(None)


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def example(schema: Schema, k: int, seed: int, drop: Sequence[str] = ()) -> ExampleRequest:
    ex = example_request(schema, k=k, seed=seed)
    context = {n: v for n, v in ex.context.items() if n not in drop}
    candidates = [{n: v for n, v in c.items() if n not in drop} for c in ex.candidates]
    return ExampleRequest(context, candidates)


def to_proto(ex: ExampleRequest, **kwargs: str) -> pb.PredictRequest:
    return build_request(ex.context, ex.candidates, **kwargs)


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("k", [1, 32, 300])
async def test_answers_equal_the_saved_model(
    runtime: ModelRuntime, direct: tuple[Any, Schema], k: int
) -> None:
    schema = direct[1]
    recorder = Recorder()
    # Two fields absent everywhere: they travel as "missing" and are counted.
    ex = example(schema, k, seed=k, drop=("region", "landing_domain"))
    async with serving(runtime, observer=recorder) as (stub, _):
        response = await stub.Predict(to_proto(ex, request_id=f"req-{k}"), timeout=RPC_TIMEOUT_S)
    expected = direct_probabilities(direct, ex)
    assert len(response.probabilities) == k
    np.testing.assert_allclose(np.array(response.probabilities), expected, rtol=0, atol=1e-6)
    assert response.request_id == f"req-{k}"
    assert response.model == "small"  # "" resolved to the runtime's default model
    assert response.model_version == runtime.get("small").version
    assert response.compute_us > 0
    assert response.batch_predictions == k and response.batch_requests == 1
    assert recorder.decoded == [("small", k, 1 + k)]
    assert recorder.done == [("Predict", "small", grpc.StatusCode.OK)]


async def test_concurrent_requests_are_merged_and_each_gets_its_own_answer(
    runtime: ModelRuntime, direct: tuple[Any, Schema]
) -> None:
    n, k = 50, 8
    counting = CountingRuntime(runtime)
    options = BatcherOptions(max_batch_size=n * k, max_wait_s=NEVER_S)
    examples = [example(direct[1], k, seed=100 + i) for i in range(n)]
    async with serving(counting, options) as (stub, _):
        responses = await asyncio.gather(
            *(stub.Predict(to_proto(ex), timeout=RPC_TIMEOUT_S) for ex in examples)
        )
    assert counting.calls == [n * k]  # one compute call for all 50 requests
    for ex, response in zip(examples, responses, strict=True):
        np.testing.assert_allclose(
            np.array(response.probabilities), direct_probabilities(direct, ex), rtol=0, atol=1e-6
        )
        assert response.batch_requests == n and response.batch_predictions == n * k


async def test_start_and_finish_predict_answer_without_a_task_per_request(
    runtime: ModelRuntime, direct: tuple[Any, Schema]
) -> None:
    """The native front end's path: ``start_predict`` validates and queues at once, the
    batcher's future's done callback ``finish_predict``s; a cancelled future withdraws."""
    counting = CountingRuntime(runtime)
    recorder = Recorder()
    options = BatcherOptions(max_wait_s=0.0)
    servicer = PredictionServicer(
        counting, options, sla_s=5.0, max_candidates=64, observer=recorder
    )
    await servicer.start()
    try:
        unknown = servicer.start_predict(pb.PredictRequest(model="nope"), budget_s=None)
        assert isinstance(unknown, Outcome) and unknown.code is grpc.StatusCode.NOT_FOUND
        assert servicer.in_flight == 0

        ex = example(direct[1], 5, seed=3)
        pending = servicer.start_predict(to_proto(ex, request_id="r1"), budget_s=1.0)
        assert isinstance(pending, PendingPredict) and servicer.in_flight == 1
        answered: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        pending.future.add_done_callback(
            lambda _: answered.set_result(servicer.finish_predict(pending))
        )
        outcome = await asyncio.wait_for(answered, RPC_TIMEOUT_S)
        assert outcome.code is grpc.StatusCode.OK and servicer.in_flight == 0
        response = pb.PredictResponse.FromString(outcome.body)
        assert response.request_id == "r1" and response.model == "small"
        np.testing.assert_allclose(
            np.array(response.probabilities), direct_probabilities(direct, ex), rtol=0, atol=1e-6
        )

        # Cancelled before its batch closes: never computed, answered CANCELLED, not in flight.
        withdrawn = servicer.start_predict(to_proto(ex), budget_s=1.0)
        assert isinstance(withdrawn, PendingPredict)
        withdrawn.future.cancel()
        cancelled = servicer.finish_predict(withdrawn)
        assert cancelled.code is grpc.StatusCode.CANCELLED and servicer.in_flight == 0
        batcher = servicer.batchers()["small"]
        for _ in range(100):
            await asyncio.sleep(0.01)
            if batcher.in_flight_requests == 0 and batcher.queued_predictions == 0:
                break
        assert batcher.in_flight_requests == 0 and batcher.queued_predictions == 0
        assert counting.calls == [5]
        assert [code for _, _, code in recorder.done] == [
            grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OK, grpc.StatusCode.CANCELLED
        ]  # fmt: skip
    finally:
        await servicer.close(1.0)


def _bad_requests(schema: Schema) -> dict[str, tuple[pb.PredictRequest, str]]:
    """name -> (request, what the error details must start with)."""
    good = to_proto(example(schema, 4, seed=1))
    out: dict[str, tuple[pb.PredictRequest, str]] = {}

    unknown = pb.PredictRequest()
    unknown.CopyFrom(good)
    unknown.candidates["nope"].values.extend([b"x"] * 4)
    out["unknown field"] = (unknown, "candidates['nope']: unknown field")

    wrong_scope = pb.PredictRequest()
    wrong_scope.CopyFrom(good)
    wrong_scope.candidates["site_domain"].values.extend([b"x"] * 4)
    out["context field as candidate"] = (wrong_scope, "candidates['site_domain']: wrong kind")

    several = pb.PredictRequest()
    several.CopyFrom(good)
    several.context["country"].values.append(b"C002")
    out["several values, single-valued"] = (several, "context['country']: wrong kind")

    empty = pb.PredictRequest()
    empty.CopyFrom(good)
    empty.num_candidates = 0
    empty.ClearField("candidates")
    out["empty candidate list"] = (empty, "num_candidates")

    too_many = to_proto(example(schema, 513, seed=2))
    out["too many candidates"] = (too_many, "num_candidates")

    bad_number = pb.PredictRequest()
    bad_number.CopyFrom(good)
    bad_number.candidates["bid_cpm"].values[2] = b"12abc"
    out["bad number"] = (bad_number, "candidates['bid_cpm'][2]")

    short = pb.PredictRequest()
    short.CopyFrom(good)
    del short.candidates["creative_id"].values[-1]
    out["column length"] = (short, "candidates['creative_id']")

    long_value = pb.PredictRequest()
    long_value.CopyFrom(good)
    long_value.candidates["creative_id"].values[1] = b"c" * 257
    out["value too long"] = (long_value, "candidates['creative_id'][1]")
    return out


async def test_bad_input_is_invalid_argument_naming_the_field(
    runtime: ModelRuntime, direct: tuple[Any, Schema]
) -> None:
    counting = CountingRuntime(runtime)
    async with serving(counting) as (stub, _):
        for name, (request, where) in _bad_requests(direct[1]).items():
            error = await rpc_error(stub.Predict(request, timeout=RPC_TIMEOUT_S))
            assert error.code() == INVALID, name
            assert error.details().startswith(where), (name, error.details())
    assert counting.calls == []  # none of them reached the model


async def test_unknown_model_is_not_found(
    runtime: ModelRuntime, direct: tuple[Any, Schema]
) -> None:
    async with serving(runtime) as (stub, _):
        request = to_proto(example(direct[1], 2, seed=3), model="nosuch")
        error = await rpc_error(stub.Predict(request, timeout=RPC_TIMEOUT_S))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "'nosuch'" in error.details()
        error = await rpc_error(
            stub.GetModelMetadata(pb.GetModelMetadataRequest(model="nosuch"), timeout=5)
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_a_bad_request_does_not_affect_concurrent_good_ones(
    runtime: ModelRuntime, direct: tuple[Any, Schema]
) -> None:
    n, k = 10, 8
    counting = CountingRuntime(runtime)
    options = BatcherOptions(max_batch_size=n * k, max_wait_s=NEVER_S)
    goods = [example(direct[1], k, seed=200 + i) for i in range(n)]
    bads = _bad_requests(direct[1])
    async with serving(counting, options) as (stub, _):
        calls = [stub.Predict(to_proto(ex), timeout=RPC_TIMEOUT_S) for ex in goods]
        calls += [stub.Predict(req, timeout=RPC_TIMEOUT_S) for req, _ in bads.values()]
        results = await asyncio.gather(*calls, return_exceptions=True)
    for ex, result in zip(goods, results[:n], strict=True):
        assert isinstance(result, pb.PredictResponse), result
        np.testing.assert_allclose(
            np.array(result.probabilities), direct_probabilities(direct, ex), rtol=0, atol=1e-6
        )
    for (where_name, (_, where)), result in zip(bads.items(), results[n:], strict=True):
        assert isinstance(result, grpc.aio.AioRpcError), where_name
        assert result.code() == INVALID and result.details().startswith(where)
    assert counting.calls == [n * k]  # the good ones, merged; no bad one inside


async def test_oversized_message_is_refused_by_grpc_and_the_server_carries_on(
    runtime: ModelRuntime, direct: tuple[Any, Schema]
) -> None:
    counting = CountingRuntime(runtime)
    limit = [("grpc.max_receive_message_length", 8192)]
    async with serving(counting, server_options=limit) as (stub, _):
        big = to_proto(example(direct[1], 300, seed=4))
        assert big.ByteSize() > 8192
        error = await rpc_error(stub.Predict(big, timeout=RPC_TIMEOUT_S))
        # gRPC's own check, before the servicer runs: RESOURCE_EXHAUSTED is its standard code.
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in error.details()
        small = await stub.Predict(to_proto(example(direct[1], 4, seed=5)), timeout=RPC_TIMEOUT_S)
        assert len(small.probabilities) == 4
    assert counting.calls == [4]


async def test_large_request_is_split_over_batches_and_joined_in_order(
    runtime: ModelRuntime, direct: tuple[Any, Schema]
) -> None:
    counting = CountingRuntime(runtime)
    options = BatcherOptions(max_batch_size=16, max_wait_s=0.0)
    ex = example(direct[1], 40, seed=6)
    async with serving(counting, options) as (stub, _):
        response = await stub.Predict(to_proto(ex), timeout=RPC_TIMEOUT_S)
    assert counting.calls == [16, 16, 8]
    np.testing.assert_allclose(
        np.array(response.probabilities), direct_probabilities(direct, ex), rtol=0, atol=1e-6
    )


async def test_metadata_returns_schema_version_metrics_and_limits(
    runtime: ModelRuntime, direct: tuple[Any, Schema]
) -> None:
    schema = direct[1]
    async with serving(runtime, max_candidates=300) as (stub, _):
        meta = await stub.GetModelMetadata(pb.GetModelMetadataRequest(), timeout=5)
        named = await stub.GetModelMetadata(pb.GetModelMetadataRequest(model="small"), timeout=5)
    assert meta == named
    assert meta.model == "small" and meta.version == runtime.get("small").version
    assert meta.schema_name == schema.name and meta.schema_version == schema.version
    assert meta.schema_fingerprint == schema.fingerprint()
    assert [f.name for f in meta.fields] == list(schema.names)
    by_name = {f.name: f for f in meta.fields}
    assert by_name["user_segments"].kind == "multi_categorical"
    assert by_name["user_segments"].max_values == 16
    assert by_name["bid_cpm"].scope == "candidate"
    assert list(by_name["bid_cpm"].boundaries) == list(schema.field("bid_cpm").boundaries)
    assert by_name["site_domain"].buckets == 4096
    assert "holdout" in json.loads(meta.metrics_json)
    assert meta.created
    assert (meta.max_candidates, meta.max_value_bytes) == (300, 256)
    assert list(meta.models) == ["small"]


async def test_answer_ready_after_the_sla_is_deadline_exceeded(
    runtime: ModelRuntime, direct: tuple[Any, Schema]
) -> None:
    """No gRPC deadline: the server's own budget (sla_s) applies, and a late answer is refused."""
    slow = CountingRuntime(runtime, delay_s=0.5)
    async with serving(slow, BatcherOptions(max_wait_s=0.0), sla_s=0.2) as (stub, _):
        error = await rpc_error(stub.Predict(to_proto(example(direct[1], 2, seed=7))))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "after the deadline" in error.details()
    assert slow.calls == [2]


async def test_hopeless_grpc_deadline_is_refused_before_compute(
    runtime: ModelRuntime, direct: tuple[Any, Schema]
) -> None:
    """A 0.5 s gRPC deadline against a predicted 2 s compute: refused at admission, at once."""
    counting = CountingRuntime(runtime)
    options = BatcherOptions(prior_fixed_s=2.0, max_wait_s=0.0)
    async with serving(counting, options) as (stub, _):
        error = await rpc_error(stub.Predict(to_proto(example(direct[1], 2, seed=8)), timeout=0.5))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "predicted" in error.details()  # the server's refusal, not the client's own timer
    assert counting.calls == []


async def test_a_refused_request_is_never_decoded(
    runtime: ModelRuntime, direct: tuple[Any, Schema]
) -> None:
    """Admission is judged on ``num_candidates`` before decoding, so a refusal under overload
    costs no validation: even an invalid request gets the refusal, and no decode happened."""
    counting, recorder = CountingRuntime(runtime), Recorder()
    options = BatcherOptions(prior_fixed_s=2.0, max_wait_s=0.0)
    bad = to_proto(example(direct[1], 2, seed=8))
    bad.candidates["no_such_field"].values.extend([b"x", b"y"])  # would be INVALID_ARGUMENT
    async with serving(counting, options, observer=recorder) as (stub, _):
        error = await rpc_error(stub.Predict(bad, timeout=0.5))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert recorder.decoded == [] and counting.calls == []
        # With time to spare the same request is decoded, and refused as invalid.
        error = await rpc_error(stub.Predict(bad, timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no_such_field" in error.details()


async def test_after_close_predict_is_refused_as_overloaded(
    runtime: ModelRuntime, direct: tuple[Any, Schema]
) -> None:
    counting = CountingRuntime(runtime)
    async with serving(counting) as (stub, servicer):
        await servicer.close(1.0)
        error = await rpc_error(stub.Predict(to_proto(example(direct[1], 2, seed=10)), timeout=5))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "shut" in error.details()
    assert counting.calls == []


async def test_each_batch_uses_the_version_loaded_at_that_moment(
    runtime: ModelRuntime, repo: Path, direct: tuple[Any, Schema]
) -> None:
    """Runs last in this module: it publishes version 2 (same weights) into the shared repo."""
    before = runtime.get("small").version
    async with serving(runtime) as (stub, _):
        request = to_proto(example(direct[1], 3, seed=9))
        first = await stub.Predict(request, timeout=RPC_TIMEOUT_S)
        tmp = repo / "small" / ".tmp-next"
        shutil.copytree(repo / "small" / str(before), tmp)
        tmp.rename(repo / "small" / str(before + 1))
        await runtime.poll_now()
        second = await stub.Predict(request, timeout=RPC_TIMEOUT_S)
    assert (first.model_version, second.model_version) == (before, before + 1)
    assert list(first.probabilities) == list(second.probabilities)


async def test_compute_margin_follows_the_batches_being_made(
    runtime: ModelRuntime, direct: tuple[Any, Schema]
) -> None:
    """The margin a front end adds to the queue's delay is one batch as large as the largest
    recent one: the largest possible before any was computed, a small one while batches are."""
    options = BatcherOptions(max_batch_size=4096, max_wait_s=0.0, safety_margin_s=0.001)
    async with serving(runtime, options) as (stub, servicer):
        batcher = servicer.batchers()["small"]  # started with the servicer, nothing computed
        assert batcher.largest_recent_batch() == 0
        full = batcher.predicted_compute_s(4096) + 0.001
        assert servicer.compute_margin_s() == pytest.approx(full)
        await stub.Predict(to_proto(example(direct[1], 8, seed=11)), timeout=RPC_TIMEOUT_S)
        assert batcher.largest_recent_batch() == 8
        assert servicer.compute_margin_s() == pytest.approx(batcher.predicted_compute_s(8) + 0.001)
        assert servicer.compute_margin_s() < batcher.predicted_compute_s(4096) + 0.001
    # Unbatched, a call's batch is its whole request: up to max_candidates (512 here) at first.
    unbatched = BatcherOptions(batching=False, safety_margin_s=0.001)
    async with serving(runtime, unbatched) as (stub, servicer):
        batcher = servicer.batchers()["small"]
        assert servicer.compute_margin_s() == pytest.approx(
            batcher.predicted_compute_s(512) + 0.001
        )
        await stub.Predict(to_proto(example(direct[1], 8, seed=12)), timeout=RPC_TIMEOUT_S)
        assert servicer.compute_margin_s() == pytest.approx(batcher.predicted_compute_s(8) + 0.001)


async def test_servicer_rejects_limits_the_batcher_cannot_queue(runtime: ModelRuntime) -> None:
    with pytest.raises(ValueError, match="queue_limit"):
        PredictionServicer(
            runtime, BatcherOptions(queue_limit=1024), sla_s=0.01, max_candidates=2048
        )
    with pytest.raises(ValueError, match="sla_s"):
        PredictionServicer(runtime, BatcherOptions(), sla_s=0.0, max_candidates=16)


def _strings_only_copy(src: Path, dst: Path) -> None:
    """A version as exports were before serving_rows: the same weights, serving_default only."""
    loaded = tf.saved_model.load(str(src))
    tmp = dst.parent / f".tmp-{dst.name}"
    tf.saved_model.save(loaded, str(tmp), signatures={SIGNATURE: loaded.signatures[SIGNATURE]})
    shutil.copy(src / METADATA_FILE, tmp / METADATA_FILE)
    tmp.rename(dst)


async def test_requests_decoded_as_rows_are_answered_by_a_version_fed_strings(
    tmp_path: Path, small_model_root: Path, direct: tuple[Any, Schema]
) -> None:
    """A hot swap to a version without serving_rows while requests wait: they were decoded to
    table rows for the old version, are decoded again as strings for the new one, and get the
    same probabilities."""
    root = tmp_path / "models"
    shutil.copytree(small_model_root, root)
    rt = ModelRuntime(root, poll_interval_s=3600.0, warmup_batches=1)
    await rt.start()
    recorder = Recorder()
    gate = threading.Event()
    gated = CountingRuntime(rt, gate=gate)
    try:
        assert rt.get("small").has_rows
        examples = [example(direct[1], 5, seed=300 + i) for i in range(4)]
        async with serving(gated, observer=recorder) as (stub, _):
            first = asyncio.ensure_future(stub.Predict(to_proto(examples[0]), timeout=30))
            assert await asyncio.to_thread(gated.entered.wait, 30)  # v1 is computing it
            waiting = [
                asyncio.ensure_future(stub.Predict(to_proto(ex), timeout=30)) for ex in examples[1:]
            ]
            async with asyncio.timeout(20):  # all decoded for v1
                while len(recorder.decoded) < len(examples):
                    await asyncio.sleep(0.01)
            _strings_only_copy(root / "small" / "1", root / "small" / "2")
            await rt.poll_now()
            assert rt.get("small").version == 2 and not rt.get("small").has_rows
            gate.set()
            responses = [await first, *(await asyncio.gather(*waiting))]
    finally:
        gate.set()
        await rt.stop()
    assert gated.fed[0] == (True, 1)
    assert gated.fed[1:] and all(call == (False, 2) for call in gated.fed[1:])
    assert [r.model_version for r in responses] == [1, 2, 2, 2]
    for ex, response in zip(examples, responses, strict=True):
        np.testing.assert_allclose(
            np.array(response.probabilities), direct_probabilities(direct, ex), rtol=0, atol=1e-6
        )
