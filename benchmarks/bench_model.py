"""The ceiling: in-process predictions/s of an exported model versus batch size, on one core.

    .venv/bin/python benchmarks/bench_model.py --model-dir models            # full (~2 min)
    .venv/bin/python benchmarks/bench_model.py --model-dir models --quick    # ~20 s

No gRPC, no batcher: the model version is loaded with the server's own loader
(``adpredict.serving.runtime.load_version``: checks, warm-up, the same fast call path) and
``LoadedModel.predict`` is called back to back on pre-built feeds. A feed is what the server's
batcher hands the model: realistic requests (``adpredict.loadtest.build_pool``: synthetic bid
traffic with Zipf popularity, K candidates each) decoded and merged by the server's
``RequestCodec``, B predictions from ceil(B / K) requests (the last one sliced, as the batcher
splits), in the layout the server uses for this version: table rows for ``serving_rows`` when
the version serves through it (exports write it), strings for ``serving_default`` otherwise
(the JSON says which). ``predict`` includes turning the arrays into tensors, as in serving.

The process pins itself to ``--cpu`` (default 0) *before* TensorFlow starts, so TensorFlow sizes
its thread pools for one core, like a one-worker server pinned with ``taskset -c 0``. ``--cpu -1``
leaves it unpinned (all cores).

Per (K, B): ``--feeds`` distinct feeds cycled; calls repeat until ``--min-time`` seconds have
passed, ``--repeats`` times; the median repeat gives predictions/s, µs per call, and
CPU-µs per prediction (process CPU time over the same calls). Results: ``--out`` + ``.json`` /
``.md`` (default benchmarks/results/model_ceiling, or model_ceiling.quick with ``--quick``);
bench_batching.py reads the JSON for its "fraction of the ceiling" figure.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZES = tuple(2**i for i in range(13))  # 1 .. 4096


def find_version_dir(path: Path, name: str = "") -> tuple[str, Path]:
    """(model name, version dir) for a version dir, a model dir (NAME/) or a repository."""
    from adpredict.errors import ModelNotFoundError
    from adpredict.model.export import list_versions

    if (path / "saved_model.pb").is_file():
        return path.parent.name, path
    if list_versions(path):
        return path.name, path / str(list_versions(path)[-1])
    names = (
        sorted(p.name for p in path.iterdir() if p.is_dir() and list_versions(p))
        if path.is_dir()
        else []
    )
    if name:
        names = [n for n in names if n == name]
    if not names:
        raise ModelNotFoundError(
            f"{path}: no exported model here (make demo-model builds models/demo, or pass "
            "--model-dir MODELS)"
        )
    return names[0], path / names[0] / str(list_versions(path / names[0])[-1])


def build_feeds(model: Any, k: int, batch: int, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` distinct feeds of ``batch`` predictions from requests of ``k`` candidates."""
    import numpy as np

    from adpredict.loadtest import CandidateSpec, build_pool
    from adpredict.serving.batcher import Slice
    from adpredict.serving.codec import CodecLimits, RequestCodec, predict_parser

    per_feed = -(-batch // k)
    pool = build_pool(model.schema, CandidateSpec.parse(str(k)), per_feed * count,
                      max_candidates=max(k, 1024), seed=seed)  # fmt: skip
    # The feed the server hands this version: table rows if it serves through serving_rows.
    codec = RequestCodec(model.schema, CodecLimits(max_candidates=max(k, 1024)))
    parse = predict_parser()
    parsed = [codec.decode(parse(p), rows=model.has_rows) for p in pool.payloads]
    feeds = []
    for i in range(count):
        mine = parsed[i * per_feed : (i + 1) * per_feed]
        last = batch - k * (per_feed - 1)  # predictions taken from the last request
        parts = [*mine[:-1], Slice(mine[-1], 0, last)]
        feed = codec.merge(parts, rows=model.has_rows)
        assert len(feed["request_index"]) == batch and np.all(np.diff(feed["request_index"]) >= 0)
        feeds.append(feed)
    return feeds


def measure(
    model: Any, feeds: list[dict[str, Any]], min_time_s: float, repeats: int
) -> dict[str, float]:
    batch = len(feeds[0]["request_index"])
    runs = []
    for _ in range(repeats):
        calls = 0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        while True:
            model.predict(feeds[calls % len(feeds)])
            calls += 1
            wall = time.perf_counter() - wall0
            if wall >= min_time_s and calls >= 3:
                break
        cpu = time.process_time() - cpu0
        runs.append((calls * batch / wall, wall / calls * 1e6, cpu / (calls * batch) * 1e6, calls))
    mid = sorted(runs)[len(runs) // 2]
    return {
        "predictions_per_s": mid[0],
        "us_per_call": mid[1],
        "cpu_us_per_prediction": mid[2],
        "calls": mid[3],
        "predictions_per_s_all_repeats": [r[0] for r in runs],
    }


def report_md(result: dict[str, Any]) -> str:
    ks = sorted({r["k"] for r in result["rows"]})
    lines = [
        "# Model ceiling (bench_model): in-process predictions/s vs batch size",
        "",
        f"Command: `{result['command']}`  ",
        f"Model: {result['model']} ({result['version_dir']}), fed through "
        f"{result.get('signature', 'serving_default')}; CPU {result['cpu']}; TensorFlow "
        f"{result['tensorflow']}; {result['machine']['cores']} cores {result['machine']['cpu_model']}; "
        f"load average at start {result['machine']['loadavg']}  ",
        f"Median of {result['settings']['repeats']} repeats of >= {result['settings']['min_time']:g} s "
        f"per point, {result['settings']['feeds']} distinct feeds cycled.",
        "",
        "| batch | " + " | ".join(f"K={k} pred/s | µs/call | CPU-µs/pred" for k in ks) + " |",
        "|---|" + "---|---|---|" * len(ks),
    ]
    for b in sorted({r["batch"] for r in result["rows"]}):
        cells = []
        for k in ks:
            r = next(r for r in result["rows"] if r["k"] == k and r["batch"] == b)
            cells += [f"{r['predictions_per_s']:,.0f}", f"{r['us_per_call']:,.0f}",
                      f"{r['cpu_us_per_prediction']:.2f}"]  # fmt: skip
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "Ceiling (best batch size):", ""]
    for k, c in result["ceiling"].items():
        lines.append(f"- K={k}: **{c['predictions_per_s']:,.0f} pred/s** at batch {c['batch']}")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    p.add_argument("--model-dir", type=Path, default=ROOT / "models",
                   help="version dir, model dir or repository (default: models/)")  # fmt: skip
    p.add_argument("--model", default="", help="model name in a repository (default: first)")
    p.add_argument("--k", type=ints, default=(32, 300), help="candidates per request (32,300)")
    p.add_argument("--batch-sizes", type=ints, default=BATCH_SIZES, help="1,2,4,...,4096")
    p.add_argument("--cpu", type=int, default=0, help="core to pin to before TF starts; -1 = none")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per repeat (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per point; the median counts")
    p.add_argument("--feeds", type=int, default=8, help="distinct feeds per point")
    p.add_argument("--quick", action="store_true", help="0.2 s x 1 repeat per point (~20 s)")
    p.add_argument("--out", default=None,
                   help="output stem (default benchmarks/results/model_ceiling[.quick])")  # fmt: skip
    args = p.parse_args()
    if args.quick:
        args.min_time, args.repeats = 0.2, 1
    if args.out is None:  # a quick run never overwrites the full run's results
        args.out = str(
            ROOT / "benchmarks/results" / ("model_ceiling.quick" if args.quick else "model_ceiling")
        )
    if args.cpu >= 0:
        if args.cpu not in os.sched_getaffinity(0):
            p.error(
                f"--cpu {args.cpu}: not one of this process's CPUs {sorted(os.sched_getaffinity(0))}"
            )
        os.sched_setaffinity(0, {args.cpu})  # before TensorFlow creates its thread pools
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from adpredict.errors import AdpredictError
    from adpredict.loadtest import machine_info
    from adpredict.serving.runtime import load_version

    try:
        name, vdir = find_version_dir(args.model_dir, args.model)
        model = load_version(vdir, name=name, version=int(vdir.name))
    except AdpredictError as exc:
        print(f"bench_model: error: {exc}", file=sys.stderr)
        return 2
    rows = []
    for k in args.k:
        for b in args.batch_sizes:
            feeds = build_feeds(model, k, b, args.feeds, seed=b)
            row = {"k": k, "batch": b, **measure(model, feeds, args.min_time, args.repeats)}
            rows.append(row)
            print(f"K={k:4d} batch={b:5d}: {row['predictions_per_s']:12,.0f} pred/s "
                  f"{row['us_per_call']:9,.0f} µs/call {row['cpu_us_per_prediction']:7.2f} CPU-µs/pred",
                  flush=True)  # fmt: skip
    ceiling = {}
    for k in args.k:
        best = max((r for r in rows if r["k"] == k), key=lambda r: r["predictions_per_s"])
        ceiling[str(k)] = {"predictions_per_s": best["predictions_per_s"], "batch": best["batch"]}
    result = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "cpu": f"pinned to {args.cpu}" if args.cpu >= 0 else "not pinned",
        "tf_threads": {
            "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        },
        "tensorflow": tf.__version__,
        "model": f"{name} v{vdir.name} (schema {model.schema.name})",
        "signature": "serving_rows" if model.has_rows else "serving_default",
        "version_dir": str(vdir),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model_dir")},
        "rows": rows,
        "ceiling": ceiling,
        "quick": args.quick,
    }
    from bench_batching import write_results  # here: nothing of it before TF is pinned

    write_results(args.out, result, report_md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
