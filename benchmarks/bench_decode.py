"""Decode cost of Predict request layouts: wire bytes -> parsed message -> the model's numpy arrays.

    .venv/bin/python benchmarks/bench_decode.py [--schema rtb] [--repeat 30]

For each layout and K (candidates per request) it times, on one core, ``FromString`` of a
serialized realistic request (``adpredict.client.example_request``) plus the conversion into
object arrays of bytes (context ``[1]``/``[1, M]``, candidates ``[K]``), best of ``--repeat``,
and prints microseconds per candidate (total microseconds in brackets) and the message size.

Layouts (the alternatives are compiled from the .proto text below into a temp dir):

    row/string     repeated Candidate { map<string, Value> features }, Value { repeated string }
    row/bytes      the same with bytes values
    column/string  map<string, Column> candidates, Column { repeated string values; counts }
    column/bytes   the same with bytes values  (the layout adpredict.v1 uses)
    adpredict.v1   column/bytes through upb and RequestCodec.decode: full validation included
    v1 wire        what the servers do: predict_parser + RequestCodec.decode from the bytes
                   (the C decoder, _wire.c; the same as adpredict.v1 without it)
    + merge        v1 wire, then RequestCodec.merge of the one request into a feed

Only ``protobuf``'s upb backend is representative; the script prints which backend ran.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from google.protobuf.internal import api_implementation

from adpredict.client import build_request, example_request
from adpredict.schema import Schema, load_schema
from adpredict.serving.codec import RequestCodec, predict_parser

ALTERNATIVES = """
syntax = "proto3";
package bench;
message SValue { repeated string values = 1; }
message BValue { repeated bytes values = 1; }
message SCandidate { map<string, SValue> features = 1; }
message BCandidate { map<string, BValue> features = 1; }
message RowS { map<string, SValue> context = 1; repeated SCandidate candidates = 2; }
message RowB { map<string, BValue> context = 1; repeated BCandidate candidates = 2; }
message SColumn { repeated string values = 1; repeated uint32 counts = 2; }
message ColS { map<string, SValue> context = 1; uint32 num_candidates = 2;
               map<string, SColumn> candidates = 3; }
"""

KS = (1, 32, 300)


def compile_alternatives(workdir: Path) -> ModuleType:
    (workdir / "bench_layouts.proto").write_text(ALTERNATIVES)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{workdir}", f"--python_out={workdir}",
         str(workdir / "bench_layouts.proto")],
        check=True,
    )  # fmt: skip
    sys.path.insert(0, str(workdir))
    return importlib.import_module("bench_layouts_pb2")


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def build_row(alt: ModuleType, ex: Any, as_bytes: bool) -> bytes:
    conv = _bytes if as_bytes else _text
    msg = alt.RowB() if as_bytes else alt.RowS()
    for name, value in ex.context.items():
        values = value if isinstance(value, list) else [value]
        msg.context[name].values.extend(conv(v) for v in values)
    for cand in ex.candidates:
        c = msg.candidates.add()
        for name, value in cand.items():
            values = value if isinstance(value, list) else [value]
            c.features[name].values.extend(conv(v) for v in values)
    return msg.SerializeToString()


def build_column_string(alt: ModuleType, ex: Any) -> bytes:
    msg = alt.ColS(num_candidates=len(ex.candidates))
    for name, value in ex.context.items():
        values = value if isinstance(value, list) else [value]
        msg.context[name].values.extend(_text(v) for v in values)
    for name in ex.candidates[0]:
        msg.candidates[name].values.extend(_text(c[name]) for c in ex.candidates)
    return msg.SerializeToString()


def _context_arrays(schema: Schema, context: Any, as_bytes: bool) -> dict[str, np.ndarray]:
    out = {}
    for f in schema.context_fields:
        entry = context.get(f.name)
        values = entry.values[:] if entry is not None else []
        if not as_bytes:
            values = [v.encode() for v in values]
        if f.is_multi:
            row = np.full((1, max(len(values), 1)), b"", dtype=object)
            row[0, : len(values)] = values
            out[f.name] = row
        else:
            out[f.name] = np.array([values[0] if values else b""], dtype=object)
    return out


# Both decoders use the fastest access found for upb containers: schema-driven ``map.get``
# (iterating a map's ``items()`` runs Python code per entry) and ``repeated[:]`` (a C-level
# copy; ``list(repeated)`` is slower).


def decoder_row(schema: Schema, cls: Any, as_bytes: bool) -> Callable[[bytes], Any]:
    names = [f.name for f in schema.candidate_fields]

    def decode(data: bytes) -> Any:
        msg = cls.FromString(data)
        ctx = _context_arrays(schema, msg.context, as_bytes)
        k = len(msg.candidates)
        columns = {name: [b""] * k for name in names}
        for i, cand in enumerate(msg.candidates):
            features = cand.features
            for name in names:
                value = features.get(name)
                if value is not None and value.values:
                    v = value.values[0]
                    columns[name][i] = v if as_bytes else v.encode()
        out = {}
        for name, col in columns.items():
            arr = np.empty(k, dtype=object)
            arr[:] = col
            out[name] = arr
        return ctx, out

    return decode


def decoder_column(schema: Schema, cls: Any, as_bytes: bool) -> Callable[[bytes], Any]:
    names = [f.name for f in schema.candidate_fields]

    def decode(data: bytes) -> Any:
        msg = cls.FromString(data)
        ctx = _context_arrays(schema, msg.context, as_bytes)
        out = {}
        for name in names:
            column = msg.candidates.get(name)
            values = column.values[:] if column is not None else []
            if not as_bytes:
                values = [v.encode() for v in values]
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[name] = arr
        return ctx, out

    return decode


def time_once(fn: Callable[[bytes], Any], data: bytes, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn(data)
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schema", default="rtb", help="built-in schema name or file")
    parser.add_argument("--repeat", type=int, default=30, help="timing rounds; the best is kept")
    args = parser.parse_args()

    from adpredict.v1 import prediction_service_pb2 as pb

    schema = load_schema(args.schema)
    codec = RequestCodec(schema)
    wire = predict_parser()
    with tempfile.TemporaryDirectory() as tmp:
        alt = compile_alternatives(Path(tmp))
        layouts: list[tuple[str, Callable[[Any], bytes], Callable[[bytes], Any]]] = [
            ("row/string", lambda ex: build_row(alt, ex, False), decoder_row(schema, alt.RowS, False)),
            ("row/bytes", lambda ex: build_row(alt, ex, True), decoder_row(schema, alt.RowB, True)),
            ("column/string", lambda ex: build_column_string(alt, ex),
             decoder_column(schema, alt.ColS, False)),
            ("column/bytes", lambda ex: build_request(ex.context, ex.candidates).SerializeToString(),
             decoder_column(schema, pb.PredictRequest, True)),
            ("adpredict.v1", lambda ex: build_request(ex.context, ex.candidates).SerializeToString(),
             lambda data: codec.decode(pb.PredictRequest.FromString(data))),
            ("v1 wire", lambda ex: build_request(ex.context, ex.candidates).SerializeToString(),
             lambda data: codec.decode(wire(data))),
            ("+ merge", lambda ex: build_request(ex.context, ex.candidates).SerializeToString(),
             lambda data: codec.merge([codec.decode(wire(data))])),
        ]  # fmt: skip
        examples = {k: example_request(schema, k=k, seed=k) for k in KS}
        cells = [
            (name, k, build(examples[k]), decode) for name, build, decode in layouts for k in KS
        ]
        best = {(name, k): float("inf") for name, k, _, _ in cells}
        # Rounds interleave every cell, so load from other processes hits all layouts alike.
        for _ in range(args.repeat):
            for name, k, data, decode in cells:
                n = max(20, 4_000 // k)
                best[name, k] = min(best[name, k], time_once(decode, data, n))
        print(
            f"schema {schema.name!r}: {len(schema.context_fields)} context + "
            f"{len(schema.candidate_fields)} candidate fields; protobuf backend "
            f"{api_implementation.Type()}; best of {args.repeat} interleaved rounds"
        )
        print("us per candidate (total us per request) to parse + build numpy arrays; wire bytes")
        header = f"{'layout':<14}" + "".join(f"{'K=' + str(k):>24}" for k in KS)
        print(header)
        print("-" * len(header))
        sizes = {(name, k): len(data) for name, k, data, _ in cells}
        for name, _, _ in layouts:
            row = "".join(
                f"{best[name, k] * 1e6 / k:8.2f} ({best[name, k] * 1e6:7.1f}) {sizes[name, k]:>6}B"
                for k in KS
            )
            print(f"{name:<14}{row}")


if __name__ == "__main__":
    main()
