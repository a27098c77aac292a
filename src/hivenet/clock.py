"""The one clock the I/O shell runs on: read it (`clock()`, seconds) and sleep on it
(`await clock.sleep(seconds)`).

Owns `Clock` (the protocol), `SYSTEM_CLOCK` (monotonic time, asyncio sleeps) and `ManualClock`
(time moves only when a test calls `advance`, which wakes every sleeper whose time has come).
The agent's loops (lease, publish retry, port reconcile, counters) and the store's
`LeaseKeeper` take one, so tests drive leases and timers by hand instead of sleeping for real;
give the store the same clock (`open_store(url, clock=...)`) and lease expiry follows it too.

The pure core never sees this module: it takes `now` as an argument (STYLE.md 2).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol, runtime_checkable

__all__ = ["SYSTEM_CLOCK", "Clock", "ManualClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    def __call__(self) -> float:
        """Now, in seconds (only differences mean anything)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once `seconds` have passed on this clock."""
        ...


class SystemClock:
    """Monotonic time; sleeps are asyncio's."""

    def __call__(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def __repr__(self) -> str:
        return "SYSTEM_CLOCK"


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """Time that moves only by `advance` (or by setting `now`, which wakes no sleeper)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting now."""
        return sum(1 for _deadline, _order, future in self._sleepers if not future.done())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), future))
        await future

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose time has come (they run at the
        next turn of the event loop)."""
        if seconds < 0:
            raise ValueError(f"seconds: {seconds} is negative (time does not go back)")
        self.now += seconds
        while self._sleepers and self._sleepers[0][0] <= self.now:
            _deadline, _order, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
