"""Micro-batcher: merges concurrent prediction requests into few compute calls.

A bid request asks for K predictions (one per candidate ad). A model call costs a fixed overhead
(~560 µs for the rtb DeepFM on one core here) plus a little per prediction (~1.35 µs), so one
call for many requests is far cheaper than one call each. ``Batcher`` queues the requests of concurrent RPCs and hands them
to ``run_batch`` together, in a worker thread, then gives each caller its own results. It never
sees a tensor: a request is an opaque payload with a ``size`` (its number of predictions), and
``run_batch`` receives ``Slice``s of payloads and returns one result per slice.

Sizes and splitting
    Everything is counted in predictions, not requests. A batch holds at most ``max_batch_size``
    predictions; a larger request is cut into slices that may ride in several batches, and its
    results are joined back in order (``numpy.concatenate`` unless you pass ``join``).
    ``batching=False`` (the server's ``--no-batching``) computes every request alone, whole, in
    one call: no merging, no splitting.

When a batch closes
    The batch being formed is the first ``max_batch_size`` queued predictions. It closes when
      * ``full``: that many predictions are queued;
      * ``max_wait``: its oldest request has waited ``max_wait_s``;
      * ``deadline``: the earliest deadline among its requests, minus the predicted compute time
        of the batch at its current size, minus ``safety_margin_s``, has arrived. Requests that
        join raise the predicted compute time and so pull this moment earlier;
      * ``drain``: ``close()`` was called; everything queued is sent without waiting.
    With ``batching=False`` every request is a batch of its own, closed at once as ``full``.
    A closed batch starts when a compute thread is free. While all ``compute_threads`` are busy,
    arriving requests keep joining the next batch; that is where batching pays off under load.

Latency bound
    A request waits at most ``max_wait_s`` for company, plus the time until a compute thread is
    free, plus the compute of the batches ahead of it and of its own. With a deadline, its batch
    closes early enough for the predicted compute to end ``safety_margin_s`` before it. At
    admission the batcher predicts when the request would be answered (a thread frees, the queued
    batches ahead run, its own batch runs) and, if that is after the deadline, raises
    ``DeadlineError`` at once instead of queueing work that would be late (the safety margin
    only moves closes earlier; it does not refuse requests). The prediction is
    optimistic (full batches, perfectly shared threads), so only clearly hopeless requests are
    refused; one whose deadline still passes in the queue gets ``DeadlineError`` just before
    compute and is never computed. An idle batcher (nothing queued, nothing computing) judges
    by the more optimistic of the learned cost and the prior: otherwise one slow batch, which
    inflates the cost model, could make it refuse everything forever, since no batch would run
    to correct it.

Full queue
    At most ``queue_limit`` predictions wait (computing ones do not count). A request that would
    exceed it gets ``OverloadedError`` immediately; callers are never blocked, they retry
    elsewhere. A request larger than ``queue_limit`` is always refused, so keep the limit above
    the largest request the service accepts.

Failures and cancellation
    Every request is answered exactly once: a ``Completed``, an exception, or nothing because its
    caller was cancelled. If ``run_batch`` raises, every request in that batch gets that
    exception (a split request fails whole) and the next batch runs normally. Returning the wrong
    number of results fails the batch the same way, with a ``RuntimeError``. A request whose
    caller was cancelled while it was queued is dropped before compute; one cancelled during
    compute has its result discarded.

Shutdown
    ``close(grace_s)`` refuses new requests (``OverloadedError``), sends what is queued, waits up
    to ``grace_s`` for compute to finish, then answers whatever is left with ``OverloadedError``.

Cost model
    Predicted compute time is ``per_item_s * n + fixed_s``, fitted by least squares to the last
    ``cost_window`` measured batches, so it adapts to the machine and the model. The prior
    (``prior_fixed_s``, ``prior_per_item_s``) enters the fit as pseudo-batches worth
    ``prior_weight`` real ones: it dominates until batches are measured and fades after, with no
    warm-up switch. Both coefficients are kept non-negative.

Tuning
    * ``max_wait_s``: under light load every request pays up to this much for little merging;
      under heavy load batches fill, or form while threads are busy, before it expires. Keep it a
      fraction of the server budget (1-2 ms out of ~5 ms); deadline closing protects tight
      requests whatever the value.
    * ``max_batch_size``: near the top of the model's throughput curve. For the default DeepFM
      on one core that is 4096 (``bench_model.py``: 1.5-1.6 CPU-µs per prediction at 4096
      against 1.7-1.9 at 1024, one call 6-7 ms): a K = 300 request is 300 predictions, so 1024
      would merge at most three of them. It bounds a batch only under heavy load (at moderate
      load batches hold what queued meanwhile), where fewer, larger calls keep the core's
      throughput up.
      One batch's compute should stay well under the budget.
    * ``compute_threads``: up to this many batches run at once (TensorFlow releases the GIL).
      Keep threads times TensorFlow intra-op threads near the core count; start with 1 and measure.
      More threads mean more, smaller batches.
    * ``queue_limit``: about what the threads compute within a typical deadline (throughput times
      budget). A longer queue only holds requests that will miss their deadline.
    * ``safety_margin_s``: time needed after compute to encode and send the reply, plus the error
      of the cost prediction.

Implementation details follow. API users need not read.

One scheduler task sleeps on an ``asyncio.Event`` that is set by a new request, by a finished
batch (a thread is free) and by an alarm task sleeping on the clock until the next close time.
Each wake-up is O(1) apart from forming batches: the forming batch's earliest deadline is kept up
to date on admission and recomputed by a scan of one batch's worth of queue after each dispatch.
Cancelled and expired requests stay in the queue (they count towards ``queued_predictions``) and
are dropped when a batch is formed, just before compute. Compute runs via ``run_in_executor``; its
done-callback answers the requests on the event loop, setting results only on futures not yet done.
Admission sums the linear cost model in closed form over the queue and shares that work among the
threads by water-filling their predicted free times.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import operator
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

import numpy

from adpredict.errors import DeadlineError, OverloadedError
from adpredict.serving.clock import Clock, MonotonicClock

__all__ = [
    "BatchObserver",
    "BatchStats",
    "Batcher",
    "BatcherOptions",
    "CloseReason",
    "Completed",
    "LinearCostModel",
    "RejectReason",
    "Slice",
]

logger = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")

CloseReason = Literal["full", "max_wait", "deadline", "drain"]
RejectReason = Literal["queue_full", "deadline", "shutting_down"]

# Clock readings are sums of floats; treat times this close as equal so that a batch due at
# t0 + max_wait_s closes when a clock advanced in steps reaches it.
_TIME_EPSILON_S = 1e-9


@dataclass(frozen=True)
class BatcherOptions:
    """How the batcher merges, waits and admits. Sizes are in predictions, times in seconds."""

    max_batch_size: int = 4096  # predictions per compute call; larger requests are split
    max_wait_s: float = 0.002  # 2 ms: longest the oldest queued request waits for company
    queue_limit: int = 8192  # predictions waiting for compute; beyond it -> OverloadedError
    safety_margin_s: float = 0.001  # 1 ms: predicted compute must end this long before a deadline
    compute_threads: int = 1  # batches computed at once, each on its own worker thread
    batching: bool = True  # False (--no-batching): each request is computed alone, whole
    cost_window: int = 100  # batches: the cost model fits the most recent this many
    prior_fixed_s: float = 300e-6  # 300 µs: assumed cost per call until batches are measured
    prior_per_item_s: float = 1.5e-6  # 1.5 µs: assumed cost per prediction until measured
    prior_weight: float = 2.0  # batches: how many measured batches the prior is worth

    def __post_init__(self) -> None:
        _check_int("max_batch_size", self.max_batch_size, 1, "predictions")
        _check_int("queue_limit", self.queue_limit, 1, "predictions")
        _check_int("compute_threads", self.compute_threads, 1, "threads")
        _check_int("cost_window", self.cost_window, 2, "batches")
        _check_seconds("max_wait_s", self.max_wait_s)
        _check_seconds("safety_margin_s", self.safety_margin_s)
        _check_seconds("prior_fixed_s", self.prior_fixed_s)
        _check_seconds("prior_per_item_s", self.prior_per_item_s)
        if not isinstance(self.batching, bool):
            raise ValueError(f"batching must be True or False, got {self.batching!r}")
        if not (_is_real(self.prior_weight) and 0 < self.prior_weight < math.inf):
            raise ValueError(f"prior_weight must be > 0 batches, got {self.prior_weight!r}")
        if self.batching and self.queue_limit < self.max_batch_size:
            raise ValueError(
                f"queue_limit ({self.queue_limit!r} predictions) must be >= max_batch_size "
                f"({self.max_batch_size!r}), or batches could never fill"
            )


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int, unit: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} {unit}, got {value!r}")


def _check_seconds(name: str, value: float) -> None:
    if not (_is_real(value) and 0 <= value < math.inf):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class Slice(Generic[P]):
    """Predictions ``start:stop`` of one request's payload, as handed to ``run_batch``."""

    payload: P  # the caller's opaque request payload
    start: int  # first prediction of this piece within the payload
    stop: int  # one past the last

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class Completed(Generic[R]):
    """A request's answer, with where its time went."""

    result: R  # joined result for the whole request
    queue_s: float  # admission -> its (last) batch started compute
    compute_s: float  # compute time of the batch(es) it was in (sum if split)
    batch_predictions: int  # size of the (last) batch it rode in
    batch_requests: int  # requests (whole or in part) in that batch


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What one compute call did, for metrics."""

    predictions: int
    requests: int
    reason: CloseReason
    queue_s: tuple[float, ...]  # per request in the batch: admission -> this batch started
    compute_s: float
    error: BaseException | None  # the error all its requests got, or None

    @property
    def max_queue_s(self) -> float:
        return max(self.queue_s, default=0.0)


class BatchObserver(Protocol):
    """Hooks for a metrics layer; every method defaults to doing nothing.

    Subclass it and override what you need. Hooks run on the event loop and must be quick; one
    that raises is logged and otherwise ignored, so metrics can never break serving.
    """

    def batch_completed(self, stats: BatchStats) -> None:
        """A compute call returned or raised."""
        return None

    def request_rejected(self, reason: RejectReason, size: int) -> None:
        """A request was refused at admission."""
        return None

    def request_expired(self, queue_s: float, size: int) -> None:
        """A queued request's deadline passed; it got ``DeadlineError`` and was not computed."""
        return None

    def request_cancelled(self, queue_s: float, size: int) -> None:
        """A queued request's caller was cancelled; it was dropped before compute."""
        return None


class _NullObserver(BatchObserver):
    pass


class LinearCostModel:
    """Predicts a batch's compute seconds as ``per_item_s * n + fixed_s``, learned online.

    Weighted least squares over the last ``window`` observed batches plus two pseudo-batches
    carrying the prior, at n = 1 and n = ``reference_n``, worth ``prior_weight`` batches together.
    With no data the prior is returned. The line passes through the weighted mean of the points,
    so a batch size that keeps recurring (say, always full) is predicted right while the prior
    shapes the line where there is no data. A negative slope is refitted as a constant, a
    negative intercept as a line through zero. ``observe`` is O(1): it keeps running sums.
    """

    def __init__(
        self,
        *,
        fixed_s: float,
        per_item_s: float,
        window: int,
        prior_weight: float,
        reference_n: int,
    ) -> None:
        self._prior = (per_item_s, fixed_s)
        self._prior_points = [
            (1.0, per_item_s + fixed_s, prior_weight / 2),
            (float(reference_n), per_item_s * reference_n + fixed_s, prior_weight / 2),
        ]
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._since_resum = 0
        self._resum()
        self._per_item_s = per_item_s
        self._fixed_s = fixed_s

    @property
    def per_item_s(self) -> float:
        return self._per_item_s

    @property
    def fixed_s(self) -> float:
        return self._fixed_s

    def predict(self, n: int) -> float:
        """Predicted seconds to compute a batch of ``n`` predictions (never negative)."""
        return self._per_item_s * n + self._fixed_s

    def largest_recent(self) -> int:
        """The largest of the last ``window`` observed batches, in predictions (0 if none)."""
        return int(max((n for n, _, _ in self._samples), default=0))

    def observe(self, n: int, seconds: float) -> None:
        """Record that a batch of ``n`` predictions took ``seconds``, and refit."""
        if n < 1 or not 0 <= seconds < math.inf:
            return
        if len(self._samples) == self._samples.maxlen:
            self._add(self._samples[0], -1.0)
        point = (float(n), float(seconds), 1.0)
        self._samples.append(point)
        self._add(point, 1.0)
        self._since_resum += 1
        if self._since_resum >= len(self._samples):  # keep rounding errors from piling up
            self._resum()
        self._fit()

    def _resum(self) -> None:
        self._sums = [0.0] * 5  # sum of w, w*n, w*t, w*n*n, w*n*t
        for point in (*self._prior_points, *self._samples):
            self._add(point, 1.0)
        self._since_resum = 0

    def _add(self, point: tuple[float, float, float], sign: float) -> None:
        n, t, w = point
        w *= sign
        sums = self._sums
        sums[0] += w
        sums[1] += w * n
        sums[2] += w * t
        sums[3] += w * n * n
        sums[4] += w * n * t

    def _fit(self) -> None:
        sw, sn, st, snn, snt = self._sums
        mean_n, mean_t = sn / sw, st / sw
        var_n = snn - sn * mean_n  # sum of w * (n - mean_n)**2
        if var_n > 1e-9 * snn:
            per_item = (snt - sn * mean_t) / var_n
        else:  # every point at one size: keep the prior's shape, scaled to the data
            prior_at_mean = self._prior[0] * mean_n + self._prior[1]
            per_item = self._prior[0] * mean_t / prior_at_mean if prior_at_mean > 0 else 0.0
        fixed = mean_t - per_item * mean_n
        if per_item < 0:
            per_item, fixed = 0.0, mean_t
        elif fixed < 0:
            per_item, fixed = snt / snn, 0.0
        self._per_item_s, self._fixed_s = per_item, fixed


class _Request:
    """One submitted request and its progress through the batches."""

    __slots__ = (
        "admitted_at",
        "compute_s",
        "deadline",
        "future",
        "last_batch",
        "last_start",
        "outstanding",
        "parts",
        "payload",
        "size",
        "taken",
    )

    def __init__(
        self,
        payload: Any,
        size: int,
        deadline: float | None,
        admitted_at: float,
        future: asyncio.Future[Completed[Any]],
    ) -> None:
        self.payload = payload
        self.size = size
        self.deadline = deadline
        self.admitted_at = admitted_at
        self.future = future
        self.taken = 0  # predictions handed to batches so far
        self.outstanding = 0  # slices handed out whose results have not come back
        self.parts: list[Any] = []  # one result per slice, in order
        self.compute_s = 0.0
        self.last_start = admitted_at
        self.last_batch: _Batch | None = None


@dataclass(frozen=True, slots=True)
class _Piece:
    request: _Request
    index: int  # position of this slice among the request's slices
    start: int
    stop: int


@dataclass(eq=False, slots=True)
class _Batch:
    pieces: list[_Piece]
    predictions: int
    reason: CloseReason
    started_at: float
    predicted_end: float


def _concatenate(parts: list[Any]) -> Any:
    return numpy.concatenate(parts)


class Batcher(Generic[P, R]):
    """Merges concurrent ``submit`` calls into ``run_batch`` calls; see the module docstring.

    ``run_batch`` runs in a worker thread with the slices of one batch, in queue order, and must
    return one result per slice. ``join`` combines a split request's results in order (default
    ``numpy.concatenate``); a request that was not split gets its slice's result as is.
    Use it from one event loop: ``start()`` there, ``submit()`` from any task (or ``enqueue()``
    from any callback), ``close()`` at the end (or ``async with``).
    """

    def __init__(
        self,
        run_batch: Callable[[list[Slice[P]]], Sequence[R]],
        options: BatcherOptions,
        *,
        clock: Clock | None = None,
        join: Callable[[list[R]], R] | None = None,
        observer: BatchObserver | None = None,
        name: str = "default",
    ) -> None:
        self._run_batch = run_batch
        self._options = options
        self._clock: Clock = clock if clock is not None else MonotonicClock()
        self._join: Callable[[list[R]], R] = join if join is not None else _concatenate
        self._observer: BatchObserver = observer if observer is not None else _NullObserver()
        self._name = name
        self._cost = LinearCostModel(
            fixed_s=options.prior_fixed_s,
            per_item_s=options.prior_per_item_s,
            window=options.cost_window,
            prior_weight=options.prior_weight,
            reference_n=options.max_batch_size,
        )
        self._queue: deque[_Request] = deque()
        self._queued = 0  # predictions in the queue not yet handed to a batch
        self._head_deadline: float | None = None  # earliest deadline in the forming batch
        self._running: set[_Batch] = set()
        self._live: set[_Request] = set()  # admitted and not yet answered
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # closing, queue empty, nothing computing
        self._stopped = asyncio.Event()
        self._alarm: asyncio.Task[None] | None = None
        self._alarm_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._closing = False
        self._crash: BaseException | None = None

    # ----------------------------------------------------------------------------- public API

    @property
    def options(self) -> BatcherOptions:
        return self._options

    @property
    def queued_predictions(self) -> int:
        """Predictions waiting for a batch (gauge). Cancelled ones count until dropped."""
        return self._queued

    @property
    def queued_requests(self) -> int:
        """Requests (or remainders of split ones) waiting for a batch (gauge)."""
        return len(self._queue)

    @property
    def in_flight_requests(self) -> int:
        """Requests admitted and not yet answered, queued or computing (gauge)."""
        return len(self._live)

    @property
    def computing_batches(self) -> int:
        """Batches in compute now, i.e. busy compute threads (gauge, <= compute_threads)."""
        return len(self._running)

    def predicted_compute_s(self, n: int) -> float:
        """Predicted seconds to compute a batch of ``n`` predictions, from the cost model."""
        return self._cost.predict(n)

    def largest_recent_batch(self) -> int:
        """Predictions in the largest of the last ``cost_window`` computed batches (0 if none)."""
        return self._cost.largest_recent()

    def start(self) -> None:
        """Start the scheduler task and the compute threads on the running event loop (call
        it from a coroutine or callback on that loop; nothing is awaited)."""
        if self._scheduler is not None or self._closing:
            raise RuntimeError(f"batcher {self._name!r} was already started or closed")
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(
            max_workers=self._options.compute_threads,
            thread_name_prefix=f"batcher-{self._name}",
        )
        self._scheduler = self._loop.create_task(self._schedule(), name=f"batcher-{self._name}")
        self._scheduler.add_done_callback(self._on_scheduler_exit)

    async def submit(self, payload: P, size: int, deadline: float | None = None) -> Completed[R]:
        """Queue ``size`` predictions of ``payload`` and wait for their joined result.

        ``deadline`` is an absolute time on the batcher's clock (None: no deadline). Raises
        ``OverloadedError`` if the queue is full or the batcher is shutting down,
        ``DeadlineError`` if the deadline cannot be met (at admission) or passed in the queue,
        ``ValueError`` if ``size < 1``, and whatever ``run_batch`` raised for its batch.
        Cancelling the caller withdraws the request.
        """
        return await self.enqueue(payload, size, deadline)

    def enqueue(
        self,
        payload: P,
        size: int,
        deadline: float | None = None,
        *,
        admitted_at: float | None = None,
    ) -> asyncio.Future[Completed[R]]:
        """``submit`` without the coroutine: admits and queues now (raising what ``submit``
        raises at admission) and returns the future of the result, which fails as ``submit``
        would. Cancelling the future withdraws the request. For a caller that answers from a
        done callback instead of a task per request (the native front end).

        ``admitted_at``: what ``check(size, …)`` returned for this request, when nothing ran
        on the event loop since (so the queue is as ``check`` saw it): admission is not run a
        second time, and the request counts as admitted then."""
        now = self._admit(size, deadline) if admitted_at is None else admitted_at
        future: asyncio.Future[Completed[R]] = self._loop.create_future()
        request = _Request(payload, size, deadline, now, future)
        future.add_done_callback(lambda _: self._live.discard(request))
        self._live.add(request)
        if self._options.batching and self._queued < self._options.max_batch_size:
            self._head_deadline = _earliest(self._head_deadline, deadline)
        self._queue.append(request)
        self._queued += size
        self._wake.set()
        return future

    def check(self, size: int, deadline: float | None = None) -> float:
        """Raise what ``submit(…, size, deadline)`` would raise at admission, now, without
        queueing anything: lets a caller refuse a request before doing work for it (decoding).
        A refusal is reported to the observer, as ``submit`` would report it. Returns the
        clock's now, for ``enqueue(…, admitted_at=)``."""
        return self._admit(size, deadline)

    def _admit(self, size: int, deadline: float | None) -> float:
        """Admission: the checks ``submit`` documents; returns the clock's ``now``."""
        size = operator.index(size)
        if size < 1:
            raise ValueError(f"size must be >= 1 predictions, got {size!r}")
        if self._loop is None:
            raise RuntimeError(f"batcher {self._name!r} is not started; call start() first")
        if self._crash is not None:
            raise RuntimeError(f"batcher {self._name!r} has failed") from self._crash
        if self._closing:
            self._notify(self._observer.request_rejected, "shutting_down", size)
            raise OverloadedError(f"batcher {self._name!r} is shutting down")
        limit = self._options.queue_limit
        if self._queued + size > limit:
            self._notify(self._observer.request_rejected, "queue_full", size)
            raise OverloadedError(
                f"queue full: {self._queued} of {limit} predictions queued, "
                f"request needs {size} more"
            )
        now = self._clock.now()
        if deadline is not None:
            finish = self._predict_answer_at(size, now)
            if not self._queue and not self._running:
                # Idle: judge by the more optimistic of the learned cost and the prior. One
                # slow batch (a CPU stall) inflates the learned cost; refusing on it would
                # mean no batch ever runs again to correct it.
                opts = self._options
                prior = opts.prior_fixed_s + opts.prior_per_item_s * size
                finish = min(finish, now + prior)
            if deadline <= now or finish > deadline:
                self._notify(self._observer.request_rejected, "deadline", size)
                raise DeadlineError(
                    f"deadline is {(deadline - now) * 1e3:.3f} ms away but the answer is "
                    f"predicted in {(finish - now) * 1e3:.3f} ms"
                )
        return now

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop admitting, compute what is queued, wait up to ``grace_s``, shut the threads.

        New ``submit`` calls get ``OverloadedError``. Requests still unanswered after
        ``grace_s`` (on the batcher's clock) get ``OverloadedError``; their compute threads are
        abandoned, not interrupted. Safe to call more than once.
        """
        if not grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0 seconds, got {grace_s!r}")
        if self._scheduler is None:
            self._closing = True
            return
        if self._closing:
            await self._stopped.wait()
            return
        self._closing = True
        self._wake.set()
        idle = asyncio.ensure_future(self._idle.wait())
        grace = asyncio.ensure_future(self._clock.sleep_until(self._clock.now() + grace_s))
        try:
            await asyncio.wait({idle, grace}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            grace.cancel()
            self._stop(
                OverloadedError(f"batcher {self._name!r} shut down before answering the request"),
                self._clock.now(),
            )
        await asyncio.wait({self._scheduler})

    async def __aenter__(self) -> Batcher[P, R]:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------------------ admission

    def _predict_answer_at(self, size: int, now: float) -> float:
        """When a request of ``size`` admitted now would be answered, optimistically."""
        per_item, fixed = self._cost.per_item_s, self._cost.fixed_s
        total = self._queued + size
        if self._options.batching:
            cap = self._options.max_batch_size
            batches = -(-total // cap)
            own = total - (batches - 1) * cap  # its last slice rides in the last batch
        else:
            batches = len(self._queue) + 1
            own = size
        ahead_s = per_item * (total - own) + fixed * (batches - 1)
        return self._threads_done_at(ahead_s, now) + per_item * own + fixed

    def _threads_done_at(self, work_s: float, now: float) -> float:
        """When ``work_s`` of compute, shared evenly, is done by threads that free up as predicted.

        Water-filling: thread i is free at f_i; find t with sum(max(0, t - f_i)) = work_s.
        """
        busy = sorted(max(now, batch.predicted_end) for batch in self._running)
        free_at = [now] * (self._options.compute_threads - len(busy)) + busy
        filled = 0.0
        for k, f in enumerate(free_at, start=1):
            filled += f
            level = (work_s + filled) / k
            if k == len(free_at) or level <= free_at[k]:
                return level
        raise AssertionError("unreachable: compute_threads >= 1")

    # ------------------------------------------------------------------------------ scheduling

    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            self._dispatch_ready()
            if self._closing and not self._queue and not self._running:
                self._idle.set()
            if self._queue and len(self._running) < self._options.compute_threads:
                self._arm(min(self._close_times()))
            await self._wake.wait()

    def _dispatch_ready(self) -> None:
        while self._queue and len(self._running) < self._options.compute_threads:
            now = self._clock.now()
            reason = self._close_reason(now)
            if reason is None:
                return
            self._dispatch(reason, now)

    def _close_reason(self, now: float) -> CloseReason | None:
        if self._closing:
            return "drain"
        if not self._options.batching or self._queued >= self._options.max_batch_size:
            return "full"
        wait_at, deadline_at = self._close_times()
        if min(wait_at, deadline_at) > now + _TIME_EPSILON_S:
            return None
        return "deadline" if deadline_at < wait_at else "max_wait"

    def _close_times(self) -> tuple[float, float]:
        """(oldest request's max-wait time, deadline-driven close time) of the forming batch."""
        opts = self._options
        wait_at = self._queue[0].admitted_at + opts.max_wait_s
        if self._head_deadline is None:
            return wait_at, math.inf
        compute_s = self._cost.predict(min(self._queued, opts.max_batch_size))
        return wait_at, self._head_deadline - compute_s - opts.safety_margin_s

    def _arm(self, at: float) -> None:
        """Make sure the scheduler wakes by ``at``. An earlier alarm is kept: waking early is
        harmless (the scheduler re-arms), waking late is not."""
        if self._alarm is not None and not self._alarm.done() and self._alarm_at <= at:
            return
        if self._alarm is not None:
            self._alarm.cancel()
        self._alarm_at = at
        self._alarm = asyncio.create_task(self._ring(at - _TIME_EPSILON_S))

    async def _ring(self, at: float) -> None:
        await self._clock.sleep_until(at)
        self._wake.set()

    # ------------------------------------------------------------------------------- batches

    def _dispatch(self, reason: CloseReason, now: float) -> None:
        pieces = self._take(now)
        if self._options.batching:
            self._refresh_head_deadline()
        if not pieces:
            return
        n = sum(piece.stop - piece.start for piece in pieces)
        batch = _Batch(pieces, n, reason, now, now + self._cost.predict(n))
        for piece in pieces:
            piece.request.last_start = now
            piece.request.last_batch = batch
        self._running.add(batch)
        slices = [Slice(piece.request.payload, piece.start, piece.stop) for piece in pieces]
        assert self._loop is not None and self._executor is not None
        done = self._loop.run_in_executor(self._executor, self._compute, slices)
        done.add_done_callback(functools.partial(self._on_batch_done, batch))

    def _take(self, now: float) -> list[_Piece]:
        """Cut the next batch from the head of the queue, dropping dead requests on the way."""
        batching = self._options.batching
        cap = self._options.max_batch_size
        pieces: list[_Piece] = []
        n = 0
        while self._queue:
            request = self._queue[0]
            if request.future.done() or (request.deadline is not None and request.deadline <= now):
                self._drop(self._queue.popleft(), now)
                continue
            if batching and n >= cap:
                break
            remaining = request.size - request.taken
            count = min(remaining, cap - n) if batching else remaining
            pieces.append(_Piece(request, len(request.parts), request.taken, request.taken + count))
            request.parts.append(None)
            request.taken += count
            request.outstanding += 1
            self._queued -= count
            n += count
            if request.taken == request.size:
                self._queue.popleft()
            if not batching:
                break
        return pieces

    def _drop(self, request: _Request, now: float) -> None:
        """Remove a queued request that is cancelled, already failed, or past its deadline."""
        untaken = request.size - request.taken
        self._queued -= untaken
        queue_s = now - request.admitted_at
        if request.future.cancelled():
            self._notify(self._observer.request_cancelled, queue_s, request.size)
        elif not request.future.done():
            request.future.set_exception(
                DeadlineError(f"deadline passed after {queue_s * 1e3:.3f} ms in the queue")
            )
            self._notify(self._observer.request_expired, queue_s, request.size)
        # else: an earlier slice failed and the request already has its exception

    def _refresh_head_deadline(self) -> None:
        head: float | None = None
        seen = 0
        for request in self._queue:
            if seen >= self._options.max_batch_size:
                break
            head = _earliest(head, request.deadline)
            seen += request.size - request.taken
        self._head_deadline = head

    def _compute(self, slices: list[Slice[P]]) -> tuple[list[R], float]:
        """Runs in a worker thread: the model call, timed on the batcher's clock."""
        results = self._run_batch(slices)
        ended = self._clock.now()
        try:
            return list(results), ended
        except TypeError:
            raise TypeError(
                f"run_batch must return a list of results, got {type(results).__name__}"
            ) from None

    def _on_batch_done(self, batch: _Batch, done: asyncio.Future[tuple[list[R], float]]) -> None:
        self._running.discard(batch)
        self._wake.set()
        error: BaseException | None = None
        results: list[R] = []
        compute_s = self._clock.now() - batch.started_at
        if done.cancelled():
            error = OverloadedError(f"batcher {self._name!r} shut down before computing")
        elif (raised := done.exception()) is not None:
            error = raised
        else:
            results, ended = done.result()
            compute_s = ended - batch.started_at
            if len(results) == len(batch.pieces):
                self._cost.observe(batch.predictions, compute_s)
            else:
                error = RuntimeError(
                    f"run_batch returned {len(results)} results for {len(batch.pieces)} slices"
                )
        for i, piece in enumerate(batch.pieces):
            self._deliver(piece, None if error is not None else results[i], error, compute_s)
        stats = BatchStats(
            predictions=batch.predictions,
            requests=len(batch.pieces),
            reason=batch.reason,
            queue_s=tuple(batch.started_at - p.request.admitted_at for p in batch.pieces),
            compute_s=compute_s,
            error=error,
        )
        self._notify(self._observer.batch_completed, stats)

    def _deliver(
        self, piece: _Piece, result: R | None, error: BaseException | None, compute_s: float
    ) -> None:
        request = piece.request
        if request.future.done():  # cancelled, expired, or an earlier slice failed
            return
        if error is not None:
            request.future.set_exception(error)
            return
        request.parts[piece.index] = result
        request.outstanding -= 1
        request.compute_s += compute_s
        if request.outstanding or request.taken < request.size:
            return
        try:
            joined = request.parts[0] if len(request.parts) == 1 else self._join(request.parts)
        except Exception as exc:  # a bad join is that request's error, not the batcher's
            request.future.set_exception(exc)
            return
        last = request.last_batch
        assert last is not None
        request.future.set_result(
            Completed(
                result=joined,
                queue_s=request.last_start - request.admitted_at,
                compute_s=request.compute_s,
                batch_predictions=last.predictions,
                batch_requests=len(last.pieces),
            )
        )

    # ------------------------------------------------------------------------------- shutdown

    def _stop(self, error: BaseException, now: float | None) -> None:
        """Stop scheduling and answer every unanswered request with ``error``.

        ``now`` is None after a crash: the clock is not trusted then, and no cancellations are
        reported."""
        self._closing = True
        if self._scheduler is not None:
            self._scheduler.cancel()
        if self._alarm is not None:
            self._alarm.cancel()
        while self._queue:
            request = self._queue.popleft()
            self._queued -= request.size - request.taken
            if request.future.cancelled() and now is not None:
                self._notify(
                    self._observer.request_cancelled, now - request.admitted_at, request.size
                )
        self._head_deadline = None
        for request in list(self._live):
            if not request.future.done():
                request.future.set_exception(error)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._stopped.set()

    def _on_scheduler_exit(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        crash = task.exception()
        assert crash is not None
        logger.error("batcher %r scheduler crashed", self._name, exc_info=crash)
        self._crash = crash
        error = RuntimeError(f"batcher {self._name!r} scheduler crashed: {crash!r}")
        error.__cause__ = crash
        self._stop(error, None)

    def _notify(self, hook: Callable[..., None], *args: object) -> None:
        try:
            hook(*args)
        except Exception:
            logger.exception("batch observer hook %s failed", getattr(hook, "__name__", hook))


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
