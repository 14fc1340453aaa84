"""The TFRecord data set format: writer, manifest, reader, hold-out split (``data.records``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from adpredict.data import records
from adpredict.data.records import DatasetWriter, holdout_rows, make_dataset, read_manifest
from adpredict.errors import DataError
from adpredict.schema import Schema

SCHEMA = Schema.from_dict(
    {
        "name": "tiny",
        "version": 1,
        "fields": [
            {"name": "site", "scope": "context", "kind": "categorical", "buckets": 64},
            {
                "name": "segs",
                "scope": "context",
                "kind": "multi_categorical",
                "buckets": 64,
                "max_values": 3,
            },
            {"name": "ad", "scope": "candidate", "kind": "categorical", "buckets": 64},
            {"name": "bid", "scope": "candidate", "kind": "numeric", "boundaries": [1.0, 2.0]},
        ],
    }
)
ROWS_PER_SHARD = 300
ROWS = 730  # shards of 300, 300 and 130 rows
HOLDOUT_EVERY = 3


def make_rows(n: int, start: int = 0) -> tuple[dict[str, list[Any]], np.ndarray, np.ndarray]:
    """Columns where ``ad`` is a unique row id and every other value is derived from it."""
    ids = range(start, start + n)
    columns: dict[str, list[Any]] = {
        "site": ["" if i % 5 == 0 else f"site{i % 7}" for i in ids],
        "segs": [[f"s{i}-{j}" for j in range(i % 4)] for i in ids],  # 0..3 values
        "ad": [f"ad{i}" for i in ids],
        "bid": ["" if i % 6 == 0 else f"{i / 100:.2f}" for i in ids],
    }
    labels = np.array([int(i % 3 == 0) for i in ids], np.int64)
    true_ctr = np.array([(i % 97 + 1) / 100 for i in ids], np.float32)
    return columns, labels, true_ctr


def write(out: Path, n: int = ROWS, **kwargs: Any) -> records.DatasetInfo:
    columns, labels, true_ctr = make_rows(n)
    with DatasetWriter(out, SCHEMA, has_true_ctr=True, **kwargs) as writer:
        half = n // 2  # two blocks, so row numbering continues across write_columns calls
        writer.write_columns(
            {k: v[:half] for k, v in columns.items()}, labels[:half], true_ctr[:half]
        )
        writer.write_columns(
            {k: v[half:] for k, v in columns.items()}, labels[half:], true_ctr[half:]
        )
    return read_manifest(out)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> records.DatasetInfo:
    return write(tmp_path_factory.mktemp("records") / "ds", rows_per_shard=ROWS_PER_SHARD)


def write_v1(out: Path, n: int = ROWS, rows_per_shard: int = ROWS_PER_SHARD) -> records.DatasetInfo:
    """The same rows in format 1 (one ``tf.train.Example`` per row), as adpredict 0.x wrote."""
    columns, labels, true_ctr = make_rows(n)
    out.mkdir()
    shards = []
    for first in range(0, n, rows_per_shard):
        name = f"part-{len(shards):05d}.tfrecord"
        rows = range(first, min(n, first + rows_per_shard))
        with tf.io.TFRecordWriter(str(out / name)) as w:
            for i in rows:
                ex = tf.train.Example()
                for field in ("site", "ad", "bid"):
                    if columns[field][i]:
                        ex.features.feature[field].bytes_list.value.append(
                            columns[field][i].encode()
                        )
                if columns["segs"][i]:
                    ex.features.feature["segs"].bytes_list.value.extend(
                        v.encode() for v in columns["segs"][i]
                    )
                ex.features.feature["label"].int64_list.value.append(int(labels[i]))
                ex.features.feature["true_ctr"].float_list.value.append(float(true_ctr[i]))
                w.write(ex.SerializeToString())
        shards.append({"file": name, "rows": len(rows)})
    manifest = {
        "format": records.FORMAT,
        "format_version": 1,
        "schema": SCHEMA.to_dict(),
        "rows": n,
        "shards": shards,
        "has_true_ctr": True,
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return read_manifest(out)


@pytest.fixture(scope="module")
def dataset_v1(tmp_path_factory: pytest.TempPathFactory) -> records.DatasetInfo:
    return write_v1(tmp_path_factory.mktemp("records_v1") / "ds")


def block_record(**features: list[Any]) -> bytes:
    """A hand-made record: ``name=[values]`` (bytes -> bytes_list, int, float); ``a__b`` = a/b."""
    ex = tf.train.Example()
    for name, values in features.items():
        if not values:
            continue  # an empty list: the feature is absent
        feature = ex.features.feature[name.replace("__", "/")]
        if isinstance(values[0], bytes):
            feature.bytes_list.value.extend(values)
        elif isinstance(values[0], float):
            feature.float_list.value.extend(values)
        else:
            feature.int64_list.value.extend(values)
    return ex.SerializeToString()


def pad(values: list[Any], fill: Any) -> list[Any]:
    """Per-row values padded to the 64 slots of a block record."""
    return values + [fill] * (64 - len(values))


def hand_block(
    segs: list[list[bytes]], labels: list[int], rows: int | None = None, **extra: list[Any]
) -> bytes:
    """A block record of ``len(labels)`` rows built by hand from the documented layout."""
    n = len(labels)
    fields = {
        "block__rows": [n if rows is None else rows],
        "site": pad([b"s%d" % i for i in range(n)], b""),
        "ad": pad([b""] * n, b""),
        "bid": pad([b"1.5"] * n, b""),
        "segs": [v for row in segs for v in row],
        "segs__counts": pad([len(row) for row in segs], 0),
        "label": pad(labels, 0),
    }
    fields.update({k: pad(v, -1.0) for k, v in extra.items()})
    return block_record(**fields)


#: A one-row block whose single-valued fields, counts and label fill their 64 slots.
EMPTY_SLOTS: dict[str, list[Any]] = {
    "block__rows": [1],
    **{name: pad([], b"") for name in ("site", "ad", "bid")},
    "segs__counts": pad([], 0),
    "label": pad([], 0),
}


def replace_shard(path: Path, *serialized: bytes) -> None:
    with tf.io.TFRecordWriter(str(path)) as w:
        for record in serialized:
            w.write(record)


def read_all(files: list[str], **kwargs: Any) -> dict[str, Any]:
    """Every batch of ``make_dataset`` concatenated; ``segs`` as lists of non-empty values."""
    kwargs.setdefault("batch_size", 128)
    batches = list(make_dataset(files, SCHEMA, **kwargs).as_numpy_iterator())
    out: dict[str, Any] = {
        key: np.concatenate([b[key] for b in batches]) for key in batches[0] if key != "segs"
    }
    out["segs"] = [[v for v in row if v] for b in batches for row in b["segs"]]
    assert all(b["segs"].shape[1] <= 3 for b in batches)  # max_values
    return out


def ad_ids(data: dict[str, np.ndarray]) -> list[int]:
    return [int(v.decode()[2:]) for v in data["ad"]]


# ---- round trip ---------------------------------------------------------------------------------


def test_manifest_describes_the_data_set(dataset: records.DatasetInfo) -> None:
    assert dataset.rows == ROWS
    assert dataset.format_version == records.FORMAT_VERSION == 2
    manifest = json.loads((dataset.path / "manifest.json").read_text())
    assert manifest["layout"] == "blocks" and manifest["block_rows"] == 64
    assert dataset.shards == (
        ("part-00000.tfrecord", 300),
        ("part-00001.tfrecord", 300),
        ("part-00002.tfrecord", 130),
    )
    assert dataset.schema == SCHEMA
    assert dataset.schema.fingerprint() == SCHEMA.fingerprint()
    assert dataset.has_true_ctr
    assert dataset.files == [str(dataset.path / name) for name, _ in dataset.shards]
    assert sorted(p.name for p in dataset.path.iterdir()) == [
        "manifest.json",
        "part-00000.tfrecord",
        "part-00001.tfrecord",
        "part-00002.tfrecord",
    ]


def test_round_trip_through_make_dataset(dataset: records.DatasetInfo) -> None:
    data = read_all(dataset.files, with_true_ctr=True)
    ids = ad_ids(data)
    assert sorted(ids) == list(range(ROWS))
    columns, labels, true_ctr = make_rows(ROWS)
    for row, i in enumerate(ids):
        assert data["site"][row] == columns["site"][i].encode()
        assert data["bid"][row] == columns["bid"][i].encode()
        assert data["segs"][row] == [v.encode() for v in columns["segs"][i]]
        assert data["label"][row] == labels[i]
        assert data["true_ctr"][row] == pytest.approx(true_ctr[i], abs=0)
    assert data["label"].dtype == np.float32
    # Missing values come back as b'' (site: every 5th row; bid: every 6th row).
    assert sum(v == b"" for v in data["site"]) == len(range(0, ROWS, 5))
    assert sum(v == b"" for v in data["bid"]) == len(range(0, ROWS, 6))


def test_shards_hold_blocks_of_64_rows_whatever_the_write_sizes(tmp_path: Path) -> None:
    columns, labels, true_ctr = make_rows(160)
    with DatasetWriter(tmp_path / "ds", SCHEMA, rows_per_shard=150, has_true_ctr=True) as w:
        for lo, hi in ((0, 50), (50, 57), (57, 157), (157, 160)):
            w.write_columns(
                {k: v[lo:hi] for k, v in columns.items()}, labels[lo:hi], true_ctr[lo:hi]
            )
    info = read_manifest(tmp_path / "ds")
    assert [rows for _, rows in info.shards] == [150, 10]
    blocks = [
        [
            tf.train.Example.FromString(r.numpy()).features.feature
            for r in tf.data.TFRecordDataset(p)
        ]
        for p in info.files
    ]
    assert [[b["block/rows"].int64_list.value[0] for b in shard] for shard in blocks] == [
        [64, 64, 22],
        [10],
    ]
    # The documented layout: 64 slots per single-valued field, counts and label.
    last = blocks[1][0]
    assert last["site"].bytes_list.value == pad([c.encode() for c in columns["site"][150:]], b"")
    assert last["segs/counts"].int64_list.value == pad([len(v) for v in columns["segs"][150:]], 0)
    assert last["segs"].bytes_list.value == [
        v.encode() for row in columns["segs"][150:] for v in row
    ]
    assert last["label"].int64_list.value == pad(list(labels[150:]), 0)
    assert last["true_ctr"].float_list.value == pytest.approx(pad(list(true_ctr[150:]), -1.0))
    assert sorted(ad_ids(read_all(info.files))) == list(range(160))


def test_batches_hold_whole_blocks_and_number_requests(dataset: records.DatasetInfo) -> None:
    # Blocks in reading order (round robin over the 3 shards): 64 x 8, 2 (the end of the
    # 130-row shard), 64 x 2, 44 and 44 (the ends of the 300-row shards). batch_size 100
    # means ceil(100 / 64) = 2 blocks per batch.
    batches = list(make_dataset(dataset.files, SCHEMA, 100).as_numpy_iterator())
    assert [len(b["label"]) for b in batches] == [128, 128, 128, 128, 66, 108, 44]
    for b in batches:
        np.testing.assert_array_equal(b["request_index"], np.arange(len(b["label"])))
        assert b["request_index"].dtype == np.int32
        assert "true_ctr" not in b
    dropped = list(make_dataset(dataset.files, SCHEMA, 100, drop_remainder=True))
    assert len(dropped) == 6
    # A multiple of 64 over whole blocks gives exactly batch_size rows.
    one_shard = list(make_dataset(dataset.files[:1], SCHEMA, 128).as_numpy_iterator())
    assert [len(b["label"]) for b in one_shard] == [128, 128, 44]


@pytest.mark.parametrize("batch_size", [64, 100, 128, 1024])
@pytest.mark.parametrize("holdout_every", [0, 3])
def test_training_batches_counts_the_batches(
    dataset: records.DatasetInfo,
    dataset_v1: records.DatasetInfo,
    batch_size: int,
    holdout_every: int,
) -> None:
    for info in (dataset, dataset_v1):
        shard_rows = [rows for _, rows in info.shards]
        expected = records.training_batches(
            shard_rows, batch_size, holdout_every, info.format_version
        )
        ds = make_dataset(
            info.files,
            SCHEMA,
            batch_size,
            holdout_every=holdout_every,
            shuffle_buffer=256,
            format_version=info.format_version,
        )
        assert sum(1 for _ in ds) == expected


def test_format_1_batches_have_the_requested_size(dataset_v1: records.DatasetInfo) -> None:
    batches = list(make_dataset(dataset_v1.files, SCHEMA, 100, format_version=1))
    assert [len(b["label"]) for b in batches] == [100] * 7 + [30]
    dropped = list(
        make_dataset(dataset_v1.files, SCHEMA, 100, drop_remainder=True, format_version=1)
    )
    assert len(dropped) == 7


def test_format_1_data_sets_still_read_the_same(
    dataset: records.DatasetInfo, dataset_v1: records.DatasetInfo
) -> None:
    assert dataset_v1.format_version == 1
    v1 = read_all(dataset_v1.files, with_true_ctr=True, format_version=1)
    v2 = read_all(dataset.files, with_true_ctr=True)
    order1, order2 = np.argsort(ad_ids(v1)), np.argsort(ad_ids(v2))
    assert sorted(ad_ids(v1)) == list(range(ROWS))
    for key in ("site", "bid", "ad", "label", "true_ctr"):
        np.testing.assert_array_equal(v1[key][order1], v2[key][order2])
    assert [v1["segs"][i] for i in order1] == [v2["segs"][i] for i in order2]
    # The hold-out split is the same rows in both formats.
    for holdout in (True, False):
        kw = {"holdout_every": HOLDOUT_EVERY, "holdout": holdout}
        assert sorted(ad_ids(read_all(dataset_v1.files, format_version=1, **kw))) == sorted(
            ad_ids(read_all(dataset.files, **kw))
        )


def test_format_1_records_read_as_format_2_fail_clearly(
    dataset_v1: records.DatasetInfo,
) -> None:
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"values != expected|is required"):
        read_all(dataset_v1.files)


def test_shuffled_reading_yields_every_row_once(dataset: records.DatasetInfo) -> None:
    data = read_all(dataset.files, shuffle_buffer=256, seed=1)
    assert sorted(ad_ids(data)) == list(range(ROWS))


def test_absent_columns_are_missing_in_every_row(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", SCHEMA) as writer:
        writer.write_columns({"ad": ["a", "b"], "segs": [[], ["", "x", ""]]}, [0, 1])
    data = read_all(read_manifest(tmp_path / "ds").files)
    assert list(data["site"]) == [b"", b""]
    assert list(data["bid"]) == [b"", b""]
    # Empty strings inside a multi-valued list are dropped, not stored.
    assert data["segs"] == [[], [b"x"]]
    assert not read_manifest(tmp_path / "ds").has_true_ctr


def test_small_shards_and_non_string_values(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", SCHEMA, rows_per_shard=2) as writer:
        writer.write_columns({"ad": [b"raw"] * 5}, [1] * 5)
        assert writer.rows == 5
        with pytest.raises(DataError, match=r"field 'ad': value 7 is not a string"):
            writer.write_columns({"ad": [b"ok", 7]}, [0, 0])
        assert writer.rows == 5  # nothing of the bad call was kept
    info = read_manifest(tmp_path / "ds")
    assert [rows for _, rows in info.shards] == [2, 2, 1]
    data = read_all(info.files)
    assert list(data["ad"]) == [b"raw"] * 5 and list(data["label"]) == [1.0] * 5


# ---- publishing ---------------------------------------------------------------------------------


def test_output_appears_only_when_the_writer_closes(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    columns, labels, true_ctr = make_rows(10)
    with DatasetWriter(out, SCHEMA, has_true_ctr=True) as writer:
        writer.write_columns(columns, labels, true_ctr)
        assert not out.exists()
        hidden = [p.name for p in tmp_path.iterdir()]
        assert len(hidden) == 1 and hidden[0].startswith(".ds.tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    assert read_manifest(out).rows == 10


def test_exception_inside_with_publishes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    columns, labels, true_ctr = make_rows(50)
    with pytest.raises(RuntimeError, match="boom"):  # noqa: SIM117
        with DatasetWriter(out, SCHEMA, rows_per_shard=20, has_true_ctr=True) as writer:
            writer.write_columns(columns, labels, true_ctr)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither DIR nor a hidden .DIR.tmp-* directory


def test_an_existing_empty_directory_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    info = write(out, n=5)
    assert info.rows == 5


def test_an_empty_directory_survives_an_aborted_write(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    with pytest.raises(RuntimeError):  # noqa: SIM117
        with DatasetWriter(out, SCHEMA):
            raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["ds"] and list(out.iterdir()) == []


def test_non_empty_output_directory_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="not empty") as info:
        DatasetWriter(out, SCHEMA)
    assert str(out) in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary directory left behind
    assert (out / "keep.txt").read_text() == "precious"


def test_a_file_as_output_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ds").write_text("x")
    with pytest.raises(DataError):
        DatasetWriter(tmp_path / "ds", SCHEMA)


@pytest.mark.parametrize(
    ("bad_block", "message"),
    [
        ([0, 2, 1], "row 5: label 2 is not 0 or 1"),
        ([0.5, 0, 1], "row 4: label 0.5 is not 0 or 1"),
        ([0, 1, -1], "row 6: label -1 is not 0 or 1"),
    ],
)
def test_bad_label_names_the_row_and_publishes_nothing(
    tmp_path: Path, bad_block: list[float], message: str
) -> None:
    columns, labels, _ = make_rows(3)
    with pytest.raises(DataError) as info, DatasetWriter(tmp_path / "ds", SCHEMA) as writer:
        writer.write_columns(columns, labels)
        writer.write_columns(columns, bad_block)
    assert message in str(info.value)
    assert writer.rows == 3  # nothing of the bad block was written
    assert list(tmp_path.iterdir()) == []


def test_close_inside_with_returns_the_info(tmp_path: Path) -> None:
    columns, labels, _ = make_rows(4)
    with DatasetWriter(tmp_path / "ds", SCHEMA) as writer:
        writer.write_columns(columns, labels)
        info = writer.close()  # e.g. to log the manifest; leaving the block must not fail
    assert info.rows == 4 and info.path == tmp_path / "ds"
    assert read_manifest(tmp_path / "ds").rows == 4


def test_unknown_column_and_length_mismatch_are_refused(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", SCHEMA) as writer:
        with pytest.raises(DataError, match="'colour'"):
            writer.write_columns({"colour": ["red"]}, [0])
        with pytest.raises(ValueError, match="'ad' has 2 rows"):
            writer.write_columns({"ad": ["a", "b"]}, [0])
        writer.write_columns({"ad": ["a"]}, [1])
    assert read_manifest(tmp_path / "ds").rows == 1


def test_true_ctr_is_required_when_the_data_set_records_it(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", SCHEMA, has_true_ctr=True) as writer:
        with pytest.raises(ValueError, match="true_ctr"):
            writer.write_columns({"ad": ["a"]}, [1])
        writer.write_columns({"ad": ["a"]}, [1], [0.5])


def test_closing_without_rows_is_an_error_and_publishes_nothing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no rows"), DatasetWriter(tmp_path / "ds", SCHEMA):
        pass
    assert list(tmp_path.iterdir()) == []


def test_rows_per_shard_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rows_per_shard"):
        DatasetWriter(tmp_path / "ds", SCHEMA, rows_per_shard=0)
    assert list(tmp_path.iterdir()) == []


# ---- read_manifest errors -----------------------------------------------------------------------


def copy_of(dataset: records.DatasetInfo, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(dataset.path, tmp_path / "copy"))


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        read_manifest(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_empty_directory_says_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty") as info:
        read_manifest(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_directory_without_manifest_is_not_called_empty(tmp_path: Path) -> None:
    (tmp_path / "stray.txt").write_text("x")
    with pytest.raises(DataError, match=r"manifest\.json") as info:
        read_manifest(tmp_path)
    assert "empty" not in str(info.value)


def test_missing_shard_is_named(dataset: records.DatasetInfo, tmp_path: Path) -> None:
    path = copy_of(dataset, tmp_path)
    (path / "part-00001.tfrecord").unlink()
    with pytest.raises(DataError, match=r"'part-00001.tfrecord'.*missing"):
        read_manifest(path)


def rewrite_manifest(path: Path, **changes: Any) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("version", [0, 3, "2", None, True])
def test_unsupported_format_version_names_the_manifest(
    dataset: records.DatasetInfo, tmp_path: Path, version: Any
) -> None:
    path = copy_of(dataset, tmp_path)
    rewrite_manifest(path, format_version=version)
    with pytest.raises(DataError, match=rf"format_version {version!r} is not supported") as info:
        read_manifest(path)
    assert str(path / "manifest.json") in str(info.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layout": "rows"}, "layout 'rows' does not match format_version 2"),
        ({"format_version": 1}, "layout 'blocks' does not match format_version 1"),
        ({"block_rows": 128}, "block_rows 128 is not supported"),
    ],
)
def test_layout_must_match_the_version(
    dataset: records.DatasetInfo, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = copy_of(dataset, tmp_path)
    rewrite_manifest(path, **changes)
    with pytest.raises(DataError, match=message):
        read_manifest(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "csv"}, "not an adpredict data set"),
        ({"shards": [{"file": "../x"}]}, "malformed"),
        ({"shards": [{"file": "../part-00000.tfrecord", "rows": 1}]}, "missing"),
        ({"rows": 0}, "no rows"),
    ],
)
def test_malformed_manifests(
    dataset: records.DatasetInfo, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    path = copy_of(dataset, tmp_path)
    rewrite_manifest(path, **changes)
    with pytest.raises(DataError, match=message):
        read_manifest(path)


def test_unparseable_manifest(dataset: records.DatasetInfo, tmp_path: Path) -> None:
    path = copy_of(dataset, tmp_path)
    (path / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="unreadable manifest"):
        read_manifest(path)


# ---- hold-out split -----------------------------------------------------------------------------


def test_holdout_rows_counts_every_kth_block_of_64() -> None:
    # 300 rows = blocks of 64, 64, 64, 64, 44; every 3rd block from the first: 0 and 3.
    assert holdout_rows(300, 3) == 128
    assert holdout_rows(130, 3) == 64  # blocks 64, 64, 2 -> block 0
    assert holdout_rows(130, 2) == 66  # blocks 0 and 2
    assert holdout_rows(10, 5) == 10
    assert holdout_rows(640, 1) == 640


def test_holdout_split_partitions_the_rows(dataset: records.DatasetInfo) -> None:
    held = ad_ids(read_all(dataset.files, holdout_every=HOLDOUT_EVERY, holdout=True))
    train = ad_ids(read_all(dataset.files, holdout_every=HOLDOUT_EVERY, holdout=False))
    assert len(set(held)) == len(held) and len(set(train)) == len(train)
    assert not set(held) & set(train)
    assert sorted(held + train) == list(range(ROWS))
    expected = sum(holdout_rows(rows, HOLDOUT_EVERY) for _, rows in dataset.shards)
    assert len(held) == expected == 128 + 128 + 64
    # The first block of each shard is held out: rows 0..63 of each shard.
    for first in (0, 300, 600):
        assert set(range(first, first + 64)) <= set(held)


def test_holdout_split_is_the_same_when_shuffled(dataset: records.DatasetInfo) -> None:
    plain = ad_ids(read_all(dataset.files, holdout_every=HOLDOUT_EVERY, holdout=True))
    shuffled = ad_ids(
        read_all(dataset.files, holdout_every=HOLDOUT_EVERY, holdout=True, shuffle_buffer=512)
    )
    assert sorted(plain) == sorted(shuffled)


def test_make_dataset_without_files_is_an_error() -> None:
    with pytest.raises(DataError, match="no shards"):
        make_dataset([], SCHEMA, 8)


# ---- corruption and bad labels ------------------------------------------------------------------


def test_find_corrupt_shard(dataset: records.DatasetInfo, tmp_path: Path) -> None:
    path = copy_of(dataset, tmp_path)
    files = [str(path / name) for name, _ in dataset.shards]
    assert records.find_corrupt_shard(files) is None
    damaged = Path(files[1])
    data = bytearray(damaged.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 8):
        data[i] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert records.find_corrupt_shard(files) == files[1]
    assert records.find_corrupt_shard([files[0], files[2]]) is None
    with pytest.raises(tf.errors.DataLossError):
        read_all(files)


def test_a_stored_label_other_than_0_or_1_fails_the_pipeline(tmp_path: Path) -> None:
    with DatasetWriter(tmp_path / "ds", SCHEMA) as writer:
        writer.write_columns({"ad": ["a", "b"]}, [0, 1])
    info = read_manifest(tmp_path / "ds")
    blanks = [b"", b""]
    columns = {"site": blanks, "ad": [b"a", b"b"], "bid": blanks, "segs": [[], []]}
    replace_shard(Path(info.files[0]), records.encode_block(SCHEMA, columns, [0, 3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="label must be 0 or 1"):
        read_all(info.files)
    assert records.find_bad_label(info.files) == (info.files[0], 2, 3)
    assert records.find_bad_label(info.files[1:]) is None


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (hand_block([[], []], [0, 1], rows=0), "malformed block record"),
        (hand_block([[], []], [0, 1], rows=65), "malformed block record"),
        (hand_block([[b"a"], []], [0, 1]), None),  # the valid control
        # Counts promise a value that is not stored.
        (block_record(**{**EMPTY_SLOTS, "segs__counts": pad([1], 0)}), "malformed block record"),
        (
            block_record(**{**EMPTY_SLOTS, "segs__counts": pad([-1, 1], 0)}),
            "malformed block record",
        ),
        # A field without a slot per row; a field missing.
        (block_record(**{**EMPTY_SLOTS, "ad": [b"a"]}), r"Key: ad.*values != expected"),
        (block_record(**{**EMPTY_SLOTS, "ad": []}), r"ad .*is required"),
        # A format 1 record.
        (block_record(ad=[b"a"], label=[0]), r"values != expected|is required"),
    ],
)
def test_malformed_block_records_fail_the_pipeline(
    tmp_path: Path, block: bytes, message: str | None
) -> None:
    path = tmp_path / "part.tfrecord"
    replace_shard(path, block)
    if message is None:
        assert len(read_all([str(path)])["label"]) == 2
        return
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        read_all([str(path)])


def test_parse_batch_concatenates_blocks_and_truncates_multi_values() -> None:
    block = hand_block
    serialized = tf.constant(
        [block([[b"a", b"b", b"c", b"d", b"e"], []], [1, 0]), block([[b"x"]], [1])]
    )
    out = records.parse_batch(serialized, SCHEMA)
    assert out["segs"].shape == (3, 3)
    assert out["segs"].numpy().tolist() == [[b"a", b"b", b"c"], [b"", b"", b""], [b"x", b"", b""]]
    assert out["site"].numpy().tolist() == [b"s0", b"s1", b"s0"]
    assert out["ad"].numpy().tolist() == [b"", b"", b""]
    np.testing.assert_array_equal(out["request_index"].numpy(), [0, 1, 2])
    assert out["request_index"].dtype == tf.int32
    np.testing.assert_array_equal(out["label"].numpy(), [1.0, 0.0, 1.0])
    assert out["label"].dtype == tf.float32
    assert "true_ctr" not in out
    with_ctr = records.parse_batch(serialized, SCHEMA, with_true_ctr=True)
    np.testing.assert_array_equal(with_ctr["true_ctr"].numpy(), [-1.0, -1.0, -1.0])
    stored = tf.constant([block([[b"a"]], [1], true_ctr=[0.25]), block([[]], [0], true_ctr=[0.5])])
    np.testing.assert_array_equal(
        records.parse_batch(stored, SCHEMA, with_true_ctr=True)["true_ctr"].numpy(), [0.25, 0.5]
    )
    # The widest row of a batch sets the width, up to max_values.
    narrow = records.parse_batch(tf.constant([block([[b"x"], []], [0, 0])]), SCHEMA)
    assert narrow["segs"].numpy().tolist() == [[b"x"], [b""]]
    # Full blocks (no padding to drop) take the other branch: the same rows come out.
    full = records.parse_batch(tf.constant([block([[b"q"]] * 64, [1] * 64)] * 2), SCHEMA)
    assert full["site"].numpy().tolist() == [b"s%d" % i for i in range(64)] * 2
    assert full["segs"].numpy().tolist() == [[b"q"]] * 128
    np.testing.assert_array_equal(full["request_index"].numpy(), np.arange(128))


def test_parse_batch_reads_format_1_rows() -> None:
    def example(segs: list[bytes], label: int) -> bytes:
        ex = tf.train.Example()
        if segs:
            ex.features.feature["segs"].bytes_list.value.extend(segs)
        ex.features.feature["label"].int64_list.value.append(label)
        return ex.SerializeToString()

    serialized = tf.constant(
        [example([b"a", b"b", b"c", b"d", b"e"], 1), example([], 0), example([b"x"], 1)]
    )
    out = records.parse_batch(serialized, SCHEMA, format_version=1)
    assert out["segs"].shape == (3, 3)
    assert out["segs"].numpy().tolist() == [[b"a", b"b", b"c"], [b"", b"", b""], [b"x", b"", b""]]
    np.testing.assert_array_equal(out["request_index"].numpy(), [0, 1, 2])
    assert out["request_index"].dtype == tf.int32
    np.testing.assert_array_equal(out["label"].numpy(), [1.0, 0.0, 1.0])
    assert out["site"].numpy().tolist() == [b"", b"", b""]
    assert "true_ctr" not in out
    with_ctr = records.parse_batch(serialized, SCHEMA, with_true_ctr=True, format_version=1)
    np.testing.assert_array_equal(with_ctr["true_ctr"].numpy(), [-1.0, -1.0, -1.0])
