"""RequestCodec: every validation rule names its field; merges and splits map rows correctly."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adpredict.errors import InvalidRequestError, ModelError
from adpredict.schema import Schema
from adpredict.serving import codec as codec_module
from adpredict.serving.batcher import Slice
from adpredict.serving.codec import (
    REQUEST_INDEX,
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

SCHEMA = Schema.from_dict(
    {
        "name": "codec_test",
        "version": 1,
        "fields": [
            {"name": "site", "scope": "context", "kind": "categorical", "buckets": 64},
            {
                "name": "segs",
                "scope": "context",
                "kind": "multi_categorical",
                "buckets": 64,
                "max_values": 3,
            },
            {"name": "temp", "scope": "context", "kind": "numeric", "boundaries": [0.0, 10.0]},
            {"name": "ad", "scope": "candidate", "kind": "categorical", "buckets": 64},
            {
                "name": "tags",
                "scope": "candidate",
                "kind": "multi_categorical",
                "buckets": 64,
                "max_values": 2,
            },
            {"name": "bid", "scope": "candidate", "kind": "numeric", "boundaries": [1.0, 2.0]},
        ],
    }
)
LIMITS = CodecLimits(max_candidates=5, max_value_bytes=256)


class WireCodec(RequestCodec):
    """Decodes each message from its wire bytes (``predict_parser``), as the servers do."""

    def decode(self, request: object, *, rows: bool = False) -> ParsedRequest:
        if isinstance(request, pb.PredictRequest):
            request = predict_parser()(request.SerializeToString())
        return super().decode(request, rows=rows)


def python_codec(schema: Schema, limits: CodecLimits) -> RequestCodec:
    """A codec as on a machine where the C extensions (``_scan``, ``_wire``) are not built."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(codec_module, "_native_scan", None)
        patch.setattr(codec_module, "_wire", None)
        return RequestCodec(schema, limits)


def test_the_python_codec_uses_no_extension() -> None:
    slow = python_codec(SCHEMA, LIMITS)
    assert slow._scan is None and slow._wire_plan is None
    assert codec_module._wire is _WIRE_AT_IMPORT  # the patch is undone


_WIRE_AT_IMPORT = codec_module._wire


@pytest.fixture(params=["wire", "native", "python"])
def codec(request: pytest.FixtureRequest) -> RequestCodec:
    """Every codec test runs from wire bytes (C decoder, when built), from a message with the
    C value scan (when built), and from a message with the Python checks alone."""
    if request.param == "wire":
        return WireCodec(SCHEMA, LIMITS)
    if request.param == "native":
        return RequestCodec(SCHEMA, LIMITS)
    return python_codec(SCHEMA, LIMITS)


def request(
    k: int = 3,
    context: dict[str, list[bytes]] | None = None,
    columns: dict[str, tuple[list[bytes], list[int]]] | None = None,
) -> pb.PredictRequest:
    """A request with explicit columns; by default a fully valid one with K = ``k``."""
    if context is None:
        context = {"site": [b"s.com"], "segs": [b"a", b"b"], "temp": [b"3.5"]}
    if columns is None:
        columns = {
            "ad": ([b"ad%d" % i for i in range(k)], []),
            "tags": ([b"t"] * k, [1] * k),
            "bid": ([b"1.5"] * k, []),
        }
    out = pb.PredictRequest(num_candidates=k)
    for name, values in context.items():
        out.context[name].values.extend(values)
    for name, (values, counts) in columns.items():
        out.candidates[name].values.extend(values)
        out.candidates[name].counts.extend(counts)
    return out


def rejects(codec: RequestCodec, req: pb.PredictRequest, where: str) -> str:
    """Assert the request is refused with a message starting with ``where``; return it."""
    with pytest.raises(InvalidRequestError) as info:
        codec.decode(req)
    message = str(info.value)
    assert message.startswith(where), message
    return message


# ---------------------------------------------------------------------------------- decoding


def test_valid_request_becomes_arrays(codec: RequestCodec) -> None:
    req = request(
        k=3,
        columns={
            "ad": ([b"x", b"", b"z"], []),
            "tags": ([b"t1", b"t2", b"t3"], [2, 0, 1]),
            "bid": ([b"1.25", b"", b"-3e2"], []),
        },
    )
    parsed = codec.decode(req)
    assert parsed.size == 3
    assert parsed.context["site"].tolist() == [b"s.com"]
    assert parsed.context["segs"].tolist() == [[b"a", b"b"]]
    assert parsed.context["temp"].tolist() == [b"3.5"]
    assert parsed.candidates["ad"].tolist() == [b"x", b"", b"z"]
    assert parsed.candidates["tags"].tolist() == [[b"t1", b"t2"], [b"", b""], [b"t3", b""]]
    assert parsed.candidates["bid"].tolist() == [b"1.25", b"", b"-3e2"]
    for array in (*parsed.context.values(), *parsed.candidates.values()):
        assert array.dtype == object
    # ad[1] empty, tags[1] no values, bid[1] empty
    assert parsed.missing == 3
    assert parsed.fingerprint == SCHEMA.fingerprint()


def test_absent_fields_are_missing_and_counted(codec: RequestCodec) -> None:
    req = request(k=4, context={"site": [b""], "segs": []}, columns={"ad": ([b"a"] * 4, [])})
    parsed = codec.decode(req)
    assert parsed.context["site"].tolist() == [b""]
    assert parsed.context["segs"].tolist() == [[b""]]
    assert parsed.context["temp"].tolist() == [b""]
    assert parsed.candidates["tags"].tolist() == [[b""]] * 4
    assert parsed.candidates["bid"].tolist() == [b""] * 4
    # 3 context cells + tags and bid for 4 candidates
    assert parsed.missing == 3 + 4 + 4


def test_multi_column_with_no_values_and_no_counts_is_all_missing(codec: RequestCodec) -> None:
    req = request(k=2, columns={"tags": ([], []), "ad": ([b"a", b"b"], [])})
    parsed = codec.decode(req)
    assert parsed.candidates["tags"].tolist() == [[b""], [b""]]


@pytest.mark.parametrize(
    ("scope", "name", "where", "reason"),
    [
        ("context", "nope", "context['nope']", "unknown field"),
        ("candidates", "nope", "candidates['nope']", "unknown field"),
        ("context", "bid", "context['bid']", "wrong kind"),
        ("candidates", "site", "candidates['site']", "wrong kind"),
    ],
)
def test_unknown_or_misplaced_field(
    codec: RequestCodec, scope: str, name: str, where: str, reason: str
) -> None:
    req = request()
    if scope == "context":
        req.context[name].values.append(b"1")
    else:
        req.candidates[name].values.extend([b"1"] * 3)
    assert reason in rejects(codec, req, where)


def test_several_values_for_a_single_valued_context_field(codec: RequestCodec) -> None:
    req = request(context={"site": [b"a", b"b"]})
    assert "wrong kind" in rejects(codec, req, "context['site']")


def test_counts_on_a_single_valued_column(codec: RequestCodec) -> None:
    req = request(k=2, columns={"ad": ([b"a", b"b"], [1, 1])})
    assert "wrong kind" in rejects(codec, req, "candidates['ad']")


def test_empty_candidate_list(codec: RequestCodec) -> None:
    rejects(codec, request(k=0, columns={}), "num_candidates")


def test_more_candidates_than_the_limit(codec: RequestCodec) -> None:
    assert "limit of 5" in rejects(codec, request(k=6), "num_candidates")
    codec.decode(request(k=5))  # the limit itself is fine


@pytest.mark.parametrize(
    ("columns", "where"),
    [
        ({"ad": ([b"a", b"b"], [])}, "candidates['ad']"),  # 2 values, K = 3
        ({"bid": ([b"1"] * 4, [])}, "candidates['bid']"),  # 4 values, K = 3
        ({"tags": ([b"t"] * 2, [1, 1])}, "candidates['tags']"),  # 2 counts, K = 3
        ({"tags": ([b"t"] * 2, [1, 1, 1])}, "candidates['tags']"),  # counts sum to 3, 2 values
        ({"tags": ([b"t"] * 2, [])}, "candidates['tags']"),  # values without counts
    ],
)
def test_column_lengths_must_match_k(
    codec: RequestCodec, columns: dict[str, tuple[list[bytes], list[int]]], where: str
) -> None:
    rejects(codec, request(k=3, columns=columns), where)


BAD_NUMBERS = [b"abc", b"inf", b"-inf", b"nan", b"1e39", b"1e400", b" 1", b"1 ", b"0x10", b"1_0"]
BAD_NUMBERS += [b"1.2.3", b"--1", b"1e", b"e5", b".", b"+", b"\xd9\xa1", b"1,5", b"1..2", b"..5"]
BAD_NUMBERS += [b"1.2.", b"9" * 40, b"-" + b"9" * 39 + b".5", b"1e-5x"]


@pytest.mark.parametrize("bad", BAD_NUMBERS)
def test_numbers_must_be_finite_decimals(codec: RequestCodec, bad: bytes) -> None:
    req = request(k=3, columns={"bid": ([b"1", b"2", bad], [])})
    message = rejects(codec, req, "candidates['bid'][2]")
    assert "not a finite decimal number" in message
    rejects(codec, request(context={"temp": [bad]}), "context['temp']")


def test_a_newline_cannot_smuggle_two_numbers_into_one_value(codec: RequestCodec) -> None:
    req = request(k=2, columns={"bid": ([b"1\n2", b""], [])})
    rejects(codec, req, "candidates['bid'][0]")


GOOD_NUMBERS = [b"1", b"-1.5", b".5", b"5.", b"+3", b"1e5", b"2E-3", b"3.4e38", b"007", b"0.50"]
GOOD_NUMBERS += [b"9" * 38, b"9" * 38 + b".9", b"-" + b"9" * 38, b"1e-50"]


@pytest.mark.parametrize("good", GOOD_NUMBERS)
def test_decimal_numbers_pass(codec: RequestCodec, good: bytes) -> None:
    parsed = codec.decode(request(k=3, columns={"bid": ([good, b"", b"1.25"], [])}))
    assert parsed.candidates["bid"].tolist() == [good, b"", b"1.25"]
    codec.decode(request(context={"temp": [good]}))


@pytest.mark.parametrize("column", [[b".", b"1"], [b"1", b"."], [b"1", b".", b"2"], [b"."]])
def test_a_lone_dot_is_not_a_number_wherever_it_sits(
    codec: RequestCodec, column: list[bytes]
) -> None:
    req = request(k=len(column), columns={"bid": (column, [])})
    rejects(codec, req, f"candidates['bid'][{column.index(b'.')}]")


def test_multi_valued_field_with_too_many_values(codec: RequestCodec) -> None:
    rejects(codec, request(context={"segs": [b"a", b"b", b"c", b"d"]}), "context['segs']")
    req = request(k=3, columns={"tags": ([b"t"] * 4, [1, 3, 0])})
    assert "max_values=2" in rejects(codec, req, "candidates['tags'][1]")


def test_empty_value_inside_a_multi_valued_field(codec: RequestCodec) -> None:
    rejects(codec, request(context={"segs": [b"a", b""]}), "context['segs'][1]")
    req = request(k=3, columns={"tags": ([b"t", b"u", b""], [1, 0, 2])})
    rejects(codec, req, "candidates['tags'][2]")


def test_values_longer_than_the_limit(codec: RequestCodec) -> None:
    long = b"x" * 257  # limit is 256 bytes
    rejects(codec, request(context={"site": [long]}), "context['site']")
    rejects(codec, request(context={"segs": [b"a", long]}), "context['segs'][1]")
    rejects(codec, request(k=3, columns={"ad": ([b"a", long, b"c"], [])}), "candidates['ad'][1]")
    req = request(k=3, columns={"tags": ([b"a", b"b", long], [2, 0, 1])})
    rejects(codec, req, "candidates['tags'][2]")
    codec.decode(request(context={"site": [b"x" * 256]}))  # the limit itself is fine


def test_error_messages_bound_what_they_quote(codec: RequestCodec) -> None:
    huge_name = "n" * 5000
    req = request()
    req.context[huge_name].values.append(b"1")
    message = rejects(codec, req, "context['nnnn")
    assert len(message) < 400


# ----------------------------------------------------------------------------- merge / split


def parsed_with(
    codec: RequestCodec, site: bytes, segs: list[bytes], ads: list[bytes]
) -> ParsedRequest:
    k = len(ads)
    tags = [[b"t%d" % j for j in range(i % 3)] for i in range(k)]
    columns = {
        "ad": (ads, []),
        "tags": ([t for row in tags for t in row], [len(row) for row in tags]),
    }
    return codec.decode(request(k=k, context={"site": [site], "segs": segs}, columns=columns))


def test_merge_requests_gives_signature_inputs(codec: RequestCodec) -> None:
    a = parsed_with(codec, b"a.com", [b"s1"], [b"a0", b"a1"])
    b = parsed_with(codec, b"b.com", [b"s1", b"s2", b"s3"], [b"b0", b"b1", b"b2"])
    c = parsed_with(codec, b"c.com", [], [b"c0"])
    feed = codec.merge([a, b, c])
    assert set(feed) == {*SCHEMA.names, REQUEST_INDEX}
    assert feed[REQUEST_INDEX].dtype == np.int32
    assert feed[REQUEST_INDEX].tolist() == [0, 0, 1, 1, 1, 2]
    assert feed["site"].tolist() == [b"a.com", b"b.com", b"c.com"]
    assert feed["segs"].tolist() == [
        [b"s1", b"", b""],
        [b"s1", b"s2", b"s3"],
        [b"", b"", b""],
    ]
    assert feed["temp"].tolist() == [b""] * 3  # absent in all three
    assert feed["ad"].tolist() == [b"a0", b"a1", b"b0", b"b1", b"b2", b"c0"]
    # tags: widths 2 (a: 0,1 values), 2 (b: 0,1,2 values), 1 (c: 0 values) -> padded to 2
    assert feed["tags"].tolist() == [
        [b"", b""],
        [b"t0", b""],
        [b"", b""],
        [b"t0", b""],
        [b"t0", b"t1"],
        [b"", b""],
    ]
    assert feed["tags"].shape == (6, 2)


def test_merge_slices_maps_each_slice_to_its_own_row(codec: RequestCodec) -> None:
    a = parsed_with(codec, b"a.com", [b"s1"], [b"a0", b"a1", b"a2", b"a3"])
    b = parsed_with(codec, b"b.com", [b"s2"], [b"b0", b"b1", b"b2"])
    feed = codec.merge([Slice(a, 2, 4), Slice(b, 0, 3), Slice(a, 0, 1)])
    assert feed[REQUEST_INDEX].tolist() == [0, 0, 1, 1, 1, 2]
    assert feed["site"].tolist() == [b"a.com", b"b.com", b"a.com"]
    assert feed["ad"].tolist() == [b"a2", b"a3", b"b0", b"b1", b"b2", b"a0"]
    assert feed["tags"].tolist()[:2] == [[b"t0", b"t1"], [b""] * 2]


def test_merging_the_slices_of_a_request_covers_it_exactly(codec: RequestCodec) -> None:
    a = parsed_with(codec, b"a.com", [b"s1"], [b"a%d" % i for i in range(5)])
    whole = codec.merge([a])
    parts = codec.merge([Slice(a, 0, 2), Slice(a, 2, 5)])
    assert parts["ad"].tolist() == whole["ad"].tolist()
    assert parts["tags"].tolist() == whole["tags"].tolist()
    assert parts[REQUEST_INDEX].tolist() == [0, 0, 1, 1, 1]
    assert whole[REQUEST_INDEX].tolist() == [0] * 5


def test_merge_refuses_requests_validated_for_another_schema(codec: RequestCodec) -> None:
    other = Schema.from_dict({**SCHEMA.to_dict(), "fields": SCHEMA.to_dict()["fields"][:-1]})
    foreign = RequestCodec(other, LIMITS).decode(request(k=1, columns={"ad": ([b"a"], [])}))
    with pytest.raises(ModelError, match="fingerprint"):
        codec.merge([foreign])


def test_split_cuts_probabilities_per_slice(codec: RequestCodec) -> None:
    a = parsed_with(codec, b"a.com", [], [b"a0", b"a1", b"a2"])
    parts = [Slice(a, 1, 3), a, Slice(a, 0, 1)]
    probabilities = np.arange(6, dtype=np.float32)
    pieces = RequestCodec.split(probabilities, parts)
    assert [p.tolist() for p in pieces] == [[0.0, 1.0], [2.0, 3.0, 4.0], [5.0]]
    with pytest.raises(ModelError, match=re.escape("(5,)")):
        RequestCodec.split(probabilities[:5], [a, a])


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_candidates"):
        CodecLimits(max_candidates=0)


def test_lenient_parser_turns_undecodable_bytes_into_an_invalid_request() -> None:
    parse = lenient_parser(pb.PredictRequest)
    good = request(k=2)
    assert parse(good.SerializeToString()) == good
    require_decoded(good)  # a message passes
    bad_utf8 = good.SerializeToString() + b"\x12\x02\xc3\x28"  # model = invalid UTF-8
    for raw, reason in ((b"\xff\xff\xff", "Wire format was corrupt"), (bad_utf8, "UTF-8")):
        undecodable = parse(raw)
        assert isinstance(undecodable, Undecodable) and undecodable.size == len(raw)
        with pytest.raises(InvalidRequestError) as info:
            require_decoded(undecodable)
        message = str(info.value)
        assert message.startswith(f"request: the {len(raw)} bytes received are not a valid ")
        assert "adpredict.v1.PredictRequest" in message and reason in message


# ------------------------------------------------------------------- the C value scan (_scan)

_scan = codec_module._native_scan
needs_scan = pytest.mark.skipif(_scan is None, reason="adpredict.serving._scan is not built")
# Values near the edges of what the checks accept: numbers of every shape, signs, dots,
# exponents, spaces, nan/inf, NUL and non-ASCII bytes, empty and over-long values.
_ALPHABET = b"0123456789.+-eE xn\x00\xff"
_value = st.one_of(
    st.binary(max_size=6).map(lambda b: bytes(_ALPHABET[x % len(_ALPHABET)] for x in b)),
    st.integers(0, 45).map(lambda n: b"9" * n),
    st.integers(0, 45).map(lambda n: b"1." + b"0" * n),
    st.sampled_from([b"", b".", b"-", b"+.5", b"5.", b"1e38", b"3.5e38", b"inf", b"nan"]),
    st.binary(min_size=8, max_size=10),
)


def python_check(values: list[bytes], limit: int, allow_empty: bool, numeric: bool) -> int:
    """The Python checks' verdict on a column: its empties, or -1 if it is refused."""
    slow = python_codec(SCHEMA, CodecLimits(max_value_bytes=limit))
    try:
        return slow._check("c", values, allow_empty=allow_empty, numeric=numeric)
    except InvalidRequestError:
        return -1


@needs_scan
@settings(max_examples=3000, deadline=None)
@given(
    values=st.lists(_value, max_size=6),
    limit=st.integers(1, 12),
    allow_empty=st.booleans(),
    numeric=st.booleans(),
)
def test_scan_never_passes_what_the_python_checks_refuse(
    values: list[bytes], limit: int, allow_empty: bool, numeric: bool
) -> None:
    fast = _scan(values, limit, allow_empty, numeric)
    slow = python_check(values, limit, allow_empty, numeric)
    if fast >= 0:  # vouched for: the Python checks accept it too, with the same empty count
        assert slow == fast
    # and whatever the scan sends on, the codec's answer is the Python checks' answer
    both = RequestCodec(SCHEMA, CodecLimits(max_value_bytes=limit))
    try:
        got = both._check("c", values, allow_empty=allow_empty, numeric=numeric)
    except InvalidRequestError:
        got = -1
    assert got == slow


@needs_scan
def test_scan_settles_the_common_columns_itself() -> None:
    """The fast path is taken for ordinary ids and prices (else it would gain nothing)."""
    ids = [b"cr-%d" % i for i in range(300)]
    assert _scan(ids, 256, True, False) == 0
    assert _scan([*ids[:5], b"", b""], 256, True, False) == 2
    assert _scan([b"4.36", b"0.81", b"12", b"-.5", b"+3.", b""], 256, True, True) == 1
    assert _scan([b"9" * 38], 256, False, True) == 0
    # left to the Python checks: exponents, 39+ digit numbers, empties where not allowed,
    # over-long values, and anything that is not exactly a list of bytes
    assert _scan([b"1e5"], 256, True, True) == -1
    assert _scan([b"9" * 39], 256, True, True) == -1
    assert _scan([b""], 256, False, False) == -1
    assert _scan([b"x" * 257], 256, True, False) == -1
    assert _scan([bytearray(b"x")], 256, True, False) == -1
    with pytest.raises(TypeError):
        _scan((b"x",), 256, True, False)


# --------------------------------------------------------------- the C wire decoder (_wire)

_wire = codec_module._wire
needs_wire = pytest.mark.skipif(_wire is None, reason="adpredict.serving._wire is not built")
_SLOW = python_codec(SCHEMA, LIMITS)
_FAST = RequestCodec(SCHEMA, LIMITS)
_NAMES = ["site", "segs", "temp", "ad", "tags", "bid", "nope", "sité"]


def outcome(codec: RequestCodec, request: object) -> tuple[object, ...]:
    """What decode made of a request: its arrays, or the error's message."""
    try:
        require_decoded(request)
        parsed = codec.decode(request)
    except InvalidRequestError as exc:
        return ("refused", str(exc))
    arrays = {
        f"{scope}.{name}": (a.shape, a.dtype, a.tolist())
        for scope, d in (("context", parsed.context), ("candidates", parsed.candidates))
        for name, a in d.items()
    }
    return ("decoded", parsed.size, parsed.missing, arrays)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@st.composite
def _messages(draw: st.DrawFn) -> bytes:
    """A PredictRequest's bytes: right or wrong in every way the codec checks, and in the
    wire shapes protobuf allows that _wire.header leaves to upb."""
    k = draw(st.integers(0, 6))
    msg = pb.PredictRequest(num_candidates=k, model=draw(st.sampled_from(["", "m"])))
    for name in draw(st.lists(st.sampled_from(_NAMES), max_size=4)):
        msg.context[name].values.extend(draw(st.lists(_value, max_size=4)))
    for name in draw(st.lists(st.sampled_from(_NAMES), max_size=4)):
        column = msg.candidates[name]
        n = draw(st.one_of(st.just(k), st.integers(0, 7)))
        column.values.extend(draw(st.lists(_value, min_size=n, max_size=n)))
        if draw(st.booleans()):
            column.counts.extend(draw(st.lists(st.integers(0, 3), min_size=0, max_size=7)))
    data = msg.SerializeToString()
    tail = draw(
        st.sampled_from(
            ["none", "merge", "unknown", "unpacked", "bad_utf8", "cut", "garbage", "long_tag"]
        )
    )
    if tail == "merge":  # a second message: scalars replaced, map entries replaced by key
        data += draw(_messages())
    elif tail == "unknown":
        data += b"\x48" + _varint(draw(st.integers(0, 2**40)))  # field 9, varint
    elif tail == "unpacked":  # candidates['tags'] with counts = 2 unpacked
        column = b"\x0a\x01t\x10\x01"
        entry = b"\x0a\x04tags\x12" + _varint(len(column)) + column
        data += b"\x2a" + _varint(len(entry)) + entry
    elif tail == "long_tag":  # request_id = "x" under a tag of 2..10 bytes (upb takes <= 5)
        data += b"\x8a" + b"\x80" * draw(st.integers(0, 8)) + b"\x00\x01x"
    elif tail == "bad_utf8":
        data += b"\x0a\x02\xc3\x28"  # request_id
    elif tail == "cut" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif tail == "garbage":
        data += draw(st.binary(max_size=8))
    return data


_id = st.sampled_from([b"a", b"bb", b"x" * 256, b"\xff\x00\n", b"1", b""])
_number = st.sampled_from([b"", b"1.5", b"-3", b".5", b"+2.", b"9" * 38, b"1e5"])


@st.composite
def _usual_messages(draw: st.DrawFn) -> bytes:
    """A request as a client writes it: valid, with some fields absent, empty or at a limit
    (and now and then an exponent, which the C decoder leaves to the Python checks)."""
    k = draw(st.integers(1, 5))
    msg = pb.PredictRequest(num_candidates=k, request_id=draw(st.sampled_from(["", "r", "é"])))
    if draw(st.booleans()):
        msg.context["site"].values.extend(draw(st.lists(_id, max_size=1)))
    if draw(st.booleans()):
        msg.context["segs"].values.extend(draw(st.lists(_id.filter(bool), max_size=3)))
    if draw(st.booleans()):
        msg.context["temp"].values.extend(draw(st.lists(_number, max_size=1)))
    if draw(st.booleans()):
        msg.candidates["ad"].values.extend(draw(st.lists(_id, min_size=k, max_size=k)))
    if draw(st.booleans()):
        counts = draw(st.lists(st.integers(0, 2), min_size=k, max_size=k))
        n = sum(counts)
        msg.candidates["tags"].counts.extend(counts)
        msg.candidates["tags"].values.extend(
            draw(st.lists(_id.filter(bool), min_size=n, max_size=n))
        )
    if draw(st.booleans()):
        msg.candidates["bid"].values.extend(draw(st.lists(_number, min_size=k, max_size=k)))
    return msg.SerializeToString()


@needs_wire
@settings(max_examples=3000, deadline=None)
@given(data=st.one_of(_usual_messages(), _messages()))
def test_wire_decoder_answers_exactly_as_upb_and_the_python_checks(data: bytes) -> None:
    """From bytes, the servers' path (predict_parser + the C decoder, falling back to upb and
    the Python checks) gives the same arrays or the same error as upb + the Python checks."""
    wire = predict_parser()(data)
    parsed = lenient_parser(pb.PredictRequest)(data)
    if isinstance(wire, WireRequest):  # header vouched: upb parses it, to the same header
        assert isinstance(parsed, pb.PredictRequest)
        assert (wire.request_id, wire.model) == (parsed.request_id, parsed.model)
        assert wire.num_candidates == parsed.num_candidates
    assert outcome(_FAST, wire) == outcome(_SLOW, parsed)


def _wire_bytes(req: pb.PredictRequest) -> bytes:
    data = req.SerializeToString()
    assert _wire.header(data) is not None
    return data


@needs_wire
def test_wire_decoder_settles_ordinary_requests_itself() -> None:
    """The fast path is taken for ordinary requests (else it would gain nothing)."""
    req = request(k=3)
    req.request_id, req.model = "r-1", "ctr"
    data = _wire_bytes(req)
    assert _wire.header(data) == ("r-1", "ctr", 3)
    arrays = _wire.decode(data, _FAST._wire_plan, 3)
    assert arrays is not None
    context, candidates, missing = arrays
    assert candidates["tags"].tolist() == [[b"t"], [b"t"], [b"t"]]
    assert context["segs"].tolist() == [[b"a", b"b"]] and missing == 0
    absent = request(k=2, context={}, columns={})
    assert _wire.decode(_wire_bytes(absent), _FAST._wire_plan, 2) is not None
    # left to upb and the Python checks: what they refuse, and numbers with exponents
    exponent = request(k=1, columns={"bid": ([b"1e3"], [])})
    assert _wire.decode(_wire_bytes(exponent), _FAST._wire_plan, 1) is None
    unknown = request(k=1, columns={"nope": ([b"x"], [])})
    assert _wire.decode(_wire_bytes(unknown), _FAST._wire_plan, 1) is None


@needs_wire
@pytest.mark.parametrize(
    ("tail", "what"),
    [
        (b"\x0a\x01x", "request_id twice"),
        (b"\x20\x01", "num_candidates twice"),
        (b"\x48\x01", "an unknown field"),
        (b"\x1a\x0b\x0a\x05sit\xc3\xa9\x12\x02\x0a\x00", "a non-ASCII key"),
        (b"\x2a\x0d\x0a\x04tags\x12\x05\x0a\x01t\x10\x01", "unpacked counts"),
        (b"\x12\x02\xc3\x28", "model not UTF-8"),
        (b"\x2a\x06\x0a\x04tags", "a map entry without a value"),
        (b"\x00", "a zero tag"),
        (b"\x8a\x80\x80\x80\x80\x00\x01x", "a 6-byte tag (upb refuses more than 5)"),
        (b"\x1a\x0b\x0a\x04site\x12\x03\x0a\x01y", "a context key twice (seen by decode)"),
    ],
)
def test_unusual_wire_shapes_are_left_to_upb(tail: bytes, what: str) -> None:
    req = request(k=1, context={"site": [b"s"]}, columns={"ad": ([b"a"], [])})
    req.request_id = "r"
    assert _wire.header(req.SerializeToString()) == ("r", "", 1)
    data = req.SerializeToString() + tail
    if "decode" in what:
        assert _wire.decode(data, _FAST._wire_plan, 1) is None
    else:
        assert _wire.header(data) is None, what
    parsed = predict_parser()(data)
    expected = lenient_parser(pb.PredictRequest)(data)
    assert outcome(_FAST, parsed) == outcome(_SLOW, expected)


@needs_wire
def test_wire_decoder_shares_repeated_short_values() -> None:
    """A short value seen before is the same (immutable) bytes object; long ones are not."""
    long_id = b"x" * 33
    req = request(k=2, columns={"ad": ([b"same", long_id], [])})
    data = _wire_bytes(req)
    codec = RequestCodec(SCHEMA, LIMITS)
    first, second = codec.decode(WireRequest("", "", 2, data)), codec.decode(predict_parser()(data))
    a, b = first.candidates["ad"], second.candidates["ad"]
    assert a.tolist() == b.tolist() == [b"same", long_id]
    assert a[0] is b[0] and a[1] is not b[1]
    assert second.context["site"][0] is first.context["site"][0]


@needs_wire
def test_wire_decoder_leaks_nothing() -> None:
    """Every array and value it makes is freed, on the fast path and when it gives up."""
    import tracemalloc

    good = _wire_bytes(request(k=5))
    late = _wire_bytes(request(k=5, columns={"ad": ([b"a"] * 5, []), "bid": ([b"1e1"] * 5, [])}))
    plan = _FAST._wire_plan
    for data in (good, late):
        for _ in range(200):
            _wire.decode(data, plan, 5)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(5000):
            _wire.decode(data, plan, 5)
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert grown < 20_000, f"{grown} bytes still held after 5,000 decodes"


@needs_wire
def test_wire_plan_refuses_a_bad_schema_description() -> None:
    name = b"a_field_name_of_this_test"
    held = sys.getrefcount(name)
    with pytest.raises(ValueError, match="kind"):
        _wire.Plan([(name, 7, 1, np.array([b""], dtype=object))], [], 256)
    with pytest.raises(TypeError):  # the second field is bad: the first was released once
        _wire.Plan([], [(name, 0, 1, None), (b"b", 9)], 256)
    assert sys.getrefcount(name) == held  # nothing borrowed was released
    with pytest.raises(TypeError):
        _wire.Plan([("a", 0, 1, None)], [], 256)
    with pytest.raises(ValueError, match="PyCapsule"):  # not a Plan
        _wire.decode(b"", object(), 1)


# ------------------------------------------------------------------- the Predict response


@settings(max_examples=300, deadline=None)
@given(
    request_id=st.text(max_size=40),
    probabilities=st.lists(st.floats(width=32, allow_nan=False), max_size=300),
    model=st.text(max_size=20),
    model_version=st.integers(0, 2**63 - 1),
    counters=st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4),
)
def test_predict_response_bytes_are_protobufs_own(
    request_id: str,
    probabilities: list[float],
    model: str,
    model_version: int,
    counters: list[int],
) -> None:
    fields = dict(
        request_id=request_id,
        model=model,
        model_version=model_version,
        queue_us=counters[0] * 2**31,  # uint64: beyond 32 bits too
        compute_us=counters[1],
        batch_predictions=counters[2],
        batch_requests=counters[3],
    )
    array = np.array(probabilities, dtype=np.float32)
    body = encode_predict_response(probabilities=array, **fields)
    expected = pb.PredictResponse(probabilities=array.tolist(), **fields)
    assert body == expected.SerializeToString()
    assert pb.PredictResponse.FromString(body) == expected


def test_predict_response_takes_a_strided_slice() -> None:
    whole = np.arange(10, dtype=np.float32) / 10
    body = encode_predict_response(
        request_id="r", probabilities=whole[::3], model="m", model_version=1, queue_us=0,
        compute_us=0, batch_predictions=0, batch_requests=0,
    )  # fmt: skip
    assert list(pb.PredictResponse.FromString(body).probabilities) == whole[::3].tolist()


# ------------------------------------------------- the rows layout (the serving_rows feed)
# The hashes themselves are checked against TensorFlow's in test_codec_rows.py.


def _weighted(rows: np.ndarray, weights: np.ndarray) -> list[list[tuple[int, float]]]:
    """Each row's (table row, weight) pairs with a weight, sorted: what the graph sums."""
    return [sorted((int(r), float(w)) for r, w in zip(rr, ww, strict=True) if w > 0)
            for rr, ww in zip(rows, weights, strict=True)]  # fmt: skip


def _rows_view(columns: dict[str, object]) -> dict[str, object]:
    return {
        name: _weighted(*value) if isinstance(value, tuple) else value.tolist()
        for name, value in columns.items()
    }


def rows_outcome(codec: RequestCodec, request: object, *, hash_here: bool) -> tuple[object, ...]:
    """What decode made of a request in the rows layout, or the error's message.

    ``hash_here``: decode to strings, then hash them value by value (the fallback's
    conversion, ``_FAST``'s: the Python-only codec has no ``_wire`` to hash with), to compare
    with the C decoder writing rows itself."""
    try:
        require_decoded(request)
        if hash_here:
            parsed = _FAST._to_rows(codec.decode(request), None)
        else:
            parsed = codec.decode(request, rows=True)
    except InvalidRequestError as exc:
        return ("refused", str(exc))
    assert parsed.rows
    return (
        "decoded",
        parsed.size,
        parsed.missing,
        _rows_view(dict(parsed.context)),
        _rows_view(dict(parsed.candidates)),
    )


@needs_wire
@settings(max_examples=1500, deadline=None)
@given(data=st.one_of(_usual_messages(), _messages()))
def test_rows_decoder_answers_as_the_strings_hashed(data: bytes) -> None:
    """From bytes, decode(rows=True) (the C decoder writing rows, else the fallback) gives the
    rows the strings give when hashed value by value, or refuses with the same message."""
    wire = predict_parser()(data)
    parsed = lenient_parser(pb.PredictRequest)(data)
    assert rows_outcome(_FAST, wire, hash_here=False) == rows_outcome(_SLOW, parsed, hash_here=True)
    assert rows_outcome(_FAST, wire, hash_here=False)[0] == outcome(_SLOW, parsed)[0]


def request_of(site: bytes, segs: list[bytes], ads: list[bytes]) -> pb.PredictRequest:
    k = len(ads)
    tags = [[b"t%d" % j for j in range(i % 3)] for i in range(k)]
    columns = {
        "ad": (ads, []),
        "bid": ([b"1.5"] * k, []),
        "tags": ([t for row in tags for t in row], [len(row) for row in tags]),
    }
    return request(k=k, context={"site": [site], "segs": segs}, columns=columns)


@needs_wire
def test_merge_rows_gives_the_rows_signature_inputs() -> None:
    codec = RequestCodec(SCHEMA, LIMITS)
    wire = WireCodec(SCHEMA, LIMITS)
    made = [
        (b"a.com", [b"s1"], [b"a0", b"a1", b"a2"]),
        (b"b.com", [b"s1", b"s2", b"s3"], [b"b0", b"b1"]),
        (b"", [], [b"c0"]),
    ]
    parts = [wire.decode(request_of(*m), rows=True) for m in made]
    feed = codec.merge([parts[0], Slice(parts[1], 1, 2), parts[2]], rows=True)
    assert set(feed) == {
        "context_rows", "candidate_rows", "segs_rows", "segs_weights", "tags_rows",
        "tags_weights", REQUEST_INDEX,
    }  # fmt: skip
    off = SCHEMA.offsets()
    assert feed["context_rows"].dtype == np.int64 and feed["context_rows"].shape == (3, 2)
    assert feed["candidate_rows"].shape == (5, 2)  # ad, bid for 3 + 1 + 1 candidates
    assert feed[REQUEST_INDEX].tolist() == [0, 0, 0, 1, 2]
    assert feed["context_rows"][2].tolist() == [off["site"], off["temp"]]  # empty, absent
    assert feed["candidate_rows"][:, 1].tolist() == [off["bid"] + 2] * 5  # 1.5 in [1, 2)
    assert feed["segs_weights"].dtype == np.float32
    # The same feed as the strings merged, then hashed.
    strings = [codec.decode(request_of(*m)) for m in made]
    hashed = codec.rows_feed(codec.merge([strings[0], Slice(strings[1], 1, 2), strings[2]]))
    assert _rows_view({k: v for k, v in feed.items() if not k.startswith(("segs", "tags"))}) == (
        _rows_view({k: v for k, v in hashed.items() if not k.startswith(("segs", "tags"))})
    )
    for name in ("segs", "tags"):
        assert _weighted(feed[f"{name}_rows"], feed[f"{name}_weights"]) == _weighted(
            hashed[f"{name}_rows"], hashed[f"{name}_weights"]
        ), name


@needs_wire
def test_merge_takes_parts_decoded_in_the_other_layout() -> None:
    """A hot swap between a version with serving_rows and one without, while requests wait."""
    codec = RequestCodec(SCHEMA, LIMITS)
    wire = WireCodec(SCHEMA, LIMITS)
    made = [(b"a.com", [b"s1"], [b"a0", b"a1"]), (b"b.com", [b"s2", b"s3"], [b"b0"])]
    strings = [wire.decode(request_of(*m)) for m in made]
    rows = [wire.decode(request_of(*m), rows=True) for m in made]
    as_strings = codec.merge(strings)
    assert {k: v.tolist() for k, v in codec.merge([rows[0], strings[1]]).items()} == {
        k: v.tolist() for k, v in as_strings.items()
    }
    as_rows = codec.merge(rows, rows=True)
    mixed = codec.merge([strings[0], rows[1]], rows=True)
    assert set(mixed) == set(as_rows)
    for name in ("context_rows", "candidate_rows", REQUEST_INDEX):
        assert mixed[name].tolist() == as_rows[name].tolist(), name
    for name in ("segs", "tags"):
        assert _weighted(mixed[f"{name}_rows"], mixed[f"{name}_weights"]) == _weighted(
            as_rows[f"{name}_rows"], as_rows[f"{name}_weights"]
        ), name
