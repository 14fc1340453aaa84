"""A real Prometheus on loopback scrapes a running adpredict with the shipped rules loaded
(docker/prometheus/rules/), and the expressions the alerts use agree with the traffic sent.

Traffic: requests with a generous gRPC deadline, which succeed, and requests without one, whose
budget is the server's SLA, set here to 50 µs: the batcher refuses each at admission as
hopeless (DEADLINE_EXCEEDED, counted as a timeout ``rejected_at_admission``). So the timeout
ratio is known exactly, and the p99 can be checked against the server's own histogram.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adpredict.client import PredictionClient, build_request, example_request
from adpredict.serving.metrics import ServingMetrics, single_process_registry
from adpredict.serving.server import PredictionServer, ServerOptions, start_metrics_endpoint
from adpredict.v1 import prediction_service_pb2_grpc as pb_grpc

RULES = Path(__file__).parents[2] / "docker" / "prometheus" / "rules"
OK_REQUESTS = 200
TIMED_OUT = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A Prometheus server scraping one target every 0.5 s, rules evaluated every 0.5 s."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
                    "rule_files": [str(p) for p in sorted(RULES.glob("*.yml"))],
                    "scrape_configs": [
                        {"job_name": "adpredict", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait(lambda: self._get("/-/ready") is not None, "Prometheus ready", 30)

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.read()
        except OSError:
            return None

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"query {expr!r} failed: {exc.read().decode()}") from None
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait(self, ready: object, what: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():  # type: ignore[operator]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def served(small_model_root: Path) -> Iterator[tuple[str, int]]:
    """(gRPC target, metrics port) of a server running on its own event loop thread."""
    registry = single_process_registry()
    options = ServerOptions(model_dir=small_model_root, port=0, metrics_port=0, sla_ms=0.05)
    server = PredictionServer(options, metrics=ServingMetrics(registry, sla_s=0.000_05))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    info = asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=120)
    metrics_port = free_port()
    stop = start_metrics_endpoint("127.0.0.1", metrics_port, registry)
    assert stop is not None
    try:
        yield info.target, metrics_port
    finally:
        stop()
        asyncio.run_coroutine_threadsafe(server.drain(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def scrape_histogram(port: int) -> list[tuple[float, float]]:
    """Cumulative (le, count) of the Predict latency histogram, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    buckets = [
        (float(s.labels["le"]), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "adpredict_request_duration_seconds_bucket" and s.labels["method"] == "Predict"
    ]
    return sorted(buckets)


def test_alert_expressions_agree_with_the_traffic_sent(
    served: tuple[str, int], prometheus_bin: str, tmp_path: Path
) -> None:
    target, metrics_port = served
    with PredictionClient(target, timeout_s=10.0) as client:
        request = build_request(*example_request(client.metadata().schema, k=16, seed=1))
        client.predict_request(request)  # warm-up: the batcher and its series exist from here
    prom = Prometheus(prometheus_bin, tmp_path, f"127.0.0.1:{metrics_port}")
    try:
        total = 'sum(adpredict_requests_total{method="Predict"})'
        scrapes = 'count_over_time(adpredict_requests_total{method="Predict",code="OK"}[1m])'
        prom.wait(lambda: (prom.scalar(scrapes) or 0) >= 3, "3 scrapes")

        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.PredictionServiceStub(channel)
            for i in range(OK_REQUESTS):
                stub.Predict(request, timeout=10.0)
                if i % (OK_REQUESTS // TIMED_OUT) == 0:  # no deadline: the 50 µs SLA budget
                    with pytest.raises(grpc.RpcError) as caught:
                        stub.Predict(request)
                    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        sent = 1 + OK_REQUESTS + TIMED_OUT
        prom.wait(lambda: prom.scalar(total) == sent, f"Prometheus to see {sent} requests")
        stages = prom.query("sum by (stage) (adpredict_timeouts_total)")
        assert {r["metric"]["stage"]: float(r["value"][1]) for r in stages} == {
            "rejected_at_admission": TIMED_OUT,
            "expired_in_queue": 0,
            "late_after_compute": 0,
        }
        time.sleep(1.5)  # three rule evaluations after the last scrape

        # The timeout ratio the alert reads: 20 of the 220 requests sent in the window.
        ratio = prom.scalar('sum(adpredict:timeout_ratio:rate5m{job="adpredict"})')
        assert ratio is not None
        expected = TIMED_OUT / (OK_REQUESTS + TIMED_OUT)
        assert abs(ratio - expected) < 0.1 * expected, (ratio, expected)

        # The p99 the alert reads lies in the bucket of the server's own 99th-percentile
        # observation.
        p99 = prom.scalar('max(adpredict:request_latency_seconds:p99_5m{job="adpredict"})')
        assert p99 is not None
        buckets = scrape_histogram(metrics_port)
        rank = 0.99 * buckets[-1][1]
        upper = next(le for le, count in buckets if count >= rank)
        lower = max([0.0] + [le for le, count in buckets if count < rank])
        assert lower <= p99 <= upper, (lower, p99, upper, buckets)
        sla = prom.scalar('max(adpredict:sla_seconds{job="adpredict"})')
        assert sla == pytest.approx(0.000_05)
    finally:
        prom.stop()
