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


def test_batches_have_the_requested_size_and_request_index(dataset: records.DatasetInfo) -> None:
    batches = list(make_dataset(dataset.files, SCHEMA, 100).as_numpy_iterator())
    assert [len(b["label"]) for b in batches] == [100] * 7 + [30]
    for b in batches:
        np.testing.assert_array_equal(b["request_index"], np.arange(len(b["label"])))
        assert "true_ctr" not in b
    dropped = list(make_dataset(dataset.files, SCHEMA, 100, drop_remainder=True))
    assert len(dropped) == 7


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


def test_write_serialized_accepts_examples_and_counts_rows(tmp_path: Path) -> None:
    ex = tf.train.Example()
    ex.features.feature["ad"].bytes_list.value.append(b"raw")
    ex.features.feature["label"].int64_list.value.append(1)
    with DatasetWriter(tmp_path / "ds", SCHEMA, rows_per_shard=2) as writer:
        for _ in range(5):
            writer.write_serialized(ex.SerializeToString())
        assert writer.rows == 5
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


def test_unsupported_format_version(dataset: records.DatasetInfo, tmp_path: Path) -> None:
    path = copy_of(dataset, tmp_path)
    rewrite_manifest(path, format_version=2)
    with pytest.raises(DataError, match=r"format_version 2 is not supported"):
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


def test_holdout_rows_counts_every_kth_group_of_64() -> None:
    # 300 rows = groups of 64, 64, 64, 64, 44; every 3rd group from the first: 0 and 3.
    assert holdout_rows(300, 3) == 128
    assert holdout_rows(130, 3) == 64  # groups 64, 64, 2 -> group 0
    assert holdout_rows(130, 2) == 66  # groups 0 and 2
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
    # The first group of each shard is held out: rows 0..63 of each shard.
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
    ex = tf.train.Example()
    ex.features.feature["ad"].bytes_list.value.append(b"a")
    ex.features.feature["label"].int64_list.value.append(3)
    with DatasetWriter(tmp_path / "ds", SCHEMA) as writer:
        writer.write_serialized(ex.SerializeToString())
    with pytest.raises(tf.errors.InvalidArgumentError, match="label must be 0 or 1"):
        read_all(read_manifest(tmp_path / "ds").files)


# ---- parse_batch --------------------------------------------------------------------------------


def test_parse_batch_truncates_multi_values_and_numbers_requests() -> None:
    def example(segs: list[bytes], label: int) -> bytes:
        ex = tf.train.Example()
        if segs:
            ex.features.feature["segs"].bytes_list.value.extend(segs)
        ex.features.feature["label"].int64_list.value.append(label)
        return ex.SerializeToString()

    serialized = tf.constant(
        [example([b"a", b"b", b"c", b"d", b"e"], 1), example([], 0), example([b"x"], 1)]
    )
    out = records.parse_batch(serialized, SCHEMA)
    assert out["segs"].shape == (3, 3)
    assert out["segs"].numpy().tolist() == [[b"a", b"b", b"c"], [b"", b"", b""], [b"x", b"", b""]]
    np.testing.assert_array_equal(out["request_index"].numpy(), [0, 1, 2])
    assert out["request_index"].dtype == tf.int32
    np.testing.assert_array_equal(out["label"].numpy(), [1.0, 0.0, 1.0])
    assert out["site"].numpy().tolist() == [b"", b"", b""]
    assert "true_ctr" not in out
    with_ctr = records.parse_batch(serialized, SCHEMA, with_true_ctr=True)
    np.testing.assert_array_equal(with_ctr["true_ctr"].numpy(), [-1.0, -1.0, -1.0])
