"""CSV/TSV and Criteo TSV conversion, and the errors a user can cause."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from adpredict.data import convert, records
from adpredict.errors import DataError
from adpredict.schema import load_schema

SCHEMA = Path(__file__).parents[1] / "fixtures" / "rtb_small.toml"


def _csv(path: Path, rows: int = 30, label: str = "1", extra: str = "") -> Path:
    schema = load_schema(SCHEMA)
    header = ["label", *schema.names]
    lines = [",".join(header)]
    for i in range(rows):
        cells = [label if i == rows - 1 else str(i % 2)]
        for f in schema.fields:
            if f.is_multi:
                cells.append("seg-1|seg-2" if i % 3 else "")
            elif f.is_numeric:
                cells.append(f"{i / 10:.1f}")
            else:
                cells.append(f"{f.name}-{i % 5}" if i % 7 else "")
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def test_csv_round_trip(tmp_path: Path) -> None:
    src = _csv(tmp_path / "in.csv")
    info = convert.convert(
        [src], tmp_path / "out", fmt="csv", schema_spec=SCHEMA, rows_per_shard=10
    )
    assert info.rows == 30 and len(info.shards) == 3
    # Batches hold whole blocks, one per 10-row shard here: concatenate them in order.
    batches = list(records.make_dataset(info.files, info.schema, 64).as_numpy_iterator())
    assert [len(b["label"]) for b in batches] == [10, 10, 10]
    batch = {
        key: np.concatenate([b[key] for b in batches])
        for key in batches[0]
        if key != "user_segments"
    }
    assert batch["label"].tolist() == [i % 2 for i in range(29)] + [1]
    segs = batches[0]["user_segments"]
    assert segs[1].tolist()[:2] == [b"seg-1", b"seg-2"] and not any(segs[0])
    assert batch["site_domain"][0] == b""  # empty cell = missing
    assert batch["site_domain"][1] == b"site_domain-1"


def test_gzip_and_tsv(tmp_path: Path) -> None:
    text = _csv(tmp_path / "in.csv").read_text().replace(",", "\t")
    gz = tmp_path / "in.tsv.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(text)
    info = convert.convert([gz], tmp_path / "out", fmt="tsv", schema_spec=SCHEMA)
    assert info.rows == 30


def test_criteo_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(50):
        ints = [str(rng.integers(0, 100)) if i % 4 else "" for _ in range(13)]
        cats = [f"{rng.integers(0, 1 << 32):08x}" if (i + j) % 5 else "" for j in range(26)]
        lines.append("\t".join([str(i % 2), *ints, *cats]))
    src = tmp_path / "day_0"
    src.write_text("\n".join(lines) + "\n")
    info = convert.convert([src], tmp_path / "out", fmt="criteo")
    assert info.rows == 50 and info.schema.name == "criteo"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.replace("label,", "clicked,", 1), "missing column"),
        (lambda t: t.replace(",site_domain,", ",site,", 1), "site"),
        (lambda t: t + "1,2\n", ":32: expected"),
    ],
)
def test_bad_csv_names_the_problem_and_publishes_nothing(
    tmp_path: Path, mutate, message: str
) -> None:
    src = _csv(tmp_path / "in.csv")
    src.write_text(mutate(src.read_text()))
    with pytest.raises(DataError, match=message):
        convert.convert([src], tmp_path / "out", fmt="csv", schema_spec=SCHEMA)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_bad_label_names_file_and_line(tmp_path: Path) -> None:
    src = _csv(tmp_path / "in.csv", label="2")
    with pytest.raises(DataError, match=r"in.csv:31: label '2' is not 0 or 1"):
        convert.convert([src], tmp_path / "out", fmt="csv", schema_spec=SCHEMA)
    assert not (tmp_path / "out").exists()


def test_bad_numeric_and_missing_file(tmp_path: Path) -> None:
    src = _csv(tmp_path / "in.csv")
    src.write_text(src.read_text().replace(",0.5\n", ",cheap\n", 1))
    with pytest.raises(DataError, match="'bid_cpm': 'cheap' is not a number"):
        convert.convert([src], tmp_path / "out", fmt="csv", schema_spec=SCHEMA)
    with pytest.raises(DataError, match="does not exist"):
        convert.convert([tmp_path / "nope.csv"], tmp_path / "out2", fmt="csv", schema_spec=SCHEMA)
