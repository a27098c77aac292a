"""`LeaseKeeper` (store/leases.py) on a real store: memory:// and the session's etcd cluster.

Real time with 1-second leases (etcd's minimum in the test cluster), so each test takes a
second or two: a lease is only proven kept by outliving its TTL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

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


def run(backend: Backend, body: Any) -> None:
    backend.run(body, lease_check_interval=0.02)


def test_keeps_a_lease_alive_past_its_ttl_and_lets_it_expire_once_released(
    lease_backend: Backend,
) -> None:
    async def body(store: Store) -> None:
        lease = await store.lease_grant(1)
        await store.put("/keeper/k", b"v", lease=lease.id)
        async with LeaseKeeper(store) as keeper:
            kept = keeper.keep(lease)
            await asyncio.sleep(2.2)  # more than two TTLs
            assert await store.get("/keeper/k") is not None
            assert kept.loss is None
            assert kept.refreshes >= 6  # at ttl/3 for 2.2 s, plus the first one at once
            assert keeper.kept() == [lease.id]
            await keeper.release(lease.id)
            assert keeper.kept() == []
            released_at = asyncio.get_running_loop().time()
            start = await store.current_revision()
            events = store.watch("/keeper/", start_revision=start + 1)
            [event] = await asyncio.wait_for(_take(events, 1), 3.0)
            assert event.type is EventType.DELETE
            assert asyncio.get_running_loop().time() - released_at <= 2.0
            await events.aclose()  # type: ignore[attr-defined]

    run(lease_backend, body)


def test_reports_a_revoked_lease_once_through_callback_and_future(lease_backend: Backend) -> None:
    async def body(store: Store) -> None:
        losses: list[LeaseLoss] = []

        async def on_loss(loss: LeaseLoss) -> None:
            losses.append(loss)

        keeper = LeaseKeeper(store, on_loss=on_loss)
        doomed = await store.lease_grant(1)
        survivor = await store.lease_grant(1)
        kept = keeper.keep(doomed)
        keeper.keep(survivor)
        await asyncio.sleep(0.1)
        await store.lease_revoke(doomed.id)  # someone else revokes it
        loss = await asyncio.wait_for(kept.wait_lost(), 2.0)
        assert loss.lease_id == doomed.id
        assert isinstance(loss.error, LeaseNotFoundError)
        await asyncio.sleep(1.2)  # the other lease is still refreshed, the lost one never again
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
    async def body(store: Store) -> None:
        flaky = FlakyStore(store)
        lease = await store.lease_grant(1)
        async with LeaseKeeper(flaky) as keeper:
            kept = keeper.keep(lease)
            await asyncio.sleep(0.05)
            assert kept.refreshes == 1
            # A short outage (shorter than the TTL) is ridden out.
            flaky.down = True
            await asyncio.sleep(0.5)
            flaky.down = False
            await asyncio.sleep(0.4)
            assert kept.loss is None and kept.refreshes >= 2
            # A long one is reported, no earlier than the estimated expiry.
            flaky.down = True
            loop = asyncio.get_running_loop()
            attempts_before = flaky.keepalive_attempts
            down_since = loop.time()
            loss = await asyncio.wait_for(kept.wait_lost(), 3.0)
            assert isinstance(loss.error, StoreUnavailableError)
            assert 0.6 <= loop.time() - down_since <= 1.3  # TTL 1 s minus time since last refresh
            assert flaky.keepalive_attempts - attempts_before >= 3  # retried every ttl/9

    make_backend("memory", Path("/nonexistent")).run(body)


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
