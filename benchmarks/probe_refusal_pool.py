"""Writes the load generator's requests for a server's default model to a file that
``probe_refusal.cc`` reads: (uint32 little-endian length, serialized PredictRequest) records.

    .venv/bin/python benchmarks/probe_refusal_pool.py --target HOST:PORT --out /tmp/pool300.bin --k 300
"""

from __future__ import annotations

import argparse
import struct
from pathlib import Path

from adpredict import loadtest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="localhost:50051")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--k", default="32", help="candidates per request, as loadtest --candidates")
    p.add_argument("--pool", type=int, default=64, help="distinct requests (64)")
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args()
    info = loadtest.fetch_model_info(args.target, "")
    pool = loadtest.build_pool(
        info.schema,
        loadtest.CandidateSpec.parse(args.k),
        args.pool,
        model=info.model,
        max_candidates=info.max_candidates or 1024,
        seed=args.seed,
    )
    tmp = args.out.with_name(args.out.name + ".tmp")
    with tmp.open("wb") as f:
        for payload in pool.payloads:
            f.write(struct.pack("<I", len(payload)))
            f.write(payload)
    tmp.replace(args.out)  # never a half-written pool
    print(
        f"{args.out}: {len(pool.payloads)} requests, {pool.describe()['mean_bytes']:,.0f} bytes each"
    )


if __name__ == "__main__":
    main()
