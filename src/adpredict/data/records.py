"""The training data format: a directory of TFRecord shards plus a manifest.

Layout of a data set directory::

    DIR/manifest.json            format, schema, row counts, provenance
    DIR/part-00000.tfrecord      one ``tf.train.Example`` per impression
    DIR/part-00001.tfrecord      ...

Each example holds one ``bytes_list`` per schema field (absent = missing; several values
for multi-valued fields), ``label`` (int64, 0 or 1) and, for synthetic data,
``true_ctr`` (float, the click probability the row's label was drawn from).

``DatasetWriter`` writes into a hidden temporary directory next to ``DIR`` and renames it
into place only when every shard and the manifest are complete, so a crash or a bad
input row never leaves a half-written data set behind. ``make_dataset`` reads shards with
``tf.data``: parallel interleave over files, batch first, then vectorised
``parse_example`` on parallel threads, then prefetch, so the model and not the input
pipeline is the bottleneck.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adpredict.errors import DataError, SchemaError
from adpredict.schema import Schema

MANIFEST = "manifest.json"
FORMAT = "adpredict-tfrecord"
FORMAT_VERSION = 1
LABEL = "label"
TRUE_CTR = "true_ctr"
DEFAULT_ROWS_PER_SHARD = 100_000


@dataclass(frozen=True)
class DatasetInfo:
    """What a data set's manifest says about it."""

    path: Path
    schema: Schema
    rows: int
    shards: tuple[tuple[str, int], ...]
    has_true_ctr: bool
    created: str
    source: str

    @property
    def files(self) -> list[str]:
        return [str(self.path / name) for name, _ in self.shards]


def read_manifest(data_dir: str | Path) -> DatasetInfo:
    """Open a data set directory; every problem is a ``DataError`` naming the path."""
    path = Path(data_dir)
    if not path.exists():
        raise DataError(f"data directory {path} does not exist")
    if not path.is_dir():
        raise DataError(f"data directory {path} is not a directory")
    manifest = path / MANIFEST
    if not manifest.is_file():
        hint = " (it is empty)" if not any(path.iterdir()) else ""
        raise DataError(
            f"{path}{hint}: no {MANIFEST}; create a data set with 'adpredict synth' "
            "or 'adpredict convert'"
        )
    try:
        raw = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{manifest}: unreadable manifest: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"{manifest}: not an adpredict data set manifest")
    if raw.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{manifest}: format_version {raw.get('format_version')!r} is not supported "
            f"(this adpredict reads {FORMAT_VERSION})"
        )
    try:
        schema = Schema.from_dict(raw["schema"], source=f"{manifest} schema")
        shards = tuple((str(s["file"]), int(s["rows"])) for s in raw["shards"])
        rows = int(raw["rows"])
    except SchemaError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{manifest}: malformed manifest ({exc!r})") from None
    if not shards or rows <= 0:
        raise DataError(f"{path}: the data set has no rows")
    for name, _ in shards:
        shard = path / name
        if "/" in name or name.startswith(".") or not shard.is_file():
            raise DataError(f"{path}: shard {name!r} listed in {MANIFEST} is missing")
    if rows != sum(r for _, r in shards):
        raise DataError(
            f"{manifest}: 'rows' is {rows} but the shards hold {sum(r for _, r in shards)}"
        )
    return DatasetInfo(
        path=path,
        schema=schema,
        rows=rows,
        shards=shards,
        has_true_ctr=bool(raw.get("has_true_ctr", False)),
        created=str(raw.get("created", "")),
        source=str(raw.get("source", "")),
    )


class DatasetWriter:
    """Writes rows into shards; ``close()`` publishes the directory atomically.

    Use as a context manager: on an exception nothing is published and the temporary
    directory is removed. ``out_dir`` must not exist, or be an empty directory.
    """

    def __init__(
        self,
        out_dir: str | Path,
        schema: Schema,
        *,
        rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
        has_true_ctr: bool = False,
        source: str = "",
    ) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and (not self.out_dir.is_dir() or any(self.out_dir.iterdir())):
            raise DataError(f"output directory {self.out_dir} already exists and is not empty")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.has_true_ctr = has_true_ctr
        self.source = source
        self._tmp = Path(
            tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent)
        )
        self._shards: list[tuple[str, int]] = []
        self._writer: Any = None
        self._in_shard = 0
        self.rows = 0
        self._closed = False
        from tensorflow.core.example import example_pb2  # protobuf only; cheap

        self._example_cls = example_pb2.Example

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _next_shard(self) -> None:
        import tensorflow as tf

        if self._writer is not None:
            self._writer.close()
        name = f"part-{len(self._shards):05d}.tfrecord"
        self._writer = tf.io.TFRecordWriter(str(self._tmp / name))
        self._shards.append((name, 0))
        self._in_shard = 0

    def write_columns(
        self,
        columns: Mapping[str, Sequence[Any]],
        labels: Sequence[int] | np.ndarray,
        true_ctr: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        """Append a block of rows given column-wise.

        ``columns[name][i]`` is a string for single-valued fields ('' = missing) and a
        sequence of strings for multi-valued ones. Fields absent from ``columns`` are
        missing in every row of the block.
        """
        n = len(labels)
        if self.has_true_ctr and true_ctr is None:
            raise ValueError("this data set records true_ctr; pass it for every block")
        for name, col in columns.items():
            if name not in self.schema:
                raise DataError(f"column {name!r} is not a field of schema {self.schema.name!r}")
            if len(col) != n:
                raise ValueError(f"column {name!r} has {len(col)} rows, labels have {n}")
        multi = {f.name for f in self.schema.fields if f.is_multi}
        items = list(columns.items())
        labels_arr = np.asarray(labels)
        bad = np.flatnonzero((labels_arr != 0) & (labels_arr != 1))
        if bad.size:
            raise DataError(
                f"row {self.rows + int(bad[0]) + 1}: label {labels_arr[bad[0]].item()!r} is not 0 or 1"
            )
        for i in range(n):
            ex = self._example_cls()
            fmap = ex.features.feature
            for name, col in items:
                value = col[i]
                if name in multi:
                    vals = [v.encode() if isinstance(v, str) else v for v in value if v]
                    if vals:
                        fmap[name].bytes_list.value.extend(vals)
                elif value:
                    fmap[name].bytes_list.value.append(
                        value.encode() if isinstance(value, str) else value
                    )
            fmap[LABEL].int64_list.value.append(int(labels_arr[i]))
            if true_ctr is not None:
                fmap[TRUE_CTR].float_list.value.append(float(true_ctr[i]))
            self.write_serialized(ex.SerializeToString())

    def write_serialized(self, record: bytes) -> None:
        """Append one already-serialized ``tf.train.Example``."""
        if self._writer is None or self._in_shard >= self.rows_per_shard:
            self._next_shard()
        self._writer.write(record)
        self._in_shard += 1
        name, _ = self._shards[-1]
        self._shards[-1] = (name, self._in_shard)
        self.rows += 1

    def close(self) -> DatasetInfo:
        """Finish the last shard, write the manifest and rename the directory into place."""
        if self._closed:
            raise RuntimeError("DatasetWriter is already closed")
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.rows == 0:
            self.abort()
            raise DataError(f"no rows were written for {self.out_dir}")
        created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "schema": self.schema.to_dict(),
            "rows": self.rows,
            "shards": [{"file": name, "rows": rows} for name, rows in self._shards],
            "has_true_ctr": self.has_true_ctr,
            "created": created,
            "source": self.source,
        }
        (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if self.out_dir.exists():
            self.out_dir.rmdir()  # checked empty in __init__
        os.rename(self._tmp, self.out_dir)
        self._closed = True
        return read_manifest(self.out_dir)

    def abort(self) -> None:
        """Discard everything written so far."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._closed = True


def feature_spec(schema: Schema, *, with_true_ctr: bool = False) -> dict[str, Any]:
    """The ``tf.io.parse_example`` spec for a schema's records."""
    import tensorflow as tf

    spec: dict[str, Any] = {}
    for f in schema.fields:
        if f.is_multi:
            spec[f.name] = tf.io.VarLenFeature(tf.string)
        else:
            spec[f.name] = tf.io.FixedLenFeature([], tf.string, default_value="")
    spec[LABEL] = tf.io.FixedLenFeature([], tf.int64)
    if with_true_ctr:
        spec[TRUE_CTR] = tf.io.FixedLenFeature([], tf.float32, default_value=-1.0)
    return spec


def parse_batch(serialized: Any, schema: Schema, *, with_true_ctr: bool = False) -> dict[str, Any]:
    """Parse a batch of serialized examples into the model's raw-feature dict.

    Multi-valued fields become dense ``[batch, <= max_values]`` string tensors padded with
    ''. ``request_index`` is ``range(batch)``: in training every row is its own request.
    ``label`` values other than 0 and 1 fail the pipeline with an InvalidArgumentError.
    """
    import tensorflow as tf

    parsed = tf.io.parse_example(serialized, feature_spec(schema, with_true_ctr=with_true_ctr))
    out: dict[str, Any] = {}
    for f in schema.fields:
        value = parsed[f.name]
        if f.is_multi:
            value = tf.sparse.to_dense(value, default_value="")[:, : f.max_values]
        out[f.name] = value
    label = parsed[LABEL]
    tf.debugging.Assert(
        tf.reduce_all((label == 0) | (label == 1)),
        ["label must be 0 or 1; got", tf.boolean_mask(label, (label != 0) & (label != 1))[:5]],
    )
    out[LABEL] = tf.cast(label, tf.float32)
    if with_true_ctr:
        out[TRUE_CTR] = parsed[TRUE_CTR]
    out["request_index"] = tf.range(tf.shape(label)[0], dtype=tf.int32)
    return out


#: Records are read in groups of this many; shuffling and hold-out work on whole groups,
#: which keeps tf.data's per-element cost off every single record.
GROUP_RECORDS = 64


def holdout_rows(shard_rows: int, holdout_every: int) -> int:
    """How many of a shard's records ``make_dataset`` holds out."""
    groups = -(-shard_rows // GROUP_RECORDS)
    return sum(
        min(GROUP_RECORDS, shard_rows - g * GROUP_RECORDS) for g in range(0, groups, holdout_every)
    )


def make_dataset(
    files: Sequence[str],
    schema: Schema,
    batch_size: int,
    *,
    holdout_every: int = 0,
    holdout: bool = False,
    shuffle_buffer: int = 0,
    seed: int = 0,
    with_true_ctr: bool = False,
    drop_remainder: bool = False,
    input_threads: int | None = None,
) -> Any:
    """A ``tf.data.Dataset`` of parsed batches from TFRecord shards.

    The pipeline runs on its own pool of ``input_threads`` threads (default: a quarter of
    the cores, at least 1) so that it does not compete with the training step for every
    core: on 2 cores, tf.data's default pool cost training 31% of its examples/s against
    in-memory batches, one input thread 22.5% (``benchmarks/bench_optimizers.py``).

    Shards are read in parallel (interleave) in groups of ``GROUP_RECORDS`` records.
    With ``holdout_every = k > 0`` every k-th group of each shard is the held-out split:
    ``holdout=False`` yields the rest, ``holdout=True`` only those. ``shuffle_buffer``
    (in records) shuffles groups across shards; parsing runs vectorised on whole batches
    on parallel threads, with prefetch.
    """
    import tensorflow as tf

    if not files:
        raise DataError("no shards to read")

    def per_file(path: Any) -> Any:
        ds = tf.data.TFRecordDataset(path, buffer_size=1 << 20).batch(GROUP_RECORDS)
        if holdout_every > 0:
            k = tf.constant(holdout_every, tf.int64)
            ds = ds.enumerate().filter(lambda i, _: tf.equal(tf.equal(i % k, 0), holdout))
            ds = ds.map(lambda _, group: group)
        return ds

    files_ds = tf.data.Dataset.from_tensor_slices(list(files))
    if shuffle_buffer:
        files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = files_ds.interleave(
        per_file,
        cycle_length=min(len(files), 4),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=not shuffle_buffer,
    )
    if shuffle_buffer:
        groups = max(1, shuffle_buffer // GROUP_RECORDS)
        ds = ds.shuffle(groups, seed=seed, reshuffle_each_iteration=True)
    ds = ds.rebatch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(
        lambda s: parse_batch(s, schema, with_true_ctr=with_true_ctr),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    options = tf.data.Options()
    options.threading.private_threadpool_size = input_threads or max(1, (os.cpu_count() or 2) // 4)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def find_corrupt_shard(files: Sequence[str]) -> str | None:
    """Read every shard record by record and name the first that fails (slow; error path)."""
    import tensorflow as tf

    for path in files:
        try:
            for _ in tf.data.TFRecordDataset(path):
                pass
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError):
            return path
    return None
