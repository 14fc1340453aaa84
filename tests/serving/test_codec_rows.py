"""The codec's rows layout against TensorFlow: ``_wire.fingerprint64`` is the graph's string
hash (``to_hash_bucket_fast``), ``_wire.numeric_bucket`` its ``to_number`` + ``Bucketize``, and
decoding to rows gives what ``FeatureHasher`` computes (the rows ``serving_rows`` is fed).
Layout, merge and the fallback's equivalence on hostile input: test_codec.py."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from adpredict.serving import codec as codec_module

_wire = codec_module._wire
pytestmark = pytest.mark.skipif(_wire is None, reason="adpredict.serving._wire is not built")

# Fingerprint64 mod 2**62 and mod an odd modulus near 2**63 fix all 64 bits (CRT).
_MODULI = (2**62, 2**63 - 25)


def _tensorflow(values: list[bytes]) -> list[tuple[int, int]]:
    tensor = tf.constant(values, tf.string)
    cols = [tf.strings.to_hash_bucket_fast(tensor, m).numpy().tolist() for m in _MODULI]
    return list(zip(*cols, strict=True))


def _ours(values: list[bytes]) -> list[tuple[int, int]]:
    return [tuple(_wire.fingerprint64(v) % m for m in _MODULI) for v in values]


def test_every_length_branch_matches_tensorflow() -> None:
    # 0, 1-3, 4-7, 8-16, 17-32, 33-64, and the 64-byte loop with every tail length.
    rng = np.random.default_rng(7)
    values = [rng.bytes(n) for n in range(0, 300) for _ in range(3)]
    values += [b"", b"a", b"campaign-12", b"x" * 64, b"x" * 65, b"y" * 128, b"z" * 1000]
    assert _ours(values) == _tensorflow(values)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=20))
def test_random_bytes_match_tensorflow(values: list[bytes]) -> None:
    assert _ours(values) == _tensorflow(values)


def test_refuses_what_is_not_bytes() -> None:
    with pytest.raises(TypeError):
        _wire.fingerprint64("text")


# --------------------------------------------------------------- numeric values -> buckets

_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 1e30]
_decimal = st.from_regex(r"[+-]?([0-9]{1,12}(\.[0-9]{0,12})?|\.[0-9]{1,12})([eE][+-]?[0-9]{1,2})?",
                         fullmatch=True).map(str.encode)  # fmt: skip
_near = st.sampled_from(_BOUNDARIES).flatmap(
    lambda b: st.sampled_from([repr(b), repr(float(np.nextafter(np.float32(b), 0))),
                               repr(float(np.nextafter(np.float32(b), 100))), f"{b:.20f}"])
).map(str.encode)  # fmt: skip


def _tensorflow_buckets(values: list[bytes]) -> list[int]:
    raw = tf.constant(values, tf.string)
    missing = tf.equal(raw, "")
    value = tf.strings.to_number(tf.where(missing, "0", raw), tf.float32)
    ok = tf.logical_and(tf.logical_not(missing), tf.math.is_finite(value))
    bucket = tf.raw_ops.Bucketize(input=tf.where(ok, value, 0.0), boundaries=_BOUNDARIES)
    return tf.where(ok, bucket + 1, 0).numpy().tolist()


def _accepted(value: bytes) -> bool:
    """What the codec lets through for a numeric field (and TensorFlow can parse)."""
    return value == b"" or (
        codec_module._NUMBER_RE.fullmatch(value) is not None
        and abs(float(value)) <= codec_module._F32_MAX
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_decimal, _near, st.just(b"")), min_size=1, max_size=30))
def test_numeric_buckets_match_tensorflow(values: list[bytes]) -> None:
    values = [v for v in values if _accepted(v)]
    if values:
        assert [_wire.numeric_bucket(v, _BOUNDARIES) for v in values] == _tensorflow_buckets(values)


def _float32_midpoints() -> list[bytes]:
    """Decimals exactly halfway between two float32s (ties round to even), and their
    neighbours in the last digit: where a double-then-float32 parse could differ."""
    out = []
    for n in (2**24 + 1, 2**24 + 3, 2**25 + 2, 2**25 + 6, 2**30 + 64, 2**40 + 2**16):
        out += [b"%d" % n, b"%d" % (n - 1), b"%d" % (n + 1), b"-%d" % n, b"%d.0" % n]
    out += [b"%d.%s" % (n, b"0" * 12) for n in (2**24 + 1, 2**24 + 3)]  # 15+ digits
    return out


_EDGES = [
    b"0", b"-0", b"+0", b"0.0", b".5", b"5.", b"+.5", b"-5.", b"007", b"0.000000000000000000001",
    b"123456789012345", b"1234567890123456", b"0.1", b"0.3", b"1.1", b"2.35", b"340282350000000000000000000000000000000",
    b"0.0000000000000000000000000000000000000117549435", b"1.00000005960464477539",
    b"1.0000000596046448", b"0.99999997", b"12.999999999999999",
]  # fmt: skip


@pytest.mark.parametrize("boundaries", [_BOUNDARIES, [float(2**24 + 2), float(2**30 + 128)]])
def test_numeric_buckets_at_float32_midpoints_and_edges(boundaries: list[float]) -> None:
    values = [v for v in _float32_midpoints() + _EDGES if _accepted(v)]
    got = [_wire.numeric_bucket(v, boundaries) for v in values]
    raw = tf.constant(values, tf.string)
    want = (
        tf.raw_ops.Bucketize(
            input=tf.strings.to_number(raw, tf.float32), boundaries=boundaries
        ).numpy()
        + 1
    )
    assert got == want.tolist()


def test_numeric_bucket_refuses_what_is_not_a_number() -> None:
    with pytest.raises(ValueError, match="not a decimal number"):
        _wire.numeric_bucket(b"1.5x", _BOUNDARIES)


# ----------------------------------------------- decode with a rows plan == FeatureHasher


def _rows_codec_and_hasher():
    from adpredict.model.features import FeatureHasher
    from adpredict.schema import load_schema
    from adpredict.serving.codec import CodecLimits, RequestCodec

    schema = load_schema("rtb")
    codec = RequestCodec(schema, CodecLimits(max_candidates=1024))
    return schema, codec, FeatureHasher(schema)


def _weighted(rows: np.ndarray, weights: np.ndarray) -> list[list[tuple[int, float]]]:
    """Each row's (table row, weight) pairs with a weight, sorted: what the graph sums."""
    return [sorted((int(r), float(w)) for r, w in zip(rr, ww, strict=True) if w > 0)
            for rr, ww in zip(rows, weights, strict=True)]  # fmt: skip


def test_rows_plan_decodes_what_feature_hasher_computes() -> None:
    from adpredict.loadtest import CandidateSpec, build_pool
    from adpredict.serving.codec import WireRequest, predict_parser

    schema, codec, hasher = _rows_codec_and_hasher()
    pool = build_pool(schema, CandidateSpec.parse("1-40"), 60, max_candidates=1024, seed=3)
    parse = predict_parser()
    checked = 0
    for payload in pool.payloads:
        request = parse(payload)
        assert isinstance(request, WireRequest)
        k = request.num_candidates
        assert _wire.decode(request.data, codec._rows_plan, k) is not None  # the C path
        rows = codec.decode(request, rows=True)
        strings = codec.decode(request)
        context, candidates = rows.context, rows.candidates
        assert rows.missing == strings.missing
        for scope, ours, theirs in (
            ("context", context, strings.context),
            ("candidate", candidates, strings.candidates),
        ):
            tensors = {n: tf.constant(a.tolist()) for n, a in theirs.items()}
            single, multi = hasher._scope(scope, tensors)
            for name, ids in single.items():
                assert ours[name].tolist() == ids.numpy().tolist(), name
                checked += 1
            for name, (ids, weights) in multi.items():
                rows, w = ours[name]
                assert _weighted(rows, w) == _weighted(ids.numpy(), weights.numpy()), name
                checked += 1
    assert checked == 60 * len(schema.fields)


def test_numeric_bucket_reads_long_values() -> None:
    # The codec allows values up to max_value_bytes (256 by default): longer than a short buffer.
    long_value = b"0." + b"0" * 200 + b"1"
    assert _wire.numeric_bucket(long_value, _BOUNDARIES) == _tensorflow_buckets([long_value])[0]


def test_field_rows_hashes_as_the_decoder_and_refuses_what_it_cannot() -> None:
    schema, codec, _ = _rows_codec_and_hasher()
    names = [f.name for f in (*schema.context_fields, *schema.candidate_fields)]
    ad, bid = names.index("creative_id"), names.index("bid_cpm")
    offsets = schema.offsets()
    rows = _wire.field_rows(codec._rows_plan, ad, [b"", b"c1"])
    mod = schema.field("creative_id").buckets - 1
    want = offsets["creative_id"] + 1 + (_wire.fingerprint64(b"c1") & (2**62 - 1)) % mod
    assert rows.tolist() == [offsets["creative_id"], want]
    with pytest.raises(ValueError, match="not a number"):
        _wire.field_rows(codec._rows_plan, bid, [b"1.5", b"cheap"])
    with pytest.raises(ValueError, match="rows plan and a field index"):
        _wire.field_rows(codec._rows_plan, len(names), [b"x"])
    with pytest.raises(TypeError):
        _wire.field_rows(codec._rows_plan, ad, [b"x", "text"])
