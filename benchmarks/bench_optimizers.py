"""Adam vs Adagrad vs LazyAdam on the same data and model, plus the input pipeline's cost.

For each optimizer: a fresh DeepFM on the built-in ``rtb`` schema (2,245,390 table rows
>= 2^21), one epoch over the same synthetic training split, then log-loss on the same
held-out split. Throughput is the median of per-window rates (windows of 50 steps,
after 10 warm-up steps that compile the step function), so one slow moment on a shared
machine does not decide the result.

Then, with LazyAdam: one epoch read from TFRecord shards through ``tf.data`` versus one
epoch over the same batches already parsed and held in memory. The difference is what
the input pipeline costs the trainer.

    python benchmarks/bench_optimizers.py [--rows 1000000] [--data DIR] [--quick]

Writes ``benchmarks/results/optimizers.json`` and ``optimizers.md`` (a markdown table).
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
        )

    train_rows = info.rows - sum(records.holdout_rows(r, 10) for _, r in info.shards)
    steps = math.ceil(train_rows / args.batch_size)
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
    for name in ("adam", "adagrad", "lazyadam"):
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
    in_memory = [b for b in train_ds()]
    trainer = new_trainer(info, "lazyadam", steps, base_rate)
    timed_epoch(trainer, in_memory[: WARMUP + WINDOW])  # compile outside the comparison
    from_memory = timed_epoch(trainer, in_memory)
    from_records = timed_epoch(trainer, train_ds())
    del in_memory
    results["input_pipeline"] = {
        "tfrecord_examples_per_s": from_records["examples_per_s_median"],
        "in_memory_examples_per_s": from_memory["examples_per_s_median"],
        "cost": 1 - from_records["examples_per_s_median"] / from_memory["examples_per_s_median"],
    }
    opt = results["optimizers"]
    results["summary"] = {
        "lazyadam_speedup_vs_adam": opt["lazyadam"]["examples_per_s_median"]
        / opt["adam"]["examples_per_s_median"],
        "lazyadam_logloss_vs_adam": opt["lazyadam"]["logloss"] / opt["adam"]["logloss"] - 1,
        "adagrad_speedup_vs_adam": opt["adagrad"]["examples_per_s_median"]
        / opt["adam"]["examples_per_s_median"],
    }
    results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    results["git"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    results["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "optimizers.json").write_text(json.dumps(results, indent=2) + "\n")
    table = render(results)
    (args.out / "optimizers.md").write_text(table)
    print(table)
    return 0


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"Optimizers on DeepFM, {r['data']['table_rows']:,} table rows, {r['data']['train_rows']:,} "
        f"training rows, batch {r['batch_size']} ({m['cores']} cores, {m['cpu']}, TF {m['tensorflow']})",
        "",
        "| optimizer | lr | examples/s (median) | vs Adam | held-out logloss | vs Adam | AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    adam = r["optimizers"]["adam"]
    for name, o in r["optimizers"].items():
        lines.append(
            f"| {name} | {o['learning_rate']} | {o['examples_per_s_median']:,.0f} | "
            f"{o['examples_per_s_median'] / adam['examples_per_s_median']:.2f}x | {o['logloss']:.5f} | "
            f"{(o['logloss'] / adam['logloss'] - 1) * 100:+.2f}% | {o['auc']:.4f} |"
        )
    p = r["input_pipeline"]
    lines += [
        "",
        f"Input pipeline (LazyAdam): TFRecord {p['tfrecord_examples_per_s']:,.0f} examples/s vs "
        f"in-memory {p['in_memory_examples_per_s']:,.0f} examples/s: cost {p['cost'] * 100:.1f}%",
        "",
        f"Command: `{r['command']}` (git {r['git']}, {r['date']})",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
