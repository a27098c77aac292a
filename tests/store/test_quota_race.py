"""Quotas under real contention on every backend (etcd included): creates racing for the last
units of a project's quota through two separate store clients; exactly as many win as there
were units left, the rest are refused over quota, and the usage counter stays exact."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from hivenet.model import Router
from hivenet.store.base import Store
from hivenet.store.quota import read_usage, set_quotas
from hivenet.store.topology import (
    OverQuotaError,
    ProjectScope,
    TopologyRepository,
    Versioned,
)
from tests.store.conftest import TEST_TIMEOUT, Backend
from tests.unit.store_topology.invariants import assert_consistent

ACME = ProjectScope("acme")


def _run_two_clients(backend: Backend, body: object) -> None:
    """body(first, second): two store clients of one store (the in-memory store has no
    second client: both are the same object)."""

    async def main() -> None:
        first = backend.open()
        second = first if backend.name == "memory" else backend.open()
        try:
            await asyncio.wait_for(body(first, second), TEST_TIMEOUT)  # type: ignore[operator]
        finally:
            await first.close()
            if second is not first:
                await second.close()

    asyncio.run(main())


@pytest.mark.parametrize("racers", [2, 6])
def test_creates_racing_for_the_last_unit_have_exactly_one_winner(
    backend: Backend, racers: int
) -> None:
    async def body(first: Store, second: Store) -> None:
        repos = [TopologyRepository(first), TopologyRepository(second)]
        await set_quotas(first, "acme", {"router": 3})
        for _ in range(2):
            await repos[0].create(Router(tenant_id="acme"), scope=ACME)

        async def one(index: int) -> Versioned[Router] | OverQuotaError:
            try:
                return await repos[index % 2].create(Router(tenant_id="acme"), scope=ACME)
            except OverQuotaError as exc:
                return exc

        calls: list[Awaitable[Versioned[Router] | OverQuotaError]] = [one(i) for i in range(racers)]
        outcomes = await asyncio.gather(*calls)
        won = [o for o in outcomes if isinstance(o, Versioned)]
        refused = [o for o in outcomes if isinstance(o, OverQuotaError)]
        assert (len(won), len(refused)) == (1, racers - 1)
        assert all((e.limit, e.usage) == (3, 3) for e in refused)
        assert len((await repos[1].list(Router, tenant_id="acme")).items) == 3
        assert (await read_usage(second, "acme"))["router"] == 3
        await assert_consistent(first)

    _run_two_clients(backend, body)
