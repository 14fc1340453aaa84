"""Adam vs Adagrad vs LazyAdam on the same data and model, plus the input pipeline's cost.

For each optimizer: a fresh DeepFM on the built-in ``rtb`` schema (2,245,390 table rows
>= 2^21), one epoch over the same synthetic training split, then log-loss on the same
held-out split. Throughput is the median of per-window rates (windows of 50 steps,
after 10 warm-up steps that compile the step function), so one slow moment on a shared
machine does not decide the result.

Then, with LazyAdam: one epoch read from TFRecord shards through ``tf.data`` versus one
epoch over the same batches already parsed and held in memory (the same model, already
compiled, trained by both). The difference is what the input pipeline costs the trainer.
The pair is measured ``--repeats`` times, alternating which side goes first; the cost is
the median of the per-pair costs, with the range and the load average beside it.

    python benchmarks/bench_optimizers.py [--rows 1000000] [--data DIR] [--quick]
        [--repeats 3] [--pipeline-only]

Writes ``benchmarks/results/optimizers.json`` and ``optimizers.md`` (a markdown table;
``optimizers.quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

from adpredict.data import records, synth
from adpredict.model import evaluation
from adpredict.model.ctr import CTRModel
from adpredict.model.train import DEFAULT_LEARNING_RATES, Trainer, make_optimizer
from adpredict.schema import default_schema

RESULTS = Path(__file__).parent / "results"
WINDOW = 50
WARMUP = 10
CHUNK = 100  # steps per side in the interleaved pipeline measurement
CHUNK_SKIP = 20  # untimed steps at the start of each chunk


def ensure_data(path: Path | None, rows: int, seed: int) -> Path:
    """Use ``path`` if it is a data set, else generate ``rows`` synthetic rows into a temp dir."""
    if path and (path / records.MANIFEST).is_file():
        return path
    out = path or Path(tempfile.mkdtemp(prefix="adpredict-bench-")) / "data"
    print(f"generating {rows:,} synthetic rows into {out} ...", file=sys.stderr)
    schema = default_schema()
    with records.DatasetWriter(
        out,
        schema,
        rows_per_shard=math.ceil(rows / 10),
        has_true_ctr=True,
        source=f"bench_optimizers rows={rows} seed={seed}",
    ) as writer:
        for block in synth.generate(rows, seed):
            writer.write_columns(block.columns, block.labels, block.true_ctr)
    return out


def timed_epoch(trainer: Trainer, batches: Any) -> dict[str, float]:
    """Train one pass; per-window rates (examples/s) after the warm-up steps."""
    rates: list[float] = []
    examples = 0
    window_examples = 0
    started = time.perf_counter()
    window_start = None
    for step, batch in enumerate(batches, 1):
        loss = trainer.train_step(batch)
        n = int(batch[records.LABEL].shape[0])
        examples += n
        if step == WARMUP:
            float(loss)
            window_start = time.perf_counter()
            window_examples = 0
        elif step > WARMUP:
            window_examples += n
            if (step - WARMUP) % WINDOW == 0:
                float(loss)  # sync
                now = time.perf_counter()
                rates.append(window_examples / (now - window_start))
                window_start, window_examples = now, 0
    float(loss)
    total = time.perf_counter() - started
    return {
        "examples": examples,
        "seconds": total,
        "examples_per_s_median": statistics.median(rates) if rates else examples / total,
        "examples_per_s_overall": examples / total,
        "windows": len(rates),
    }


def holdout_metrics(
    trainer: Trainer, info: records.DatasetInfo, batch_size: int
) -> dict[str, float]:
    ds = records.make_dataset(
        info.files,
        info.schema,
        8192,
        holdout_every=10,
        holdout=True,
        with_true_ctr=info.has_true_ctr,
        format_version=info.format_version,
    )
    out = trainer.predict(ds, with_true_ctr=info.has_true_ctr)
    metrics = evaluation.summarize(out[1], out[0])
    if info.has_true_ctr:
        metrics["oracle_logloss"] = evaluation.logloss(out[1], out[2])
    return metrics


def new_trainer(info: records.DatasetInfo, optimizer: str, steps: int, base_rate: float) -> Trainer:
    model = CTRModel(info.schema, kind="deepfm", seed=0)
    model.bias.assign(math.log(base_rate / (1 - base_rate)))
    return Trainer(model, make_optimizer(optimizer, DEFAULT_LEARNING_RATES[optimizer], steps), 1e-4)


def timed_steps(trainer: Trainer, batches: Iterator[Any], steps: int, skip: int) -> float:
    """Train ``steps`` steps; examples/s over all but the first ``skip``."""
    examples, start, loss = 0, 0.0, None
    for step in range(steps):
        batch = next(batches)
        if step == skip:
            float(loss)  # sync
            start, examples = time.perf_counter(), 0
        loss = trainer.train_step(batch)
        examples += int(batch[records.LABEL].shape[0])
    float(loss)
    return examples / (time.perf_counter() - start)


def pipeline_cost(
    info: records.DatasetInfo,
    train_ds: Callable[[], Any],
    steps: int,
    base_rate: float,
    repeats: int,
    chunks: int,
) -> dict[str, Any]:
    """TFRecord vs in-memory training with LazyAdam: whole epochs and interleaved chunks.

    The in-memory side trains on the pipeline's own batches, parsed once beforehand, so
    both sides see the same batch sizes, features and model; only reading and parsing
    differ. ``epochs``: ``repeats`` pairs of whole epochs (the median of 50-step windows
    each), alternating which side goes first. ``interleaved``: ``chunks`` pairs of
    ``CHUNK`` steps from memory and ``CHUNK`` from a fresh pipeline, alternating, each
    timed after its first ``CHUNK_SKIP`` steps. On a machine shared with other jobs the
    load changes within seconds, and short alternating chunks see the same load on both
    sides; the skipped steps hold the pipeline's start (first chunk of a side) and
    its refill of prefetch buffers (the chunk after a pipeline chunk), so neither side
    is timed with the other's leftovers. Each cost is the median of the per-pair costs.
    """
    in_memory = list(train_ds())
    trainer = new_trainer(info, "lazyadam", steps, base_rate)
    timed_epoch(trainer, in_memory[: WARMUP + WINDOW])  # compile outside the comparison
    epochs = []
    for i in range(repeats):
        load_before = os.getloadavg()[0]
        if i % 2 == 0:
            memory = timed_epoch(trainer, in_memory)
            record = timed_epoch(trainer, train_ds())
        else:
            record = timed_epoch(trainer, train_ds())
            memory = timed_epoch(trainer, in_memory)
        epochs.append(
            pair_result(
                record["examples_per_s_median"], memory["examples_per_s_median"], load_before
            )
        )
        report(f"epoch pair {i + 1}/{repeats}", epochs[-1])
    chunk_runs = []
    for i in range(chunks):
        load_before = os.getloadavg()[0]
        start = (i * CHUNK) % max(1, len(in_memory) - CHUNK)
        rates = {}
        for side in ("memory", "records") if i % 2 == 0 else ("records", "memory"):
            batches = iter(in_memory[start:]) if side == "memory" else iter(train_ds())
            rates[side] = timed_steps(trainer, batches, CHUNK, CHUNK_SKIP)
        chunk_runs.append(pair_result(rates["records"], rates["memory"], load_before))
        report(f"chunk pair {i + 1}/{chunks}", chunk_runs[-1])
    del in_memory
    return {
        "format_version": info.format_version,
        "epochs": summarize_pairs(epochs),
        "interleaved": {"chunk_steps": CHUNK, "skipped_steps": CHUNK_SKIP}
        | summarize_pairs(chunk_runs),
    }


def pair_result(records_rate: float, memory_rate: float, load_before: float) -> dict[str, float]:
    return {
        "tfrecord_examples_per_s": records_rate,
        "in_memory_examples_per_s": memory_rate,
        "cost": 1 - records_rate / memory_rate,
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0],
    }


def report(what: str, run: dict[str, float]) -> None:
    print(
        f"  {what}: TFRecord {run['tfrecord_examples_per_s']:,.0f} vs in-memory "
        f"{run['in_memory_examples_per_s']:,.0f} examples/s: cost {run['cost'] * 100:.1f}% "
        f"(load {run['load_1min_before']:.2f} -> {run['load_1min_after']:.2f})",
        file=sys.stderr,
    )


def summarize_pairs(runs: list[dict[str, float]]) -> dict[str, Any]:
    if not runs:
        return {"runs": []}
    costs = [r["cost"] for r in runs]
    return {
        "tfrecord_examples_per_s": statistics.median(r["tfrecord_examples_per_s"] for r in runs),
        "in_memory_examples_per_s": statistics.median(r["in_memory_examples_per_s"] for r in runs),
        "cost": statistics.median(costs),
        "cost_min": min(costs),
        "cost_max": max(costs),
        "load_1min": [r["load_1min_before"] for r in runs],
        "runs": runs,
    }


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--data", type=Path, default=None, help="existing data set (rtb schema)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="300k rows: a couple of minutes")
    parser.add_argument("--repeats", type=int, default=3, help="TFRecord/in-memory epoch pairs")
    parser.add_argument(
        "--chunks", type=int, default=10, help="interleaved TFRecord/in-memory chunk pairs"
    )
    parser.add_argument(
        "--pipeline-only", action="store_true", help="skip the optimizer comparison"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = 300_000 if args.quick and args.data is None else args.rows
    info = records.read_manifest(ensure_data(args.data, rows, args.seed))
    if info.schema.total_buckets < 1 << 21:
        raise SystemExit(f"the data's schema has {info.schema.total_buckets} rows; need >= 2^21")

    def train_ds() -> Any:
        return records.make_dataset(
            info.files,
            info.schema,
            args.batch_size,
            holdout_every=10,
            shuffle_buffer=100_000,
            seed=args.seed,
            format_version=info.format_version,
        )

    train_rows = info.rows - sum(records.holdout_rows(r, 10) for _, r in info.shards)
    steps = records.training_batches(
        [r for _, r in info.shards], args.batch_size, 10, info.format_version
    )
    labels = [b[records.LABEL].numpy().mean() for _, b in zip(range(50), train_ds(), strict=False)]
    base_rate = float(sum(labels) / len(labels))

    results: dict[str, Any] = {
        "machine": machine(),
        "data": {
            "path": str(info.path),
            "rows": info.rows,
            "train_rows": train_rows,
            "table_rows": info.schema.total_buckets,
        },
        "batch_size": args.batch_size,
        "optimizers": {},
    }
    for name in () if args.pipeline_only else ("adam", "adagrad", "lazyadam"):
        print(f"training with {name} ...", file=sys.stderr)
        trainer = new_trainer(info, name, steps, base_rate)
        speed = timed_epoch(trainer, train_ds())
        quality = holdout_metrics(trainer, info, args.batch_size)
        results["optimizers"][name] = {
            "learning_rate": DEFAULT_LEARNING_RATES[name],
            **speed,
            **quality,
        }
        print(
            f"  {speed['examples_per_s_median']:,.0f} examples/s, logloss {quality['logloss']:.5f}",
            file=sys.stderr,
        )

    print("input pipeline: TFRecord vs in-memory (lazyadam) ...", file=sys.stderr)
    results["input_pipeline"] = pipeline_cost(
        info, train_ds, steps, base_rate, args.repeats, args.chunks
    )
    opt = results["optimizers"]
    results["summary"] = (
        {}
        if args.pipeline_only
        else {
            "lazyadam_speedup_vs_adam": opt["lazyadam"]["examples_per_s_median"]
            / opt["adam"]["examples_per_s_median"],
            "lazyadam_logloss_vs_adam": opt["lazyadam"]["logloss"] / opt["adam"]["logloss"] - 1,
            "adagrad_speedup_vs_adam": opt["adagrad"]["examples_per_s_median"]
            / opt["adam"]["examples_per_s_median"],
        }
    )
    results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    results["git"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    results["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "pipeline" if args.pipeline_only else "optimizers"
    if args.quick:  # a smoke run (make bench) must not replace the full run's results
        stem += ".quick"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = render(results)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    return 0


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"Optimizers on DeepFM, {r['data']['table_rows']:,} table rows, {r['data']['train_rows']:,} "
        f"training rows, batch {r['batch_size']} ({m['cores']} cores, {m['cpu']}, TF {m['tensorflow']})",
        "",
    ]
    if r["optimizers"]:
        lines += [
            "| optimizer | lr | examples/s (median) | vs Adam | held-out logloss | vs Adam | AUC |",
            "|---|---|---|---|---|---|---|",
        ]
    adam = r["optimizers"].get("adam")
    for name, o in r["optimizers"].items():
        lines.append(
            f"| {name} | {o['learning_rate']} | {o['examples_per_s_median']:,.0f} | "
            f"{o['examples_per_s_median'] / adam['examples_per_s_median']:.2f}x | {o['logloss']:.5f} | "
            f"{(o['logloss'] / adam['logloss'] - 1) * 100:+.2f}% | {o['auc']:.4f} |"
        )
    p = r["input_pipeline"]
    lines.append("")
    for kind, label in (("epochs", "whole epochs"), ("interleaved", "interleaved chunks")):
        q = p[kind]
        if not q["runs"]:
            continue
        lines.append(
            f"Input pipeline (LazyAdam, data format {p['format_version']}, {label}): TFRecord "
            f"{q['tfrecord_examples_per_s']:,.0f} vs in-memory "
            f"{q['in_memory_examples_per_s']:,.0f} examples/s (medians): cost "
            f"{q['cost'] * 100:.1f}% (median of {len(q['runs'])} pairs, range "
            f"{q['cost_min'] * 100:.1f} to {q['cost_max'] * 100:.1f}%; 1-min load "
            + ", ".join(f"{x:.1f}" for x in q["load_1min"])
            + ")"
        )
    lines += [
        "",
        f"Command: `{r['command']}` (git {r['git']}, {r['date']})",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
