"""In-graph hashing of raw string features into table rows (``model.features``)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from adpredict.model.features import FeatureHasher
from adpredict.schema import Schema

SCHEMA = Schema.from_dict(
    {
        "name": "feat",
        "version": 1,
        "fields": [
            {"name": "site", "scope": "context", "kind": "categorical", "buckets": 16},
            {
                "name": "segs",
                "scope": "context",
                "kind": "multi_categorical",
                "buckets": 8,
                "max_values": 3,
            },
            {"name": "hour", "scope": "context", "kind": "categorical", "buckets": 32},
            {"name": "floor", "scope": "context", "kind": "numeric", "boundaries": [0.5]},
            {"name": "ad", "scope": "candidate", "kind": "categorical", "buckets": 64},
            {"name": "bid", "scope": "candidate", "kind": "numeric", "boundaries": [0.1, 1, 5]},
            {
                "name": "tags",
                "scope": "candidate",
                "kind": "multi_categorical",
                "buckets": 16,
                "max_values": 4,
            },
        ],
    }
)
OFFSETS = SCHEMA.offsets()
SINGLE = ["site", "hour", "floor", "ad", "bid"]  # single-valued fields in schema order
HASHER = FeatureHasher(SCHEMA)


def column(name: str) -> int:
    return SINGLE.index(name)


def ragged(rows: list[list[str]]) -> tf.Tensor:
    """A dense ``[N, M]`` string tensor, short rows padded with ''."""
    width = max(1, *(len(r) for r in rows))
    return tf.constant([r + [""] * (width - len(r)) for r in rows])


def features(
    b: int,
    *,
    site: list[str] | None = None,
    segs: list[list[str]] | None = None,
    hour: list[str] | None = None,
    floor: list[str] | None = None,
    ad: list[str] | None = None,
    bid: list[str] | None = None,
    tags: list[list[str]] | None = None,
    request_index: list[int] | None = None,
) -> dict[str, tf.Tensor]:
    """A training-style batch (one request per candidate) unless ``request_index`` is given."""
    r = b if request_index is None else max(request_index) + 1
    return {
        "site": tf.constant(site or [""] * r),
        "segs": ragged(segs or [[]] * r),
        "hour": tf.constant(hour or [""] * r),
        "floor": tf.constant(floor or [""] * r),
        "ad": tf.constant(ad or [""] * b),
        "bid": tf.constant(bid or [""] * b),
        "tags": ragged(tags or [[]] * b),
        "request_index": tf.constant(request_index or list(range(b)), tf.int32),
    }


def single_ids(name: str, values: list[str]) -> np.ndarray:
    """The table rows of ``values`` in single-valued field ``name`` (one request per value)."""
    hashed = HASHER(features(len(values), **{name: values}))
    return hashed.single_ids.numpy()[:, column(name)]


def test_field_order_is_single_then_multi() -> None:
    assert [f.name for f in HASHER.field_order] == [*SINGLE, "segs", "tags"]


# ---- categorical --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["site", "hour", "ad"])
def test_empty_string_is_the_fields_missing_bucket(name: str) -> None:
    ids = single_ids(name, ["", "x", ""])
    assert ids[0] == ids[2] == OFFSETS[name]
    assert ids[1] != OFFSETS[name]


def test_all_fields_of_an_empty_batch_row_are_missing() -> None:
    hashed = HASHER(features(2))
    np.testing.assert_array_equal(hashed.single_ids.numpy(), [[OFFSETS[n] for n in SINGLE]] * 2)
    for ids, weights, name in zip(
        hashed.multi_ids, hashed.multi_weights, ("segs", "tags"), strict=True
    ):
        assert np.all(ids.numpy() == OFFSETS[name])
        np.testing.assert_array_equal(weights.numpy().sum(axis=1), [1.0, 1.0])


@pytest.mark.parametrize("name", ["site", "ad"])
def test_values_land_in_the_fields_range_and_use_every_bucket(name: str) -> None:
    buckets = SCHEMA.field(name).buckets
    values = [f"v{i}" for i in range(3_000)]
    ids = single_ids(name, values)
    assert ids.min() >= OFFSETS[name] + 1
    assert ids.max() <= OFFSETS[name] + buckets - 1
    # 3000 values over 63 (or 15) buckets: every non-missing bucket gets some.
    assert set(ids.tolist()) == set(range(OFFSETS[name] + 1, OFFSETS[name] + buckets))


def test_a_value_always_maps_to_the_same_row() -> None:
    values = ["alpha", "beta", "alpha", "gamma", "beta", "alpha"]
    first = single_ids("ad", values)
    again = single_ids("ad", list(reversed(values)))[::-1]
    np.testing.assert_array_equal(first, again)
    rows = defaultdict(set)
    for v, i in zip(values, first, strict=True):
        rows[v].add(int(i))
    assert all(len(s) == 1 for s in rows.values())
    # Same value, two fields: each field hashes into its own range.
    assert single_ids("site", ["alpha"])[0] - OFFSETS["site"] < SCHEMA.field("site").buckets
    assert single_ids("ad", ["alpha"])[0] >= OFFSETS["ad"]


def test_hashes_are_pinned() -> None:
    # Exported models depend on these exact rows: a hashing change must be deliberate.
    got = single_ids("ad", ["cr-1", "cr-2", "adv-77", "300x250"]) - OFFSETS["ad"]
    ref = tf.math.floormod(
        tf.strings.to_hash_bucket_fast(["cr-1", "cr-2", "adv-77", "300x250"], 1 << 62), 63
    )
    np.testing.assert_array_equal(got, ref.numpy() + 1)
    assert got.tolist() == [27, 32, 28, 21]


# ---- numeric ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "bucket"),
    [
        ("", 0),
        ("nan", 0),
        ("NaN", 0),
        ("inf", 0),
        ("-inf", 0),
        ("-3", 1),
        ("0", 1),
        ("0.05", 1),
        ("0.1", 2),  # exactly on the first edge: the interval above it
        ("0.5", 2),
        ("1", 3),
        ("1.0", 3),
        ("4.99", 3),
        ("5", 4),  # on the last edge
        ("7.5", 4),
        ("1e30", 4),
    ],
)
def test_numeric_bucketization(raw: str, bucket: int) -> None:
    assert single_ids("bid", [raw])[0] == OFFSETS["bid"] + bucket


def test_numeric_buckets_cover_the_fields_range() -> None:
    ids = single_ids("bid", ["", "0", "0.2", "2", "9"]) - OFFSETS["bid"]
    assert ids.tolist() == [0, 1, 2, 3, 4]
    assert SCHEMA.field("bid").buckets == 5


def test_context_numeric_field() -> None:
    ids = single_ids("floor", ["", "0.1", "0.5", "3"]) - OFFSETS["floor"]
    assert ids.tolist() == [0, 1, 2, 2]


# ---- multi-valued -------------------------------------------------------------------------------


def tag_rows(tags: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    hashed = HASHER(features(len(tags), tags=tags))
    return hashed.multi_ids[1].numpy(), hashed.multi_weights[1].numpy()


def weight_by_row(ids: np.ndarray, weights: np.ndarray) -> list[dict[int, float]]:
    out = []
    for row_ids, row_w in zip(ids, weights, strict=True):
        acc: dict[int, float] = defaultdict(float)
        for i, w in zip(row_ids, row_w, strict=True):
            if w:
                acc[int(i)] += float(w)
        out.append(dict(acc))
    return out


def tag_id(value: str) -> int:
    ids, _ = tag_rows([[value]])
    return int(ids[0, 0])


def test_multi_valued_rows_average_their_values() -> None:
    tags = [
        ["a", "b", "d", "e"],
        ["", "", "", ""],  # empty -> all weight on the missing bucket
        ["a", "a", "b", ""],  # duplicates count twice, padding not at all
        ["", "d", "", ""],  # padding in front
    ]
    ids, weights = tag_rows(tags)
    assert ids.shape == weights.shape == (4, 5)  # max_values 4 + the missing column
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
    a, b, d, e = (tag_id(v) for v in "abde")
    assert len({a, b, d, e}) == 4  # no collisions among these values in 15 buckets
    missing = OFFSETS["tags"]
    rows = weight_by_row(ids, weights)
    expected = [
        {a: 0.25, b: 0.25, d: 0.25, e: 0.25},
        {missing: 1.0},
        {a: 2 / 3, b: 1 / 3},
        {d: 1.0},
    ]
    for got, want in zip(rows, expected, strict=True):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-6)


def test_multi_valued_ids_stay_in_range() -> None:
    ids, weights = tag_rows([[f"t{i}-{j}" for j in range(4)] for i in range(200)])
    used = ids[weights > 0]
    assert used.min() >= OFFSETS["tags"] + 1
    assert used.max() <= OFFSETS["tags"] + SCHEMA.field("tags").buckets - 1
    assert len(set(used.tolist())) == SCHEMA.field("tags").buckets - 1


def test_multi_valued_is_truncated_to_max_values() -> None:
    # segs has max_values 3: the 4th and 5th values are ignored.
    hashed = HASHER(features(1, segs=[["a", "b", "c", "d", "e"]]))
    ids, weights = hashed.multi_ids[0].numpy(), hashed.multi_weights[0].numpy()
    assert ids.shape == (1, 4)
    np.testing.assert_allclose(weights[0], [1 / 3, 1 / 3, 1 / 3, 0.0], rtol=1e-6)
    three = HASHER(features(1, segs=[["a", "b", "c"]]))
    np.testing.assert_array_equal(ids, three.multi_ids[0].numpy())


def test_multi_valued_narrower_than_max_values() -> None:
    ids, weights = tag_rows([["a"], ["b"]])
    assert ids.shape == (2, 2)
    np.testing.assert_allclose(weights, [[1.0, 0.0], [1.0, 0.0]])


# ---- context gathered per candidate -------------------------------------------------------------


def test_context_hashed_once_per_request_equals_hashing_the_tiled_context() -> None:
    request_index = [0, 0, 1, 1, 1, 2, 0]
    ctx = {
        "site": ["news.example", "", "shop.example"],
        "segs": [["s1", "s2", ""], ["", "", ""], ["s3", "s3", "s9"]],
        "hour": ["13", "2", "13"],
        "floor": ["0.7", "nan", ""],
    }
    cand = {
        "ad": [f"cr-{i}" for i in range(7)],
        "bid": ["0.3", "", "2", "9", "0.01", "1", "5"],
        "tags": [["x"], [""], ["y", "z"], ["x"], [""], ["q"], ["z"]],
    }
    merged = HASHER(features(7, **ctx, **cand, request_index=request_index))
    tiled_ctx = {k: [v[r] for r in request_index] for k, v in ctx.items()}
    tiled = HASHER(features(7, **tiled_ctx, **cand))
    np.testing.assert_array_equal(merged.single_ids.numpy(), tiled.single_ids.numpy())
    for got, want in zip(merged.multi_ids, tiled.multi_ids, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    for got, want in zip(merged.multi_weights, tiled.multi_weights, strict=True):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    # Candidates of the same request share every context row.
    ids = merged.single_ids.numpy()
    np.testing.assert_array_equal(ids[0, :3], ids[1, :3])
    np.testing.assert_array_equal(ids[2, :3], ids[4, :3])
    assert ids[0, column("site")] != ids[2, column("site")]


def test_hasher_works_inside_tf_function() -> None:
    feats: dict[str, Any] = features(3, ad=["a", "b", ""], bid=["1", "", "7"])
    eager = HASHER(feats).single_ids.numpy()
    traced = tf.function(lambda f: HASHER(f).single_ids)(feats).numpy()
    np.testing.assert_array_equal(eager, traced)
