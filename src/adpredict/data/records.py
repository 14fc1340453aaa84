"""The training data format: a directory of TFRecord shards plus a manifest.

Layout of a data set directory::

    DIR/manifest.json            format, version, layout, schema, row counts, provenance
    DIR/part-00000.tfrecord      block records of up to 64 rows each
    DIR/part-00001.tfrecord      ...

Format 2 (``layout: "blocks"``, written since this version) stores a block of up to
``BLOCK_ROWS`` = 64 consecutive rows per ``tf.train.Example``, column-wise, in 64 slots:
``block/rows`` (int64, the real rows; the last block of a shard may be short, its spare
slots are padding), one ``bytes_list`` of 64 values per single-valued field (b'' =
missing), for each multi-valued field the rows' values concatenated plus
``FIELD/counts`` (64 int64 counts), ``label`` (64 int64, 0 or 1) and, for synthetic data,
``true_ctr`` (64 floats, the click probability each row's label was drawn from).
Format 1 (``layout: "rows"``) stored one example per row; such data sets still read.

Why blocks: parsing one example per row, each with 20 features, was the input
pipeline's main cost. With blocks the per-feature overhead is paid once per 64 rows,
and fixed 64-slot lists parse as fixed-length features, 4x cheaper than variable-length
ones. Measured on the 2-core development machine (1M synthetic ``rtb`` rows, batch 1024,
``benchmarks/bench_optimizers.py``) the pipeline's CPU fell from 4.9 to 1.7 CPU-µs per
row (0.5 µs of that from fixed tf.data parallelism instead of autotuning) and the data
set from 581 to 200 MB. What the pipeline costs LazyAdam DeepFM training (TFRecord vs the
same batches held in memory), on a machine shared with other jobs: format 1, 19% (median
of 10 interleaved 100-step pairs, load 3; whole epochs 17.5% and 27%); format 2, 9.1%
(median of 64 pairs over 5 runs, interquartile range 5.9-13.3%, load 1.5-4) and 9.5% in
whole epochs (median of 8 pairs); in the quietest run 5.8% (whole epochs) and 9.4%
(interleaved). That meets the 10% target by the medians, with little margin.

``DatasetWriter`` writes into a hidden temporary directory next to ``DIR`` and renames it
into place only when every shard and the manifest are complete, so a crash or a bad
input row never leaves a half-written data set behind. ``make_dataset`` reads shards with
``tf.data``: parallel interleave over files, hold-out and shuffle of whole blocks,
batches of whole blocks, vectorised ``parse_example`` on its own thread, prefetch.
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
FORMAT_VERSION = 2
#: Versions ``read_manifest`` accepts: 1 = one record per row, 2 = one record per block.
READABLE_VERSIONS = (1, 2)
#: Rows per block record (format 2), and per group of records (format 1): the unit of
#: shuffling and of the hold-out split.
BLOCK_ROWS = 64
GROUP_RECORDS = BLOCK_ROWS  # format 1's name for the same unit
LAYOUTS = {1: "rows", 2: "blocks"}
LABEL = "label"
TRUE_CTR = "true_ctr"
PREFETCH_BATCHES = 2  # parsed batches ready ahead of the trainer
ROWS = "block/rows"  # format 2: a block's real rows ('/' cannot be in a field name)
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
    format_version: int = FORMAT_VERSION

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
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise DataError(
            f"{manifest}: format_version {version!r} is not supported "
            f"(this adpredict reads {', '.join(map(str, READABLE_VERSIONS))})"
        )
    if raw.get("layout", LAYOUTS[version]) != LAYOUTS[version]:
        raise DataError(
            f"{manifest}: layout {raw.get('layout')!r} does not match format_version {version} "
            f"(expected {LAYOUTS[version]!r})"
        )
    if raw.get("block_rows", BLOCK_ROWS) != BLOCK_ROWS:
        raise DataError(
            f"{manifest}: block_rows {raw.get('block_rows')!r} is not supported "
            f"(this adpredict reads blocks of {BLOCK_ROWS} rows)"
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
        format_version=version,
    )


class DatasetWriter:
    """Writes rows into shards of block records; ``close()`` publishes the directory atomically.

    Rows are buffered and written as blocks of ``BLOCK_ROWS`` rows, whatever the sizes of
    the ``write_columns`` calls; only the last block of each shard may be shorter, so
    ``holdout_rows`` is exact. Use as a context manager: on an exception nothing is
    published and the temporary directory is removed. ``out_dir`` must not exist, or be an
    empty directory.
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
        self.rows = 0  # rows accepted (written or buffered)
        self._closed = False
        # Rows accepted but not yet written: one list per field, labels, true CTRs.
        self._pending: dict[str, list[Any]] = {f.name: [] for f in schema.fields}
        self._pending_labels: list[int] = []
        self._pending_ctr: list[float] = []

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
        """Append rows given column-wise.

        ``columns[name][i]`` is a string (or bytes) for single-valued fields ('' = missing)
        and a sequence of strings for multi-valued ones (empty strings are dropped).
        Fields absent from ``columns`` are missing in every row. A label other than 0 or 1
        is a ``DataError`` naming the row, and nothing of the call is kept.
        """
        n = len(labels)
        if self.has_true_ctr and true_ctr is None:
            raise ValueError("this data set records true_ctr; pass it for every block")
        if true_ctr is not None and len(true_ctr) != n:
            raise ValueError(f"true_ctr has {len(true_ctr)} rows, labels have {n}")
        for name, col in columns.items():
            if name not in self.schema:
                raise DataError(f"column {name!r} is not a field of schema {self.schema.name!r}")
            if len(col) != n:
                raise ValueError(f"column {name!r} has {len(col)} rows, labels have {n}")
        labels_arr = np.asarray(labels)
        bad = np.flatnonzero((labels_arr != 0) & (labels_arr != 1))
        if bad.size:
            raise DataError(
                f"row {self.rows + int(bad[0]) + 1}: label {labels_arr[bad[0]].item()!r} is not 0 or 1"
            )
        converted: dict[str, list[Any]] = {}  # all or nothing: convert, then append
        for f in self.schema.fields:
            col = columns.get(f.name)
            if col is None:
                converted[f.name] = [[] for _ in range(n)] if f.is_multi else [b""] * n
            elif f.is_multi:
                converted[f.name] = [[_to_bytes(f.name, v) for v in row if v] for row in col]
            else:
                converted[f.name] = [_to_bytes(f.name, v) if v else b"" for v in col]
        ctr = [float(v) for v in true_ctr] if true_ctr is not None and self.has_true_ctr else []
        for name, values in converted.items():
            self._pending[name].extend(values)
        self._pending_labels.extend(int(v) for v in labels_arr)
        self._pending_ctr.extend(ctr)
        self.rows += n
        self._flush(final=False)

    def _room(self) -> int:
        """Rows the next block may hold: a full block, or what is left of the shard."""
        if self._writer is None or self._in_shard >= self.rows_per_shard:
            return min(BLOCK_ROWS, self.rows_per_shard)
        return min(BLOCK_ROWS, self.rows_per_shard - self._in_shard)

    def _flush(self, *, final: bool) -> None:
        """Write pending rows as blocks; a short last block only when ``final``."""
        start = 0
        available = len(self._pending_labels)
        while available - start >= self._room() or (final and start < available):
            size = min(self._room(), available - start)
            self._write_block(start, start + size)
            start += size
        if start:
            for col in self._pending.values():
                del col[:start]
            del self._pending_labels[:start]
            del self._pending_ctr[:start]

    def _write_block(self, lo: int, hi: int) -> None:
        record = encode_block(
            self.schema,
            {name: values[lo:hi] for name, values in self._pending.items()},
            self._pending_labels[lo:hi],
            self._pending_ctr[lo:hi] if self.has_true_ctr else None,
        )
        if self._writer is None or self._in_shard >= self.rows_per_shard:
            self._next_shard()
        self._writer.write(record)
        self._in_shard += hi - lo
        name, _ = self._shards[-1]
        self._shards[-1] = (name, self._in_shard)

    def close(self) -> DatasetInfo:
        """Write the buffered rows, the manifest, and rename the directory into place."""
        if self._closed:
            raise RuntimeError("DatasetWriter is already closed")
        if self.rows == 0:
            self.abort()
            raise DataError(f"no rows were written for {self.out_dir}")
        self._flush(final=True)
        self._writer.close()
        self._writer = None
        created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "layout": LAYOUTS[FORMAT_VERSION],
            "block_rows": BLOCK_ROWS,
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


def encode_block(
    schema: Schema,
    columns: Mapping[str, Sequence[Any]],
    labels: Sequence[int],
    true_ctr: Sequence[float] | None = None,
) -> bytes:
    """One serialized block record (format 2) of 1..``BLOCK_ROWS`` rows, unchecked.

    ``columns`` has every schema field: per row, bytes for a single-valued field
    (b'' = missing) and a list of bytes for a multi-valued one. The record always holds
    ``BLOCK_ROWS`` slots so that it parses as fixed-length features (4x cheaper than
    variable-length ones): ``rows`` (int64) says how many are real, the rest are padding
    (b'', no values, label 0, true_ctr -1). Each single-valued field is one ``bytes_list``
    of ``BLOCK_ROWS`` values; a multi-valued field is the rows' values concatenated plus
    ``counts_key(name)``, an ``int64_list`` of ``BLOCK_ROWS`` counts; ``label`` and
    ``true_ctr`` have ``BLOCK_ROWS`` values. Labels are not checked here
    (``DatasetWriter.write_columns`` does), so tests can make bad data with it.
    """
    from tensorflow.core.example import example_pb2  # protobuf only; cheap

    n = len(labels)
    if not 1 <= n <= BLOCK_ROWS:
        raise ValueError(f"a block holds 1..{BLOCK_ROWS} rows, got {n}")
    pad = BLOCK_ROWS - n
    ex = example_pb2.Example()
    fmap = ex.features.feature
    fmap[ROWS].int64_list.value.append(n)
    for f in schema.fields:
        values = columns[f.name]
        if f.is_multi:
            fmap[f.name].bytes_list.value.extend(v for row in values for v in row)
            counts = fmap[counts_key(f.name)].int64_list.value
            counts.extend(len(row) for row in values)
            counts.extend([0] * pad)
        else:
            fmap[f.name].bytes_list.value.extend(values)
            fmap[f.name].bytes_list.value.extend([b""] * pad)
    fmap[LABEL].int64_list.value.extend(labels)
    fmap[LABEL].int64_list.value.extend([0] * pad)
    if true_ctr is not None:
        fmap[TRUE_CTR].float_list.value.extend(true_ctr)
        fmap[TRUE_CTR].float_list.value.extend([-1.0] * pad)
    return ex.SerializeToString()


def _to_bytes(field: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    raise DataError(f"field {field!r}: value {value!r} is not a string")


def counts_key(field: str) -> str:
    """The block record key of a multi-valued field's per-row value counts."""
    return f"{field}/counts"


def feature_spec(
    schema: Schema, *, with_true_ctr: bool = False, format_version: int = FORMAT_VERSION
) -> dict[str, Any]:
    """The ``tf.io.parse_example`` spec for a schema's records in a format version."""
    import tensorflow as tf

    spec: dict[str, Any] = {}
    if format_version == 1:
        for f in schema.fields:
            if f.is_multi:
                spec[f.name] = tf.io.VarLenFeature(tf.string)
            else:
                spec[f.name] = tf.io.FixedLenFeature([], tf.string, default_value="")
        spec[LABEL] = tf.io.FixedLenFeature([], tf.int64)
        if with_true_ctr:
            spec[TRUE_CTR] = tf.io.FixedLenFeature([], tf.float32, default_value=-1.0)
        return spec
    _check_version(format_version)
    slots = [BLOCK_ROWS]
    spec[ROWS] = tf.io.FixedLenFeature([], tf.int64)
    for f in schema.fields:
        if f.is_multi:
            spec[f.name] = tf.io.RaggedFeature(tf.string, row_splits_dtype=tf.int32)
            spec[counts_key(f.name)] = tf.io.FixedLenFeature(slots, tf.int64)
        else:
            spec[f.name] = tf.io.FixedLenFeature(slots, tf.string)
    spec[LABEL] = tf.io.FixedLenFeature(slots, tf.int64)
    if with_true_ctr:
        spec[TRUE_CTR] = tf.io.FixedLenFeature(slots, tf.float32, default_value=[-1.0] * BLOCK_ROWS)
    return spec


def _check_version(format_version: int) -> None:
    if format_version not in READABLE_VERSIONS:
        raise DataError(
            f"format_version {format_version!r} is not supported "
            f"(this adpredict reads {', '.join(map(str, READABLE_VERSIONS))})"
        )


def parse_batch(
    serialized: Any,
    schema: Schema,
    *,
    with_true_ctr: bool = False,
    format_version: int = FORMAT_VERSION,
) -> dict[str, Any]:
    """Parse a batch of serialized records into the model's raw-feature dict.

    ``serialized`` holds block records (format 2; the rows of all blocks, in order) or
    one record per row (format 1). Single-valued fields become ``[rows]`` strings,
    multi-valued fields dense ``[rows, <= max_values]`` strings padded with ''.
    ``request_index`` is ``range(rows)``: in training every row is its own request.
    ``true_ctr`` is -1 where the data has none. ``label`` values other than 0 and 1
    fail the pipeline with an InvalidArgumentError ("label must be 0 or 1"), and so do
    block records without ``BLOCK_ROWS`` slots per field ("... values != expected", "...
    is required") or whose row count or value counts are wrong ("malformed block
    record").
    """
    import tensorflow as tf

    spec = feature_spec(schema, with_true_ctr=with_true_ctr, format_version=format_version)
    parsed = tf.io.parse_example(serialized, spec)
    out: dict[str, Any] = {}
    if format_version == 1:
        for f in schema.fields:
            value = parsed[f.name]
            if f.is_multi:
                value = tf.sparse.to_dense(value, default_value="")[:, : f.max_values]
            out[f.name] = value
        label = parsed[LABEL]
        if with_true_ctr:
            out[TRUE_CTR] = parsed[TRUE_CTR]
    else:
        out, label = _unpack_blocks(parsed, schema, with_true_ctr)
    tf.debugging.Assert(
        tf.reduce_all((label == 0) | (label == 1)),
        ["label must be 0 or 1; got", tf.boolean_mask(label, (label != 0) & (label != 1))[:5]],
    )
    out[LABEL] = tf.cast(label, tf.float32)
    out["request_index"] = tf.range(tf.shape(label)[0], dtype=tf.int32)
    return out


def _unpack_blocks(
    parsed: dict[str, Any], schema: Schema, with_true_ctr: bool
) -> tuple[dict[str, Any], Any]:
    """Block slots -> rows: flatten ``[blocks, BLOCK_ROWS]``, then drop padding slots.

    Only a batch holding a short block (a shard's last) pays for the masking.
    """
    import tensorflow as tf

    rows = parsed[ROWS]
    multi = [f for f in schema.fields if f.is_multi]
    ok = tf.reduce_all((rows >= 1) & (rows <= BLOCK_ROWS))
    for f in multi:  # each multi-valued field holds as many values as its counts say
        counts = parsed[counts_key(f.name)]
        ok &= tf.reduce_all(counts >= 0) & tf.equal(
            tf.size(parsed[f.name].flat_values, tf.int64), tf.reduce_sum(counts)
        )
    check = tf.debugging.Assert(
        ok, ["malformed block record: row count or value counts out of range"]
    )
    with tf.control_dependencies([check]):
        slots: dict[str, Any] = {}
        for f in schema.fields:
            if f.is_multi:
                counts = tf.reshape(parsed[counts_key(f.name)], [-1])
                ragged = tf.RaggedTensor.from_row_lengths(
                    parsed[f.name].flat_values, counts, validate=False
                )
                slots[f.name] = ragged.to_tensor(default_value="")[:, : f.max_values]
            else:
                slots[f.name] = tf.reshape(parsed[f.name], [-1])
        slots[LABEL] = tf.reshape(parsed[LABEL], [-1])
        if with_true_ctr:
            slots[TRUE_CTR] = tf.reshape(parsed[TRUE_CTR], [-1])

    def drop_padding() -> dict[str, Any]:
        keep = tf.reshape(tf.sequence_mask(rows, BLOCK_ROWS), [-1])
        return {key: tf.boolean_mask(value, keep) for key, value in slots.items()}

    out = tf.cond(tf.reduce_all(rows == BLOCK_ROWS), lambda: dict(slots), drop_padding)
    label = out.pop(LABEL)
    return out, label


def holdout_rows(shard_rows: int, holdout_every: int) -> int:
    """How many of a shard's rows ``make_dataset`` holds out (every k-th block from the first)."""
    blocks = -(-shard_rows // BLOCK_ROWS)
    return sum(
        min(BLOCK_ROWS, shard_rows - b * BLOCK_ROWS) for b in range(0, blocks, holdout_every)
    )


def training_batches(
    shard_rows: Sequence[int], batch_size: int, holdout_every: int, format_version: int
) -> int:
    """How many batches ``make_dataset(..., holdout_every=k, holdout=False)`` yields."""
    if format_version == 1:
        held = [holdout_rows(r, holdout_every) if holdout_every > 0 else 0 for r in shard_rows]
        return -(-(sum(shard_rows) - sum(held)) // batch_size)
    blocks = 0
    for r in shard_rows:
        n = -(-r // BLOCK_ROWS)
        blocks += n - (-(-n // holdout_every) if holdout_every > 0 else 0)
    return -(-blocks // blocks_per_batch(batch_size))


def blocks_per_batch(batch_size: int) -> int:
    """Block records per batch in format 2: ``ceil(batch_size / BLOCK_ROWS)``."""
    return max(1, -(-batch_size // BLOCK_ROWS))


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
    format_version: int = FORMAT_VERSION,
) -> Any:
    """A ``tf.data.Dataset`` of parsed batches from TFRecord shards.

    Shards are read in parallel (interleave) in units of ``BLOCK_ROWS`` rows: one block
    record (format 2) or a group of that many row records (format 1). With
    ``holdout_every = k > 0`` every k-th unit of each shard, from the first, is the
    held-out split: ``holdout=False`` yields the rest, ``holdout=True`` only those
    (``holdout_rows`` counts them exactly). ``shuffle_buffer`` (in rows) shuffles units
    across shards. Parsing runs vectorised on whole batches, with prefetch.

    Format 2 batches hold whole blocks: ``blocks_per_batch(batch_size)`` of them, so a
    batch has ``batch_size`` rows when that is a multiple of ``BLOCK_ROWS``, fewer when it
    holds a shard's short last block or is the last batch (``training_batches`` counts
    the batches). Format 1 batches have exactly ``batch_size`` rows except the last.

    The pipeline runs on its own pool of ``input_threads`` threads (default: a quarter of
    the cores, at least 1) so that it does not compete with the training step for every
    core, with fixed parallelism (no autotuning) and ``PREFETCH_BATCHES`` batches ahead.
    """
    import tensorflow as tf

    if not files:
        raise DataError("no shards to read")
    _check_version(format_version)
    v1 = format_version == 1
    threads = input_threads or max(1, (os.cpu_count() or 2) // 4)
    cycle = min(len(files), 4)

    def per_file(path: Any) -> Any:
        ds = tf.data.TFRecordDataset(path, buffer_size=1 << 20)
        if v1:
            ds = ds.batch(GROUP_RECORDS)
        if holdout_every > 0:
            k = tf.constant(holdout_every, tf.int64)
            ds = ds.enumerate().filter(lambda i, _: tf.equal(tf.equal(i % k, 0), holdout))
            ds = ds.map(lambda _, unit: unit)
        return ds

    files_ds = tf.data.Dataset.from_tensor_slices(list(files))
    if shuffle_buffer:
        files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = files_ds.interleave(
        per_file,
        cycle_length=cycle,
        num_parallel_calls=cycle,
        deterministic=not shuffle_buffer,
    )
    if shuffle_buffer:
        units = max(1, shuffle_buffer // BLOCK_ROWS)
        ds = ds.shuffle(units, seed=seed, reshuffle_each_iteration=True)
    if v1:
        ds = ds.rebatch(batch_size, drop_remainder=drop_remainder)
    else:
        ds = ds.batch(blocks_per_batch(batch_size), drop_remainder=drop_remainder)
    ds = ds.map(
        lambda s: parse_batch(
            s, schema, with_true_ctr=with_true_ctr, format_version=format_version
        ),
        num_parallel_calls=threads,
    )
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    # Fixed parallelism and buffers: tf.data's autotuner cost 0.5 CPU-ms per batch of
    # 1024 rows here (a quarter of the pipeline) and found nothing better.
    options.autotune.enabled = False
    return ds.prefetch(PREFETCH_BATCHES).with_options(options)


def find_bad_label(
    files: Sequence[str], format_version: int = FORMAT_VERSION
) -> tuple[str, int, int] | None:
    """The first label other than 0 or 1: (shard, row within it from 1, value); slow, error path.

    Shards that cannot be parsed are skipped (``find_corrupt_shard`` names those).
    """
    import tensorflow as tf

    if format_version == 1:
        spec = {LABEL: tf.io.FixedLenFeature([], tf.int64)}
    else:
        spec = {LABEL: tf.io.RaggedFeature(tf.int64, row_splits_dtype=tf.int32)}
    for path in files:
        row = 0
        try:
            for batch in tf.data.TFRecordDataset(path).batch(1024):
                parsed = tf.io.parse_example(batch, spec)[LABEL]
                flat = (parsed if format_version == 1 else parsed.flat_values).numpy()
                bad = np.flatnonzero((flat != 0) & (flat != 1))
                if bad.size:
                    return path, row + int(bad[0]) + 1, int(flat[bad[0]])
                row += flat.size
        except tf.errors.OpError:
            continue
    return None


def find_unparseable_shard(
    files: Sequence[str], schema: Schema, format_version: int = FORMAT_VERSION
) -> tuple[str, str] | None:
    """The first shard whose records do not parse into rows, and why (slow; error path).

    Bad labels do not count here (``find_bad_label`` finds those).
    """
    import tensorflow as tf

    for path in files:
        try:
            for _ in make_dataset([path], schema, 1024, format_version=format_version):
                pass
        except tf.errors.InvalidArgumentError as exc:
            if "label must be 0 or 1" not in exc.message:
                return path, exc.message.strip().splitlines()[0]
        except tf.errors.OpError:
            continue
    return None


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
