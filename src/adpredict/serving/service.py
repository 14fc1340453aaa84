"""The gRPC servicer of ``adpredict.v1.PredictionService``: request in, batcher, answer out.

One Predict call:

1. its budget is the gRPC deadline (``context.time_remaining()``), or ``sla_s`` if the caller
   set none, turned into an absolute deadline on the batcher's clock; admission judges it
   against that deadline, or, with ``admit_within_sla``, against the SLA if that comes first;
2. the model is resolved (``""`` = the runtime's default); if the model's ``Batcher`` would
   refuse ``num_candidates`` predictions now (queue full, deadline hopeless) the request is
   refused before it is decoded, so refusals stay cheap under overload; then it is validated
   and decoded by that model's ``RequestCodec``: a bad request is answered INVALID_ARGUMENT here
   and never reaches a batch;
3. it is queued in that batcher (one per model name; admitted by the check before decoding),
   which merges it with concurrent requests, or splits it;
4. in a compute thread, ``run_batch`` merges the batch's slices into one feed, asks the runtime
   for the model's CURRENT version (so a hot swap takes effect at the next batch), predicts, and
   splits the probabilities back; each slice's result records the version that computed it;
5. if the deadline passed meanwhile the answer is DEADLINE_EXCEEDED (a late bid is worthless),
   else the probabilities, the version and the batcher's queue/compute times are returned.

Every error becomes a status in exactly one place, ``adpredict.serving.status``. The transport
is not part of this: ``predict_outcome`` / ``metadata_outcome`` return the status and the
response, and each front end sends them (``Predict`` / ``GetModelMetadata`` here for grpc.aio,
``adpredict.serving.intake`` for the native one). ``predict_outcome`` is ``start_predict``
(steps 1-3, at once), a wait for the batcher's future, and ``finish_predict`` (step 5): a front
end that answers from the future's done callback needs no task per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np

from adpredict.errors import DeadlineError, OverloadedError
from adpredict.schema import Schema
from adpredict.serving import status
from adpredict.serving.batcher import Batcher, BatcherOptions, BatchObserver, Completed, Slice
from adpredict.serving.clock import Clock, MonotonicClock
from adpredict.serving.codec import (
    CodecLimits,
    ParsedRequest,
    RequestCodec,
    Undecodable,
    WireRequest,
    encode_predict_response,
    lenient_parser,
    predict_parser,
    require_decoded,
)
from adpredict.v1 import prediction_service_pb2 as pb
from adpredict.v1 import prediction_service_pb2_grpc as pb_grpc

__all__ = [
    "Outcome",
    "PendingPredict",
    "PredictionServicer",
    "ServiceObserver",
    "SliceResult",
    "join_results",
]

logger = logging.getLogger(__name__)

_MAX_CODECS = 64  # cached codecs (one per loaded schema object); cleared when exceeded


class Model(Protocol):
    """What the servicer needs of a loaded model version (``runtime.LoadedModel``)."""

    name: str
    version: int
    schema: Schema
    metadata: dict[str, Any]

    def predict(self, feed: dict[str, np.ndarray]) -> np.ndarray: ...


class Runtime(Protocol):
    """What the servicer needs of the model runtime (``runtime.ModelRuntime``)."""

    def get(self, name: str = "") -> Model: ...

    def names(self) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one RPC ended: OK with ``body``, or another code with ``details``."""

    code: grpc.StatusCode
    details: str
    body: bytes  # the serialized response message when code is OK, else b""


@dataclass(frozen=True, slots=True)
class PendingPredict:
    """A Predict that ``start_predict`` admitted and queued: ``future`` is the batcher's (cancel
    it to withdraw the request); ``finish_predict`` turns it into the call's Outcome."""

    future: asyncio.Future[Completed[SliceResult]]
    request_id: str
    model: str
    started: float
    deadline: float


@dataclass(frozen=True, slots=True)
class SliceResult:
    """Probabilities for one slice (or a whole request) and the version that computed them."""

    probabilities: np.ndarray  # float32 [n]
    version: int


def join_results(parts: list[SliceResult]) -> SliceResult:
    """A split request's slices back in order; the version is the last slice's (newest)."""
    return SliceResult(np.concatenate([p.probabilities for p in parts]), parts[-1].version)


def _serialized(body: bytes) -> bytes:
    """The handlers' response serializer: the servicer answers with serialized messages."""
    return body


class ServiceObserver:
    """Hooks for a metrics layer; every method defaults to doing nothing.

    Hooks run on the event loop and must be quick; one that raises is logged and ignored.
    """

    def batch_observer(self, model: str) -> BatchObserver | None:
        """The observer for the batcher of ``model`` (asked once, when it is created)."""
        return None

    def request_started(self, method: str) -> None:
        """An RPC began (each is followed by exactly one ``request_done``)."""
        return None

    def request_decoded(self, model: str, candidates: int, missing: int) -> None:
        """A Predict request passed validation; ``missing`` absent or empty feature cells."""
        return None

    def request_late(self, model: str) -> None:
        """A Predict answer was computed but ready after its deadline (DEADLINE_EXCEEDED)."""
        return None

    def intake_refused(self, method: str, reason: str, count: int) -> None:
        """The native intake answered ``count`` calls of ``method`` itself, never handing them
        to the servicer: ``refused_overloaded`` (RESOURCE_EXHAUSTED), ``expired_before_pickup``
        (DEADLINE_EXCEEDED), ``cancelled_before_pickup`` (CANCELLED: the caller went away while
        the call was queued), ``refused_shutting_down`` (UNAVAILABLE) or
        ``refused_queue_delay`` (DEADLINE_EXCEEDED: the queue's present delay exceeded the
        call's budget at arrival)."""
        return None

    def intake_refusal_times(self, method: str, seconds: Sequence[float]) -> None:
        """How long the native intake took to answer calls it ``intake_refused``: seconds
        from each call's arrival to its answer (at most 131,072 per report; the intake counts
        what it had to drop in ``stats()['timings_dropped']``)."""
        return None

    def request_done(self, method: str, model: str, code: grpc.StatusCode, seconds: float) -> None:
        """An RPC ended. ``model`` is the resolved name, ``""`` if it could not be resolved
        (never the caller's raw string: that would let callers create metric labels)."""
        return None


class PredictionServicer(pb_grpc.PredictionServiceServicer):
    """Serves Predict and GetModelMetadata from ``runtime`` through one batcher per model.

    ``sla_s`` is the budget of a request that carries no gRPC deadline; with
    ``admit_within_sla`` it also caps every request's admission budget (see ``predict_outcome``). ``max_candidates`` and
    ``max_value_bytes`` are the codec limits (``max_candidates`` must fit the batcher's
    ``queue_limit``). Batchers are created at ``start()`` for every model the runtime serves and
    lazily for names that appear later; ``close(grace_s)`` drains them. Use ``add_to_server``
    to register it on a ``grpc.aio.Server``. To shut down, ``await server.stop(grace)`` first
    (in-flight RPCs finish through the still running batchers), then ``await close()``.
    """

    def __init__(
        self,
        runtime: Runtime,
        batcher_options: BatcherOptions,
        *,
        sla_s: float,
        max_candidates: int,
        max_value_bytes: int = 256,
        admit_within_sla: bool = False,
        clock: Clock | None = None,
        observer: ServiceObserver | None = None,
    ) -> None:
        if not (isinstance(sla_s, int | float) and 0 < sla_s < math.inf):
            raise ValueError(f"sla_s must be a positive number of seconds, got {sla_s!r}")
        self._limits = CodecLimits(max_candidates=max_candidates, max_value_bytes=max_value_bytes)
        if max_candidates > batcher_options.queue_limit:
            raise ValueError(
                f"max_candidates ({max_candidates}) exceeds the batcher's queue_limit "
                f"({batcher_options.queue_limit} predictions): such requests could never be queued"
            )
        self._runtime = runtime
        self._options = batcher_options
        self._sla_s = float(sla_s)
        self._admit_within_sla = bool(admit_within_sla)
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._observer = observer if observer is not None else ServiceObserver()
        self._batchers: dict[str, Batcher[ParsedRequest, SliceResult]] = {}
        self._codecs: dict[int, tuple[Schema, RequestCodec]] = {}
        self._closing = False
        self._in_flight = 0  # Predict RPCs between arrival and answer

    @property
    def limits(self) -> CodecLimits:
        return self._limits

    def batchers(self) -> Mapping[str, Batcher[ParsedRequest, SliceResult]]:
        """The batcher of every model seen so far (for gauges such as queue length)."""
        return dict(self._batchers)

    @property
    def sla_s(self) -> float:
        """The budget of a request without a deadline (and, with ``admit_within_sla``, a cap)."""
        return self._sla_s

    @property
    def admit_within_sla(self) -> bool:
        return self._admit_within_sla

    def compute_margin_s(self) -> float:
        """How long a request that reaches the head of a queue still takes: the predicted
        compute of the batch it joins, plus the batcher's safety margin. A front end that
        judges admission by the queue's present delay adds this to it.

        That batch is taken as large as the largest recent one: under overload batches are
        full, and at moderate load a full-size bound would refuse calls that the small batches
        then being made answer in time. Before any batch was computed it is the largest batch
        there can be (``max_batch_size``, or without batching one whole request)."""
        largest = (
            self._options.max_batch_size if self._options.batching else self._limits.max_candidates
        )
        compute = max(
            (
                b.predicted_compute_s(b.largest_recent_batch() or largest)
                for b in self._batchers.values()
            ),
            default=0.0,
        )
        return compute + self._options.safety_margin_s

    @property
    def in_flight(self) -> int:
        """Predict RPCs received through the server and not yet answered (gauge)."""
        return self._in_flight

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register on ``server``, as the generated code would, except that requests are parsed
        leniently (``codec.predict_parser``, ``codec.lenient_parser``): bytes that are not a valid
        message are answered INVALID_ARGUMENT by the RPC, instead of gRPC's UNKNOWN from a
        failing deserializer, and a Predict in the usual shape stays bytes until decoded."""
        handlers = {
            "Predict": grpc.unary_unary_rpc_method_handler(
                self.Predict,
                request_deserializer=predict_parser(),
                response_serializer=_serialized,
            ),
            "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
                self.GetModelMetadata,
                request_deserializer=lenient_parser(pb.GetModelMetadataRequest),
                response_serializer=_serialized,
            ),
        }
        service = pb.DESCRIPTOR.services_by_name["PredictionService"].full_name
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)

    async def start(self) -> None:
        """Create and start a batcher for every model the runtime serves now."""
        for name in self._runtime.names():
            self._batcher(name)

    async def close(self, grace_s: float = 5.0) -> None:
        """Refuse new requests, let the batchers answer what they hold (up to ``grace_s``)."""
        self._closing = True
        await asyncio.gather(*(b.close(grace_s) for b in list(self._batchers.values())))

    # ---------------------------------------------------------------------------------- RPCs

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> bytes:
        """The serialized ``PredictResponse`` (``add_to_server``'s handlers send it as is)."""
        outcome = await self.predict_outcome(request, budget_s=context.time_remaining())
        if outcome.code is not grpc.StatusCode.OK:
            await context.abort(outcome.code, outcome.details)
        return outcome.body

    async def predict_outcome(
        self,
        request: pb.PredictRequest | WireRequest | Undecodable,
        *,
        budget_s: float | None,
        started: float | None = None,
    ) -> Outcome:
        """One Predict, whatever the transport: records it with the observer and returns its
        status and response (never raises, except ``CancelledError`` when the caller goes).

        ``budget_s`` is the caller's deadline as seconds from ``started`` (when the server
        received the call; default now), None if it set none (then ``sla_s`` applies).
        Admission refuses a request whose answer is predicted after its deadline, or, with
        ``admit_within_sla``, after the SLA if that comes first: under overload, admitted
        requests then stay within the SLA and the rest are refused at once instead of queueing
        up to their deadline.
        """
        pending = self.start_predict(request, budget_s=budget_s, started=started)
        if isinstance(pending, Outcome):
            return pending
        try:
            with contextlib.suppress(Exception):  # finish_predict reads the future's error
                await pending.future
        except asyncio.CancelledError:  # the caller went away; the batcher drops the request
            pending.future.cancel()
            self._cancelled(pending)
            raise
        return self.finish_predict(pending)

    def start_predict(
        self,
        request: pb.PredictRequest | WireRequest | Undecodable,
        *,
        budget_s: float | None,
        started: float | None = None,
    ) -> Outcome | PendingPredict:
        """The first half of ``predict_outcome`` (same arguments), done at once: validate,
        admit, decode and queue. Returns the Outcome of a request that ends here (invalid,
        refused), else its ``PendingPredict``: wait for its future (or cancel it to withdraw
        the request), then ``finish_predict`` it exactly once. Never raises."""
        started = self._clock.now() if started is None else started
        self._in_flight += 1
        self._notify(self._observer.request_started, "Predict")
        deadline = started + (self._sla_s if budget_s is None else budget_s)
        admit_by = min(deadline, started + self._sla_s) if self._admit_within_sla else deadline
        model_name = ""
        try:
            require_decoded(request)
            model = self._runtime.get(request.model)
            model_name = model.name
            batcher = self._batcher(model_name)
            admitted_at = None
            if 0 < request.num_candidates <= self._limits.max_candidates:
                # Refuse before decoding (23% of a request's GIL time, py-spy) when the queue
                # is full or the answer would come after the deadline or the SLA: under
                # overload, refusals must stay cheap.
                admitted_at = batcher.check(request.num_candidates, admit_by)
            parsed = self._codec(model.schema).decode(request, rows=model.has_rows)
            self._notify(self._observer.request_decoded, model_name, parsed.size, parsed.missing)
            # Nothing ran on the loop since check(): it need not admit the request again.
            future = batcher.enqueue(parsed, parsed.size, deadline, admitted_at=admitted_at)
        except Exception as exc:
            return self._failed(exc, "Predict", model_name, started)
        return PendingPredict(future, request.request_id, model_name, started, deadline)

    def finish_predict(self, pending: PendingPredict) -> Outcome:
        """The second half of ``predict_outcome``, once ``pending.future`` is done: the
        answer, DEADLINE_EXCEEDED if it came after the deadline, the batcher's error as its
        status, or CANCELLED if the future was cancelled; recorded. Never raises."""
        future = pending.future
        if future.cancelled():
            return self._cancelled(pending)
        try:
            done = future.result()
            now = self._clock.now()
            if now > pending.deadline:
                self._notify(self._observer.request_late, pending.model)
                raise DeadlineError(
                    f"answer ready {(now - pending.deadline) * 1e3:.3f} ms after the deadline "
                    f"(budget {(pending.deadline - pending.started) * 1e3:.3f} ms)"
                )
            body = encode_predict_response(
                request_id=pending.request_id,
                probabilities=done.result.probabilities,
                model=pending.model,
                model_version=done.result.version,
                queue_us=round(done.queue_s * 1e6),
                compute_us=round(done.compute_s * 1e6),
                batch_predictions=done.batch_predictions,
                batch_requests=done.batch_requests,
            )
        except Exception as exc:
            return self._failed(exc, "Predict", pending.model, pending.started)
        self._done("Predict", pending.model, grpc.StatusCode.OK, pending.started)
        return Outcome(grpc.StatusCode.OK, "", body)

    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        """The serialized ``GetModelMetadataResponse`` (see ``Predict``)."""
        outcome = self.metadata_outcome(request)
        if outcome.code is not grpc.StatusCode.OK:
            await context.abort(outcome.code, outcome.details)
        return outcome.body

    def metadata_outcome(
        self, request: pb.GetModelMetadataRequest | Undecodable, started: float | None = None
    ) -> Outcome:
        """One GetModelMetadata, whatever the transport (see ``predict_outcome``)."""
        started = self._clock.now() if started is None else started
        self._notify(self._observer.request_started, "GetModelMetadata")
        model_name = ""
        try:
            require_decoded(request)
            model = self._runtime.get(request.model)
            model_name = model.name
            body = self._metadata(model).SerializeToString()
        except Exception as exc:
            return self._failed(exc, "GetModelMetadata", model_name, started)
        self._done("GetModelMetadata", model_name, grpc.StatusCode.OK, started)
        return Outcome(grpc.StatusCode.OK, "", body)

    # ------------------------------------------------------------------------------- helpers

    def _metadata(self, model: Model) -> pb.GetModelMetadataResponse:
        schema = model.schema
        meta = model.metadata
        fields = [
            pb.FieldSpec(
                name=f.name,
                scope=f.scope,
                kind=f.kind,
                buckets=f.buckets,
                max_values=f.max_values,
                boundaries=list(f.boundaries),
                description=f.description,
            )
            for f in schema.fields
        ]
        return pb.GetModelMetadataResponse(
            model=model.name,
            version=model.version,
            schema_name=schema.name,
            schema_version=schema.version,
            schema_fingerprint=self._codec(schema).fingerprint,
            fields=fields,
            metrics_json=json.dumps(meta.get("metrics") or {}, sort_keys=True, default=str),
            created=str(meta.get("created") or ""),
            max_candidates=self._limits.max_candidates,
            max_value_bytes=self._limits.max_value_bytes,
            models=self._runtime.names(),
        )

    def _codec(self, schema: Schema) -> RequestCodec:
        """The codec for ``schema``, cached by identity (each loaded version holds its schema).

        Called from the event loop and from compute threads; the worst a race can do is build
        a codec twice.
        """
        entry = self._codecs.get(id(schema))
        if entry is not None and entry[0] is schema:
            return entry[1]
        codec = RequestCodec(schema, self._limits)
        if len(self._codecs) >= _MAX_CODECS:
            self._codecs = {}
        self._codecs[id(schema)] = (schema, codec)
        return codec

    def _batcher(self, name: str) -> Batcher[ParsedRequest, SliceResult]:
        """The batcher of model ``name``, created and started on first use (on the loop)."""
        batcher = self._batchers.get(name)
        if batcher is not None:
            return batcher
        if self._closing:
            raise OverloadedError("the server is shutting down")
        observer = None
        try:
            observer = self._observer.batch_observer(name)
        except Exception:
            logger.exception("ServiceObserver.batch_observer failed for model %r", name)
        batcher = Batcher(
            functools.partial(self._run_batch, name),
            self._options,
            clock=self._clock,
            join=join_results,
            observer=observer,
            name=name,
        )
        batcher.start()
        self._batchers[name] = batcher
        return batcher

    def _run_batch(self, name: str, slices: list[Slice[ParsedRequest]]) -> list[SliceResult]:
        """Compute thread: merge, predict with the model's current version, split."""
        model = self._runtime.get(name)
        codec = self._codec(model.schema)
        feed = codec.merge(slices, rows=model.has_rows)
        probabilities = model.predict(feed)
        version = model.version
        return [SliceResult(p, version) for p in codec.split(probabilities, slices)]

    def intake_refused(self, method: str, reason: str, count: int) -> None:
        """Record calls a front end answered without the servicer (``ServiceObserver``)."""
        self._notify(self._observer.intake_refused, method, reason, count)

    def intake_refusal_times(self, method: str, seconds: Sequence[float]) -> None:
        """Record how long a front end took to answer those calls (``ServiceObserver``)."""
        self._notify(self._observer.intake_refusal_times, method, seconds)

    def _failed(self, exc: Exception, method: str, model: str, started: float) -> Outcome:
        """The outcome for ``exc`` (its status from ``status.status_for``), recorded."""
        code, details = status.status_for(exc)
        self._done(method, model, code, started)
        return Outcome(code, details, b"")

    def _cancelled(self, pending: PendingPredict) -> Outcome:
        self._done("Predict", pending.model, grpc.StatusCode.CANCELLED, pending.started)
        return Outcome(grpc.StatusCode.CANCELLED, "the caller cancelled the call", b"")

    def _done(self, method: str, model: str, code: grpc.StatusCode, started: float) -> None:
        """Where every call ends, once: recorded (and a Predict no longer in flight)."""
        if method == "Predict":
            self._in_flight -= 1
        self._notify(self._observer.request_done, method, model, code, self._clock.now() - started)

    @staticmethod
    def _notify(hook: Callable[..., None], *args: object) -> None:
        try:
            hook(*args)
        except Exception:
            logger.exception("ServiceObserver hook %s failed", getattr(hook, "__name__", hook))
