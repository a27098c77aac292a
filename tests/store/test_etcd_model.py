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
from hivenet.store import Store
from tests.store.conftest import EtcdBackend
from tests.store.test_contract_model import check_against_model, operations


# Each example runs against a real 3-member cluster (about 3 s under `make test`'s coverage
# tracing): 25 examples keep the property meaningful and the test far inside its time limit.
@pytest.mark.timeout(600)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=operations, compact_choice=st.integers(0, 1000))
def test_etcd_agrees_with_reference_model(
    etcd_cluster: EtcdCluster, steps: list[tuple[object, ...]], compact_choice: int
) -> None:
    backend = EtcdBackend("etcd", etcd_cluster.url, cluster=etcd_cluster)
    backend.run(lambda store: check_against_model(store, steps, compact_choice, fresh=False))


def test_model_origin_is_the_empty_wiped_store(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    """The premise of the offset model: after the wipe the store is empty."""

    async def body(store: Store) -> None:
        assert (await store.range("")).kvs == []

    EtcdBackend("etcd", etcd_cluster.url, cluster=etcd_cluster).run(body)
