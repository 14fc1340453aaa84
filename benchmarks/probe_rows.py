"""What the model costs fed table rows instead of strings: the case for hashing in the decoder.

    taskset -c 1 .venv/bin/python benchmarks/probe_rows.py --model-dir models

The exported version is served through its string signature (``LoadedModel.predict``: the
tensors built from the object arrays, then the SavedModel call), as ``bench_model.py``
measures it. The same weights are then put in a ``CTRModel`` (``copy_weights_from_export``)
and each feed is hashed once, ahead of time, by the model's own ``FeatureHasher``; the timed
call is the rest of the graph (``rows_of`` + ``logits_of``: admission, the table gather, FM and
MLP) on those rows. The difference is what TensorFlow spends on strings: converting them,
hashing, comparing and copying. Both answer the same feeds; the probabilities must agree.

Feeds: ``bench_model.build_feeds`` (the load generator's requests, decoded and merged by the
server's codec). Alternates the two for ``--rounds`` rounds of ``--seconds`` each and prints
predictions/s and process CPU-µs per prediction; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("models"))
    p.add_argument("--k", type=int, default=300, help="candidates per request (default 300)")
    p.add_argument("--batch", type=int, default=4096, help="predictions per call (default 4096)")
    p.add_argument("--feeds", type=int, default=4, help="distinct feeds cycled (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    p.add_argument("--seconds", type=float, default=2.0, help="per round and path (default 2)")
    args = p.parse_args(argv)
    if min(args.k, args.batch, args.feeds, args.rounds) < 1 or not args.seconds > 0:
        p.error("--k, --batch, --feeds, --rounds must be >= 1 and --seconds > 0")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import numpy as np
    import tensorflow as tf

    from adpredict.model.ctr import CTRModel
    from adpredict.model.export import copy_weights_from_export, read_metadata
    from adpredict.model.features import HashedFeatures
    from adpredict.serving.runtime import load_version
    from bench_model import build_feeds, find_version_dir

    name, vdir = find_version_dir(args.model_dir)
    served = load_version(vdir, name=name, version=int(vdir.name))
    meta = read_metadata(vdir)["model"]
    model = CTRModel(served.schema, kind=meta["kind"], dim=meta["dim"], hidden=meta["hidden"])
    feeds = build_feeds(served, args.k, args.batch, args.feeds, seed=0)

    def as_tensors(feed: dict[str, Any]) -> dict[str, tf.Tensor]:
        return {k: tf.constant(v.tolist() if v.dtype == object else v) for k, v in feed.items()}

    model(as_tensors(feeds[0]))  # creates the variables
    copy_weights_from_export(model, vdir)

    def rows_feed(feed: dict[str, Any]) -> list[np.ndarray]:
        h = model.hasher(as_tensors(feed))
        return [h.single_ids.numpy(), *(i.numpy() for i in h.multi_ids),
                *(w.numpy() for w in h.multi_weights)]  # fmt: skip

    multi = len(model.hasher.multi_fields)
    spec = [tf.TensorSpec([None, len(model.hasher.single_fields)], tf.int64)]
    spec += [tf.TensorSpec([None, None], tf.int64)] * multi
    spec += [tf.TensorSpec([None, None], tf.float32)] * multi

    @tf.function(input_signature=spec)
    def from_rows(single: tf.Tensor, *rest: tf.Tensor) -> tf.Tensor:
        hashed = HashedFeatures(single, tuple(rest[:multi]), tuple(rest[multi:]))
        return tf.sigmoid(model.logits_of(model.rows_of(hashed)))

    rows = [rows_feed(f) for f in feeds]
    paths = {
        "strings (LoadedModel.predict)": lambda i: served.predict(feeds[i]),
        "table rows (rows_of + logits_of)": lambda i: from_rows(
            *(tf.constant(a) for a in rows[i])
        ).numpy(),
    }
    answers = [fn(0) for fn in paths.values()]
    diff = float(np.abs(answers[0] - answers[1]).max())
    print(
        f"model {name} {vdir.name}; K = {args.k}, batch {args.batch}; max |difference| {diff:.2g}"
    )
    if diff > 1e-5:
        print("the two paths disagree: not a like-for-like comparison", file=sys.stderr)
        return 1
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in paths}
    for _ in range(args.rounds):
        for label, fn in paths.items():
            calls, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - wall0 < args.seconds:
                fn(calls % len(feeds))
                calls += 1
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            results[label].append((calls * args.batch / wall, cpu / (calls * args.batch) * 1e6))
    for label, runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        cpu_us = statistics.median(r[1] for r in runs)
        each = ", ".join(f"{r[0]:,.0f}" for r in runs)
        print(f"{label:34s} {rate:10,.0f} pred/s  {cpu_us:.2f} CPU-µs/pred  (rounds: {each})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
