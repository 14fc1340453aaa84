"""Overload: 2x the maximum sustainable rate, open loop, against one worker on one core.

    .venv/bin/python benchmarks/bench_overload.py --model-dir models                  # ~3-5 min
    .venv/bin/python benchmarks/bench_overload.py --model-dir models --max-rate 900   # no search
    .venv/bin/python benchmarks/bench_overload.py --model-dir models --quick          # ~1 min

Setup (as bench_batching.py)
    One ``adpredict serve --workers 1 --sla-ms SLA`` (batching on, default flags plus
    ``--server-args``) pinned to ``--server-cpus`` (taskset, default core 0); the load generator
    (``adpredict.loadtest``: Poisson arrivals, latency and deadline from each request's
    *scheduled* arrival, so a late generator shows as latency) with this process pinned to
    ``--client-cpus`` (default core 1). Workload: the model's schema with K = ``--k`` (32)
    candidates per request, a ``--deadline-ms`` (50) gRPC deadline on every request.

What "sustainable" means
    The SLA is ``--sla-ms`` (20 ms: the server's default ``--sla-ms``, the threshold of its
    ``adpredict_requests_over_sla_total`` counter and of the shipped p99 alert). The maximum
    sustainable rate is the highest open-loop rate whose p99, counting failed requests as
    infinitely slow, is <= SLA with <= 0.1% errors: bench_batching's search (a closed-loop
    probe, x``--ramp`` steps, ``--bisect`` geometric bisections), or ``--max-rate`` to skip it.
    Where the p99 rises long before the server saturates, 2x that rate may not exceed what the
    server can compute (the report warns when goodput exceeds the max rate by > 10%);
    ``--max-rate-by saturation`` takes instead the OK answers/s of a closed loop with
    ``--saturation-concurrency`` (32) outstanding, so the overload is 2x the server's capacity.

The run (one load test, no pause between phases: ``loadtest --schedule``)
    warm-up ``--warmup`` s and ``--before`` s at ``--recovery-fraction`` (50%) of the max rate,
    ``--duration`` s (60) at ``--factor`` (2x) the max rate, then ``--recovery`` s (10) at 50%
    again. Meanwhile a thread reads the server's resident memory (process tree, /proc) every
    0.1 s and scrapes its /metrics every second (queue depth, in-flight RPCs, requests by code,
    timeouts by stage), so server figures can be given per phase.

Reported, for the overload phase (requests by their scheduled send time)
    * the server stays up: alive, health SERVING afterwards, and every answer OK,
      RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED (any other code is listed);
    * admitted requests: latency of OK answers (p50/p99/max) against the SLA and the deadline;
    * refusals: latency of RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED answers as the client saw
      them (p50/p99/max, and the share answered within 2 ms), from the scheduled send and from
      the actual send (the generator's lag taken out); the same by the server's clock
      (``adpredict_request_duration_seconds`` of Predict, ``model=""``: the native intake's
      refusals, from its receipt of a call to the refusal), so the client's share shows; the
      server's split of DEADLINE_EXCEEDED into refused at admission / expired in the queue /
      late after compute;
    * goodput: OK answers/s during the overload / the max rate (target >= 90%);
    * memory: server RSS when the overload starts, its peak until the end, and after the run;
    * recovery: after the drop to 50%, the p99 (failures as misses) of every ``--window-ms``
      (100 ms) window of send time; the recovery time is the start of the first window from
      which ``--stable-windows`` (10, i.e. 1 s) windows in a row meet the SLA (target < 1 s).

Targets (issue 6): server up; admitted p99 <= SLA; refusals within a millisecond or two (judged:
p99 of refusals from their actual send <= 2 ms); goodput >= 90% of the max rate; memory bounded
(judged: peak RSS <= 1.1x the RSS when the overload started; the issue sets no number); recovery
< 1 s. A generator that cannot keep up (send lag, EXPIRED_BEFORE_SEND) is reported as a warning:
give it a core of its own. Results: ``--out`` + ``.json`` / ``.md`` (default
benchmarks/results/overload, or overload.quick with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adpredict import loadtest
from adpredict.loadtest import CODES, OK, LoadTestOptions, Samples, fetch_model_info
from bench_batching import LIVE, Bench, Server

ROOT = Path(__file__).resolve().parents[1]
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
REFUSALS = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")
FAST_REFUSAL_MS = 2.0  # "within a millisecond or two"
GENERATOR_LAG_MS = 2.0  # a generator later than this (p99) confounds refusal latencies
TARGETS = {
    "goodput_fraction": 0.9,
    "refusal_p99_ms": FAST_REFUSAL_MS,
    "rss_peak_ratio": 1.10,
    "recovery_s": 1.0,
}


# --------------------------------------------------------------------------- server sampling


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (/proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
                parents[int(entry)] = int(stat[1])
    tree, frontier = [pid], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree += kids
        frontier += kids
    return tree


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of ``pids`` (``/proc/PID/statm``), summed; vanished processes count 0."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    return total


class ServerSampler(threading.Thread):
    """Samples a server while a load test runs: RSS every ``rss_interval_s`` from /proc (costs
    the server nothing), its /metrics page every ``scrape_interval_s`` (0 = never).

    ``rss`` holds (monotonic time, bytes); ``scrapes`` (monotonic time, loadtest.Scrape).
    """

    def __init__(
        self, pid: int, metrics_url: str, rss_interval_s: float, scrape_interval_s: float
    ) -> None:
        super().__init__(name="server-sampler", daemon=True)
        self.pid, self.metrics_url = pid, metrics_url
        self.rss_interval_s, self.scrape_interval_s = rss_interval_s, scrape_interval_s
        self.rss: list[tuple[float, int]] = []
        self.scrapes: list[tuple[float, loadtest.Scrape]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        pids, pids_at, scrape_at = process_tree(self.pid), time.monotonic(), 0.0
        while not self._halt.is_set():
            now = time.monotonic()
            if now - pids_at > 5.0:  # a worker restart would change the tree
                pids, pids_at = process_tree(self.pid), now
            self.rss.append((now, rss_bytes(pids)))
            if self.scrape_interval_s and now >= scrape_at:
                scrape_at = now + self.scrape_interval_s
                scrape, _ = loadtest.scrape_metrics(self.metrics_url, timeout_s=2.0)
                if scrape is not None:
                    self.scrapes.append((time.monotonic(), scrape))
            self._halt.wait(self.rss_interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def rss_between(self, t0: float, t1: float) -> list[int]:
        return [b for t, b in self.rss if t0 <= t <= t1]

    def scrape_near(self, t: float, after: bool) -> loadtest.Scrape | None:
        """The first scrape at or after ``t`` (``after``), else the last one at or before it."""
        if after:
            return next((s for at, s in self.scrapes if at >= t), None)
        return next((s for at, s in reversed(self.scrapes) if at <= t), None)


def gauge(scrape: loadtest.Scrape | None, name: str, **labels: str) -> float | None:
    """Sum of a metric's samples whose labels include ``labels`` (None without a scrape)."""
    if scrape is None:
        return None
    found = [
        v
        for (n, ls), v in scrape.items()
        if n == name and all(dict(ls).get(k) == w for k, w in labels.items())
    ]
    return sum(found) if found else None


def health_status(target: str) -> str:
    """The server's health for ``""``: SERVING, NOT_SERVING, ... or the RPC error's code."""
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5.0
            )
        except grpc.RpcError as exc:
            return f"error {exc.code().name}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_drained(metrics_url: str, model: str, timeout_s: float = 15.0) -> dict[str, Any]:
    """Scrape until the queue and in-flight gauges read 0 (the server samples them each second)."""
    t0 = time.monotonic()
    last: dict[str, Any] = {}
    while time.monotonic() - t0 < timeout_s:
        scrape, reason = loadtest.scrape_metrics(metrics_url)
        last = {
            "queue_depth_requests": gauge(scrape, "adpredict_queue_depth_requests", model=model),
            "in_flight_predict": gauge(scrape, "adpredict_in_flight_requests", method="Predict"),
            "scrape_problem": reason or None,
        }
        if last["queue_depth_requests"] == 0 and last["in_flight_predict"] == 0:
            return {**last, "drained": True, "after_s": time.monotonic() - t0}
        time.sleep(0.5)
    return {**last, "drained": False, "after_s": time.monotonic() - t0}


# -------------------------------------------------------------------------------- max rate


def search_namespace(args: argparse.Namespace, p99_ms: float) -> argparse.Namespace:
    """What ``bench_batching.Bench`` reads, from this script's flags."""
    return argparse.Namespace(
        model_dir=args.model_dir, server_cpus=args.server_cpus, client_cpus=args.client_cpus,
        server_args=f"--sla-ms {args.sla_ms:g} --log-level WARNING {args.server_args}",
        warmup=args.search_warmup, duration=args.search_duration, deadline_ms=args.deadline_ms,
        pool=args.pool, seed=args.seed, min_requests=args.min_requests, p99_ms=p99_ms,
        max_error_rate=args.max_error_rate, ramp=args.ramp, bisect=args.bisect,
    )  # fmt: skip


def find_max_rate(bench: Bench, args: argparse.Namespace) -> tuple[float, list[dict[str, Any]]]:
    """``--max-rate``; else by ``--max-rate-by``: ``sla``, bench_batching's search (p99 with
    failures as misses <= SLA), or ``saturation``, the OK answers/s of a closed loop with
    ``--saturation-concurrency`` outstanding (what the server computes flat out, latency aside).
    Returns the rate and the rows measured for it (without their full reports)."""
    if args.max_rate:
        return args.max_rate, []
    if args.max_rate_by == "saturation":
        row = bench.point(args.k, "saturation", concurrency=args.saturation_concurrency)
        return float(row["ok_rps"]), [{k: v for k, v in row.items() if k != "report"}]
    best = bench.max_rate(args.k)
    rows = [{k: v for k, v in r.items() if k != "report"} for r in bench.rows]
    if best is None:
        raise SystemExit("no open-loop rate met the SLA: nothing to overload (see the rows above)")
    return float(best["offered_rps"]), rows


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared with bench_soak.py: server, generator, workload and the max-rate search."""
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--model-dir", type=Path, default=ROOT / "models",
                   help="MODELS dir the server serves (default: models/; make demo-model)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--max-rate", type=float, default=None,
                   help="req/s the server sustains within the SLA (default: search for it)")  # fmt: skip
    p.add_argument(
        "--max-rate-by",
        choices=("sla", "saturation"),
        default="sla",
        help="without --max-rate: search for p99 <= SLA (sla, default), or the OK "
        "answers/s of a closed loop at --saturation-concurrency (saturation)",
    )
    p.add_argument("--saturation-concurrency", type=int, default=32, help="closed-loop C (32)")
    p.add_argument("--k", type=int, default=32, help="candidates per request (32)")
    p.add_argument("--deadline-ms", type=float, default=50.0, help="gRPC deadline (50)")
    p.add_argument("--sla-ms", type=float, default=20.0,
                   help="latency objective: the max rate's p99 bound, passed to serve (20)")  # fmt: skip
    p.add_argument("--max-error-rate", type=float, default=0.001, help="of the max rate (0.1%%)")
    p.add_argument("--ramp", type=float, default=None, help="search step (1.25; quick 1.5)")
    p.add_argument("--bisect", type=int, default=None, help="bisections (4; quick 1)")
    p.add_argument("--search-duration", type=float, default=None,
                   help="recorded s per search point (10; quick 1.5)")  # fmt: skip
    p.add_argument("--search-warmup", type=float, default=None,
                   help="unrecorded s per search point (2; quick 0.5)")  # fmt: skip
    p.add_argument("--min-requests", type=int, default=None,
                   help="samples a search point aims for (2000; quick 300)")  # fmt: skip
    p.add_argument("--pool", type=int, default=256, help="distinct requests (256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--procs", type=int, default=1, help="load-generator processes (1)")
    p.add_argument("--server-cpus", default="0", help="taskset CPU list of the server (0)")
    p.add_argument("--client-cpus", type=ints, default=[1], help="CPUs of the generator (1)")
    p.add_argument("--server-args", default="", help="more serve flags")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/NAME)")


def fill_defaults(args: argparse.Namespace, table: list[tuple[str, Any, Any]], name: str) -> None:
    """Set every ``None`` flag in ``table`` (name, full, quick) and ``--out``."""
    common = [("ramp", 1.25, 1.5), ("bisect", 4, 1), ("search_duration", 10.0, 1.5),
              ("search_warmup", 2.0, 0.5), ("min_requests", 2000, 300)]  # fmt: skip
    for flag, full, quick in [*common, *table]:
        if getattr(args, flag) is None:
            setattr(args, flag, quick if args.quick else full)
    if args.out is None:
        args.out = str(ROOT / "benchmarks/results" / (f"{name}.quick" if args.quick else name))
    if not (args.model_dir.is_dir() and any(args.model_dir.iterdir())):
        raise SystemExit(f"--model-dir {args.model_dir}: no models (make demo-model)")


def run_with_server(
    args: argparse.Namespace, name: str, body: Callable[[Server, Bench], dict[str, Any]]
) -> dict[str, Any]:
    """Start the server, run ``body(server, bench)``, always stop the server; the result dict
    gets the command, date, machine, settings and any problem."""
    result: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": loadtest.machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # like Ctrl-C: clean up
    ns = search_namespace(args, args.sla_ms)
    log = Path(tempfile.gettempdir()) / f"bench_{name}_{os.getpid()}.log"
    server = Server(ns, True, log)
    try:
        server.wait_serving()
        info = fetch_model_info(server.target, "")
        result["server_command"] = shlex.join(server.cmd)
        result["server_log"] = str(log)
        result["model"] = f"{info.model} v{info.version} (schema {info.schema.name})"
        result["model_name"] = info.model
        result.update(body(server, Bench(ns, server, "on")))
    except KeyboardInterrupt:
        result.setdefault("problems", []).append("interrupted: the results are incomplete")
    finally:
        for s in list(LIVE):
            s.stop()
    return result


def write_outputs(result: dict[str, Any], text: str, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{path}.json").write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    Path(f"{path}.md").write_text(text)
    print("\n" + text)


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def fmt(v: float | None, spec: str = ".2f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def max_rate_source(st: dict[str, Any]) -> str:
    """How the max rate was had, from the settings, for the reports."""
    if st["max_rate"]:
        return "given (--max-rate)"
    if st["max_rate_by"] == "saturation":
        return f"OK answers/s of a closed loop with {st['saturation_concurrency']} outstanding"
    return (
        f"searched: highest open-loop rate with p99 (failures as misses) <= {st['sla_ms']:g} ms "
        f"and <= {st['max_error_rate']:.1%} errors"
    )


def judge(what: str, value: float | None, target: float, higher: bool, spec: str) -> str:
    if value is None:
        return f"- {what}: not measured"
    met = value >= target if higher else value <= target
    sign = ">=" if higher else "<="
    return (
        f"- {what}: {format(value, spec)} (target {sign} {format(target, spec)}): "
        f"**{'met' if met else 'not met'}**"
    )


# ---------------------------------------------------------------------------------- analysis


def phase_samples(samples: Samples, start_s: float, seconds: float) -> Samples:
    """The samples sent in [start_s, start_s + seconds) of the run's offsets."""
    sel = (samples.offset_s >= start_s) & (samples.offset_s < start_s + seconds)
    return Samples(**{n: getattr(samples, n)[sel] for n in Samples.__dataclass_fields__})


def refusal_figures(part: Samples) -> dict[str, Any]:
    """Latency of refusals by code (and together): count, p50/p99/max ms, share <= 2 ms."""
    out: dict[str, Any] = {}
    groups = {c: part.code == CODES[c] for c in REFUSALS}
    groups["all refusals"] = groups["RESOURCE_EXHAUSTED"] | groups["DEADLINE_EXCEEDED"]
    for label, sel in groups.items():
        lat_ms = part.latency_s[sel] * 1e3
        # From the actual send: the generator's own lag taken out, i.e. what the server (plus
        # loopback and the client's gRPC stack) took to refuse.
        sent_ms = (part.latency_s[sel] - part.lag_s[sel]) * 1e3
        pct = loadtest._percentiles(part.latency_s[sel])
        sent = loadtest._percentiles(part.latency_s[sel] - part.lag_s[sel])
        out[label] = {
            "count": int(sel.sum()),
            "p50_ms": pct["p50"],
            "p99_ms": pct["p99"],
            "max_ms": pct["max"],
            "share_within_2ms": float((lat_ms <= FAST_REFUSAL_MS).mean()) if len(lat_ms) else None,
            "share_over_10ms": float((lat_ms > 10.0).mean()) if len(lat_ms) else None,
            "from_send_p50_ms": sent["p50"],
            "from_send_p99_ms": sent["p99"],
            "from_send_max_ms": sent["max"],
            "from_send_share_within_2ms": (
                float((sent_ms <= FAST_REFUSAL_MS).mean()) if len(sent_ms) else None
            ),
        }
    return out


def histogram_delta(
    before: loadtest.Scrape | None, after: loadtest.Scrape | None, name: str, **labels: str
) -> list[tuple[float, float]]:
    """(le, cumulative count) of histogram ``name``'s samples matching ``labels`` between two
    scrapes, summed over other labels, by ascending ``le`` ([] without both scrapes)."""
    if before is None or after is None:
        return []
    a = loadtest._by_label(after, f"{name}_bucket", "le", **labels)
    b = loadtest._by_label(before, f"{name}_bucket", "le", **labels)
    return sorted((float(le), v - b.get(le, 0.0)) for le, v in a.items())


def bucket_quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """Prometheus's ``histogram_quantile``: linear within the bucket holding rank q * count (the
    first bucket from 0; in the +Inf bucket, the highest finite bound). None if empty."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in cumulative:
        if count >= rank:
            if math.isinf(le):
                return lower_le
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
            return lower_le + (le - lower_le) * share
        lower_le, lower_count = le, count
    return lower_le


def server_refusal_figures(
    before: loadtest.Scrape | None, after: loadtest.Scrape | None
) -> dict[str, Any]:
    """How fast the server refused, by its own clock: ``adpredict_request_duration_seconds``
    of Predict with ``model=""`` (the calls the native intake refused itself, from its receipt
    of each call to the refusal; with grpcio front ends, requests for no model): count, p50 /
    p99 (bucket-interpolated) and the share within 2 ms (exact: a bucket bound)."""
    cum = histogram_delta(
        before, after, "adpredict_request_duration_seconds", method="Predict", model=""
    )
    total = cum[-1][1] if cum else 0.0
    within = next((c for le, c in cum if le == FAST_REFUSAL_MS / 1e3), None)
    p50, p99 = bucket_quantile(0.5, cum), bucket_quantile(0.99, cum)
    return {
        "count": int(total),
        "p50_ms": None if p50 is None else p50 * 1e3,
        "p99_ms": None if p99 is None else p99 * 1e3,
        "share_within_2ms": within / total if total and within is not None else None,
    }


def recovery(
    part: Samples, start_s: float, window_s: float, sla_ms: float, stable: int
) -> dict[str, Any]:
    """Per-window p99 (failures as misses) after the drop, and when it settles under the SLA."""
    rows = loadtest.timeline(part, start_s, window_s)
    good = [r["p99_failures_as_misses"] is None or r["p99_failures_as_misses"] <= sla_ms
            for r in rows]  # fmt: skip
    first = next((i for i in range(len(good) - stable + 1) if all(good[i : i + stable])), None)
    return {
        "window_s": window_s,
        "stable_windows": stable,
        "recovery_s": None if first is None else first * window_s,
        "windows_over_sla_after_recovery": (
            None if first is None else sum(not g for g in good[first:])
        ),
        "windows": [
            {
                "t_s": round(r["t_s"], 3),
                "requests": r["requests"],
                "errors": r["errors"],
                "p99_ms": r["p99"],
                "p99_failures_as_misses_ms": r["p99_failures_as_misses"],
            }
            for r in rows
        ],
    }


def analyze(
    args: argparse.Namespace,
    max_rate: float,
    report: dict[str, Any],
    samples: Samples,
    sampler: ServerSampler,
    model: str,
) -> dict[str, Any]:
    warm = args.warmup
    t0 = report["start_monotonic_s"]
    before_s, over_s, rec_s = args.before, args.duration, args.recovery
    over = phase_samples(samples, warm + before_s, over_s)
    rec = phase_samples(samples, warm + before_s + over_s, rec_s)
    phases = report["phases"]
    ov = phases[1]["summary"]
    ok_lat = over.latency_s[over.code == OK] * 1e3
    # Server-side figures over the overload phase, from the scrapes nearest its edges.
    over_t0, over_t1 = t0 + warm + before_s, t0 + warm + before_s + over_s
    edges = sampler.scrape_near(over_t0, after=True), sampler.scrape_near(over_t1, after=False)
    srv = loadtest.server_figures(*edges, model)
    in_over = [s for at, s in sampler.scrapes if over_t0 <= at <= over_t1]
    before = sampler.rss_between(-math.inf, over_t0)
    rss_start = before[-1] if before else (sampler.rss[0][1] if sampler.rss else None)
    rss_during = sampler.rss_between(over_t0, math.inf)
    # EXPIRED_BEFORE_SEND is the generator's failure (never sent), reported as its warning.
    unexpected = {
        c: n
        for c, n in report["summary"]["errors_by_code"].items()
        if c not in (*REFUSALS, "EXPIRED_BEFORE_SEND")
    }
    return {
        "max_rate": max_rate,
        "phases": [
            {"name": name, "offered_rps": p["rate"], "seconds": p["seconds"], **_phase_row(p)}
            for name, p in zip(("before", "overload", "recovery"), phases, strict=True)
        ],
        "overload": {
            "ok_latency_ms": ov["latency_ms"],
            "ok_share_over_sla": float((ok_lat > args.sla_ms).mean()) if len(ok_lat) else None,
            "ok_rps": ov["ok_rps"],
            "goodput_fraction": ov["ok_rps"] / max_rate,
            "ok_predictions_per_s": ov["predictions_per_s"],
            "refusals": refusal_figures(over),
            "refusals_server_side": server_refusal_figures(*edges),
            "send_lag_ms": ov["send_lag_ms"],
            "server": {
                k: srv.get(k)
                for k in (
                    "available",
                    "reason",
                    "requests_by_code",
                    "timeouts_by_stage",
                    "compute_calls_per_ok_request",
                    "mean_batch_predictions",
                )
            },
            "server_window_s": "scrapes nearest the phase edges (1 s apart)",
            "queue_depth_requests_max": max(
                (gauge(s, "adpredict_queue_depth_requests", model=model) or 0 for s in in_over),
                default=None,
            ),
            "in_flight_predict_max": max(
                (gauge(s, "adpredict_in_flight_requests", method="Predict") or 0 for s in in_over),
                default=None,
            ),
        },
        "unexpected_codes": unexpected,
        "rss_bytes": {
            "start": rss_start,
            "peak": max(rss_during, default=None),
            "end": sampler.rss[-1][1] if sampler.rss else None,
            "samples": len(sampler.rss),
            "metric_start": gauge(
                sampler.scrape_near(over_t0, after=False), "adpredict_process_resident_memory_bytes"
            ),
            "metric_peak": max(
                (
                    gauge(s, "adpredict_process_resident_memory_bytes") or 0
                    for at, s in sampler.scrapes
                    if at >= over_t0
                ),
                default=None,
            ),
        },
        "recovery": recovery(
            rec, warm + before_s + over_s, args.window_ms / 1e3, args.sla_ms, args.stable_windows
        ),
        "generator_warnings": report["warnings"],
        "warnings": overload_warnings(ov, max_rate),
        "generator_cpu_pct": [p["cpu_pct"] for p in report["generator"]["per_proc"]],
    }


def overload_warnings(ov: dict[str, Any], max_rate: float) -> list[str]:
    """Signs that the run did not measure an overload at all."""
    out = []
    if ov["ok_rps"] > 1.1 * max_rate:
        out.append(
            f"the server answered {ov['ok_rps']:,.0f} req/s OK during the 'overload', "
            f"{ov['ok_rps'] / max_rate:.2f}x the max rate: the offered load was not twice what it "
            "can serve. Either the max rate was underestimated (a busy machine during the "
            "search?) or the server's throughput at p99 <= SLA is far below its throughput at "
            "saturation; the goodput figure then says little"
        )
    lag = ov["send_lag_ms"]["p99"]
    if lag is not None and lag > GENERATOR_LAG_MS:
        out.append(
            f"the generator sent requests up to {lag:.1f} ms late (p99 send lag): it could not "
            "keep up, and its lateness eats into every request's deadline and delays its "
            "reading of answers, so the overload figures mix the generator's limits with the "
            "server's. Give it more CPU (--procs, --client-cpus) and a quiet machine"
        )
    return out


def _phase_row(phase: dict[str, Any]) -> dict[str, Any]:
    s = phase["summary"]
    return {
        "requests": s["requests"],
        "achieved_rps": s["achieved_rps"],
        "ok_rps": s["ok_rps"],
        "p50_ms": s["latency_ms"]["p50"],
        "p99_ms": s["latency_ms"]["p99"],
        "max_ms": s["latency_ms"]["max"],
        "p99_failures_as_misses_ms": s["p99_ms_failures_as_misses"],
        "errors_by_code": s["errors_by_code"],
    }


def verdicts(a: dict[str, Any], sla_ms: float, alive: bool, health: str) -> list[str]:
    ov, rss = a["overload"], a["rss_bytes"]
    up = alive and health == "SERVING" and not a["unexpected_codes"]
    lines = [
        f"- server stays up: alive {alive}, health afterwards {health}, answers other than OK / "
        f"RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED: {a['unexpected_codes'] or 'none'} (requests "
        "the generator could not send in time are not answers): "
        f"**{'met' if up else 'not met'}**",
        judge("p99 of admitted (OK) requests during the overload, ms",
              ov["ok_latency_ms"]["p99"], sla_ms, False, ".2f"),
        judge("p99 of refusals (RESOURCE_EXHAUSTED + DEADLINE_EXCEEDED) from their send, ms",
              ov["refusals"]["all refusals"]["from_send_p99_ms"], TARGETS["refusal_p99_ms"],
              False, ".2f"),
        judge("goodput (OK answers/s) / max rate", ov["goodput_fraction"],
              TARGETS["goodput_fraction"], True, ".1%"),
        judge("peak RSS / RSS when the overload started",
              rss["peak"] / rss["start"] if rss["start"] and rss["peak"] else None,
              TARGETS["rss_peak_ratio"], False, ".3f"),
        judge(f"recovery: first of {a['recovery']['stable_windows']} windows in a row with p99 "
              "(failures as misses) <= SLA, s after the drop", a["recovery"]["recovery_s"],
              TARGETS["recovery_s"], False, ".2f"),
    ]  # fmt: skip
    return lines


def report_md(result: dict[str, Any]) -> str:
    st = result["settings"]
    a = result.get("analysis")
    lines = [
        "# Overload at 2x the maximum sustainable rate (bench_overload)"
        + (" — QUICK run" if st["quick"] else ""),
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; machine: {result['machine']['cores']} cores "
        f"{result['machine']['cpu_model']}, load average at start {result['machine']['loadavg']}  ",
        f"Server: `{result.get('server_command', '?')}`  ",
        f"Model: {result.get('model')}; K = {st['k']}; deadline {st['deadline_ms']:g} ms; SLA "
        f"{st['sla_ms']:g} ms; generator pinned to CPUs {st['client_cpus']}, {st['procs']} "
        "process(es)",
        "",
    ]
    if a is None:
        return "\n".join([*lines, *(f"**{p}**" for p in result.get("problems", [])), ""])
    how = max_rate_source(st)
    lines += [
        f"Max sustainable rate: **{a['max_rate']:,.0f} req/s** ({how}); overload {st['factor']:g}x = "
        f"{st['factor'] * a['max_rate']:,.0f} req/s for {st['duration']:g} s",
        "",
        "| phase | offered req/s | s | achieved req/s | OK/s | OK p50 ms | OK p99 ms | OK max ms "
        "| p99 (fail=miss) ms | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in a["phases"]:
        errs = ", ".join(f"{c} {n:,}" for c, n in p["errors_by_code"].items()) or "0"
        lines.append(
            f"| {p['name']} | {p['offered_rps']:,.0f} | {p['seconds']:g} | "
            f"{p['achieved_rps']:,.0f} | {p['ok_rps']:,.0f} | {fmt(p['p50_ms'])} | "
            f"{fmt(p['p99_ms'])} | {fmt(p['max_ms'])} | {fmt(p['p99_failures_as_misses_ms'])} | "
            f"{errs} |"
        )
    ov = a["overload"]
    lines += [
        "",
        "Refusals during the overload: latency from the scheduled send (what the caller sees, "
        "the generator's lag included) and from the actual send (the server's part):",
        "",
        "| code | count | p50 ms | p99 ms | max ms | within 2 ms | over 10 ms | from send: p50 ms "
        "| p99 ms | max ms | within 2 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for code, r in ov["refusals"].items():
        lines.append(
            f"| {code} | {r['count']:,} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | "
            f"{fmt(r['max_ms'])} | {fmt(r['share_within_2ms'], '.1%')} | "
            f"{fmt(r['share_over_10ms'], '.1%')} | {fmt(r['from_send_p50_ms'])} | "
            f"{fmt(r['from_send_p99_ms'])} | {fmt(r['from_send_max_ms'])} | "
            f"{fmt(r['from_send_share_within_2ms'], '.1%')} |"
        )
    ss = ov.get("refusals_server_side") or {}
    if ss.get("count"):
        lines += [
            "",
            f"The same refusals by the server's clock (adpredict_request_duration_seconds, "
            f'Predict, model="": from the intake\'s receipt of a call to its refusal; the '
            f"scrapes nearest the phase edges): {ss['count']:,} refusals, p50 "
            f"{fmt(ss['p50_ms'])} ms, p99 {fmt(ss['p99_ms'])} ms (bucket-interpolated), "
            f"{fmt(ss['share_within_2ms'], '.1%')} within 2 ms. What the client saw beyond "
            "this is loopback, gRPC's receive path on both sides and the generator's delay "
            "in reading the answer.",
        ]
    srv = ov["server"]
    rss = a["rss_bytes"]
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.1f} MiB"  # noqa: E731
    rec = a["recovery"]
    lines += [
        "",
        f"Server during the overload ({ov['server_window_s']}): requests by code "
        f"{srv.get('requests_by_code') or '-'}; DEADLINE_EXCEEDED by stage "
        f"{srv.get('timeouts_by_stage') or '-'}; max queue depth "
        f"{fmt(ov['queue_depth_requests_max'], '.0f')} requests, max in-flight Predict RPCs {fmt(ov['in_flight_predict_max'], '.0f')}; "
        f"{fmt(srv.get('compute_calls_per_ok_request'), '.3f')} compute calls per OK answer.  ",
        f"OK answers over the SLA during the overload: {fmt(ov['ok_share_over_sla'], '.2%')}; "
        f"send lag p99 {fmt(ov['send_lag_ms']['p99'])} ms (the generator's own delay, included "
        "in every latency above).  ",
        f"Server RSS (/proc, process tree): {mib(rss['start'])} when the overload started, peak "
        f"{mib(rss['peak'])}, {mib(rss['end'])} at the end ({rss['samples']} samples); the "
        f"server's own gauge: {mib(rss['metric_start'])} / peak {mib(rss['metric_peak'])}.  ",
        f"After the run: alive {result['alive']}, health {result['health']}, drained "
        f"{result['drain']}.",
        "",
        f"Recovery after the drop to {st['recovery_fraction']:.0%} ({rec['window_s'] * 1e3:g} ms "
        "windows of send time; p99 counting failures as misses, ms): "
        + " ".join(fmt(w["p99_failures_as_misses_ms"], ".1f") for w in rec["windows"][:30])
        + (" ..." if len(rec["windows"]) > 30 else ""),
        "",
        "Targets (issue 6):",
        "",
        *verdicts(a, st["sla_ms"], result["alive"], result["health"]),
        "",
    ]
    lines += [f"WARNING (generator): {w}" for w in a["generator_warnings"]]
    lines += [f"WARNING: {w}" for w in a["warnings"]]
    if st["quick"]:
        lines += ["", "**QUICK run: short phases on a shared machine; indicative only.**"]
    lines += [f"**{p}**" for p in result.get("problems", [])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- main


def load_options(server: Server, args: Any, **load: Any) -> LoadTestOptions:
    """The load test both benchmarks run: ``args``' K, deadline and generator settings against
    ``server``, plus ``load`` (the rate or schedule, durations)."""
    return LoadTestOptions(
        target=server.target,
        warmup_s=args.warmup,
        candidates=str(args.k),
        deadline_ms=args.deadline_ms,
        procs=args.procs,
        cpus=tuple(args.client_cpus),
        pool=args.pool,
        seed=args.seed,
        metrics_url=server.metrics_url,
        server_pid=server.proc.pid,
        **load,
    )


def run_sampled(
    options: LoadTestOptions, pool: Any, sampler: ServerSampler
) -> tuple[dict[str, Any], loadtest.Samples]:
    """Run the load test while ``sampler`` records the server's RSS and metrics."""
    sampler.start()
    try:
        return loadtest.run(options, pool=pool, progress=sys.stderr)
    finally:
        sampler.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(p)
    p.add_argument("--factor", type=float, default=2.0, help="overload / max rate (2)")
    p.add_argument("--duration", type=float, default=None, help="overload s (60; quick 8)")
    p.add_argument("--before", type=float, default=None, help="s at 50%% before it (5; quick 2)")
    p.add_argument("--recovery", type=float, default=None, help="s at 50%% after it (10; quick 4)")
    p.add_argument("--warmup", type=float, default=None, help="unrecorded s first (3; quick 1)")
    p.add_argument("--recovery-fraction", type=float, default=0.5, help="of the max rate (0.5)")
    p.add_argument("--window-ms", type=float, default=100.0, help="recovery window (100)")
    p.add_argument("--stable-windows", type=int, default=10, help="windows in a row (10)")
    args = p.parse_args()
    fill_defaults(args, [("duration", 60.0, 8.0), ("before", 5.0, 2.0),
                         ("recovery", 10.0, 4.0), ("warmup", 3.0, 1.0)], "overload")  # fmt: skip

    def body(server: Server, bench: Bench) -> dict[str, Any]:
        model = fetch_model_info(server.target, "").model
        max_rate, search = find_max_rate(bench, args)
        low, high = args.recovery_fraction * max_rate, args.factor * max_rate
        schedule = ((args.before, low), (args.duration, high), (args.recovery, low))
        options = load_options(server, args, schedule=schedule)
        sampler = ServerSampler(server.proc.pid, server.metrics_url, 0.1, 1.0)
        print(f"max rate {max_rate:,.0f} req/s; running {options.schedule}", flush=True)
        report, samples = run_sampled(options, bench.pool(args.k), sampler)
        alive = server.proc.poll() is None
        out: dict[str, Any] = {
            "search": search,
            "alive": alive,
            "health": health_status(server.target) if alive else "dead",
            "drain": wait_drained(server.metrics_url, model) if alive else None,
            "loadtest": {k: v for k, v in report.items() if k not in ("timeline",)},
            "timeline_1s": report["timeline"],
        }
        out["analysis"] = analyze(args, max_rate, report, samples, sampler, model)
        return out

    result = run_with_server(args, "overload", body)
    result["targets"] = TARGETS
    result.setdefault("alive", False)
    result.setdefault("health", "-")
    result.setdefault("drain", None)
    write_outputs(result, report_md(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
