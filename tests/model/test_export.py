"""Export: TF Serving layout, atomic publication, parity with Keras, no optimizer slots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from adpredict.errors import ModelError
from adpredict.model import export
from adpredict.model.ctr import CTRModel
from adpredict.model.train import make_optimizer
from adpredict.schema import load_schema

SCHEMA = Path(__file__).parents[1] / "fixtures" / "rtb_small.toml"


def _features(schema, n: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats: dict[str, np.ndarray] = {}
    for f in schema.fields:
        if f.is_multi:
            vals = [[f"s{rng.integers(50)}".encode() for _ in range(3)] for _ in range(n)]
            vals[0] = [b"", b"", b""]
            feats[f.name] = np.array(vals, dtype=object)
        elif f.is_numeric:
            feats[f.name] = np.array(
                [f"{x:.2f}".encode() for x in rng.lognormal(0, 1, n)], dtype=object
            )
        else:
            feats[f.name] = np.array(
                [f"v{rng.integers(100)}".encode() for _ in range(n)], dtype=object
            )
    feats[schema.fields[0].name][1] = b""  # a missing value
    feats["request_index"] = np.arange(n, dtype=np.int32)
    return feats


@pytest.fixture
def model() -> CTRModel:
    m = CTRModel(load_schema(SCHEMA), kind="deepfm", dim=4, hidden=(8,), seed=3)
    # Move weights off their init so parity is not trivially about zeros.
    for v in m.trainable_variables:
        v.assign(v.numpy() + np.random.default_rng(1).normal(0, 0.05, v.shape).astype(np.float32))
    return m


def test_export_layout_metadata_and_versions(model: CTRModel, tmp_path: Path) -> None:
    first = export.export_model(model, tmp_path / "m", {"metrics": {"x": 1}})
    second = export.export_model(model, tmp_path / "m", {})
    assert (first.version, second.version) == (1, 2)
    assert export.list_versions(tmp_path / "m") == [1, 2]
    assert (first.path / "saved_model.pb").is_file()
    meta = export.read_metadata(first.path)
    assert meta["version"] == 1
    assert meta["schema"]["name"] == "rtb_small"
    assert meta["schema_fingerprint"] == model.schema.fingerprint()
    assert meta["metrics"] == {"x": 1}
    assert "created" in meta and meta["export_bytes"] == first.export_bytes
    # Nothing but published versions is left behind.
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2"]


def test_export_matches_keras_in_a_fresh_process(model: CTRModel, tmp_path: Path) -> None:
    result = export.export_model(model, tmp_path / "m", {})
    feats = _features(model.schema)
    expected = tf.sigmoid(model(feats)).numpy()
    np.save(tmp_path / "feats.npy", feats, allow_pickle=True)
    script = (
        "import sys, json, numpy as np\n"
        "from adpredict.model.export import load_signature\n"
        "fn, schema, meta = load_signature(sys.argv[1])\n"
        "feats = np.load(sys.argv[2], allow_pickle=True).item()\n"
        "print(json.dumps(fn(**feats)['probability'].numpy().tolist()))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(result.path), str(tmp_path / "feats.npy")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    got = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_export_has_no_optimizer_slots_and_checkpoint_has_them(
    model: CTRModel, tmp_path: Path
) -> None:
    optimizer = make_optimizer("lazyadam", 0.01)
    optimizer.build(model.trainable_variables)
    result = export.export_model(model, tmp_path / "m", {}, optimizer=optimizer)
    saved = tf.train.list_variables(str(result.path / "variables" / "variables"))
    assert not any(
        "optimizer" in name or "momentum" in name or "velocity" in name for name, _ in saved
    )
    ckpt = tf.train.list_variables(str(result.checkpoint_path / "ckpt"))
    assert any("optimizer" in name for name, _ in ckpt)
    # Adam keeps two slots per variable: the checkpoint is about three times the export.
    assert result.checkpoint_bytes > 2.5 * sum(
        p.stat().st_size for p in (result.path / "variables").iterdir()
    )


def test_failed_export_leaves_nothing(model: CTRModel, tmp_path: Path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export.tf.saved_model, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        export.export_model(model, tmp_path / "m", {})
    assert list((tmp_path / "m").iterdir()) == []


def test_warm_start_copies_weights_and_checks_compatibility(
    model: CTRModel, tmp_path: Path
) -> None:
    result = export.export_model(model, tmp_path / "m", {})
    fresh = CTRModel(model.schema, kind="deepfm", dim=4, hidden=(8,), seed=99)
    feats = _features(model.schema)
    assert not np.allclose(fresh(feats).numpy(), model(feats).numpy())
    export.copy_weights_from_export(fresh, tmp_path / "m")  # model dir -> latest version
    np.testing.assert_allclose(fresh(feats).numpy(), model(feats).numpy(), atol=1e-6)

    other_arch = CTRModel(model.schema, kind="fm", dim=4)
    with pytest.raises(ModelError, match="kind"):
        export.copy_weights_from_export(other_arch, result.path)
    other_schema = load_schema("rtb")
    with pytest.raises(ModelError, match="schema"):
        export.copy_weights_from_export(CTRModel(other_schema, kind="lr"), result.path)


def test_resolve_and_read_metadata_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither an exported version"):
        export.resolve_version_dir(tmp_path)
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "saved_model.pb").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"no adpredict\.json"):
        export.read_metadata(tmp_path / "1")
    (tmp_path / "1" / "adpredict.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable metadata"):
        export.read_metadata(tmp_path / "1")


def _rows_feed(model: CTRModel, feats: dict[str, np.ndarray]) -> dict[str, tf.Tensor]:
    """What the C decoder is to hand ``serving_rows``: ``FeatureHasher``'s rows per scope."""
    tensors = {k: tf.constant(v.tolist() if v.dtype == object else v) for k, v in feats.items()}
    feed: dict[str, tf.Tensor] = {"request_index": tensors["request_index"]}
    for scope in ("context", "candidate"):
        single, multi = model.hasher._scope(scope, tensors)
        names = [f.name for f in model.hasher.single_fields if f.scope == scope]
        feed[f"{scope}_rows"] = tf.stack([single[n] for n in names], axis=1)
        for name, (ids, weights) in multi.items():
            feed[f"{name}_rows"], feed[f"{name}_weights"] = ids, weights
    return feed


def test_rows_signature_answers_as_the_string_signature(model: CTRModel, tmp_path: Path) -> None:
    schema = model.schema
    requests, candidates = 3, 8
    ctx = _features(schema, requests, seed=4)
    cand = _features(schema, candidates, seed=5)
    feats = {f.name: (ctx if f.scope == "context" else cand)[f.name] for f in schema.fields}
    feats["request_index"] = np.array([0, 0, 0, 1, 1, 2, 2, 2], dtype=np.int32)
    result = export.export_model(model, tmp_path / "m", {})
    loaded = tf.saved_model.load(str(result.path))
    strings = loaded.signatures[export.SIGNATURE](
        **{k: tf.constant(v.tolist() if v.dtype == object else v) for k, v in feats.items()}
    )[export.OUTPUT].numpy()
    rows = loaded.signatures[export.ROWS_SIGNATURE](**_rows_feed(model, feats))[export.OUTPUT]
    np.testing.assert_allclose(rows.numpy(), strings, rtol=1e-6, atol=1e-7)
    assert len(set(np.round(strings, 6))) > 1  # not a constant model
