"""The synthetic bid-log generator and its hidden ground truth (``data.synth``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adpredict.data import synth
from adpredict.errors import SchemaError
from adpredict.schema import Schema, load_schema

SMALL_SCHEMA = Path(__file__).parent.parent / "fixtures" / "rtb_small.toml"
ROWS = 100_000
SEED = 3


def concat(blocks: list[synth.Block]) -> dict[str, Any]:
    out: dict[str, Any] = {
        name: np.concatenate([np.asarray(b.columns[name], dtype=object) for b in blocks])
        if name != "user_segments"
        else [row for b in blocks for row in b.columns[name]]
        for name in blocks[0].columns
    }
    out["label"] = np.concatenate([b.labels for b in blocks])
    out["true_ctr"] = np.concatenate([b.true_ctr for b in blocks])
    return out


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    """100k rows (two blocks) of seed 3."""
    return concat(list(synth.generate(ROWS, seed=SEED)))


# ---- determinism --------------------------------------------------------------------------------


def generate_small(seed: int) -> list[synth.Block]:
    """2,500 rows in blocks of 1,000 (a remainder block included)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synth, "BLOCK_ROWS", 1_000)
        return list(synth.generate(2_500, seed=seed))


@pytest.fixture(scope="module")
def seed_11() -> list[synth.Block]:
    return generate_small(11)


def test_blocks_total_the_requested_rows(seed_11: list[synth.Block]) -> None:
    assert [len(b.labels) for b in seed_11] == [1_000, 1_000, 500]
    for b in seed_11:
        assert len(b.true_ctr) == len(b.labels)
        assert all(len(col) == len(b.labels) for col in b.columns.values())


def test_same_rows_and_seed_give_identical_output(seed_11: list[synth.Block]) -> None:
    a, b = concat(seed_11), concat(generate_small(11))
    assert a.keys() == b.keys()
    for name in a:
        if name == "user_segments":
            assert a[name] == b[name]
        else:
            np.testing.assert_array_equal(a[name], b[name])


def test_different_seeds_give_different_rows(seed_11: list[synth.Block]) -> None:
    a, b = concat(seed_11), concat(generate_small(12))
    assert np.mean(a["site_domain"] == b["site_domain"]) < 0.5
    assert np.mean(a["creative_id"] == b["creative_id"]) < 0.5
    assert not np.array_equal(a["true_ctr"], b["true_ctr"])


def test_columns_cover_the_rtb_schema_with_bytes_values(data: dict[str, Any]) -> None:
    rtb = load_schema("rtb")
    assert set(rtb.names) | {"label", "true_ctr"} == set(data)
    for name in rtb.names:
        assert len(data[name]) == ROWS
    assert all(isinstance(v, bytes) and v for v in data["site_domain"][:100])
    assert all(isinstance(v, bytes) for row in data["user_segments"][:100] for v in row)
    assert max(len(row) for row in data["user_segments"]) <= rtb.field("user_segments").max_values
    assert any(len(row) == 0 for row in data["user_segments"])  # some users have no segments
    bids = np.array([float(v) for v in data["bid_cpm"]])
    assert np.all(bids > 0) and np.isfinite(bids).all()


@pytest.mark.parametrize("rows", [0, -1])
def test_rows_must_be_positive(rows: int) -> None:
    with pytest.raises(ValueError, match="rows"):
        next(synth.generate(rows))


@pytest.mark.parametrize("target", [0.0005, 0.5])
def test_target_ctr_must_be_plausible(target: float) -> None:
    with pytest.raises(ValueError, match="target_ctr"):
        synth.World(0, target_ctr=target)


# ---- click rates --------------------------------------------------------------------------------


def test_mean_ctr_is_about_two_percent(data: dict[str, Any]) -> None:
    assert 0.01 <= data["label"].mean() <= 0.03
    assert data["true_ctr"].mean() == pytest.approx(0.02, rel=0.1)


def test_labels_are_drawn_from_true_ctr(data: dict[str, Any]) -> None:
    labels, p = data["label"], data["true_ctr"].astype(np.float64)
    assert set(np.unique(labels)) == {0, 1}
    # Binomial noise on 100k rows at 2%: sd of the mean ~ 4.4e-4; allow 4 sd.
    assert abs(labels.mean() - p.mean()) < 4 * np.sqrt(p.mean() * (1 - p.mean()) / ROWS)
    # Calibration holds per decile of true_ctr too (the labels follow p, not just its mean).
    edges = np.quantile(p, [0.5, 0.9])
    for lo, hi in [(0.0, edges[0]), (edges[0], edges[1]), (edges[1], 1.0)]:
        rows = (p >= lo) & (p < hi)
        expected = p[rows].mean()
        sd = np.sqrt(np.sum(p[rows] * (1 - p[rows]))) / rows.sum()
        assert abs(labels[rows].mean() - expected) < 4 * sd


def test_true_ctr_is_a_probability_with_spread(data: dict[str, Any]) -> None:
    p = data["true_ctr"]
    assert p.dtype == np.float32
    assert np.all(p > 0) and np.all(p < 1)
    # A learnable signal: the best rows click many times more often than the worst.
    assert np.quantile(p, 0.99) / np.quantile(p, 0.01) > 20


def test_target_ctr_is_respected() -> None:
    p = np.concatenate([b.true_ctr for b in synth.generate(20_000, seed=5, target_ctr=0.08)])
    assert p.mean() == pytest.approx(0.08, rel=0.1)


# ---- popularity and hierarchies -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["site_domain", "creative_id"])
def test_popularity_is_zipf_like_with_a_long_tail(data: dict[str, Any], name: str) -> None:
    _, counts = np.unique(data[name], return_counts=True)
    counts = np.sort(counts)[::-1]
    assert len(counts) >= 10_000
    top = max(1, len(counts) // 100)
    assert counts[:top].sum() / ROWS > 0.5  # the top 1% of values carry most impressions
    assert np.sum(counts == 1) > len(counts) / 3  # and a long tail of values seen once
    # Rank-frequency is a power law: log-log slope over ranks 1..100 near the exponent 1.2.
    ranks = np.arange(1, 101)
    slope = np.polyfit(np.log(ranks), np.log(counts[:100]), 1)[0]
    assert -1.6 < slope < -0.8


def test_small_vocabularies_are_fully_used(data: dict[str, Any]) -> None:
    assert len(np.unique(data["hour_of_day"])) == 24
    assert len(np.unique(data["day_of_week"])) == 7
    assert len(np.unique(data["device_type"])) == 5
    assert len(np.unique(data["ad_format"])) == 4


def mapping_is_functional(keys: np.ndarray, values: np.ndarray) -> bool:
    pairs = np.unique(np.stack([keys, values]).astype(str), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1]


@pytest.mark.parametrize(
    ("child", "parent"),
    [
        ("creative_id", "campaign_id"),
        ("creative_id", "advertiser_id"),
        ("creative_id", "ad_format"),
        ("creative_id", "creative_size"),
        ("campaign_id", "advertiser_id"),
        ("advertiser_id", "landing_domain"),
        ("advertiser_id", "iab_category"),
        ("site_domain", "publisher_id"),
        ("region", "country"),
    ],
)
def test_hierarchy_child_always_maps_to_the_same_parent(
    data: dict[str, Any], child: str, parent: str
) -> None:
    assert mapping_is_functional(data[child], data[parent])
    # ... and the mapping is not trivial: parents are shared by many children.
    assert len(np.unique(data[parent])) < len(np.unique(data[child]))


def test_the_inverse_of_a_hierarchy_is_not_a_function(data: dict[str, Any]) -> None:
    # Guard for the test above: a campaign does run several creatives.
    assert not mapping_is_functional(data["campaign_id"], data["creative_id"])


# ---- the hidden model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_ids() -> tuple[synth.World, dict[str, Any]]:
    world = synth.World(SEED)
    return world, world._sample_ids(np.random.default_rng(123), 50_000)


def pair_term(world: synth.World, ids: dict[str, Any], a: str, b: str) -> np.ndarray:
    ua, ub = world.latent[(a, b)]
    va = world._segment_mean(ua, ids[a]) if a == "user_segments" else ua[ids[a]]
    return np.sum(va * ub[ids[b]], axis=1)


@pytest.mark.parametrize(("a", "b", "variance"), synth.PAIRS)
def test_every_interaction_pair_moves_the_logit(
    world_ids: tuple[synth.World, dict[str, Any]], a: str, b: str, variance: float
) -> None:
    world, ids = world_ids
    term = pair_term(world, ids, a, b)
    # <u_a, u_b> with rank-4 N(0, variance) vectors has sd 2 * variance over random values;
    # sampled rows concentrate on popular values, so ask for a fifth of that.
    nominal = 2 * variance
    assert term.std() > 0.2 * nominal
    # Interaction, not an additive effect: within one value of ``a`` the term still varies
    # with ``b``, so no per-field weight of ``a`` alone can represent it.
    if a != "user_segments":
        top = np.bincount(ids[a]).argmax()
        assert term[ids[a] == top].std() > 0.1 * nominal


def test_logits_are_additive_terms_plus_the_pair_terms(
    world_ids: tuple[synth.World, dict[str, Any]],
) -> None:
    world, ids = world_ids
    additive = np.full(len(ids["site_domain"]), world.b0)
    for name, w in world.weights.items():
        if name == "user_segments":
            additive += world._segment_mean(w, ids[name])
        else:
            additive += w[ids[name]]
    additive += world.bid_effect * np.log1p(ids["bid_cpm"])
    pairs = sum(pair_term(world, ids, a, b) for a, b, _ in synth.PAIRS)
    np.testing.assert_allclose(world._logits(ids), additive + pairs, rtol=1e-12, atol=1e-12)
    # The interactions are a substantial part of the signal, not a rounding error.
    assert np.var(pairs) > 0.3 * np.var(additive)
    assert np.std(pairs) > 0.3


def test_segment_mean_averages_each_rows_values() -> None:
    world = synth.World.__new__(synth.World)
    table = np.array([[1.0], [2.0], [4.0]])
    flat, counts = np.array([0, 2, 1, 1, 2]), np.array([2, 0, 3])
    out = world._segment_mean(table, (flat, counts))
    np.testing.assert_allclose(out[:, 0], [2.5, 0.0, (2 + 2 + 4) / 3])


# ---- check_schema -------------------------------------------------------------------------------


def rtb_dict() -> dict[str, Any]:
    return load_schema("rtb").to_dict()


def test_check_schema_accepts_rtb_and_rtb_small() -> None:
    synth.check_schema(load_schema("rtb"))
    synth.check_schema(load_schema(SMALL_SCHEMA))


def test_check_schema_accepts_a_subset_of_rtb_fields() -> None:
    raw = rtb_dict()
    raw["fields"] = [f for f in raw["fields"] if f["name"] in ("site_domain", "creative_id")]
    synth.check_schema(Schema.from_dict(raw))


def test_check_schema_rejects_a_foreign_field() -> None:
    raw = rtb_dict()
    raw["fields"].append(
        {"name": "weather", "scope": "context", "kind": "categorical", "buckets": 8}
    )
    with pytest.raises(SchemaError, match="weather"):
        synth.check_schema(Schema.from_dict(raw))


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("device_type", {"kind": "multi_categorical"}),
        ("bid_cpm", {"kind": "categorical", "buckets": 64, "boundaries": None}),
        ("user_segments", {"kind": "categorical", "max_values": None}),
        ("site_domain", {"scope": "candidate"}),
    ],
)
def test_check_schema_rejects_a_changed_kind_or_scope(name: str, change: dict[str, Any]) -> None:
    raw = rtb_dict()
    for f in raw["fields"]:
        if f["name"] == name:
            f.update(change)
            for key in [k for k, v in f.items() if v is None]:
                del f[key]
    with pytest.raises(SchemaError, match=name):
        synth.check_schema(Schema.from_dict(raw))
