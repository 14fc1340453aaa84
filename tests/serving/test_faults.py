"""Faults under traffic, on real servers on loopback with the trained fixture model.

* Broken new versions (corrupt graph, truncated weights, no metadata, half-written copy) are
  rejected and counted while clients keep sending: zero failed requests, the old version
  answers throughout, and a good version after them still swaps in.
* The model dir emptied, removed or unreadable: the last good version keeps serving, health
  stays SERVING, the condition is logged once and its end too.
* A fault inside one compute call (TensorFlow rejecting the merged feed, or any exception):
  exactly that batch's requests get INTERNAL with a message naming the model and the error; a
  batch computed right after it succeeds.
* 2,000 clients giving up mid-flight (tiny deadlines, explicit cancels): the servicer's in-flight
  count and every batcher's queue return to zero; nothing leaks.

``test_runtime.py`` covers the runtime alone (events, retry of a completed half-written version,
schema changes); ``test_server.py`` covers a good swap under traffic and worker restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adpredict.client import build_request, example_request
from adpredict.schema import load_schema
from adpredict.serving.batcher import BatcherOptions
from adpredict.serving.runtime import ModelRuntime
from adpredict.serving.server import PredictionServer, ServerOptions
from adpredict.serving.service import ServiceObserver
from adpredict.v1 import prediction_service_pb2 as pb
from adpredict.v1 import prediction_service_pb2_grpc as pb_grpc

SCHEMA = Path(__file__).parents[1] / "fixtures" / "rtb_small.toml"
RPC_TIMEOUT_S = 20.0
NEVER_S = 60.0  # a max_wait no test reaches: batches close only when full
SERVING = health_pb2.HealthCheckResponse.SERVING
INTERNAL = grpc.StatusCode.INTERNAL


@pytest.fixture
def model_dir(tmp_path: Path, small_model_root: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(small_model_root, root)
    return root


def request(k: int = 4, seed: int = 1) -> pb.PredictRequest:
    return build_request(*example_request(load_schema(SCHEMA), k=k, seed=seed))


async def wait_until(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_server(model_dir: Path) -> AsyncIterator[PredictionServer]:
    """A whole serving process's server (runtime, servicer, health) on 127.0.0.1:<any>."""
    options = ServerOptions(
        model_dir=model_dir, port=0, metrics_port=0, poll_interval_s=0.05, warmup_batches=1
    )
    server = PredictionServer(options)
    await server.start()
    try:
        yield server
    finally:
        await server.drain()


@dataclass
class Outcome:
    code: grpc.StatusCode
    version: int = 0
    details: str = ""


class Traffic:
    """``clients`` tasks sending requests back to back, each on its own channel."""

    def __init__(self, target: str, clients: int = 4) -> None:
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(target, i)) for i in range(clients)]

    async def _run(self, target: str, seed: int) -> None:
        message = request(k=8, seed=seed)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.PredictionServiceStub(channel)
            while not self._stop.is_set():
                try:
                    answer = await stub.Predict(message, timeout=RPC_TIMEOUT_S)
                    self.outcomes.append(Outcome(grpc.StatusCode.OK, answer.model_version))
                except grpc.aio.AioRpcError as exc:
                    self.outcomes.append(Outcome(exc.code(), details=exc.details() or ""))

    async def more(self, n: int = 20) -> None:
        """Wait until ``n`` more answers arrived (traffic really flows at this point)."""
        target = len(self.outcomes) + n
        await wait_until(lambda: len(self.outcomes) >= target)

    async def stop(self) -> list[Outcome]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.outcomes


async def health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status


def publish(src: Path, parent: Path, version: int, damage: Callable[[Path], None]) -> None:
    """Copy ``src`` to ``parent/.tmp-*``, damage the copy, rename it to ``version`` at once."""
    tmp = parent / f".tmp-{version}"
    shutil.copytree(src, tmp)
    damage(tmp)
    tmp.rename(parent / str(version))


def _truncate_weights(vdir: Path) -> None:
    for data in (vdir / "variables").glob("variables.data-*"):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


# ----------------------------------------------------------------------------------- tests


@pytest.mark.asyncio
async def test_broken_versions_are_rejected_and_counted_with_zero_failed_requests(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="adpredict")
    small, good = model_dir / "small", model_dir / "small" / "1"
    broken: dict[int, Callable[[Path], None]] = {
        2: lambda d: (d / "saved_model.pb").write_bytes(b"\x08garbage" * 64),  # corrupt graph
        3: _truncate_weights,  # a weights file cut in half
        4: lambda d: (d / "adpredict.json").unlink(),  # no metadata
    }
    async with running_server(model_dir) as server:
        runtime = server.runtime
        assert runtime is not None and server.port
        target = f"127.0.0.1:{server.port}"
        traffic = Traffic(target)
        await traffic.more()
        for version, damage in broken.items():
            publish(good, small, version, damage)
            await wait_until(lambda v=version: runtime.status()["small"].load_failures == v - 1)
            await traffic.more()
        # A non-atomic copy caught halfway (graph and metadata, no weights yet).
        (small / "5").mkdir()
        for name in ("saved_model.pb", "adpredict.json"):
            shutil.copy2(good / name, small / "5")
        await wait_until(lambda: runtime.status()["small"].load_failures == 4)
        await traffic.more()
        assert await health(target) == SERVING
        status = runtime.status()["small"]
        assert (status.version, status.load_failures) == (1, 4)
        # After all that, a good version still swaps in, under the same traffic.
        publish(good, small, 6, lambda d: None)
        await wait_until(lambda: runtime.versions() == {"small": 6})
        await traffic.more()
        outcomes = await traffic.stop()

    failed = [o for o in outcomes if o.code != grpc.StatusCode.OK]
    assert not failed, failed[:5]
    assert {o.version for o in outcomes} == {1, 6}
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert [m.split(" (")[0] for m in rejected] == [
        f"model small version {v} rejected" for v in (2, 3, 4, 5)
    ]
    assert all("version 1 keeps serving" in m for m in rejected)
    assert "cannot load SavedModel" in rejected[0] and str(small / "2") in rejected[0]


@pytest.mark.asyncio
@pytest.mark.parametrize("fault", ["emptied", "removed", "unreadable"])
async def test_model_dir_gone_keeps_serving_the_last_good_version(
    model_dir: Path, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    if fault == "unreadable" and os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading (see 'removed')")
    caplog.set_level(logging.INFO, logger="adpredict.serving.runtime")
    aside = model_dir.parent / "aside"
    async with running_server(model_dir) as server:
        runtime = server.runtime
        assert runtime is not None
        target = f"127.0.0.1:{server.port}"
        traffic = Traffic(target)
        await traffic.more()
        if fault == "emptied":
            (model_dir / "small").rename(aside)
        elif fault == "removed":
            model_dir.rename(aside)
        else:
            model_dir.chmod(0)
        try:
            await wait_until(lambda: "keeping loaded models" in caplog.text)
            await traffic.more(50)
            assert await health(target) == SERVING
            assert runtime.versions() == {"small": 1} and runtime.ready
        finally:
            if fault == "emptied":
                aside.rename(model_dir / "small")
            elif fault == "removed":
                aside.rename(model_dir)
            else:
                model_dir.chmod(0o755)
        await wait_until(lambda: "readable again" in caplog.text)
        await traffic.more()
        outcomes = await traffic.stop()
    assert all(o.code == grpc.StatusCode.OK and o.version == 1 for o in outcomes)
    problems = [r for r in caplog.records if "keeping loaded models" in r.getMessage()]
    assert len(problems) == 1, "logged once, not on every poll"
    assert problems[0].levelno == logging.WARNING and "small v1" in problems[0].getMessage()
    assert runtime.status()["small"].load_failures == 0


class Recorder(ServiceObserver):
    def __init__(self) -> None:
        self.codes: list[grpc.StatusCode] = []  # RPCs answered by the servicer
        self.refused_in_intake: dict[str, int] = {}  # calls the native intake answered itself

    def request_done(self, method: str, model: str, code: grpc.StatusCode, seconds: float) -> None:
        self.codes.append(code)

    def intake_refused(self, method: str, reason: str, count: int) -> None:
        self.refused_in_intake[reason] = self.refused_in_intake.get(reason, 0) + count


class FaultyRuntime:
    """The real runtime; ``faults[i]`` (if any) sabotages compute call ``i`` (0-based)."""

    def __init__(self, runtime: ModelRuntime, delay_s: float = 0.0) -> None:
        self.runtime = runtime
        self.delay_s = delay_s
        self.faults: dict[int, Callable[[Any, dict[str, np.ndarray]], np.ndarray]] = {}
        self.calls: list[int] = []

    def get(self, name: str = "") -> Any:
        return _FaultyModel(self.runtime.get(name), self)

    def names(self) -> list[str]:
        return self.runtime.names()


class _FaultyModel:
    def __init__(self, model: Any, owner: FaultyRuntime) -> None:
        self._model = model
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def predict(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        owner = self._owner
        call = len(owner.calls)
        owner.calls.append(len(feed["request_index"]))
        if owner.delay_s:
            time.sleep(owner.delay_s)  # a slow model, not synchronisation
        fault = owner.faults.get(call)
        return fault(self._model, feed) if fault else self._model.predict(feed)


def _out_of_range_index(model: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
    """TensorFlow itself rejects the merged feed (what a merge bug would do)."""
    return model.predict(dict(feed, request_index=feed["request_index"] + 1000))


def _raise(model: Any, feed: dict[str, np.ndarray]) -> np.ndarray:
    raise RuntimeError("injected fault in compute")


@pytest_asyncio.fixture
async def runtime(model_dir: Path) -> AsyncIterator[ModelRuntime]:
    rt = ModelRuntime(model_dir, poll_interval_s=3600.0, warmup_batches=1)
    await rt.start()
    yield rt
    await rt.stop()


@pytest.mark.asyncio
async def test_a_fault_in_one_compute_call_fails_only_that_batch(
    runtime: ModelRuntime, bare_servicer: Callable[..., Any]
) -> None:
    per_batch, k = 8, 4
    faulty = FaultyRuntime(runtime)
    faulty.faults = {0: _out_of_range_index, 2: _raise}
    # Batches close only when full: 16 concurrent requests make exactly two batches of 8, and
    # with one compute thread the second is computed right after the first failed.
    options = BatcherOptions(max_batch_size=per_batch * k, max_wait_s=NEVER_S, compute_threads=1)
    async with (
        bare_servicer(faulty, options) as (target, _),
        grpc.aio.insecure_channel(target) as ch,
    ):
        stub = pb_grpc.PredictionServiceStub(ch)
        for fault, message in ((0, "failed on a batch of 32 predictions: indices"),
                               (2, "RuntimeError: injected fault in compute")):  # fmt: skip
            calls = [
                stub.Predict(request(k, seed=i), timeout=RPC_TIMEOUT_S)
                for i in range(2 * per_batch)
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            answers = [r for r in results if isinstance(r, pb.PredictResponse)]
            assert len(errors) == per_batch and len(answers) == per_batch, results
            assert all(e.code() == INTERNAL and message in e.details() for e in errors), errors[0]
            if fault == 0:  # TensorFlow's rejection: the runtime's ModelError, with the version
                assert errors[0].details().startswith("ModelError: model 'small' version 1 ")
            for answer in answers:  # the batch after the faulty one, whole and correct
                assert answer.batch_requests == per_batch and len(answer.probabilities) == k
                assert all(0 < p < 1 for p in answer.probabilities)
    assert faulty.calls == [per_batch * k] * 4


@pytest.mark.asyncio
async def test_thousands_of_clients_giving_up_leave_nothing_behind(
    runtime: ModelRuntime, bare_servicer: Callable[..., Any]
) -> None:
    n, k = 2000, 4
    recorder = Recorder()
    slow = FaultyRuntime(runtime, delay_s=0.04)  # 40 ms per batch of <= 16 requests: 400/s
    options = BatcherOptions(max_batch_size=16 * k, max_wait_s=0.0, compute_threads=1)
    rng = random.Random(6)
    message = request(k)
    async with bare_servicer(slow, options, recorder) as (target, servicer):
        channels = [grpc.aio.insecure_channel(target) for _ in range(8)]
        stubs = [pb_grpc.PredictionServiceStub(c) for c in channels]
        for stub in stubs:  # connected before the storm, so the storm reaches the server
            await stub.Predict(message, timeout=RPC_TIMEOUT_S)
        peak = {"in_flight": 0, "queued": 0}
        sampling = True

        async def sample() -> None:
            while sampling:
                batcher = servicer.batchers().get("small")
                queued = batcher.queued_predictions if batcher else 0
                peak["in_flight"] = max(peak["in_flight"], servicer.in_flight)
                peak["queued"] = max(peak["queued"], queued)
                await asyncio.sleep(0.002)

        async def give_up(i: int) -> grpc.StatusCode:
            # Spread over ~4 s (500/s, more than the slow model serves): started all at
            # once, the calls would expire before this loop got round to serving any of them.
            await asyncio.sleep(i / 500)
            stub = stubs[i % len(stubs)]
            if i % 2:  # a deadline missed in the queue (or hopeless at admission)
                call = stub.Predict(message, timeout=rng.uniform(0.005, 0.3))
            else:  # the client cancels while the request waits or computes
                call = stub.Predict(message, timeout=RPC_TIMEOUT_S)
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                call.cancel()
            try:
                await call
                return grpc.StatusCode.OK
            except asyncio.CancelledError:
                return grpc.StatusCode.CANCELLED
            except grpc.aio.AioRpcError as exc:
                return exc.code()

        sampler = asyncio.create_task(sample())
        client_codes = await asyncio.gather(*(give_up(i) for i in range(n)))
        sampling = False
        await sampler
        batcher = servicer.batchers()["small"]
        # Every handler the server started ends, and nothing remains queued or computing.
        # (RPCs given up before they reached the server never start a handler.)
        settled = lambda: servicer.in_flight == 0 and batcher.in_flight_requests == 0  # noqa: E731
        await wait_until(settled)
        await asyncio.sleep(0.5)
        assert settled(), (servicer.in_flight, batcher.in_flight_requests)
        assert batcher.queued_predictions == 0 and batcher.computing_batches == 0
        # The service is fine afterwards, and its counters go back to zero again.
        answer = await stubs[0].Predict(message, timeout=RPC_TIMEOUT_S)
        assert len(answer.probabilities) == k
        assert servicer.in_flight == 0 and batcher.in_flight_requests == 0
        for channel in channels:
            await channel.close()

    # The storm really reached the server's queue and was given up there, both ways.
    assert peak["in_flight"] >= 40 and peak["queued"] >= 100, peak
    server_codes = {c: recorder.codes.count(c) for c in set(recorder.codes)}
    # A good part of the storm reached handlers (on a slow machine gRPC drops more calls given
    # up before a handler starts: 698 of 2,000 reached grpc.aio handlers on the dev VM today).
    assert len(recorder.codes) >= n // 4, server_codes
    assert server_codes.get(grpc.StatusCode.CANCELLED, 0) >= 200, server_codes
    # Short deadlines expire in the batcher's queue, are hopeless at its admission, or (native
    # front end) are refused at arrival in C++ because the queue's delay exceeds them.
    intake = recorder.refused_in_intake
    missed = (
        server_codes.get(grpc.StatusCode.DEADLINE_EXCEEDED, 0)
        + intake.get("refused_queue_delay", 0)
        + intake.get("expired_before_pickup", 0)
    )
    assert missed >= 200, (server_codes, intake)
    assert set(client_codes) <= {
        grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED
    }  # fmt: skip
    # Requests given up before compute were never computed: far fewer predictions than sent.
    assert sum(slow.calls) < n * k
