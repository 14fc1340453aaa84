"""Offline quality metrics for click models: log-loss, AUC, calibration."""

from __future__ import annotations

import numpy as np

_EPS = 1e-7


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy (natural log), probabilities clipped to [1e-7, 1-1e-7]."""
    y = np.asarray(labels, np.float64)
    p = np.clip(np.asarray(probs, np.float64), _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted as half); NaN if one class."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Average ranks for ties (1-based).
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg_rank = first + (counts + 1) / 2.0
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(avg_rank, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def summarize(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """log-loss, AUC, observed and mean predicted CTR, and their ratio (calibration)."""
    y = np.asarray(labels, np.float64)
    p = np.asarray(probs, np.float64)
    observed = float(y.mean()) if y.size else float("nan")
    predicted = float(p.mean()) if p.size else float("nan")
    return {
        "rows": int(y.size),
        "logloss": logloss(y, p),
        "auc": auc(y, p),
        "observed_ctr": observed,
        "mean_predicted_ctr": predicted,
        "calibration": predicted / observed if observed > 0 else float("nan"),
    }
