"""Compaction on etcd seen by another client: CompactedError for ranges and watches below it.

The contract suite compacts and reads through one store, which refuses the revisions it
compacted itself; here a second client, which knows nothing of that compaction, must get etcd's
own answer. etcd keeps the compaction revision C readable, so for that client the oldest
available revision is C and its CompactedError names C - 1 (see store/etcd.py).
"""

from __future__ import annotations

import pytest

from hivenet.lab.etcd import EtcdCluster
from hivenet.store import CompactedError, FutureRevisionError, Store
from hivenet.store.etcd import EtcdStore
from tests.store.conftest import Backend, EtcdBackend


@pytest.fixture
def etcd_backend(etcd_cluster: EtcdCluster) -> Backend:
    return EtcdBackend("etcd", etcd_cluster.url, cluster=etcd_cluster)


def test_a_compacted_revision_raises_compacted_error_for_every_client(
    etcd_backend: Backend,
) -> None:
    async def body(compactor: Store) -> None:
        other = etcd_backend.open()
        try:
            first = await compactor.put("/cmp/a", b"1")
            compact_at = await compactor.put("/cmp/a", b"2")
            after = await compactor.put("/cmp/b", b"1")
            await compactor.compact(compact_at)

            with pytest.raises(CompactedError) as caught:
                await other.range("/cmp/", revision=first)
            assert caught.value.requested == first
            assert caught.value.compact_revision == compact_at - 1
            with pytest.raises(CompactedError) as caught:
                await compactor.range("/cmp/", revision=compact_at)  # the compactor's own rule
            assert caught.value.compact_revision == compact_at
            for revision, expected in (
                (compact_at, {"/cmp/a": b"2"}),
                (after, {"/cmp/a": b"2", "/cmp/b": b"1"}),
            ):
                kept = await other.range("/cmp/", revision=revision)
                assert {kv.key: kv.value for kv in kept.kvs} == expected

            with pytest.raises(CompactedError) as caught:
                await anext(other.watch("/cmp/", start_revision=first))
            assert caught.value.compact_revision == compact_at - 1
            event = await anext(other.watch("/cmp/", start_revision=compact_at + 1))
            assert event.revision == after and event.kv.key == "/cmp/b"

            with pytest.raises(CompactedError):
                await other.compact(compact_at)  # etcd says so, not this client's memory
            with pytest.raises(FutureRevisionError):
                await other.range("/cmp/", revision=after + 1)
        finally:
            await other.close()

    etcd_backend.run(body)


def test_paginated_range_keeps_reading_its_revision_after_compaction(
    etcd_backend: Backend,
) -> None:
    """A page read after a compaction passed the range's revision fails whole, never mixing
    revisions: pagination pins the revision of its first page."""

    async def body(store: Store) -> None:
        assert isinstance(store, EtcdStore)
        for index in range(6):
            await store.put(f"/pg/{index}", b"old")
        snapshot = await store.current_revision()
        await store.delete("/pg/", prefix=True)
        paged = EtcdStore(store.endpoints, range_page_size=2, tls=store.tls, auth=store.auth)
        try:
            result = await paged.range("/pg/", revision=snapshot)
            assert [kv.key for kv in result.kvs] == [f"/pg/{index}" for index in range(6)]
            assert result.revision == snapshot and result.count == 6 and not result.more
            await store.compact(snapshot + 1)
            with pytest.raises(CompactedError):
                await paged.range("/pg/", revision=snapshot)
        finally:
            await paged.close()

    etcd_backend.run(body)
