"""Serving metrics: the hooks fill the series docs/METRICS.md promises, a real scrape is clean
for ``promtool check metrics``, and the multiprocess directory is prepared or refused clearly.

The multi-worker merge (one scrape shows both workers, a restart loses nothing) is tested with
real workers in tests/serving/test_server.py; Prometheus itself in tests/serving/test_prometheus.py.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from adpredict.client import PredictionClient, build_request, example_request
from adpredict.errors import StartupError
from adpredict.serving.batcher import BatchStats
from adpredict.serving.metrics import (
    ServingMetrics,
    prepare_multiprocess_dir,
    single_process_registry,
)
from adpredict.serving.server import PredictionServer, ServerOptions, start_metrics_endpoint
from adpredict.v1 import prediction_service_pb2_grpc as pb_grpc

METRICS_DOC = Path(__file__).parents[2] / "docs" / "METRICS.md"


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    got = registry.get_sample_value(name, labels)
    assert got is not None, f"no sample {name}{labels}"
    return got


@pytest.fixture
def metrics() -> tuple[ServingMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return ServingMetrics(registry, sla_s=0.010), registry


def test_rpc_outcomes_latency_and_sla(metrics: tuple[ServingMetrics, CollectorRegistry]) -> None:
    m, reg = metrics
    obs = m.observer
    obs.batch_observer("ctr")  # a batcher starts: its Predict outcome series exist at 0
    assert value(reg, "adpredict_requests_total", method="Predict", model="ctr", code="OK") == 0
    assert value(reg, "adpredict_requests_over_sla_total", model="ctr") == 0

    for seconds in (0.002, 0.004, 0.030):  # the last is served but over the 10 ms SLA
        obs.request_started("Predict")
        assert value(reg, "adpredict_in_flight_requests", method="Predict") == 1
        obs.request_done("Predict", "ctr", grpc.StatusCode.OK, seconds)
    obs.request_started("Predict")
    obs.request_done("Predict", "ctr", grpc.StatusCode.DEADLINE_EXCEEDED, 0.050)  # not "over SLA"
    obs.request_started("Predict")
    obs.request_done("Predict", "", grpc.StatusCode.NOT_FOUND, 0.0001)
    obs.request_decoded("ctr", 32, 0)

    assert value(reg, "adpredict_in_flight_requests", method="Predict") == 0
    assert value(reg, "adpredict_requests_total", method="Predict", model="ctr", code="OK") == 3
    assert value(reg, "adpredict_requests_total", method="Predict", model="", code="NOT_FOUND") == 1
    assert value(reg, "adpredict_requests_over_sla_total", model="ctr") == 1
    count = value(reg, "adpredict_request_duration_seconds_count", method="Predict", model="ctr")
    assert count == 4
    le_5ms = value(
        reg, "adpredict_request_duration_seconds_bucket", method="Predict", model="ctr", le="0.005"
    )
    assert le_5ms == 2
    assert value(reg, "adpredict_predicted_candidates_total", model="ctr") == 32
    assert value(reg, "adpredict_sla_seconds") == 0.010


def test_batches_timeouts_and_refusals(metrics: tuple[ServingMetrics, CollectorRegistry]) -> None:
    m, reg = metrics
    batch = m.observer.batch_observer("ctr")
    batch.batch_completed(BatchStats(96, 3, "full", (0.001, 0.002, 0.0005), 0.004, None))
    batch.batch_completed(BatchStats(8, 1, "deadline", (0.003,), 0.001, None))
    batch.batch_completed(BatchStats(5, 2, "max_wait", (0.0, 0.0), 0.002, RuntimeError("x")))
    batch.request_rejected("deadline", 32)
    batch.request_rejected("queue_full", 32)
    batch.request_rejected("shutting_down", 32)
    batch.request_expired(0.02, 32)
    batch.request_expired(0.03, 32)
    batch.request_cancelled(0.01, 32)
    m.observer.request_late("ctr")

    calls = {
        r: value(reg, "adpredict_compute_calls_total", model="ctr", reason=r)
        for r in ("full", "max_wait", "deadline", "drain")
    }
    assert calls == {"full": 1, "max_wait": 1, "deadline": 1, "drain": 0}
    assert value(reg, "adpredict_predictions_total", model="ctr") == 104  # not the failed 5
    assert value(reg, "adpredict_compute_errors_total", model="ctr") == 1
    assert value(reg, "adpredict_batch_predictions_sum", model="ctr") == 109
    assert value(reg, "adpredict_batch_requests_bucket", model="ctr", le="2.0") == 2
    assert value(reg, "adpredict_queue_wait_seconds_count", model="ctr") == 6
    assert value(reg, "adpredict_compute_seconds_sum", model="ctr") == pytest.approx(0.007)
    stages = {
        s: value(reg, "adpredict_timeouts_total", model="ctr", stage=s)
        for s in ("rejected_at_admission", "expired_in_queue", "late_after_compute")
    }
    assert stages == {"rejected_at_admission": 1, "expired_in_queue": 2, "late_after_compute": 1}
    assert value(reg, "adpredict_rejections_total", model="ctr", reason="queue_full") == 1
    assert value(reg, "adpredict_rejections_total", model="ctr", reason="shutting_down") == 1
    assert value(reg, "adpredict_cancellations_total", model="ctr") == 1


def test_calls_the_native_intake_answered_are_counted_and_timed(
    metrics: tuple[ServingMetrics, CollectorRegistry],
) -> None:
    m, reg = metrics
    obs = m.observer
    obs.intake_refused("Predict", "refused_queue_delay", 3)
    obs.intake_refused("Predict", "refused_overloaded", 2)
    obs.intake_refused("Predict", "expired_before_pickup", 1)
    obs.intake_refused("GetModelMetadata", "refused_shutting_down", 1)
    obs.intake_refusal_times("Predict", [0.0004, 0.0015, 0.0015, 0.003, 0.009, 0.030])
    obs.intake_refusal_times("GetModelMetadata", [0.0002])

    def requests(code: str, method: str = "Predict") -> float:
        return value(reg, "adpredict_requests_total", method=method, model="", code=code)

    assert requests("DEADLINE_EXCEEDED") == 4
    assert requests("RESOURCE_EXHAUSTED") == 2
    assert requests("UNAVAILABLE", "GetModelMetadata") == 1
    assert value(reg, "adpredict_timeouts_total", model="", stage="rejected_in_intake") == 3
    assert value(reg, "adpredict_timeouts_total", model="", stage="expired_in_intake") == 1
    assert value(reg, "adpredict_rejections_total", model="", reason="intake_full") == 2
    # Their durations are in every RPC's histogram, under model="" like their counts.
    duration = "adpredict_request_duration_seconds"
    assert value(reg, f"{duration}_count", method="Predict", model="") == 6
    assert value(reg, f"{duration}_bucket", method="Predict", model="", le="0.002") == 3
    assert value(reg, f"{duration}_sum", method="Predict", model="") == pytest.approx(0.0454)
    assert value(reg, f"{duration}_count", method="GetModelMetadata", model="") == 1


def test_runtime_events_and_sampled_levels(
    metrics: tuple[ServingMetrics, CollectorRegistry],
) -> None:
    m, reg = metrics
    event = SimpleNamespace
    m.runtime_event(event(kind="loaded", name="ctr", version=3, fed_rows=True))
    assert value(reg, "adpredict_model_fed_rows", model="ctr") == 1
    m.runtime_event(event(kind="loaded", name="ctr", version=3, fed_rows=False))
    assert value(reg, "adpredict_model_fed_rows", model="ctr") == 0
    m.runtime_event(event(kind="failed", name="ctr", version=4))
    m.runtime_event(event(kind="dir_problem", name="", version=None))
    assert value(reg, "adpredict_model_version", model="ctr") == 3
    assert value(reg, "adpredict_model_loads_total", model="ctr") == 2
    assert value(reg, "adpredict_model_load_failures_total", model="ctr") == 1
    assert value(reg, "adpredict_model_last_load_timestamp_seconds", model="ctr") > 1.7e9
    assert value(reg, "adpredict_model_dir_problem") == 1
    m.runtime_event(event(kind="dir_ok", name="", version=None))
    assert value(reg, "adpredict_model_dir_problem") == 0

    runtime = SimpleNamespace(names=lambda: ["ctr"])
    batcher = SimpleNamespace(queued_requests=3, queued_predictions=96)
    m.sample(runtime, {"ctr": batcher})
    assert value(reg, "adpredict_models_loaded") == 1
    assert value(reg, "adpredict_queue_depth_requests", model="ctr") == 3
    assert value(reg, "adpredict_queue_depth_predictions", model="ctr") == 96
    cpu = value(reg, "adpredict_process_cpu_seconds_total")
    assert cpu > 0
    assert value(reg, "adpredict_process_resident_memory_bytes") > 10e6
    sum(i * i for i in range(300_000))  # burn a little CPU: the counter only grows
    m.sample(runtime, {})
    assert value(reg, "adpredict_process_cpu_seconds_total") >= cpu


def test_every_documented_metric_is_exported(
    metrics: tuple[ServingMetrics, CollectorRegistry],
) -> None:
    """docs/METRICS.md and the code name the same metrics (the topology ones via the registry)."""
    documented = set(re.findall(r"^\| `(adpredict_[a-z_]+)`", METRICS_DOC.read_text(), re.M))
    registry = single_process_registry()
    ServingMetrics(registry, sla_s=0.02)
    exported = {family.name for family in registry.collect()}
    # prometheus_client names counter families without their `_total`
    exported = {n + "_total" if f"{n}_total" in documented else n for n in exported}
    assert documented == {n for n in exported if n.startswith("adpredict_")}


def test_multiprocess_dir_is_emptied_or_refused_with_its_name(tmp_path: Path) -> None:
    given = tmp_path / "metrics"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"old run")
    (given / "keep.txt").write_text("not ours")
    path, clean = prepare_multiprocess_dir(given)
    assert path == given and sorted(p.name for p in given.iterdir()) == ["keep.txt"]
    (given / "counter_456.db").write_bytes(b"this run")
    clean()
    assert sorted(p.name for p in given.iterdir()) == ["keep.txt"]

    private, clean = prepare_multiprocess_dir(None)
    assert private.is_dir()
    clean()
    assert not private.exists()

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StartupError, match=rf"metrics dir {re.escape(str(blocker))}/sub"):
        prepare_multiprocess_dir(blocker / "sub")


def test_metrics_port_in_use_is_a_startup_error() -> None:
    registry = CollectorRegistry()
    stop = start_metrics_endpoint("127.0.0.1", 0, registry)
    assert stop is None  # port 0: no endpoint
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            StartupError, match=rf"127\.0\.0\.1:{port} \(metrics port\): already in use"
        ):
            start_metrics_endpoint("127.0.0.1", port, registry)


@pytest.mark.asyncio
async def test_a_real_scrape_is_promtool_clean_and_counts_what_was_sent(
    small_model_root: Path, promtool: str
) -> None:
    """A server in this process, real RPCs over loopback, then /metrics over HTTP."""
    registry = single_process_registry()
    metrics = ServingMetrics(registry, sla_s=0.000_05)  # 50 µs: no-deadline requests time out
    server = PredictionServer(
        ServerOptions(model_dir=small_model_root, port=0, metrics_port=0, sla_ms=0.05),
        metrics=metrics,
    )
    info = await server.start()
    stop = None
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        stop = start_metrics_endpoint("127.0.0.1", port, registry)

        def traffic() -> None:
            with PredictionClient(info.target, timeout_s=10.0) as client:
                request = build_request(*example_request(client.metadata().schema, k=16, seed=1))
                for _ in range(5):
                    client.predict_request(request)
            with grpc.insecure_channel(info.target) as channel:  # no gRPC deadline: SLA budget
                stub = pb_grpc.PredictionServiceStub(channel)
                for _ in range(3):
                    with pytest.raises(grpc.RpcError) as caught:
                        stub.Predict(request)
                    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        await asyncio.to_thread(traffic)
        await asyncio.sleep(1.2)  # one sampler tick
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            text = page.read().decode()
    finally:
        if stop is not None:
            stop()
        await server.drain()

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def sample(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert sample("adpredict_requests_total", method="Predict", model="small", code="OK") == 5
    assert (
        sample(
            "adpredict_requests_total", method="Predict", model="small", code="DEADLINE_EXCEEDED"
        )
        == 3
    )
    assert sample("adpredict_timeouts_total", model="small", stage="rejected_at_admission") == 3
    assert sample("adpredict_predictions_total", model="small") == 80
    assert sample("adpredict_models_loaded") == 1
    assert sample("adpredict_model_version", model="small") == 1
    assert sample("adpredict_model_fed_rows", model="small") == 1
    assert sample("adpredict_in_flight_requests", method="Predict") == 0
    assert sample("adpredict_queue_depth_requests", model="small") == 0
    assert sample("process_cpu_seconds_total") > 0

    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr
