"""Soak: 70% of the maximum sustainable rate for 10 minutes; memory and latency drift.

    .venv/bin/python benchmarks/bench_soak.py --model-dir models                   # ~12-15 min
    .venv/bin/python benchmarks/bench_soak.py --model-dir models --max-rate 900    # ~11 min
    .venv/bin/python benchmarks/bench_soak.py --model-dir models --quick           # ~1 min

Same setup as bench_overload.py (whose helpers it uses): one ``adpredict serve --workers 1``
pinned to ``--server-cpus``, the open-loop load generator pinned to ``--client-cpus``, K =
``--k`` (32), ``--deadline-ms`` (50) gRPC deadline, and the maximum sustainable rate (p99 with
failures as misses <= ``--sla-ms``, <= 0.1% errors) searched for, given by ``--max-rate``, or
the closed-loop saturation throughput (``--max-rate-by saturation``).

The run: ``--warmup`` s (10) unrecorded, then ``--duration`` s (600) at ``--fraction`` (70%) of
the max rate, Poisson arrivals. A thread reads the server's resident memory (process tree,
/proc) every second and scrapes /metrics every 5 s (the server's own RSS gauge, queue depth).

Reported per ``--window`` (60 s) of send time: requests, errors, OK p50/p99/p99.9, and the
server RSS (median and last sample of the window). Drift is last window against first:
    RSS growth   median RSS of the last window / of the first - 1 (target < 10%); also the
                 least-squares slope of all RSS samples after the first window, in MiB/hour,
                 and the growth from the RSS when recording started to the last sample;
    p99 drift    OK p99 of the last window / of the first - 1 (target < +10%; a p99 that
                 falls is not a problem, and is reported as it is).
The first window starts after the warm-up, so start-up allocations (TensorFlow's pools, gRPC's
buffers) are mostly behind it. Results: ``--out`` + ``.json`` / ``.md`` (default
benchmarks/results/soak, or soak.quick with ``--quick``: 40 s in 10 s windows, indicative only).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from adpredict import loadtest
from bench_batching import Bench, Server
from bench_overload import (
    ServerSampler,
    add_common_arguments,
    fill_defaults,
    find_max_rate,
    fmt,
    gauge,
    health_status,
    judge,
    load_options,
    max_rate_source,
    run_sampled,
    run_with_server,
    write_outputs,
)

TARGETS = {"rss_growth": 0.10, "p99_drift": 0.10}


def windows(
    report: dict[str, Any], samples: loadtest.Samples, sampler: ServerSampler, args: Any
) -> list[dict[str, Any]]:
    """One row per ``--window`` of recorded send time: latency and the server's RSS."""
    t0 = report["start_monotonic_s"] + args.warmup
    rows = loadtest.timeline(samples, args.warmup, args.window)
    out = []
    for r in rows:
        begin = r["t_s"]
        sel = (samples.offset_s >= args.warmup + begin) & (
            samples.offset_s < args.warmup + begin + args.window
        )
        ok = sel & (samples.code == loadtest.OK)
        rss = sampler.rss_between(t0 + begin, t0 + begin + args.window)
        metric_rss = [
            gauge(s, "adpredict_process_resident_memory_bytes")
            for at, s in sampler.scrapes
            if t0 + begin <= at < t0 + begin + args.window
        ]
        out.append(
            {
                "t_s": begin,
                "requests": r["requests"],
                "errors": r["errors"],
                "ok_rps": r["ok"] / args.window,
                "p50_ms": r["p50"],
                "p99_ms": r["p99"],
                "p99_9_ms": r["p99_9"],
                "max_ms": r["max"],
                "p99_failures_as_misses_ms": r["p99_failures_as_misses"],
                "timeouts": int(np.isin(samples.code[sel], loadtest.TIMEOUT_CODES).sum()),
                "ok": int(ok.sum()),
                "rss_median_bytes": float(np.median(rss)) if rss else None,
                "rss_last_bytes": rss[-1] if rss else None,
                "metric_rss_last_bytes": next((m for m in reversed(metric_rss) if m), None),
            }
        )
    return out


def drift(rows: list[dict[str, Any]], sampler: ServerSampler, t0: float, window_s: float) -> dict:
    """Last window against the first: RSS growth, p99 drift, and the RSS trend."""
    first, last = (rows[0], rows[-1]) if rows else ({}, {})

    def change(key: str) -> float | None:
        a, b = first.get(key), last.get(key)
        return b / a - 1 if a and b is not None else None

    later = [(t - t0, b) for t, b in sampler.rss if t >= t0 + window_s]
    slope = None
    if len(later) >= 10:
        x, y = np.array([t for t, _ in later]), np.array([b for _, b in later], float)
        slope = float(np.polyfit(x, y, 1)[0]) * 3600 / 2**20  # MiB per hour
    at_start = sampler.rss_between(t0, t0 + 5.0)[:1]
    return {
        "rss_growth": change("rss_median_bytes"),
        "rss_first_window_bytes": first.get("rss_median_bytes"),
        "rss_last_window_bytes": last.get("rss_median_bytes"),
        "rss_slope_mib_per_hour": slope,
        "rss_growth_from_start": (
            sampler.rss[-1][1] / at_start[0] - 1 if at_start and sampler.rss else None
        ),
        "p99_drift": change("p99_ms"),
        "p99_first_window_ms": first.get("p99_ms"),
        "p99_last_window_ms": last.get("p99_ms"),
        "windows": len(rows),
    }


def report_md(result: dict[str, Any]) -> str:
    st = result["settings"]
    lines = [
        f"# Soak at {st['fraction']:.0%} of the maximum sustainable rate (bench_soak)"
        + (" — QUICK run" if st["quick"] else ""),
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; machine: {result['machine']['cores']} cores "
        f"{result['machine']['cpu_model']}, load average at start {result['machine']['loadavg']}  ",
        f"Server: `{result.get('server_command', '?')}`  ",
        f"Model: {result.get('model')}; K = {st['k']}; deadline {st['deadline_ms']:g} ms; SLA "
        f"{st['sla_ms']:g} ms",
        "",
    ]
    if "drift" not in result:
        return "\n".join([*lines, *(f"**{p}**" for p in result.get("problems", [])), ""])
    how = max_rate_source(st)
    s = result["loadtest"]["summary"]
    d = result["drift"]
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.1f}"  # noqa: E731
    lines += [
        f"Max sustainable rate {result['max_rate']:,.0f} req/s ({how}); offered "
        f"{result['rate']:,.0f} req/s for {st['duration']:g} s after {st['warmup']:g} s warm-up: "
        f"{s['requests']:,} requests, {s['errors']:,} errors "
        f"({', '.join(f'{c} {n:,}' for c, n in s['errors_by_code'].items()) or 'none'}), "
        f"OK p99 {fmt(s['latency_ms']['p99'])} ms overall.",
        "",
        "| window from s | requests | OK/s | errors | timeouts | p50 ms | p99 ms | p99.9 ms | "
        "max ms | RSS median MiB | RSS last MiB | server gauge MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in result["windows"]:
        lines.append(
            f"| {w['t_s']:g} | {w['requests']:,} | {w['ok_rps']:,.0f} | {w['errors']:,} | "
            f"{w['timeouts']:,} | {fmt(w['p50_ms'])} | {fmt(w['p99_ms'])} | {fmt(w['p99_9_ms'])} | "
            f"{fmt(w['max_ms'])} | {mib(w['rss_median_bytes'])} | {mib(w['rss_last_bytes'])} | "
            f"{mib(w['metric_rss_last_bytes'])} |"
        )
    lines += [
        "",
        f"RSS trend after the first window: {fmt(d['rss_slope_mib_per_hour'], '+.1f')} MiB/hour; "
        f"growth from the start of recording to the end: {fmt(d['rss_growth_from_start'], '+.2%')}."
        f" After the run: alive {result['alive']}, health {result['health']}.",
        "",
        "Targets (issue 6):",
        "",
        judge("RSS growth, last window / first window - 1", d["rss_growth"],
              TARGETS["rss_growth"], False, "+.2%"),
        judge("p99 drift, last window / first window - 1", d["p99_drift"],
              TARGETS["p99_drift"], False, "+.2%"),
        "",
    ]  # fmt: skip
    lines += [f"WARNING (generator): {w}" for w in result["loadtest"]["warnings"]]
    if st["quick"]:
        lines += ["", "**QUICK run: a short soak on a shared machine; indicative only.**"]
    lines += [f"**{p}**" for p in result.get("problems", [])]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(p)
    p.add_argument("--fraction", type=float, default=0.7, help="of the max rate (0.7)")
    p.add_argument("--duration", type=float, default=None, help="recorded s (600; quick 40)")
    p.add_argument("--warmup", type=float, default=None, help="unrecorded s (10; quick 2)")
    p.add_argument("--window", type=float, default=None, help="s per window (60; quick 10)")
    args = p.parse_args()
    fill_defaults(args, [("duration", 600.0, 40.0), ("warmup", 10.0, 2.0),
                         ("window", 60.0, 10.0)], "soak")  # fmt: skip

    def body(server: Server, bench: Bench) -> dict[str, Any]:
        max_rate, search = find_max_rate(bench, args)
        rate = args.fraction * max_rate
        options = load_options(server, args, rate=rate, duration_s=args.duration)
        sampler = ServerSampler(server.proc.pid, server.metrics_url, 1.0, 5.0)
        print(f"max rate {max_rate:,.0f} req/s; soaking at {rate:,.0f} req/s", flush=True)
        report, samples = run_sampled(options, bench.pool(args.k), sampler)
        alive = server.proc.poll() is None
        rows = windows(report, samples, sampler, args)
        t0 = report["start_monotonic_s"] + args.warmup
        return {
            "search": search,
            "max_rate": max_rate,
            "rate": rate,
            "alive": alive,
            "health": health_status(server.target) if alive else "dead",
            "loadtest": {k: v for k, v in report.items() if k != "timeline"},
            "windows": rows,
            "drift": drift(rows, sampler, t0, args.window),
            "rss_samples": [(round(t - t0, 2), b) for t, b in sampler.rss],
        }

    result = run_with_server(args, "soak", body)
    result["targets"] = TARGETS
    write_outputs(result, report_md(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
