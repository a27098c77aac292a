"""Concurrent writers: races made deterministic by a store that lets a rival write slip in
just before a txn commits, plus real contention (asyncio.gather, two stores on one file)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from hivenet.model import Bridge, Chain, DeviceKind, Port, Router
from hivenet.store import open_store
from hivenet.store.base import (
    Compare,
    Event,
    KeyValue,
    Lease,
    RangeResult,
    Store,
    TxnOp,
    TxnResult,
)
from hivenet.store.topology import (
    ConflictError,
    DanglingReferenceError,
    NotFoundError,
    ReferencedError,
    RevisionMismatchError,
    TopologyError,
    TopologyRepository,
)
from tests.unit.store_topology.conftest import TEST_TIMEOUT, Runner
from tests.unit.store_topology.invariants import assert_consistent, dump


class RivalStore:
    """A `Store` that runs `rival()` right before each of its first `times` txns."""

    def __init__(self, inner: Store, rival: Callable[[], Awaitable[None]], times: int = 1) -> None:
        self.inner = inner
        self.rival = rival
        self.times = times
        self.txns = 0

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[TxnOp], failure: Sequence[TxnOp] = ()
    ) -> TxnResult:
        self.txns += 1
        if self.txns <= self.times:
            await self.rival()
        return await self.inner.txn(compares, success, failure)

    async def get(self, key: str) -> KeyValue | None:
        return await self.inner.get(key)

    async def range(
        self,
        prefix: str,
        *,
        revision: int | None = None,
        limit: int = 0,
        start_after: str | None = None,
    ) -> RangeResult:
        return await self.inner.range(
            prefix, revision=revision, limit=limit, start_after=start_after
        )

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        return await self.inner.put(key, value, lease=lease)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        return await self.inner.delete(key, prefix=prefix)

    def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[Event]:
        return self.inner.watch(prefix, start_revision=start_revision)

    async def current_revision(self) -> int:
        return await self.inner.current_revision()

    async def lease_grant(self, ttl: int) -> Lease:
        return await self.inner.lease_grant(ttl)

    async def lease_keepalive(self, lease_id: int) -> int:
        return await self.inner.lease_keepalive(lease_id)

    async def lease_revoke(self, lease_id: int) -> None:
        await self.inner.lease_revoke(lease_id)

    async def compact(self, revision: int) -> None:
        await self.inner.compact(revision)

    async def close(self) -> None:
        await self.inner.close()


async def _nothing() -> None:
    return None


class InterleavingStore(RivalStore):
    """Yields to the event loop before every call, so concurrent tasks interleave at each
    store access even on the in-memory backend (which otherwise never suspends)."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner, _nothing, times=0)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[TxnOp], failure: Sequence[TxnOp] = ()
    ) -> TxnResult:
        await asyncio.sleep(0)
        return await self.inner.txn(compares, success, failure)

    async def get(self, key: str) -> KeyValue | None:
        await asyncio.sleep(0)
        return await self.inner.get(key)

    async def range(
        self,
        prefix: str,
        *,
        revision: int | None = None,
        limit: int = 0,
        start_after: str | None = None,
    ) -> RangeResult:
        await asyncio.sleep(0)
        return await self.inner.range(
            prefix, revision=revision, limit=limit, start_after=start_after
        )


def bridge_port(bridge_id: str, **fields: object) -> Port:
    return Port.model_validate({"device_kind": "bridge", "device_id": bridge_id, **fields})


def test_a_referrer_created_during_a_delete_stops_the_delete(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        chain = (await repo.create(Chain(id="c1"))).obj

        async def rival() -> None:
            await repo.create(Bridge(id="b1", inbound_chain_id=chain.id))

        racing = TopologyRepository(RivalStore(repo.store, rival))
        with pytest.raises(ReferencedError) as caught:
            await racing.delete(Chain, chain.id)
        assert [r.id for r in caught.value.referrers] == ["b1"]
        assert (await repo.get(Chain, "c1")).obj == chain
        await assert_consistent(repo.store)

    run(body)


def test_a_device_deleted_during_a_port_create_refuses_the_port(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await repo.create(Bridge(id="b1"))

        async def rival() -> None:
            await repo.delete(Bridge, "b1")

        racing = TopologyRepository(RivalStore(repo.store, rival))
        with pytest.raises(DanglingReferenceError) as caught:
            await racing.create(bridge_port("b1"))
        assert (caught.value.field, caught.value.value) == ("device_id", "b1")
        await assert_consistent(repo.store)
        assert (await repo.list(Port)).items == []

    run(body)


def test_a_rival_update_turns_if_match_into_a_mismatch(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        created = await repo.create(Chain(id="c1", name="a"))

        async def rival() -> None:
            await repo.update(Chain(id="c1", name="rival"))

        racing = TopologyRepository(RivalStore(repo.store, rival))
        with pytest.raises(RevisionMismatchError):
            await racing.update(Chain(id="c1", name="mine"), expected_revision=created.mod_revision)
        assert (await repo.get(Chain, "c1")).obj.name == "rival"

    run(body)


def test_a_rival_link_to_the_same_peer_wins_cleanly(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await repo.create(Bridge(id="b1"))
        await repo.create(Router(id="r1"))
        await repo.create(bridge_port("b1", id="target"))

        async def rival() -> None:
            await repo.create(
                Port(device_kind=DeviceKind.ROUTER, device_id="r1", id="rival", peer_id="target")
            )

        racing = TopologyRepository(RivalStore(repo.store, rival))
        with pytest.raises(ConflictError, match="already linked to port rival"):
            await racing.create(
                Port(device_kind=DeviceKind.ROUTER, device_id="r1", id="mine", peer_id="target")
            )
        with pytest.raises(NotFoundError):
            await repo.get(Port, "mine")
        await assert_consistent(repo.store)

    run(body)


def test_a_rival_cascade_during_an_update_never_leaves_dangling_refs(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await repo.create(Chain(id="c1"))
        await repo.create(Bridge(id="b1"))

        async def rival() -> None:
            await repo.delete(Chain, "c1", cascade=True)

        racing = TopologyRepository(RivalStore(repo.store, rival))
        with pytest.raises(DanglingReferenceError):
            await racing.update(Bridge(id="b1", inbound_chain_id="c1"))
        await assert_consistent(repo.store)

    run(body)


def test_endless_interference_ends_in_conflict_and_writes_nothing(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await repo.create(Bridge(id="b1", name="n0"))
        renames = 0

        async def rival() -> None:
            nonlocal renames
            renames += 1
            await repo.update(Bridge(id="b1", name=f"n{renames}"))

        racing = TopologyRepository(RivalStore(repo.store, rival, times=100), max_attempts=3)
        with pytest.raises(ConflictError, match="gave up after 3 attempts"):
            await racing.update(Bridge(id="b1", name="mine"))
        assert renames == 3
        assert (await repo.get(Bridge, "b1")).obj.name == "n3"

    run(body)


def test_many_concurrent_port_creations_get_distinct_tunnel_keys(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        repo = TopologyRepository(InterleavingStore(repo.store))
        await repo.create(Bridge(id="b1"))
        created = await asyncio.gather(*(repo.create(bridge_port("b1")) for _ in range(150)))
        keys = [c.obj.tunnel_key for c in created]
        assert len(set(keys)) == 150
        await assert_consistent(repo.store)

    run(body)


def test_two_repositories_on_one_sqlite_file_never_share_a_tunnel_key(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/hn-shared.db"

    async def main() -> None:
        first, second = open_store(url), open_store(url)
        try:
            repo_a, repo_b = TopologyRepository(first), TopologyRepository(second)
            await repo_a.create(Bridge(id="b1"))
            created = await asyncio.gather(
                *(repo.create(bridge_port("b1")) for _ in range(60) for repo in (repo_a, repo_b))
            )
            keys = [c.obj.tunnel_key for c in created]
            assert len(set(keys)) == len(keys) == 120
            await assert_consistent(first)
            assert await dump(first) == await dump(second)
        finally:
            await first.close()
            await second.close()

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))


def test_random_concurrent_writers_keep_every_invariant(run: Runner) -> None:
    """Tasks create, link, re-point and cascade-delete at random, all at once."""

    async def body(repo: TopologyRepository) -> None:
        repo = TopologyRepository(InterleavingStore(repo.store))
        rng = random.Random(7)
        bridges = [f"b{i}" for i in range(3)]
        routers = [f"r{i}" for i in range(2)]
        for bridge in bridges:
            await repo.create(Bridge(id=bridge))
        for router in routers:
            await repo.create(Router(id=router))

        async def one_writer(step: int) -> None:
            choice = rng.random()
            port_ids = [item.obj.id for item in (await repo.list(Port, limit=1000)).items]
            try:
                if choice < 0.4:
                    await repo.create(bridge_port(rng.choice(bridges), id=f"bp{step}"))
                elif choice < 0.7 and port_ids:
                    await repo.create(
                        Port(
                            id=f"rp{step}",
                            device_kind=DeviceKind.ROUTER,
                            device_id=rng.choice(routers),
                            peer_id=rng.choice(port_ids),
                        )
                    )
                elif choice < 0.85 and port_ids:
                    await repo.delete(Port, rng.choice(port_ids), cascade=rng.random() < 0.5)
                else:
                    victim = rng.choice(bridges)
                    await repo.delete(Bridge, victim, cascade=True)
                    await repo.create(Bridge(id=victim))
            except TopologyError:
                pass  # a refusal is fine (nothing was written); a broken invariant is not

        await asyncio.gather(*(one_writer(step) for step in range(120)))
        await assert_consistent(repo.store)

    run(body)
