"""The click-through-rate models: logistic regression, FM and DeepFM.

All three read one shared table of ``Schema.total_buckets`` rows (hashed ids, see
``adpredict.model.features``). Column 0 of a row is its linear weight; columns 1..dim
its factor vector (``lr`` has no factor columns). For B candidates and F fields:

- ``lr``:     logit = bias + sum_f w_f
- ``fm``:     logit = lr + sum_{f<g} <v_f, v_g>          (Rendle's O(F·dim) identity)
- ``deepfm``: logit = fm + MLP(concat_f v_f)             (Guo et al., 2017)

The table receives ``tf.IndexedSlices`` gradients (only the rows in the batch), which is
what makes ``LazyAdam`` cheap. ``call`` returns logits; ``predict_proba`` sigmoids them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from adpredict.errors import ModelError
from adpredict.model.features import FeatureHasher, HashedFeatures
from adpredict.schema import Schema

MODEL_KINDS = ("lr", "fm", "deepfm")


@keras.saving.register_keras_serializable(package="adpredict")
class CTRModel(keras.Model):
    """LR / FM / DeepFM over a schema's hashed features (see module docstring)."""

    def __init__(
        self,
        schema: Schema | dict[str, Any],
        kind: str = "deepfm",
        dim: int = 8,
        hidden: Sequence[int] = (64, 32),
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(schema, dict):
            schema = Schema.from_dict(schema)
        if kind not in MODEL_KINDS:
            raise ModelError(f"unknown model kind {kind!r}; expected one of {list(MODEL_KINDS)}")
        if kind != "lr" and dim < 1:
            raise ModelError(f"embedding dim must be >= 1 for {kind}, got {dim}")
        self.schema = schema
        self.kind = kind
        self.dim = dim if kind != "lr" else 0
        self.hidden = tuple(int(h) for h in hidden) if kind == "deepfm" else ()
        self.seed = seed
        self.hasher = FeatureHasher(schema)
        self.num_fields = len(self.hasher.field_order)
        self.table = self.add_weight(
            name="table",
            shape=(schema.total_buckets, 1 + self.dim),
            initializer=keras.initializers.RandomNormal(stddev=0.01, seed=seed),
        )
        self.bias = self.add_weight(name="bias", shape=(), initializer="zeros")
        # Feature admission: a row is used only if admitted (1); others fall back to their
        # field's missing bucket. All ones until training counts the data (see train.py).
        self.admitted = self.add_weight(
            name="admitted",
            shape=(schema.total_buckets,),
            dtype="int8",
            initializer="ones",
            trainable=False,
        )
        offsets = schema.offsets()
        self._single_offsets = tf.constant(
            [offsets[f.name] for f in self.hasher.single_fields], tf.int64
        )
        self._multi_offsets = [offsets[f.name] for f in self.hasher.multi_fields]
        self.mlp = [
            keras.layers.Dense(
                h, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed + i)
            )
            for i, h in enumerate(self.hidden)
        ]
        self.mlp_out = (
            keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed + 99))
            if self.hidden
            else None
        )
        if self.hidden:
            width = self.num_fields * self.dim
            for layer in self.mlp:
                layer.build((None, width))
                width = layer.units
            self.mlp_out.build((None, width))
        self.built = True

    def field_rows(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        """``[B, F, 1+dim]``: each field's (weighted) table row, one gather for all fields."""
        return self.rows_of(self.hasher(features))

    def rows_of(self, hashed: HashedFeatures) -> tf.Tensor:
        """``field_rows`` from already hashed features (``FeatureHasher``'s output)."""
        hashed = self.admit(hashed)
        parts = [tf.reshape(hashed.single_ids, [-1])]
        parts += [tf.reshape(ids, [-1]) for ids in hashed.multi_ids]
        rows = tf.gather(self.table, tf.concat(parts, axis=0))
        batch = tf.shape(hashed.single_ids)[0]
        width = 1 + self.dim
        n_single = len(self.hasher.single_fields)
        sizes = [batch * n_single] + [tf.size(ids) for ids in hashed.multi_ids]
        pieces = tf.split(rows, tf.stack(sizes), axis=0) if hashed.multi_ids else [rows]
        fields = [tf.reshape(pieces[0], [batch, n_single, width])]
        for piece, ids, weights in zip(
            pieces[1:], hashed.multi_ids, hashed.multi_weights, strict=True
        ):
            per_value = tf.reshape(piece, [batch, tf.shape(ids)[1], width])
            fields.append(
                tf.reduce_sum(per_value * weights[:, :, tf.newaxis], axis=1, keepdims=True)
            )
        return tf.concat(fields, axis=1) if len(fields) > 1 else fields[0]

    def admit(self, hashed: HashedFeatures) -> HashedFeatures:
        """Replace rows that are not admitted by their field's missing bucket."""
        admitted = tf.convert_to_tensor(self.admitted)

        def keep(ids: tf.Tensor, fallback: tf.Tensor | int) -> tf.Tensor:
            ok = tf.gather(admitted, ids) > 0
            return tf.where(ok, ids, tf.broadcast_to(tf.cast(fallback, ids.dtype), tf.shape(ids)))

        return HashedFeatures(
            single_ids=keep(hashed.single_ids, self._single_offsets[tf.newaxis, :]),
            multi_ids=tuple(
                keep(ids, off)
                for ids, off in zip(hashed.multi_ids, self._multi_offsets, strict=True)
            ),
            multi_weights=hashed.multi_weights,
        )

    def call(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        return self.logits_and_rows(features)[0]

    def logits_and_rows(self, features: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """Logits ``[B]`` and the looked-up rows ``[B, F, 1+dim]`` (for the L2 penalty)."""
        rows = self.field_rows(features)
        return self.logits_of(rows), rows

    def logits_of(self, rows: tf.Tensor) -> tf.Tensor:
        """Logits ``[B]`` from the rows ``field_rows`` (or ``rows_of``) looked up."""
        logit = self.bias + tf.reduce_sum(rows[:, :, 0], axis=1)
        if self.dim:
            v = rows[:, :, 1:]
            square_of_sum = tf.square(tf.reduce_sum(v, axis=1))
            sum_of_square = tf.reduce_sum(tf.square(v), axis=1)
            logit += 0.5 * tf.reduce_sum(square_of_sum - sum_of_square, axis=1)
        if self.hidden:
            h = tf.reshape(v, [-1, self.num_fields * self.dim])
            for layer in self.mlp:
                h = layer(h)
            logit += tf.squeeze(self.mlp_out(h), axis=1)
        return logit

    def predict_proba(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        return tf.sigmoid(self(features))

    def get_config(self) -> dict[str, Any]:
        return {
            "schema": self.schema.to_dict(),
            "kind": self.kind,
            "dim": self.dim,
            "hidden": list(self.hidden),
            "seed": self.seed,
            "name": self.name,
        }

    def describe(self) -> dict[str, Any]:
        """Architecture summary stored in the export's metadata."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "hidden": list(self.hidden),
            "table_rows": self.schema.total_buckets,
            "parameters": int(sum(int(tf.size(v)) for v in self.trainable_variables)),
        }


def serving_input_signature(schema: Schema) -> dict[str, tf.TensorSpec]:
    """The exported signature's inputs: one string tensor per field + ``request_index``."""
    spec: dict[str, tf.TensorSpec] = {}
    for f in schema.fields:
        shape = [None, None] if f.is_multi else [None]
        spec[f.name] = tf.TensorSpec(shape, tf.string, name=f.name)
    spec["request_index"] = tf.TensorSpec([None], tf.int32, name="request_index")
    return spec
