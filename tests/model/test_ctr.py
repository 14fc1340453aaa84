"""LR / FM / DeepFM over the shared hashed table (``model.ctr``), checked against NumPy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf

from adpredict.errors import ModelError
from adpredict.model.ctr import MODEL_KINDS, CTRModel, serving_input_signature
from adpredict.schema import Schema

SCHEMA = Schema.from_dict(
    {
        "name": "ctr",
        "version": 1,
        "fields": [
            {"name": "site", "scope": "context", "kind": "categorical", "buckets": 32},
            {
                "name": "segs",
                "scope": "context",
                "kind": "multi_categorical",
                "buckets": 16,
                "max_values": 3,
            },
            {"name": "device", "scope": "context", "kind": "categorical", "buckets": 8},
            {"name": "ad", "scope": "candidate", "kind": "categorical", "buckets": 64},
            {"name": "bid", "scope": "candidate", "kind": "numeric", "boundaries": [1.0, 2.0]},
            {
                "name": "tags",
                "scope": "candidate",
                "kind": "multi_categorical",
                "buckets": 16,
                "max_values": 2,
            },
        ],
    }
)
NUM_FIELDS = 6
DIM = 4
HIDDEN = (8, 4)

# Two bid requests: request 0 has 3 candidates, request 1 has 2.
CONTEXT = {
    "site": ["news.example", "shop.example"],
    "segs": [["s1", "s2", "s3"], ["s4", "", ""]],
    "device": ["mobile", ""],
}
CANDIDATES = {
    "ad": ["cr-1", "cr-2", "cr-3", "cr-1", ""],
    "bid": ["0.5", "1.5", "", "2", "9"],
    "tags": [["t1", "t2"], ["", ""], ["t3", ""], ["t1", "t1"], ["t2", "t4"]],
}
REQUEST_INDEX = [0, 0, 0, 1, 1]


def batch(context: dict, candidates: dict, request_index: list[int]) -> dict[str, tf.Tensor]:
    out = {name: tf.constant(values) for name, values in {**context, **candidates}.items()}
    out["request_index"] = tf.constant(request_index, tf.int32)
    return out


def merged() -> dict[str, tf.Tensor]:
    return batch(CONTEXT, CANDIDATES, REQUEST_INDEX)


def make_model(kind: str, seed: int = 0) -> CTRModel:
    """A model whose table has O(1) entries, so every term visibly matters."""
    model = CTRModel(SCHEMA, kind=kind, dim=DIM, hidden=HIDDEN, seed=seed)
    rng = np.random.default_rng(seed)
    model.table.assign(rng.normal(0.0, 0.5, model.table.shape).astype(np.float32))
    model.bias.assign(0.3)
    return model


@pytest.fixture(scope="module", params=MODEL_KINDS)
def model(request: pytest.FixtureRequest) -> CTRModel:
    return make_model(request.param)


# ---- shapes and the pieces of the logit ---------------------------------------------------------


def test_output_is_one_logit_per_candidate(model: CTRModel) -> None:
    logits = model(merged())
    assert logits.shape == (5,)
    assert logits.dtype == tf.float32
    assert np.all(np.isfinite(logits.numpy()))
    assert len(set(np.round(logits.numpy(), 5))) == 5  # candidates are told apart
    np.testing.assert_allclose(
        model.predict_proba(merged()).numpy(), 1 / (1 + np.exp(-logits.numpy())), rtol=1e-6
    )


def test_field_rows_are_the_hashed_table_rows(model: CTRModel) -> None:
    feats = merged()
    rows = model.field_rows(feats).numpy()
    assert rows.shape == (5, NUM_FIELDS, 1 + model.dim)
    hashed = model.hasher(feats)
    table = model.table.numpy()
    single = hashed.single_ids.numpy()
    np.testing.assert_allclose(rows[:, : single.shape[1]], table[single], rtol=1e-6)
    for k, (ids, w) in enumerate(zip(hashed.multi_ids, hashed.multi_weights, strict=True)):
        expected = np.einsum("bm,bmd->bd", w.numpy(), table[ids.numpy()])
        np.testing.assert_allclose(rows[:, single.shape[1] + k], expected, rtol=1e-5, atol=1e-6)


def brute_force_logits(model: CTRModel, rows: np.ndarray) -> np.ndarray:
    """bias + linear + sum over field pairs of <v_f, v_g> + MLP, written out with loops."""
    rows = rows.astype(np.float64)
    out = float(model.bias.numpy()) + rows[:, :, 0].sum(axis=1)
    if model.dim:
        v = rows[:, :, 1:]
        for f, g in itertools.combinations(range(rows.shape[1]), 2):
            out += np.sum(v[:, f] * v[:, g], axis=1)
    if model.hidden:
        h = rows[:, :, 1:].reshape(rows.shape[0], -1)
        for layer in model.mlp:
            kernel, bias = (w.astype(np.float64) for w in layer.get_weights())
            h = np.maximum(h @ kernel + bias, 0.0)
        kernel, bias = (w.astype(np.float64) for w in model.mlp_out.get_weights())
        out += (h @ kernel + bias)[:, 0]
    return out


def test_logit_equals_brute_force_pairwise_sum(model: CTRModel) -> None:
    feats = merged()
    logits, rows = model.logits_and_rows(feats)
    expected = brute_force_logits(model, rows.numpy())
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_fm_term_is_the_pairwise_interaction() -> None:
    """FM minus LR over the same linear weights is exactly sum_{f<g} <v_f, v_g>."""
    fm = make_model("fm")
    feats = merged()
    logits, rows = fm.logits_and_rows(feats)
    rows = rows.numpy().astype(np.float64)
    linear = float(fm.bias.numpy()) + rows[:, :, 0].sum(axis=1)
    pairs = np.zeros(5)
    for b in range(5):
        for f in range(NUM_FIELDS):
            for g in range(f + 1, NUM_FIELDS):
                pairs[b] += float(np.dot(rows[b, f, 1:], rows[b, g, 1:]))
    assert np.abs(pairs).max() > 0.1  # the interaction term is not negligible here
    np.testing.assert_allclose(logits.numpy() - linear, pairs, rtol=1e-5, atol=1e-5)


def test_deepfm_adds_its_mlp_to_fm() -> None:
    deep, fm = make_model("deepfm"), make_model("fm")  # same seed: same table and bias
    np.testing.assert_array_equal(deep.table.numpy(), fm.table.numpy())
    diff = deep(merged()).numpy() - fm(merged()).numpy()
    assert np.abs(diff).max() > 1e-3
    rows = deep.field_rows(merged()).numpy()
    mlp_only = brute_force_logits(deep, rows) - brute_force_logits(fm, rows)
    np.testing.assert_allclose(diff, mlp_only, rtol=1e-4, atol=1e-5)


def test_lr_has_no_factor_columns_and_no_mlp() -> None:
    lr = CTRModel(SCHEMA, kind="lr", dim=8, hidden=(16,))
    assert lr.dim == 0 and lr.hidden == () and lr.mlp == []
    assert tuple(lr.table.shape) == (SCHEMA.total_buckets, 1)
    assert lr.describe()["parameters"] == SCHEMA.total_buckets + 1


def test_parameter_counts() -> None:
    fm = CTRModel(SCHEMA, kind="fm", dim=DIM)
    assert fm.hidden == ()
    assert fm.describe()["parameters"] == SCHEMA.total_buckets * (1 + DIM) + 1
    deep = CTRModel(SCHEMA, kind="deepfm", dim=DIM, hidden=HIDDEN)
    mlp = (NUM_FIELDS * DIM * 8 + 8) + (8 * 4 + 4) + (4 + 1)
    assert deep.describe() == {
        "kind": "deepfm",
        "dim": DIM,
        "hidden": list(HIDDEN),
        "table_rows": SCHEMA.total_buckets,
        "parameters": SCHEMA.total_buckets * (1 + DIM) + 1 + mlp,
    }


# ---- merged requests ----------------------------------------------------------------------------


def test_merged_batch_equals_each_candidate_with_its_context_tiled(model: CTRModel) -> None:
    merged_logits = model(merged()).numpy()
    for i, r in enumerate(REQUEST_INDEX):
        context = {name: [values[r]] for name, values in CONTEXT.items()}
        candidate = {name: [values[i]] for name, values in CANDIDATES.items()}
        alone = model(batch(context, candidate, [0])).numpy()
        assert alone.shape == (1,)
        np.testing.assert_allclose(alone[0], merged_logits[i], rtol=0, atol=1e-6)


def test_merged_batch_equals_the_training_layout(model: CTRModel) -> None:
    """Context tiled to one row per candidate with request_index = range(B), as in training."""
    tiled = {name: [values[r] for r in REQUEST_INDEX] for name, values in CONTEXT.items()}
    training = batch(tiled, CANDIDATES, list(range(5)))
    np.testing.assert_allclose(model(training).numpy(), model(merged()).numpy(), atol=1e-6)


def test_serving_signature_matches_the_schema() -> None:
    spec = serving_input_signature(SCHEMA)
    assert list(spec) == [*SCHEMA.names, "request_index"]
    assert spec["segs"].shape.as_list() == [None, None]
    assert spec["site"].shape.as_list() == [None]
    assert spec["request_index"].dtype == tf.int32
    model = make_model("deepfm")
    fn = tf.function(model.call, input_signature=[spec])
    np.testing.assert_allclose(fn(merged()).numpy(), model(merged()).numpy(), atol=1e-6)


# ---- gradients ----------------------------------------------------------------------------------


def test_table_gradient_is_sparse_and_counts_rows(model: CTRModel) -> None:
    feats = merged()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(feats))
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    (index,) = [i for i, v in enumerate(variables) if v is model.table]
    grad = grads[index]
    assert isinstance(grad, tf.IndexedSlices)
    # Only rows that the batch looked up appear.
    hashed = model.hasher(feats)
    looked_up = set(hashed.single_ids.numpy().ravel().tolist())
    for ids in hashed.multi_ids:
        looked_up |= set(ids.numpy().ravel().tolist())
    assert set(grad.indices.numpy().tolist()) <= looked_up
    # d(sum of logits)/d(linear weight of row r) = total averaging weight of r in the batch.
    dense = tf.convert_to_tensor(grad).numpy()
    expected = np.zeros(SCHEMA.total_buckets)
    np.add.at(expected, hashed.single_ids.numpy().ravel(), 1.0)
    for ids, w in zip(hashed.multi_ids, hashed.multi_weights, strict=True):
        np.add.at(expected, ids.numpy().ravel(), w.numpy().ravel())
    np.testing.assert_allclose(dense[:, 0], expected, rtol=1e-5, atol=1e-6)
    bias_grad = grads[next(i for i, v in enumerate(variables) if v is model.bias)]
    assert float(bias_grad) == pytest.approx(5.0)


def test_fm_learns_an_interaction_that_lr_cannot() -> None:
    """XOR of a context and a candidate value: additive models stay at log(2)."""
    site = ["a", "a", "b", "b"] * 8
    ad = ["x", "y", "x", "y"] * 8
    labels = tf.constant([1.0, 0.0, 0.0, 1.0] * 8)
    feats = batch({"site": site}, {"ad": ad}, list(range(32)))
    feats |= {
        "segs": tf.fill([32, 1], ""),
        "device": tf.fill([32], ""),
        "bid": tf.fill([32], ""),
        "tags": tf.fill([32, 1], ""),
    }

    def final_loss(kind: str) -> float:
        model = CTRModel(SCHEMA, kind=kind, dim=DIM, seed=1)
        model.table.assign(model.table.numpy() * 30)  # break the near-zero initial symmetry
        optimizer = tf.keras.optimizers.Adam(0.1)

        @tf.function
        def step() -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, model(feats)))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        for _ in range(150):
            loss = step()
        return float(loss)

    assert final_loss("lr") > 0.69
    assert final_loss("fm") < 0.1


# ---- construction and config --------------------------------------------------------------------


def test_unknown_kind_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"'xgboost'.*lr.*fm.*deepfm"):
        CTRModel(SCHEMA, kind="xgboost")


@pytest.mark.parametrize("kind", ["fm", "deepfm"])
def test_factor_models_need_a_positive_dim(kind: str) -> None:
    with pytest.raises(ModelError, match="dim"):
        CTRModel(SCHEMA, kind=kind, dim=0)


def test_schema_may_be_given_as_a_dict() -> None:
    model = CTRModel(SCHEMA.to_dict(), kind="lr")
    assert model.schema == SCHEMA


def test_seed_fixes_the_initial_weights() -> None:
    a = CTRModel(SCHEMA, kind="deepfm", dim=DIM, hidden=HIDDEN, seed=5)
    b = CTRModel(SCHEMA, kind="deepfm", dim=DIM, hidden=HIDDEN, seed=5)
    c = CTRModel(SCHEMA, kind="deepfm", dim=DIM, hidden=HIDDEN, seed=6)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a.table.numpy(), c.table.numpy())
    assert float(np.std(a.table.numpy())) == pytest.approx(0.01, rel=0.1)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_get_config_round_trips(kind: str) -> None:
    original = make_model(kind, seed=3)
    config = original.get_config()
    assert config["kind"] == kind and config["schema"] == SCHEMA.to_dict()
    for rebuilt in (CTRModel(**config), CTRModel.from_config(config)):
        assert (rebuilt.kind, rebuilt.dim, rebuilt.hidden, rebuilt.seed) == (
            original.kind,
            original.dim,
            original.hidden,
            original.seed,
        )
        assert rebuilt.schema == SCHEMA
        assert rebuilt.get_config() == config
        assert not np.allclose(rebuilt(merged()).numpy(), original(merged()).numpy())
        rebuilt.set_weights(original.get_weights())
        np.testing.assert_array_equal(rebuilt(merged()).numpy(), original(merged()).numpy())
