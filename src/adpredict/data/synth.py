"""Synthetic bid logs with a known ground truth, for the built-in ``rtb`` schema.

No public CTR data set can be installed here, so adpredict makes its own: impressions
whose feature values follow realistic popularity (Zipf-like heads and long tails; site,
creative and landing-domain fields with 10^5-10^6 distinct values), realistic
hierarchies (creative -> campaign -> advertiser -> landing domain and category;
site -> publisher; region -> country), and a click drawn from a hidden model:

    logit(p) = b0 + sum_f w_f[value_f] + sum_{(f, g) in PAIRS} <u_f[value_f], u_g[value_g]>

with per-value weights ``w`` and rank-4 latent vectors ``u`` for the pairwise
interactions in ``PAIRS`` (device x format, slot size x creative size, hour x category,
segments x category, country x advertiser, site x category). Logistic regression cannot
represent the interactions; FM and DeepFM can. ``b0`` is solved so the mean CTR is
``target_ctr`` (default 2%). Every row keeps its true click probability (``true_ctr``),
so the best achievable log-loss and AUC (the *oracle*) are known exactly.

The output is a pure function of ``(rows, seed)``: the same seed gives the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from adpredict.errors import SchemaError
from adpredict.schema import Schema, load_schema

BLOCK_ROWS = 50_000
LATENT_DIM = 4

# field -> (distinct values, zipf exponent, weight std). Derived fields have no exponent.
_VOCAB: dict[str, tuple[int, float | None, float]] = {
    "site_domain": (200_000, 1.2, 0.06),
    "publisher_id": (20_000, None, 0.08),
    "exchange": (8, 1.2, 0.2),
    "device_type": (5, 1.0, 0.4),
    "os": (10, 1.3, 0.15),
    "browser": (9, 1.3, 0.1),
    "country": (120, 1.4, 0.3),
    "region": (3_000, None, 0.03),
    "hour_of_day": (24, None, 0.2),
    "day_of_week": (7, None, 0.05),
    "slot_size": (16, 1.1, 0.4),
    "user_segments": (5_000, 1.2, 0.2),
    "advertiser_id": (4_000, None, 0.2),
    "campaign_id": (30_000, None, 0.05),
    "creative_id": (500_000, 1.2, 0.03),
    "ad_format": (4, None, 0.5),
    "creative_size": (12, None, 0.25),
    "landing_domain": (150_000, None, 0.03),
    "iab_category": (300, None, 0.3),
}
#: Pairwise interactions of the hidden model and the variance of each latent coordinate.
PAIRS: tuple[tuple[str, str, float], ...] = (
    ("device_type", "ad_format", 0.35),
    ("slot_size", "creative_size", 0.35),
    ("hour_of_day", "iab_category", 0.15),
    ("user_segments", "iab_category", 0.2),
    ("country", "advertiser_id", 0.05),
    ("site_domain", "iab_category", 0.02),
)
_NAMES = {
    "exchange": ["adx", "openx", "pubmatic", "magnite", "index", "xandr", "sovrn", "triplelift"],
    "device_type": ["mobile", "desktop", "tablet", "ctv", "other"],
    "os": [
        "android",
        "ios",
        "windows",
        "macos",
        "linux",
        "chromeos",
        "tizen",
        "webos",
        "roku",
        "other",
    ],
    "browser": [
        "chrome",
        "safari",
        "edge",
        "firefox",
        "samsung",
        "opera",
        "webview",
        "yandex",
        "other",
    ],
    "slot_size": [
        "300x250",
        "320x50",
        "728x90",
        "300x600",
        "160x600",
        "320x100",
        "970x250",
        "336x280",
        "468x60",
        "120x600",
        "250x250",
        "200x200",
        "300x50",
        "970x90",
        "480x320",
        "1024x768",
    ],
    "ad_format": ["banner", "native", "video", "interstitial"],
    "day_of_week": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
}
_PREFIX = {
    "site_domain": "site{}.example",
    "publisher_id": "pub-{}",
    "country": "C{:03d}",
    "region": "R{:04d}",
    "user_segments": "seg-{}",
    "advertiser_id": "adv-{}",
    "campaign_id": "cmp-{}",
    "creative_id": "cr-{}",
    "creative_size": "sz{}",
    "landing_domain": "shop{}.example",
    "iab_category": "IAB{}",
}
_DIURNAL = np.array(
    [2, 1.5, 1, 1, 1, 1.5, 3, 5, 6, 6, 6, 6.5, 7, 6.5, 6, 6, 6.5, 7, 8, 8.5, 8, 6.5, 4.5, 3]
)


@dataclass
class Block:
    """A block of generated rows, column-wise (values are bytes)."""

    columns: dict[str, Any]
    labels: np.ndarray
    true_ctr: np.ndarray


def _zipf_probs(n: int, s: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return p / p.sum()


def cardinality(field: str) -> int | None:
    """How many distinct values the generator draws for ``field`` (None: not an id field)."""
    spec = _VOCAB.get(field)
    return spec[0] if spec else None


def value_string(field: str, index: int) -> str | None:
    """The ``index``-th value of ``field`` spelled as the generated data spells it.

    ``None`` for fields the generator does not draw from a vocabulary (``bid_cpm``).
    """
    if field not in _VOCAB:
        return None
    if field in _NAMES:
        names = _NAMES[field]
        return names[index % len(names)]
    if field == "hour_of_day":
        return str(index % 24)
    return _PREFIX[field].format(index)


def _vocab(field: str, n: int) -> np.ndarray:
    if field in _NAMES:
        names = _NAMES[field][:n]
    elif field == "hour_of_day":
        names = [str(h) for h in range(24)]
    else:
        names = [_PREFIX[field].format(i) for i in range(n)]
    return np.array([s.encode() for s in names], dtype=object)


class World:
    """The hidden ground truth: vocabularies, hierarchies, weights and latent vectors."""

    def __init__(self, seed: int, target_ctr: float = 0.02) -> None:
        if not 0.001 <= target_ctr <= 0.2:
            raise ValueError(f"target_ctr must be in [0.001, 0.2], got {target_ctr}")
        rng = np.random.default_rng([seed, 0])
        self.vocab = {f: _vocab(f, n) for f, (n, _, _) in _VOCAB.items()}
        self.popularity = {f: _zipf_probs(n, s) for f, (n, s, _) in _VOCAB.items() if s is not None}
        # Randomise which ids are popular so that popularity is not encoded in the id.
        self.perm = {f: rng.permutation(_VOCAB[f][0]) for f in self.popularity}
        n = {f: v[0] for f, v in _VOCAB.items()}
        self.site_publisher = rng.integers(0, n["publisher_id"], n["site_domain"])
        self.region_country = rng.integers(0, n["country"], n["region"])
        self.country_regions = [
            np.flatnonzero(self.region_country == c) for c in range(n["country"])
        ]
        self.creative_campaign = rng.integers(0, n["campaign_id"], n["creative_id"])
        # Campaign -> advertiser follows a Zipf so a few advertisers run many campaigns.
        self.campaign_advertiser = rng.choice(
            n["advertiser_id"], n["campaign_id"], p=_zipf_probs(n["advertiser_id"], 0.8)
        )
        self.creative_format = rng.choice(4, n["creative_id"], p=[0.55, 0.25, 0.12, 0.08])
        self.creative_size = rng.integers(0, n["creative_size"], n["creative_id"])
        self.advertiser_landing = rng.integers(0, n["landing_domain"], n["advertiser_id"])
        self.advertiser_category = rng.choice(
            n["iab_category"], n["advertiser_id"], p=_zipf_probs(n["iab_category"], 0.9)
        )
        self.weights = {f: rng.normal(0.0, std, n[f]) for f, (_, _, std) in _VOCAB.items()}
        self.weights["hour_of_day"] = 0.25 * np.sin(np.arange(24) / 24 * 2 * np.pi - 1.0)
        self.latent: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        for a, b, var in PAIRS:
            self.latent[(a, b)] = (
                rng.normal(0.0, np.sqrt(var), (n[a], LATENT_DIM)),
                rng.normal(0.0, np.sqrt(var), (n[b], LATENT_DIM)),
            )
        self.bid_effect = 0.15
        self.b0 = 0.0
        probe = self._sample_ids(np.random.default_rng([seed, 1]), 200_000)
        logits = self._logits(probe)
        self.b0 = _solve_bias(logits, target_ctr)

    def _popular(self, rng: np.random.Generator, field: str, size: int) -> np.ndarray:
        return self.perm[field][rng.choice(len(self.perm[field]), size, p=self.popularity[field])]

    def _sample_ids(self, rng: np.random.Generator, size: int) -> dict[str, Any]:
        ids: dict[str, Any] = {}
        for f in (
            "site_domain",
            "exchange",
            "device_type",
            "os",
            "browser",
            "country",
            "slot_size",
            "creative_id",
        ):
            ids[f] = self._popular(rng, f, size)
        ids["publisher_id"] = self.site_publisher[ids["site_domain"]]
        regions = np.empty(size, np.int64)
        for c in np.unique(ids["country"]):
            rows = np.flatnonzero(ids["country"] == c)
            choices = self.country_regions[c]
            regions[rows] = rng.choice(choices, len(rows)) if len(choices) else 0
        ids["region"] = regions
        ids["hour_of_day"] = rng.choice(24, size, p=_DIURNAL / _DIURNAL.sum())
        ids["day_of_week"] = rng.integers(0, 7, size)
        counts = np.minimum(rng.poisson(3.0, size), 16)
        flat = self._popular(rng, "user_segments", int(counts.sum()))
        ids["user_segments"] = (flat, counts)
        cr = ids["creative_id"]
        ids["campaign_id"] = self.creative_campaign[cr]
        ids["advertiser_id"] = self.campaign_advertiser[ids["campaign_id"]]
        ids["ad_format"] = self.creative_format[cr]
        ids["creative_size"] = self.creative_size[cr]
        ids["landing_domain"] = self.advertiser_landing[ids["advertiser_id"]]
        ids["iab_category"] = self.advertiser_category[ids["advertiser_id"]]
        ids["bid_cpm"] = np.round(rng.lognormal(0.7, 0.8, size), 2)
        return ids

    def _segment_mean(self, table: np.ndarray, seg: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        flat, counts = seg
        rows = np.repeat(np.arange(len(counts)), counts)
        out = np.zeros((len(counts), *table.shape[1:]))
        np.add.at(out, rows, table[flat])
        return out / np.maximum(counts, 1).reshape((-1,) + (1,) * (table.ndim - 1))

    def _logits(self, ids: dict[str, Any]) -> np.ndarray:
        logit = np.full(len(ids["site_domain"]), self.b0)
        for f in _VOCAB:
            if f == "user_segments":
                logit += self._segment_mean(self.weights[f], ids[f])
            else:
                logit += self.weights[f][ids[f]]
        logit += self.bid_effect * np.log1p(ids["bid_cpm"])
        for (a, b), (ua, ub) in self.latent.items():
            va = self._segment_mean(ua, ids[a]) if a == "user_segments" else ua[ids[a]]
            logit += np.sum(va * ub[ids[b]], axis=1)
        return logit

    def block(self, rng: np.random.Generator, size: int) -> Block:
        """Generate ``size`` rows."""
        ids = self._sample_ids(rng, size)
        p = 1.0 / (1.0 + np.exp(-self._logits(ids)))
        labels = (rng.random(size) < p).astype(np.int64)
        columns: dict[str, Any] = {}
        for f in _VOCAB:
            if f == "user_segments":
                flat, counts = ids[f]
                values = self.vocab[f][flat]
                splits = np.cumsum(counts)[:-1]
                columns[f] = [list(v) for v in np.split(values, splits)]
            else:
                columns[f] = self.vocab[f][ids[f]]
        columns["bid_cpm"] = np.array([f"{b:.2f}".encode() for b in ids["bid_cpm"]], dtype=object)
        return Block(columns=columns, labels=labels, true_ctr=p.astype(np.float32))


def _solve_bias(logits: np.ndarray, target: float) -> float:
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(logits + mid)))) > target:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


def check_schema(schema: Schema) -> None:
    """The generator only knows the built-in ``rtb`` fields."""
    known = set(_VOCAB) | {"bid_cpm"}
    unknown = [f.name for f in schema.fields if f.name not in known]
    if unknown:
        raise SchemaError(
            f"synth generates the built-in 'rtb' fields; schema {schema.name!r} has fields it "
            f"cannot generate: {unknown}"
        )
    rtb = {f.name: f for f in load_schema("rtb").fields}
    for f in schema.fields:
        if (f.scope, f.kind) != (rtb[f.name].scope, rtb[f.name].kind):
            raise SchemaError(
                f"field {f.name!r}: synth generates it as {rtb[f.name].scope} "
                f"{rtb[f.name].kind}, the schema says {f.scope} {f.kind}"
            )


def generate(rows: int, seed: int = 0, *, target_ctr: float = 0.02) -> Iterator[Block]:
    """Yield blocks of rows totalling ``rows``; deterministic for ``(rows, seed)``."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    world = World(seed, target_ctr)
    rng = np.random.default_rng([seed, 2])
    done = 0
    while done < rows:
        size = min(BLOCK_ROWS, rows - done)
        yield world.block(rng, size)
        done += size
