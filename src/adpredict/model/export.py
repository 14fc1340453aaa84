"""The model repository: ``MODELS/NAME/<version>/`` SavedModels, written atomically.

Layout (TensorFlow Serving's)::

    MODELS/NAME/1/saved_model.pb       serving signatures, no optimizer slots
    MODELS/NAME/1/variables/...
    MODELS/NAME/1/adpredict.json       metadata: schema, metrics, data rows, creation time
    MODELS/NAME/.checkpoints/1/        training checkpoint WITH optimizer slots (optional)

A version is first written to ``MODELS/NAME/.tmp-*`` and renamed to its integer name only
when complete, so a server polling the directory never sees a half-written version.
Servers consider only directories whose name is a positive integer.

Serving signature ``serving_default`` (all inputs are required):

    inputs   <context field>    string [R] (multi-valued: [R, M], '' pads)   one row per request
             <candidate field>  string [B] (multi-valued: [B, M])            one row per candidate
             request_index      int32  [B]   the request (0..R-1) each candidate belongs to
    outputs  probability        float32 [B]  click probability per candidate

Signature ``serving_rows`` (same weights and output; ``rows_input_signature``): the inputs are
the table rows ``FeatureHasher`` computes from those strings, so a caller that hashes the
values itself (adpredict's server, in its C decoder) skips the string tensors and the graph's
hashing:

    inputs   context_rows       int64  [R, Sc]  single-valued context fields, schema order
             candidate_rows     int64  [B, Sk]  single-valued candidate fields, schema order
             <multi>_rows       int64  [R or B, W]  per multi-valued field, by its scope
             <multi>_weights    float32 [R or B, W] 1/count per value, padding 0
             request_index      int32  [B]
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf

from adpredict import __version__
from adpredict.errors import ModelError, ModelNotFoundError
from adpredict.model.ctr import CTRModel, serving_input_signature
from adpredict.model.features import HashedFeatures
from adpredict.schema import Schema

METADATA_FILE = "adpredict.json"
SIGNATURE = "serving_default"
ROWS_SIGNATURE = "serving_rows"
OUTPUT = "probability"
CHECKPOINTS = ".checkpoints"
#: Canonical positive integers only ("007", "0" and non-ASCII digits are not versions).
_VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")


@dataclass(frozen=True)
class ExportResult:
    """Where a version landed and how big it is."""

    version: int
    path: Path
    export_bytes: int
    checkpoint_path: Path | None = None
    checkpoint_bytes: int | None = None


class _ServingModule(tf.Module):
    """What gets saved: the model's variables and one signature, nothing else."""

    def __init__(self, model: CTRModel) -> None:
        super().__init__(name="adpredict")
        # Only the tf.Variables are tracked (tracking the Keras model too would store every
        # variable twice), in a fixed order so a warm start can copy them back one by one.
        self.weights = [v.value for v in model.variables]

        def serve(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return {OUTPUT: tf.sigmoid(model(features))}

        self.serve = tf.function(serve, input_signature=[serving_input_signature(model.schema)])
        hasher = model.hasher
        single = hasher.single_fields
        ctx = [f for f in single if f.scope == "context"]
        cand = [f for f in single if f.scope == "candidate"]
        # Column of each single-valued field in concat(context rows, candidate rows).
        order = [f.name for f in ctx + cand]
        perm = tf.constant([order.index(f.name) for f in single], tf.int32)

        def serve_rows(rows: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            index = rows["request_index"]
            ids = tf.concat([tf.gather(rows["context_rows"], index), rows["candidate_rows"]], 1)
            multi_ids, multi_weights = [], []
            for f in hasher.multi_fields:
                r, w = rows[f"{f.name}_rows"], rows[f"{f.name}_weights"]
                if f.scope == "context":
                    r, w = tf.gather(r, index), tf.gather(w, index)
                multi_ids.append(r)
                multi_weights.append(w)
            hashed = HashedFeatures(
                tf.gather(ids, perm, axis=1), tuple(multi_ids), tuple(multi_weights)
            )
            return {OUTPUT: tf.sigmoid(model.logits_of(model.rows_of(hashed)))}

        self.serve_rows = tf.function(serve_rows, input_signature=[rows_input_signature(model)])


def rows_input_signature(model: CTRModel) -> dict[str, tf.TensorSpec]:
    """Inputs of ``serving_rows``: the table rows ``FeatureHasher`` computes per scope.

    ``context_rows`` int64 ``[R, Sc]`` and ``candidate_rows`` ``[B, Sk]`` (single-valued
    fields of each scope, schema order), ``<field>_rows`` int64 / ``<field>_weights`` float32
    ``[N, W]`` per multi-valued field (N = R or B by scope), ``request_index`` int32 ``[B]``.
    """
    single = model.hasher.single_fields
    spec = {
        "context_rows": tf.TensorSpec(
            [None, sum(f.scope == "context" for f in single)], tf.int64, name="context_rows"
        ),
        "candidate_rows": tf.TensorSpec(
            [None, sum(f.scope == "candidate" for f in single)], tf.int64, name="candidate_rows"
        ),
        "request_index": tf.TensorSpec([None], tf.int32, name="request_index"),
    }
    for f in model.hasher.multi_fields:
        spec[f"{f.name}_rows"] = tf.TensorSpec([None, None], tf.int64, name=f"{f.name}_rows")
        spec[f"{f.name}_weights"] = tf.TensorSpec(
            [None, None], tf.float32, name=f"{f.name}_weights"
        )
    return spec


def dir_bytes(path: Path) -> int:
    """Total size of the regular files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def list_versions(model_dir: str | Path) -> list[int]:
    """Published versions (integer-named subdirectories), ascending."""
    path = Path(model_dir)
    if not path.is_dir():
        return []
    return sorted(
        int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    )


def _publish(tmp: Path, parent: Path, first: int) -> int:
    """Rename ``tmp`` to the first free integer name >= ``first``; returns it."""
    version = first
    while True:
        try:
            os.rename(tmp, parent / str(version))
            return version
        except OSError:
            if not (parent / str(version)).exists():
                raise
            version += 1


def export_model(
    model: CTRModel,
    model_dir: str | Path,
    metadata: dict[str, Any],
    *,
    optimizer: Any = None,
) -> ExportResult:
    """Save ``model`` as the next version under ``model_dir`` (created if needed).

    With ``optimizer``, also writes a training checkpoint (model + optimizer slots) under
    ``.checkpoints/<version>``, for warm starts that keep Adam's moments and to report
    what leaving the slots out saves.
    """
    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        module = _ServingModule(model)
        tf.saved_model.save(
            module,
            str(tmp),
            signatures={
                SIGNATURE: module.serve.get_concrete_function(),
                ROWS_SIGNATURE: module.serve_rows.get_concrete_function(),
            },
        )
        meta = dict(metadata)
        meta.setdefault("created", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
        meta["schema"] = model.schema.to_dict()
        meta["schema_fingerprint"] = model.schema.fingerprint()
        meta["model"] = model.describe()
        meta["adpredict_version"] = __version__
        meta["signature"] = {"name": SIGNATURE, "output": OUTPUT}
        export_bytes = dir_bytes(tmp)
        meta["export_bytes"] = export_bytes
        first = (list_versions(root) or [0])[-1] + 1
        meta["version"] = first
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        version = _publish(tmp, root, first)
        if version != first:  # someone else published `first` meanwhile; fix our record
            meta["version"] = version
            final = root / str(version) / METADATA_FILE
            partial = final.with_suffix(".json.tmp")
            partial.write_text(json.dumps(meta, indent=2, default=str) + "\n")
            os.replace(partial, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ckpt_path = ckpt_bytes = None
    if optimizer is not None:
        ckpt_path, ckpt_bytes = _write_checkpoint(model, optimizer, root / CHECKPOINTS, version)
    return ExportResult(version, root / str(version), export_bytes, ckpt_path, ckpt_bytes)


def _write_checkpoint(
    model: CTRModel, optimizer: Any, parent: Path, version: int
) -> tuple[Path, int]:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        tf.train.Checkpoint(model=model, optimizer=optimizer).write(str(tmp / "ckpt"))
        final = parent / str(version)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, dir_bytes(final)


def read_metadata(version_dir: str | Path) -> dict[str, Any]:
    """The ``adpredict.json`` of an exported version; ``ModelError`` if absent or bad."""
    path = Path(version_dir) / METADATA_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{version_dir}: no {METADATA_FILE}; not an adpredict export") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable metadata: {exc}") from None
    if not isinstance(meta, dict) or "schema" not in meta:
        raise ModelError(f"{path}: metadata has no schema")
    return meta


def resolve_version_dir(path: str | Path) -> Path:
    """Accept a version directory, or a model directory (its latest version)."""
    p = Path(path)
    if (p / "saved_model.pb").is_file():
        return p
    versions = list_versions(p)
    if not versions:
        raise ModelNotFoundError(
            f"{p}: neither an exported version nor a model directory with versions"
        )
    return p / str(versions[-1])


def load_signature(version_dir: str | Path) -> tuple[Any, Schema, dict[str, Any]]:
    """Load a version's serving function, schema and metadata (no Keras needed)."""
    vdir = resolve_version_dir(version_dir)
    meta = read_metadata(vdir)
    schema = Schema.from_dict(meta["schema"], source=f"{vdir / METADATA_FILE} schema")
    try:
        loaded = tf.saved_model.load(str(vdir))
        fn = loaded.signatures[SIGNATURE]
    except (KeyError, OSError, ValueError, tf.errors.OpError) as exc:
        raise ModelError(f"{vdir}: cannot load SavedModel: {exc}") from None
    fn._adpredict_keepalive = loaded  # the signature does not own its variables
    return fn, schema, meta


def copy_weights_from_export(model: CTRModel, version_dir: str | Path) -> dict[str, Any]:
    """Warm start: copy every variable of an exported version into ``model``.

    The export must have the same schema fingerprint and architecture; optimizer state
    starts fresh. Returns the source's metadata.
    """
    vdir = resolve_version_dir(version_dir)
    meta = read_metadata(vdir)
    if meta.get("schema_fingerprint") != model.schema.fingerprint():
        raise ModelError(
            f"--init-from {vdir}: its schema ({meta.get('schema', {}).get('name')!r}, fingerprint "
            f"{meta.get('schema_fingerprint')}) differs from the data's "
            f"({model.schema.name!r}, {model.schema.fingerprint()})"
        )
    src = meta.get("model", {})
    want = model.describe()
    for key in ("kind", "dim", "hidden"):
        if src.get(key) != want[key]:
            raise ModelError(
                f"--init-from {vdir}: its {key} is {src.get(key)!r} but this run trains {want[key]!r}"
            )
    loaded = tf.saved_model.load(str(vdir))
    saved = list(getattr(loaded, "weights", []))
    if len(saved) != len(model.variables):
        raise ModelError(
            f"--init-from {vdir}: {len(saved)} saved variables, the model has {len(model.variables)}"
        )
    for src_var, dst in zip(saved, model.variables, strict=True):
        if tuple(src_var.shape) != tuple(dst.shape):
            raise ModelError(
                f"--init-from {vdir}: variable {dst.path} has shape {tuple(src_var.shape)} in the "
                f"export but {tuple(dst.shape)} in the model"
            )
        dst.assign(src_var.numpy())
    return meta
