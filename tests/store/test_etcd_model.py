"""The reference-model property test of `test_contract_model.py`, on the session's etcd cluster.

The shared test needs a brand-new store at revision 1; an etcd cluster keeps counting across
tests, so here the model starts at the cluster's revision after the wipe (`ReferenceStore`
takes any origin) and watches start just after it. Same operations, same checks: every
put/delete/txn result, the range at every revision still kept, the watch from the origin, and
CompactedError below a random compaction point. Fewer examples: each one is ~150 round trips.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivenet.lab.etcd import EtcdCluster
from hivenet.store import CompactedError, Store
from tests.store.conftest import EtcdBackend
from tests.store.test_contract_model import PREFIXES, ReferenceStore, _drain, operations


async def check_against_model_from_origin(
    store: Store, steps: list[tuple[object, ...]], compact_choice: int
) -> None:
    origin = await store.current_revision()
    model = ReferenceStore(revision=origin, snapshots={origin: {}})
    for step in steps:
        if step[0] == "put":
            assert await store.put(step[1], step[2]) == model.put(step[1], step[2])  # type: ignore[arg-type]
        elif step[0] == "delete":
            key, prefix = step[1], step[2]
            if not prefix and not key:
                continue  # an empty exact key is invalid input, covered elsewhere
            expected_count = model.delete(key, prefix)  # type: ignore[arg-type]
            assert await store.delete(key, prefix=prefix) == expected_count  # type: ignore[arg-type]
        else:
            expected_txn = model.txn(step[1], step[2], step[3])  # type: ignore[arg-type]
            assert await store.txn(step[1], step[2], step[3]) == expected_txn  # type: ignore[arg-type]
        assert await store.current_revision() == model.revision

    for revision, snapshot in model.snapshots.items():
        for prefix in PREFIXES:
            result = await store.range(prefix, revision=revision)
            expected = [kv for key, kv in sorted(snapshot.items()) if key.startswith(prefix)]
            assert result.kvs == expected, (revision, prefix)

    for prefix in PREFIXES:
        watched = [e async for e in _drain(store, prefix, origin + 1, model.events)]
        assert watched == [e for e in model.events if e.kv.key.startswith(prefix)]

    compact_revision = origin + compact_choice % (model.revision - origin + 1)
    if compact_revision > origin:
        await store.compact(compact_revision)
        for revision, snapshot in model.snapshots.items():
            if revision <= compact_revision:
                with pytest.raises(CompactedError):
                    await store.range("", revision=revision)
            else:
                result = await store.range("", revision=revision)
                assert result.kvs == [kv for _, kv in sorted(snapshot.items())]
        later = [e for e in model.events if e.revision > compact_revision]
        assert [e async for e in _drain(store, "", compact_revision + 1, later)] == later


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=operations, compact_choice=st.integers(0, 1000))
def test_etcd_agrees_with_reference_model(
    etcd_cluster: EtcdCluster, steps: list[tuple[object, ...]], compact_choice: int
) -> None:
    backend = EtcdBackend("etcd", etcd_cluster.url, cluster=etcd_cluster)
    backend.run(lambda store: check_against_model_from_origin(store, steps, compact_choice))


def test_model_origin_is_the_empty_wiped_store(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    """The premise of the offset model: after the wipe the store is empty."""

    async def body(store: Store) -> None:
        assert (await store.range("")).kvs == []

    EtcdBackend("etcd", etcd_cluster.url, cluster=etcd_cluster).run(body)
