"""Does the micro-batcher earn its keep? Closed-loop gRPC load, batching on vs ``--no-batching``.

    .venv/bin/python benchmarks/bench_batching_quick.py --model-dir MODELS [--duration 12]

For each K (candidates per request) and mode, one ``adpredict serve --workers 1`` process is
started pinned to core 0 (``taskset -c 0``); this process, the load generator, pins itself to
core 1. For each concurrency C, C grpc.aio callers keep one Predict each outstanding on one
channel (closed loop), cycling through ``--pool`` distinct pre-built requests
(``example_request(schema, k, seed=i)``) with a ``--deadline-ms`` gRPC deadline: ``--warmup``
seconds unrecorded, then ``--duration`` seconds measured. Without ``--model-dir`` a demo model is
trained first (``synth --rows 200000`` + ``train``, about two minutes). Defaults: K = 32, 300;
C = 1, 2, 4, 8, 32; 3 + 12 s per point; about 5.5 minutes. "on" is the server's default flags
(plus ``--server-args``), "off" the same with ``--no-batching``. Needs a quiet machine: the
report flags points during which other jobs used the CPU, and servers that died mid-run.

Measured per point (only RPCs that complete inside the window count)
    req/s, pred/s   OK responses (x K) / window seconds
    p50, p99        client-side latency of OK responses (send -> response), ms
    errors          failed RPCs by status code (the JSON has them by code)
    calls/req       server compute calls per request. The server's /metrics has no batch
                    counter (only process metrics; the families are listed in the output), so
                    it is bounded from the fields every PredictResponse carries about the (last)
                    batch it rode in, summed over OK responses and divided by their number:
                    upper = sum K / batch_predictions, lower = sum 1 / batch_requests. Both are
                    exact, and equal, when no request is split across batches (always with
                    --no-batching). A request (K < max batch) is split only when a batch fills,
                    so its first batch is full and only its last batch reports: the upper
                    bound charges it K/n_last >= its true share p1/1024 + p2/n_last, and the
                    lower one charges the first batch r/b <= 1 (r of its b pieces report).
                    The table shows "lower-upper" when they differ. Compute spent on requests
                    that then failed (late answers) is not counted.
    CPU-us/pred     server utime+stime (/proc/PID/stat, all threads) over the window / OK
                    predictions; server and load-generator CPU % of one core are reported too
    other CPU %     busy CPU of the whole machine (/proc/stat) minus server and load generator,
                    in % of one core: anything above a few % means another job distorted the
                    point (the report flags points above 10%)

Outputs ``--out`` + ``.json`` / ``.md`` (default benchmarks/results/batching_quick). The ratio per
K: best pred/s with p99 <= ``--p99-ms`` and at most 0.1% errors, batching on / off.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adpredict.client import AsyncPredictionClient, build_request, example_request
from adpredict.schema import Schema
from adpredict.v1 import prediction_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
MAX_ERROR_RATE = 0.001  # a point with more errors never counts as "meets the p99 bound"
LIVE: set[Server] = set()  # servers not yet stopped; main() stops them whatever happens


def pin_all_threads(cpus: set[int]) -> None:
    """Pin every thread of this process (sched_setaffinity(0) would pin only the caller)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat; idle and iowait excluded)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) * TICK_S


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln), "?"
    )
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def train_demo_model(workdir: Path) -> Path:
    """``adpredict synth --rows 200000`` + ``adpredict train`` into ``workdir``; the MODELS dir."""
    run = [sys.executable, "-m", "adpredict"]
    subprocess.run([*run, "synth", "--rows", "200000", "--out", str(workdir / "data")], check=True)
    model = workdir / "models" / "demo"
    subprocess.run(
        [*run, "train", "--data", str(workdir / "data"), "--model-dir", str(model), "--quiet",
         "--no-checkpoint"],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return model.parent


class Server:
    """One ``adpredict serve --workers 1`` subprocess pinned with taskset; ``stop()`` always."""

    def __init__(self, model_dir: Path, cpus: str, batching: bool, log: Path, extra: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.cmd = [
            "taskset", "-c", cpus, sys.executable, "-m", "adpredict", "serve",
            "--model-dir", str(model_dir), "--workers", "1", "--port", str(self.port),
            "--metrics-port", str(self.metrics_port), *([] if batching else ["--no-batching"]),
            *shlex.split(extra),
        ]  # fmt: skip
        self.log = log
        with log.open("wb") as out:  # own session: a Ctrl-C reaches only us; we stop it
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            )  # fmt: skip
        LIVE.add(self)

    async def wait_serving(self, timeout_s: float = 300.0) -> None:
        until = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < until:
                if self.proc.poll() is not None:
                    break
                with contextlib.suppress(grpc.RpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.2)
        tail = self.log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"server did not become SERVING: {shlex.join(self.cmd)}\n{tail}")

    def metric_families(self) -> list[str]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        return sorted(ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE "))

    def stop(self) -> None:
        LIVE.discard(self)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def run_point(
    stub: Any, pool: list[Any], k: int, c: int, args: argparse.Namespace, pid: int
) -> dict[str, Any]:
    """C closed-loop callers: warm-up, then the measured window. One row of the table."""
    state = {"recording": False, "stop": False}
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    shares = [0.0, 0.0]  # sum of K / batch_predictions, sum of 1 / batch_requests
    sent = itertools.count()
    timeout = args.deadline_ms / 1e3

    async def caller() -> None:
        while not state["stop"]:
            request = pool[next(sent) % len(pool)]
            started = time.perf_counter()
            try:
                reply = await stub.Predict(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if state["recording"]:
                    errors[exc.code().name] += 1
                continue
            if state["recording"]:
                latencies.append(time.perf_counter() - started)
                shares[0] += k / max(1, reply.batch_predictions)
                shares[1] += 1 / max(1, reply.batch_requests)

    tasks = [asyncio.create_task(caller()) for _ in range(c)]
    try:
        await asyncio.sleep(args.warmup)
        cpu0, own0, all0 = cpu_seconds(pid), time.process_time(), machine_busy_seconds()
        t0 = time.perf_counter()
        state["recording"] = True
        await asyncio.sleep(args.duration)
        state["recording"] = False
        cpu1, own1, all1 = cpu_seconds(pid), time.process_time(), machine_busy_seconds()
        t1 = time.perf_counter()
    finally:
        state["stop"] = True
        await asyncio.gather(*tasks, return_exceptions=True)
    window, ok = t1 - t0, len(latencies)
    lat_ms = np.array(latencies or [np.nan]) * 1e3
    n_err = sum(errors.values())
    return {
        "k": k,
        "concurrency": c,
        "window_s": round(window, 3),
        "ok": ok,
        "req_s": ok / window,
        "pred_s": ok * k / window,
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "errors": n_err,
        "errors_by_code": dict(errors),
        "error_rate": n_err / max(1, ok + n_err),
        "compute_calls_upper": shares[0] / ok if ok else None,
        "compute_calls_lower": shares[1] / ok if ok else None,
        "mean_batch_predictions_lower": ok * k / shares[0] if ok else None,
        "server_cpu_us_per_prediction": (cpu1 - cpu0) * 1e6 / (ok * k) if ok else None,
        "server_cpu_pct": 100 * (cpu1 - cpu0) / window,
        "loadgen_cpu_pct": 100 * (own1 - own0) / window,
        "other_cpu_pct": 100 * ((all1 - all0) - (cpu1 - cpu0) - (own1 - own0)) / window,
    }


async def run_server(
    args: argparse.Namespace, k: int, batching: bool, pools: dict[int, Any], info: dict[str, Any]
) -> list[dict[str, Any]]:
    mode = "on" if batching else "off"
    log = Path(tempfile.gettempdir()) / f"bench_batching_quick_{k}_{mode}.log"
    server = Server(args.model_dir, args.server_cpus, batching, log, args.server_args)
    rows = []
    try:
        await server.wait_serving()
        info.setdefault("server_command", shlex.join(server.cmd))
        info.setdefault("metrics_families", server.metric_families())
        target = f"127.0.0.1:{server.port}"
        if k not in pools:
            async with AsyncPredictionClient(target, timeout_s=10) as client:
                meta = await client.metadata()
            info.setdefault("model", f"{meta.model} v{meta.version} (schema {meta.schema.name})")
            pools[k] = build_pool(meta.schema, k, args.pool)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.PredictionServiceStub(channel)
            for c in args.concurrency:
                row = {"mode": mode, **await run_point(stub, pools[k], k, c, args, server.proc.pid)}
                rows.append(row)
                print(format_row(row), flush=True)
                if server.proc.poll() is not None:  # killed or crashed: its points are void
                    problem = (f"the K={k} {mode} server exited (status {server.proc.returncode})"
                               f" during C={c}: rows from then on are void; log: {log}")  # fmt: skip
                    info.setdefault("problems", []).append(problem)
                    print(problem, flush=True)
                    break
    finally:
        server.stop()
    return rows


def build_pool(schema: Schema, k: int, size: int) -> list[Any]:
    examples = (example_request(schema, k, seed=i) for i in range(size))
    return [build_request(ex.context, ex.candidates) for ex in examples]


COLUMNS = ("K", "mode", "C", "req/s", "pred/s", "p50 ms", "p99 ms", "errors", "calls/req",
           "CPU-µs/pred", "server CPU %", "loadgen CPU %", "other CPU %")  # fmt: skip


def calls(r: dict[str, Any]) -> str:
    lo, hi = r["compute_calls_lower"], r["compute_calls_upper"]
    if lo is None or hi is None:
        return "-"
    return f"{hi:.3f}" if f"{lo:.3f}" == f"{hi:.3f}" else f"{lo:.3f}-{hi:.3f}"


def format_row(r: dict[str, Any]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    errs = ", ".join(f"{code} {n}" for code, n in sorted(r["errors_by_code"].items())) or "0"
    cells = (r["k"], r["mode"], r["concurrency"], f"{r['req_s']:,.0f}", f"{r['pred_s']:,.0f}",
             f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}", errs,
             calls(r), num(r["server_cpu_us_per_prediction"], ".2f"),
             f"{r['server_cpu_pct']:.0f}", f"{r['loadgen_cpu_pct']:.0f}", f"{r['other_cpu_pct']:.0f}")  # fmt: skip
    return "| " + " | ".join(str(c) for c in cells) + " |"


def ratios(rows: list[dict[str, Any]], p99_ms: float) -> dict[int, dict[str, Any]]:
    out = {}
    for k in sorted({r["k"] for r in rows}):
        best = {}
        for mode in ("on", "off"):
            ok = [r for r in rows if r["k"] == k and r["mode"] == mode
                  and r["p99_ms"] <= p99_ms and r["error_rate"] <= MAX_ERROR_RATE]  # fmt: skip
            best[mode] = max(ok, key=lambda r: r["pred_s"], default=None)
        on, off = best["on"], best["off"]
        out[k] = {
            "on_pred_s": on and on["pred_s"],
            "on_concurrency": on and on["concurrency"],
            "off_pred_s": off and off["pred_s"],
            "off_concurrency": off and off["concurrency"],
            "ratio": on["pred_s"] / off["pred_s"] if on and off else None,
        }
    return out


def report(args: argparse.Namespace, info: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    busy = [r for r in rows if r["other_cpu_pct"] > 10]
    lines = [
        "# Batching on vs off (bench_batching_quick)",
        "",
        f"Command: `{info['command']}`  ",
        f"Machine: {info['machine']['cores']} cores, {info['machine']['cpu_model']}, "
        f"{info['machine']['platform']}, Python {info['machine']['python']}, grpc "
        f"{info['machine']['grpc']}; load average at start {info['machine']['loadavg_at_start']}  ",
        f"Pinning: server `taskset -c {args.server_cpus}` (1 worker), load generator (this "
        f"process, grpc.aio, one channel) on CPUs {args.client_cpus}  ",
        f"Server: `{info.get('server_command', '?')}` (+ `--no-batching` for mode off)  ",
        f"Model: {info.get('model')} from {args.model_dir}; pool of {args.pool} distinct requests per K; deadline "
        f"{args.deadline_ms:g} ms; {args.warmup:g} s warm-up + {args.duration:g} s measured "
        f"per point; closed loop with C outstanding requests; latencies of OK responses  ",
        f"Server /metrics families: {', '.join(info.get('metrics_families', [])) or '?'}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *(format_row(r) for r in rows),
        "",
        *(f"**{problem}**\n" for problem in info.get("problems", [])),
        *(
            [
                "**Warning: other jobs used > 10% of a core during: "
                + ", ".join(f"K={r['k']} {r['mode']} C={r['concurrency']}" for r in busy)
                + "; those points are distorted.**",
                "",
            ]
            if busy
            else []
        ),
        f"Best pred/s with p99 <= {args.p99_ms:g} ms and <= {MAX_ERROR_RATE:.1%} errors:",
        "",
    ]
    for k, r in info["ratios"].items():
        if r["ratio"] is None:
            best = {m: f"{v:,.0f}" if v else "no point meets it" for m, v in
                    (("on", r["on_pred_s"]), ("off", r["off_pred_s"]))}  # fmt: skip
            lines.append(f"- K={k}: on {best['on']}, off {best['off']}: no ratio")
        else:
            lines.append(
                f"- K={k}: on {r['on_pred_s']:,.0f} (C={r['on_concurrency']}) / off "
                f"{r['off_pred_s']:,.0f} (C={r['off_concurrency']}) = **{r['ratio']:.2f}x**"
            )
    lines += ["", "Method: see the docstring of benchmarks/bench_batching_quick.py "
              "(calls/req bounded from the responses' batch_predictions / batch_requests; CPU from /proc/PID/stat)."]  # fmt: skip
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace, info: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    pools: dict[int, Any] = {}
    for k in args.k:
        for batching in (True, False):
            rows += await run_server(args, k, batching, pools, info)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--model-dir", type=Path, help="MODELS dir (default: train a demo model)")
    p.add_argument("--k", type=ints, default=[32, 300], help="candidates per request (32,300)")
    p.add_argument(
        "--concurrency", type=ints, default=[1, 2, 4, 8, 32], help="C values (1,2,4,8,32)"
    )
    p.add_argument("--duration", type=float, default=12.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=3.0, help="unrecorded seconds per point")
    p.add_argument("--deadline-ms", type=float, default=50.0, help="gRPC deadline per request")
    p.add_argument("--pool", type=int, default=200, help="distinct requests per K")
    p.add_argument("--p99-ms", type=float, default=10.0, help="latency bound for the ratio")
    p.add_argument("--server-cpus", default="0", help="taskset CPU list of the server")
    p.add_argument("--client-cpus", type=ints, default=[1], help="CPUs of the load generator")
    p.add_argument("--server-args", default="", help="more serve flags, e.g. '--max-wait-ms 0'")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/batching_quick"))
    args = p.parse_args()
    info: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
    }
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # like Ctrl-C: clean up
    try:
        with tempfile.TemporaryDirectory(prefix="bench_batching_") as tmp:
            if args.model_dir is None:
                args.model_dir = train_demo_model(Path(tmp))
            pin_all_threads(set(args.client_cpus))
            rows = asyncio.run(main_async(args, info))
    finally:
        for server in list(LIVE):
            server.stop()
    info["ratios"] = ratios(rows, args.p99_ms)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({**info, "settings": settings, "rows": rows}, indent=2, default=str) + "\n"
    )
    text = report(args, info, rows)
    out.with_suffix(".md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
