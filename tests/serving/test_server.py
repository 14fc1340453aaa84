"""The server lifecycle, for real: ``python -m adpredict serve`` subprocesses on loopback ports.

Covered: Predict, health and reflection over the wire; a hot swap under concurrent traffic with
zero failed requests; draining on SIGTERM; two workers on one port whose supervisor restarts a
killed worker; and, in-process, the health states around start-up and drain.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from adpredict.cli import main
from adpredict.client import PredictionClient, build_request, example_request
from adpredict.errors import RequestError
from adpredict.serving.server import (
    SERVICE_NAME,
    PredictionServer,
    ServerOptions,
    StartupError,
    default_workers,
)
from adpredict.v1 import prediction_service_pb2 as pb

START_TIMEOUT_S = 90.0  # TensorFlow import + load + warm-up on a busy 2-core machine
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``adpredict serve`` in a subprocess; its output lines are collected as they arrive."""

    def __init__(self, model_dir: Path, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "adpredict", "serve", "--model-dir", str(model_dir),
               "--port", str(self.port), "--metrics-port", "0", *args]  # fmt: skip
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (self.proc.stdout, self.proc.stderr)
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for_line(
        self, pattern: str, timeout_s: float = START_TIMEOUT_S, start: int = 0
    ) -> re.Match[str]:
        """The first output line (from index ``start``) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if match := regex.search(line):
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._more_output()):
                    raise AssertionError(
                        f"no line matching {pattern!r} (exit {self.proc.poll()}):\n" + self.output()
                    )
                self._changed.wait(min(remaining, 0.2))

    def _more_output(self) -> bool:
        return any(r.is_alive() for r in self._readers)

    def output(self) -> str:
        return "\n".join(line for line in self.lines if "oneDNN" not in line)

    def wait_ready(self) -> None:
        self.wait_for_line(r"^try: adpredict predict --target ")

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout_s)
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def model_dir(tmp_path: Path, small_model_root: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(small_model_root, root)
    return root


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.kill()


def health_status(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


OK_PREDICTS = 'adpredict_requests_total{code="OK",method="Predict",model="small"}'


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value}, labels in the exposition's (sorted) order."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, number = line.rpartition(" ")
            out[key] = float(number)
    return out


def example(client: PredictionClient, k: int = 16) -> pb.PredictRequest:
    schema = client.metadata().schema
    return build_request(*example_request(schema, k=k, seed=1))


@dataclass
class Outcome:
    started: float
    ended: float
    version: int | None  # None: failed
    error: str = ""
    batch_requests: int = 0


class Traffic:
    """``threads`` threads, each sending requests back to back on its own client."""

    def __init__(self, target: str, request: pb.PredictRequest, threads: int = 4) -> None:
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(target, request), daemon=True)
            for _ in range(threads)
        ]
        for t in self._threads:
            t.start()

    def _run(self, target: str, request: pb.PredictRequest) -> None:
        with PredictionClient(target, timeout_s=20.0) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    result = client.predict_request(request)
                    outcome = Outcome(started, time.monotonic(), result.version,
                                      batch_requests=result.batch_requests)  # fmt: skip
                except RequestError as exc:
                    outcome = Outcome(started, time.monotonic(), None, str(exc))
                with self._lock:
                    self.outcomes.append(outcome)
                if outcome.version is None and "UNAVAILABLE" in outcome.error:
                    return  # the server is gone; stop hammering

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_for(self, predicate: object, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"timed out; outcomes: {self.outcomes[-5:]}"
            time.sleep(0.02)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        return list(self.outcomes)


def test_serves_then_drains_in_flight_requests_on_sigterm(
    model_dir: Path, servers: list[ServerProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    # A long max wait keeps requests queued in the batcher, so some are surely in flight when
    # the signal arrives.
    metrics_port = free_port()
    server = ServerProcess(model_dir, "--workers", "1", "--max-wait-ms", "300", "--grace-s", "10",
                           "--metrics-port", str(metrics_port))  # fmt: skip
    servers.append(server)
    server.wait_ready()
    assert f"adpredict predict --target {server.target} --example" in server.output()
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
        assert b"process_cpu_seconds_total" in page.read()

    assert health_status(server.target) == SERVING
    assert health_status(server.target, SERVICE_NAME) == SERVING
    with grpc.insecure_channel(server.target) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names

    # `adpredict predict --example` (which uses client.predict_example) prints the answer.
    capsys.readouterr()
    assert main(["predict", "--target", server.target, "--example", "--k", "8"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert (answer["model"], answer["version"], answer["candidates"]) == ("small", 1, 8)
    assert all(0 < p["probability"] < 1 for p in answer["predictions"])

    with PredictionClient(server.target) as client:
        request = example(client)
    traffic = Traffic(server.target, request, threads=6)
    traffic.wait_for(lambda: traffic.count() >= 12)
    time.sleep(0.2)
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.stop(timeout_s=30) == 0
    outcomes = traffic.stop()

    # Requests sent at least 100 ms before the signal were inside the server (queued or
    # computing) when it arrived: every one of them must be answered.
    inside = [o for o in outcomes if o.started < signalled - 0.1]
    assert inside and all(o.version == 1 for o in inside), [o for o in inside if o.version is None]
    in_flight = [o for o in inside if o.ended > signalled]
    assert in_flight, "no request was in flight at the signal: the test proved nothing"
    # Later ones were answered or refused as unavailable; none hung or saw another error.
    late = [o for o in outcomes if o.started >= signalled - 0.1 and o.version is None]
    assert all("UNAVAILABLE" in o.error for o in late), late
    log = server.output()
    assert "SIGTERM received" in log and "draining" in log and "stopped" in log


def test_new_version_under_traffic_swaps_with_zero_failures(
    model_dir: Path, servers: list[ServerProcess]
) -> None:
    # --max-batch-size 1: every request is computed alone (also checks that mode end to end).
    server = ServerProcess(
        model_dir, "--workers", "1", "--poll-interval-s", "0.1", "--max-batch-size", "1"
    )
    servers.append(server)
    server.wait_ready()
    with PredictionClient(server.target) as client:
        request = example(client)
    traffic = Traffic(server.target, request, threads=4)
    traffic.wait_for(lambda: traffic.count() >= 20)
    tmp = model_dir / "small" / ".tmp-v2"
    shutil.copytree(model_dir / "small" / "1", tmp)
    tmp.rename(model_dir / "small" / "2")
    traffic.wait_for(lambda: any(o.version == 2 for o in traffic.outcomes))
    seen = traffic.count()
    traffic.wait_for(lambda: traffic.count() >= seen + 20)
    outcomes = traffic.stop()

    failed = [o for o in outcomes if o.version is None]
    assert not failed, failed[:5]
    versions = [o.version for o in sorted(outcomes, key=lambda o: o.started)]
    first_v2 = versions.index(2)
    assert versions[0] == 1 and first_v2 > 0
    # Requests that started once v2 answered were all answered by v2: no flapping back.
    switched = min(o.ended for o in outcomes if o.version == 2)
    assert all(o.version == 2 for o in outcomes if o.started > switched)
    assert all(o.batch_requests == 1 for o in outcomes)
    server.wait_for_line(r"model small swapped version 1 -> 2", timeout_s=10)
    assert server.stop() == 0


def established(pid: int, port: int) -> int:
    """TCP connections in state ESTABLISHED on local ``port`` held by process ``pid``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                local_port = int(cols[1].rsplit(":", 1)[1], 16)
                if cols[3] == "01" and local_port == port and cols[9] in inodes:
                    count += 1
    return count


def connections_per_worker(target: str, port: int, pids: list[int], n: int = 16) -> list[int]:
    """Open ``n`` separate connections, predict once on each, count each worker's share."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per client
    clients = [PredictionClient(target, timeout_s=20.0, options=options) for _ in range(n)]
    try:
        request = example(clients[0], k=4)
        for client in clients:
            assert client.predict_request(request).version == 1
        return [established(pid, port) for pid in pids]
    finally:
        for client in clients:
            client.close()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_two_workers_share_a_port_and_a_killed_one_is_restarted(
    model_dir: Path, servers: list[ServerProcess], tmp_path: Path
) -> None:
    metrics_port, metrics_dir = free_port(), tmp_path / "worker-metrics"
    server = ServerProcess(model_dir, "--workers", "2", "--metrics-port", str(metrics_port),
                           "--metrics-dir", str(metrics_dir), port=free_port())  # fmt: skip
    servers.append(server)
    server.wait_ready()
    assert "(2 workers;" in server.output()
    # (stderr and stdout are read by separate threads: wait for each line, do not assume order)
    pids = {i: int(server.wait_for_line(rf"worker {i} ready \(pid (\d+)\)")[1]) for i in (0, 1)}
    shares = connections_per_worker(server.target, server.port, [pids[0], pids[1]])
    assert all(share > 0 for share in shares), shares  # the kernel spreads connections
    # One scrape of the supervisor shows both workers' requests together.
    predicts = 16  # connections_per_worker sent one Predict on each of its 16 connections
    before = scrape(metrics_port)
    assert before[OK_PREDICTS] == predicts
    assert before["adpredict_workers"] == 2 and before["adpredict_worker_restarts_total"] == 0
    assert before["adpredict_models_loaded"] == 1

    mark = len(server.lines)
    os.kill(pids[0], signal.SIGKILL)
    server.wait_for_line(rf"worker 0 \(pid {pids[0]}\) died \(killed by SIGKILL\)", start=mark)
    # While worker 0 is down, worker 1 alone answers every new connection.
    for _ in range(10):
        with PredictionClient(server.target, timeout_s=20.0) as client:
            assert client.predict_request(example(client, k=4)).version == 1
    restarted = server.wait_for_line(r"worker 0 ready \(pid (\d+)\)", start=mark)
    new_pid = int(restarted[1])
    assert new_pid != pids[0]
    shares = connections_per_worker(server.target, server.port, [new_pid, pids[1]])
    assert all(share > 0 for share in shares), shares  # the new worker answers too

    # The killed worker's requests still count; the restart is counted; gauges are the live
    # workers' only (the dead one's in-flight/memory files were dropped).
    after = scrape(metrics_port)
    assert after[OK_PREDICTS] == predicts + 10 + 16
    assert after["adpredict_workers"] == 2 and after["adpredict_worker_restarts_total"] == 1
    assert after['adpredict_in_flight_requests{method="Predict"}'] == 0
    assert not any(str(pids[0]) in p.name for p in metrics_dir.glob("gauge_live*.db"))

    assert server.stop() == 0
    assert not Path(f"/proc/{new_pid}").exists() and not Path(f"/proc/{pids[1]}").exists()
    assert "all workers stopped" in server.output()
    assert not list(metrics_dir.glob("*.db"))  # the supervisor cleans up after itself


def test_options_validation_messages(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="needs an explicit --port"):
        ServerOptions(model_dir=tmp_path, workers=2, port=0)
    with pytest.raises(StartupError, match=r"queue_limit \(100\) must be >= max_candidates"):
        ServerOptions(model_dir=tmp_path, queue_limit=100)
    with pytest.raises(StartupError, match=r"port must be in \[0, 65535\], got 70000"):
        ServerOptions(model_dir=tmp_path, port=70000)
    with pytest.raises(StartupError, match="sla_ms must be a finite number > 0, got 0"):
        ServerOptions(model_dir=tmp_path, sla_ms=0)
    assert not ServerOptions(model_dir=tmp_path, max_batch_size=1).batcher_options().batching
    assert not ServerOptions(model_dir=tmp_path, no_batching=True).batcher_options().batching
    assert ServerOptions(model_dir=tmp_path).batcher_options().batching
    opts = ServerOptions(model_dir=tmp_path, workers=3, port=5000, max_wait_ms=1.5)
    assert ServerOptions.from_json(opts.to_json()) == opts
    assert ServerOptions(model_dir=tmp_path, host="::").client_target() == "[::1]:50051"
    assert opts.tf_threads() == (max(1, default_workers() // 3),) * 2
    assert ServerOptions(model_dir=tmp_path, intra_op_threads=2).tf_threads() == (2, None)


@pytest.mark.asyncio
async def test_health_states_around_start_and_drain(model_dir: Path) -> None:
    options = ServerOptions(model_dir=model_dir, port=0, metrics_port=0, grace_s=2.0)
    server = PredictionServer(options)
    request = health_pb2.HealthCheckRequest(service="")
    starting = asyncio.create_task(server.start())
    await asyncio.sleep(0.05)
    assert not starting.done()  # still loading the model
    assert (await server.health.Check(request, None)).status == NOT_SERVING
    info = await starting
    target = f"127.0.0.1:{info.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == SERVING
        watch = stub.Watch(request)
        assert (await watch.read()).status == SERVING
        draining = asyncio.create_task(server.drain())
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        await asyncio.wait_for(draining, 10)
    assert (await server.health.Check(request, None)).status == NOT_SERVING
    assert server.runtime is not None and not server.runtime.ready
