"""Hostile input against a real server on loopback: generated requests, raw bytes, and limits.

The model is an untrained FM exported for a schema with every kind of field in both scopes
(categorical, multi-valued, numeric), so every validation rule is reachable. Each hypothesis
example sends a batch of requests concurrently, as raw bytes through a generic
``unary_unary`` (so duplicate fields and invalid UTF-8 can be sent too). Each request is a
valid edge case (empty, 256-byte or non-UTF-8 values, K = 1 or the maximum, extreme numbers,
absent fields), or a valid request with exactly one defect whose field we know. The oracle:
valid -> OK with K probabilities in [0, 1]; defective -> INVALID_ARGUMENT whose details start
with that field (or NOT_FOUND for a well-formed unknown model name); never INTERNAL or UNKNOWN,
and the server still answers a plain request afterwards. Random bytes must never get INTERNAL or
UNKNOWN either. ``test_service.py`` covers messages over the size limit.
"""

from __future__ import annotations

import asyncio
import math
import random
import shutil
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adpredict.model.ctr import CTRModel
from adpredict.model.export import export_model
from adpredict.schema import Schema
from adpredict.serving.batcher import BatcherOptions
from adpredict.serving.runtime import ModelRuntime
from adpredict.serving.server import PredictionServer, ServerOptions
from adpredict.serving.service import PredictionServicer
from adpredict.v1 import prediction_service_pb2 as pb

MAX_K = 64  # the server's max_candidates here
MAX_BYTES = 256  # max_value_bytes (the default)
PER_EXAMPLE = 50  # requests per hypothesis example, sent concurrently
EXAMPLES = 210  # x PER_EXAMPLE = 10,500 generated requests
PREDICT = "/adpredict.v1.PredictionService/Predict"
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND

SCHEMA = Schema.from_dict(
    {
        "name": "fuzz",
        "version": 1,
        "fields": [
            {"name": "site", "scope": "context", "kind": "categorical", "buckets": 64},
            {"name": "segs", "scope": "context", "kind": "multi_categorical", "buckets": 64,
             "max_values": 3},
            {"name": "temp", "scope": "context", "kind": "numeric", "boundaries": [0.0, 10.0]},
            {"name": "ad", "scope": "candidate", "kind": "categorical", "buckets": 64},
            {"name": "tags", "scope": "candidate", "kind": "multi_categorical", "buckets": 64,
             "max_values": 2},
            {"name": "bid", "scope": "candidate", "kind": "numeric", "boundaries": [1.0, 2.0]},
        ],
    }
)  # fmt: skip
NAMES = {f.name for f in SCHEMA.fields}


# --------------------------------------------------------------------------- the server


class LoopThread:
    """An event loop in a daemon thread, so that sync hypothesis tests can drive a grpc.aio
    server with blocking clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[Any], timeout_s: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Served:
    target: str
    sent: list[int] = field(default_factory=lambda: [0])  # requests sent, over the module


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("fuzz") / "models"
    export_model(CTRModel(SCHEMA, kind="fm", dim=4), root / "fuzz", {})
    thread = LoopThread()
    state: dict[str, Any] = {}

    async def start() -> str:
        runtime = ModelRuntime(root, poll_interval_s=3600.0, warmup_batches=1)
        await runtime.start()
        servicer = PredictionServicer(
            runtime, BatcherOptions(max_wait_s=0.0), sla_s=30.0, max_candidates=MAX_K
        )
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 1 << 20)])
        servicer.add_to_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.start()
        state.update(runtime=runtime, servicer=servicer, server=server)
        return f"127.0.0.1:{port}"

    async def stop() -> None:
        await state["servicer"].close(1.0)
        await state["server"].stop(None)
        await state["runtime"].stop()

    try:
        yield Served(thread.run(start()))
        thread.run(stop())
    finally:
        thread.close()


# ------------------------------------------------------------------------ the requests


@dataclass
class Req:
    """A request as plain data; ``columns[name] = (values, counts)``."""

    k: int
    context: dict[str, list[bytes]]
    columns: dict[str, tuple[list[bytes], list[int]]]
    model: str = ""
    request_id: str = ""

    def encode(self) -> bytes:
        msg = pb.PredictRequest(request_id=self.request_id, model=self.model, num_candidates=self.k)
        for name, values in self.context.items():
            msg.context[name].values.extend(values)
        for name, (values, counts) in self.columns.items():
            msg.candidates[name].values.extend(values)
            msg.candidates[name].counts.extend(counts)
        return msg.SerializeToString()


@dataclass(frozen=True)
class Expect:
    code: grpc.StatusCode
    k: int = 0  # OK: the number of probabilities
    prefix: str = ""  # INVALID_ARGUMENT: how the details start (the field)
    request_id: str = ""


@dataclass(frozen=True)
class Case:
    raw: bytes
    expect: Expect
    what: str  # for failure messages


TOKEN = st.one_of(
    st.binary(max_size=12),  # any bytes: empty, NUL, non-UTF-8
    st.text(max_size=8).map(str.encode),  # any Unicode text
    st.integers(MAX_BYTES - 2, MAX_BYTES).map(lambda n: bytes([n % 256]) * n),  # at the limit
    st.sampled_from([b"\xff\xfe\xfd", b"\x00", b"\xc3\x28", "é\u200b\U0001d54f".encode()]),
)
NONEMPTY = TOKEN.filter(bool)
LONG = st.integers(MAX_BYTES + 1, 100_000).map(lambda n: b"\xfe" * n)  # over the limit
EDGE_NUMBERS = [b"", b"0", b"-0", b"+.5", b"5.", b"00001", b"1e+0010", b"0e999999", b"9" * 38,
                b"-3.4028234e38", b"3.4028234663852886e+38", b"1e-99999", b"1.5E-7",
                b"0." + b"0" * 250 + b"1"]  # fmt: skip
NUMBER = st.one_of(
    st.sampled_from(EDGE_NUMBERS),
    st.floats(width=32, allow_nan=False, allow_infinity=False).map(lambda x: repr(x).encode()),
    st.integers(-(10**30), 10**30).map(lambda i: str(i).encode()),
)
BAD_NUMBERS = [b"abc", b"inf", b"-inf", b"nan", b"NaN", b"Infinity", b"1e39", b"-1e39", b" 1",
               b"1 ", b"0x10", b"1_000", "\u0661".encode(), b"1e", b".", b"+", b"-", b"--1", b"1.2.3",
               b"9" * 39, b"3.5e38", b"\xff", b"1\n2", b"1,5", b"e5", b"+-1", b"\x001", b"1e+",
               b"1" * MAX_BYTES]  # fmt: skip
BAD_NUMBER = st.one_of(st.sampled_from(BAD_NUMBERS), st.text("abcxyz ,;", min_size=1, max_size=5)
                       .map(str.encode))  # fmt: skip
K = st.one_of(st.sampled_from([1, MAX_K]), st.integers(1, MAX_K))


_SPECIAL_TOKENS = [b"", b"\x00", b"\xff\xfe\xfd", b"\xc3\x28", "\u00e9\u200b".encode(), b"\n",
                   b"x" * MAX_BYTES, b"\x80" * (MAX_BYTES - 1)]  # fmt: skip


class Filler:
    """Fills whole columns cheaply: values from a seeded ``random.Random``, mixed with one
    value hypothesis drew for this request (drawing every cell would be far too slow)."""

    def __init__(self, seed: int, token: bytes, number: bytes) -> None:
        self.rng = random.Random(seed)
        self.token, self.number = token, number

    def token_(self, nonempty: bool = False) -> bytes:
        rng = self.rng
        pick = rng.random()
        if pick < 0.25:
            value = self.token
        elif pick < 0.5:
            value = rng.randbytes(rng.randint(0, 12))
        elif pick < 0.7:
            value = "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 6))).encode()
        else:
            value = rng.choice(_SPECIAL_TOKENS)
        return value or (b"v" if nonempty else b"")

    def number_(self) -> bytes:
        rng = self.rng
        pick = rng.random()
        if pick < 0.3:
            return self.number
        if pick < 0.6:
            return rng.choice(EDGE_NUMBERS)
        if pick < 0.8:
            value = struct.unpack("f", rng.randbytes(4))[0]
            return repr(value).encode() if math.isfinite(value) else b"0"
        return str(rng.randint(-(10**30), 10**30)).encode()


@st.composite
def valid_req(draw: st.DrawFn, k: int | None = None) -> Req:
    """A valid request; every field absent, empty or filled, values at the edges."""
    k = draw(K) if k is None else k
    fill = Filler(draw(st.integers(0, 2**32)), draw(TOKEN), draw(NUMBER))
    context: dict[str, list[bytes]] = {}
    columns: dict[str, tuple[list[bytes], list[int]]] = {}
    site = draw(st.sampled_from(["absent", "none", "one"]))
    if site != "absent":
        context["site"] = [draw(TOKEN)] if site == "one" else []
    if draw(st.booleans()):
        context["segs"] = draw(st.lists(NONEMPTY, max_size=3))
    if draw(st.booleans()):
        context["temp"] = draw(st.lists(NUMBER, max_size=1))
    if draw(st.booleans()):
        columns["ad"] = ([fill.token_() for _ in range(k)], [])
    tags = draw(st.sampled_from(["absent", "empty", "filled"]))
    if tags == "empty":
        columns["tags"] = ([], [])
    elif tags == "filled":
        counts = [fill.rng.randint(0, 2) for _ in range(k)]
        columns["tags"] = ([fill.token_(nonempty=True) for _ in range(sum(counts))], counts)
    if draw(st.booleans()):
        columns["bid"] = ([fill.number_() for _ in range(k)], [])
    model = draw(st.sampled_from(["", "fuzz"]))
    request_id = draw(st.one_of(st.just(""), st.text(max_size=20), st.just("r" * 5000)))
    return Req(k, context, columns, model, request_id)


def _shown(name: str) -> str:
    """How an error message quotes a caller's field name (the start of it)."""
    return repr(name[:40])


def _tags_owner(counts: list[int], value_index: int) -> int:
    """The candidate owning value ``value_index`` of a multi-valued column."""
    end = 0
    for candidate, count in enumerate(counts):
        end += count
        if value_index < end:
            return candidate
    raise AssertionError("value index beyond the column")


@st.composite
def defective(draw: st.DrawFn) -> Case:
    """A valid request with exactly one defect, and the field the error must name."""
    r = draw(valid_req())
    k = r.k
    kind = draw(st.sampled_from(DEFECTS))

    def invalid(prefix: str) -> Case:
        return Case(r.encode(), Expect(INVALID, prefix=prefix), kind)

    if kind == "no candidates":
        r.k, r.columns = 0, {}
        return invalid("num_candidates: ")
    if kind == "too many candidates":
        r = draw(valid_req(k=MAX_K + 1))
        return invalid("num_candidates: ")
    if kind in ("unknown context field", "unknown candidate field"):
        name = draw(st.text(max_size=300).filter(lambda n: n not in NAMES))
        if kind == "unknown context field":
            r.context[name] = draw(st.lists(TOKEN, max_size=2))
            return invalid(f"context[{_shown(name)}")
        r.columns[name] = ([b"x"] * k, [])
        return invalid(f"candidates[{_shown(name)}")
    if kind == "candidate field in context":
        name = draw(st.sampled_from(["ad", "tags", "bid"]))
        r.context[name] = [b"1"]
        return invalid(f"context['{name}']: wrong kind")
    if kind == "context field in candidates":
        name = draw(st.sampled_from(["site", "segs", "temp"]))
        r.columns[name] = ([b"1"] * k, [])
        return invalid(f"candidates['{name}']: wrong kind")
    if kind == "several values, single-valued context field":
        name = draw(st.sampled_from(["site", "temp"]))
        r.context[name] = [b"1"] * draw(st.integers(2, 5))
        return invalid(f"context['{name}']: wrong kind")
    if kind == "too many values, multi-valued context field":
        r.context["segs"] = [draw(NONEMPTY)] * draw(st.integers(4, 20))
        return invalid("context['segs']: ")
    if kind == "empty value, multi-valued context field":
        values = draw(st.lists(NONEMPTY, max_size=2))
        at = draw(st.integers(0, len(values)))
        r.context["segs"] = [*values[:at], b"", *values[at:]]
        return invalid(f"context['segs'][{at}]: empty value")
    if kind == "value too long, context":
        long = draw(LONG)
        r.context["site"] = [long]
        return invalid("context['site']: value of")
    if kind == "value too long, candidate column":
        values = r.columns.get("ad", ([b"x"] * k, []))[0]
        at = draw(st.integers(0, k - 1))
        values[at] = draw(LONG)
        r.columns["ad"] = (values, [])
        return invalid(f"candidates['ad'][{at}]: value of")
    if kind == "column length":
        n = draw(st.integers(0, MAX_K + 5).filter(lambda n: n != k))
        name = draw(st.sampled_from(["ad", "bid"]))
        r.columns[name] = ([b"1"] * n, [])  # the other columns, if any, are valid
        return invalid(f"candidates['{name}']: {n} values for {k}")
    if kind == "counts for a single-valued column":
        r.columns["ad"] = ([b"1"] * k, [1] * k)
        return invalid("candidates['ad']: wrong kind")
    if kind == "counts length":
        n = draw(st.integers(0, MAX_K + 5).filter(lambda n: n not in (k, 0)))
        r.columns["tags"] = ([b"t"] * n, [1] * n)
        return invalid(f"candidates['tags']: {n} counts for {k}")
    if kind == "counts sum":
        counts = [draw(st.integers(0, 2))] * k
        n = draw(st.integers(0, 2 * k + 3).filter(lambda n: n != sum(counts)))
        r.columns["tags"] = ([b"t"] * n, counts)
        return invalid(f"candidates['tags']: counts sum to {sum(counts)} but {n}")
    if kind == "count above max_values":
        counts = [1] * k
        at = draw(st.integers(0, k - 1))
        counts[at] = draw(st.one_of(st.integers(3, 100), st.just(2**32 - 1)))
        r.columns["tags"] = ([b"t"] * k, counts)  # the widest row is checked first
        return invalid(f"candidates['tags'][{at}]: {counts[at]} values, more than max_values")
    if kind == "empty or long value, multi-valued column":
        counts = [1] * k
        values = [b"t"] * k
        at = draw(st.integers(0, k - 1))
        empty = draw(st.booleans())
        values[at] = b"" if empty else b"t" * (MAX_BYTES + 1)
        r.columns["tags"] = (values, counts)
        return invalid(f"candidates['tags'][{_tags_owner(counts, at)}]: ")
    if kind == "bad number, candidate":
        values = r.columns.get("bid", ([b"1"] * k, []))[0]
        at = draw(st.integers(0, k - 1))
        values[at] = draw(BAD_NUMBER)
        r.columns["bid"] = (values, [])
        return invalid(f"candidates['bid'][{at}]: ")
    if kind == "bad number, context":
        r.context["temp"] = [draw(BAD_NUMBER)]
        return invalid("context['temp']: ")
    if kind == "path as model name":
        r.model = draw(st.sampled_from(["../fuzz", "fuzz/1", "/etc/passwd", ".tmp-1", "..",
                                        "a\\b", "a\x00b", "f" * 256]))  # fmt: skip
        return invalid("model: ")
    if kind == "unknown model":
        r.model = draw(st.text(min_size=1, max_size=255).filter(
            lambda n: n != "fuzz" and "/" not in n and "\\" not in n and "\x00" not in n
            and not n.startswith(".")))  # fmt: skip
        return Case(r.encode(), Expect(NOT_FOUND), kind)
    if kind == "non-UTF-8 string field":
        tag = draw(st.sampled_from([b"\x0a", b"\x12"]))  # request_id, model
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x80"]))
        return Case(
            r.encode() + tag + bytes([len(junk)]) + junk, Expect(INVALID, prefix="request: "), kind
        )
    assert kind == "duplicate fields", kind
    # Repeated map entries and scalars: protobuf keeps the last. Each variant's last value is
    # known, so is the answer.
    variant = draw(st.sampled_from(["fine", "bad last", "fixed last", "k again", "k zero"]))
    base = r.encode()
    if variant == "fine":
        extra = pb.PredictRequest(context={"site": pb.Values(values=[draw(TOKEN)])})
        expect = Expect(OK, k=k, request_id=r.request_id)
    elif variant == "bad last":
        extra = pb.PredictRequest(context={"site": pb.Values(values=[b"a", b"b"])})
        expect = Expect(INVALID, prefix="context['site']: wrong kind")
    elif variant == "fixed last":
        r.context["site"] = [b"a", b"b"]
        base = r.encode()
        extra = pb.PredictRequest(context={"site": pb.Values(values=[b"c"])})
        expect = Expect(OK, k=k, request_id=r.request_id)
    elif variant == "k again":
        extra = pb.PredictRequest(num_candidates=k)
        expect = Expect(OK, k=k, request_id=r.request_id)
    else:  # num_candidates = 0 written explicitly (proto3 would omit a default value)
        return Case(base + b"\x20\x00", Expect(INVALID, prefix="num_candidates: "), kind)
    return Case(base + extra.SerializeToString(), expect, f"{kind}: {variant}")


DEFECTS = [
    "no candidates", "too many candidates", "unknown context field", "unknown candidate field",
    "candidate field in context", "context field in candidates",
    "several values, single-valued context field", "too many values, multi-valued context field",
    "empty value, multi-valued context field", "value too long, context",
    "value too long, candidate column", "column length", "counts for a single-valued column",
    "counts length", "counts sum", "count above max_values",
    "empty or long value, multi-valued column", "bad number, candidate", "bad number, context",
    "path as model name", "unknown model", "non-UTF-8 string field", "duplicate fields",
]  # fmt: skip

VALID = valid_req().map(
    lambda r: Case(r.encode(), Expect(OK, k=r.k, request_id=r.request_id), "valid")
)
CASE = st.one_of(VALID, defective())


# ----------------------------------------------------------------------------- sending


def send(target: str, raws: list[bytes]) -> list[tuple[grpc.StatusCode, str, bytes]]:
    """Send raw request bytes concurrently; (code, details, response bytes) for each."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(PREDICT)  # no serializers: bytes in, bytes out
        futures = [call.future(raw, timeout=60.0) for raw in raws]
        out = []
        for future in futures:
            try:
                out.append((OK, "", future.result()))
            except grpc.RpcError as exc:
                out.append((exc.code(), exc.details() or "", b""))
    return out


def check_answer(case: Case, code: grpc.StatusCode, details: str, body: bytes) -> None:
    expect = case.expect
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (case.what, details)
    assert code == expect.code, (case.what, code, details, case.raw[:300])
    if code == OK:
        answer = pb.PredictResponse.FromString(body)
        assert len(answer.probabilities) == expect.k, case.what
        assert all(0.0 <= p <= 1.0 and math.isfinite(p) for p in answer.probabilities)
        assert answer.request_id == expect.request_id and answer.model == "fuzz"
    elif code == INVALID:
        assert details.startswith(expect.prefix), (case.what, expect.prefix, details)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cases=st.lists(CASE, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
def test_generated_requests_get_the_right_answer(served: Served, cases: list[Case]) -> None:
    answers = send(served.target, [c.raw for c in cases])
    served.sent[0] += len(cases)
    for case, answer in zip(cases, answers, strict=True):
        check_answer(case, *answer)


@settings(max_examples=40, deadline=None, database=None)
@given(raws=st.lists(st.binary(max_size=300), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
def test_random_bytes_are_never_internal(served: Served, raws: list[bytes]) -> None:
    for raw, (code, details, body) in zip(raws, send(served.target, raws), strict=True):
        try:
            parsed = pb.PredictRequest.FromString(raw)
        except Exception:  # not a message: the server must say so, blaming the request
            assert (code, details[:9]) == (INVALID, "request: "), (raw, code, details)
            continue
        # Bytes that happen to parse are an ordinary (nearly always invalid) request.
        assert code in (OK, INVALID, NOT_FOUND), (raw, code, details)
        if code == INVALID:
            assert details.startswith(("num_candidates: ", "context[", "candidates[", "model: ")), (
                details
            )
        elif code == OK:
            answer = pb.PredictResponse.FromString(body)
            assert len(answer.probabilities) == parsed.num_candidates
    served.sent[0] += len(raws)


def test_zz_after_the_fuzz_the_server_is_healthy_and_was_really_fuzzed(served: Served) -> None:
    """Runs last in the module (named so): at least 10,000 generated requests went through."""
    assert served.sent[0] >= 10_000, served.sent[0]
    plain = Req(3, {"site": [b"s"]}, {"ad": ([b"a", b"b", b"c"], [])}, request_id="after")
    [(code, details, body)] = send(served.target, [plain.encode()])
    assert code == OK, details
    assert len(pb.PredictResponse.FromString(body).probabilities) == 3


# ------------------------------------------------------------------------------ limits


def test_concurrent_rpc_limit_is_enforced(tmp_path: Path, small_model_root: Path) -> None:
    """``max_concurrent_rpcs`` (``--max-concurrent-rpcs``): RPCs beyond it are refused at once
    with RESOURCE_EXHAUSTED; health Watch streams hold the slots here (they count too)."""
    shutil.copytree(small_model_root, tmp_path / "models")
    options = ServerOptions(model_dir=tmp_path / "models", port=0, metrics_port=0,
                            warmup_batches=1, max_concurrent_rpcs=2)  # fmt: skip
    thread = LoopThread()
    server = PredictionServer(options)
    try:
        thread.run(server.start())
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            watches = [health.Watch(check, timeout=30) for _ in range(2)]
            for watch in watches:  # both streams are open on the server
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            metadata = pb.GetModelMetadataRequest()
            meta = channel.unary_unary(
                "/adpredict.v1.PredictionService/GetModelMetadata",
                request_serializer=pb.GetModelMetadataRequest.SerializeToString,
                response_deserializer=pb.GetModelMetadataResponse.FromString,
            )
            with pytest.raises(grpc.RpcError) as refused:
                meta(metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            watches[0].cancel()
            _wait(lambda: _answers(meta, metadata))
    finally:
        thread.run(server.drain())
        thread.close()


def _answers(call: Callable[..., Any], request: Any) -> bool:
    try:
        return call(request, timeout=10).model == "small"
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the slot is not free yet
        return False


def _wait(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
