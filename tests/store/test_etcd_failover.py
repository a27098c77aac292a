"""The etcd backend when members die: watches resume elsewhere exactly once, calls fail over.

These tests kill members (SIGKILL, by PID), so they run on a cluster of their own (one per
module), never on the session cluster the contract suite uses; every killed member is started
again (same data dir and ports) before the next test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from hivenet.lab.etcd import EtcdCluster, EtcdMember
from hivenet.store import Compare, Event, Get, Put, StoreUnavailableError, WriteOutcome
from tests.store.etcd_cluster import running_cluster, wipe

WRITES = 200


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    with running_cluster() as started:
        yield started


@pytest.fixture
def healthy_cluster(cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """The module's cluster with every member up and no keys; members killed are restarted."""
    cluster.wait_healthy(names=cluster.names())
    wipe(cluster)
    yield cluster
    for name in cluster.names():
        if not cluster.is_running(name):
            cluster.start_member(name)
    cluster.wait_healthy(names=cluster.names())


async def events_through(events: AsyncIterator[Event], last_revision: int) -> list[Event]:
    """Events until (and with) the one at `last_revision`."""
    received: list[Event] = []
    while not received or received[-1].revision < last_revision:
        received.append(await asyncio.wait_for(anext(events), 15.0))
    return received


def summary(events: list[Event]) -> list[tuple[str, str, bytes, int]]:
    return [(event.type.value, event.kv.key, event.kv.value, event.revision) for event in events]


def test_watch_on_the_killed_leader_resumes_on_a_survivor_exactly_once(
    healthy_cluster: EtcdCluster,
) -> None:
    cluster = healthy_cluster
    leader = cluster.leader()
    survivors = [member for member in cluster.members if member is not leader]

    async def main() -> None:
        # The watch stream lives on the leader: its endpoint is first.
        watcher = cluster.store([leader.endpoint, *(m.endpoint for m in survivors)])
        writer = cluster.store([m.endpoint for m in survivors], call_timeout=2.0)
        reference = cluster.store([m.endpoint for m in survivors])
        try:
            start = await writer.current_revision() + 1
            events = watcher.watch("/kill/", start_revision=start)
            acknowledged: list[int] = []
            unknown_outcome: list[int] = []

            async def write() -> None:
                for index in range(WRITES):
                    try:
                        key = f"/kill/{index % 13}"
                        if index % 5 == 4:
                            await writer.delete(key)
                            continue
                        acknowledged.append(await writer.put(key, str(index).encode()))
                    except StoreUnavailableError:
                        unknown_outcome.append(index)  # in flight when the leader died
                    await asyncio.sleep(0.002)

            writing = asyncio.create_task(write())
            received = [await asyncio.wait_for(anext(events), 5.0) for _ in range(30)]
            assert watcher.current_endpoint == leader.endpoint
            killed_pid = await asyncio.to_thread(cluster.kill, leader.name)
            assert not cluster.is_running(leader.name) and killed_pid > 0
            await writing
            last = await writer.current_revision()
            assert acknowledged and acknowledged[-1] <= last
            received += await events_through(events, last)
            assert watcher.current_endpoint != leader.endpoint  # it moved
            assert events.streams_opened >= 2  # type: ignore[attr-defined]  # it did resume

            expected = await events_through(reference.watch("/kill/", start_revision=start), last)
            assert summary(received) == summary(expected)
            revisions = [event.revision for event in received]
            assert revisions == sorted(revisions)
            assert len(set(revisions)) == len(revisions)  # one event per write here
            assert set(acknowledged) <= set(revisions)
            assert len(unknown_outcome) <= 3  # only writes in flight at the kill
            assert [e.prev_kv for e in received] == [e.prev_kv for e in expected]
            await events.aclose()  # type: ignore[attr-defined]
        finally:
            for store in (watcher, writer, reference):
                await store.close()

    asyncio.run(main())


def test_calls_fail_over_when_their_member_dies(healthy_cluster: EtcdCluster) -> None:
    cluster = healthy_cluster
    leader = cluster.leader()
    # A follower first: its death costs the cluster no election, so what is measured is the
    # client's failover alone.
    victim: EtcdMember = next(member for member in cluster.members if member is not leader)
    others = [member for member in cluster.members if member is not victim]

    async def main() -> None:
        store = cluster.store([victim.endpoint, *(m.endpoint for m in others)], call_timeout=5.0)
        try:
            # Reads stay on the first endpoint; writes move the store to the leader.
            assert await store.get("/fo/k") is None
            assert store.current_endpoint == victim.endpoint
            await asyncio.to_thread(cluster.kill, victim.name)
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await store.get("/fo/k") is None
            assert loop.time() - started < 2.0
            assert store.current_endpoint != victim.endpoint
            before = await store.put("/fo/k", b"1")
            assert store.current_endpoint == leader.endpoint == store.leader_endpoint
            lease = await store.lease_grant(30)
            assert await store.put("/fo/k", b"2", lease=lease.id) == before + 1
            kv = await store.get("/fo/k")
            assert kv is not None and kv.value == b"2" and kv.lease == lease.id
            assert [k.key for k in (await store.range("/fo/")).kvs] == ["/fo/k"]
            result = await store.txn([Compare("/fo/k", "value", "==", b"2")], [Get("/fo/k")])
            assert result.succeeded
            assert await store.lease_keepalive(lease.id) == 30
            # The member comes back; the store keeps working wherever it is.
            await asyncio.to_thread(cluster.start_member, victim.name)
            await asyncio.to_thread(cluster.wait_healthy)
            assert (await store.txn([], [Put("/fo/after", b"")])).succeeded
        finally:
            await store.close()

    asyncio.run(main())


def test_a_watch_gives_up_only_when_no_member_answers_for_its_reconnect_timeout(
    healthy_cluster: EtcdCluster,
) -> None:
    cluster = healthy_cluster

    async def main() -> None:
        store = cluster.store(watch_reconnect_timeout=1.0, connect_timeout=0.2)
        try:
            start = await store.current_revision() + 1
            events = store.watch("/gone/", start_revision=start)
            written = await store.put("/gone/k", b"")
            [event] = [await asyncio.wait_for(anext(events), 5.0)]
            assert event.revision == written
            for name in cluster.names():
                await asyncio.to_thread(cluster.kill, name)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(StoreUnavailableError, match=f"resume from revision {written + 1}"):
                await asyncio.wait_for(anext(events), 10.0)
            assert 0.9 <= loop.time() - started <= 4.0
        finally:
            await store.close()

    asyncio.run(main())


def test_a_write_without_quorum_names_the_lost_leader_and_says_what_became_of_it(
    healthy_cluster: EtcdCluster,
) -> None:
    cluster = healthy_cluster
    leader = cluster.leader()
    follower = next(member for member in cluster.members if member is not leader)

    async def main() -> None:
        store = cluster.store(call_timeout=2.0)
        try:
            await store.put("/quorum/k", b"")  # finds the leader
            assert store.leader_endpoint == leader.endpoint
            for member in (leader, follower):
                await asyncio.to_thread(cluster.kill, member.name)
            with pytest.raises(StoreUnavailableError) as raised:
                await store.txn(
                    [Compare("/quorum/new", "create_revision", "==", 0)], [Put("/quorum/new", b"")]
                )
        finally:
            await store.close()
        error = raised.value
        # Sent to the leader, which was dead: surely not applied. Sent to the survivor, which
        # cannot commit without quorum: unknown. Either way the lost leader is named.
        assert f"{leader.endpoint} (the leader)" in error.failed, error
        if error.outcome is WriteOutcome.UNKNOWN:
            assert "read it back" in str(error)
        else:
            assert "not applied" in str(error)

    asyncio.run(main())
