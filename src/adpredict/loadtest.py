"""Load generator for a running adpredict server: exchange-like Predict traffic, measured honestly.

    adpredict loadtest --rate 800 --duration 30 --candidates 32 --out r.json --plot r.png
    adpredict loadtest --concurrency 8 --requests 20000 --candidates 1-300 --procs 2 --cpus 1
    adpredict loadtest --schedule 10:500,60:2000,10:500 --out r.json   # rate phases, open loop

Traffic
    The model's schema comes from the server (``GetModelMetadata``). A pool of ``--pool``
    requests is built and serialized before the run, so sending costs one gRPC call and nothing
    else. Field values of the built-in ``rtb`` fields are rows of ``adpredict.data.synth.World``
    (the synthetic bid logs' Zipf popularity and hierarchies, so a model trained on ``synth``
    data sees known ids); any other field gets a Zipf(1.2) draw over its own vocabulary
    (numeric fields: a log-normal bid for ``bid_cpm``, else uniform around the boundaries).
    Candidates per request (``--candidates``): ``32`` (fixed), ``1-300`` (uniform integers) or
    ``lognormal:MEAN[:SIGMA]`` (log-normal with that mean, sigma 1 by default), drawn once per
    pooled request and clipped to the server's ``max_candidates``. Each request carries a gRPC
    deadline of ``--deadline-ms``.

Modes
    Open loop (``--rate R``): Poisson arrivals at R requests/s in all; each request's latency
    is measured from its *scheduled* arrival, not from when it was sent, so a generator (or
    server) that falls behind shows up as latency instead of silently lowering the load (no
    coordinated omission). The deadline also runs from the scheduled arrival, as an exchange's
    would; a request already past it when the generator gets to it is not sent and counts as
    ``EXPIRED_BEFORE_SEND`` (a timeout, and a sign the generator is overloaded).
    Phases (``--schedule S1:R1,S2:R2,...``): open loop whose Poisson rate is R1 req/s for the
    first S1 recorded seconds, then R2 for S2 seconds, and so on, with no pause in between (a
    load step, e.g. an overload and the drop after it); the warm-up runs at R1 and the recorded
    window is the sum of the phases. The report summarises each phase on its own as well.
    Closed loop (``--concurrency C``): C requests outstanding at all times, latency from send.

Processes
    ``--procs N`` client processes (spawned, each with its own event loop and grpc.aio channel)
    share the rate (R/N each: the merge of Poisson streams is Poisson at R) or the concurrency,
    and the request quota. ``--cpus`` pins them (and this process) to those cores with
    ``sched_setaffinity``. Every request's outcome (scheduled time, latency, status, K, send lag)
    is sent back raw and merged exactly: percentiles are computed over all samples of all
    processes, never averaged. The report gives each process's CPU use and send lag, and warns
    when the generator itself was the bottleneck.

Bounds and measurement window
    ``--warmup`` seconds of traffic are sent but not recorded; then ``--duration`` seconds
    (default 10 if no ``--requests``) and/or ``--requests`` recorded requests, whichever ends
    first. Without ``--duration``, ``--requests`` runs stop after one hour at the latest.
    After the last send the run waits for answers (bounded by the deadline). Ctrl-C stops
    sending, waits for the answers in flight and reports what was measured (``interrupted``).

Report
    Achieved rate (answers/s), OK predictions/s, latency percentiles of OK answers (p50, p90,
    p99, p99.9, max; nearest rank) and ``p99 with failures as misses`` (failures counted as
    infinitely slow: at most 1% of requests may fail or be slower), errors by status code, and
    the timeout rate; latency percentiles of every status code (``latency_by_code_ms``: how fast
    refusals come back), and a per-second timeline (``timeline(samples, warmup_s, bin_s)`` gives
    any window, with a per-window p99 counting failures as misses). Server figures come from the
    server's Prometheus page (``--metrics-url``, names from docs/METRICS.md) scraped when
    recording starts and after the last answer:
    compute calls (by close reason) per request, mean batch size, CPU-seconds per million
    predictions; if the page is unreachable or lacks the metrics the report says
    ``server metrics: unavailable (reason)``. ``--server-pid`` adds the CPU of that process
    tree from /proc and its CPU affinity. ``start_monotonic_s`` is the ``time.monotonic()``
    instant of offset 0 (Linux's monotonic clock is system-wide), so a caller sampling the
    server meanwhile can line its samples up with the requests. The responses'
    ``batch_requests`` give a client-side lower bound of compute calls per request as well
    (exact unless requests were split).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import multiprocessing as mp
import os
import platform
import queue as queue_module
import shlex
import signal
import sys
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np

from adpredict.errors import AdpredictError
from adpredict.schema import Field, Schema
from adpredict.v1 import prediction_service_pb2 as pb

__all__ = [
    "CandidateSpec",
    "LoadTestError",
    "LoadTestOptions",
    "Pool",
    "Recorder",
    "Samples",
    "add_arguments",
    "build_pool",
    "closed_loop",
    "main",
    "open_loop",
    "options_from_args",
    "parse_schedule",
    "phase_summaries",
    "piecewise_poisson_arrivals",
    "run",
    "scrape_metrics",
    "server_figures",
    "summarize",
    "write_plot",
]

PREDICT_METHOD = "/adpredict.v1.PredictionService/Predict"
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
#: Status codes as small integers: gRPC's codes, then the generator's own outcomes.
CODE_NAMES: tuple[str, ...] = (
    *(c.name for c in grpc.StatusCode),
    "EXPIRED_BEFORE_SEND",  # open loop: the deadline had passed before the generator sent it
    "BAD_RESPONSE",  # OK status but not one probability per candidate
)
CODES = {name: i for i, name in enumerate(CODE_NAMES)}
OK = CODES["OK"]
TIMEOUT_CODES = (CODES["DEADLINE_EXCEEDED"], CODES["EXPIRED_BEFORE_SEND"])
_GRPC_CODE = {c: CODES[c.name] for c in grpc.StatusCode}
MAX_DURATION_S = 3600.0  # the bound of a --requests run without --duration
START_DELAY_S = 0.3  # between "all processes ready" and the first scheduled request
SPIN_S = 0.0012  # open loop: yield-spin this long before each arrival instead of sleeping
GENERATOR_BUSY_PCT = 85.0  # a process busier than this (% of a core) may have been the bottleneck


class LoadTestError(AdpredictError):
    """Bad load-test options (the message names the flag), or the target cannot be used."""


# ---------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class CandidateSpec:
    """How many candidates each request has: ``fixed`` n, ``uniform`` lo-hi, ``lognormal``."""

    kind: str
    a: float
    b: float = 0.0
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> CandidateSpec:
        """``32``, ``1-300`` or ``lognormal:MEAN[:SIGMA]``; ``ValueError`` says what is wrong."""
        spec = text.strip()
        try:
            if spec.startswith("lognormal:"):
                parts = spec.split(":")[1:]
                if len(parts) not in (1, 2):
                    raise ValueError
                mean, sigma = float(parts[0]), float(parts[1]) if len(parts) == 2 else 1.0
                if not (mean >= 1 and 0 < sigma <= 3 and math.isfinite(mean)):
                    raise ValueError
                return cls("lognormal", mean, sigma, spec)
            if "-" in spec:
                lo, hi = (int(v) for v in spec.split("-", 1))
                if not 1 <= lo <= hi:
                    raise ValueError
                return cls("uniform", lo, hi, spec)
            n = int(spec)
            if n < 1:
                raise ValueError
            return cls("fixed", n, n, spec)
        except ValueError:
            raise ValueError(
                f"expected K >= 1 (e.g. 32), a range LO-HI (e.g. 1-300) or lognormal:MEAN[:SIGMA] "
                f"(MEAN >= 1, 0 < SIGMA <= 3), got {text!r}"
            ) from None

    def sample(self, rng: np.random.Generator, n: int, max_k: int) -> np.ndarray:
        """``n`` draws, clipped to ``[1, max_k]``."""
        if self.kind == "fixed":
            ks = np.full(n, self.a)
        elif self.kind == "uniform":
            ks = rng.integers(int(self.a), int(self.b) + 1, n)
        else:  # a log-normal whose mean is self.a: mu = ln(mean) - sigma^2 / 2
            ks = np.rint(rng.lognormal(math.log(self.a) - self.b**2 / 2, self.b, n))
        return np.clip(ks, 1, max_k).astype(np.int64)


@dataclass(frozen=True)
class LoadTestOptions:
    """One load test. Exactly one of ``rate`` (open loop) and ``concurrency`` (closed loop)."""

    target: str = "127.0.0.1:50051"
    model: str = ""  # "" = the server's default model
    rate: float | None = None  # open loop: requests/s over all processes
    # open loop in phases: (recorded seconds, requests/s) each, back to back; see parse_schedule
    schedule: tuple[tuple[float, float], ...] = ()
    concurrency: int | None = None  # closed loop: requests outstanding over all processes
    duration_s: float | None = None  # recorded seconds; None = 10, or MAX_DURATION_S with requests
    requests: int | None = None  # recorded requests over all processes
    warmup_s: float = 0.0  # sent, not recorded
    candidates: str = "32"  # see CandidateSpec
    deadline_ms: float = 100.0  # gRPC deadline per request
    procs: int = 1
    cpus: tuple[int, ...] = ()  # pin the generator processes (and the parent); () = no pinning
    pool: int = 256  # distinct pre-built requests
    seed: int = 0
    metrics_url: str = "http://127.0.0.1:9090/metrics"  # "" = do not scrape
    server_pid: int | None = None  # read that process tree's CPU from /proc
    progress_interval_s: float = 1.0

    def problems(self) -> list[str]:
        """Every invalid setting, each naming its flag; empty if the options are usable."""
        out = []
        if (self.rate is not None) + (self.concurrency is not None) + bool(self.schedule) != 1:
            out.append(
                "give exactly one of --rate (open loop), --schedule (open loop in phases) and "
                "--concurrency (closed loop)"
            )
        for seconds, rate in self.schedule:
            if not (0 < seconds <= 24 * 3600 and 0 < rate < math.inf):
                out.append(
                    f"--schedule phases need 0 < seconds <= 86400 and a finite rate > 0 req/s, "
                    f"got {seconds:g}:{rate:g}"
                )
        if self.schedule and self.duration_s is not None:
            out.append("--duration cannot be combined with --schedule (the phases set the length)")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            out.append(f"--rate must be a finite number > 0 requests/s, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            out.append(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.concurrency is not None and 1 <= self.concurrency < self.procs:
            out.append(
                f"--concurrency {self.concurrency} is less than --procs {self.procs}: "
                "every process needs at least one outstanding request"
            )
        if self.duration_s is not None and not (0 < self.duration_s <= 24 * 3600):
            out.append(f"--duration must be in (0, 86400] seconds, got {self.duration_s}")
        if self.requests is not None and self.requests < 1:
            out.append(f"--requests must be >= 1, got {self.requests}")
        if self.requests is not None and self.requests < self.procs:
            out.append(f"--requests {self.requests} is less than --procs {self.procs}")
        if not (0 <= self.warmup_s <= 3600):
            out.append(f"--warmup must be in [0, 3600] seconds, got {self.warmup_s}")
        try:
            CandidateSpec.parse(self.candidates)
        except ValueError as exc:
            out.append(f"--candidates: {exc}")
        if not (0 < self.deadline_ms <= 600_000):
            out.append(f"--deadline-ms must be in (0, 600000], got {self.deadline_ms}")
        if not 1 <= self.procs <= 64:
            out.append(f"--procs must be in [1, 64], got {self.procs}")
        usable = os.sched_getaffinity(0)
        bad = sorted(set(self.cpus) - usable)
        if bad:
            out.append(f"--cpus {bad} not usable here (this process may run on {sorted(usable)})")
        if not 1 <= self.pool <= 100_000:
            out.append(f"--pool must be in [1, 100000], got {self.pool}")
        if self.metrics_url and not self.metrics_url.startswith(("http://", "https://")):
            out.append(f"--metrics-url must be an http(s) URL or '', got {self.metrics_url!r}")
        if self.server_pid is not None and not Path(f"/proc/{self.server_pid}").exists():
            out.append(f"--server-pid {self.server_pid}: no such process")
        return out

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise LoadTestError("; ".join(problems))

    @property
    def recorded_s(self) -> float:
        """The recording window's length bound (the hard cap)."""
        if self.duration_s is not None:
            return self.duration_s
        if self.schedule:
            return sum(seconds for seconds, _ in self.schedule)
        return MAX_DURATION_S if self.requests is not None else 10.0

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None or self.schedule else "closed"

    @property
    def offered_rps(self) -> float | None:
        """The open-loop rate, averaged over the phases for a schedule; None in closed loop."""
        if self.schedule:
            return sum(s * r for s, r in self.schedule) / self.recorded_s
        return self.rate

    def segments(self) -> tuple[tuple[float, float], ...]:
        """Open loop: (seconds, req/s) from offset 0 on, warm-up included (at the first rate)."""
        if not self.schedule:
            return ((self.warmup_s + self.recorded_s, self.rate or 0.0),)
        warmup = ((self.warmup_s, self.schedule[0][1]),) if self.warmup_s > 0 else ()
        return (*warmup, *self.schedule)


def parse_schedule(text: str) -> tuple[tuple[float, float], ...]:
    """``"10:500,60:2000"`` -> ((10.0, 500.0), (60.0, 2000.0)): SECONDS:RATE phases in order."""
    phases = []
    for part in text.replace(" ", "").split(","):
        try:
            seconds, rate = (float(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(
                f"expected SECONDS:RATE phases separated by commas (e.g. 10:500,60:2000), "
                f"got {text!r}"
            ) from None
        if not (0 < seconds <= 24 * 3600 and 0 < rate < math.inf):
            raise ValueError(
                f"each phase needs 0 < SECONDS <= 86400 and a finite RATE > 0, got {part!r}"
            )
        phases.append((seconds, rate))
    return tuple(phases)


def _shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers differing by at most one."""
    return [total // parts + (i < total % parts) for i in range(parts)]


# ---------------------------------------------------------------------------------- traffic


@dataclass(frozen=True)
class Pool:
    """Pre-serialized ``PredictRequest`` messages and the K of each."""

    payloads: tuple[bytes, ...]
    ks: tuple[int, ...]
    model: str
    schema_name: str
    sources: dict[str, str]  # field -> "synth.World" or "zipf"

    def describe(self) -> dict[str, Any]:
        ks = np.array(self.ks)
        sizes = np.array([len(p) for p in self.payloads])
        return {
            "requests": len(ks),
            "k_mean": float(ks.mean()),
            "k_min": int(ks.min()),
            "k_max": int(ks.max()),
            "mean_bytes": float(sizes.mean()),
            "field_sources": self.sources,
        }


@functools.lru_cache(maxsize=2)
def _world(seed: int) -> Any:
    from adpredict.data import synth

    return synth.World(seed)


def _world_fields(schema: Schema) -> set[str]:
    """Fields whose values can come from ``synth.World`` rows (same name, same multiplicity)."""
    from adpredict.data import synth

    names = {f.name for f in schema.fields}
    known = {n for n in names if synth.cardinality(n) is not None or n == "bid_cpm"}
    return {n for n in known if schema.field(n).is_multi == (n == "user_segments")}


def _zipf_column(f: Field, rng: np.random.Generator, n: int) -> list[Any]:
    """``n`` values of a field synth does not know: Zipf(1.2) ids, or numbers near boundaries."""
    from adpredict.data import synth

    if f.is_numeric:
        if f.name == "bid_cpm":
            return [b"%.2f" % x for x in rng.lognormal(0.7, 0.8, n)]
        low, high = f.boundaries[0], f.boundaries[-1]
        span = high - low or 1.0
        return [b"%.3f" % x for x in rng.uniform(low - 0.1 * span, high + 0.1 * span, n)]
    size = synth.cardinality(f.name) or max(10, min(100_000, 4 * f.buckets))

    def tokens(m: int) -> list[bytes]:
        ids = np.minimum(rng.zipf(1.2, m), size) - 1
        return [(synth.value_string(f.name, int(i)) or f"{f.name}-{i}").encode() for i in ids]

    if not f.is_multi:
        return tokens(n)
    counts = rng.integers(1, min(5, f.max_values) + 1, n)
    flat = tokens(int(counts.sum()))
    out, at = [], 0
    for c in counts:
        out.append(flat[at : at + c])
        at += c
    return out


def build_pool(
    schema: Schema,
    candidates: CandidateSpec,
    size: int,
    *,
    model: str = "",
    max_candidates: int = 1024,
    seed: int = 0,
) -> Pool:
    """``size`` serialized requests for ``schema`` (see the module docstring for the values)."""
    rng = np.random.default_rng([seed, 17])
    ks = candidates.sample(rng, size, max(1, max_candidates))
    rows = size + int(ks.sum())  # rows [0, size) give contexts, the rest candidates
    from_world = _world_fields(schema)
    columns: dict[str, Any] = {}
    if from_world:
        block = _world(seed).block(rng, rows)
        columns = {n: block.columns[n] for n in from_world}
    for f in schema.fields:
        if f.name not in columns:
            columns[f.name] = _zipf_column(f, rng, rows)
    bounds = np.concatenate([[size], size + np.cumsum(ks)])
    payloads = []
    for i, k in enumerate(ks):
        request = pb.PredictRequest(model=model, num_candidates=int(k))
        for f in schema.context_fields:
            value = columns[f.name][i]
            values = list(value[: f.max_values]) if f.is_multi else [value]
            request.context[f.name].values.extend(values)
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        for f in schema.candidate_fields:
            column = request.candidates[f.name]
            cells = columns[f.name][lo:hi]
            if f.is_multi:
                cells = [list(c[: f.max_values]) for c in cells]
                column.counts.extend(len(c) for c in cells)
                column.values.extend(v for c in cells for v in c)
            else:
                column.values.extend(cells)
        payloads.append(request.SerializeToString())
    sources = {f.name: "synth.World" if f.name in from_world else "zipf" for f in schema.fields}
    return Pool(tuple(payloads), tuple(int(k) for k in ks), model, schema.name, sources)


# ---------------------------------------------------------------------------------- samples


@dataclass
class Samples:
    """Raw outcomes of recorded requests, one entry per request (columns as numpy arrays).

    ``offset_s`` is the scheduled (open loop) or actual (closed loop) send time in seconds since
    the run's start; ``latency_s`` runs from that same instant to the answer; ``lag_s`` is how
    late the generator sent it (open loop); ``code`` indexes ``CODE_NAMES``.
    """

    offset_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    latency_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    code: np.ndarray = field(default_factory=lambda: np.empty(0, np.int16))
    k: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    lag_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    batch_requests: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    proc: np.ndarray = field(default_factory=lambda: np.empty(0, np.int16))

    def __len__(self) -> int:
        return len(self.offset_s)

    @classmethod
    def concat(cls, parts: Sequence[Samples]) -> Samples:
        """All samples of ``parts`` (exact: nothing is summarised before merging)."""
        if not parts:
            return cls()
        return cls(
            **{
                name: np.concatenate([getattr(p, name) for p in parts])
                for name in cls.__dataclass_fields__
            }
        )


class Recorder:
    """Collects outcomes of requests sent at ``offset >= warmup_s``; ``take()`` hands them over."""

    def __init__(self, warmup_s: float = 0.0, proc: int = 0) -> None:
        self.warmup_s = warmup_s
        self.proc = proc
        self._rows: list[tuple[float, float, int, int, float, int]] = []

    def add(
        self,
        offset_s: float,
        latency_s: float,
        code: int,
        k: int,
        lag_s: float = 0.0,
        batch_requests: int = 0,
    ) -> None:
        if offset_s >= self.warmup_s:
            self._rows.append((offset_s, latency_s, code, k, lag_s, batch_requests))

    def take(self) -> Samples:
        rows, self._rows = self._rows, []
        if not rows:
            return Samples()
        cols = list(zip(*rows, strict=True))
        return Samples(
            offset_s=np.array(cols[0], np.float64),
            latency_s=np.array(cols[1], np.float64),
            code=np.array(cols[2], np.int16),
            k=np.array(cols[3], np.int32),
            lag_s=np.array(cols[4], np.float64),
            batch_requests=np.array(cols[5], np.int32),
            proc=np.full(len(rows), self.proc, np.int16),
        )


# ----------------------------------------------------------------------------- the two loops

#: ``send(payload, k, timeout_s) -> (code, batch_requests)``; never raises for an RPC failure.
Send = Callable[[bytes, int, float], Awaitable[tuple[int, int]]]


@dataclass
class LoopBounds:
    """Where one process's loop stops: recorded requests, a time, or an external stop."""

    warmup_s: float
    end_s: float  # offset after which nothing more is sent (warm-up + recorded seconds)
    quota: int | None  # recorded requests this process may send
    stopping: Callable[[], bool] = lambda: False
    stopped_by: str = "duration"
    # CPU the loop's thread spent yielding in a loop just before arrivals (open loop). Thread
    # CPU time, not wall time: on a busy machine the spin is descheduled, and subtracting its
    # wall time from the process's CPU would report a busy generator as idle.
    spin_s: float = 0.0

    def stop_before(self, offset: float, recorded: int) -> bool:
        """Whether to send nothing at ``offset``; if so, ``stopped_by`` says why."""
        if offset >= self.end_s:
            self.stopped_by = "duration"
        elif self.quota is not None and recorded >= self.quota:
            self.stopped_by = "requests"
        elif self.stopping():
            self.stopped_by = "interrupt"
        else:
            return False
        return True


async def open_loop(
    send: Send,
    requests: Iterator[tuple[bytes, int]],
    arrivals: Iterator[float],
    recorder: Recorder,
    bounds: LoopBounds,
    *,
    start: float,
    deadline_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Send one request at each arrival offset (seconds after ``start`` on ``clock``).

    Latency and deadline run from the *scheduled* arrival: if the generator is late (a stalled
    loop, a slow send), the lag is part of the latency; a request whose deadline passed before
    it could be sent is recorded as ``EXPIRED_BEFORE_SEND`` without sending it.
    """
    tasks: set[asyncio.Task[None]] = set()
    recorded = 0

    async def one(offset: float, payload: bytes, k: int) -> None:
        scheduled = start + offset
        lag = clock() - scheduled
        remaining = deadline_s - lag
        if remaining <= 0:
            recorder.add(offset, lag, CODES["EXPIRED_BEFORE_SEND"], k, lag)
            return
        code, batch_requests = await send(payload, k, remaining)
        recorder.add(offset, clock() - scheduled, code, k, lag, batch_requests)

    for offset in arrivals:
        if bounds.stop_before(offset, recorded):
            break
        due = start + offset
        # The event loop's timers wake up to 1 ms late (epoll rounds its timeout up to whole
        # ms): sleep until SPIN_S before the arrival, then yield in a loop until it is due.
        if due - clock() > SPIN_S:
            await asyncio.sleep(due - clock() - SPIN_S)
        spin_from = time.thread_time()
        await asyncio.sleep(0)  # always yield once, even when late
        while clock() < due:
            await asyncio.sleep(0)
        bounds.spin_s += time.thread_time() - spin_from
        payload, k = next(requests)
        task = asyncio.create_task(one(offset, payload, k))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        recorded += offset >= bounds.warmup_s
    if tasks:
        await asyncio.gather(*tasks)


async def closed_loop(
    send: Send,
    requests: Iterator[tuple[bytes, int]],
    recorder: Recorder,
    bounds: LoopBounds,
    *,
    start: float,
    concurrency: int,
    deadline_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """``concurrency`` callers, each sending its next request as soon as the last is answered."""
    recorded = 0

    async def caller() -> None:
        nonlocal recorded
        while True:
            sent = clock()
            offset = sent - start
            if bounds.stop_before(offset, recorded):
                return
            recorded += offset >= bounds.warmup_s
            payload, k = next(requests)
            code, batch_requests = await send(payload, k, deadline_s)
            recorder.add(offset, clock() - sent, code, k, 0.0, batch_requests)

    await asyncio.gather(*(caller() for _ in range(concurrency)))


def poisson_arrivals(rate: float, rng: np.random.Generator) -> Iterator[float]:
    """Offsets (s) of a Poisson process of ``rate`` events/s, generated in blocks."""
    at = 0.0
    while True:
        gaps = rng.exponential(1.0 / rate, 4096)
        for t in np.cumsum(gaps) + at:
            yield float(t)
        at += float(gaps.sum())


def piecewise_poisson_arrivals(
    segments: Sequence[tuple[float, float]], rng: np.random.Generator
) -> Iterator[float]:
    """Offsets (s) of a Poisson process whose rate is piecewise constant: ``segments`` are
    (seconds, events/s) back to back from offset 0; the stream ends with the last segment.

    Each segment restarts the exponential gaps at its start, which is exact for a Poisson process
    (memoryless), so the number of events in a segment is Poisson(seconds * rate).
    """
    begin = 0.0
    for seconds, rate in segments:
        end = begin + seconds
        at = begin
        while at < end:
            times = at + np.cumsum(rng.exponential(1.0 / rate, 4096))
            for t in times[times < end]:
                yield float(t)
            at = float(times[-1])
        begin = end


def cycle_pool(pool_payloads: Sequence[bytes], ks: Sequence[int], seed: int) -> Iterator[Any]:
    """The pool forever, each pass in a new random order."""
    rng = np.random.default_rng(seed)
    while True:
        for i in rng.permutation(len(pool_payloads)):
            yield pool_payloads[i], ks[i]


# ---------------------------------------------------------------------------- worker process


@dataclass(frozen=True)
class _WorkerPlan:
    index: int
    target: str
    mode: str
    rate: float  # this process's share
    segments: tuple[tuple[float, float], ...]  # schedule: (seconds, this process's rate share)
    concurrency: int  # this process's share
    quota: int | None
    warmup_s: float
    end_s: float
    deadline_s: float
    cpus: tuple[int, ...]
    seed: int
    flush_s: float


def _pin(cpus: Sequence[int]) -> None:
    """Pin every thread of this process to ``cpus`` (threads created later inherit it)."""
    if not cpus:
        return
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), set(cpus))


def _worker_entry(
    plan: _WorkerPlan,
    payloads: Sequence[bytes],
    ks: Sequence[int],
    out: Any,
    go: Any,
    start_at: Any,
    stop: Any,
) -> None:
    """A client process: connect, say ready, wait for the start, run, report samples."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into ``stop``
    _pin(plan.cpus)
    try:
        asyncio.run(_worker(plan, payloads, ks, out, go, start_at, stop))
    except BaseException:
        out.put(("error", plan.index, traceback.format_exc(limit=8)))


async def _worker(
    plan: _WorkerPlan,
    payloads: Sequence[bytes],
    ks: Sequence[int],
    out: Any,
    go: Any,
    start_at: Any,
    stop: Any,
) -> None:
    limit = 64 * 1024 * 1024
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    async with grpc.aio.insecure_channel(plan.target, options=options) as channel:
        predict = channel.unary_unary(
            PREDICT_METHOD,
            request_serializer=None,  # payloads are serialized already
            response_deserializer=pb.PredictResponse.FromString,
        )

        async def send(payload: bytes, k: int, timeout_s: float) -> tuple[int, int]:
            try:
                reply = await predict(payload, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                return _GRPC_CODE.get(exc.code(), CODES["UNKNOWN"]), 0
            if len(reply.probabilities) != k:
                return CODES["BAD_RESPONSE"], 0
            return OK, reply.batch_requests

        try:
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
        except TimeoutError:
            raise LoadTestError(f"cannot connect to --target {plan.target}") from None
        out.put(("ready", plan.index, None))
        while not go.wait(0.05):
            if stop.is_set():
                out.put(("done", plan.index, {"stopped_by": "interrupt", "cpu_s": 0.0}))
                return
        start = start_at.value
        recorder = Recorder(plan.warmup_s, plan.index)
        stopped = False

        def stopping() -> bool:
            return stopped

        bounds = LoopBounds(plan.warmup_s, plan.end_s, plan.quota, stopping)
        requests = cycle_pool(payloads, ks, seed=plan.seed * 1000 + plan.index)

        async def flusher() -> None:
            nonlocal stopped
            while True:
                await asyncio.sleep(plan.flush_s)
                stopped = stopped or stop.is_set()
                chunk = recorder.take()
                if len(chunk):
                    out.put(("chunk", plan.index, chunk))

        cpu0, wall0 = time.process_time(), time.monotonic()
        flush_task = asyncio.create_task(flusher())
        try:
            if plan.mode == "open":
                rng = np.random.default_rng([plan.seed, 99, plan.index])
                arrivals = (
                    piecewise_poisson_arrivals(plan.segments, rng)
                    if plan.segments
                    else poisson_arrivals(plan.rate, rng)
                )
                await open_loop(
                    send,
                    requests,
                    arrivals,
                    recorder,
                    bounds,
                    start=start,
                    deadline_s=plan.deadline_s,
                )
            else:
                await closed_loop(
                    send,
                    requests,
                    recorder,
                    bounds,
                    start=start,
                    concurrency=plan.concurrency,
                    deadline_s=plan.deadline_s,
                )
        finally:
            flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flush_task
        chunk = recorder.take()
        if len(chunk):
            out.put(("chunk", plan.index, chunk))
        out.put(
            (
                "done",
                plan.index,
                {
                    "stopped_by": bounds.stopped_by,
                    # Spinning before arrivals is not work: it is left out of the CPU use
                    # (and reported apart: whatever ran during its yields is counted in it).
                    "cpu_s": max(0.0, time.process_time() - cpu0 - bounds.spin_s),
                    "spin_s": bounds.spin_s,
                    "wall_s": time.monotonic() - wall0,
                },
            )
        )


# --------------------------------------------------------------------------- server figures

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_metrics(url: str, timeout_s: float = 3.0) -> tuple[Scrape | None, str]:
    """Every sample on a Prometheus text page, keyed by (sample name, sorted labels).

    Returns ``(None, reason)`` if the page cannot be fetched or parsed.
    """
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            text = reply.read().decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return None, f"cannot fetch {url}: {getattr(exc, 'reason', exc)}"
    values: Scrape = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    except ValueError as exc:
        return None, f"cannot parse {url}: {exc}"
    return values, ""


def _total(scrape: Scrape, name: str, **labels: str) -> float | None:
    """Sum of the samples named ``name`` whose labels include ``labels``; None if there are none."""
    found = [
        v
        for (n, ls), v in scrape.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    ]
    return sum(found) if found else None


def _by_label(scrape: Scrape, name: str, label: str, **labels: str) -> dict[str, float]:
    out: Counter[str] = Counter()
    for (n, ls), v in scrape.items():
        d = dict(ls)
        if n == name and label in d and all(d.get(k) == w for k, w in labels.items()):
            out[d[label]] += v
    return dict(out)


def server_figures(
    before: Scrape | None, after: Scrape | None, model: str, reason: str = ""
) -> dict[str, Any]:
    """Server-side deltas between two scrapes, with names from docs/METRICS.md.

    ``available`` is False (with ``reason``) when a scrape failed or the page lacks
    ``adpredict_compute_calls_total``; process CPU is still given if the page has it.
    """
    out: dict[str, Any] = {"available": False, "reason": reason}
    if before is None or after is None:
        out["reason"] = reason or "no scrape"
        return out

    def delta(name: str, **labels: str) -> float | None:
        a, b = _total(after, name, **labels), _total(before, name, **labels)
        return None if a is None else a - (b or 0.0)

    for cpu_name in ("adpredict_process_cpu_seconds_total", "process_cpu_seconds_total"):
        cpu = delta(cpu_name)
        if cpu is not None:
            out["cpu_seconds"], out["cpu_source"] = cpu, cpu_name
            break
    calls = delta("adpredict_compute_calls_total", model=model)
    if calls is None:
        families = sorted({n for n, _ in after if n.startswith("adpredict_")})
        out["reason"] = (
            "the page has no adpredict_compute_calls_total for model "
            f"{model!r} (adpredict series present: {families or 'none'})"
        )
        return out
    requests = delta("adpredict_requests_total", method="Predict", model=model)
    predictions = delta("adpredict_predictions_total", model=model)
    batch_sum = delta("adpredict_batch_predictions_sum", model=model)
    batch_count = delta("adpredict_batch_predictions_count", model=model)
    reqs_sum = delta("adpredict_batch_requests_sum", model=model)

    def ratio(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
        return a * scale / b if a is not None and b else None

    reasons_after = _by_label(after, "adpredict_compute_calls_total", "reason", model=model)
    reasons_before = _by_label(before, "adpredict_compute_calls_total", "reason", model=model)
    out.update(
        available=True,
        reason="",
        compute_calls=calls,
        compute_calls_by_reason={
            r: v - reasons_before.get(r, 0.0) for r, v in sorted(reasons_after.items())
        },
        predict_requests=requests,
        requests_by_code=_delta_by_label(
            before, after, "adpredict_requests_total", "code", method="Predict", model=model
        ),
        timeouts_by_stage=_delta_by_label(
            before, after, "adpredict_timeouts_total", "stage", model=model
        ),
        predictions=predictions,
        compute_calls_per_request=ratio(calls, requests),
        # Requests refused at admission are never computed; per OK answer is the fair ratio.
        compute_calls_per_ok_request=ratio(
            calls,
            _delta_by_label(
                before, after, "adpredict_requests_total", "code", method="Predict", model=model
            ).get("OK"),
        ),
        mean_batch_predictions=ratio(batch_sum, batch_count),
        mean_batch_requests=ratio(reqs_sum, batch_count),
        cpu_seconds_per_million_predictions=ratio(out.get("cpu_seconds"), predictions, 1e6),
    )
    return out


def _delta_by_label(
    before: Scrape, after: Scrape, name: str, label: str, **labels: str
) -> dict[str, float]:
    a, b = _by_label(after, name, label, **labels), _by_label(before, name, label, **labels)
    return {k: v - b.get(k, 0.0) for k, v in sorted(a.items()) if v - b.get(k, 0.0)}


def process_tree_cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` and all its live descendants (/proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(entry)] = int(stat[1])
        times[int(entry)] = (int(stat[11]) + int(stat[12])) * TICK_S
    tree, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier += kids
    return sum(times.get(p, 0.0) for p in tree)


def cpus_allowed(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return "?"


def machine_info() -> dict[str, Any]:
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
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


# ---------------------------------------------------------------------------------- summary


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    """Nearest-rank percentiles (and max) in ms; None when there are no values."""
    out: dict[str, float | None] = {}
    for q in PERCENTILES:
        key = f"p{q:g}".replace(".", "_")
        out[key] = (
            float(np.percentile(values, q, method="inverted_cdf")) * 1e3 if len(values) else None
        )
    out["max"] = float(values.max()) * 1e3 if len(values) else None
    return out


def summarize(samples: Samples, window_s: float) -> dict[str, Any]:
    """Counts, rates and latency percentiles of ``samples`` over a ``window_s``-second window."""
    n = len(samples)
    ok = samples.code == OK
    n_ok = int(ok.sum())
    codes = Counter(CODE_NAMES[c] for c in samples.code[~ok].tolist())
    timeouts = int(np.isin(samples.code, TIMEOUT_CODES).sum())
    # Failures as infinitely slow: p99 here is <= X only if >= 99% of requests were OK within X.
    as_misses = np.where(ok, samples.latency_s, np.inf)
    window = max(window_s, 1e-9)
    okr = samples.batch_requests[ok]
    return {
        "requests": n,
        "ok": n_ok,
        "errors": n - n_ok,
        "errors_by_code": dict(sorted(codes.items())),
        "error_rate": (n - n_ok) / n if n else None,
        "timeouts": timeouts,
        "timeout_rate": timeouts / n if n else None,
        "window_s": window_s,
        "achieved_rps": n / window,
        "ok_rps": n_ok / window,
        "predictions_per_s": float(samples.k[ok].sum()) / window,
        "mean_k": float(samples.k.mean()) if n else None,
        "latency_ms": _percentiles(samples.latency_s[ok]),
        # Every outcome's latency, refusals included: how long a caller waited for each answer.
        "latency_by_code_ms": {
            CODE_NAMES[c]: _percentiles(samples.latency_s[samples.code == c])
            for c in sorted(set(samples.code.tolist()))
        },
        "p99_ms_failures_as_misses": (
            float(np.percentile(as_misses, 99, method="inverted_cdf")) * 1e3 if n else None
        ),
        "send_lag_ms": _percentiles(samples.lag_s),
        # Each OK response names how many requests shared its (last) batch: sum(1/that) is
        # the number of compute calls when no request was split, a lower bound otherwise.
        "client_compute_calls_per_request": (
            float((1.0 / np.maximum(okr, 1)).sum() / n_ok) if n_ok and okr.any() else None
        ),
    }


def timeline(samples: Samples, warmup_s: float, bin_s: float = 1.0) -> list[dict[str, Any]]:
    """Per ``bin_s`` of send time from ``warmup_s`` on: requests, OK, errors, OK-latency
    percentiles (ms) and ``p99_failures_as_misses`` (ms; inf if more than 1% failed, None if
    the bin is empty)."""
    if not len(samples):
        return []
    bins = np.floor((samples.offset_s - warmup_s) / bin_s).astype(np.int64)
    out = []
    for b in range(int(bins.max()) + 1):
        sel = bins == b
        ok = sel & (samples.code == OK)
        lat = samples.latency_s[ok]
        as_misses = np.where(ok[sel], samples.latency_s[sel], np.inf)
        out.append(
            {
                "t_s": b * bin_s,
                "requests": int(sel.sum()),
                "ok": int(ok.sum()),
                "errors": int(sel.sum() - ok.sum()),
                **_percentiles(lat),
                "p99_failures_as_misses": (
                    float(np.percentile(as_misses, 99, method="inverted_cdf")) * 1e3
                    if len(as_misses)
                    else None
                ),
            }
        )
    return out


def phase_summaries(
    samples: Samples, warmup_s: float, schedule: Sequence[tuple[float, float]]
) -> list[dict[str, Any]]:
    """``summarize`` of each schedule phase's requests (by send time); [] without a schedule.

    ``start_s`` is the phase's start in recorded seconds (offset minus ``warmup_s``).
    """
    out = []
    begin = 0.0
    for seconds, rate in schedule:
        sel = (samples.offset_s >= warmup_s + begin) & (
            samples.offset_s < warmup_s + begin + seconds
        )
        part = Samples(**{n: getattr(samples, n)[sel] for n in Samples.__dataclass_fields__})
        out.append(
            {
                "start_s": begin,
                "seconds": seconds,
                "rate": rate,
                "summary": summarize(part, seconds),
            }
        )
        begin += seconds
    return out


# ----------------------------------------------------------------------------------- runner


class _Progress:
    """The live line: what was answered since the last line, over all processes."""

    def __init__(self, stream: TextIO | None, start: float, warmup_s: float) -> None:
        self.stream, self.start, self.warmup_s = stream, start, warmup_s
        self.parts: list[Samples] = []
        self.last = start
        self.total, self.errors = 0, 0

    def add(self, chunk: Samples) -> None:
        self.parts.append(chunk)

    def maybe_print(self, now: float, interval_s: float, force: bool = False) -> None:
        if self.stream is None or (now - self.last < interval_s and not force):
            return
        s = Samples.concat(self.parts)
        self.parts = []
        span = max(now - self.last, 1e-9)
        self.last = now
        ok = s.code == OK
        self.total += len(s)
        self.errors += int((~ok).sum())
        p99 = (
            f"{np.percentile(s.latency_s[ok], 99, method='inverted_cdf') * 1e3:7.2f} ms"
            if ok.any()
            else "      - ms"
        )
        t = now - self.start - self.warmup_s
        phase = "warm-up" if t < 0 else f"{t:6.1f} s"
        print(
            f"[{phase}] {len(s) / span:9,.0f} req/s  p99 {p99}  errors {int((~ok).sum()):,}"
            f"  (total {self.total:,} requests, {self.errors:,} errors)",
            file=self.stream,
            flush=True,
        )


def fetch_model_info(target: str, model: str, timeout_s: float = 10.0) -> Any:
    """GetModelMetadata from ``target``; ``LoadTestError`` if it cannot be had."""
    from adpredict.client import PredictionClient

    try:
        with PredictionClient(target, timeout_s=timeout_s) as client:
            return client.metadata(model)
    except AdpredictError as exc:
        raise LoadTestError(f"--target {target}: cannot get the model's metadata: {exc}") from None


def run(
    options: LoadTestOptions,
    *,
    pool: Pool | None = None,
    progress: TextIO | None = None,
    command: str = "",
) -> tuple[dict[str, Any], Samples]:
    """Run one load test; returns the report (JSON-able) and the merged raw samples.

    ``progress`` gets the live line every second (None: silent). ``pool`` reuses pre-built
    requests (they must be for the same model). Ctrl-C in the calling process stops sending;
    the report then covers what was measured (``interrupted: true``).
    """
    options.check()
    if options.cpus:
        _pin(options.cpus)
    info = fetch_model_info(options.target, options.model)
    spec = CandidateSpec.parse(options.candidates)
    if pool is None:
        pool = build_pool(
            info.schema,
            spec,
            options.pool,
            model=info.model,
            max_candidates=info.max_candidates or 1024,
            seed=options.seed,
        )
    n = options.procs
    quotas = _shares(options.requests, n) if options.requests is not None else [None] * n
    concurrency = _shares(options.concurrency, n) if options.concurrency else [0] * n
    end_s = options.warmup_s + options.recorded_s
    plans = [
        _WorkerPlan(
            index=i,
            target=options.target,
            mode=options.mode,
            rate=(options.rate or 0.0) / n,
            segments=(tuple((s, r / n) for s, r in options.segments()) if options.schedule else ()),
            concurrency=concurrency[i],
            quota=quotas[i],
            warmup_s=options.warmup_s,
            end_s=end_s,
            deadline_s=options.deadline_ms / 1e3,
            cpus=options.cpus,
            seed=options.seed,
            flush_s=min(0.5, options.progress_interval_s),
        )
        for i in range(n)
    ]
    ctx = mp.get_context("spawn")  # never fork a process that has gRPC threads
    out = ctx.Queue()
    go, stop, start_at = ctx.Event(), ctx.Event(), ctx.Value("d", 0.0)
    workers = [
        ctx.Process(
            target=_worker_entry,
            args=(plan, pool.payloads, pool.ks, out, go, start_at, stop),
            name=f"loadtest-{plan.index}",
            daemon=True,
        )
        for plan in plans
    ]
    for w in workers:
        w.start()
    parts: list[Samples] = []
    done: dict[int, dict[str, Any]] = {}
    interrupted = False
    before: Scrape | None = None
    after: Scrape | None = None
    scrape_reason = "" if options.metrics_url else "no --metrics-url"
    pid_cpu0 = pid_cpu1 = None
    try:
        _wait_ready(out, workers)
        if options.warmup_s == 0 and not scrape_reason:  # a short run may end within 0.1 s
            before, scrape_reason = scrape_metrics(options.metrics_url)
        if options.warmup_s == 0 and options.server_pid is not None:
            pid_cpu0 = process_tree_cpu_s(options.server_pid)
        start = time.monotonic() + START_DELAY_S
        start_at.value = start
        go.set()
        live = _Progress(progress, start, options.warmup_s)
        measuring_at = start + options.warmup_s
        while len(done) < n:
            try:
                try:
                    kind, index, payload = out.get(timeout=0.1)
                except queue_module.Empty:
                    kind = ""
                if kind == "chunk":
                    parts.append(payload)
                    live.add(payload)
                elif kind == "done":
                    done[index] = payload
                elif kind == "error":
                    raise LoadTestError(f"client process {index} failed:\n{payload}")
                now = time.monotonic()
                if before is None and now >= measuring_at and not scrape_reason:
                    before, scrape_reason = scrape_metrics(options.metrics_url)
                if now >= measuring_at and pid_cpu0 is None and options.server_pid is not None:
                    pid_cpu0 = process_tree_cpu_s(options.server_pid)
                live.maybe_print(now, options.progress_interval_s)
                dead = [w.name for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise LoadTestError(f"client process(es) died: {dead}")
            except KeyboardInterrupt:
                if interrupted:
                    raise
                interrupted = True
                stop.set()
                if progress is not None:
                    print("interrupted: waiting for answers in flight...", file=progress)
        if options.server_pid is not None:
            pid_cpu1 = process_tree_cpu_s(options.server_pid)
        if options.metrics_url and before is not None:
            after, scrape_reason = scrape_metrics(options.metrics_url)
        live.maybe_print(time.monotonic(), 0.0, force=True)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.terminate()
                w.join()
    samples = Samples.concat(parts)
    stopped_by = (
        "interrupt"
        if interrupted
        else (
            "requests" if all(d["stopped_by"] == "requests" for d in done.values()) else "duration"
        )
    )
    if stopped_by == "duration":
        window_s = options.recorded_s
    else:
        ends = samples.offset_s + samples.latency_s
        window_s = float(ends.max() - options.warmup_s) if len(samples) else 0.0
    report = _report(options, info, pool, samples, window_s, done, stopped_by, command)
    report["start_monotonic_s"] = start_at.value
    report["server"] = server_figures(before, after, info.model, scrape_reason)
    if options.server_pid is not None and pid_cpu0 is not None and pid_cpu1 is not None:
        cpu = pid_cpu1 - pid_cpu0
        preds = report["summary"]["predictions_per_s"] * window_s
        report["server_process"] = {
            "pid": options.server_pid,
            "cpus_allowed": cpus_allowed(options.server_pid),
            "cpu_seconds": cpu,
            "cpu_pct": 100 * cpu / window_s if window_s else None,
            "cpu_us_per_prediction": cpu * 1e6 / preds if preds else None,
        }
        overlap = set(options.cpus) & _cpu_list(report["server_process"]["cpus_allowed"])
        if options.cpus and overlap:
            report["warnings"].append(
                f"the server may run on CPUs {sorted(overlap)} that the generator uses too"
            )
    return report, samples


def _cpu_list(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.update(range(int(lo), int(hi) + 1))
        elif part.strip().isdigit():
            out.add(int(part))
    return out


def _wait_ready(out: Any, workers: list[Any], timeout_s: float = 120.0) -> None:
    ready: set[int] = set()
    until = time.monotonic() + timeout_s
    while len(ready) < len(workers):
        if time.monotonic() > until:
            raise LoadTestError(f"client processes not ready after {timeout_s:g} s")
        try:
            kind, index, payload = out.get(timeout=0.2)
        except queue_module.Empty:
            dead = [w.name for w in workers if w.exitcode is not None]
            if dead:
                raise LoadTestError(f"client process(es) exited before starting: {dead}") from None
            continue
        if kind == "error":
            raise LoadTestError(f"client process {index} failed to start:\n{payload}")
        ready.add(index)


def _report(
    options: LoadTestOptions,
    info: Any,
    pool: Pool,
    samples: Samples,
    window_s: float,
    done: dict[int, dict[str, Any]],
    stopped_by: str,
    command: str,
) -> dict[str, Any]:
    summary = summarize(samples, window_s)
    per_proc = []
    warnings: list[str] = []
    for i in range(options.procs):
        mine = samples.proc == i
        d = done.get(i, {})
        cpu_pct = 100 * d.get("cpu_s", 0.0) / d["wall_s"] if d.get("wall_s") else None
        lag = samples.lag_s[mine]
        per_proc.append(
            {
                "proc": i,
                "requests": int(mine.sum()),
                "cpu_pct": cpu_pct,
                "cpu_s": d.get("cpu_s"),
                "spin_s": d.get("spin_s"),
                "send_lag_p99_ms": (
                    float(np.percentile(lag, 99, method="inverted_cdf")) * 1e3 if len(lag) else None
                ),
                "stopped_by": d.get("stopped_by"),
            }
        )
        if cpu_pct is not None and cpu_pct > GENERATOR_BUSY_PCT:
            warnings.append(
                f"client process {i} used {cpu_pct:.0f}% of a core: the generator may be the "
                "bottleneck (add --procs, or free cores for --cpus)"
            )
    if summary["requests"] and (expired := summary["errors_by_code"].get("EXPIRED_BEFORE_SEND")):
        warnings.append(f"{expired} requests expired before the generator could send them")
    offered = options.offered_rps
    if offered and stopped_by == "duration" and summary["achieved_rps"] < 0.95 * offered:
        warnings.append(
            f"sent {summary['achieved_rps']:,.0f} req/s of the {offered:,.0f} offered: the "
            "generator fell behind"
        )
    return {
        "command": command,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "options": {**asdict(options), "cpus": list(options.cpus)},
        "target": options.target,
        "model": {
            "name": info.model,
            "version": info.version,
            "schema": info.schema.name,
            "max_candidates": info.max_candidates,
        },
        "mode": options.mode,
        "offered_rps": offered,
        "schedule": [{"seconds": s, "rate": r} for s, r in options.schedule] or None,
        "phases": phase_summaries(samples, options.warmup_s, options.schedule),
        "concurrency": options.concurrency,
        "deadline_ms": options.deadline_ms,
        "pool": pool.describe(),
        "generator": {
            "procs": options.procs,
            "cpus": list(options.cpus) or "not pinned",
            "per_proc": per_proc,
        },
        "stopped_by": stopped_by,
        "interrupted": stopped_by == "interrupt",
        "summary": summary,
        "timeline": timeline(samples, options.warmup_s),
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------------- output


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable final report."""
    s = report["summary"]
    lat = s["latency_ms"]
    if report.get("schedule"):
        load = "open loop in phases, " + ", ".join(
            f"{p['seconds']:g} s at {p['rate']:,.0f} req/s" for p in report["schedule"]
        )
    elif report["mode"] == "open":
        load = f"open loop, {report['offered_rps']:,.0f} req/s offered"
    else:
        load = f"closed loop, {report['concurrency']} outstanding"
    gen = report["generator"]
    lines = [
        f"target {report['target']}  model {report['model']['name']} v{report['model']['version']}"
        f"  ({load}; K {report['options']['candidates']}, mean {report['pool']['k_mean']:.1f};"
        f" deadline {report['deadline_ms']:g} ms)",
        f"generator: {gen['procs']} process(es), CPUs {gen['cpus']}; "
        + ", ".join(
            f"#{p['proc']} {p['cpu_pct'] or 0:.0f}% CPU, send lag p99 {_ms(p['send_lag_p99_ms'])} ms"
            for p in gen["per_proc"]
        ),
        f"window {s['window_s']:.2f} s (stopped by {report['stopped_by']}): {s['requests']:,} "
        f"requests, {s['ok']:,} OK, {s['errors']:,} errors",
        f"achieved {s['achieved_rps']:,.1f} req/s ({s['ok_rps']:,.1f} OK/s), "
        f"{s['predictions_per_s']:,.0f} predictions/s",
        f"latency of OK answers (ms): p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  "
        f"p99 {_ms(lat['p99'])}  p99.9 {_ms(lat['p99_9'])}  max {_ms(lat['max'])};  "
        f"p99 counting failures as misses {_ms(s['p99_ms_failures_as_misses'])}",
        "errors by code: "
        + (", ".join(f"{c} {n:,}" for c, n in s["errors_by_code"].items()) or "none"),
        f"timeout rate: {100 * (s['timeout_rate'] or 0):.4f}% ({s['timeouts']:,})",
    ]
    for code, pct in s.get("latency_by_code_ms", {}).items():
        if code != "OK":
            lines.append(
                f"latency of {code} answers (ms): p50 {_ms(pct['p50'])}  p99 {_ms(pct['p99'])}"
                f"  max {_ms(pct['max'])}"
            )
    for i, phase in enumerate(report.get("phases") or []):
        ps = phase["summary"]
        lines.append(
            f"phase {i + 1} ({phase['seconds']:g} s at {phase['rate']:,.0f} req/s from "
            f"{phase['start_s']:g} s): {ps['ok_rps']:,.1f} OK/s, OK p99 "
            f"{_ms(ps['latency_ms']['p99'])} ms, errors "
            + (", ".join(f"{c} {n:,}" for c, n in ps["errors_by_code"].items()) or "none")
        )
    srv = report["server"]
    if srv.get("available"):
        reasons = ", ".join(f"{r} {v:,.0f}" for r, v in srv["compute_calls_by_reason"].items() if v)
        lines.append(
            f"server: {srv['compute_calls']:,.0f} compute calls for {srv['predict_requests'] or 0:,.0f}"
            f" requests ({_num(srv['compute_calls_per_request'], '.3f')} per request, "
            f"{_num(srv['compute_calls_per_ok_request'], '.3f')} per OK answer; closed by "
            f"{reasons or '-'}), mean batch {_num(srv['mean_batch_predictions'], '.1f')} predictions"
            f" / {_num(srv['mean_batch_requests'], '.2f')} requests, "
            f"{_num(srv['cpu_seconds_per_million_predictions'], '.2f')} CPU-s per million "
            f"predictions ({srv.get('cpu_source', '-')})"
        )
    else:
        lines.append(f"server metrics: unavailable ({srv.get('reason') or 'unknown'})")
    if s["client_compute_calls_per_request"] is not None:
        lines.append(
            "client-side (from responses' batch_requests): >= "
            f"{s['client_compute_calls_per_request']:.3f} compute calls per request"
        )
    if proc := report.get("server_process"):
        lines.append(
            f"server process {proc['pid']} (CPUs {proc['cpus_allowed']}): "
            f"{_num(proc['cpu_pct'], '.0f')}% of a core, "
            f"{_num(proc['cpu_us_per_prediction'], '.2f')} CPU-µs per OK prediction"
        )
    lines += [f"WARNING: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def write_json(report: dict[str, Any], path: Path | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def write_plot(report: dict[str, Any], samples: Samples, path: Path | str) -> None:
    """PNG: OK-latency percentiles and error counts per second, and the latency distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_t, ax_d) = plt.subplots(2, 1, figsize=(10, 8), constrained_layout=True)
    rows = report["timeline"]
    t = [r["t_s"] + 0.5 for r in rows]  # bin centres
    for key, label in (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("max", "max")):
        ax_t.plot(t, [r[key] if r[key] is not None else np.nan for r in rows], label=label)
    ax_t.set_yscale("log")
    ax_t.set_xlabel("seconds since recording started (by send time)")
    ax_t.set_ylabel("latency of OK answers (ms)")
    ax_t.grid(True, which="both", alpha=0.3)
    rate_ax = ax_t.twinx()
    rate_ax.bar(t, [r["errors"] for r in rows], width=0.8, alpha=0.25, color="red", label="errors")
    rate_ax.set_ylabel("errors per second")
    rate_ax.set_ylim(bottom=0)
    for ax in (ax_t, ax_d):
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    lines, labels = ax_t.get_legend_handles_labels()
    lines2, labels2 = rate_ax.get_legend_handles_labels()
    ax_t.legend(lines + lines2, labels + labels2, loc="upper left", fontsize=8)
    s = report["summary"]
    ax_t.set_title(
        f"{report['mode']} loop, {s['achieved_rps']:,.0f} req/s, K mean {report['pool']['k_mean']:.0f}"
        f", {s['errors']:,} errors of {s['requests']:,}"
    )
    lat = np.sort(samples.latency_s[samples.code == OK]) * 1e3
    if len(lat):
        # Percentile spectrum: x = 1 / (1 - quantile) on a log axis shows the tail in detail.
        q = (np.arange(1, len(lat) + 1) - 0.5) / len(lat)
        ax_d.plot(1 / (1 - q), lat)
        ax_d.set_xscale("log")
        ticks = [q for q in (0.5, 0.9, 0.99, 0.999, 0.9999) if 1 / (1 - q) <= 2 * len(lat)]
        ax_d.set_xticks([1 / (1 - q) for q in ticks], [f"p{100 * q:g}" for q in ticks])
        ax_d.set_yscale("log")
    ax_d.set_xlabel("percentile")
    ax_d.set_ylabel("latency of OK answers (ms)")
    ax_d.set_title("latency distribution (all recorded OK answers)")
    ax_d.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------ command line


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def _cpus(text: str) -> tuple[int, ...]:
    import re

    if text.strip() and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text.replace(" ", "")):
        raise argparse.ArgumentTypeError(
            f"expected a CPU list such as 1 or 2,3 or 0-3, got {text!r}"
        )
    return tuple(sorted(_cpu_list(text.replace(" ", ""))))


def _schedule(text: str) -> tuple[tuple[float, float], ...]:
    try:
        return parse_schedule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _candidates(text: str) -> str:
    try:
        CandidateSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The load test's flags (shared by ``adpredict loadtest`` and benchmarks/loadtest.py)."""
    d = LoadTestOptions()
    p.add_argument("--target", default=d.target, help=f"HOST:PORT (default {d.target})")
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate", type=_positive_float, help="open loop: Poisson arrivals, req/s")
    mode.add_argument(
        "--schedule",
        type=_schedule,
        help="open loop in phases: SECONDS:RATE,... back to back (e.g. 10:500,60:2000,10:500)",
    )
    mode.add_argument(
        "--concurrency", type=_int_at_least(1), help="closed loop: requests outstanding"
    )
    p.add_argument(
        "--duration",
        type=_positive_float,
        default=None,
        help="recorded seconds (default 10; with --requests: at most 3600)",
    )
    p.add_argument(
        "--requests", type=_int_at_least(1), default=None, help="recorded requests (a cap)"
    )
    p.add_argument(
        "--warmup", type=_non_negative_float, default=0.0, help="unrecorded seconds first"
    )
    p.add_argument(
        "--candidates",
        type=_candidates,
        default=d.candidates,
        help="K per request: 32, LO-HI (uniform) or lognormal:MEAN[:SIGMA] (default 32)",
    )
    p.add_argument(
        "--deadline-ms",
        type=_positive_float,
        default=d.deadline_ms,
        help=f"gRPC deadline per request (default {d.deadline_ms:g})",
    )
    p.add_argument("--procs", type=_int_at_least(1), default=1, help="client processes (default 1)")
    p.add_argument("--cpus", type=_cpus, default=(), help="pin the generator to these CPUs, e.g. 1")
    p.add_argument(
        "--pool", type=_int_at_least(1), default=d.pool, help="distinct requests (default 256)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--metrics-url",
        default=d.metrics_url,
        help=f"the server's Prometheus page (default {d.metrics_url}; '' = none)",
    )
    p.add_argument(
        "--server-pid",
        type=_int_at_least(1),
        default=None,
        help="also read this process tree's CPU from /proc",
    )
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    p.add_argument("--quiet", action="store_true", help="no live progress line")


def options_from_args(args: argparse.Namespace) -> LoadTestOptions:
    return LoadTestOptions(
        target=args.target,
        model=args.model,
        rate=args.rate,
        schedule=args.schedule or (),
        concurrency=args.concurrency,
        duration_s=args.duration,
        requests=args.requests,
        warmup_s=args.warmup,
        candidates=args.candidates,
        deadline_ms=args.deadline_ms,
        procs=args.procs,
        cpus=tuple(args.cpus),
        pool=args.pool,
        seed=args.seed,
        metrics_url=args.metrics_url,
        server_pid=args.server_pid,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run, print the report, write ``--out`` / ``--plot``; 0 even if requests failed."""
    options = options_from_args(args)
    report, samples = run(
        options,
        progress=None if args.quiet else sys.stderr,
        command=shlex.join(sys.argv),
    )
    print(format_report(report), flush=True)
    if args.out:
        write_json(report, args.out)
    if args.plot:
        write_plot(report, samples, args.plot)
    return 130 if report["interrupted"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/loadtest.py ...``: the same as ``adpredict loadtest ...``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(
        prog="loadtest", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except AdpredictError as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2
