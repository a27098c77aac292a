"""`LeaseKeeper` (store/leases.py) on a real store: memory:// and the session's etcd cluster.

1-second leases (etcd's minimum in the test cluster): a lease is only proven kept by outliving
its TTL. On memory:// the keeper and the store share one `ManualClock` and the test moves time
by hand (`Timeline`); etcd expires leases on its own clock, so its runs take real seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from hivenet.clock import SYSTEM_CLOCK, Clock, ManualClock
from hivenet.store import (
    EventType,
    InvalidRequestError,
    Lease,
    LeaseNotFoundError,
    Store,
    StoreUnavailableError,
)
from hivenet.store.leases import LeaseKeeper, LeaseLoss
from tests.store.conftest import ETCD_BACKEND_NAME, Backend, EtcdBackend, make_backend


@pytest.fixture(params=["memory", ETCD_BACKEND_NAME])
def lease_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == ETCD_BACKEND_NAME:
        cluster = request.getfixturevalue("etcd_cluster")
        return EtcdBackend(ETCD_BACKEND_NAME, cluster.url, cluster=cluster)
    # Expiry checked often, so an unrefreshed 1-second lease goes within ~1.05 s.
    return make_backend(request.param, tmp_path)


T = TypeVar("T")
STEP = 0.05  # how far a manual timeline moves before letting the keeper run


class Timeline:
    """The clock of one test: manual for memory:// (shared with the store), real for etcd.
    `parked` is how many keeper tasks sleep on the clock between refreshes."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.parked = 0

    async def settle(self) -> None:
        """Let every woken refresh finish and sleep again (manual clock only)."""
        clock = self.clock
        if not isinstance(clock, ManualClock):
            return
        for _ in range(1000):
            await asyncio.sleep(0.002)
            if clock.sleepers >= self.parked:
                return
        raise AssertionError(f"{self.parked - clock.sleepers} refresh task(s) never slept again")

    async def pass_time(self, seconds: float) -> None:
        if not isinstance(self.clock, ManualClock):
            await asyncio.sleep(seconds)
            return
        moved = 0.0
        while moved < seconds - 1e-9:
            step = min(STEP, seconds - moved)
            self.clock.advance(step)
            moved += step
            await self.settle()

    async def within(self, seconds: float, awaitable: Awaitable[T]) -> T:
        """`awaitable`'s result, failing if it takes more than `seconds` on this clock."""
        if not isinstance(self.clock, ManualClock):
            return await asyncio.wait_for(awaitable, seconds)
        task = asyncio.ensure_future(awaitable)
        started = self.clock()
        while not task.done():
            if self.clock() - started > seconds:
                task.cancel()
                raise AssertionError(f"not done within {seconds}s on the clock")
            await self.pass_time(STEP)
        return task.result()


def run(backend: Backend, body: Callable[[Store, Timeline], Awaitable[None]]) -> None:
    if backend.name == ETCD_BACKEND_NAME:
        timeline = Timeline(SYSTEM_CLOCK)
        backend.run(lambda store: body(store, timeline))
        return
    timeline = Timeline(ManualClock(start=1_700_000_000.0))
    backend.run(
        lambda store: body(store, timeline), lease_check_interval=0.001, clock=timeline.clock
    )


def test_keeps_a_lease_alive_past_its_ttl_and_lets_it_expire_once_released(
    lease_backend: Backend,
) -> None:
    async def body(store: Store, timeline: Timeline) -> None:
        lease = await store.lease_grant(1)
        await store.put("/keeper/k", b"v", lease=lease.id)
        async with LeaseKeeper(store, clock=timeline.clock) as keeper:
            kept = keeper.keep(lease)
            timeline.parked = 1
            await timeline.settle()
            await timeline.pass_time(2.2)  # more than two TTLs
            assert await store.get("/keeper/k") is not None
            assert kept.loss is None
            assert kept.refreshes >= 6  # at ttl/3 for 2.2 s, plus the first one at once
            assert keeper.kept() == [lease.id]
            await keeper.release(lease.id)
            timeline.parked = 0
            assert keeper.kept() == []
            start = await store.current_revision()
            events = store.watch("/keeper/", start_revision=start + 1)
            # Gone within its TTL of the last refresh (plus the store's expiry check).
            [event] = await timeline.within(2.0, _take(events, 1))
            assert event.type is EventType.DELETE
            await events.aclose()  # type: ignore[attr-defined]

    run(lease_backend, body)


def test_reports_a_revoked_lease_once_through_callback_and_future(lease_backend: Backend) -> None:
    async def body(store: Store, timeline: Timeline) -> None:
        losses: list[LeaseLoss] = []

        async def on_loss(loss: LeaseLoss) -> None:
            losses.append(loss)

        keeper = LeaseKeeper(store, on_loss=on_loss, clock=timeline.clock)
        doomed = await store.lease_grant(1)
        survivor = await store.lease_grant(1)
        kept = keeper.keep(doomed)
        keeper.keep(survivor)
        timeline.parked = 2
        await timeline.pass_time(0.1)
        await store.lease_revoke(doomed.id)  # someone else revokes it
        timeline.parked = 1
        loss = await timeline.within(2.0, kept.wait_lost())
        assert loss.lease_id == doomed.id
        assert isinstance(loss.error, LeaseNotFoundError)
        await timeline.pass_time(
            1.2
        )  # the other lease is still refreshed, the lost one never again
        assert losses == [loss]
        assert keeper.kept() == [survivor.id]
        await store.put("/keeper/alive", b"", lease=survivor.id)  # it still exists
        await keeper.close(revoke=True)
        with pytest.raises(LeaseNotFoundError):
            await store.lease_keepalive(survivor.id)

    run(lease_backend, body)


class FlakyStore:
    """A store whose keepalives fail while `down` is set (a store the agent cannot reach)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.down = False
        self.keepalive_attempts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def lease_keepalive(self, lease_id: int) -> int:
        self.keepalive_attempts += 1
        if self.down:
            raise StoreUnavailableError("test: store unreachable")
        return await self.store.lease_keepalive(lease_id)


def test_unreachable_store_is_retried_and_reported_when_the_ttl_has_run_out() -> None:
    async def body(store: Store, timeline: Timeline) -> None:
        flaky = FlakyStore(store)
        lease = await store.lease_grant(1)
        async with LeaseKeeper(flaky, clock=timeline.clock) as keeper:
            kept = keeper.keep(lease)
            timeline.parked = 1
            await timeline.settle()
            assert kept.refreshes == 1
            # A short outage (shorter than the TTL) is ridden out.
            flaky.down = True
            await timeline.pass_time(0.5)
            flaky.down = False
            await timeline.pass_time(0.4)
            assert kept.loss is None and kept.refreshes >= 2
            # A long one is reported, no earlier than the estimated expiry.
            flaky.down = True
            attempts_before = flaky.keepalive_attempts
            down_since = timeline.clock()
            timeline.parked = 0  # the refresh task ends with the loss
            loss = await timeline.within(3.0, kept.wait_lost())
            assert isinstance(loss.error, StoreUnavailableError)
            # TTL 1 s minus the time since the last refresh (at most ttl/3 before going down).
            assert 0.6 <= timeline.clock() - down_since <= 1.0 + STEP
            assert flaky.keepalive_attempts - attempts_before >= 3  # retried every ttl/9

    run(make_backend("memory", Path("/nonexistent")), body)


def test_bad_input_is_rejected_naming_the_field() -> None:
    async def body(store: Store) -> None:
        with pytest.raises(InvalidRequestError, match="refresh_fraction"):
            LeaseKeeper(store, refresh_fraction=1.5)
        with pytest.raises(InvalidRequestError, match="store"):
            LeaseKeeper(object())  # type: ignore[arg-type]
        async with LeaseKeeper(store) as keeper:
            with pytest.raises(InvalidRequestError, match="lease"):
                keeper.keep(42)  # type: ignore[arg-type]
            lease = await store.lease_grant(5)
            keeper.keep(lease)
            with pytest.raises(InvalidRequestError, match="already kept"):
                keeper.keep(lease)
            with pytest.raises(InvalidRequestError, match="lease_id"):
                await keeper.release(lease.id + 1)
            with pytest.raises(InvalidRequestError, match=r"lease\.ttl"):
                keeper.keep(Lease(lease.id + 7, 0))

    make_backend("memory", Path("/nonexistent")).run(body)


async def _take(events: AsyncIterator[Any], count: int) -> list[Any]:
    return [await anext(events) for _ in range(count)]
