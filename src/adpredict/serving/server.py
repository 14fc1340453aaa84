"""Server lifecycle: options, one serving process, and a supervisor for several.

``adpredict serve`` runs ``serve_forever`` (``--workers 1``) or ``Supervisor`` (``--workers N``).

One serving process
    Start-up, in this order: check the options, bind the metrics port, check that the model dir
    exists and the gRPC port is free (before the slow part, so these are reported at once),
    import TensorFlow and ``gc.freeze()`` its objects (see ``_import_runtime_and_freeze``), load
    and warm up every model (``ModelRuntime``), start the batchers, and only then bind the gRPC
    port and report SERVING. A process therefore never listens before it can answer: with several workers sharing
    a port, the kernel hands new connections only to workers that are ready, also while one
    restarts. Health (``grpc.health.v1``, for ``""`` and ``adpredict.v1.PredictionService``) is
    NOT_SERVING until then, SERVING after, and NOT_SERVING again from the start of a drain.
    Server reflection is on, so ``grpcurl`` works without the proto. ``frontend="native"`` serves
    the same through the C++ intake (``adpredict.serving.intake``; no reflection there).

Shutdown (SIGTERM or SIGINT)
    Health goes NOT_SERVING, the server stops accepting RPCs (new ones get UNAVAILABLE), RPCs
    already accepted finish within ``grace_s`` (queued requests still go through the batcher and
    the model), then the batchers and the runtime stop and the process exits 0. A second signal
    while draining is ignored; RPCs still running after ``grace_s`` are cancelled.

Several workers (``--workers N``, default the number of cores)
    A supervisor process (no TensorFlow) starts N serving processes that each bind the same port
    with ``SO_REUSEPORT``; the kernel spreads connections across them. Each has its own runtime and
    batchers, and TensorFlow pools of ``cores // N`` threads unless set. The supervisor restarts a
    worker that dies (after 0.5 s, doubling up to 30 s while it keeps dying young), forwards
    SIGTERM/SIGINT to the workers as SIGTERM, waits for them and exits 0 if all exited 0. If a
    worker cannot start at all before any was ready (no servable model...), the supervisor stops
    and exits with that error. Workers exit when the supervisor disappears. Port 0 (any free port)
    cannot be shared and is refused with several workers.

Binding
    ``host`` defaults to loopback (127.0.0.1): without TLS the service has no encryption or
    authentication, so exposing it is a deliberate ``--host 0.0.0.0`` (or ``[::]``) in the
    deployment, never an accident on a laptop. ``tls_cert``/``tls_key`` make the gRPC port
    (Predict, health, reflection) TLS-only; ``tls_client_ca`` adds mutual TLS: clients must
    present a certificate signed by that CA (see ``adpredict.serving.tls``). The files are
    checked before TensorFlow loads, and a bad one is a ``StartupError`` naming it. The metrics endpoint (``metrics_port``, 0 disables it) binds the same
    host; it serves ``prometheus_client``'s default registry from the process that owns the
    port (the supervisor, with several workers, until per-worker aggregation exists).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import importlib
import json
import logging
import math
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adpredict.errors import AdpredictError, StartupError
from adpredict.serving import metrics as m
from adpredict.serving.batcher import BatcherOptions
from adpredict.serving.service import PredictionServicer
from adpredict.serving.tls import server_credentials
from adpredict.v1 import prediction_service_pb2 as pb

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from adpredict.serving.runtime import ModelRuntime

__all__ = [
    "DEFAULT_METRICS_PORT",
    "DEFAULT_PORT",
    "SERVICE_NAME",
    "PredictionServer",
    "ReadyInfo",
    "ServerOptions",
    "StartupError",
    "Supervisor",
    "configure_logging",
    "default_workers",
    "serve_forever",
]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9090
SERVICE_NAME = "adpredict.v1.PredictionService"
EXIT_STARTUP = 2  # a worker's start-up error (AdpredictError): no servable model, port taken...
_RESTART_FIRST_S = 0.5
_RESTART_MAX_S = 30.0
_HEALTHY_RUN_S = 30.0  # a worker that served this long before dying restarts after the first delay
_PARENT_CHECK_S = 1.0
_RUNTIME_MODULE = "adpredict.serving.runtime"


FRONTENDS = ("grpcio", "native")


def default_workers() -> int:
    """The number of cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ServerOptions:
    """Everything ``adpredict serve`` can be told. Units are in the names; see the module doc."""

    model_dir: Path
    host: str = "127.0.0.1"  # loopback by default: no TLS/auth, so exposure must be deliberate
    port: int = DEFAULT_PORT  # 0: any free port (only with workers == 1)
    metrics_port: int = DEFAULT_METRICS_PORT  # Prometheus endpoint; 0 disables it
    metrics_host: str = ""  # address of the metrics endpoint; "" = the same as host
    metrics_dir: str = ""  # where workers write metrics (--workers > 1); "" = a private temp dir
    workers: int = 1  # serving processes sharing the port; 1 = no supervisor
    max_batch_size: int = 4096  # predictions per compute call (1 = every request alone)
    max_wait_ms: float = 0.0  # wait for company while a thread is free (0: continuous batching)
    sla_ms: float = 20.0  # budget of a request that carries no gRPC deadline
    admit_within_sla: bool = False  # refuse requests predicted to answer after sla_ms, too
    safety_margin_ms: float = 1.0  # compute must be predicted to end this long before a deadline
    queue_limit: int = 8192  # queued predictions per model; beyond it RESOURCE_EXHAUSTED
    compute_threads: int = 1  # batches computed at once per model
    no_batching: bool = False  # compute every request alone, whole, in one call
    max_candidates: int = 1024  # candidates per request
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC send/receive limit per message
    # RPCs (any method, health included) in progress at once; beyond it RESOURCE_EXHAUSTED.
    # Above what the batcher can hold with the defaults (8192 queued + 4096 computing K=1
    # requests), so it bounds tasks and memory without refusing work the queue would take.
    max_concurrent_rpcs: int = 16_384  # 0 = unlimited
    # Who receives RPCs: "grpcio" (grpc.aio on the event loop) or "native" (the C++ intake,
    # adpredict.serving.intake: no reflection; max_concurrent_rpcs bounds calls held by Python).
    frontend: str = "grpcio"
    # With the native front end: SCHED_RR priority of grpc++'s and the intake's threads, so an
    # arriving call is read and judged before compute resumes (0 = normal; needs CAP_SYS_NICE).
    io_priority: int = 0
    tls_cert: str = ""  # PEM certificate chain: the gRPC port is TLS-only ("" = plaintext)
    tls_key: str = ""  # PEM private key of tls_cert (unencrypted)
    tls_client_ca: str = ""  # PEM CA bundle: clients need a certificate it signed (mTLS)
    poll_interval_s: float = 2.0  # how often the model dir is checked for new versions
    grace_s: float = 5.0  # drain time for in-flight RPCs on shutdown
    intra_op_threads: int = 0  # TensorFlow intra-op pool; 0 = automatic (see tf_threads)
    inter_op_threads: int = 0  # TensorFlow inter-op pool; 0 = automatic
    default_model: str = ""  # model answering requests without a name; "" = automatic
    warmup_batches: int = 4  # synthetic batches each version runs before it serves

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        problems = list(self._problems())
        if problems:
            raise StartupError("invalid server options: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        out = []

        def integer(name: str, low: int, high: int | None = None) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                out.append(f"{name} must be an integer, got {value!r}")
            elif value < low or (high is not None and value > high):
                bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
                out.append(f"{name} must be {bound}, got {value}")

        def number(name: str, *, positive: bool) -> None:
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value < 0 or (positive and value == 0):
                out.append(
                    f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}"
                )

        if not str(self.host).strip():
            out.append("host must not be empty")
        integer("port", 0, 65535)
        integer("metrics_port", 0, 65535)
        integer("workers", 1, 1024)
        integer("max_batch_size", 1)
        integer("queue_limit", 1)
        integer("compute_threads", 1, 256)
        integer("max_candidates", 1)
        integer("max_message_bytes", 1024)
        integer("max_concurrent_rpcs", 0)
        integer("io_priority", 0, 99)
        integer("intra_op_threads", 0, 1024)
        integer("inter_op_threads", 0, 1024)
        integer("warmup_batches", 1, 100)
        number("max_wait_ms", positive=False)
        number("sla_ms", positive=True)
        number("safety_margin_ms", positive=False)
        number("poll_interval_s", positive=True)
        number("grace_s", positive=False)
        if out:
            return out
        if self.workers > 1 and self.port == 0:
            out.append(
                f"--workers {self.workers} needs an explicit --port: port 0 (any free port) "
                f"would give each worker a different port"
            )
        if self.metrics_port and self.metrics_port == self.port and self.metrics_bind == self.host:
            out.append(f"metrics_port and port are both {self.port}")
        if self.frontend not in FRONTENDS:
            out.append(f"frontend must be one of {list(FRONTENDS)}, got {self.frontend!r}")
        if self.io_priority and self.frontend != "native":
            out.append(
                f"io_priority {self.io_priority} needs frontend 'native' (it sets the priority "
                f"of the C++ intake's threads), got {self.frontend!r}"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            out.append("tls_cert and tls_key go together: give both (TLS) or neither")
        if self.tls_client_ca and not self.tls_cert:
            out.append("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.queue_limit < self.max_candidates:
            out.append(
                f"queue_limit ({self.queue_limit}) must be >= max_candidates "
                f"({self.max_candidates}), or the largest requests could never be queued"
            )
        if not self.no_batching and self.queue_limit < self.max_batch_size:
            out.append(
                f"queue_limit ({self.queue_limit}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches could never fill"
            )
        return out

    @property
    def batching(self) -> bool:
        """False with ``no_batching`` or ``max_batch_size == 1``: one compute call per request."""
        return not self.no_batching and self.max_batch_size > 1

    @property
    def metrics_bind(self) -> str:
        """The address the metrics endpoint binds: ``metrics_host``, else ``host``."""
        return self.metrics_host.strip() or self.host

    def batcher_options(self) -> BatcherOptions:
        """The ``BatcherOptions`` these options describe."""
        return BatcherOptions(
            max_batch_size=self.max_batch_size,
            max_wait_s=self.max_wait_ms / 1e3,
            queue_limit=self.queue_limit,
            safety_margin_s=self.safety_margin_ms / 1e3,
            compute_threads=self.compute_threads,
            batching=self.batching,
        )

    def tf_threads(self) -> tuple[int | None, int | None]:
        """(intra, inter) TensorFlow pool sizes; automatic = TF's default for one worker, else
        ``cores // workers`` each, so that workers x threads stays near the core count."""
        auto = None if self.workers == 1 else max(1, default_workers() // self.workers)
        return (self.intra_op_threads or auto, self.inter_op_threads or auto)

    def to_json(self) -> str:
        raw = {f.name: getattr(self, f.name) for f in fields(self)}
        raw["model_dir"] = str(self.model_dir)
        return json.dumps(raw)

    @classmethod
    def from_json(cls, text: str) -> ServerOptions:
        return cls(**json.loads(text))

    def grpc_address(self) -> str:
        return f"{_bracketed(self.host)}:{self.port}"

    def client_target(self, port: int | None = None) -> str:
        """Where a client on this machine reaches the server (wildcard hosts -> loopback)."""
        host = self.host.strip("[]")
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return f"{_bracketed(host)}:{self.port if port is None else port}"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _bare(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _import_runtime_and_freeze() -> Any:
    """Import the model runtime (and TensorFlow), then ``gc.freeze()`` everything so far.

    TensorFlow's import leaves ~270k long-lived objects that every full garbage collection
    would scan (~0.3 s with the GIL held: a latency spike for every request in flight). Frozen,
    they are skipped; a model version adds only a few thousand objects, so the collection that
    frees a replaced version takes milliseconds. Models are loaded after this, unfrozen, so
    replaced versions can still be collected.
    """
    module = importlib.import_module(_RUNTIME_MODULE)
    gc.collect()
    gc.freeze()
    return module


def check_port_free(host: str, port: int, what: str = "gRPC port") -> None:
    """``StartupError`` if ``host:port`` cannot be bound now (in use, or not a local address)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(
            _bare(host), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # Like gRPC's own listener: a port held only by TIME_WAIT connections is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise StartupError(
                f"cannot listen on {_bracketed(host)}:{port} ({what}): {reason}"
            ) from None


def tls_credentials(options: ServerOptions) -> grpc.ServerCredentials | None:
    """The gRPC port's TLS credentials (``None``: plaintext); ``StartupError`` names a bad file."""
    if not options.tls_cert:
        return None
    return server_credentials(options.tls_cert, options.tls_key, options.tls_client_ca or None)


def start_metrics_endpoint(
    host: str, port: int, registry: CollectorRegistry
) -> Callable[[], None] | None:
    """Serve ``registry`` on ``http://host:port/metrics`` (port 0: none); returns a function
    that stops it."""
    if port == 0:
        return None
    import prometheus_client

    try:
        httpd, thread = prometheus_client.start_http_server(
            port, addr=_bare(host), registry=registry
        )
    except OSError as exc:
        reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise StartupError(
            f"cannot listen on {_bracketed(host)}:{port} (metrics port): {reason}"
        ) from None
    logger.info("metrics on http://%s:%d/metrics", _bracketed(host), port)

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return stop


def configure_logging(level: str = "INFO", *, worker: int | None = None) -> None:
    """One line per event on stderr: time, level, pid (and worker index), logger, message."""
    who = f"[{os.getpid()} w{worker}]" if worker is not None else f"[{os.getpid()}]"
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {who} %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


@dataclass(frozen=True)
class ReadyInfo:
    """What a ready server reports: where it listens and which model versions it serves."""

    target: str  # host:port a local client can use
    address: str  # the bound address
    port: int
    models: dict[str, int]
    default_model: str
    workers: int = 1

    def describe(self) -> str:
        models = ", ".join(f"{n} v{v}" for n, v in sorted(self.models.items()))
        return (
            f"adpredict serving on {self.address} ({self.workers} worker"
            f"{'s' if self.workers != 1 else ''}; models: {models or '?'}; "
            f"default: {self.default_model or '?'})"
        )


class PredictionServer:
    """One serving process's gRPC server: runtime, servicer, health and reflection.

    ``await start()`` loads the models and binds the port (see the module docstring for the
    order); ``await drain()`` shuts it down gracefully. ``reuse_port`` lets several processes
    bind the same port (``SO_REUSEPORT``); without it, a taken port is a ``StartupError``.
    """

    def __init__(
        self,
        options: ServerOptions,
        *,
        reuse_port: bool = False,
        metrics: m.ServingMetrics | None = None,
    ) -> None:
        self.options = options
        self.reuse_port = reuse_port
        self.metrics = metrics
        self._sampler: asyncio.Task[None] | None = None
        self.health = health.aio.HealthServicer()
        self.runtime: ModelRuntime | None = None
        self.servicer: PredictionServicer | None = None
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._native: Any = None  # intake.NativeFrontend with frontend="native"
        self._draining = False

    async def _set_health(self, serving: bool) -> None:
        if self._native is not None:
            self._native.set_serving(serving)
        status = health_pb2.HealthCheckResponse
        value = status.SERVING if serving else status.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, value)

    async def start(self) -> ReadyInfo:
        """Load models, start batchers, bind, report SERVING. ``StartupError`` etc. on failure."""
        opts = self.options
        await self._set_health(False)
        if not opts.model_dir.is_dir():
            raise StartupError(f"model dir {opts.model_dir} does not exist or is not a directory")
        credentials = tls_credentials(opts)
        if opts.frontend == "native":
            from adpredict.serving import intake

            if not intake.available():
                raise StartupError(
                    f"--frontend native: the native intake is not built into this installation "
                    f"({intake.unavailable_reason()}); run `make native-deps` and reinstall, or "
                    f"use --frontend grpcio"
                )
        if not self.reuse_port:
            check_port_free(opts.host, opts.port)
        # TensorFlow is imported here, by serving processes only (never by the supervisor), and
        # in a thread: the event loop keeps handling signals during the seconds it takes.
        runtime_module = await asyncio.to_thread(_import_runtime_and_freeze)

        intra, inter = opts.tf_threads()
        self.runtime = runtime_module.ModelRuntime(
            opts.model_dir,
            poll_interval_s=opts.poll_interval_s,
            warmup_batches=opts.warmup_batches,
            default_model=opts.default_model or None,
            intra_op_threads=intra,
            inter_op_threads=inter,
            on_event=self.metrics.runtime_event if self.metrics else None,
        )
        await self.runtime.start()
        try:
            self.servicer = PredictionServicer(
                self.runtime,
                opts.batcher_options(),
                sla_s=opts.sla_ms / 1e3,
                admit_within_sla=opts.admit_within_sla,
                max_candidates=opts.max_candidates,
                observer=self.metrics.observer if self.metrics else None,
            )
        except ValueError as exc:
            raise StartupError(f"invalid server options: {exc}") from None
        await self.servicer.start()
        if self.metrics is not None:
            self._sampler = asyncio.create_task(
                m.run_sampler(self.metrics, self._levels), name="adpredict-metrics-sampler"
            )
        if opts.frontend == "native":
            port = await self._start_native()
        else:
            port = await self._start_grpcio(credentials)
        self.port = port
        await self._set_health(True)
        info = ReadyInfo(
            target=opts.client_target(port),
            address=f"{_bracketed(opts.host)}:{port}",
            port=port,
            models=self.runtime.versions(),
            default_model=self.runtime.default_name,
        )
        logger.info("serving on %s (health SERVING)", info.address)
        return info

    async def _start_grpcio(self, credentials: grpc.ServerCredentials | None) -> int:
        opts = self.options
        assert self.servicer is not None
        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", opts.max_message_bytes),
                ("grpc.max_receive_message_length", opts.max_message_bytes),
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
            ],
            maximum_concurrent_rpcs=opts.max_concurrent_rpcs or None,
        )
        self.servicer.add_to_server(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                pb.DESCRIPTOR.services_by_name["PredictionService"].full_name,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            if credentials is None:
                port = server.add_insecure_port(opts.grpc_address())
            else:
                port = server.add_secure_port(opts.grpc_address(), credentials)
        except RuntimeError as exc:
            raise StartupError(
                f"cannot listen on {opts.grpc_address()} (gRPC port): {exc}"
            ) from None
        if port == 0:
            raise StartupError(f"cannot listen on {opts.grpc_address()} (gRPC port)")
        self._server = server
        await server.start()
        return port

    async def _start_native(self) -> int:
        from adpredict.serving.intake import NativeFrontend

        opts = self.options
        assert self.servicer is not None
        self._native = NativeFrontend(
            self.servicer,
            address=opts.grpc_address(),
            max_pending=opts.max_concurrent_rpcs or 2**31 - 1,
            max_message_bytes=opts.max_message_bytes,
            reuse_port=self.reuse_port,
            tls_cert=opts.tls_cert,
            tls_key=opts.tls_key,
            tls_client_ca=opts.tls_client_ca,
            io_priority=opts.io_priority,
        )
        return await self._native.start()

    def _levels(self) -> tuple[ModelRuntime | None, dict[str, Any]]:
        batchers = dict(self.servicer.batchers()) if self.servicer is not None else {}
        return self.runtime, batchers

    async def drain(self) -> None:
        """NOT_SERVING, refuse new RPCs, finish accepted ones within ``grace_s``, release all."""
        if self._draining:
            return
        self._draining = True
        grace = self.options.grace_s
        await self.health.enter_graceful_shutdown()
        frontend = self._native if self._native is not None else self._server
        if frontend is not None:  # grpc.aio.Server and NativeFrontend both stop(grace)
            logger.info(
                "draining: health NOT_SERVING, finishing in-flight RPCs (grace %.1fs)", grace
            )
            started = time.monotonic()
            await frontend.stop(grace)
            logger.info("gRPC server stopped after %.2fs", time.monotonic() - started)
        if self.servicer is not None:
            await self.servicer.close(grace)
        if self.runtime is not None:
            await self.runtime.stop()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None


async def serve_forever(
    options: ServerOptions,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[ReadyInfo], None] | None = None,
    watch_parent: bool = False,
) -> None:
    """Run one serving process until SIGTERM/SIGINT, then drain (see the module docstring).

    Start-up errors propagate (``AdpredictError``). ``watch_parent``: also drain if the parent
    process goes away (a supervised worker must not outlive its supervisor).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.info("%s received again while draining; ignored", signal.Signals(signum).name)
            return
        logger.info("%s received", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    watcher = asyncio.create_task(_watch_parent(stop)) if watch_parent else None
    stop_metrics = None
    sla_s = options.sla_ms / 1e3
    if reuse_port:  # a supervised worker: the supervisor serves what it writes to files
        metrics = m.ServingMetrics(None, sla_s=sla_s)
    else:
        registry = m.single_process_registry()
        metrics = m.ServingMetrics(registry, sla_s=sla_s)
    server = PredictionServer(options, reuse_port=reuse_port, metrics=metrics)
    stopping = asyncio.create_task(stop.wait())
    try:
        if not reuse_port:
            stop_metrics = start_metrics_endpoint(
                options.metrics_bind, options.metrics_port, registry
            )
        starting = asyncio.create_task(server.start())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            logger.info("stopping before start-up finished")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        else:
            info = starting.result()  # re-raises a start-up error
            if on_ready is not None:
                on_ready(info)
            await stopping
    finally:
        stopping.cancel()
        await server.drain()
        if watcher is not None:
            watcher.cancel()
        if stop_metrics is not None:
            stop_metrics()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    logger.info("stopped")


async def _watch_parent(stop: asyncio.Event) -> None:
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(_PARENT_CHECK_S)
        if os.getppid() != parent:
            logger.error("supervisor (pid %d) is gone; shutting down", parent)
            stop.set()


# ---- supervised worker process ---------------------------------------------------------------
_WORKER_CODE = "from adpredict.serving.server import worker_entry; worker_entry()"


def worker_entry() -> None:
    """``worker_main``, then exit at once: the worker released everything it used while
    draining, and skipping the interpreter's teardown (TensorFlow's and gRPC's C++ destructors,
    ~1.5 s) lets a stopping or restarting supervisor finish seconds sooner."""
    code = worker_main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def worker_main(argv: list[str] | None = None) -> int:
    """Entry of a worker process: ``argv = [options_json, index, ready_fd, log_level]``."""
    args = sys.argv[1:] if argv is None else argv
    options = ServerOptions.from_json(args[0])
    index, ready_fd, level = int(args[1]), int(args[2]), args[3]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    configure_logging(level, worker=index)

    def on_ready(info: ReadyInfo) -> None:
        models = ",".join(f"{n}:{v}" for n, v in sorted(info.models.items()))
        os.write(ready_fd, f"ready {info.port} {info.default_model} {models}\n".encode())

    try:
        asyncio.run(serve_forever(options, reuse_port=True, on_ready=on_ready, watch_parent=True))
    except AdpredictError as exc:  # the supervisor reports it
        message = " ".join(str(exc).split())
        with contextlib.suppress(OSError):
            os.write(ready_fd, f"error {message}\n".encode())
        logger.error("cannot start: %s", message)
        return EXIT_STARTUP
    finally:
        with contextlib.suppress(OSError):
            os.close(ready_fd)
    return 0


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None
    buffer: bytes = b""
    started_at: float = 0.0
    ready_at: float | None = None
    error: str = ""  # the start-up error the worker reported, if any
    failures: int = 0  # consecutive deaths of young workers
    restart_at: float | None = None
    ever_ready: bool = False
    stopping: bool = False  # was running when the supervisor forwarded SIGTERM


class Supervisor:
    """Runs ``options.workers`` serving processes on one port (see the module docstring).

    ``run()`` blocks until they all stopped and returns the exit status. ``on_ready`` is called
    once, when every worker first reported ready.
    """

    def __init__(
        self,
        options: ServerOptions,
        *,
        on_ready: Callable[[ReadyInfo], None] | None = None,
        log_level: str = "INFO",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self._on_ready = on_ready
        self._log_level = log_level
        self._clock = clock
        self._slots = [_Slot(i) for i in range(options.workers)]
        self._stop_signal: int | None = None
        self._announced = False
        self._models: dict[str, int] = {}
        self._default = ""
        self._fatal: str | None = None  # a start-up error that makes restarting pointless
        self._metrics_dir: Path | None = None  # where workers write metrics (multiprocess mode)
        self._restarts = 0

    def run(self) -> int:
        opts = self.options
        if not opts.model_dir.is_dir():
            raise StartupError(f"model dir {opts.model_dir} does not exist or is not a directory")
        tls_credentials(opts)  # a bad file is reported now, not by every worker
        check_port_free(opts.host, opts.port)
        stop_metrics = clean_metrics = None
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            if opts.metrics_port:
                check_port_free(opts.metrics_bind, opts.metrics_port, "metrics port")
                wanted = Path(opts.metrics_dir) if opts.metrics_dir else None
                self._metrics_dir, clean_metrics = m.prepare_multiprocess_dir(wanted)
                registry = m.supervisor_registry(self._metrics_dir, self._topology)
                stop_metrics = start_metrics_endpoint(
                    opts.metrics_bind, opts.metrics_port, registry
                )
            intra, inter = opts.tf_threads()
            logger.info(
                "starting %d workers on %s (TensorFlow threads per worker: intra %s, inter %s)",
                opts.workers,
                opts.grpc_address(),
                intra or "default",
                inter or "default",
            )
            for slot in self._slots:
                self._spawn(slot)
            return self._loop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for slot in self._slots:
                self._close_pipe(slot)
            if stop_metrics is not None:
                stop_metrics()
            if clean_metrics is not None:
                clean_metrics()

    def _topology(self) -> tuple[int, int]:
        """(workers alive, restarts) for the metrics endpoint (called from its thread)."""
        alive = sum(1 for s in self._slots if s.proc is not None and s.proc.poll() is None)
        return alive, self._restarts

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._stop_signal is None:
            self._stop_signal = signum

    def _spawn(self, slot: _Slot) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        cmd = [
            sys.executable,
            "-c",
            _WORKER_CODE,
            self.options.to_json(),
            str(slot.index),
            str(write_fd),
            self._log_level,
        ]
        env = dict(os.environ)
        if self._metrics_dir is not None:
            env[m.MULTIPROC_ENV] = str(self._metrics_dir)
        if slot.proc is not None:
            self._restarts += 1
        try:
            slot.proc = subprocess.Popen(cmd, pass_fds=(write_fd,), env=env)
        finally:
            os.close(write_fd)
        self._close_pipe(slot)
        slot.ready_fd, slot.buffer = read_fd, b""
        slot.started_at, slot.ready_at, slot.restart_at = self._clock(), None, None
        logger.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    @staticmethod
    def _close_pipe(slot: _Slot) -> None:
        if slot.ready_fd is not None:
            with contextlib.suppress(OSError):
                os.close(slot.ready_fd)
            slot.ready_fd = None

    def _loop(self) -> int:
        forwarded_at: float | None = None
        deadline_extra_s = 30.0  # beyond grace_s: TensorFlow teardown, batcher close
        while True:
            self._read_ready(timeout_s=0.1)
            now = self._clock()
            if self._stop_signal is not None and forwarded_at is None:
                logger.info(
                    "%s received: stopping %d workers (grace %.1fs)",
                    signal.Signals(self._stop_signal).name,
                    len(self._slots),
                    self.options.grace_s,
                )
                forwarded_at = now
                for slot in self._slots:
                    slot.restart_at = None
                    if slot.proc is not None and slot.proc.poll() is None:
                        slot.stopping = True
                        slot.proc.send_signal(signal.SIGTERM)
            for slot in self._slots:
                code = slot.proc.poll() if slot.proc is not None else None
                if slot.proc is None or code is None or slot.restart_at is not None:
                    continue
                if forwarded_at is not None:
                    continue
                fatal = self._on_exit(slot, code, now)
                if fatal is not None:
                    self._fatal = fatal
                    self._stop_signal = signal.SIGTERM
            if forwarded_at is not None:
                alive = [s for s in self._slots if s.proc is not None and s.proc.poll() is None]
                if not alive:
                    return self._final_status()
                if now - forwarded_at > self.options.grace_s + deadline_extra_s:
                    for slot in alive:
                        logger.error(
                            "worker %d (pid %d) did not stop in time; killing it",
                            slot.index,
                            slot.proc.pid,
                        )  # type: ignore[union-attr]
                        slot.proc.kill()  # type: ignore[union-attr]
                        slot.proc.wait()  # type: ignore[union-attr]
                    return 1
                continue
            for slot in self._slots:
                if slot.restart_at is not None and now >= slot.restart_at:
                    self._spawn(slot)

    def _final_status(self) -> int:
        if self._fatal is not None:
            raise StartupError(self._fatal)
        bad = [
            (s.index, s.proc.returncode)
            for s in self._slots
            if s.stopping and s.proc is not None and s.proc.returncode != 0
        ]
        for index, code in bad:
            logger.error("worker %d exited with %s", index, _describe_exit(code))
        logger.info("all workers stopped")
        return 0 if not bad else 1

    def _on_exit(self, slot: _Slot, code: int, now: float) -> str | None:
        """A worker exited on its own: schedule its restart, or return why to give up."""
        assert slot.proc is not None
        self._read_ready(timeout_s=0)  # collect a last "error ..." line
        self._close_pipe(slot)
        if self._metrics_dir is not None:
            m.mark_worker_dead(self._metrics_dir, slot.proc.pid)
        lived = now - slot.started_at
        if not any(s.ever_ready for s in self._slots):  # it would fail again: give up
            logger.error(
                "worker %d (pid %d) could not start (%s); stopping",
                slot.index,
                slot.proc.pid,
                _describe_exit(code),
            )
            return slot.error or f"worker {slot.index} could not start ({_describe_exit(code)})"
        healthy = slot.ready_at is not None and now - slot.ready_at >= _HEALTHY_RUN_S
        slot.failures = 1 if healthy else slot.failures + 1
        delay = min(_RESTART_MAX_S, _RESTART_FIRST_S * 2 ** (slot.failures - 1))
        slot.restart_at = now + delay
        logger.error(
            "worker %d (pid %d) died (%s) after %.1fs; restarting in %.1fs",
            slot.index,
            slot.proc.pid,
            _describe_exit(code),
            lived,
            delay,
        )
        return None

    def _read_ready(self, timeout_s: float) -> None:
        fds = {s.ready_fd: s for s in self._slots if s.ready_fd is not None}
        if not fds:
            time.sleep(timeout_s)
            return
        try:
            readable, _, _ = select.select(list(fds), [], [], timeout_s)
        except InterruptedError:
            return
        for fd in readable:
            slot = fds[fd]
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                self._close_pipe(slot)
                continue
            slot.buffer += chunk
            while b"\n" in slot.buffer:
                line, slot.buffer = slot.buffer.split(b"\n", 1)
                self._on_worker_line(slot, line.decode(errors="replace"))

    def _on_worker_line(self, slot: _Slot, line: str) -> None:
        parts = line.split()
        if parts and parts[0] == "error":
            slot.error = line.partition(" ")[2]
            return
        if not parts or parts[0] != "ready":
            return
        slot.ready_at = self._clock()
        slot.ever_ready = True
        if len(parts) >= 3:
            self._default = parts[2]
        if len(parts) >= 4:
            self._models = {n: int(v) for n, v in (p.split(":") for p in parts[3].split(","))}
        assert slot.proc is not None
        logger.info(
            "worker %d ready (pid %d) after %.1fs",
            slot.index,
            slot.proc.pid,
            slot.ready_at - slot.started_at,
        )
        if not self._announced and all(s.ever_ready for s in self._slots):
            self._announced = True
            opts = self.options
            info = ReadyInfo(
                target=opts.client_target(),
                address=opts.grpc_address(),
                port=opts.port,
                models=dict(self._models),
                default_model=self._default,
                workers=opts.workers,
            )
            logger.info("all %d workers ready", opts.workers)
            if self._on_ready is not None:
                self._on_ready(info)


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"
