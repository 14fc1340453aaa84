"""Tests for adpredict.serving.batcher (and its clock module).

Real asyncio event loop, a fake model in the batcher's worker threads, and a ``FakeClock`` that
only moves when a test advances it. "Still pending" is asserted with ``asyncio.wait(timeout=...)``
on the real loop; results are awaited with generous timeouts that only bound a broken run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import random
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from adpredict.errors import DeadlineError, OverloadedError
from adpredict.serving.batcher import (
    Batcher,
    BatcherOptions,
    BatchObserver,
    BatchStats,
    Completed,
    LinearCostModel,
    RejectReason,
    Slice,
)
from adpredict.serving.clock import FakeClock, MonotonicClock

T0 = 1000.0  # fake clocks start here, so absolute and relative times differ
SETTLE_S = 0.05  # real seconds the loop gets before we say "still pending"
DONE_S = 5.0  # real seconds after which a test that should have finished fails


# --------------------------------------------------------------------------------- fakes


@dataclass(frozen=True)
class Payload:
    name: str
    values: np.ndarray  # what the fake model answers for each prediction


_bases = itertools.count(1)


def payload(name: str, size: int) -> Payload:
    """A payload whose predictions are distinct numbers, so reassembly is checkable."""
    return Payload(name, float(next(_bases) * 10_000) + np.arange(size, dtype=float))


class Boom(Exception):
    """The fake model's failure."""


class FakeModel:
    """Records every batch as [(name, start, stop), ...]; answers ``values[start:stop]``.

    ``gated``: each call blocks until ``release()``; ``entered`` gets the call's index when it
    starts. ``fail_if(slices)`` true -> raise Boom. ``drop_one`` returns one result too few.
    """

    def __init__(
        self,
        *,
        gated: bool = False,
        fail_if: Callable[[list[Slice[Payload]]], bool] | None = None,
        drop_one: bool = False,
    ) -> None:
        self.calls: list[list[tuple[str, int, int]]] = []
        self.entered: queue.Queue[int] = queue.Queue()
        self._gate = threading.Semaphore(0) if gated else None
        self._fail_if = fail_if
        self._drop_one = drop_one

    def __call__(self, slices: list[Slice[Payload]]) -> list[np.ndarray]:
        index = len(self.calls)
        self.calls.append([(s.payload.name, s.start, s.stop) for s in slices])
        self.entered.put(index)
        if self._gate is not None and not self._gate.acquire(timeout=DONE_S):
            raise TimeoutError("test never released the fake model")
        if self._fail_if is not None and self._fail_if(slices):
            raise Boom(f"batch {index} failed")
        results = [s.payload.values[s.start : s.stop] for s in slices]
        return results[:-1] if self._drop_one else results

    def release(self, n: int = 1) -> None:
        if self._gate is not None:
            self._gate.release(n)

    def open(self) -> None:
        """Let every present and future call through."""
        self.release(10_000)

    async def wait_entered(self) -> int:
        """Wait (real time) until a call has started; returns its index."""
        return await asyncio.to_thread(self.entered.get, True, DONE_S)

    def names(self) -> list[list[str]]:
        return [[name for name, _, _ in call] for call in self.calls]


class RecordingObserver(BatchObserver):
    def __init__(self) -> None:
        self.batches: list[BatchStats] = []
        self.rejected: list[tuple[RejectReason, int]] = []
        self.expired: list[tuple[float, int]] = []
        self.cancelled: list[tuple[float, int]] = []
        self._changed = asyncio.Event()

    def batch_completed(self, stats: BatchStats) -> None:
        self.batches.append(stats)
        self._changed.set()

    def request_rejected(self, reason: RejectReason, size: int) -> None:
        self.rejected.append((reason, size))

    def request_expired(self, queue_s: float, size: int) -> None:
        self.expired.append((queue_s, size))

    def request_cancelled(self, queue_s: float, size: int) -> None:
        self.cancelled.append((queue_s, size))

    async def wait_computed(self, batcher: Batcher[Payload, np.ndarray]) -> None:
        """Wait until no batch is in compute (each finishing batch reports here)."""

        async def _wait() -> None:
            while batcher.computing_batches:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(_wait(), DONE_S)

    async def wait_batches(self, n: int) -> None:
        async def _wait() -> None:
            while len(self.batches) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(_wait(), DONE_S)


@contextlib.asynccontextmanager
async def running(
    model: FakeModel,
    clock: FakeClock | MonotonicClock,
    observer: BatchObserver | None = None,
    **options: Any,
) -> AsyncIterator[Batcher[Payload, np.ndarray]]:
    batcher: Batcher[Payload, np.ndarray] = Batcher(
        model, BatcherOptions(**options), clock=clock, observer=observer, name="test"
    )
    batcher.start()
    try:
        yield batcher
    finally:
        model.open()
        await asyncio.wait_for(batcher.close(), DONE_S)


def submit(
    batcher: Batcher[Payload, np.ndarray], p: Payload, deadline: float | None = None
) -> asyncio.Task[Completed[np.ndarray]]:
    return asyncio.create_task(batcher.submit(p, len(p.values), deadline))


async def pending(*tasks: asyncio.Task[Any]) -> bool:
    """True if none of ``tasks`` finishes while the loop runs for SETTLE_S."""
    done, _ = await asyncio.wait(tasks, timeout=SETTLE_S)
    return not done


async def results(*tasks: asyncio.Task[Completed[np.ndarray]]) -> list[Completed[np.ndarray]]:
    return list(await asyncio.wait_for(asyncio.gather(*tasks), DONE_S))


async def failure(task: asyncio.Task[Any]) -> BaseException:
    await asyncio.wait({task}, timeout=DONE_S)
    assert task.done() and not task.cancelled()
    error = task.exception()
    assert error is not None, f"expected an error, got {task.result()!r}"
    return error


def refused(
    batcher: Batcher[Payload, np.ndarray], p: Payload, deadline: float | None = None
) -> BaseException:
    """Submit and return the error it raised before ever suspending, i.e. refused at once."""
    coro = batcher.submit(p, len(p.values), deadline)
    try:
        coro.send(None)
    except StopIteration:
        pytest.fail("submit returned without an error")
    except Exception as error:
        return error
    coro.close()
    pytest.fail("submit was admitted (it suspended) instead of being refused at once")


def assert_answer(completed: Completed[np.ndarray], p: Payload) -> None:
    np.testing.assert_array_equal(completed.result, p.values)


# ---------------------------------------------------------------------------------- clock


@pytest.mark.asyncio
async def test_fake_clock_wakes_sleepers_when_their_time_comes() -> None:
    clock = FakeClock(T0)
    early = asyncio.create_task(clock.sleep_until(T0 + 1))
    late = asyncio.create_task(clock.sleep_until(T0 + 2))
    gone = asyncio.create_task(clock.sleep_until(T0 + 1))
    await asyncio.sleep(0)
    assert clock.sleepers == 3
    gone.cancel()
    clock.advance(0.5)
    assert await pending(early, late)
    clock.advance(0.5)
    await asyncio.wait_for(early, DONE_S)
    assert await pending(late)
    clock.advance(5)
    await asyncio.wait_for(late, DONE_S)
    assert clock.now() == T0 + 6 and clock.sleepers == 0
    await clock.sleep_until(T0)  # already due: returns at once
    with pytest.raises(ValueError, match="-1"):
        clock.advance(-1)


# -------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 0),
        ("max_batch_size", 2.5),
        ("max_wait_s", -0.001),
        ("max_wait_s", float("nan")),
        ("queue_limit", 0),
        ("safety_margin_s", float("inf")),
        ("compute_threads", 0),
        ("cost_window", 1),
        ("prior_fixed_s", -1.0),
        ("prior_per_item_s", "fast"),
        ("prior_weight", 0.0),
        ("batching", "yes"),
    ],
)
def test_options_reject_bad_values_and_show_them(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as caught:
        BatcherOptions(**{field: value})  # type: ignore[arg-type]
    assert repr(value) in str(caught.value)


def test_options_queue_limit_must_hold_a_full_batch_unless_batching_is_off() -> None:
    with pytest.raises(ValueError, match="queue_limit"):
        BatcherOptions(max_batch_size=64, queue_limit=32)
    BatcherOptions(max_batch_size=64, queue_limit=32, batching=False)


# ----------------------------------------------------------------------------- closing


@pytest.mark.asyncio
async def test_closes_when_full() -> None:
    model, clock, observer = FakeModel(), FakeClock(T0), RecordingObserver()
    async with running(model, clock, observer, max_batch_size=4, max_wait_s=1.0) as batcher:
        a, b, c = payload("a", 1), payload("b", 1), payload("c", 2)
        ta, tb = submit(batcher, a), submit(batcher, b)
        assert await pending(ta, tb)
        assert model.calls == []
        tc = submit(batcher, c)
        done = await results(ta, tb, tc)
    assert model.calls == [[("a", 0, 1), ("b", 0, 1), ("c", 0, 2)]]
    for completed, p in zip(done, (a, b, c), strict=True):
        assert_answer(completed, p)
        assert (completed.batch_predictions, completed.batch_requests) == (4, 3)
    assert [s.reason for s in observer.batches] == ["full"]


@pytest.mark.asyncio
async def test_closes_after_max_wait() -> None:
    model, clock, observer = FakeModel(), FakeClock(T0), RecordingObserver()
    async with running(model, clock, observer, max_batch_size=64, max_wait_s=0.002) as batcher:
        a = payload("a", 3)
        task = submit(batcher, a)
        assert await pending(task)
        clock.advance(0.001)
        assert await pending(task)
        assert model.calls == []
        clock.advance(0.001)
        (completed,) = await results(task)
    assert_answer(completed, a)
    assert model.calls == [[("a", 0, 3)]]
    assert completed.queue_s == pytest.approx(0.002)
    assert [s.reason for s in observer.batches] == ["max_wait"]


DEADLINE_OPTIONS = dict(
    max_batch_size=1024,
    max_wait_s=0.010,
    safety_margin_s=0.001,
    prior_fixed_s=0.0003,
    prior_per_item_s=0.00001,
    prior_weight=1e9,  # keep the prior: the fake clock makes every batch take 0 s
)


@pytest.mark.asyncio
async def test_deadline_closes_before_max_wait_and_bigger_batches_close_sooner() -> None:
    model, clock, observer = FakeModel(), FakeClock(T0), RecordingObserver()
    async with running(model, clock, observer, **DEADLINE_OPTIONS) as batcher:
        # 100 predictions: compute 0.3 + 1.0 ms; close at 4 - 1 - 1.3 = 1.7 ms.
        assert batcher.predicted_compute_s(100) == pytest.approx(0.0013)
        alone = submit(batcher, payload("alone", 100), deadline=T0 + 0.004)
        assert await pending(alone)
        clock.advance(0.0016)
        assert await pending(alone)
        clock.advance(0.0002)
        await results(alone)
        assert [s.reason for s in observer.batches] == ["deadline"]

        # Same deadline, but a second request doubles the batch: close at 4 - 1 - 2.3 = 0.7 ms.
        t1 = clock.now()
        first = submit(batcher, payload("first", 100), deadline=t1 + 0.004)
        second = submit(batcher, payload("second", 100))
        assert await pending(first, second)
        clock.advance(0.0006)
        assert await pending(first, second)
        clock.advance(0.0002)
        await results(first, second)
    assert model.names() == [["alone"], ["first", "second"]]
    assert [s.reason for s in observer.batches] == ["deadline", "deadline"]


@pytest.mark.asyncio
async def test_a_later_request_with_a_tighter_deadline_pulls_the_close_earlier() -> None:
    model, clock, observer = FakeModel(), FakeClock(T0), RecordingObserver()
    async with running(model, clock, observer, **DEADLINE_OPTIONS) as batcher:
        relaxed = submit(batcher, payload("relaxed", 10))
        assert await pending(relaxed)
        # 20 predictions: compute 0.5 ms; tight closes at 0.05 + 3 - 1 - 0.5 = 1.55 ms.
        clock.advance(0.00005)
        tight = submit(batcher, payload("tight", 10), deadline=clock.now() + 0.003)
        assert await pending(relaxed, tight)
        clock.advance(0.0014)
        assert await pending(relaxed, tight)
        clock.advance(0.0002)
        await results(relaxed, tight)
    assert model.names() == [["relaxed", "tight"]]
    assert observer.batches[0].reason == "deadline"


# ---------------------------------------------------------------------------- splitting


@pytest.mark.asyncio
async def test_oversized_request_is_split_and_reassembled_in_order() -> None:
    model, clock, observer = FakeModel(), FakeClock(T0), RecordingObserver()
    async with running(model, clock, observer, max_batch_size=4, max_wait_s=0.002) as batcher:
        big = payload("big", 10)
        task = submit(batcher, big)
        await observer.wait_batches(2)
        assert await pending(task)  # two full batches ran; the last 2 predictions wait
        assert model.calls == [[("big", 0, 4)], [("big", 4, 8)]]
        clock.advance(0.002)
        (completed,) = await results(task)
    assert model.calls[2] == [("big", 8, 10)]
    assert_answer(completed, big)
    assert completed.batch_predictions == 2


@pytest.mark.asyncio
async def test_split_request_shares_batches_with_its_neighbours() -> None:
    model, clock = FakeModel(), FakeClock(T0)
    async with running(model, clock, max_batch_size=4, max_wait_s=0.002) as batcher:
        x, y, z = payload("x", 3), payload("y", 6), payload("z", 2)
        tasks = [submit(batcher, p) for p in (x, y, z)]
        assert await pending(*tasks[1:])  # x rode in the first full batch; y's tail waits
        clock.advance(0.002)
        done = await results(*tasks)
    assert model.calls == [
        [("x", 0, 3), ("y", 0, 1)],
        [("y", 1, 5)],
        [("y", 5, 6), ("z", 0, 2)],
    ]
    for completed, p in zip(done, (x, y, z), strict=True):
        assert_answer(completed, p)
    assert (done[1].batch_predictions, done[1].batch_requests) == (3, 2)


# ---------------------------------------------------------------------------- admission


@pytest.mark.asyncio
async def test_full_queue_rejects_at_once() -> None:
    model, clock, observer = FakeModel(), FakeClock(T0), RecordingObserver()
    options = dict(max_batch_size=8, queue_limit=8, max_wait_s=1.0)
    async with running(model, clock, observer, **options) as batcher:
        first = submit(batcher, payload("first", 5))
        assert await pending(first)
        error = refused(batcher, payload("too-many", 4))
        assert isinstance(error, OverloadedError) and "5 of 8 predictions queued" in str(error)
        assert isinstance(refused(batcher, payload("huge", 9)), OverloadedError)
        assert batcher.queued_predictions == 5
        last = submit(batcher, payload("fits", 3))
        await results(first, last)
    assert observer.rejected == [("queue_full", 4), ("queue_full", 9)]
    assert model.names() == [["first", "fits"]]


@pytest.mark.asyncio
async def test_rejects_when_predicted_wait_exceeds_the_deadline() -> None:
    model, clock, observer = FakeModel(gated=True), FakeClock(T0), RecordingObserver()
    options = dict(
        max_batch_size=4,
        max_wait_s=0.001,
        safety_margin_s=0.0,
        prior_fixed_s=0.001,
        prior_per_item_s=0.0,
        prior_weight=1e9,
    )
    async with running(model, clock, observer, **options) as batcher:
        # Alone it takes 1 ms to compute.
        error = refused(batcher, payload("hopeless", 1), deadline=T0 + 0.0005)
        assert isinstance(error, DeadlineError) and "predicted in 1.000 ms" in str(error)
        assert isinstance(refused(batcher, payload("late", 1), deadline=T0 - 1), DeadlineError)
        # Occupy the only thread until T0 + 1 ms (predicted): a new request ends at 2 ms.
        busy = submit(batcher, payload("busy", 4))
        await model.wait_entered()
        error = refused(batcher, payload("behind", 1), deadline=T0 + 0.0015)
        assert isinstance(error, DeadlineError) and "predicted in 2.000 ms" in str(error)
        # Behind a full queued batch as well: 3 ms.
        queued = submit(batcher, payload("queued", 4))
        assert await pending(queued)
        error = refused(batcher, payload("behind2", 1), deadline=T0 + 0.0025)
        assert isinstance(error, DeadlineError) and "predicted in 3.000 ms" in str(error)
        fits = submit(batcher, payload("fits", 1), deadline=T0 + 0.0031)
        assert await pending(fits)
        model.open()
        await results(busy, queued)
        clock.advance(0.001)  # max wait for the last one
        await results(fits)
    assert [reason for reason, _ in observer.rejected] == ["deadline"] * 4
    assert model.names() == [["busy"], ["queued"], ["fits"]]


@pytest.mark.asyncio
async def test_request_whose_deadline_passes_in_the_queue_is_never_computed() -> None:
    model, clock, observer = FakeModel(gated=True), FakeClock(T0), RecordingObserver()
    async with running(model, clock, observer, max_batch_size=4, max_wait_s=0.002) as batcher:
        busy = submit(batcher, payload("busy", 4))
        await model.wait_entered()
        doomed = submit(batcher, payload("doomed", 2), deadline=T0 + 0.005)
        patient = submit(batcher, payload("patient", 1))
        assert await pending(doomed, patient)
        clock.advance(0.010)
        assert await pending(doomed, patient)  # the thread is still busy
        model.open()
        error = await failure(doomed)
        await results(busy, patient)
    assert isinstance(error, DeadlineError)
    assert model.names() == [["busy"], ["patient"]]
    assert observer.expired == [(pytest.approx(0.010), 2)]


@pytest.mark.asyncio
async def test_cancelled_request_never_reaches_compute_and_others_are_served() -> None:
    model, clock, observer = FakeModel(gated=True), FakeClock(T0), RecordingObserver()
    async with running(model, clock, observer, max_batch_size=8, max_wait_s=0.002) as batcher:
        busy = submit(batcher, payload("busy", 8))
        await model.wait_entered()
        gone, kept = payload("gone", 3), payload("kept", 2)
        t_gone, t_kept = submit(batcher, gone), submit(batcher, kept)
        assert await pending(t_gone, t_kept)
        assert batcher.in_flight_requests == 3
        t_gone.cancel()
        clock.advance(0.002)
        model.open()
        (completed,) = await results(t_kept)
        await results(busy)
        assert t_gone.cancelled()
        assert batcher.in_flight_requests == 0 and batcher.queued_predictions == 0
    assert_answer(completed, kept)
    assert model.names() == [["busy"], ["kept"]]
    assert observer.cancelled == [(pytest.approx(0.002), 3)]


@pytest.mark.asyncio
async def test_submit_checks_its_arguments_and_the_lifecycle() -> None:
    batcher: Batcher[Payload, np.ndarray] = Batcher(FakeModel(), BatcherOptions())
    with pytest.raises(RuntimeError, match="start"):
        await batcher.submit(payload("early", 1), 1)
    batcher.start()
    with pytest.raises(ValueError, match="0"):
        await batcher.submit(payload("empty", 0), 0)
    with pytest.raises(RuntimeError, match="already started"):
        batcher.start()
    await batcher.close()


# ----------------------------------------------------------------------------- failures


class SchedulerBreakingClock(FakeClock):
    """A FakeClock that raises when the batcher's scheduler task reads it, once ``broken``."""

    broken = False

    def now(self) -> float:
        if self.broken and threading.current_thread() is threading.main_thread():
            task = asyncio.current_task()
            if task is not None and task.get_name() == "batcher-test":
                raise ArithmeticError("clock broke")
        return super().now()


@pytest.mark.asyncio
async def test_a_crashed_scheduler_answers_every_request_and_refuses_new_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, clock = FakeModel(), SchedulerBreakingClock(T0)
    async with running(model, clock, max_batch_size=64, max_wait_s=0.002) as batcher:
        queued = submit(batcher, payload("queued", 2))
        assert await pending(queued)
        clock.broken = True
        clock.advance(0.002)  # the scheduler wakes up to close the batch and crashes
        error = await failure(queued)
        assert isinstance(error, RuntimeError) and "crashed" in str(error)
        assert isinstance(error.__cause__, ArithmeticError)
        late = refused(batcher, payload("late", 1))
        assert isinstance(late, RuntimeError) and isinstance(late.__cause__, ArithmeticError)
        assert batcher.queued_predictions == 0
    assert model.calls == []
    assert "scheduler crashed" in caplog.text


@pytest.mark.asyncio
async def test_failing_batch_fails_only_its_requests_and_the_next_batch_succeeds() -> None:
    def bad_in(slices: list[Slice[Payload]]) -> bool:
        return any(s.payload.name == "bad" for s in slices)

    model, clock, observer = FakeModel(fail_if=bad_in), FakeClock(T0), RecordingObserver()
    async with running(model, clock, observer, max_batch_size=2, max_wait_s=1.0) as batcher:
        t_bad, t_peer = submit(batcher, payload("bad", 1)), submit(batcher, payload("peer", 1))
        errors = [await failure(t_bad), await failure(t_peer)]
        good = [payload("next1", 1), payload("next2", 1)]
        done = await results(*(submit(batcher, p) for p in good))
    assert all(isinstance(e, Boom) and "batch 0" in str(e) for e in errors)
    for completed, p in zip(done, good, strict=True):
        assert_answer(completed, p)
    assert [type(s.error) for s in observer.batches] == [Boom, type(None)]


@pytest.mark.asyncio
async def test_wrong_number_of_results_is_an_error_for_that_batch() -> None:
    model, clock = FakeModel(drop_one=True), FakeClock(T0)
    async with running(model, clock, max_batch_size=2, max_wait_s=1.0) as batcher:
        tasks = [submit(batcher, payload(name, 1)) for name in ("a", "b")]
        errors = [await failure(task) for task in tasks]
    assert all(isinstance(e, RuntimeError) for e in errors)
    assert "returned 1 results for 2 slices" in str(errors[0])


@pytest.mark.asyncio
async def test_failure_of_one_slice_fails_the_whole_split_request_once() -> None:
    def second_batch(slices: list[Slice[Payload]]) -> bool:
        return slices[0].start == 2

    model, clock = FakeModel(fail_if=second_batch), FakeClock(T0)
    async with running(model, clock, max_batch_size=2, max_wait_s=0.002) as batcher:
        task = submit(batcher, payload("split", 6))
        error = await failure(task)
    assert isinstance(error, Boom)
    assert model.calls == [[("split", 0, 2)], [("split", 2, 4)]]  # 4:6 is never computed


# ---------------------------------------------------------------------------- cost model


def test_cost_model_starts_at_the_prior_and_fits_a_line() -> None:
    model = LinearCostModel(
        fixed_s=0.0003, per_item_s=1.5e-6, window=50, prior_weight=1e-6, reference_n=1024
    )
    assert model.predict(1000) == pytest.approx(0.0003 + 0.0015)
    for n in (10, 100, 300, 700, 1000):
        model.observe(n, 2e-6 * n + 0.0005)
    assert model.per_item_s == pytest.approx(2e-6, rel=1e-4)
    assert model.fixed_s == pytest.approx(0.0005, rel=1e-4)


def test_cost_model_forgets_batches_older_than_its_window() -> None:
    model = LinearCostModel(
        fixed_s=0.0003, per_item_s=1.5e-6, window=10, prior_weight=1e-6, reference_n=1024
    )
    for n in range(10, 110, 10):
        model.observe(n, 1e-5 * n + 0.002)  # a slow machine, later replaced
    for n in range(10, 110, 10):
        model.observe(n, 1e-6 * n + 0.0001)
    assert model.per_item_s == pytest.approx(1e-6, rel=1e-4)
    assert model.fixed_s == pytest.approx(0.0001, rel=1e-4)


def test_cost_model_with_one_batch_size_matches_it_and_keeps_a_sane_shape() -> None:
    model = LinearCostModel(
        fixed_s=0.0003, per_item_s=1.5e-6, window=10, prior_weight=2.0, reference_n=1024
    )
    for _ in range(10):
        model.observe(1024, 0.003)  # always full batches, on a slower machine than the prior
    # The prior still counts as one batch at 1024 (0.001836 s) next to the ten measured.
    assert model.predict(1024) == pytest.approx((10 * 0.003 + 0.001836) / 11)
    assert 0 < model.predict(1) < model.predict(512) < model.predict(1024)
    single = LinearCostModel(
        fixed_s=0.0003, per_item_s=1.5e-6, window=10, prior_weight=1e-6, reference_n=1
    )
    single.observe(1, 0.003)  # max_batch_size=1: every point at n = 1; scale the prior
    assert single.predict(1) == pytest.approx(0.003, rel=1e-4)
    assert single.per_item_s / single.fixed_s == pytest.approx(1.5e-6 / 0.0003)


def test_cost_model_reports_the_largest_batch_within_its_window() -> None:
    model = LinearCostModel(
        fixed_s=0.0003, per_item_s=1.5e-6, window=3, prior_weight=2.0, reference_n=4096
    )
    assert model.largest_recent() == 0  # the prior's pseudo-batches do not count
    for n in (900, 300, 100):
        model.observe(n, 1e-3)
    assert model.largest_recent() == 900
    model.observe(200, 1e-3)  # 900 falls out of the window of three
    assert model.largest_recent() == 300


def test_cost_model_keeps_both_coefficients_non_negative() -> None:
    shrinking = LinearCostModel(
        fixed_s=0.0, per_item_s=0.0, window=10, prior_weight=1e-6, reference_n=100
    )
    for n, t in ((10, 0.003), (50, 0.002), (100, 0.001)):
        shrinking.observe(n, t)
    assert shrinking.per_item_s == 0.0 and shrinking.fixed_s == pytest.approx(0.002, rel=1e-3)
    steep = LinearCostModel(
        fixed_s=0.0, per_item_s=0.0, window=10, prior_weight=1e-6, reference_n=100
    )
    for n, t in ((50, 0.0001), (100, 0.0010)):
        steep.observe(n, t)
    assert steep.fixed_s == 0.0 and steep.per_item_s > 0
    assert min(steep.predict(1), shrinking.predict(1000)) >= 0


@pytest.mark.asyncio
async def test_batcher_learns_compute_cost_from_measured_batches() -> None:
    per_item, fixed = 4e-6, 0.0007  # "this machine": far from the prior
    model, clock = FakeModel(gated=True), FakeClock(T0)
    options = dict(max_batch_size=1024, max_wait_s=0.002, cost_window=8, prior_weight=1e-6)
    async with running(model, clock, **options) as batcher:
        assert batcher.predicted_compute_s(1000) == pytest.approx(0.0003 + 0.0015)
        for n in (10, 50, 100, 200, 400):
            task = submit(batcher, payload(f"n{n}", n))
            assert await pending(task)
            clock.advance(0.002)  # max wait: the batch starts
            await model.wait_entered()
            clock.advance(per_item * n + fixed)  # ...and takes this long
            model.release()
            (completed,) = await results(task)
            assert completed.compute_s == pytest.approx(per_item * n + fixed)
        predicted = batcher.predicted_compute_s(1000)
    assert predicted == pytest.approx(per_item * 1000 + fixed, rel=1e-3)


# ---------------------------------------------------------------------------- lifecycle


@pytest.mark.asyncio
async def test_close_drains_queued_work_then_rejects_new_requests() -> None:
    model, clock, observer = FakeModel(), FakeClock(T0), RecordingObserver()
    batcher: Batcher[Payload, np.ndarray] = Batcher(
        model, BatcherOptions(max_batch_size=64, max_wait_s=1.0), clock=clock, observer=observer
    )
    batcher.start()
    queued = [payload(name, 2) for name in "abc"]
    tasks = [submit(batcher, p) for p in queued]
    assert await pending(*tasks)
    await asyncio.wait_for(batcher.close(), DONE_S)  # no clock advance needed
    for completed, p in zip(await results(*tasks), queued, strict=True):
        assert_answer(completed, p)
    assert [s.reason for s in observer.batches] == ["drain"]
    error = refused(batcher, payload("late", 1))
    assert isinstance(error, OverloadedError) and "shutting down" in str(error)
    assert observer.rejected == [("shutting_down", 1)]
    assert batcher.queued_predictions == 0 and batcher.in_flight_requests == 0
    await batcher.close()  # a second close is harmless


@pytest.mark.asyncio
async def test_close_gives_up_after_grace_and_answers_everyone() -> None:
    model, clock, observer = FakeModel(gated=True), FakeClock(T0), RecordingObserver()
    batcher: Batcher[Payload, np.ndarray] = Batcher(
        model,
        BatcherOptions(max_batch_size=4, max_wait_s=1.0),
        clock=clock,
        observer=observer,
    )
    batcher.start()
    stuck = submit(batcher, payload("stuck", 4))
    await model.wait_entered()
    waiting = submit(batcher, payload("waiting", 4))
    closing = asyncio.create_task(batcher.close(grace_s=0.5))
    assert await pending(closing, stuck, waiting)
    clock.advance(0.5)
    await asyncio.wait_for(closing, DONE_S)
    for task in (stuck, waiting):
        assert isinstance(await failure(task), OverloadedError)
    model.open()
    await observer.wait_batches(1)  # the abandoned thread finishes; its result is ignored
    assert model.names() == [["stuck"]]
    assert batcher.in_flight_requests == 0 and batcher.queued_predictions == 0


@pytest.mark.asyncio
async def test_no_batching_computes_each_request_alone_and_whole() -> None:
    model, clock, observer = FakeModel(), FakeClock(T0), RecordingObserver()
    options = dict(batching=False, max_batch_size=4, queue_limit=1000, max_wait_s=1.0)
    async with running(model, clock, observer, **options) as batcher:
        requests = [payload("one", 1), payload("k32", 32), payload("k300", 300)]
        done = await results(*(submit(batcher, p) for p in requests))
    assert model.calls == [[("one", 0, 1)], [("k32", 0, 32)], [("k300", 0, 300)]]
    for completed, p in zip(done, requests, strict=True):
        assert_answer(completed, p)
        assert completed.batch_requests == 1
    assert [s.reason for s in observer.batches] == ["full"] * 3


# ------------------------------------------------------------------------------ under load


@pytest.mark.asyncio
async def test_requests_accumulate_into_the_next_batch_while_threads_are_busy() -> None:
    model, clock = FakeModel(gated=True), FakeClock(T0)
    async with running(model, clock, max_batch_size=1024, max_wait_s=0.002) as batcher:
        first = submit(batcher, payload("first", 1))
        assert await pending(first)
        clock.advance(0.002)
        await model.wait_entered()
        later = [submit(batcher, payload(f"r{i}", 1)) for i in range(50)]
        assert await pending(*later)
        clock.advance(0.010)  # way past max wait, but the only thread is busy
        assert await pending(*later)
        assert len(model.calls) == 1
        assert batcher.queued_predictions == 50
        model.open()
        done = await results(first, *later)
    assert len(model.calls) == 2 and len(model.calls[1]) == 50
    assert done[-1].batch_requests == 50


@pytest.mark.asyncio
async def test_compute_threads_run_batches_concurrently() -> None:
    model, clock = FakeModel(gated=True), FakeClock(T0)
    options = dict(max_batch_size=2, max_wait_s=1.0, compute_threads=2)
    async with running(model, clock, **options) as batcher:
        tasks = [submit(batcher, payload(f"r{i}", 2)) for i in range(3)]
        await model.wait_entered()
        await model.wait_entered()  # two batches in compute at once
        assert await pending(*tasks)
        assert len(model.calls) == 2  # the third waits for a thread
        model.release()
        await model.wait_entered()
        model.open()
        await results(*tasks)
    assert len(model.calls) == 3


@pytest.mark.asyncio
async def test_many_concurrent_requests_need_far_fewer_compute_calls() -> None:
    model, clock, observer = FakeModel(), FakeClock(T0), RecordingObserver()
    async with running(model, clock, observer, max_batch_size=64, max_wait_s=0.002) as batcher:
        requests = [payload(f"r{i}", 1) for i in range(1000)]
        tasks = [submit(batcher, p) for p in requests]
        await observer.wait_batches(15)
        assert await pending(tasks[-1])  # 15 full batches ran; 40 wait for company
        assert len(model.calls) == 15
        clock.advance(0.002)
        done = await results(*tasks)
    assert [len(call) for call in model.calls] == [64] * 15 + [40]
    for completed, p in zip(done, requests, strict=True):
        assert_answer(completed, p)


@pytest.mark.asyncio
async def test_observer_sees_batch_stats_and_gauges_track_the_queue() -> None:
    model, clock, observer = FakeModel(gated=True), FakeClock(T0), RecordingObserver()
    async with running(model, clock, observer, max_batch_size=16, max_wait_s=0.002) as batcher:
        a = submit(batcher, payload("a", 3))
        assert await pending(a)
        clock.advance(0.001)
        b = submit(batcher, payload("b", 4))
        assert await pending(a, b)
        assert (batcher.queued_predictions, batcher.in_flight_requests) == (7, 2)
        clock.advance(0.001)
        await model.wait_entered()
        assert (batcher.queued_predictions, batcher.in_flight_requests) == (0, 2)
        assert batcher.computing_batches == 1
        clock.advance(0.0005)
        model.release()
        await results(a, b)
        assert (batcher.queued_predictions, batcher.in_flight_requests) == (0, 0)
    (stats,) = observer.batches
    assert (stats.predictions, stats.requests, stats.reason) == (7, 2, "max_wait")
    assert stats.queue_s == (pytest.approx(0.002), pytest.approx(0.001))
    assert stats.max_queue_s == pytest.approx(0.002)
    assert stats.compute_s == pytest.approx(0.0005) and stats.error is None


class _BrokenObserver(BatchObserver):
    def batch_completed(self, stats: BatchStats) -> None:
        raise ValueError("metrics bug")


@pytest.mark.asyncio
async def test_a_raising_observer_does_not_break_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, clock = FakeModel(), FakeClock(T0)
    async with running(model, clock, _BrokenObserver(), max_batch_size=1) as batcher:
        done = await results(submit(batcher, payload("a", 1)), submit(batcher, payload("b", 1)))
    assert len(done) == 2 and len(model.calls) == 2
    assert "batch_completed failed" in caplog.text and "metrics bug" in caplog.text


# ------------------------------------------------------------------------------- invariant


@pytest.mark.asyncio
async def test_stress_every_request_is_answered_exactly_once() -> None:
    rng = random.Random(20240601)
    loop_errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: loop_errors.append(context))

    def has_bad(slices: list[Slice[Payload]]) -> bool:
        return any(s.payload.name.startswith("bad") for s in slices)

    model, clock, observer = FakeModel(fail_if=has_bad), FakeClock(T0), RecordingObserver()
    options = dict(
        max_batch_size=64,
        max_wait_s=0.002,
        queue_limit=128,
        compute_threads=2,
        safety_margin_s=0.0005,
    )
    submitted: dict[asyncio.Task[Completed[np.ndarray]], Payload] = {}
    async with running(model, clock, observer, **options) as batcher:
        for i in range(600):
            roll = rng.random()
            live = [task for task in submitted if not task.done()]
            if roll < 0.5:
                name = f"bad{i}" if rng.random() < 0.05 else f"ok{i}"
                p = payload(name, rng.choice((1, 1, 1, 5, 32, 100)))
                deadline = rng.choice((None, clock.now() + rng.uniform(0.0, 0.010)))
                submitted[submit(batcher, p, deadline)] = p
            elif roll < 0.6 and live:
                rng.choice(live).cancel()
            elif roll < 0.85:
                clock.advance(rng.uniform(0.0, 0.001))
            elif roll < 0.95:
                # Let every batch in compute finish, so that the mix of outcomes does not hinge
                # on how fast this machine's threads are compared to this loop.
                await observer.wait_computed(batcher)
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
        for _ in range(500):
            live = [task for task in submitted if not task.done()]
            if not live:
                break
            clock.advance(0.002)
            await asyncio.wait(live, timeout=0.01)
    assert all(task.done() for task in submitted)
    assert batcher.queued_predictions == 0 and batcher.in_flight_requests == 0
    assert batcher.computing_batches == 0
    assert loop_errors == []  # e.g. no InvalidStateError from setting a future twice

    computed: dict[str, list[tuple[int, int]]] = {}
    for call in model.calls:
        for name, start, stop in call:
            computed.setdefault(name, []).append((start, stop))
    outcomes: dict[str, int] = {}
    for task, p in submitted.items():
        pieces = computed.get(p.name, [])
        covered = [i for start, stop in pieces for i in range(start, stop)]
        assert len(covered) == len(set(covered))  # no prediction computed twice
        if task.cancelled():
            kind = "cancelled"
        elif (error := task.exception()) is not None:
            assert isinstance(error, OverloadedError | DeadlineError | Boom), error
            kind = type(error).__name__
            if isinstance(error, Boom):
                assert any(
                    p.name in names and any(n.startswith("bad") for n in names)
                    for names in model.names()
                )
        else:
            kind = "ok"
            assert_answer(task.result(), p)
            assert sorted(covered) == list(range(len(p.values)))  # every prediction, once
        outcomes[kind] = outcomes.get(kind, 0) + 1
    assert {"ok", "cancelled", "OverloadedError", "DeadlineError", "Boom"} <= outcomes.keys(), (
        outcomes
    )


# ------------------------------------------------------------------------------ real clock


@pytest.mark.asyncio
async def test_with_the_real_monotonic_clock() -> None:
    model, clock = FakeModel(), MonotonicClock()
    when = clock.now() + 0.002
    await clock.sleep_until(when)
    assert clock.now() >= when
    async with running(model, clock, max_batch_size=64, max_wait_s=0.005) as batcher:
        started = clock.now()
        requests = [payload(f"r{i}", 3) for i in range(5)]
        done = await results(*(submit(batcher, p) for p in requests))
        elapsed = clock.now() - started
        far = await results(submit(batcher, payload("deadline", 2), deadline=clock.now() + 1.0))
    assert elapsed >= 0.005  # closed by max wait, not before
    assert model.names()[0] == [p.name for p in requests]
    for completed, p in zip(done, requests, strict=True):
        assert_answer(completed, p)
        assert completed.queue_s >= 0.005 - 1e-6 and completed.compute_s >= 0
    assert far[0].queue_s < 1.0


@pytest.mark.asyncio
async def test_one_slow_batch_does_not_lock_the_batcher_into_refusing_everything() -> None:
    # Regression: a single slow batch (a CPU stall) made the cost model predict more than any
    # deadline; every later request was refused at admission, so no batch ever ran again to
    # correct the estimate. An idle batcher now admits, measures, and recovers.
    model, clock = FakeModel(gated=True), FakeClock(T0)
    options = dict(max_batch_size=64, max_wait_s=0.0, cost_window=4, prior_weight=1e-6)
    async with running(model, clock, **options) as batcher:
        slow = submit(batcher, payload("slow", 32))
        await model.wait_entered()
        clock.advance(0.2)  # the stall
        model.release()
        await results(slow)
        assert batcher.predicted_compute_s(32) > 0.05
        for i in range(4):
            task = submit(batcher, payload(f"r{i}", 32), deadline=clock.now() + 0.05)
            await model.wait_entered()  # admitted and computing, not refused
            clock.advance(0.001)
            model.release()
            (completed,) = await results(task)
            assert completed.compute_s == pytest.approx(0.001)
        assert batcher.predicted_compute_s(32) < 0.05  # the estimate recovered
        # While busy, a hopeless request is still refused at once.
        busy = submit(batcher, payload("busy", 32))
        await model.wait_entered()
        batcher_error = refused(batcher, payload("late", 32), deadline=clock.now() + 1e-6)
        assert isinstance(batcher_error, DeadlineError)
        clock.advance(0.001)
        model.release()
        await results(busy)


@pytest.mark.asyncio
async def test_check_refuses_as_submit_would_without_queueing() -> None:
    model, clock, observer = FakeModel(gated=True), FakeClock(T0), RecordingObserver()
    options = dict(max_batch_size=4, queue_limit=4, max_wait_s=0.0, prior_fixed_s=0.001)
    async with running(model, clock, observer, **options) as batcher:
        batcher.check(4, deadline=T0 + 1)  # fits: nothing raised, nothing queued
        assert batcher.queued_predictions == 0 and batcher.in_flight_requests == 0
        with pytest.raises(DeadlineError, match="predicted"):
            batcher.check(1, deadline=T0 + 0.0001)
        busy = submit(batcher, payload("busy", 4))
        await model.wait_entered()
        queued = submit(batcher, payload("queued", 4))
        assert await pending(queued)
        with pytest.raises(OverloadedError, match="queue full"):
            batcher.check(1)
        assert batcher.queued_predictions == 4  # the checks queued nothing
        model.open()
        await results(busy, queued)
    # Each refusal is reported once, as submit reports it.
    assert [reason for reason, _ in observer.rejected] == ["deadline", "queue_full"]


@pytest.mark.asyncio
async def test_enqueue_after_check_admits_once_and_answers_through_its_future() -> None:
    model, clock, observer = FakeModel(), FakeClock(T0), RecordingObserver()
    async with running(model, clock, observer, max_batch_size=8, max_wait_s=0.0) as batcher:
        p = payload("checked", 4)
        admitted_at = batcher.check(4, deadline=T0 + 1)
        assert admitted_at == T0
        clock.advance(0.0005)  # (decoding, say)
        future = batcher.enqueue(p, 4, T0 + 1, admitted_at=admitted_at)
        completed = await asyncio.wait_for(future, 5)
        assert_answer(completed, p)
        assert completed.queue_s == pytest.approx(0.0005)  # from the check, not the enqueue
        # Withdrawn by cancelling its future before its batch closes: never computed.
        withdrawn = batcher.enqueue(payload("withdrawn", 4), 4, T0 + 1)
        withdrawn.cancel()
        await asyncio.sleep(0.01)
        assert batcher.in_flight_requests == 0 and batcher.queued_predictions == 0
    assert model.names() == [["checked"]]
    assert observer.rejected == [] and len(observer.cancelled) == 1
