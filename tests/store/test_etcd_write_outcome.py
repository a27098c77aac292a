"""What the etcd backend does when the member holding a write fails before it answers.

A txn that cannot apply twice (a compare its own writes falsify) is resolved by the store:
it reads the guard key's history, answers with the result if the write was applied, and sends
it again if not, so the caller sees one success. Other writes raise StoreUnavailableError
whose `outcome` is UNKNOWN and whose `failed` names the member. These tests make the answer
get lost on purpose (a KV stub that fails like a killed member's connection, after or before
passing the txn on), on the session's cluster; `test_etcd_leader_kill.py` kills real leaders.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from hivenet.lab.etcd import EtcdCluster
from hivenet.store import (
    Compare,
    Delete,
    Get,
    Put,
    StoreUnavailableError,
    WriteOutcome,
)
from hivenet.store.etcd import EtcdStore
from tests.store.etcd_cluster import wipe

Hook = Callable[[], Awaitable[None]]


def connection_lost() -> grpc.aio.AioRpcError:
    """What a call gets when its member is killed under it."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="Socket closed",
    )


class AnswerLost:
    """A KV stub whose next writing Txn is passed on (or not, `deliver=False`), then `between`
    runs (another client's write), then the call fails as if the member died."""

    def __init__(self, stub: Any, *, deliver: bool, between: Hook | None) -> None:
        self._stub = stub
        self._deliver = deliver
        self._between = between
        self.armed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    async def Txn(self, request: Any, **options: Any) -> Any:
        writes = any(
            op.HasField("request_put") or op.HasField("request_delete_range")
            for op in request.success
        )
        if not (self.armed and writes):
            return await self._stub.Txn(request, **options)
        self.armed = False
        if self._deliver:
            await self._stub.Txn(request, **options)
        if self._between is not None:
            await self._between()
        raise connection_lost()


async def lose_next_write(store: EtcdStore, *, deliver: bool, between: Hook | None = None) -> None:
    await store.put("/outcome/warm-up", b"")  # every channel open, the leader found
    for endpoint in store._endpoints:
        endpoint.kv = AnswerLost(endpoint.kv, deliver=deliver, between=between)


def run(cluster: EtcdCluster, body: Callable[[EtcdStore, EtcdStore], Awaitable[None]]) -> None:
    wipe(cluster)

    async def main() -> None:
        store, other = cluster.store(), cluster.store()
        try:
            await asyncio.wait_for(body(store, other), 20.0)
        finally:
            await store.close()
            await other.close()

    asyncio.run(main())


@pytest.mark.parametrize("deliver", [True, False], ids=["applied", "not-applied"])
def test_a_create_whose_answer_is_lost_succeeds_exactly_once(
    etcd_cluster: EtcdCluster, deliver: bool
) -> None:
    async def body(store: EtcdStore, _other: EtcdStore) -> None:
        await lose_next_write(store, deliver=deliver)
        before = await store.current_revision()
        result = await store.txn(
            [Compare("/outcome/k", "create_revision", "==", 0)],
            [Put("/outcome/k", b"v"), Get("/outcome/k")],
        )
        assert result.succeeded
        assert result.revision == before + 1 == await store.current_revision()  # one write
        [previous, [read]] = result.responses  # type: ignore[misc]
        assert previous is None
        assert read.value == b"v" and read.mod_revision == result.revision

    run(etcd_cluster, body)


def test_an_update_applied_and_overwritten_before_the_check_is_reported_applied(
    etcd_cluster: EtcdCluster,
) -> None:
    async def body(store: EtcdStore, other: EtcdStore) -> None:
        created = await store.put("/outcome/k", b"old")

        async def overwrite() -> None:
            await other.put("/outcome/k", b"someone else's")

        await lose_next_write(store, deliver=True, between=overwrite)
        result = await store.txn(
            [Compare("/outcome/k", "mod_revision", "==", created)],
            [Put("/outcome/k", b"mine"), Delete("/outcome/gone")],
        )
        assert result.succeeded
        [previous, deleted] = result.responses
        assert isinstance(previous, type(await store.get("/outcome/k")))
        assert previous is not None and previous.value == b"old" and deleted == 0
        latest = await store.get("/outcome/k")
        assert latest is not None and latest.value == b"someone else's"
        assert latest.mod_revision == result.revision + 1  # mine, then theirs: no replay

    run(etcd_cluster, body)


def test_an_update_lost_before_it_applied_is_sent_again_once(etcd_cluster: EtcdCluster) -> None:
    async def body(store: EtcdStore, _other: EtcdStore) -> None:
        created = await store.put("/outcome/k", b"old")
        await lose_next_write(store, deliver=False)
        before = await store.current_revision()
        result = await store.txn(
            [Compare("/outcome/k", "mod_revision", "==", created)], [Put("/outcome/k", b"new")]
        )
        assert result.succeeded and result.revision == before + 1
        assert await store.current_revision() == before + 1

    run(etcd_cluster, body)


def test_a_create_beaten_by_another_writer_while_its_answer_was_lost_fails_its_compare(
    etcd_cluster: EtcdCluster,
) -> None:
    async def body(store: EtcdStore, other: EtcdStore) -> None:
        async def create_first() -> None:
            await other.put("/outcome/k", b"theirs")

        await lose_next_write(store, deliver=False, between=create_first)
        result = await store.txn(
            [Compare("/outcome/k", "create_revision", "==", 0)],
            [Put("/outcome/k", b"mine")],
            [Get("/outcome/k")],
        )
        assert not result.succeeded
        [[found]] = result.responses  # type: ignore[misc]
        assert found.value == b"theirs"

    run(etcd_cluster, body)


def test_a_create_refused_by_its_compare_while_its_answer_was_lost_stays_refused(
    etcd_cluster: EtcdCluster,
) -> None:
    async def body(store: EtcdStore, _other: EtcdStore) -> None:
        # The key already holds exactly what the create would write: only the revision at
        # which it appeared tells that this create did not write it.
        await store.put("/outcome/k", b"same")
        await lose_next_write(store, deliver=True)
        before = await store.current_revision()
        result = await store.txn(
            [Compare("/outcome/k", "create_revision", "==", 0)], [Put("/outcome/k", b"same")]
        )
        assert not result.succeeded and result.revision == before

    run(etcd_cluster, body)


def test_a_write_that_could_apply_twice_reports_its_outcome_unknown_and_the_member(
    etcd_cluster: EtcdCluster,
) -> None:
    async def body(store: EtcdStore, _other: EtcdStore) -> None:
        await lose_next_write(store, deliver=True)
        lost_on = store.current_endpoint
        with pytest.raises(StoreUnavailableError) as raised:
            await store.txn([], [Put("/outcome/unguarded", b"v")])
        assert raised.value.outcome is WriteOutcome.UNKNOWN
        assert lost_on in raised.value.failed and "(the leader)" in raised.value.failed
        assert "read it back" in str(raised.value)

    run(etcd_cluster, body)


def test_no_member_at_all_means_not_applied() -> None:
    async def main() -> None:
        store = EtcdStore(["127.0.0.1:1", "127.0.0.1:2"], call_timeout=0.5, connect_timeout=0.1)
        try:
            with pytest.raises(StoreUnavailableError) as raised:
                await store.txn([Compare("/k", "create_revision", "==", 0)], [Put("/k", b"")])
        finally:
            await store.close()
        assert raised.value.outcome is WriteOutcome.NOT_APPLIED
        assert "127.0.0.1:1" in raised.value.failed and "not applied" in str(raised.value)

    asyncio.run(main())
