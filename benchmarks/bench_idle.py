"""The idle penalty: how much slower a model call is when the process was idle before it.

Calls the exported model in-process (the server's loader and call path, K = 32 synthetic feed)
back to back and after sleeping 2 ms and 20 ms before each call, and does the same with a NumPy
sort of similar cost as a control for generic CPU effects (caches, frequency). Pin it to one
core as a one-worker server is pinned::

    taskset -c 0 .venv/bin/python benchmarks/bench_idle.py --model-dir models

Prints the median and p90 µs per call for each gap; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

GAPS_S = (0.0, 0.002, 0.02)


def measure(work: Callable[[], object], gap_s: float, calls: int) -> tuple[float, float]:
    """(p50, p90) µs of ``work()`` when each call follows ``gap_s`` of sleep."""
    work()
    times = []
    for _ in range(calls):
        if gap_s:
            time.sleep(gap_s)
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1e6)
    times.sort()
    return statistics.median(times), times[int(0.9 * len(times))]


def latest_version(model_dir: Path) -> Path:
    versions = sorted(
        (p for p in model_dir.glob("*/*") if p.name.isdigit()), key=lambda p: int(p.name)
    )
    if not versions:
        raise SystemExit(f"no MODEL/VERSION under {model_dir} (make demo-model)")
    return versions[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--calls", type=int, default=200, help="calls per gap")
    args = parser.parse_args()

    from adpredict.serving import runtime as rt

    vdir = latest_version(args.model_dir)
    model = rt.load_version(vdir, name=vdir.parent.name, version=int(vdir.name))
    feed = rt.synthetic_feed(model.schema, requests=1, candidates=32)
    data = np.random.default_rng(0).random(40_000)
    subjects = {
        f"model {vdir} (K = 32)": lambda: model.predict(feed),
        "numpy sort of 40k floats (control)": lambda: np.sort(data),
    }
    print(f"affinity {sorted(os.sched_getaffinity(0))}; {args.calls} calls per gap")
    for name, work in subjects.items():
        base = None
        for gap in GAPS_S:
            p50, p90 = measure(work, gap, args.calls)
            base = base or p50
            print(
                f"{name:42s} gap {gap * 1e3:4.0f} ms: p50 {p50:7.0f} µs  p90 {p90:7.0f} µs  "
                f"({p50 / base:.2f}x)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
