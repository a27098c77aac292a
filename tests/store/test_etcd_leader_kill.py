"""Topology creates through a killed etcd leader: none lost, none doubled, none reordered.

Each run makes 1000 sequential `TopologyRepository.create` calls (what `POST /v1/bridges`
does) while the leader is SIGKILLed at a random write, on a cluster of this module's own
(every killed member is started again before the next run). Every call must succeed or fail
with an error that says the write was not applied; the store must then hold exactly the
acknowledged bridges, and a watch from before the run must show one PUT per bridge in the
order of the acknowledgements. The write-unavailability window (the longest gap between
acknowledgements from just before the kill on) is logged; the benchmark
`bench/store_failover.py` measures it against etcd's election time.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Iterator

import pytest

from hivenet.lab.etcd import EtcdCluster
from hivenet.model import Bridge
from hivenet.model.topology import topology_key
from hivenet.store import EventType, StoreUnavailableError, WriteOutcome
from hivenet.store.topology import TopologyRepository
from tests.store.etcd_cluster import running_cluster, wipe

WRITES = 1000
RUNS = 5
_log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    with running_cluster() as started:
        yield started


async def writes_through_a_leader_kill(cluster: EtcdCluster, kill_at: int) -> float:
    """Run the writes, kill the leader once `kill_at` were acknowledged; check the store;
    return the window in seconds."""
    store = cluster.store()
    watcher = cluster.store()
    repository = TopologyRepository(store)
    try:
        start = await watcher.current_revision() + 1
        events = watcher.watch(topology_key("bridge", ""), start_revision=start)
        acknowledged: list[tuple[str, float]] = []
        not_applied: list[str] = []
        killed = asyncio.Event()
        killed_at = 0.0

        async def write() -> None:
            for index in range(WRITES):
                bridge = Bridge(name=f"hn-kill-{index}")
                try:
                    await repository.create(bridge)
                except StoreUnavailableError as error:
                    assert error.outcome is WriteOutcome.NOT_APPLIED, str(error)
                    not_applied.append(bridge.id)
                    continue
                acknowledged.append((bridge.id, time.perf_counter()))
                if len(acknowledged) == kill_at:
                    killed.set()

        async def kill() -> None:
            nonlocal killed_at
            await killed.wait()
            leader = await asyncio.to_thread(cluster.leader)
            killed_at = time.perf_counter()
            await asyncio.to_thread(cluster.kill, leader.name)

        await asyncio.gather(write(), kill())
        stored = {item.obj.id for item in (await repository.list(Bridge, limit=WRITES)).items}
        acknowledged_ids = [bridge_id for bridge_id, _ in acknowledged]
        assert stored == set(acknowledged_ids)  # none lost, none extra
        assert not stored & set(not_applied)

        received = []
        while len(received) < len(acknowledged_ids):
            received.append(await asyncio.wait_for(anext(events), 10.0))
        assert all(event.type is EventType.PUT for event in received)
        assert [event.kv.key.rsplit("/", 1)[1] for event in received] == acknowledged_ids
        # The longest gap between acknowledgements from just before the kill on.
        times = [at for _, at in acknowledged if at >= killed_at - 0.5]
        return max(later - earlier for earlier, later in itertools.pairwise(times))
    finally:
        await store.close()
        await watcher.close()


def test_a_thousand_creates_survive_a_leader_kill_at_a_random_point(cluster: EtcdCluster) -> None:
    windows = []
    for kill_at in random.sample(range(50, WRITES - 50), RUNS):
        cluster.wait_healthy(names=cluster.names())
        wipe(cluster)
        windows.append(asyncio.run(writes_through_a_leader_kill(cluster, kill_at)))
        _log.info("leader killed after write %d: writes stopped for %.3f s", kill_at, windows[-1])
        for name in cluster.names():
            if not cluster.is_running(name):
                cluster.start_member(name)
    cluster.wait_healthy(names=cluster.names())
    print(f"write-unavailability windows (s): {', '.join(f'{w:.3f}' for w in windows)}")
