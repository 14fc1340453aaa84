"""Raw string features -> rows of the model's single shared weight table, inside the graph.

The same ``FeatureHasher`` runs in the training step and in the exported serving
signature, so training and serving cannot hash differently. Inputs (all strings):

- a context field: ``[R]`` (one value per request) or ``[R, M]`` if multi-valued;
- a candidate field: ``[B]`` or ``[B, M]`` (one row per candidate ad);
- ``request_index``: ``[B]`` int32, the request each candidate belongs to.

Context fields are hashed once per request and then gathered per candidate, so a bid
request with 300 candidates hashes its 12 context strings once, not 300 times. In
training every row is its own request (``request_index = range(B)``).

Each field owns a contiguous range of the table (``Schema.offsets``); row 0 of a range is
the field's *missing* bucket: an empty string, an absent multi-valued list, or a
non-finite number. Categorical values hash with FarmHash fingerprint64
(``tf.strings.to_hash_bucket_fast``) into buckets ``1..buckets-1``; numeric values are
parsed and bucketized by the schema's boundaries into ``1..len(boundaries)+1``;
multi-valued fields average the rows of their non-empty values.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from adpredict.schema import Field, Schema

_HASH_SPACE = 1 << 62


@dataclass(frozen=True)
class HashedFeatures:
    """Table rows and their weights for a batch of B candidates.

    ``single_ids``: ``[B, S]`` rows of the S single-valued fields (schema order).
    ``multi_ids``/``multi_weights``: per multi-valued field, ``[B, M+1]`` rows and
    averaging weights (each row's weights sum to 1).
    """

    single_ids: tf.Tensor
    multi_ids: tuple[tf.Tensor, ...]
    multi_weights: tuple[tf.Tensor, ...]


class FeatureHasher:
    """Maps a dict of raw string tensors to table rows (see module docstring)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self._offsets = schema.offsets()
        self.single_fields = tuple(f for f in schema.fields if not f.is_multi)
        self.multi_fields = tuple(f for f in schema.fields if f.is_multi)
        #: Field order of the model's field axis: single-valued fields, then multi-valued.
        self.field_order = self.single_fields + self.multi_fields

    def _categorical(self, fields: tuple[Field, ...], features: dict[str, tf.Tensor]) -> tf.Tensor:
        """Hash several single-valued categorical fields of one scope with one op."""
        raw = tf.stack([features[f.name] for f in fields], axis=1)
        mod = tf.constant([f.buckets - 1 for f in fields], tf.int64)
        offset = tf.constant([self._offsets[f.name] for f in fields], tf.int64)
        hashed = tf.math.floormod(tf.strings.to_hash_bucket_fast(raw, _HASH_SPACE), mod) + 1
        return tf.where(tf.equal(raw, ""), tf.zeros_like(hashed), hashed) + offset

    def _numeric(self, f: Field, raw: tf.Tensor) -> tf.Tensor:
        missing = tf.equal(raw, "")
        value = tf.strings.to_number(tf.where(missing, "0", raw), tf.float32)
        ok = tf.logical_and(tf.logical_not(missing), tf.math.is_finite(value))
        value = tf.where(ok, value, tf.zeros_like(value))
        bucket = tf.cast(tf.raw_ops.Bucketize(input=value, boundaries=list(f.boundaries)), tf.int64)
        return tf.where(ok, bucket + 1, tf.zeros_like(bucket)) + self._offsets[f.name]

    def _multi(self, f: Field, raw: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        raw = tf.reshape(raw, [tf.shape(raw)[0], -1])[:, : f.max_values]
        # One extra '' column carries the missing bucket when a row has no values.
        raw = tf.pad(raw, [[0, 0], [0, 1]], constant_values="")
        valid = tf.not_equal(raw, "")
        hashed = tf.strings.to_hash_bucket_fast(raw, f.buckets - 1) + 1
        ids = tf.where(valid, hashed, tf.zeros_like(hashed)) + self._offsets[f.name]
        count = tf.reduce_sum(tf.cast(valid, tf.float32), axis=1, keepdims=True)
        weights = tf.where(valid, 1.0 / tf.maximum(count, 1.0), 0.0)
        empty_row = tf.cast(tf.equal(count, 0.0), tf.float32)
        last = tf.one_hot(tf.shape(raw)[1] - 1, tf.shape(raw)[1], dtype=tf.float32)
        return ids, weights + empty_row * last[tf.newaxis, :]

    def _scope(
        self, scope: str, features: dict[str, tf.Tensor]
    ) -> tuple[dict[str, tf.Tensor], dict[str, tuple[tf.Tensor, tf.Tensor]]]:
        single: dict[str, tf.Tensor] = {}
        multi: dict[str, tuple[tf.Tensor, tf.Tensor]] = {}
        cats = tuple(f for f in self.single_fields if f.scope == scope and not f.is_numeric)
        if cats:
            hashed = self._categorical(cats, features)
            for i, f in enumerate(cats):
                single[f.name] = hashed[:, i]
        for f in self.single_fields:
            if f.scope == scope and f.is_numeric:
                single[f.name] = self._numeric(f, features[f.name])
        for f in self.multi_fields:
            if f.scope == scope:
                multi[f.name] = self._multi(f, features[f.name])
        return single, multi

    def __call__(self, features: dict[str, tf.Tensor]) -> HashedFeatures:
        request_index = tf.convert_to_tensor(features["request_index"], tf.int32)
        ctx_single, ctx_multi = self._scope("context", features)
        cand_single, cand_multi = self._scope("candidate", features)
        for name, value in ctx_single.items():
            ctx_single[name] = tf.gather(value, request_index)
        for name, (ids, w) in ctx_multi.items():
            ctx_multi[name] = (tf.gather(ids, request_index), tf.gather(w, request_index))
        single = {**ctx_single, **cand_single}
        multi = {**ctx_multi, **cand_multi}
        single_ids = tf.stack([single[f.name] for f in self.single_fields], axis=1)
        return HashedFeatures(
            single_ids=single_ids,
            multi_ids=tuple(multi[f.name][0] for f in self.multi_fields),
            multi_weights=tuple(multi[f.name][1] for f in self.multi_fields),
        )
