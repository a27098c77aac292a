"""`hivenet.clock`: a ManualClock wakes exactly the sleepers whose time has come, in order;
the system clock is a `Clock` too."""

from __future__ import annotations

import asyncio

import pytest

from hivenet.clock import SYSTEM_CLOCK, Clock, ManualClock


def test_advance_wakes_the_due_sleepers_in_deadline_order_and_no_others() -> None:
    async def body() -> None:
        clock = ManualClock(start=100.0)
        woke: list[str] = []

        async def sleeper(name: str, seconds: float) -> None:
            await clock.sleep(seconds)
            woke.append(f"{name}@{clock()}")

        tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("b", 2.0), ("a", 1.0), ("c", 5))]
        await asyncio.sleep(0)
        assert clock.sleepers == 3
        clock.advance(2.5)
        await asyncio.sleep(0)
        assert woke == ["a@102.5", "b@102.5"]
        assert clock.sleepers == 1
        clock.advance(2.5)
        await asyncio.gather(*tasks)
        assert woke[-1] == "c@105.0"

    asyncio.run(body())


def test_a_cancelled_sleeper_is_not_counted_and_time_never_goes_back() -> None:
    async def body() -> None:
        clock = ManualClock()
        task = asyncio.create_task(clock.sleep(1.0))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.sleep(0)
        assert clock.sleepers == 0
        with pytest.raises(ValueError, match="seconds"):
            clock.advance(-1.0)
        await clock.sleep(0)  # returns at once

    asyncio.run(body())


def test_the_system_clock_reads_and_sleeps_in_real_time() -> None:
    async def body() -> None:
        assert isinstance(SYSTEM_CLOCK, Clock) and isinstance(ManualClock(), Clock)
        assert not isinstance(lambda: 0.0, Clock)  # a bare reading function cannot sleep
        before = SYSTEM_CLOCK()
        await SYSTEM_CLOCK.sleep(0.01)
        assert SYSTEM_CLOCK() - before >= 0.01

    asyncio.run(body())
