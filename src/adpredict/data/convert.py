"""Convert delimited text logs into adpredict's TFRecord data sets.

Two input layouts:

- ``csv`` / ``tsv``: a header row naming ``label`` and schema fields (every field of the
  schema must be present; ``true_ctr`` is optional). Multi-valued fields hold their
  values separated by ``|``; an empty cell is a missing value.
- ``criteo``: the Criteo display-advertising TSV layout with no header: label, 13
  integer columns, 26 hashed categorical columns, read with the built-in ``criteo``
  schema (fields ``i1..i13``, ``c1..c26``).

Inputs ending in ``.gz`` are decompressed on the fly. Every problem names the file and
line; nothing is published unless every input row converted (see ``DatasetWriter``).
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from adpredict.data.records import LABEL, TRUE_CTR, DatasetInfo, DatasetWriter
from adpredict.errors import DataError
from adpredict.schema import Schema, load_schema

MULTI_SEPARATOR = "|"
_BLOCK = 4096
CRITEO_COLUMNS = ("label", *(f"i{i}" for i in range(1, 14)), *(f"c{i}" for i in range(1, 27)))


def _open_text(path: Path) -> TextIO:
    if not path.is_file():
        raise DataError(f"input file {path} does not exist")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _rows(
    path: Path, delimiter: str, header: Sequence[str] | None
) -> Iterator[tuple[int, list[str], list[str]]]:
    """Yield (line number, header, cells) for each data row of one file."""
    with _open_text(path) as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            if header is None:
                first = next(reader, None)
                if first is None:
                    raise DataError(f"{path}: the file is empty (expected a header row)")
                header = [h.strip() for h in first]
            for cells in reader:
                if not cells:
                    continue
                yield reader.line_num, list(header), cells
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed row ({exc})") from None


def _check_header(path: Path, header: Sequence[str], schema: Schema) -> None:
    names = set(header)
    if len(names) != len(header):
        dupes = sorted({h for h in header if list(header).count(h) > 1})
        raise DataError(f"{path}: header repeats column(s) {dupes}")
    missing = [n for n in (LABEL, *schema.names) if n not in names]
    unknown = [n for n in header if n not in schema and n not in (LABEL, TRUE_CTR)]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing column(s) {missing}")
        if unknown:
            parts.append(f"column(s) not in schema {schema.name!r}: {unknown}")
        raise DataError(f"{path}: header does not match the schema: " + "; ".join(parts))


def convert(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    fmt: str = "csv",
    schema_spec: str | Path | None = None,
    rows_per_shard: int = 100_000,
    delimiter: str | None = None,
) -> DatasetInfo:
    """Convert ``inputs`` (all in one layout) into a data set at ``out_dir``."""
    if fmt not in ("csv", "tsv", "criteo"):
        raise DataError(f"unknown input format {fmt!r}; expected csv, tsv or criteo")
    if not inputs:
        raise DataError("no input files given")
    schema = load_schema(schema_spec or ("criteo" if fmt == "criteo" else "rtb"))
    if fmt == "criteo" and set(schema.names) != set(CRITEO_COLUMNS[1:]):
        raise DataError(
            f"--format criteo needs a schema with fields i1..i13, c1..c26; {schema.name!r} differs"
        )
    delim = delimiter or ("," if fmt == "csv" else "\t")
    paths = [Path(p) for p in inputs]
    with_truth = False
    if fmt != "criteo":
        headers = {}
        for path in paths:
            first = next(_rows_header_only(path, delim))
            _check_header(path, first, schema)
            headers[path] = first
        truth = {TRUE_CTR in h for h in headers.values()}
        if len(truth) > 1:
            raise DataError("some inputs have a true_ctr column and others do not")
        with_truth = truth.pop()
    multi = {f.name for f in schema.fields if f.is_multi}
    with DatasetWriter(
        out_dir,
        schema,
        rows_per_shard=rows_per_shard,
        has_true_ctr=with_truth,
        source=f"convert {fmt}: " + ", ".join(str(p) for p in paths),
    ) as writer:
        for path in paths:
            header = CRITEO_COLUMNS if fmt == "criteo" else None
            _convert_file(path, delim, header, schema, multi, with_truth, writer)
    from adpredict.data.records import read_manifest

    return read_manifest(out_dir)


def _rows_header_only(path: Path, delimiter: str) -> Iterator[list[str]]:
    with _open_text(path) as fh:
        try:
            first = next(csv.reader(fh, delimiter=delimiter), None)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None
        if first is None:
            raise DataError(f"{path}: the file is empty (expected a header row)")
        yield [h.strip() for h in first]


def _convert_file(
    path: Path,
    delimiter: str,
    header: Sequence[str] | None,
    schema: Schema,
    multi: set[str],
    with_truth: bool,
    writer: DatasetWriter,
) -> None:
    columns: dict[str, list[object]] = {name: [] for name in schema.names}
    labels: list[int] = []
    truth: list[float] = []
    index: dict[str, int] | None = None
    numeric = {f.name for f in schema.fields if f.is_numeric}

    def flush() -> None:
        if labels:
            writer.write_columns(columns, labels, truth if with_truth else None)
            for col in columns.values():
                col.clear()
            labels.clear()
            truth.clear()

    for line, head, cells in _rows(path, delimiter, header):
        if index is None:
            index = {name: i for i, name in enumerate(head)}
        if len(cells) != len(head):
            raise DataError(f"{path}:{line}: expected {len(head)} columns, found {len(cells)}")
        raw_label = cells[index[LABEL]].strip()
        if raw_label not in ("0", "1"):
            raise DataError(f"{path}:{line}: label {raw_label!r} is not 0 or 1")
        labels.append(int(raw_label))
        if with_truth:
            raw = cells[index[TRUE_CTR]]
            try:
                value = float(raw)
            except ValueError:
                value = -1.0
            if not 0.0 <= value <= 1.0:
                raise DataError(f"{path}:{line}: true_ctr {raw!r} is not a probability")
            truth.append(value)
        for name in schema.names:
            cell = cells[index[name]]
            if name in multi:
                columns[name].append([v for v in cell.split(MULTI_SEPARATOR) if v])
            else:
                if name in numeric and cell:
                    try:
                        float(cell)
                    except ValueError:
                        raise DataError(
                            f"{path}:{line}: field {name!r}: {cell!r} is not a number"
                        ) from None
                columns[name].append(cell)
        if len(labels) >= _BLOCK:
            flush()
    flush()
