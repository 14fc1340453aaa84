"""The paper's batching table, here: batching off vs on, one worker on one core, open-loop load.

    .venv/bin/python benchmarks/bench_batching.py --model-dir models            # full, ~25 min
    .venv/bin/python benchmarks/bench_batching.py --model-dir models --quick    # ~2-3 min

Setup
    For each mode a server ``adpredict serve --workers 1`` (``--no-batching`` for "off", plus
    ``--server-args``) is started pinned to ``--server-cpus`` (``taskset``, default core 0). The
    load generator is ``adpredict.loadtest`` (one client process, open loop, Poisson arrivals,
    latency from each request's scheduled time, ``--deadline-ms`` gRPC deadline) pinned with
    this process to ``--client-cpus`` (default core 1). Workload: the model's schema (standard:
    ``rtb``, 12 context fields and K x 8 candidate fields) with K fixed per row (32 and 300).
    Each point: ``--warmup`` s unrecorded, then ``--duration`` s recorded.

Per mode and K, in this order
    1. probe     closed loop, 1 outstanding: the rate one request at a time sustains (r1).
    2. search    open-loop rates from r1/2 up by x``--ramp`` until a point fails, then
                 ``--bisect`` geometric bisections. A point *passes* if p99 <= ``--p99-ms``
                 with failed requests counted as infinitely slow (so >= 99% of requests were
                 answered OK within the bound) and at most ``--max-error-rate`` of requests
                 failed, over at least 100 requests (a late generator shows as latency: it is
                 measured from the schedule). The highest passing rate is the mode's *max
                 rate*. Open-loop points last ``--duration`` s, stretched up to 4x so that they
                 hold ``--min-requests`` requests.
    3. equal     open loop at 50% and 90% of the *unbatched* max rate (the off server runs
                 first), so both modes face the same offered load.
    4. timeouts  open loop at 80% of the mode's own max rate for ``--timeout-duration`` s:
                 the timeout rate there (target <= 0.01%; its resolution is 1 / requests).
    5. saturation closed loop with ``--saturation-concurrency`` outstanding: max throughput
                 regardless of latency, and compute calls per request (target <= 0.1).

Columns
    calls/req      server compute calls per OK answer from /metrics
                   (``adpredict_compute_calls_total`` / ``adpredict_requests_total{code="OK"}``;
                   requests refused at admission are never computed and would flatter a ratio
                   per request), or, if the
                   server has no such metrics, from the responses' ``batch_requests`` (a lower
                   bound, exact unless requests were split), marked with ``~``
    CPU-µs/pred    server process tree CPU (/proc/PID/stat) over the recorded window / OK
                   predictions
    other CPU %    machine busy CPU (/proc/stat) minus server and load generator (its open-loop
                   spin before arrivals included) during the point, in % of one core; points
                   above 10% are flagged (another job interfered)

The K = 300 served predictions/s at the batching max rate are compared with the in-process
ceiling from ``benchmarks/results/model_ceiling.json`` (bench_model.py; the ``.quick`` file if
that is all there is), or with ``--ceiling measure`` from bench_model.py run in this benchmark
on the server's first core before and after the servers (the higher of the two counts): on a
shared VM the ceiling moves by a quarter between runs and cores, so a fraction is only honest
when both were measured together. ``--points saturation`` runs only step 5 (with ``--ceiling
measure``: served throughput against the ceiling in a few minutes); ``--rounds N`` then repeats
(ceiling, served) N times and closes with a ceiling: each round's served figure is divided by
the higher of the two ceilings measured just before and just after it, and the median of the N
fractions is reported, with every round's figures. Results: ``--out`` +
``.json`` / ``.md`` (default benchmarks/results/batching, or batching.quick with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adpredict import loadtest
from adpredict.loadtest import CandidateSpec, LoadTestOptions, build_pool, fetch_model_info

ROOT = Path(__file__).resolve().parents[1]
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
LIVE: set[Server] = set()  # servers not yet stopped; main() stops them whatever happens

MIN_PASS_REQUESTS = 100  # below this a "p99" is the max of a handful: such a point never passes
TARGETS = {
    "ratio_k32": 3.0,  # batching max rate / unbatched max rate at p99 <= 10 ms, K = 32
    "ratio_k300": 1.5,
    "calls_per_request_at_saturation": 0.1,  # >= 10x fewer compute calls than requests
    "timeout_rate_at_80pct": 1e-4,  # 0.01%
    "ceiling_fraction_k300": 0.5,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat; idle and iowait excluded)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) * TICK_S


class Server:
    """One ``adpredict serve --workers 1`` subprocess pinned with taskset; ``stop()`` always."""

    def __init__(self, args: argparse.Namespace, batching: bool, log: Path) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.cmd = [
            "taskset", "-c", args.server_cpus, sys.executable, "-m", "adpredict", "serve",
            "--model-dir", str(args.model_dir), "--workers", "1", "--port", str(self.port),
            "--metrics-port", str(self.metrics_port), *([] if batching else ["--no-batching"]),
            *shlex.split(args.server_args),
        ]  # fmt: skip
        self.log = log
        with log.open("wb") as out:  # own session: a Ctrl-C reaches only us; we stop it
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            )  # fmt: skip
        LIVE.add(self)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def wait_serving(self, timeout_s: float = 300.0) -> None:
        until = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < until and self.proc.poll() is None:
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.2)
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"server did not become SERVING: {shlex.join(self.cmd)}\n{tail}")

    def stop(self) -> None:
        LIVE.discard(self)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Bench:
    """Runs the points of one server (mode) and keeps every row."""

    def __init__(self, args: argparse.Namespace, server: Server, mode: str) -> None:
        self.args, self.server, self.mode = args, server, mode
        self.rows: list[dict[str, Any]] = []
        self.pools: dict[int, loadtest.Pool] = {}

    def pool(self, k: int) -> loadtest.Pool:
        if k not in self.pools:
            info = fetch_model_info(self.server.target, "")
            self.pools[k] = build_pool(info.schema, CandidateSpec.parse(str(k)), self.args.pool,
                                       model=info.model, max_candidates=info.max_candidates or k,
                                       seed=self.args.seed)  # fmt: skip
        return self.pools[k]

    def point(self, k: int, label: str, *, rate: float | None = None,
              concurrency: int | None = None, duration_s: float | None = None) -> dict[str, Any]:  # fmt: skip
        """One load-test run; its row (also printed and kept)."""
        a = self.args
        options = LoadTestOptions(
            target=self.server.target,
            rate=rate,
            concurrency=concurrency,
            duration_s=duration_s or self.duration_for(rate),
            warmup_s=a.warmup,
            candidates=str(k),
            deadline_ms=a.deadline_ms,
            cpus=tuple(a.client_cpus),
            pool=a.pool,
            seed=a.seed,
            metrics_url=self.server.metrics_url,
            server_pid=self.server.proc.pid,
        )
        busy0, own0 = machine_busy_s(), time.process_time()
        t0 = time.monotonic()
        report, _ = loadtest.run(options, pool=self.pool(k), progress=None)
        wall = time.monotonic() - t0
        busy, own = machine_busy_s() - busy0, time.process_time() - own0
        if self.server.proc.poll() is not None:
            raise RuntimeError(f"the {self.mode} server died during {label}; log {self.server.log}")
        row = make_row(self.mode, k, label, rate, concurrency, report)
        # The generator's open-loop spin before each arrival is its CPU too, not another job's.
        per_proc = report["generator"]["per_proc"]
        client_cpu = own + sum((p["cpu_s"] or 0.0) + (p.get("spin_s") or 0.0) for p in per_proc)
        server_cpu_total = _server_cpu_whole_point(report, wall)
        row["other_cpu_pct"] = 100 * (busy - server_cpu_total - client_cpu) / wall
        row["report"] = {k: v for k, v in report.items() if k != "timeline"}
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row

    def duration_for(self, rate: float | None) -> float:
        """``--duration``, stretched (up to 4x) so a point has ``--min-requests`` samples."""
        a = self.args
        if not rate:
            return a.duration
        return min(4 * a.duration, max(a.duration, a.min_requests / rate))

    def passes(self, row: dict[str, Any]) -> bool:
        a = self.args
        p99 = row["p99_ms_failures_as_misses"]
        return (
            p99 is not None
            and p99 <= a.p99_ms
            and (row["error_rate"] or 0.0) <= a.max_error_rate
            and row["requests"] >= MIN_PASS_REQUESTS
        )

    def max_rate(self, k: int) -> dict[str, Any] | None:
        """Steps 1 and 2: the highest passing open-loop rate (its row), or None."""
        a = self.args
        probe = self.point(k, "probe C=1", concurrency=1)
        rate = max(1.0, probe["achieved_rps"] / 2)
        best: dict[str, Any] | None = None
        failed: float | None = None
        for _ in range(24):
            row = self.point(k, "search", rate=rate)
            if self.passes(row):
                best = row
                if failed is not None:
                    break
                rate *= a.ramp
            else:
                failed = rate
                if best is not None:
                    break
                rate /= a.ramp
                if rate < max(1.0, probe["achieved_rps"] / 50):  # nothing passes: say so
                    return None
        if best is None or failed is None:
            if best is not None:
                best["is_max"] = True
            return best
        lo, hi = best["offered_rps"], failed
        for _ in range(a.bisect):
            mid = math.sqrt(lo * hi)
            row = self.point(k, "search", rate=mid)
            if self.passes(row):
                best, lo = row, mid
            else:
                hi = mid
        best["is_max"] = True
        return best


def _server_cpu_whole_point(report: dict[str, Any], wall: float) -> float:
    """Server CPU over the whole point, estimated from the recorded window's CPU rate."""
    proc = report.get("server_process") or {}
    pct = proc.get("cpu_pct")
    return (pct or 0.0) / 100 * wall


def make_row(mode: str, k: int, label: str, rate: float | None, concurrency: int | None,
             report: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    s, srv = report["summary"], report["server"]
    proc = report.get("server_process") or {}
    if srv.get("available") and srv.get("compute_calls_per_ok_request") is not None:
        calls, calls_src = srv["compute_calls_per_ok_request"], "metrics"
    else:
        calls, calls_src = s["client_compute_calls_per_request"], "responses (lower bound)"
    cpu_us = proc.get("cpu_us_per_prediction")
    if cpu_us is None and srv.get("cpu_seconds_per_million_predictions") is not None:
        cpu_us = srv["cpu_seconds_per_million_predictions"]  # CPU-s per 1e6 = CPU-µs per 1
    return {
        "mode": mode,
        "k": k,
        "point": label,
        "offered_rps": rate,
        "concurrency": concurrency,
        "requests": s["requests"],
        "achieved_rps": s["achieved_rps"],
        "ok_rps": s["ok_rps"],
        "predictions_per_s": s["predictions_per_s"],
        "p50_ms": s["latency_ms"]["p50"],
        "p99_ms": s["latency_ms"]["p99"],
        "p99_ms_failures_as_misses": s["p99_ms_failures_as_misses"],
        "error_rate": s["error_rate"],
        "errors_by_code": s["errors_by_code"],
        "timeout_rate": s["timeout_rate"],
        "compute_calls_per_request": calls,
        "compute_calls_source": calls_src,
        "mean_batch_predictions": srv.get("mean_batch_predictions"),
        "cpu_us_per_prediction": cpu_us,
        "server_cpu_pct": proc.get("cpu_pct"),
        "loadgen_cpu_pct": sum(p["cpu_pct"] or 0.0 for p in report["generator"]["per_proc"]),
        "send_lag_p99_ms": max(
            (p["send_lag_p99_ms"] or 0.0) for p in report["generator"]["per_proc"]
        ),
        "warnings": report["warnings"],
    }


COLUMNS = ("K", "mode", "point", "offered", "req/s", "pred/s", "p50 ms", "p99 ms",
           "p99 (fail=miss)", "timeouts", "errors", "calls/req", "batch preds", "CPU-µs/pred",
           "server CPU %", "loadgen CPU %", "other CPU %", "n")  # fmt: skip


def _f(v: float | None, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, fmt)


def format_row(r: dict[str, Any]) -> str:
    offered = f"{r['offered_rps']:,.0f}/s" if r["offered_rps"] else f"C={r['concurrency']}"
    errs = ", ".join(f"{c} {n}" for c, n in r["errors_by_code"].items()) or "0"
    calls = _f(r["compute_calls_per_request"], ".3f")
    if r["compute_calls_source"] != "metrics" and calls != "-":
        calls = "~" + calls
    point = r["point"] + (" **max**" if r.get("is_max") else "")
    cells = (r["k"], r["mode"], point, offered, f"{r['achieved_rps']:,.0f}",
             f"{r['predictions_per_s']:,.0f}", _f(r["p50_ms"], ".2f"), _f(r["p99_ms"], ".2f"),
             _f(r["p99_ms_failures_as_misses"], ".2f"), f"{100 * (r['timeout_rate'] or 0):.3f}%",
             errs, calls, _f(r["mean_batch_predictions"], ".0f"),
             _f(r["cpu_us_per_prediction"], ".2f"), _f(r["server_cpu_pct"], ".0f"),
             f"{r['loadgen_cpu_pct']:.0f}", _f(r.get("other_cpu_pct"), ".0f"),
             f"{r['requests']:,}")  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


def measure_ceiling(args: argparse.Namespace, stem: Path) -> dict[str, Any]:
    """bench_model.py on the server's first core (batches 1024..4096: where the ceiling is)."""
    cpu = args.server_cpus.replace("-", ",").split(",")[0]
    # taskset: this process runs pinned to the client's CPUs, and bench_model may only pin
    # itself to a CPU it is allowed
    cmd = ["taskset", "-c", args.server_cpus, sys.executable,
           str(ROOT / "benchmarks/bench_model.py"), "--model-dir",
           str(args.model_dir), "--k", ",".join(map(str, args.k)), "--batch-sizes",
           "1024,2048,4096", "--cpu", cpu, "--out", str(stem)]  # fmt: skip
    if args.quick:
        cmd.append("--quick")
    subprocess.run(cmd, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    ceiling = read_ceiling(Path(f"{stem}.json"))
    assert ceiling is not None, f"bench_model wrote no {stem}.json"
    return {**ceiling, "command": shlex.join(cmd)}


def best_ceiling(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The higher ceiling per K of several bench_model runs, with every run's figure kept."""
    out = dict(runs[0], ceiling={}, runs=[r["ceiling"] for r in runs])
    for k in runs[0]["ceiling"]:
        out["ceiling"][k] = max((r["ceiling"][k] for r in runs if k in r["ceiling"]),
                                key=lambda c: c["predictions_per_s"])  # fmt: skip
    return out


def read_ceiling(explicit: Path | None) -> dict[str, Any] | None:
    results = ROOT / "benchmarks/results"
    paths = [explicit] if explicit else [results / "model_ceiling.json",
                                         results / "model_ceiling.quick.json"]  # fmt: skip
    for path in paths:
        if path.is_file():
            data = json.loads(path.read_text())
            return {"file": str(path), "quick": data.get("quick", False),
                    "ceiling": data["ceiling"], "model": data.get("model")}  # fmt: skip
    return None


def round_fractions(
    rows: list[dict[str, Any]], runs: list[dict[str, Any]], k: int
) -> list[dict[str, Any]]:
    """Per round r: served pred/s at saturation (batching on) over the higher of the ceilings
    measured just before (run r) and just after it (run r + 1): ``fraction``, what the target
    is judged on; and over their mean: ``fraction_of_mean``, which the ceiling's own noise
    does not bias downwards (the higher of two noisy measurements overstates the ceiling)."""
    out = []
    for row in rows:
        if (row["k"], row["mode"], row["point"]) != (k, "on", "saturation"):
            continue
        r = row.get("round", 0)
        flank = [runs[i]["ceiling"][str(k)]["predictions_per_s"] for i in (r, r + 1)
                 if i < len(runs) and str(k) in runs[i]["ceiling"]]  # fmt: skip
        if flank:
            served = row["predictions_per_s"]
            out.append({"round": r, "served_pred_s": served, "ceilings_pred_s": flank,
                        "fraction": served / max(flank),
                        "fraction_of_mean": served / statistics.mean(flank)})  # fmt: skip
    return out


def summarize(
    rows: list[dict[str, Any]],
    ks: list[int],
    ceiling: dict[str, Any] | None,
    runs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The targets' figures per K. ``runs``: the ceilings measured in this run, in order (then
    the saturation fraction is the median over rounds, see ``round_fractions``)."""
    out: dict[str, Any] = {}
    for k in ks:

        def pick(mode: str, point: str, k: int = k) -> dict[str, Any] | None:
            return next(
                (r for r in rows if (r["k"], r["mode"], r["point"]) == (k, mode, point)), None
            )

        def best(mode: str, k: int = k) -> dict[str, Any] | None:
            return next(
                (r for r in rows if (r["k"], r["mode"]) == (k, mode) and r.get("is_max")), None
            )

        on, off = best("on"), best("off")
        sat_on, sat_off = pick("on", "saturation"), pick("off", "saturation")
        t_on, t_off = pick("on", "80% of max"), pick("off", "80% of max")
        entry: dict[str, Any] = {
            "max_rate_on": on and on["offered_rps"],
            "max_rate_off": off and off["offered_rps"],
            "max_pred_s_on": on and on["predictions_per_s"],
            "max_pred_s_off": off and off["predictions_per_s"],
            "ratio": (on["offered_rps"] / off["offered_rps"]) if on and off else None,
            "saturation_pred_s_on": sat_on and sat_on["predictions_per_s"],
            "saturation_pred_s_off": sat_off and sat_off["predictions_per_s"],
            "saturation_calls_per_request_on": sat_on and sat_on["compute_calls_per_request"],
            "timeout_rate_at_80pct_on": t_on and t_on["timeout_rate"],
            "timeout_rate_at_80pct_off": t_off and t_off["timeout_rate"],
            "requests_at_80pct_on": t_on and t_on["requests"],
        }
        if ceiling and str(k) in ceiling["ceiling"]:
            c = ceiling["ceiling"][str(k)]["predictions_per_s"]
            entry["ceiling_pred_s"] = c
            entry["fraction_of_ceiling_at_max_rate"] = on and on["predictions_per_s"] / c
            entry["fraction_of_ceiling_at_saturation"] = sat_on and sat_on["predictions_per_s"] / c
        rounds = round_fractions(rows, runs, k) if runs else []
        if rounds:
            entry["rounds"] = rounds
            entry["saturation_pred_s_on"] = statistics.median(r["served_pred_s"] for r in rounds)
            entry["fraction_of_ceiling_at_saturation"] = statistics.median(
                r["fraction"] for r in rounds
            )
            entry["fraction_of_mean_ceiling_at_saturation"] = statistics.median(
                r["fraction_of_mean"] for r in rounds
            )
        out[str(k)] = entry
    return out


def verdicts(summary: dict[str, Any]) -> list[str]:
    lines = []

    def judge(what: str, value: float | None, target: float, higher: bool, fmt: str) -> None:
        if value is None:
            lines.append(f"- {what}: not measured")
            return
        met = value >= target if higher else value <= target
        sign = ">=" if higher else "<="
        lines.append(f"- {what}: {format(value, fmt)} (target {sign} {format(target, fmt)}): "
                     f"**{'met' if met else 'not met'}**")  # fmt: skip

    for k, e in summary.items():
        if k in ("32", "300"):
            judge(f"K={k} max rate at p99 <= 10 ms, on / off", e["ratio"],
                  TARGETS[f"ratio_k{k}"], True, ".2f")  # fmt: skip
        else:
            judge(f"K={k} max rate ratio on / off", e["ratio"], 1.0, True, ".2f")
        judge(f"K={k} compute calls per OK answer at saturation (on)",
              e["saturation_calls_per_request_on"], TARGETS["calls_per_request_at_saturation"],
              False, ".3f")  # fmt: skip
        judge(f"K={k} timeout rate at 80% of max (on), of {e['requests_at_80pct_on'] or 0:,} requests",
              e["timeout_rate_at_80pct_on"], TARGETS["timeout_rate_at_80pct"], False, ".5%")  # fmt: skip
        if k == "300" and "ceiling_pred_s" in e:
            judge("K=300 served pred/s at the max rate / in-process ceiling",
                  e["fraction_of_ceiling_at_max_rate"], TARGETS["ceiling_fraction_k300"], True, ".1%")  # fmt: skip
            sat = e.get("fraction_of_ceiling_at_saturation")
            rounds = e.get("rounds", [])
            each = ", ".join(
                f"{r['served_pred_s']:,.0f} / {max(r['ceilings_pred_s']):,.0f} = {r['fraction']:.1%}"
                for r in rounds
            )
            lines.append(f"- K=300 served pred/s at saturation / ceiling (no latency bound): "
                         f"{'-' if sat is None else format(sat, '.1%')}"
                         + (f" (median of {len(rounds)} rounds: {each})" if len(rounds) > 1 else ""))  # fmt: skip
            if len(rounds) > 1:
                lines.append(
                    "- the same rounds over the mean of their two flanking ceilings (not biased "
                    "by the ceiling's noise; not what the target is judged on): "
                    f"{e['fraction_of_mean_ceiling_at_saturation']:.1%} (median; "
                    + ", ".join(f"{r['fraction_of_mean']:.1%}" for r in rounds)
                    + ")"
                )
    return lines


def ceiling_line(ceiling: dict[str, Any] | None) -> str:
    if not ceiling:
        return "no bench_model results"
    if "runs" not in ceiling:
        return ceiling["file"]
    runs = "; ".join(
        ", ".join(f"K={k} {c['predictions_per_s']:,.0f} pred/s @{c['batch']}" for k, c in r.items())
        for r in ceiling["runs"]
    )
    return (
        f"measured in this run on the server core, in order: {runs} (a served figure is "
        "divided by the higher of the ceilings measured just before and just after it)"
    )


def report_md(result: dict[str, Any]) -> str:
    a = result["settings"]
    lines = [
        "# Batching on vs off, open loop (bench_batching)" + (" — QUICK run" if a["quick"] else ""),
        "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}; machine: {result['machine']['cores']} cores "
        f"{result['machine']['cpu_model']}, {result['machine']['platform']}, Python "
        f"{result['machine']['python']}, grpc {result['machine']['grpc']}; load average at start "
        f"{result['machine']['loadavg']}  ",
        f"Server: `{result.get('server_command', '?')}` (+ `--no-batching` for off), pinned to CPU "
        f"{a['server_cpus']}; load generator: adpredict.loadtest, 1 process, pinned to CPUs "
        f"{a['client_cpus']}  ",
        f"Model: {result.get('model')}; pool of {a['pool']} requests per K; deadline "
        f"{a['deadline_ms']:g} ms; {a['warmup']:g} s warm-up + {a['duration']:g} s per point "
        f"({a['timeout_duration']:g} s at 80% of max); pass = p99 (failures as misses) <= "
        f"{a['p99_ms']:g} ms and errors <= {a['max_error_rate']:.2%}  ",
        f"Ceiling: {ceiling_line(result.get('ceiling'))}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *(format_row(r) for r in result["rows"]),
        "",
    ]
    busy = [r for r in result["rows"] if (r.get("other_cpu_pct") or 0) > 10]
    if busy:
        lines += [f"**Warning: other jobs used > 10% of a core during {len(busy)} point(s); "
                  "those are distorted.**", ""]  # fmt: skip
    lines += ["Targets (issue 5):", "", *verdicts(result["summary"]), ""]
    if a["quick"]:
        lines += ["**QUICK run: points of a few seconds, so p99 rests on a few hundred samples "
                  "and the verdicts are indicative only; the figures come from a full run on a "
                  "quiet machine.**", ""]  # fmt: skip
    for problem in result.get("problems", []):
        lines += [f"**{problem}**", ""]
    return "\n".join(lines)


def run_mode(args: argparse.Namespace, batching: bool, result: dict[str, Any],
             off_max: dict[int, float]) -> list[dict[str, Any]]:  # fmt: skip
    mode = "on" if batching else "off"
    log = Path(tempfile.gettempdir()) / f"bench_batching_{mode}_{os.getpid()}.log"
    server = Server(args, batching, log)
    bench = Bench(args, server, mode)
    try:
        server.wait_serving()
        result.setdefault("server_command", shlex.join(server.cmd))
        info = fetch_model_info(server.target, "")
        result.setdefault("model", f"{info.model} v{info.version} (schema {info.schema.name}, "
                                   f"{len(info.schema.context_fields)} context + "
                                   f"{len(info.schema.candidate_fields)} candidate fields)")  # fmt: skip
        for k in args.k:
            if args.points == "saturation":
                bench.point(k, "saturation", concurrency=args.saturation_concurrency)
                continue
            best = bench.max_rate(k)
            if not batching:
                off_max[k] = best["offered_rps"] if best else 0.0
            if off_max.get(k):
                for frac in (0.5, 0.9):
                    bench.point(k, f"{frac:.0%} of off max", rate=frac * off_max[k])
            if best:
                bench.point(k, "80% of max", rate=0.8 * best["offered_rps"],
                            duration_s=args.timeout_duration)  # fmt: skip
            else:
                result.setdefault("problems", []).append(
                    f"K={k} {mode}: no open-loop rate met p99 <= {args.p99_ms:g} ms"
                )
            bench.point(k, "saturation", concurrency=args.saturation_concurrency)
    finally:
        server.stop()
    return bench.rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--model-dir", type=Path, default=ROOT / "models",
                   help="MODELS dir the servers serve (default: models/; make demo-model)")  # fmt: skip
    p.add_argument("--k", type=ints, default=[32, 300], help="candidates per request (32,300)")
    p.add_argument("--quick", action="store_true", help="short points for make bench (~2-3 min)")
    p.add_argument(
        "--duration", type=float, default=None, help="recorded s per point (10; quick 1.5)"
    )
    p.add_argument(
        "--warmup", type=float, default=None, help="unrecorded s per point (2; quick 0.5)"
    )
    p.add_argument("--timeout-duration", type=float, default=None,
                   help="recorded s at 80%% of max (60; quick 3)")  # fmt: skip
    p.add_argument(
        "--ramp", type=float, default=None, help="rate step of the search (1.25; quick 1.5)"
    )
    p.add_argument("--bisect", type=int, default=None, help="bisection steps (4; quick 1)")
    p.add_argument("--min-requests", type=int, default=None,
                   help="samples an open-loop point aims for: its duration is stretched up to "
                   "4x --duration (2000; quick 300)")  # fmt: skip
    p.add_argument("--p99-ms", type=float, default=10.0, help="latency bound of the max rate")
    p.add_argument("--max-error-rate", type=float, default=0.001, help="of a passing point")
    p.add_argument("--deadline-ms", type=float, default=100.0, help="gRPC deadline per request")
    p.add_argument("--saturation-concurrency", type=int, default=32, help="closed-loop C")
    p.add_argument("--pool", type=int, default=256, help="distinct requests per K")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-cpus", default="0", help="taskset CPU list of the server")
    p.add_argument("--client-cpus", type=ints, default=[1], help="CPUs of the load generator")
    p.add_argument("--server-args", default="", help="more serve flags for both modes")
    p.add_argument("--ceiling", default=None,
                   help="bench_model JSON (default benchmarks/results/model_ceiling[.quick].json)"
                   ", or 'measure': run bench_model on the server core before and after")  # fmt: skip
    p.add_argument("--rounds", type=int, default=1,
                   help="with --points saturation --ceiling measure: (ceiling, served) rounds")  # fmt: skip
    p.add_argument("--points", choices=("all", "saturation"), default="all",
                   help="all steps (default), or only the closed-loop saturation point")  # fmt: skip
    p.add_argument("--modes", default="off,on", help="off,on (off first: it sets the equal loads)")
    p.add_argument(
        "--out", default=None, help="output stem (default benchmarks/results/batching[.quick])"
    )
    args = p.parse_args()
    quick = args.quick
    for name, full, short in (("duration", 10.0, 1.5), ("warmup", 2.0, 0.5),
                              ("timeout_duration", 60.0, 3.0), ("ramp", 1.25, 1.5),
                              ("bisect", 4, 1), ("min_requests", 2000, 300)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    if args.out is None:
        args.out = str(ROOT / "benchmarks/results" / ("batching.quick" if quick else "batching"))
    if not (args.model_dir.is_dir() and any(args.model_dir.iterdir())):
        p.error(f"--model-dir {args.model_dir}: no models (make demo-model builds models/demo)")
    if not args.ramp > 1:
        p.error(f"--ramp must be > 1, got {args.ramp}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.rounds > 1 and (args.points != "saturation" or args.ceiling != "measure"):
        p.error("--rounds > 1 needs --points saturation --ceiling measure")
    result: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": loadtest.machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": TARGETS,
    }
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # like Ctrl-C: clean up
    rows: list[dict[str, Any]] = []
    off_max: dict[int, float] = {}
    ceilings: list[dict[str, Any]] = []
    measure = args.ceiling == "measure"
    try:
        if measure:
            ceilings.append(measure_ceiling(args, Path(f"{args.out}.ceiling_before")))
        for r in range(args.rounds):
            for mode in args.modes.split(","):
                rows += [
                    {**row, "round": r} for row in run_mode(args, mode == "on", result, off_max)
                ]
            if measure:
                last = r == args.rounds - 1
                stem = f"{args.out}.ceiling_{'after' if last else r + 1}"
                ceilings.append(measure_ceiling(args, Path(stem)))
    except KeyboardInterrupt:
        result.setdefault("problems", []).append("interrupted: the table is incomplete")
    finally:
        for server in list(LIVE):
            server.stop()
    result["rows"] = rows
    if measure:
        result["ceiling"] = best_ceiling(ceilings) if ceilings else None
    else:
        result["ceiling"] = read_ceiling(Path(args.ceiling) if args.ceiling else None)
    result["summary"] = summarize(rows, args.k, result["ceiling"], ceilings if measure else None)
    write_results(args.out, result, report_md(result))
    return 0


def write_results(out: str | Path, result: dict[str, Any], text: str) -> None:
    """``out``.json (``result``) and ``out``.md (``text``, also printed): every benchmark's tail."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    Path(f"{out}.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
