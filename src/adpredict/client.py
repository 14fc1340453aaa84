"""Python client for ``adpredict.v1.PredictionService``, and builders for its requests.

    with PredictionClient("localhost:8500", timeout_s=0.05) as client:
        result = client.predict(
            {"site_domain": "news.example", "user_segments": ["seg-1", "seg-7"]},
            [{"creative_id": "cr-1", "bid_cpm": "1.25"}, {"creative_id": "cr-2"}],
        )
        result.probabilities  # one per candidate, in order

``AsyncPredictionClient`` is the same on ``grpc.aio``. For a server with TLS pass
``credentials=channel_credentials(ca_file, cert_file, key_file)`` (the CA that signed the
server's certificate; a client certificate and key for mutual TLS). Features are given per candidate, as
dicts of ``str`` (or ``bytes``, or an ``int``/``float`` for numeric fields); a list value makes
the field multi-valued. ``build_request`` turns them into the columnar ``PredictRequest`` once,
so a load generator can pre-build messages and send them with ``predict_request``.
``example_request(schema)`` makes a realistic request for any schema; ``predict_example`` is
what ``adpredict predict --example`` prints.

Server errors are raised as ``adpredict.errors`` (``InvalidRequestError``,
``ModelNotFoundError``, ``OverloadedError``, ``DeadlineError``; any other status, including an
unreachable server, as ``RequestError``), with the ``grpc.RpcError`` as ``__cause__``.
This module does not import TensorFlow.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import grpc
import numpy as np

from adpredict.data import synth
from adpredict.errors import AdpredictError
from adpredict.schema import Field, Schema
from adpredict.serving.status import error_for_status
from adpredict.serving.tls import channel_credentials
from adpredict.v1 import prediction_service_pb2 as pb
from adpredict.v1 import prediction_service_pb2_grpc as pb_grpc

__all__ = [
    "AsyncPredictionClient",
    "ExampleRequest",
    "ModelInfo",
    "PredictResult",
    "PredictionClient",
    "build_request",
    "channel_credentials",
    "example_request",
    "predict_example",
]

Scalar = str | bytes | int | float
FeatureValue = Scalar | Sequence[str | bytes]
Features = Mapping[str, FeatureValue]

DEFAULT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class PredictResult:
    """One Predict answer: a probability per candidate and where the server's time went."""

    probabilities: list[float]
    model: str
    version: int
    queue_us: int
    compute_us: int
    request_id: str = ""
    batch_predictions: int = 0
    batch_requests: int = 0

    @classmethod
    def from_proto(cls, response: pb.PredictResponse) -> PredictResult:
        return cls(
            probabilities=list(response.probabilities),
            model=response.model,
            version=response.model_version,
            queue_us=response.queue_us,
            compute_us=response.compute_us,
            request_id=response.request_id,
            batch_predictions=response.batch_predictions,
            batch_requests=response.batch_requests,
        )


@dataclass(frozen=True)
class ModelInfo:
    """GetModelMetadata's answer, with the schema rebuilt as an ``adpredict.schema.Schema``."""

    model: str
    version: int
    schema: Schema
    schema_fingerprint: str
    metrics: dict[str, Any]
    created: str
    max_candidates: int
    max_value_bytes: int
    models: list[str]

    @classmethod
    def from_proto(cls, response: pb.GetModelMetadataResponse) -> ModelInfo:
        fields = []
        for f in response.fields:
            raw: dict[str, Any] = {
                "name": f.name,
                "scope": f.scope,
                "kind": f.kind,
                "buckets": f.buckets,
            }
            if f.kind == "numeric":
                raw["boundaries"] = list(f.boundaries)
            if f.kind == "multi_categorical":
                raw["max_values"] = f.max_values
            if f.description:
                raw["description"] = f.description
            fields.append(raw)
        schema = Schema.from_dict(
            {"name": response.schema_name, "version": response.schema_version, "fields": fields},
            source=f"metadata of model {response.model!r}",
        )
        try:
            metrics = json.loads(response.metrics_json or "{}")
        except ValueError:
            metrics = {"unparsed": response.metrics_json}
        return cls(
            model=response.model,
            version=response.version,
            schema=schema,
            schema_fingerprint=response.schema_fingerprint,
            metrics=metrics,
            created=response.created,
            max_candidates=response.max_candidates,
            max_value_bytes=response.max_value_bytes,
            models=list(response.models),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["schema"] = self.schema.to_dict()
        return out


# ----------------------------------------------------------------------------- building requests


def _encode(value: Scalar, where: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value).encode()
    raise TypeError(f"{where}: expected str, bytes or a number, got {type(value).__name__}")


def _is_multi(value: object) -> bool:
    return isinstance(value, list | tuple)


def build_request(
    context: Features,
    candidates: Sequence[Features],
    *,
    model: str = "",
    request_id: str = "",
) -> pb.PredictRequest:
    """The columnar ``PredictRequest`` for per-candidate feature dicts (see the .proto).

    A field is sent as multi-valued (with counts) if any candidate gives it a list; candidates
    without a field get ``b''`` (or 0 values) for it. No schema is needed: the server validates.
    """
    request = pb.PredictRequest(request_id=request_id, model=model, num_candidates=len(candidates))
    for name, value in context.items():
        where = f"context[{name!r}]"
        values = value if _is_multi(value) else [value]
        request.context[name].values.extend(_encode(v, where) for v in values)  # type: ignore[union-attr]
    names: dict[str, bool] = {}  # field -> multi-valued; insertion-ordered
    for features in candidates:
        for name, value in features.items():
            names[name] = names.get(name, False) or _is_multi(value)
    for name, multi in names.items():
        where = f"candidates[{name!r}]"
        column = request.candidates[name]
        if not multi:
            column.values.extend(_encode(f.get(name, b""), where) for f in candidates)
            continue
        counts = []
        for features in candidates:
            value = features.get(name, ())
            values = value if _is_multi(value) else ([] if value in ("", b"") else [value])
            column.values.extend(_encode(v, where) for v in values)  # type: ignore[union-attr]
            counts.append(len(values))  # type: ignore[arg-type]
        column.counts.extend(counts)
    return request


class ExampleRequest(NamedTuple):
    """Per-request context features and per-candidate features, as ``predict`` takes them."""

    context: dict[str, FeatureValue]
    candidates: list[dict[str, FeatureValue]]


def example_request(schema: Schema, k: int = 32, seed: int = 0) -> ExampleRequest:
    """A realistic request for ``schema``: ``k`` candidates, every field filled, deterministic.

    Fields of the built-in ``rtb`` schema get values shaped like ``adpredict synth``'s (so a model
    trained on synthetic data sees known ids); other categorical fields get ``"<field>-<n>"``,
    numeric fields decimals around their boundaries, multi-valued fields 1..min(5, max) values.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 candidates, got {k}")
    rng = np.random.default_rng(seed)
    context = {f.name: _example_value(f, rng) for f in schema.context_fields}
    candidates = [
        {f.name: _example_value(f, rng) for f in schema.candidate_fields} for _ in range(k)
    ]
    return ExampleRequest(context, candidates)


def _example_value(field: Field, rng: np.random.Generator) -> FeatureValue:
    if field.is_numeric:
        if field.name == "bid_cpm":
            return f"{rng.lognormal(0.7, 0.8):.2f}"
        low, high = field.boundaries[0], field.boundaries[-1]
        span = high - low or 1.0
        return f"{rng.uniform(low - 0.1 * span, high + 0.1 * span):.3f}"
    if field.is_multi:
        n = int(rng.integers(1, min(5, field.max_values) + 1))
        return [_token(field.name, rng) for _ in range(n)]
    return _token(field.name, rng)


def _token(name: str, rng: np.random.Generator) -> str:
    """A value index drawn with a Zipf-like head, spelled the way the synthetic data spells it."""
    size = synth.cardinality(name) or 1000
    index = int(min(rng.zipf(1.5), size)) - 1
    return synth.value_string(name, index) or f"{name}-{index}"


# ----------------------------------------------------------------------------------- clients


def _raise_from(error: grpc.RpcError) -> AdpredictError:
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_for_status(code, details or "")


@contextlib.contextmanager
def _server_errors() -> Iterator[None]:
    """Re-raise a failed RPC as the ``adpredict.errors`` class its status code stands for."""
    try:
        yield
    except grpc.RpcError as exc:
        raise _raise_from(exc) from exc


class _Client:
    """What both clients share: the target, the default deadline and the stub.

    ``credentials`` (see ``channel_credentials``) makes the channel TLS; without them it is
    plaintext, which a TLS server refuses.
    """

    _open_channel: Callable[..., Any]
    _open_secure_channel: Callable[..., Any]

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        cls = type(self)
        if credentials is None:
            self._channel = cls._open_channel(target, options=list(options))
        else:
            self._channel = cls._open_secure_channel(target, credentials, options=list(options))
        self._stub = pb_grpc.PredictionServiceStub(self._channel)

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s


class PredictionClient(_Client):
    """Blocking client on one channel; thread-safe. ``timeout_s`` is the default deadline."""

    _open_channel = staticmethod(grpc.insecure_channel)
    _open_secure_channel = staticmethod(grpc.secure_channel)

    def predict(
        self,
        context: Features,
        candidates: Sequence[Features],
        model: str = "",
        request_id: str = "",
        *,
        timeout_s: float | None = None,
    ) -> PredictResult:
        """Click probabilities for ``candidates``, in order (see ``build_request``)."""
        request = build_request(context, candidates, model=model, request_id=request_id)
        return self.predict_request(request, timeout_s=timeout_s)

    def predict_request(
        self, request: pb.PredictRequest, *, timeout_s: float | None = None
    ) -> PredictResult:
        """Send a pre-built request."""
        with _server_errors():
            response = self._stub.Predict(request, timeout=self._timeout(timeout_s))
        return PredictResult.from_proto(response)

    def metadata(self, model: str = "", *, timeout_s: float | None = None) -> ModelInfo:
        """The schema, version, metrics and limits of ``model`` ("" = the default model)."""
        with _server_errors():
            response = self._stub.GetModelMetadata(
                pb.GetModelMetadataRequest(model=model), timeout=self._timeout(timeout_s)
            )
        return ModelInfo.from_proto(response)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PredictionClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncPredictionClient(_Client):
    """``PredictionClient`` on ``grpc.aio``: create and use it inside one event loop."""

    _open_channel = staticmethod(grpc.aio.insecure_channel)
    _open_secure_channel = staticmethod(grpc.aio.secure_channel)

    async def predict(
        self,
        context: Features,
        candidates: Sequence[Features],
        model: str = "",
        request_id: str = "",
        *,
        timeout_s: float | None = None,
    ) -> PredictResult:
        request = build_request(context, candidates, model=model, request_id=request_id)
        return await self.predict_request(request, timeout_s=timeout_s)

    async def predict_request(
        self, request: pb.PredictRequest, *, timeout_s: float | None = None
    ) -> PredictResult:
        with _server_errors():
            response = await self._stub.Predict(request, timeout=self._timeout(timeout_s))
        return PredictResult.from_proto(response)

    async def metadata(self, model: str = "", *, timeout_s: float | None = None) -> ModelInfo:
        with _server_errors():
            response = await self._stub.GetModelMetadata(
                pb.GetModelMetadataRequest(model=model), timeout=self._timeout(timeout_s)
            )
        return ModelInfo.from_proto(response)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncPredictionClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def predict_example(
    target: str,
    model: str = "",
    k: int = 32,
    timeout_s: float = 5.0,
    seed: int = 0,
    *,
    credentials: grpc.ChannelCredentials | None = None,
) -> dict[str, Any]:
    """Ask ``target`` for the model's schema, send an ``example_request`` of ``k`` candidates,
    and return a JSON-able summary (what ``adpredict predict --example`` prints)."""
    with PredictionClient(target, timeout_s=timeout_s, credentials=credentials) as client:
        info = client.metadata(model)
        example = example_request(info.schema, k=min(k, info.max_candidates or k), seed=seed)
        request_id = f"example-{uuid.uuid4().hex[:12]}"
        started = time.perf_counter()
        result = client.predict(
            example.context, example.candidates, model=info.model, request_id=request_id
        )
        latency_s = time.perf_counter() - started
    return {
        "target": target,
        "model": result.model,
        "version": result.version,
        "request_id": result.request_id,
        "candidates": len(example.candidates),
        "latency_ms": round(latency_s * 1e3, 3),
        "queue_us": result.queue_us,
        "compute_us": result.compute_us,
        "batch_predictions": result.batch_predictions,
        "context": example.context,
        "predictions": [
            {"candidate": i, "probability": p, **c}
            for i, (p, c) in enumerate(zip(result.probabilities, example.candidates, strict=True))
        ],
    }
