"""What one Predict costs in-process, stage by stage, without gRPC, asyncio or threads.

    .venv/bin/python benchmarks/probe_pipeline.py --model-dir models --k 300 --requests-per-batch 2

The server's own code path on pre-serialized requests from the load generator's pool
(``adpredict.loadtest.build_pool``): parse the bytes (``predict_parser``: the header, or upb
for unusual bytes), validate and decode (``RequestCodec.decode``: from the bytes, in C), merge
``--requests-per-batch`` requests into one feed, predict (``LoadedModel.predict``: the tensors
built from the arrays and the TensorFlow call), split, and serialize each ``PredictResponse``
(``encode_predict_response``, as the servicer does). Each stage is timed with process CPU
time (``time.process_time``, all threads, so TensorFlow's executor threads count), summed
over ``--batches`` batches. Pin it to one
core (``taskset -c 1``) to compare with a server pinned to one core. The difference between
a server's CPU per request and this sum is what serving adds: gRPC and the kernel's loopback
TCP, the event loop, the batcher and thread hand-offs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

STAGES = ("parse", "decode", "merge", "predict", "split", "respond")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=Path("models"))
    p.add_argument("--k", type=int, default=300, help="candidates per request (default 300)")
    p.add_argument("--requests-per-batch", type=int, default=2, help="requests merged per call")
    p.add_argument("--batches", type=int, default=300, help="compute calls measured")
    args = p.parse_args(argv)
    if args.k < 1 or args.requests_per_batch < 1 or args.batches < 1:
        p.error("--k, --requests-per-batch and --batches must be >= 1")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from adpredict.loadtest import CandidateSpec, build_pool
    from adpredict.serving.codec import (
        CodecLimits,
        RequestCodec,
        encode_predict_response,
        predict_parser,
    )
    from adpredict.serving.runtime import load_version
    from bench_model import find_version_dir  # benchmarks/ is not a package

    name, vdir = find_version_dir(args.model_dir)
    model = load_version(vdir, name=name, version=int(vdir.name))
    pool = build_pool(model.schema, CandidateSpec.parse(str(args.k)), 64,
                      max_candidates=max(args.k, 1024), seed=1)  # fmt: skip
    codec = RequestCodec(model.schema, CodecLimits(max_candidates=max(args.k, 1024)))
    parse = predict_parser()  # what both front ends deserialize Predict with
    spent = dict.fromkeys(STAGES, 0.0)
    clock = time.process_time
    requests = 0
    for b in range(args.batches + 5):  # the first five warm up and are not counted
        warm = b < 5
        t: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        parsed = []
        for j in range(args.requests_per_batch):
            payload = pool.payloads[(b * args.requests_per_batch + j) % len(pool.payloads)]
            t0 = clock()
            request = parse(payload)
            t1 = clock()
            parsed.append((request, codec.decode(request)))
            t2 = clock()
            t["parse"] += t1 - t0
            t["decode"] += t2 - t1
        t0 = clock()
        feed = codec.merge([d for _, d in parsed])
        t1 = clock()
        probabilities = model.predict(feed)
        t2 = clock()
        parts = codec.split(probabilities, [d for _, d in parsed])
        t3 = clock()
        t["merge"], t["predict"], t["split"] = t1 - t0, t2 - t1, t3 - t2
        for (request, _), part in zip(parsed, parts, strict=True):
            t0 = clock()
            encode_predict_response(
                request_id=request.request_id, probabilities=part, model=name,
                model_version=model.version, queue_us=1, compute_us=1, batch_predictions=1,
                batch_requests=1,
            )  # fmt: skip
            t["respond"] += clock() - t0
        if not warm:
            requests += args.requests_per_batch
            for stage in STAGES:
                spent[stage] += t[stage]

    size = np.mean([len(x) for x in pool.payloads])
    print(f"model {name} v{model.version}; K = {args.k}, {args.requests_per_batch} requests "
          f"per compute call, {args.batches} calls; request {size:,.0f} bytes")  # fmt: skip
    print("| stage | CPU-µs per request | CPU-µs per prediction |")
    print("|---|---|---|")
    for stage in (*STAGES, "total"):
        s = sum(spent.values()) if stage == "total" else spent[stage]
        print(f"| {stage} | {s / requests * 1e6:,.1f} | {s / requests / args.k * 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
