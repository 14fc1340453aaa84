"""Prometheus metrics of a serving process; the contract (names, labels, meaning) is docs/METRICS.md.

``ServingMetrics`` owns every metric of one serving process and plugs into the hooks the other
modules already expose, so none of them imports prometheus_client:

- ``ServingMetrics.observer`` is the servicer's ``ServiceObserver`` (RPC outcomes, latency, SLA)
  and hands each model's batcher a ``BatchObserver`` (batches, close reasons, queue waits,
  timeouts and refusals at admission);
- ``ServingMetrics.runtime_event`` is the model runtime's ``on_event`` (loads, load failures,
  model-dir problems);
- ``ServingMetrics.sample`` reads what is a level rather than an event (queue depth, models
  loaded, this process's CPU and memory); ``run_sampler`` calls it every ``interval_s``.

One process (``--workers 1``): the metrics are registered on a private ``CollectorRegistry``
(``single_process_registry``) served by that process, with prometheus_client's standard
``process_*``/``python_*`` collectors. Several workers: each worker writes its metrics to files in
a shared directory (prometheus_client's multiprocess mode, chosen by the
``PROMETHEUS_MULTIPROC_DIR`` environment variable the supervisor sets for its workers) and the
supervisor serves ``supervisor_registry``, which merges them: counters and histograms are summed
over every worker that ever wrote (so a restarted worker loses nothing), gauges as each one's
``multiprocess_mode`` says, over live workers only (``mark_worker_dead`` drops a dead one's).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from adpredict.errors import StartupError
from adpredict.serving.batcher import BatchObserver, BatchStats, RejectReason
from adpredict.serving.service import ServiceObserver

__all__ = [
    "LATENCY_BUCKETS_S",
    "MULTIPROC_ENV",
    "ServingMetrics",
    "TopologyCollector",
    "mark_worker_dead",
    "prepare_multiprocess_dir",
    "run_sampler",
    "single_process_registry",
    "supervisor_registry",
]

logger = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds. Dense from 0.25 ms to 100 ms so p50/p99/p99.9 read well in that range.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.006, 0.007,
    0.008, 0.009, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1,
    0.15, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
BATCH_PREDICTION_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(14))  # 1 .. 8192
BATCH_REQUEST_BUCKETS: tuple[float, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)

_TIMEOUT_AT_ADMISSION = "rejected_at_admission"
_TIMEOUT_IN_QUEUE = "expired_in_queue"
_TIMEOUT_LATE = "late_after_compute"
_TIMEOUT_IN_INTAKE = "expired_in_intake"
_TIMEOUT_INTAKE_DELAY = "rejected_in_intake"
# Native intake refusal -> (gRPC code, timeout stage or rejection reason).
_INTAKE = {
    "refused_overloaded": ("RESOURCE_EXHAUSTED", "intake_full"),
    "expired_before_pickup": ("DEADLINE_EXCEEDED", _TIMEOUT_IN_INTAKE),
    "cancelled_before_pickup": ("CANCELLED", ""),
    "refused_shutting_down": ("UNAVAILABLE", "shutting_down"),
    "refused_queue_delay": ("DEADLINE_EXCEEDED", _TIMEOUT_INTAKE_DELAY),
}
# ``*_created`` series double the output and no dashboard or alert reads them.
disable_created_metrics()

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adpredict")
    except PackageNotFoundError:
        return "unknown"


class ServingMetrics:
    """Every metric of one serving process. ``registry=None``: not registered anywhere (a worker
    in multiprocess mode, whose values go to files the supervisor reads)."""

    def __init__(self, registry: CollectorRegistry | None, *, sla_s: float) -> None:
        self.sla_s = float(sla_s)
        r = registry
        latency = LATENCY_BUCKETS_S
        self.requests = Counter(
            "adpredict_requests",
            "RPCs that ended, by gRPC status code.",
            ["method", "model", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "adpredict_request_duration_seconds",
            "Server-side latency of every RPC, any outcome.",
            ["method", "model"],
            buckets=latency,
            registry=r,
        )
        self.over_sla = Counter(
            "adpredict_requests_over_sla",
            "Predict RPCs answered OK but slower than the SLA.",
            ["model"],
            registry=r,
        )
        self.timeouts = Counter(
            "adpredict_timeouts",
            "Predict requests that missed their deadline, by stage.",
            ["model", "stage"],
            registry=r,
        )
        self.rejections = Counter(
            "adpredict_rejections",
            "Predict requests refused at admission without compute, by reason.",
            ["model", "reason"],
            registry=r,
        )
        self.cancellations = Counter(
            "adpredict_cancellations",
            "Requests whose caller went away while queued (dropped before compute).",
            ["model"],
            registry=r,
        )
        self.candidates = Counter(
            "adpredict_predicted_candidates",
            "Candidates in Predict requests that passed validation.",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "adpredict_in_flight_requests",
            "RPCs being handled now.",
            ["method"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.sla = Gauge(
            "adpredict_sla_seconds",
            "The configured SLA (budget of a request without a deadline; the over-SLA line).",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.queue_wait = Histogram(
            "adpredict_queue_wait_seconds",
            "Per request: admission to the start of the compute call that carried it.",
            ["model"],
            buckets=latency,
            registry=r,
        )
        self.compute = Histogram(
            "adpredict_compute_seconds",
            "Per compute call: merge, TensorFlow and split.",
            ["model"],
            buckets=latency,
            registry=r,
        )
        self.batch_predictions = Histogram(
            "adpredict_batch_predictions",
            "Predictions per compute call.",
            ["model"],
            buckets=BATCH_PREDICTION_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "adpredict_batch_requests",
            "Requests (whole or in part) per compute call.",
            ["model"],
            buckets=BATCH_REQUEST_BUCKETS,
            registry=r,
        )
        self.compute_calls = Counter(
            "adpredict_compute_calls",
            "Compute calls, by why the batch closed.",
            ["model", "reason"],
            registry=r,
        )
        self.compute_errors = Counter(
            "adpredict_compute_errors",
            "Compute calls that raised (all their requests got an error).",
            ["model"],
            registry=r,
        )
        self.predictions = Counter(
            "adpredict_predictions", "Predictions computed.", ["model"], registry=r
        )
        self.queue_requests = Gauge(
            "adpredict_queue_depth_requests",
            "Requests waiting in the batcher queue.",
            ["model"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.queue_predictions = Gauge(
            "adpredict_queue_depth_predictions",
            "Predictions waiting in the batcher queue.",
            ["model"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.model_version = Gauge(
            "adpredict_model_version",
            "The model version serving now.",
            ["model"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.model_fed_rows = Gauge(
            "adpredict_model_fed_rows",
            "1 while the serving version is fed table rows (serving_rows), 0 strings.",
            ["model"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.models_loaded = Gauge(
            "adpredict_models_loaded",
            "Models this process can serve; 0 means it answers nothing.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.model_loads = Counter(
            "adpredict_model_loads", "Model versions loaded and swapped in.", ["model"], registry=r
        )
        self.load_failures = Counter(
            "adpredict_model_load_failures",
            "Model versions rejected (corrupt, half-written, wrong schema...).",
            ["model"],
            registry=r,
        )
        self.last_load = Gauge(
            "adpredict_model_last_load_timestamp_seconds",
            "Unix time of the last successful load.",
            ["model"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.dir_problem = Gauge(
            "adpredict_model_dir_problem",
            "1 while the model directory is unreadable, missing or empty.",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.cpu = Counter(
            "adpredict_process_cpu_seconds",
            "CPU seconds (user + system) of the serving processes.",
            registry=r,
        )
        self.memory = Gauge(
            "adpredict_process_resident_memory_bytes",
            "Resident memory of the serving processes.",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.sla.set(self.sla_s)
        self.models_loaded.set(0)
        self.dir_problem.set(0)
        for method in ("Predict", "GetModelMetadata"):
            self.in_flight.labels(method).set(0)
        self._cpu_seen = 0.0
        self.observer = _ServiceMetrics(self)

    # ------------------------------------------------------------------------------- runtime

    def runtime_event(self, event: Any) -> None:
        """``ModelRuntime(on_event=...)``: called from the loader thread."""
        if event.kind == "loaded":
            self.model_loads.labels(event.name).inc()
            self.model_version.labels(event.name).set(event.version)
            self.model_fed_rows.labels(event.name).set(1 if event.fed_rows else 0)
            self.last_load.labels(event.name).set(time.time())
        elif event.kind == "failed":
            self.load_failures.labels(event.name).inc()
        elif event.kind == "dir_problem":
            self.dir_problem.set(1)
        elif event.kind == "dir_ok":
            self.dir_problem.set(0)

    # ------------------------------------------------------------------------------- levels

    def sample(self, runtime: Any | None, batchers: dict[str, Any]) -> None:
        """Set the level gauges: queue depths, models loaded, this process's CPU and memory."""
        for name, batcher in list(batchers.items()):
            self.queue_requests.labels(name).set(batcher.queued_requests)
            self.queue_predictions.labels(name).set(batcher.queued_predictions)
        if runtime is not None:
            self.models_loaded.set(len(runtime.names()))
        times = os.times()
        cpu = times.user + times.system
        if cpu > self._cpu_seen:
            self.cpu.inc(cpu - self._cpu_seen)
            self._cpu_seen = cpu
        rss = _resident_bytes()
        if rss is not None:
            self.memory.set(rss)


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


async def run_sampler(
    metrics: ServingMetrics,
    levels: Callable[[], tuple[Any | None, dict[str, Any]]],
    interval_s: float = 1.0,
) -> None:
    """Call ``metrics.sample(*levels())`` now and every ``interval_s`` until cancelled.

    A failure is logged once (with its traceback) until a sample succeeds again."""
    failing = False
    while True:
        try:
            metrics.sample(*levels())
            failing = False
        except Exception:
            if not failing:
                logger.exception("metrics sampler failed (logged once until it recovers)")
            failing = True
        await asyncio.sleep(interval_s)


class _ServiceMetrics(ServiceObserver):
    """The servicer's hooks. Labelled children are cached: ``labels()`` costs microseconds."""

    def __init__(self, m: ServingMetrics) -> None:
        self._m = m
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, made once per label set."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def batch_observer(self, model: str) -> BatchObserver:
        # The Predict outcomes alerts divide by exist from the start, at 0: rate() over a
        # series that appears only with its first event would miss that event.
        for code in _PREDICT_CODES:
            self._child(self._m.requests, "Predict", model, code)
        self._child(self._m.over_sla, model)
        return _BatchMetrics(self._m, model)

    def request_started(self, method: str) -> None:
        self._child(self._m.in_flight, method).inc()

    def request_decoded(self, model: str, candidates: int, missing: int) -> None:
        self._child(self._m.candidates, model).inc(candidates)

    def request_late(self, model: str) -> None:
        self._child(self._m.timeouts, model, _TIMEOUT_LATE).inc()

    def intake_refused(self, method: str, reason: str, count: int) -> None:
        # The model is unknown here (the request was never parsed): model="".
        code, kind = _INTAKE[reason]
        self._child(self._m.requests, method, "", code).inc(count)
        if method != "Predict":
            return
        if code == "CANCELLED":
            self._child(self._m.cancellations, "").inc(count)
        elif code == "DEADLINE_EXCEEDED":
            self._child(self._m.timeouts, "", kind).inc(count)
        else:
            self._child(self._m.rejections, "", kind).inc(count)

    def intake_refusal_times(self, method: str, seconds: Sequence[float]) -> None:
        # Every RPC's duration, these too (model="", as their count in intake_refused).
        duration = self._child(self._m.request_duration, method, "")
        for s in seconds:
            duration.observe(s)

    def request_done(self, method: str, model: str, code: grpc.StatusCode, seconds: float) -> None:
        self._child(self._m.requests, method, model, code.name).inc()
        self._child(self._m.request_duration, method, model).observe(seconds)
        self._child(self._m.in_flight, method).dec()
        if code is grpc.StatusCode.OK and method == "Predict" and seconds > self._m.sla_s:
            self._child(self._m.over_sla, model).inc()


class _BatchMetrics(BatchObserver):
    """One model's batcher hooks, with that model's labelled children bound once."""

    def __init__(self, m: ServingMetrics, model: str) -> None:
        self._queue_wait = m.queue_wait.labels(model)
        self._compute = m.compute.labels(model)
        self._batch_predictions = m.batch_predictions.labels(model)
        self._batch_requests = m.batch_requests.labels(model)
        self._calls = {r: m.compute_calls.labels(model, r) for r in _CLOSE_REASONS}
        self._errors = m.compute_errors.labels(model)
        self._predictions = m.predictions.labels(model)
        self._timeouts = {
            s: m.timeouts.labels(model, s)
            for s in (_TIMEOUT_AT_ADMISSION, _TIMEOUT_IN_QUEUE, _TIMEOUT_LATE)
        }
        self._rejections = {
            r: m.rejections.labels(model, r) for r in ("queue_full", "shutting_down")
        }
        self._cancellations = m.cancellations.labels(model)

    def batch_completed(self, stats: BatchStats) -> None:
        self._calls[stats.reason].inc()
        self._compute.observe(stats.compute_s)
        self._batch_predictions.observe(stats.predictions)
        self._batch_requests.observe(stats.requests)
        for q in stats.queue_s:
            self._queue_wait.observe(q)
        if stats.error is None:
            self._predictions.inc(stats.predictions)
        else:
            self._errors.inc()

    def request_rejected(self, reason: RejectReason, size: int) -> None:
        if reason == "deadline":
            self._timeouts[_TIMEOUT_AT_ADMISSION].inc()
        else:
            self._rejections[reason].inc()

    def request_expired(self, queue_s: float, size: int) -> None:
        self._timeouts[_TIMEOUT_IN_QUEUE].inc()

    def request_cancelled(self, queue_s: float, size: int) -> None:
        self._cancellations.inc()


_CLOSE_REASONS = ("full", "max_wait", "deadline", "drain")
_PREDICT_CODES = ("OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL")


# ---- registries ---------------------------------------------------------------------------


class TopologyCollector(Collector):
    """``adpredict_workers``, ``adpredict_worker_restarts_total`` and ``adpredict_build_info``,
    read from ``state()`` = (workers alive, restarts) at each scrape."""

    def __init__(self, state: Callable[[], tuple[int, int]]) -> None:
        self._state = state
        self._version = _version()

    def collect(self) -> Iterator[Metric]:
        alive, restarts = self._state()
        yield GaugeMetricFamily("adpredict_workers", "Serving processes alive.", value=alive)
        yield CounterMetricFamily(
            "adpredict_worker_restarts",
            "Workers the supervisor restarted after they died.",
            value=restarts,
        )
        info = GaugeMetricFamily(
            "adpredict_build_info", "Always 1; the adpredict version.", labels=["version"]
        )
        info.add_metric([self._version], 1)
        yield info


def single_process_registry() -> CollectorRegistry:
    """A fresh registry with the standard process/platform/GC collectors and the topology of a
    lone serving process; ``ServingMetrics(registry)`` adds the rest."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    registry.register(TopologyCollector(lambda: (1, 0)))
    return registry


def supervisor_registry(path: Path, state: Callable[[], tuple[int, int]]) -> CollectorRegistry:
    """The supervisor's registry: every worker's metrics merged from ``path``, and topology."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    registry.register(TopologyCollector(state))
    return registry


def mark_worker_dead(path: Path, pid: int) -> None:
    """Forget a dead worker's live gauges (its counters and histograms keep counting)."""
    try:
        mark_process_dead(pid, str(path))
    except OSError:
        logger.exception("could not drop the metrics files of worker pid %d", pid)


def prepare_multiprocess_dir(path: Path | None) -> tuple[Path, Callable[[], None]]:
    """The directory workers write their metrics to, emptied of old metric files, and a
    function that cleans up after the run.

    ``None``: a private temporary directory, removed afterwards. A given directory is created
    if missing and must be writable; its ``*.db`` files (left by an earlier run, which would
    otherwise be counted again) are removed now and at the end. ``StartupError`` names the
    directory and what is wrong with it.
    """
    if path is None:
        made = Path(tempfile.mkdtemp(prefix="adpredict-metrics-"))
        return made, lambda: shutil.rmtree(made, ignore_errors=True)
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        with tempfile.NamedTemporaryFile(dir=path, prefix=".adpredict-probe-"):
            pass  # it can be written
        for old in path.glob("*.db"):
            old.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StartupError(f"cannot use metrics dir {path} for worker metrics: {reason}") from None

    def clean() -> None:
        for old in path.glob("*.db"):
            with contextlib.suppress(OSError):
                old.unlink()

    return path, clean
