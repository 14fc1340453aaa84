"""The two front ends side by side: grpc.aio (``--frontend grpcio``) vs the C++ intake (native).

    .venv/bin/python benchmarks/bench_frontends.py --model-dir models            # ~6 min
    .venv/bin/python benchmarks/bench_frontends.py --model-dir models --quick    # ~1.5 min

Setup as ``bench_batching.py``: one ``adpredict serve --workers 1`` per front end (batching on,
default flags plus ``--server-args``), pinned to ``--server-cpus`` (core 0); the load generator
(``adpredict.loadtest``, one process) pinned with this process to ``--client-cpus`` (core 1).
Both servers run at once but only one is loaded at a time; the points alternate between them,
``--rounds`` times, so that both see the same machine, and each figure is the median over the
rounds. Points: closed loop with C = ``--concurrency`` (1, 8, 32) outstanding requests, for each
K in ``--k`` (32, 300), ``--deadline-ms`` (100) gRPC deadline, ``--warmup`` s unrecorded and
``--duration`` s recorded.

Per point: OK answers/s, OK predictions/s, p50/p99 of OK answers, errors, server compute calls
per OK answer and server CPU-µs per prediction (both as ``bench_batching.py`` measures them), and
the native/grpcio ratio of OK predictions/s and of CPU per prediction. Results: ``--out`` +
``.json`` / ``.md`` (default benchmarks/results/frontends, or frontends.quick with ``--quick``).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adpredict import loadtest
from bench_batching import LIVE, ROOT, Bench, Server, write_results

FRONTENDS = ("grpcio", "native")


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


METRICS = ("ok_rps", "predictions_per_s", "p50_ms", "p99_ms", "compute_calls_per_request",
           "cpu_us_per_prediction")  # fmt: skip


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (K, C, front end): medians over the rounds."""
    out = []
    keys = sorted({(r["k"], r["concurrency"]) for r in rows})
    for k, c in keys:
        per = {}
        for fe in FRONTENDS:
            mine = [r for r in rows if (r["k"], r["concurrency"], r["mode"]) == (k, c, fe)]
            if mine:
                errors: dict[str, int] = {}
                for r in mine:
                    for code, n in r["errors_by_code"].items():
                        errors[code] = errors.get(code, 0) + n
                per[fe] = {m: median(mine, m) for m in METRICS} | {
                    "rounds": len(mine),
                    "errors": errors,
                    "requests": sum(r["requests"] for r in mine),
                }
        line: dict[str, Any] = {"k": k, "concurrency": c, **per}
        g, n = per.get("grpcio"), per.get("native")
        if g and n and g["predictions_per_s"] and n["predictions_per_s"]:
            line["throughput_ratio"] = n["predictions_per_s"] / g["predictions_per_s"]
        if g and n and g["cpu_us_per_prediction"] and n["cpu_us_per_prediction"]:
            line["cpu_ratio"] = g["cpu_us_per_prediction"] / n["cpu_us_per_prediction"]
        out.append(line)
    return out


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def report_md(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Front ends: grpc.aio vs the native intake (`benchmarks/bench_frontends.py`)",
        "",
        f"{result['date']}; {result['machine']}. Servers pinned to CPU {s['server_cpus']}, load "
        f"generator to {s['client_cpus']}; closed loop, {s['deadline_ms']:g} ms deadline, "
        f"{s['warmup']:g} s warm-up + {s['duration']:g} s per point, {s['rounds']} alternating "
        f"rounds (medians). Server flags: `{s['server_args'] or '(defaults)'}`.",
        "",
        "| K | C | front end | OK req/s | OK pred/s | p50 ms | p99 ms | calls/OK | CPU-µs/pred "
        "| errors | native/grpcio pred/s | grpcio/native CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in result["summary"]:
        for fe in FRONTENDS:
            m = line.get(fe)
            if not m:
                continue
            errs = ", ".join(f"{c} {n}" for c, n in m["errors"].items()) or "0"
            last = fe == FRONTENDS[-1]
            lines.append(
                f"| {line['k']} | {line['concurrency']} | {fe} | {_f(m['ok_rps'], ',.0f')} | "
                f"{_f(m['predictions_per_s'], ',.0f')} | {_f(m['p50_ms'], '.2f')} | "
                f"{_f(m['p99_ms'], '.2f')} | {_f(m['compute_calls_per_request'], '.3f')} | "
                f"{_f(m['cpu_us_per_prediction'], '.1f')} | {errs} of {m['requests']:,} | "
                f"{_f(line.get('throughput_ratio') if last else None, '.2f')} | "
                f"{_f(line.get('cpu_ratio') if last else None, '.2f')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "models")
    p.add_argument("--k", type=ints, default=[32, 300], help="candidates per request (32,300)")
    p.add_argument("--concurrency", type=ints, default=[1, 8, 32], help="closed-loop C (1,8,32)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (3; quick 1)")
    p.add_argument("--duration", type=float, default=None, help="recorded s per point (8; quick 4)")
    p.add_argument("--warmup", type=float, default=None, help="unrecorded s per point (2; quick 1)")
    p.add_argument("--deadline-ms", type=float, default=100.0)
    p.add_argument("--pool", type=int, default=256, help="distinct requests per K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-cpus", default="0", help="taskset CPU list of the servers")
    p.add_argument("--client-cpus", type=ints, default=[1], help="CPUs of the load generator")
    p.add_argument("--server-args", default="", help="more serve flags for both servers")
    p.add_argument("--quick", action="store_true", help="one short round (~1.5 min)")
    p.add_argument("--out", default=None, help="results path without suffix")
    args = p.parse_args()
    for name, full, quick in (("rounds", 3, 1), ("duration", 8.0, 4.0), ("warmup", 2.0, 1.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.out is None:
        args.out = str(
            ROOT / "benchmarks/results" / ("frontends.quick" if args.quick else "frontends")
        )
    # What bench_batching.Bench reads.
    args.min_requests, args.p99_ms, args.max_error_rate = 0, 10.0, 0.001

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logs = Path(tempfile.gettempdir())
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": loadtest.machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    rows: list[dict[str, Any]] = []
    try:
        benches = {}
        base = args.server_args
        for fe in FRONTENDS:
            args.server_args = f"--frontend {fe} --log-level WARNING {base}"
            server = Server(args, True, logs / f"bench_frontends_{fe}_{os.getpid()}.log")
            server.wait_serving()
            benches[fe] = Bench(args, server, fe)
            result[f"server_command_{fe}"] = " ".join(server.cmd)
        args.server_args = base
        for _ in range(args.rounds):
            for k in args.k:
                for c in args.concurrency:
                    for fe in FRONTENDS:
                        row = benches[fe].point(k, f"C={c}", concurrency=c)
                        rows.append({key: v for key, v in row.items() if key != "report"})
    except KeyboardInterrupt:
        result["problems"] = ["interrupted: the table is incomplete"]
    finally:
        for server in list(LIVE):
            server.stop()
    result["rows"] = rows
    result["summary"] = summarize(rows)
    write_results(args.out, result, report_md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
