"""The native front end (``adpredict.serving.intake`` + ``_intake.cpp``) on loopback.

What the shared tests (``bare_servicer`` / ``servers`` run on both front ends: faults,
overload, TLS) do not cover: answers identical to the grpc.aio front end's, merging into one
compute call, health and unknown methods, bytes that are not a message, what the C++ side answers
itself (overload beyond ``max_pending``, deadlines that pass before Python takes a call, budgets
shorter than the queue's delay) and how it is counted, the SLA cap's control, shutdown, a port
in use, and ``serve --frontend native`` end to end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adpredict.client import build_request, example_request
from adpredict.errors import StartupError
from adpredict.schema import load_schema
from adpredict.serving import intake
from adpredict.serving.batcher import BatcherOptions
from adpredict.serving.runtime import ModelRuntime
from adpredict.serving.server import PredictionServer, ServerOptions
from adpredict.serving.service import PredictionServicer, ServiceObserver
from adpredict.v1 import prediction_service_pb2 as pb
from adpredict.v1 import prediction_service_pb2_grpc as pb_grpc

pytestmark = [
    pytest.mark.skipif(  # as conftest.NATIVE_MISSING: under CI a missing build fails
        not intake.available() and os.environ.get("CI") != "true",
        reason=f"native intake not built: {intake.unavailable_reason()}",
    ),
    pytest.mark.asyncio(loop_scope="module"),
]

SCHEMA = Path(__file__).parents[1] / "fixtures" / "rtb_small.toml"
RPC_TIMEOUT_S = 20.0
PREDICT = "/adpredict.v1.PredictionService/Predict"
OK = grpc.StatusCode.OK


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def runtime(small_model_root: Path) -> AsyncIterator[ModelRuntime]:
    rt = ModelRuntime(small_model_root, poll_interval_s=3600.0, warmup_batches=1)
    await rt.start()
    yield rt
    await rt.stop()


class Counting(ServiceObserver):
    """Records what the servicer reports: RPC outcomes and the intake's own answers."""

    def __init__(self) -> None:
        self.done: list[grpc.StatusCode] = []
        self.refused: dict[tuple[str, str], int] = {}
        self.refusal_times: list[float] = []

    def request_done(self, method: str, model: str, code: grpc.StatusCode, seconds: float) -> None:
        self.done.append(code)

    def intake_refused(self, method: str, reason: str, count: int) -> None:
        key = (method, reason)
        self.refused[key] = self.refused.get(key, 0) + count

    def intake_refusal_times(self, method: str, seconds: Sequence[float]) -> None:
        self.refusal_times.extend(seconds)


class SlowRuntime:
    """The real runtime whose model sleeps ``delay_s`` before each prediction."""

    def __init__(self, runtime: ModelRuntime, delay_s: float) -> None:
        self.runtime, self.delay_s, self.calls = runtime, delay_s, 0

    def get(self, name: str = "") -> Any:
        model = self.runtime.get(name)
        owner = self

        class Slow:
            def __getattr__(self, attr: str) -> Any:
                return getattr(model, attr)

            def predict(self, feed: dict[str, np.ndarray]) -> np.ndarray:
                owner.calls += 1
                time.sleep(owner.delay_s)  # a slow model, not synchronisation
                return model.predict(feed)

        return Slow()

    def names(self) -> list[str]:
        return self.runtime.names()


class Native:
    """A servicer on the native front end, started and stopped by ``async with``."""

    def __init__(
        self,
        runtime: Any,
        options: BatcherOptions | None = None,
        observer: ServiceObserver | None = None,
        *,
        max_pending: int = 10_000,
        sla_s: float = 5.0,
        admit_within_sla: bool = False,
        io_priority: int = 0,
    ) -> None:
        self.servicer = PredictionServicer(
            runtime,
            options or BatcherOptions(max_wait_s=0.0),
            sla_s=sla_s,
            admit_within_sla=admit_within_sla,
            max_candidates=512,
            observer=observer,
        )
        self.frontend = intake.NativeFrontend(
            self.servicer,
            address="127.0.0.1:0",
            max_pending=max_pending,
            max_message_bytes=1 << 20,
            io_priority=io_priority,
        )
        self.target = ""

    async def __aenter__(self) -> Native:
        port = await self.frontend.start()
        self.frontend.set_serving(True)
        await self.servicer.start()
        self.target = f"127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.frontend.stop(1.0)
        await self.servicer.close(1.0)


def message(k: int, seed: int = 1) -> pb.PredictRequest:
    return build_request(*example_request(load_schema(SCHEMA), k=k, seed=seed))


async def codes_of(calls: list[Any]) -> list[grpc.StatusCode]:
    out = []
    for result in await asyncio.gather(*calls, return_exceptions=True):
        out.append(result.code() if isinstance(result, grpc.aio.AioRpcError) else OK)
    return out


# ------------------------------------------------------------------------------------ answers


async def test_answers_equal_the_grpcio_front_ends(
    runtime: ModelRuntime, bare_servicer: Callable[..., Any], frontend: str
) -> None:
    if frontend != "grpcio":
        pytest.skip("compares the native front end with grpcio")
    requests = [message(k, seed=k) for k in (1, 32, 300)]
    async with (
        bare_servicer(runtime, BatcherOptions(max_wait_s=0.0)) as (target, _),
        grpc.aio.insecure_channel(target) as channel,
    ):
        stub = pb_grpc.PredictionServiceStub(channel)
        expected = [await stub.Predict(r, timeout=RPC_TIMEOUT_S) for r in requests]
    async with Native(runtime) as native, grpc.aio.insecure_channel(native.target) as channel:
        stub = pb_grpc.PredictionServiceStub(channel)
        for request, want in zip(requests, expected, strict=True):
            got = await stub.Predict(request, timeout=RPC_TIMEOUT_S)
            assert len(got.probabilities) == request.num_candidates
            np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-6)
            assert (got.model, got.model_version) == (want.model, want.model_version)
        metadata = await stub.GetModelMetadata(pb.GetModelMetadataRequest(), timeout=5.0)
        assert metadata.model == "small" and metadata.fields


async def test_concurrent_requests_share_one_compute_call(runtime: ModelRuntime) -> None:
    n, k = 40, 4
    slow = SlowRuntime(runtime, 0.0)
    # Batches close only when full (the wait is longer than the test): all 40 or nothing.
    options = BatcherOptions(max_batch_size=n * k, max_wait_s=60.0, queue_limit=4096)
    async with Native(slow, options) as native, grpc.aio.insecure_channel(native.target) as ch:
        stub = pb_grpc.PredictionServiceStub(ch)
        answers = await asyncio.gather(
            *(stub.Predict(message(k, seed=i), timeout=RPC_TIMEOUT_S) for i in range(n))
        )
    assert slow.calls == 1
    assert all(a.batch_requests == n and len(a.probabilities) == k for a in answers)


async def test_health_unknown_methods_and_bytes_that_are_not_a_message(
    runtime: ModelRuntime,
) -> None:
    async with Native(runtime) as native, grpc.aio.insecure_channel(native.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in ("", "adpredict.v1.PredictionService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == serving
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert (await watch.read()).status == serving
        native.frontend.set_serving(False)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        native.frontend.set_serving(True)

        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await ch.unary_unary("/adpredict.v1.PredictionService/Nope")(b"", timeout=5)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED

        with pytest.raises(grpc.aio.AioRpcError) as garbage:
            await ch.unary_unary(PREDICT)(b"\xff\xff\xff\x07garbage", timeout=5)
        assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert garbage.value.details().startswith("request: the 11 bytes received are not")

        with pytest.raises(grpc.aio.AioRpcError) as bad_field:
            bad = message(2)
            bad.context["no_such_field"].values.append(b"x")
            await pb_grpc.PredictionServiceStub(ch).Predict(bad, timeout=5)
        assert bad_field.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no_such_field" in bad_field.value.details()


# ------------------------------------------------------------------ what C++ answers itself


async def test_calls_beyond_max_pending_are_refused_in_cpp_and_counted(
    runtime: ModelRuntime,
) -> None:
    observer = Counting()
    slow = SlowRuntime(runtime, 0.2)  # the first call holds its slot for 200 ms
    options = BatcherOptions(max_batch_size=4, max_wait_s=0.0)
    async with (
        Native(slow, options, observer, max_pending=2) as native,
        grpc.aio.insecure_channel(native.target) as ch,
    ):
        stub = pb_grpc.PredictionServiceStub(ch)
        await stub.Predict(message(4), timeout=RPC_TIMEOUT_S)  # connected, cost learned
        calls = [stub.Predict(message(4), timeout=RPC_TIMEOUT_S) for _ in range(12)]
        codes = await codes_of(calls)
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        # At most 2 calls are held at once: 2 answered per ~200 ms batch, the rest refused.
        assert codes.count(OK) >= 2 and refused >= 6, codes
        assert set(codes) <= {OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        with pytest.raises(grpc.aio.AioRpcError) as one:
            await asyncio.gather(*(stub.Predict(message(4), timeout=5) for _ in range(6)))
        assert "server overloaded" in one.value.details()
    # stop() passes the last counts on: every refusal made in C++ is counted, none twice.
    refused_in_cpp = observer.refused.get(("Predict", "refused_overloaded"), 0)
    assert refused_in_cpp >= refused + 1
    assert len(observer.refusal_times) == refused_in_cpp  # each timed, from arrival to answer
    assert all(0 <= s < RPC_TIMEOUT_S for s in observer.refusal_times)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED not in observer.done  # never reached Python


async def test_deadline_passed_before_python_takes_the_call(runtime: ModelRuntime) -> None:
    """While the event loop is blocked, calls still arrive (C++ thread); those whose deadline
    passes meanwhile are answered DEADLINE_EXCEEDED by the intake, never by Python."""
    observer = Counting()
    async with Native(runtime, observer=observer) as native:
        results: list[grpc.StatusCode] = []

        def send() -> None:  # a plain thread: it runs while the loop is blocked
            with grpc.insecure_channel(native.target) as channel:
                stub = pb_grpc.PredictionServiceStub(channel)
                stub.Predict(message(2), timeout=RPC_TIMEOUT_S)  # connected
                started.set()
                go.wait()  # the loop is blocked from before this moment
                futures = [stub.Predict.future(message(2), timeout=0.1) for _ in range(5)]
                for future in futures:
                    try:
                        future.result()
                        results.append(OK)
                    except grpc.RpcError as exc:
                        results.append(exc.code())

        started, go = threading.Event(), threading.Event()
        sender = threading.Thread(target=send)
        sender.start()
        while not started.is_set():
            await asyncio.sleep(0.01)
        go.set()
        time.sleep(0.5)  # block the event loop: the 100 ms deadlines pass in the C++ queue
        await asyncio.to_thread(sender.join)
        before = list(observer.done)
    assert results == [grpc.StatusCode.DEADLINE_EXCEEDED] * 5
    # Most reached the server in time to be queued (a call the client sent late expires in the
    # client); none of them ever reached Python.
    assert 3 <= observer.refused.get(("Predict", "expired_before_pickup"), 0) <= 5
    assert before.count(grpc.StatusCode.DEADLINE_EXCEEDED) == 0


@pytest.mark.parametrize("within_sla", [False, True])
async def test_calls_whose_budget_is_shorter_than_the_queue_delay_are_refused_in_cpp(
    runtime: ModelRuntime, within_sla: bool
) -> None:
    """The oldest pending call's age is the queue's delay: a call arriving with less budget
    left is refused at arrival by C++ (not by the client's own deadline, not by Python); one
    with budget enough is served. With ``admit_within_sla`` the SLA caps every budget."""
    observer = Counting()
    slow = SlowRuntime(runtime, 0.0)
    sla_s = 0.25 if within_sla else 5.0
    async with (
        Native(slow, observer=observer, sla_s=sla_s, admit_within_sla=within_sla) as native,
        grpc.aio.insecure_channel(native.target) as ch,
    ):
        stub = pb_grpc.PredictionServiceStub(ch)
        await stub.Predict(message(2), timeout=RPC_TIMEOUT_S)  # connected, cost learned
        slow.delay_s = 0.6
        held = asyncio.ensure_future(stub.Predict(message(2), timeout=RPC_TIMEOUT_S))
        while native.frontend.stats()["queue_delay_s"] < 0.3:  # the held call is 300 ms old
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as short:
            await stub.Predict(message(2), timeout=0.2)  # 200 ms < 300 ms already waited
        assert short.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert short.value.details().startswith("server overloaded: requests are waiting")
        long_call = stub.Predict(message(2), timeout=RPC_TIMEOUT_S)
        if within_sla:  # its budget is the 250 ms SLA, not its 20 s deadline
            with pytest.raises(grpc.aio.AioRpcError) as capped:
                await long_call
            assert capped.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "ms budget" in capped.value.details()
        else:
            assert len((await long_call).probabilities) == 2
        assert len((await held).probabilities) == 2
        slow.delay_s = 0.0
        # The queue is empty again: the same short deadline is served.
        assert len((await stub.Predict(message(2), timeout=0.2)).probabilities) == 2
    refused = observer.refused.get(("Predict", "refused_queue_delay"), 0)
    assert refused == (2 if within_sla else 1)
    assert len(observer.refusal_times) == refused
    assert 0 <= observer.refusal_times[0] < 0.2  # answered before the caller's deadline
    assert grpc.StatusCode.DEADLINE_EXCEEDED not in observer.done  # never reached Python


async def test_a_refusal_does_not_wait_for_the_request_message(runtime: ModelRuntime) -> None:
    """Admission is judged when a call arrives: a call the queue's delay rules out is refused
    before its message comes in (here it never does: the client holds it back)."""
    slow = SlowRuntime(runtime, 0.0)
    async with (
        Native(slow) as native,
        grpc.aio.insecure_channel(native.target) as ch,
    ):
        stub = pb_grpc.PredictionServiceStub(ch)
        await stub.Predict(message(2), timeout=RPC_TIMEOUT_S)  # connected, cost learned
        slow.delay_s = 0.6
        held = asyncio.ensure_future(stub.Predict(message(2), timeout=RPC_TIMEOUT_S))
        while native.frontend.stats()["queue_delay_s"] < 0.3:
            await asyncio.sleep(0.01)
        release = asyncio.Event()

        async def held_back() -> AsyncIterator[bytes]:
            await release.wait()  # the message is sent only after the answer, if ever
            yield message(2).SerializeToString()

        predict = ch.stream_unary(
            f"/{intake.SERVICE_NAME}/Predict",
            request_serializer=None,
            response_deserializer=pb.PredictResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            # 200 ms < 300 ms already waited; without the message, only the server can answer
            # "overloaded" (the client's own deadline says "Deadline Exceeded").
            await predict(held_back(), timeout=0.2)
        release.set()
        assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert refused.value.details().startswith("server overloaded: requests are waiting")
        assert len((await held).probabilities) == 2
        assert native.frontend.stats()["refused_queue_delay"][0] == 1


def _threads_by_policy() -> dict[str, list[str]]:
    """This process's thread names by scheduling policy name."""
    names = {os.SCHED_OTHER: "OTHER", os.SCHED_RR: "RR", os.SCHED_FIFO: "FIFO"}
    out: dict[str, list[str]] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            comm = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            policy = names.get(os.sched_getscheduler(int(tid)), "other policy")
        except OSError:  # the thread ended meanwhile
            continue
        out.setdefault(policy, []).append(comm)
    return out


async def test_io_priority_puts_the_intake_and_its_grpc_threads_first(
    runtime: ModelRuntime, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the kernel allows it (CAP_SYS_NICE), grpc++'s threads and the intake's run at
    SCHED_RR and nothing else does (the thread that started them is restored); where it does
    not, a warning says so and the server serves as usual."""
    before = set(_threads_by_policy().get("RR", []))
    async with (
        Native(runtime, io_priority=5) as native,
        grpc.aio.insecure_channel(native.target) as ch,
    ):
        stub = pb_grpc.PredictionServiceStub(ch)
        assert len((await stub.Predict(message(3), timeout=RPC_TIMEOUT_S)).probabilities) == 3
        granted = native.frontend.stats()["io_realtime"]
        rr = _threads_by_policy().get("RR", [])
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the event loop's thread
    if granted:
        assert "adp-intake" in rr
        assert len(rr) - len(before) >= 2, rr  # the intake's and at least one of grpc++'s
        assert "MainThread" not in rr and "python" not in rr, rr  # no Python thread
    else:
        assert "kernel refused SCHED_RR" in caplog.text
    with pytest.raises(ValueError, match="io_priority must be between 0 and 99"):
        Native(runtime, io_priority=100)


async def test_stop_answers_taken_calls_then_refuses(runtime: ModelRuntime) -> None:
    slow = SlowRuntime(runtime, 0.3)
    native = Native(slow)
    await native.__aenter__()
    channel = grpc.aio.insecure_channel(native.target)
    stub = pb_grpc.PredictionServiceStub(channel)
    await stub.Predict(message(2), timeout=RPC_TIMEOUT_S)
    pending = asyncio.ensure_future(stub.Predict(message(2), timeout=RPC_TIMEOUT_S))
    await asyncio.sleep(0.1)  # in compute
    await native.frontend.stop(5.0)
    answer = await pending  # finished within the grace period
    assert len(answer.probabilities) == 2
    with pytest.raises(grpc.aio.AioRpcError) as after:
        await stub.Predict(message(2), timeout=2.0)
    assert after.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    await channel.close()
    await native.servicer.close(1.0)


async def test_a_port_in_use_is_a_startup_error(runtime: ModelRuntime) -> None:
    async with Native(runtime) as native:
        port = native.target.rsplit(":", 1)[1]
        servicer = PredictionServicer(runtime, BatcherOptions(), sla_s=1.0, max_candidates=8)
        taken = intake.NativeFrontend(
            servicer, address=f"127.0.0.1:{port}", max_pending=8, max_message_bytes=1 << 20
        )
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            await taken.start()


async def test_serve_with_the_native_front_end(small_model_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(small_model_root, root)
    server = PredictionServer(
        ServerOptions(
            model_dir=root, port=0, metrics_port=0, warmup_batches=1, grace_s=1.0, frontend="native"
        )
    )
    info = await server.start()
    try:
        async with grpc.aio.insecure_channel(info.target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            answer = await pb_grpc.PredictionServiceStub(channel).Predict(
                message(3), timeout=RPC_TIMEOUT_S
            )
            assert len(answer.probabilities) == 3 and answer.model == "small"
    finally:
        await server.drain()


async def test_unknown_front_end_is_an_option_error(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="frontend must be one of"):
        ServerOptions(model_dir=tmp_path, frontend="carrier-pigeon")


# --------------------------------------------------------------------- the SLA cap's control


async def test_sla_cap_follows_the_admitted_p99_within_its_bounds() -> None:
    cap = intake.SlaCap(0.020, target=0.8, min_scale=0.5, min_samples=100)
    assert cap.update() == pytest.approx(0.020)  # nothing observed: stays at the SLA

    def window(p99_s: float) -> float:
        for i in range(200):  # 2 of 200 (1%) at p99_s, the rest fast
            cap.observe(p99_s if i < 3 else 0.001)
        return cap.update()

    # p99 30 ms against a target of 16 ms: the cap shrinks, by x0.8 per update at most ...
    assert window(0.030) == pytest.approx(0.016)
    assert window(0.030) == pytest.approx(0.0128)
    # ... down to min_scale, however bad the p99.
    for _ in range(5):
        window(0.100)
    assert cap.scale == pytest.approx(0.5)
    # A p99 near the target moves it half-way (geometrically): sqrt(0.8 * 20 / 12.8) = 1.118.
    assert window(0.0128) == pytest.approx(0.010 * 1.25**0.5)
    # A fast p99, or too few calls to judge (light load), lets it recover to the SLA, no further.
    window(0.002)
    for _ in range(3):
        cap.observe(0.050)
        cap.update()
    assert cap.scale == 1.0 and cap.cap_s == pytest.approx(0.020)
