"""Clocks for the serving layer: monotonic seconds that can be awaited.

Serving code never reads the wall clock (``time.time()`` jumps with NTP); it takes a ``Clock`` so
that tests can drive time by hand with ``FakeClock`` and stay exact and fast.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic time in seconds. Only differences and comparisons of ``now()`` mean anything."""

    def now(self) -> float:
        """The current time. Must be safe to call from any thread."""
        ...

    async def sleep_until(self, when: float) -> None:
        """Return once ``now() >= when`` (at once if that already holds). Cancellable."""
        ...


class MonotonicClock:
    """The real clock: ``time.monotonic()``, slept on with the running event loop."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, when: float) -> None:
        # Loop: an event loop may fire a timer a hair early; callers rely on now() >= when after.
        while (delay := when - time.monotonic()) > 0:
            await asyncio.sleep(delay)


class FakeClock:
    """A clock for tests: time stands still until ``advance()`` moves it.

    ``advance()`` wakes every ``sleep_until`` whose time has come; the woken tasks run at the
    event loop's next turns. Use it from the event loop's thread; ``now()`` may be read anywhere.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep_until(self, when: float) -> None:
        if when <= self._now:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (when, next(self._order), waiter))
        await waiter

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (>= 0) and wake the sleepers now due."""
        if not seconds >= 0:
            raise ValueError(f"FakeClock.advance needs seconds >= 0, got {seconds!r}")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, waiter = heapq.heappop(self._sleepers)
            if not waiter.done():  # a cancelled sleeper leaves a cancelled future behind
                waiter.set_result(None)

    @property
    def sleepers(self) -> int:
        """How many ``sleep_until`` calls are waiting (cancelled ones excluded)."""
        return sum(1 for _, _, waiter in self._sleepers if not waiter.done())
