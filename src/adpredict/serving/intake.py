"""The native front end: gRPC received in C++ (``_intake``), answered by the servicer.

Why
    With grpc.aio every RPC costs the one Python event loop ~0.5 ms of CPU before any handler
    runs (530 µs per echo RPC on the 2-core development VM, against 80 µs for the C++ intake),
    so a one-core server is bound by gRPC's Python path, not by TensorFlow; and under overload
    requests wait in front of the busy loop where no handler can refuse them.

How
    ``_intake.Intake`` (``_intake.cpp``) is a grpc++ server whose own thread receives every RPC
    as bytes, without the GIL. Calls it cannot hand over are answered there at once: more than
    ``max_pending`` calls waiting for or held by Python (RESOURCE_EXHAUSTED), a deadline that
    passed before Python could take the call (DEADLINE_EXCEEDED), shutting down (UNAVAILABLE),
    an unknown method (UNIMPLEMENTED), and a Predict whose budget is shorter than the queue's
    present delay (DEADLINE_EXCEEDED; see "Admission" below). The rest queue in C++; an
    eventfd wakes the event loop, which takes the whole queue in one call and starts each
    Predict there and then (``PredictionServicer.start_predict``: validation, admission,
    decoding, queueing); the batcher's future's done callback answers it (``finish_predict``).
    No task per call: that saves the loop a task and its coroutine frames per request
    (measured: 0 to 4.7% more served at K = 300, nothing at K = 32; docs/BENCHMARKS.md). The
    grpc.aio front end runs the same two halves in ``predict_outcome``, and GetModelMetadata
    the same ``metadata_outcome``, so validation, admission, batching, status
    codes and metrics are the same code. Health is
    grpc++'s ``grpc.health.v1`` service (Check and Watch), set by ``set_serving``.

Admission
    The C++ intake measures the queue's present delay as the age of the oldest call pending
    (queued there or held by Python): a Predict arriving now is answered about that late, plus
    one batch's compute (``PredictionServicer.compute_margin_s``, refreshed every
    ``_STATS_INTERVAL_S``). A Predict whose admission budget ends sooner is refused at arrival
    with DEADLINE_EXCEEDED: the budget is its deadline (the SLA if it has none), and with
    ``admit_within_sla`` no more than a cap near the SLA (``SlaCap``: it follows the p99 of
    the admitted calls' time in the server, so that p99 stays within the SLA). An intake with
    nothing pending refuses nothing. Under overload the excess is so refused in C++,
    without the GIL and without a task, so the Python loop spends itself on admitted calls.
    At light load the oldest call is young and nothing is refused; the servicer's own
    admission (the batcher's predicted answer time) still applies to every call taken.

Cancellation
    A caller that cancels (or whose deadline passes) is seen by C++ (``AsyncNotifyWhenDone``):
    a queued call is dropped there, and for a call Python holds the next ``take`` returns its id,
    whose batcher future is cancelled, so the batcher drops the request as with grpc.aio.

Differences from the grpc.aio front end
    No server reflection (``grpcurl`` needs the proto file). Calls answered in C++ are counted
    through ``ServiceObserver.intake_refused``, and how long each took, from its arrival to
    the refusal, through ``ServiceObserver.intake_refusal_times`` (so they are in every RPC's
    duration histogram, with ``model=""``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from adpredict.errors import StartupError
from adpredict.serving import status
from adpredict.serving.codec import lenient_parser, predict_parser
from adpredict.serving.service import Outcome, PendingPredict, PredictionServicer
from adpredict.v1 import prediction_service_pb2 as pb

__all__ = ["INTAKE_REFUSALS", "NativeFrontend", "SlaCap", "available", "unavailable_reason"]

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PredictionService"].full_name
_METHODS = (f"/{SERVICE_NAME}/Predict", f"/{SERVICE_NAME}/GetModelMetadata")
_METHOD_NAMES = ("Predict", "GetModelMetadata")
_PREDICT = 0
#: Why the C++ intake answered a call itself (``ServiceObserver.intake_refused``).
INTAKE_REFUSALS = (
    "refused_overloaded",
    "expired_before_pickup",
    "cancelled_before_pickup",
    "refused_shutting_down",
    "refused_queue_delay",
)
_TAKE_AT_ONCE = 4096  # calls taken per wake-up; more stay queued for the next one
_STATS_INTERVAL_S = 0.5  # how often C++-side refusals are passed on to the observer


class SlaCap:
    """The cap on admission budgets under ``admit_within_sla``: ``sla_s * scale``.

    The queue's delay at arrival underestimates a call's time in the server (batches form,
    the loop and TensorFlow share the core), so a cap of exactly the SLA lets the admitted p99
    exceed it. Every ``update`` (one per stats interval) compares the p99 of the admitted calls'
    server-side times since the last one with ``target`` * SLA and moves ``scale`` half-way
    towards it (geometrically: a window's p99 is noisy), by at most x0.8 or x1.25, within
    [``min_scale``, 1]. The target leaves a fifth of the SLA to the network and the caller,
    whose delays the server cannot see. With fewer than ``min_samples`` calls
    (light load) the scale recovers x1.25 per update; at light load nothing waits long enough
    for the cap to matter.
    """

    def __init__(
        self,
        sla_s: float,
        *,
        target: float = 0.8,
        min_scale: float = 0.5,
        min_samples: int = 100,
    ) -> None:
        self.sla_s = sla_s
        self.scale = 1.0
        self._target, self._min_scale, self._min_samples = target, min_scale, min_samples
        self._samples: list[float] = []

    @property
    def cap_s(self) -> float:
        return self.sla_s * self.scale

    def observe(self, seconds: float) -> None:
        """An admitted call was answered OK ``seconds`` after it reached the server."""
        self._samples.append(seconds)

    def update(self) -> float:
        """Fold in the calls observed since the last update; return the new cap."""
        samples, self._samples = self._samples, []
        if len(samples) < self._min_samples:
            factor = 1.25
        else:
            samples.sort()
            p99 = samples[min(len(samples) - 1, math.ceil(0.99 * len(samples)) - 1)]
            factor = math.sqrt(self._target * self.sla_s / p99) if p99 > 0 else 1.25
        self.scale = min(1.0, max(self._min_scale, self.scale * min(1.25, max(0.8, factor))))
        return self.cap_s


def _load_extension() -> tuple[Any, str]:
    """Import ``_intake`` with RTLD_DEEPBIND: its grpc++ must use the system's OpenSSL.

    TensorFlow loads itself with RTLD_GLOBAL, and libtensorflow_framework exports its own
    BoringSSL (SSL_CTX_new and ~1,400 other symbols). Loaded after TensorFlow without
    DEEPBIND, libgrpc.so binds 161 symbols to that BoringSSL, and the first TLS server
    crashes (found by the test suite; ``LD_DEBUG=bindings`` shows it). DEEPBIND makes the
    extension and its dependencies look in their own dependencies first.
    """
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | getattr(os, "RTLD_DEEPBIND", 0))
    try:
        return importlib.import_module("adpredict.serving._intake"), ""
    except ImportError as exc:  # built without grpc++ (see setup.py)
        return None, str(exc)
    finally:
        sys.setdlopenflags(flags)


_intake, _IMPORT_ERROR = _load_extension()


def available() -> bool:
    """Whether the native intake was built into this installation."""
    return _intake is not None


def unavailable_reason() -> str:
    return _IMPORT_ERROR or "available"


class NativeFrontend:
    """Serves ``servicer`` through the C++ intake on ``address`` (see the module docstring).

    ``await start()`` binds and returns the port (health NOT_SERVING until ``set_serving``);
    ``await stop(grace_s)``: new calls get UNAVAILABLE, calls already taken finish within
    ``grace_s``. TLS files are paths, as for the grpc.aio front end. ``io_priority`` > 0 runs
    grpc++'s and the intake's threads at that SCHED_RR priority (``_intake.cpp``, ``Start``);
    if the kernel refuses it (no CAP_SYS_NICE) a warning is logged and they run as usual.
    """

    def __init__(
        self,
        servicer: PredictionServicer,
        *,
        address: str,
        max_pending: int,
        max_message_bytes: int,
        reuse_port: bool = False,
        tls_cert: str = "",
        tls_key: str = "",
        tls_client_ca: str = "",
        io_priority: int = 0,
    ) -> None:
        if _intake is None:
            raise StartupError(
                f"the native front end is not built into this installation ({_IMPORT_ERROR}); "
                f"install grpc++ (make native-deps) and reinstall, or use --frontend grpcio"
            )
        self._servicer = servicer
        self._parse_predict = predict_parser()
        self._parse_metadata = lenient_parser(pb.GetModelMetadataRequest)
        self._intake = _intake.Intake(
            address,
            list(_METHODS),
            max_pending,
            max_message_bytes,
            reuse_port,
            _read(tls_cert),
            _read(tls_key),
            _read(tls_client_ca),
            ["", SERVICE_NAME],
            [_PREDICT],
            io_priority,
        )
        self._io_priority = io_priority
        self._address = address
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, PendingPredict] = {}  # call id -> its Predict in the batcher
        self._reported: dict[str, int] = {}
        self._stats_task: asyncio.Task[None] | None = None
        self._stopped = False
        self._cap = SlaCap(servicer.sla_s) if servicer.admit_within_sla else None

    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        try:
            port = await asyncio.to_thread(self._intake.start)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {self._address} (gRPC port): {exc}") from None
        if self._io_priority and not self._intake.stats()["io_realtime"]:
            logger.warning(
                "--io-priority %d: the kernel refused SCHED_RR (needs CAP_SYS_NICE: root, or "
                "docker run --cap-add SYS_NICE); gRPC's threads run at normal priority",
                self._io_priority,
            )
        self._publish_admission()
        self._loop.add_reader(self._intake.fileno(), self._on_ready)
        self._stats_task = self._loop.create_task(self._report_stats(), name="intake-stats")
        return port

    def set_serving(self, serving: bool) -> None:
        self._intake.set_serving(serving)

    def stats(self) -> dict[str, int]:
        """The intake's counters and queue sizes (see ``_intake.cpp``)."""
        return dict(self._intake.stats())

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING; refuse new calls; answer the taken ones within ``grace_s``; release."""
        if self._stopped or self._loop is None:
            return
        self._stopped = True
        self.set_serving(False)
        stopping = asyncio.ensure_future(asyncio.to_thread(self._intake.stop, grace_s))
        try:
            while not stopping.done():  # keep taking: queued calls are answered, not dropped
                self._on_ready()
                await asyncio.wait({stopping}, timeout=0.01)
        finally:
            await stopping
            self._loop.remove_reader(self._intake.fileno())
            for pending in list(self._pending.values()):
                pending.future.cancel()  # its done callback runs soon and ends the call
            while self._pending:
                await asyncio.sleep(0)
            if self._stats_task is not None:
                self._stats_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._stats_task
            self._pass_on_stats()

    # ---------------------------------------------------------------------------- internals

    def _on_ready(self) -> None:
        calls, cancelled = self._intake.take(_TAKE_AT_ONCE)
        for call_id, method, payload, received_at, deadline in calls:
            if method == _PREDICT:
                self._start_predict(call_id, payload, received_at, deadline)
            else:
                self._finish(call_id, self._metadata(payload))
        for call_id in cancelled:  # the caller went away: stop working on its request
            pending = self._pending.get(call_id)
            if pending is not None:
                pending.future.cancel()

    def _start_predict(
        self, call_id: int, payload: bytes, received_at: float, deadline: float | None
    ) -> None:
        budget = None if deadline is None else deadline - received_at
        try:
            request = self._parse_predict(payload)
            started = self._servicer.start_predict(request, budget_s=budget, started=received_at)
        except Exception as exc:  # a bug here must still answer the call
            started = _internal(exc)
        if isinstance(started, Outcome):
            self._finish(call_id, started)
            return
        self._pending[call_id] = started
        started.future.add_done_callback(functools.partial(self._answer, call_id, started))

    def _answer(self, call_id: int, pending: PendingPredict, _: asyncio.Future[Any]) -> None:
        """The batcher's future is done (or was cancelled): answer the call."""
        self._pending.pop(call_id, None)
        try:
            outcome = self._servicer.finish_predict(pending)
        except Exception as exc:
            outcome = _internal(exc)
        if self._cap is not None and outcome.code is grpc.StatusCode.OK:
            self._cap.observe(time.monotonic() - pending.started)
        self._finish(call_id, outcome)

    def _metadata(self, payload: bytes) -> Outcome:
        try:
            return self._servicer.metadata_outcome(self._parse_metadata(payload))
        except Exception as exc:
            return _internal(exc)

    def _finish(self, call_id: int, outcome: Outcome) -> None:
        try:
            self._intake.finish(call_id, outcome.code.value[0], outcome.details, outcome.body)
        except ValueError:  # the intake already gave up on the call (stopped after its grace)
            logger.debug("call %d was cancelled before its answer", call_id)

    async def _report_stats(self) -> None:
        while True:
            await asyncio.sleep(_STATS_INTERVAL_S)
            self._pass_on_stats()
            self._publish_admission()

    def _publish_admission(self) -> None:
        cap = math.inf if self._cap is None else self._cap.update()
        self._intake.set_admission(self._servicer.sla_s, cap, self._servicer.compute_margin_s())

    def _pass_on_stats(self) -> None:
        stats = self._intake.stats()
        for reason in INTAKE_REFUSALS:
            for method, count in zip(_METHOD_NAMES, stats[reason], strict=True):
                key = f"{method}/{reason}"
                delta = count - self._reported.get(key, 0)
                if delta > 0:
                    self._reported[key] = count
                    self._servicer.intake_refused(method, reason, delta)
        for method, seconds in zip(_METHOD_NAMES, self._intake.take_timings(), strict=True):
            if seconds:
                self._servicer.intake_refusal_times(method, seconds)


def _internal(exc: Exception) -> Outcome:
    """A bug in this module or the servicer: still an answer, its status from ``status``."""
    code, details = status.status_for(exc)  # (logs the traceback of an unexpected error)
    return Outcome(code, details, b"")


def _read(path: str) -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise StartupError(f"cannot read {path}: {exc.strerror}") from None
