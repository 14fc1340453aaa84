"""The load generator: its loops on a real event loop with fake senders, and whole runs against a
real ``adpredict serve`` on loopback (open and closed loop, two processes, JSON + PNG, Ctrl-C)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adpredict import loadtest
from adpredict.cli import main
from adpredict.loadtest import (
    CODES,
    OK,
    CandidateSpec,
    LoadTestError,
    LoadTestOptions,
    LoopBounds,
    Recorder,
    Samples,
)
from adpredict.schema import load_schema

START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------- pure parts


def test_candidate_spec_parses_the_three_forms_and_names_what_is_wrong() -> None:
    rng = np.random.default_rng(0)
    assert set(CandidateSpec.parse("32").sample(rng, 100, 1024)) == {32}
    ks = CandidateSpec.parse("1-300").sample(rng, 5000, 1024)
    assert ks.min() == 1 and ks.max() == 300
    ks = CandidateSpec.parse("lognormal:60").sample(rng, 20000, 100_000)
    assert 55 < ks.mean() < 65 and ks.min() >= 1
    assert CandidateSpec.parse("500").sample(rng, 3, 64).tolist() == [64, 64, 64]  # max_candidates
    for bad in ("0", "5-2", "x", "lognormal:", "lognormal:0.5", "lognormal:60:9", "1-2-3"):
        with pytest.raises(ValueError, match="expected K >= 1"):
            CandidateSpec.parse(bad)


def test_pool_uses_synth_popularity_for_rtb_fields_and_zipf_otherwise() -> None:
    from adpredict.v1 import prediction_service_pb2 as pb

    rtb = load_schema("rtb")
    pool = loadtest.build_pool(rtb, CandidateSpec.parse("1-40"), 50, model="m", seed=3)
    assert set(pool.sources.values()) == {"synth.World"}
    assert len(pool.payloads) == 50 and all(1 <= k <= 40 for k in pool.ks)
    request = pb.PredictRequest.FromString(pool.payloads[0])
    assert request.model == "m" and request.num_candidates == pool.ks[0]
    assert len(request.candidates["creative_id"].values) == pool.ks[0]
    assert request.candidates["creative_id"].values[0].startswith(b"cr-")
    assert len(request.context["user_segments"].values) <= 16
    # Popularity is Zipf-like: the most common site is far more common than the median one.
    sites = [pb.PredictRequest.FromString(p).context["site_domain"].values[0] for p in
             loadtest.build_pool(rtb, CandidateSpec.parse("1"), 2000, seed=1).payloads]  # fmt: skip
    counts = sorted(np.unique(sites, return_counts=True)[1], reverse=True)
    assert counts[0] >= 10 * counts[len(counts) // 2]

    criteo = load_schema("criteo")
    pool = loadtest.build_pool(criteo, CandidateSpec.parse("8"), 5, seed=0)
    assert set(pool.sources.values()) == {"zipf"}
    request = pb.PredictRequest.FromString(pool.payloads[0])
    assert request.num_candidates == 8


async def _run_open_loop(
    arrivals: list[float], deadline_s: float, stall_s: float
) -> tuple[list[tuple[float, float, str, float]], list[float]]:
    """Open loop whose first send stalls the event loop for ``stall_s`` (a slow generator)."""
    timeouts: list[float] = []

    async def send(payload: bytes, k: int, timeout_s: float) -> tuple[int, int]:
        timeouts.append(timeout_s)
        if len(timeouts) == 1:
            time.sleep(stall_s)  # blocks the loop: every later arrival is sent late
        return OK, 1

    recorder = Recorder()
    start = time.monotonic() + 0.02
    await loadtest.open_loop(
        send,
        iter([(b"x", 1)] * len(arrivals)),
        iter(arrivals),
        recorder,
        LoopBounds(warmup_s=0.0, end_s=10.0, quota=None),
        start=start,
        deadline_s=deadline_s,
    )
    s = recorder.take()
    rows = sorted(
        zip(s.offset_s, s.latency_s, (loadtest.CODE_NAMES[c] for c in s.code), s.lag_s, strict=True)
    )
    return rows, timeouts


def test_open_loop_latency_includes_the_generators_lag() -> None:
    rows, _ = asyncio.run(_run_open_loop([0.0, 0.01, 0.02, 0.03], 1.0, stall_s=0.06))
    assert [r[2] for r in rows] == ["OK"] * 4
    # Request i was due at 10*i ms but could only go out after the 60 ms stall: its latency
    # counts from when it was due (a closed-loop timer would report ~0 for requests 1..3).
    for offset, latency, _, lag in rows[1:]:
        assert latency >= 0.06 - offset - 0.002, (offset, latency)
        assert lag >= 0.06 - offset - 0.002
        assert latency >= lag
    assert rows[0][1] >= 0.06


def test_open_loop_deadline_runs_from_the_scheduled_time() -> None:
    # After a 60 ms stall, the request due at 10 ms is 50 ms late: past its 45 ms deadline, so
    # it is not sent at all; the one due at 20 ms is sent with only what is left of its budget.
    rows, timeouts = asyncio.run(_run_open_loop([0.0, 0.01, 0.02], 0.045, stall_s=0.06))
    assert [r[2] for r in rows] == ["OK", "EXPIRED_BEFORE_SEND", "OK"]
    assert len(timeouts) == 2 and timeouts[0] <= 0.045 and timeouts[1] <= 0.045 - 0.04 + 0.002


def test_closed_loop_keeps_c_outstanding_and_stops_at_the_quota() -> None:
    in_flight, peak = 0, 0

    async def send(payload: bytes, k: int, timeout_s: float) -> tuple[int, int]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.002)
        in_flight -= 1
        return (OK if k == 1 else CODES["UNAVAILABLE"]), 3

    recorder = Recorder()
    bounds = LoopBounds(warmup_s=0.0, end_s=10.0, quota=25)
    requests = iter([(b"x", 1), (b"y", 2)] * 100)
    asyncio.run(
        loadtest.closed_loop(
            send, requests, recorder, bounds, start=time.monotonic(), concurrency=4, deadline_s=1.0
        )
    )
    s = recorder.take()
    assert len(s) == 25 and peak == 4 and bounds.stopped_by == "requests"
    summary = loadtest.summarize(s, window_s=1.0)
    assert summary["ok"] + summary["errors"] == 25
    assert summary["errors_by_code"] == {"UNAVAILABLE": summary["errors"]}
    assert summary["client_compute_calls_per_request"] == pytest.approx(1 / 3)


def test_samples_merge_exactly_across_processes() -> None:
    # Two processes with very different latencies: the merged p50 is the p50 of all samples,
    # not the mean (or median) of the two processes' medians.
    a = Samples(offset_s=np.zeros(90), latency_s=np.full(90, 0.001), code=np.zeros(90, np.int16),
                k=np.ones(90, np.int32), lag_s=np.zeros(90), batch_requests=np.ones(90, np.int32),
                proc=np.zeros(90, np.int16))  # fmt: skip
    b = Samples(offset_s=np.zeros(10), latency_s=np.linspace(0.1, 1.0, 10),
                code=np.zeros(10, np.int16), k=np.ones(10, np.int32), lag_s=np.zeros(10),
                batch_requests=np.ones(10, np.int32), proc=np.ones(10, np.int16))  # fmt: skip
    merged = loadtest.summarize(Samples.concat([a, b]), window_s=1.0)
    assert merged["requests"] == 100
    assert merged["latency_ms"]["p50"] == pytest.approx(1.0)  # not (1 + 550) / 2
    assert merged["latency_ms"]["p90"] == pytest.approx(1.0)
    assert merged["latency_ms"]["p99"] == pytest.approx(900.0)
    assert merged["latency_ms"]["max"] == pytest.approx(1000.0)


def test_schedule_parses_phases_and_names_what_is_wrong() -> None:
    assert loadtest.parse_schedule("10:500, 60:2000,2.5:1") == (
        (10.0, 500.0),
        (60.0, 2000.0),
        (2.5, 1.0),
    )
    for bad in ("", "10", "10:0", "0:5", "a:b", "10:5:1", "10:inf"):
        with pytest.raises(ValueError, match="SECONDS"):
            loadtest.parse_schedule(bad)
    options = LoadTestOptions(schedule=((2.0, 100.0), (3.0, 400.0)), warmup_s=1.0)
    assert options.problems() == [] and options.mode == "open"
    assert options.recorded_s == 5.0 and options.offered_rps == pytest.approx(280.0)
    assert options.segments() == ((1.0, 100.0), (2.0, 100.0), (3.0, 400.0))  # warm-up at R1
    text = " ".join(LoadTestOptions(rate=5, schedule=((1.0, 5.0),), duration_s=3).problems())
    assert "exactly one of --rate" in text and "--duration cannot be combined" in text


def test_piecewise_poisson_arrivals_follow_each_phase_and_end() -> None:
    rng = np.random.default_rng(4)
    t = np.array(list(loadtest.piecewise_poisson_arrivals(((1.0, 3000.0), (2.0, 200.0)), rng)))
    assert np.all(np.diff(t) > 0) and t[0] >= 0 and t[-1] < 3.0
    # Poisson counts: mean and variance 3000 and 400; 5 standard deviations either way.
    assert abs(np.sum(t < 1.0) - 3000) < 5 * 3000**0.5
    assert abs(np.sum(t >= 1.0) - 400) < 5 * 400**0.5


def _samples(offset: list[float], latency: list[float], code: list[str]) -> Samples:
    n = len(offset)
    return Samples(offset_s=np.array(offset), latency_s=np.array(latency),
                   code=np.array([CODES[c] for c in code], np.int16), k=np.ones(n, np.int32),
                   lag_s=np.zeros(n), batch_requests=np.ones(n, np.int32),
                   proc=np.zeros(n, np.int16))  # fmt: skip


def test_latency_by_code_windows_and_phases() -> None:
    # Recording starts at 1.0 s. Window [0, 0.5): 99 fast OK + 1 refusal -> p99 with failures
    # as misses is still the OK latency; window [0.5, 1.0): 2 OK + 2 refusals -> inf.
    offsets = [1.0 + i / 1000 for i in range(100)] + [1.6, 1.7, 1.8, 1.9]
    latencies = [0.002] * 99 + [0.0005, 0.004, 0.030, 0.001, 0.0007]
    codes = ["OK"] * 99 + ["RESOURCE_EXHAUSTED", "OK", "OK", "DEADLINE_EXCEEDED",
                           "RESOURCE_EXHAUSTED"]  # fmt: skip
    s = _samples(offsets, latencies, codes)
    by_code = loadtest.summarize(s, 1.0)["latency_by_code_ms"]
    assert set(by_code) == {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
    assert by_code["RESOURCE_EXHAUSTED"]["p50"] == pytest.approx(0.5)
    assert by_code["RESOURCE_EXHAUSTED"]["max"] == pytest.approx(0.7)
    assert by_code["DEADLINE_EXCEEDED"]["p99"] == pytest.approx(1.0)
    assert by_code["OK"]["max"] == pytest.approx(30.0)
    rows = loadtest.timeline(s, warmup_s=1.0, bin_s=0.5)
    assert [r["requests"] for r in rows] == [100, 4]
    assert rows[0]["p99_failures_as_misses"] == pytest.approx(2.0)
    assert rows[1]["p99_failures_as_misses"] == np.inf and rows[1]["p99"] == pytest.approx(30.0)
    phases = loadtest.phase_summaries(s, 1.0, ((0.5, 200.0), (0.5, 8.0)))
    assert [p["start_s"] for p in phases] == [0.0, 0.5]
    assert [p["summary"]["requests"] for p in phases] == [100, 4]
    assert phases[1]["summary"]["ok_rps"] == pytest.approx(2 / 0.5)
    assert loadtest.phase_summaries(s, 1.0, ()) == []


SCRAPE_BEFORE = """\
# TYPE adpredict_compute_calls_total counter
adpredict_compute_calls_total{model="m",reason="full"} 2
adpredict_compute_calls_total{model="m",reason="max_wait"} 10
# TYPE adpredict_requests_total counter
adpredict_requests_total{method="Predict",model="m",code="OK"} 20
# TYPE adpredict_predictions_total counter
adpredict_predictions_total{model="m"} 640
# TYPE adpredict_batch_predictions histogram
adpredict_batch_predictions_bucket{model="m",le="+Inf"} 12
adpredict_batch_predictions_sum{model="m"} 640
adpredict_batch_predictions_count{model="m"} 12
# TYPE adpredict_process_cpu_seconds_total counter
adpredict_process_cpu_seconds_total 5.0
"""
SCRAPE_AFTER = (
    SCRAPE_BEFORE.replace('reason="full"} 2', 'reason="full"} 7')
    .replace('reason="max_wait"} 10', 'reason="max_wait"} 15')
    .replace('code="OK"} 20', 'code="OK"} 120')
    .replace("} 640", "} 3840")
    .replace('count{model="m"} 12', 'count{model="m"} 22')
    .replace("seconds_total 5.0", "seconds_total 5.8")
)


def _parse(text: str) -> loadtest.Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_server_figures_are_deltas_between_scrapes() -> None:
    fig = loadtest.server_figures(_parse(SCRAPE_BEFORE), _parse(SCRAPE_AFTER), "m")
    assert fig["available"]
    assert fig["compute_calls"] == 10 and fig["compute_calls_by_reason"] == {
        "full": 5,
        "max_wait": 5,
    }
    assert fig["predict_requests"] == 100 and fig["compute_calls_per_request"] == 0.1
    assert fig["compute_calls_per_ok_request"] == 0.1
    assert fig["mean_batch_predictions"] == pytest.approx(3200 / 10)
    assert fig["cpu_seconds_per_million_predictions"] == pytest.approx(0.8 / 3200 * 1e6)
    assert fig["requests_by_code"] == {"OK": 100}
    # A page without the batching metrics, and no page at all: unavailable, with the reason.
    bare = _parse("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.0\n")
    fig = loadtest.server_figures(bare, bare, "m")
    assert not fig["available"] and "adpredict_compute_calls_total" in fig["reason"]
    assert fig["cpu_source"] == "process_cpu_seconds_total"
    scrape, reason = loadtest.scrape_metrics(f"http://127.0.0.1:{free_port()}/metrics", 1.0)
    assert scrape is None and "cannot fetch" in reason


def test_options_name_the_bad_flag(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, flag in (
        (["--rate", "0"], "--rate"),
        (["--rate", "5", "--candidates", "5-2"], "--candidates"),
        (["--rate", "5", "--concurrency", "2"], "--concurrency"),
        (["--concurrency", "1", "--duration", "-3"], "--duration"),
        (["--concurrency", "1", "--cpus", "a,b"], "--cpus"),
        ([], "--rate"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["loadtest", *argv])
        assert exc.value.code == 2
        assert flag in capsys.readouterr().err, argv
    problems = LoadTestOptions(concurrency=1, procs=2, cpus=(999,), deadline_ms=0).problems()
    text = " ".join(problems)
    assert "--concurrency 1 is less than --procs 2" in text
    assert "--cpus [999]" in text and "--deadline-ms" in text
    with pytest.raises(LoadTestError, match="exactly one of --rate"):
        loadtest.run(LoadTestOptions(), progress=None)
    # An unreachable target is one line naming --target, exit status 2.
    port = free_port()
    assert main(["loadtest", "--rate", "5", "--target", f"127.0.0.1:{port}"]) == 2
    assert f"--target 127.0.0.1:{port}" in capsys.readouterr().err


# ---------------------------------------------------------------------- against a real server


class Server:
    def __init__(self, model_dir: Path) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        cmd = [sys.executable, "-m", "adpredict", "serve", "--model-dir", str(model_dir),
               "--workers", "1", "--port", str(self.port), "--metrics-port",
               str(self.metrics_port), "--log-level", "WARNING"]  # fmt: skip
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)

    def wait_serving(self) -> None:
        until = time.monotonic() + START_TIMEOUT_S
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < until:
                assert self.proc.poll() is None, "server exited"
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise AssertionError("server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(small_model_root: Path) -> Iterator[Server]:
    s = Server(small_model_root)
    try:
        s.wait_serving()
        yield s
    finally:
        s.stop()


def _check_sane(report: dict, requests: int | None = None) -> None:
    s = report["summary"]
    assert s["ok"] + s["errors"] == s["requests"]
    assert sum(s["errors_by_code"].values()) == s["errors"]
    assert sum(p["requests"] for p in report["generator"]["per_proc"]) == s["requests"]
    if requests is not None:
        assert s["requests"] == requests
    lat = s["latency_ms"]
    if s["ok"]:
        values = [lat["p50"], lat["p90"], lat["p99"], lat["p99_9"], lat["max"]]
        assert values == sorted(values) and values[0] > 0


def test_open_loop_run_writes_json_and_png(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["loadtest", "--target", server.target, "--metrics-url", server.metrics_url,
                 "--rate", "150", "--duration", "2", "--candidates", "1-64", "--deadline-ms",
                 "2000", "--server-pid", str(server.proc.pid), "--out", str(out),
                 "--plot", str(plot)])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert "req/s  p99" in captured.err  # the live line
    assert "latency of OK answers (ms): p50" in captured.out
    report = json.loads(out.read_text())
    _check_sane(report)
    s = report["summary"]
    assert report["mode"] == "open" and report["stopped_by"] == "duration"
    assert s["window_s"] == 2.0 and 150 < s["requests"] < 450  # Poisson: 300 expected
    assert s["errors"] == 0, s["errors_by_code"]
    assert s["predictions_per_s"] == pytest.approx(s["ok_rps"] * s["mean_k"], rel=1e-9)
    assert report["pool"]["k_min"] >= 1 and report["pool"]["k_max"] <= 64
    assert report["timeline"] and sum(r["requests"] for r in report["timeline"]) == s["requests"]
    assert report["server_process"]["cpu_seconds"] > 0
    srv = report["server"]
    if srv["available"]:  # the metrics of docs/METRICS.md are on the page
        assert (
            srv["predict_requests"] >= s["requests"] and 0 < srv["compute_calls_per_request"] <= 1
        )
        assert "compute calls for" in captured.out
    else:
        assert f"server metrics: unavailable ({srv['reason']})" in captured.out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_schedule_run_changes_rate_without_a_pause(server: Server) -> None:
    options = LoadTestOptions(target=server.target, schedule=((1.0, 40.0), (1.0, 250.0)),
                              warmup_s=0.3, candidates="8", deadline_ms=2000, pool=16,
                              metrics_url="")  # fmt: skip
    before = time.monotonic()
    report, samples = loadtest.run(options, progress=None)
    _check_sane(report)
    assert before < report["start_monotonic_s"] < time.monotonic()
    assert report["schedule"] == [{"seconds": 1.0, "rate": 40.0}, {"seconds": 1.0, "rate": 250.0}]
    assert report["summary"]["window_s"] == 2.0 and report["offered_rps"] == pytest.approx(145.0)
    first, second = (p["summary"] for p in report["phases"])
    assert first["requests"] + second["requests"] == report["summary"]["requests"]
    assert 10 <= first["requests"] <= 80 and 170 <= second["requests"] <= 340  # Poisson 40, 250
    assert samples.offset_s.min() >= 0.3 and samples.offset_s.max() < 2.3
    assert "phase 2 (1 s at 250 req/s from 1 s)" in loadtest.format_report(report)


def test_closed_loop_two_processes_merge_and_count_errors_by_code(server: Server) -> None:
    options = LoadTestOptions(target=server.target, concurrency=4, requests=80, procs=2,
                              candidates="16", deadline_ms=5000, pool=16,
                              metrics_url=f"http://127.0.0.1:{free_port()}/metrics")  # fmt: skip
    report, samples = loadtest.run(options, progress=None)
    _check_sane(report, requests=80)
    assert report["stopped_by"] == "requests"
    per_proc = [p["requests"] for p in report["generator"]["per_proc"]]
    assert per_proc == [40, 40]  # the quota is split; both processes' samples are merged
    assert set(samples.proc.tolist()) == {0, 1} and len(samples) == 80
    assert report["summary"]["latency_ms"]["max"] == pytest.approx(samples.latency_s.max() * 1e3)
    assert not report["server"]["available"]
    assert "server metrics: unavailable (cannot fetch" in loadtest.format_report(report)

    # A deadline nobody can meet: every request fails, counted by status code.
    report, _ = loadtest.run(
        LoadTestOptions(
            target=server.target, concurrency=2, requests=10, deadline_ms=0.01, metrics_url=""
        ),
        progress=None,
    )
    _check_sane(report, requests=10)
    s = report["summary"]
    assert s["errors_by_code"] == {"DEADLINE_EXCEEDED": 10} and s["timeout_rate"] == 1.0


def test_ctrl_c_gives_a_partial_report(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "partial.json"
    cmd = [sys.executable, "-m", "adpredict", "loadtest", "--target", server.target,
           "--metrics-url", "", "--rate", "50", "--duration", "60", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        assert proc.stderr is not None
        for line in proc.stderr:  # wait for the first live line: the run is under way
            if "req/s" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout
    assert "stopped by interrupt" in stdout
    report = json.loads(out.read_text())
    assert report["interrupted"] and 0 < report["summary"]["requests"] < 50 * 60
    _check_sane(report)
