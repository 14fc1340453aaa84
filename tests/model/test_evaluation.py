"""Offline metrics against brute-force and hand computations (``model.evaluation``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adpredict.model.evaluation import auc, logloss, summarize


def pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties count one half."""
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


# ---- AUC ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 12, 300) / 11.0  # 12 distinct values: many ties
    scores = scores + 0.1 * labels * rng.random(300).round(1)  # some signal, still tied
    assert auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0])),
        min_size=2,
        max_size=60,
    ).filter(lambda rows: len({y for y, _ in rows}) == 2)
)
@settings(max_examples=150, deadline=None)
def test_auc_matches_pairwise_count_property(rows: list[tuple[int, float]]) -> None:
    labels = np.array([y for y, _ in rows])
    scores = np.array([s for _, s in rows])
    assert auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


def test_auc_of_perfect_reversed_and_constant_scores() -> None:
    labels = np.array([0, 0, 1, 0, 1, 1, 0])
    perfect = labels + np.linspace(0, 0.5, 7)  # every positive above every negative
    assert auc(labels, perfect) == 1.0
    assert auc(labels, -perfect) == 0.0
    assert auc(labels, np.full(7, 0.3)) == 0.5


def test_auc_by_hand() -> None:
    # Positives 0.8, 0.4; negatives 0.4, 0.1. Pairs: (0.8>0.4) (0.8>0.1) (0.4=0.4 -> 1/2)
    # (0.4>0.1): 3.5 of 4.
    assert auc(np.array([1, 0, 1, 0]), np.array([0.8, 0.4, 0.4, 0.1])) == 0.875


def test_auc_accepts_float_and_bool_labels() -> None:
    scores = np.array([0.2, 0.9, 0.5, 0.1])
    expected = auc(np.array([0, 1, 1, 0]), scores)
    assert auc(np.array([0.0, 1.0, 1.0, 0.0]), scores) == expected
    assert auc(np.array([False, True, True, False]), scores) == expected
    assert auc([0, 1, 1, 0], [0.2, 0.9, 0.5, 0.1]) == expected


def test_auc_is_invariant_to_monotone_transforms() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = rng.random(500) + 0.3 * labels
    assert auc(labels, scores) == pytest.approx(auc(labels, np.log(scores) * 7 - 2), abs=1e-12)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], []])
def test_auc_with_one_class_is_nan(labels: list[int]) -> None:
    assert math.isnan(auc(np.array(labels), np.linspace(0, 1, len(labels))))


# ---- log-loss -----------------------------------------------------------------------------------


def test_logloss_by_hand() -> None:
    labels = np.array([1, 0, 1, 0])
    probs = np.array([0.9, 0.2, 0.5, 0.7])
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.5) + math.log(0.3)) / 4
    assert logloss(labels, probs) == pytest.approx(expected, rel=1e-12)


def test_logloss_of_a_constant_prediction_is_the_entropy() -> None:
    labels = np.array([1] * 2 + [0] * 98)
    p = 0.02
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert logloss(labels, np.full(100, p)) == pytest.approx(entropy, rel=1e-12)


def test_logloss_clips_certain_mistakes() -> None:
    # A wrong certain prediction costs -log(1e-7), not infinity.
    assert logloss(np.array([1, 0]), np.array([0.0, 1.0])) == pytest.approx(-math.log(1e-7))
    assert logloss(np.array([1, 0]), np.array([1.0, 0.0])) == pytest.approx(
        -math.log1p(-1e-7), abs=1e-12
    )


# ---- summarize ----------------------------------------------------------------------------------


def test_summarize_reports_every_metric() -> None:
    labels = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    probs = np.array([0.6, 0.1, 0.2, 0.1, 0.3, 0.05, 0.05, 0.3, 0.1, 0.1])
    out = summarize(labels, probs)
    assert out["rows"] == 10
    assert out["observed_ctr"] == pytest.approx(0.2)
    assert out["mean_predicted_ctr"] == pytest.approx(0.19)  # 1.9 over 10 rows
    assert out["calibration"] == pytest.approx(0.95)
    assert out["logloss"] == pytest.approx(logloss(labels, probs))
    assert out["auc"] == pytest.approx(pairwise_auc(labels, probs))


def test_summarize_calibration_is_mean_prediction_over_observed_rate() -> None:
    labels = np.array([1, 0, 0, 0])  # observed 0.25
    probs = np.array([0.5, 0.5, 0.5, 0.5])  # predicted 0.5: over-predicts by 2x
    out = summarize(labels, probs)
    assert out["calibration"] == pytest.approx(2.0)
    assert out["mean_predicted_ctr"] == pytest.approx(0.5)


def test_summarize_without_clicks_has_nan_calibration_and_auc() -> None:
    out = summarize(np.zeros(5), np.full(5, 0.1))
    assert out["observed_ctr"] == 0.0
    assert math.isnan(out["calibration"]) and math.isnan(out["auc"])
    assert out["logloss"] == pytest.approx(-math.log(0.9))
