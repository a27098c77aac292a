"""etcd-backend specifics: URLs and options, deadlines, pagination at one revision, the txn
compares evaluated client-side, lease errors. The shared semantics are in `test_contract.py`."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from hivenet.lab.etcd import EtcdCluster
from hivenet.store import (
    Compare,
    InvalidRequestError,
    LeaseNotFoundError,
    Put,
    Store,
    StoreUnavailableError,
    open_store,
)
from hivenet.store.etcd import EtcdStore, endpoints_from_url
from tests.store.conftest import Backend, EtcdBackend
from tests.store.test_contract import close_watch


@pytest.fixture
def etcd_backend(etcd_cluster: EtcdCluster) -> Backend:
    return EtcdBackend("etcd", etcd_cluster.url, cluster=etcd_cluster)


# --------------------------------------------------------------------------- URLs, options


def test_open_store_parses_every_endpoint_without_connecting() -> None:
    store = open_store("etcd://127.0.0.1:2379, localhost:22379,[::1]:32379/", call_timeout=2)
    assert isinstance(store, EtcdStore)
    assert store.endpoints == ["127.0.0.1:2379", "localhost:22379", "[::1]:32379"]
    assert store.current_endpoint == "127.0.0.1:2379"
    asyncio.run(store.close())


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("etcd://", "names no etcd endpoint"),
        ("etcd://127.0.0.1", "expected host:port"),
        ("etcd://127.0.0.1:0", "port '0'"),
        ("etcd://127.0.0.1:65536", "port '65536'"),
        ("etcd://127.0.0.1:2379,,127.0.0.1:2380", "endpoint ''"),
        ("etcd://user@127.0.0.1:2379", "host 'user@127.0.0.1'"),
    ],
)
def test_bad_etcd_urls_are_rejected_naming_url_and_endpoint(url: str, problem: str) -> None:
    with pytest.raises(InvalidRequestError, match="store url") as caught:
        endpoints_from_url(url)
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"call_timeout": 0}, "call_timeout"),
        ({"connect_timeout": "1s"}, "connect_timeout"),
        ({"watch_reconnect_timeout": -1}, "watch_reconnect_timeout"),
        ({"range_page_size": 0}, "range_page_size"),
    ],
)
def test_bad_options_are_rejected_naming_them(options: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        EtcdStore(["127.0.0.1:2379"], **options)


# --------------------------------------------------------------------------- deadlines


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A TCP port that accepts connections (kernel backlog) but never speaks: a hung member."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@pytest.fixture
def closed_endpoint() -> str:
    """A port nothing listens on (connection refused)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"127.0.0.1:{port}"


@pytest.mark.parametrize("kind", ["silent", "closed"])
def test_every_call_has_a_deadline(kind: str, silent_endpoint: str, closed_endpoint: str) -> None:
    endpoint = silent_endpoint if kind == "silent" else closed_endpoint

    async def main() -> None:
        store = EtcdStore([endpoint], call_timeout=0.4, connect_timeout=0.1)
        loop = asyncio.get_running_loop()
        calls: list[Any] = [
            store.put("/k", b"v"),
            store.get("/k"),
            store.range("/"),
            store.txn([], [Put("/k", b"")]),
            store.lease_grant(5),
            store.lease_keepalive(7),
            store.current_revision(),
        ]
        try:
            for call in calls:
                started = loop.time()
                with pytest.raises(StoreUnavailableError, match=r"within 0\.4s"):
                    await call
                assert loop.time() - started < 1.0
            watch = store.watch("/", start_revision=1)
            assert isinstance(store, EtcdStore)
        finally:
            await store.close()
        assert [event async for event in watch] == []  # closed: the watch just ends

    asyncio.run(main())


def test_a_watch_with_no_endpoint_raises_after_its_reconnect_timeout(closed_endpoint: str) -> None:
    async def main() -> None:
        store = EtcdStore([closed_endpoint], watch_reconnect_timeout=0.5, connect_timeout=0.1)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(StoreUnavailableError, match="resume from revision 5"):
                await anext(store.watch("/", start_revision=5))
            assert 0.4 <= loop.time() - started < 2.0
        finally:
            await store.close()

    asyncio.run(main())


def test_a_dead_first_endpoint_is_skipped(etcd_cluster: EtcdCluster, closed_endpoint: str) -> None:
    async def main() -> None:
        store = etcd_cluster.store([closed_endpoint, *etcd_cluster.endpoints], connect_timeout=2.0)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            await store.current_revision()
            assert loop.time() - started < 1.0  # refused at once, not after connect_timeout
            assert store.current_endpoint == etcd_cluster.endpoints[0]
        finally:
            await store.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- ranges


class CountingStore(EtcdStore):
    """Counts the range requests sent (to see the pagination happen)."""

    range_requests = 0

    async def _unary(self, what: str, stub: str, method: str, request: Any, **kwargs: Any) -> Any:
        if method in ("Range", "Txn"):
            self.range_requests += 1
        return await super()._unary(what, stub, method, request, **kwargs)


def test_big_range_is_paged_at_the_revision_of_its_first_page(etcd_backend: Backend) -> None:
    async def body(store: Store) -> None:
        assert isinstance(store, EtcdStore)
        for index in range(40):
            await store.put(f"/big/{index:02d}", b"v0")
        paged = CountingStore(store.endpoints, range_page_size=4, tls=store.tls, auth=store.auth)
        stop = asyncio.Event()

        async def churn() -> None:  # writes all through the paging, in the same prefix
            generation = 0
            while not stop.is_set():
                generation += 1
                await store.put(f"/big/{generation % 40:02d}", f"v{generation}".encode())
                await store.delete(f"/big/{(generation * 7) % 40:02d}")
                await store.put(f"/big/new{generation:04d}", b"")

        churning = asyncio.create_task(churn())
        try:
            await asyncio.sleep(0.05)
            result = await paged.range("/big/")
        finally:
            stop.set()
            await churning
            await paged.close()
        assert paged.range_requests >= 10  # 40+ keys in pages of 4
        snapshot = await store.range("/big/", revision=result.revision)
        assert result.kvs == snapshot.kvs  # exactly the state at one revision
        assert result.count == len(result.kvs) and not result.more

        limited = await EtcdStore(
            store.endpoints, range_page_size=3, tls=store.tls, auth=store.auth
        ).range("/big/", revision=result.revision, limit=7, start_after=result.kvs[2].key)
        assert limited.kvs == result.kvs[3:10]
        assert limited.count == result.count and limited.more

    etcd_backend.run(body)


# --------------------------------------------------------------------------- txn


def test_value_compare_on_a_missing_key_is_atomic_under_contention(etcd_backend: Backend) -> None:
    """etcd fails every value compare on a missing key; the backend evaluates such a txn itself
    and guards the write with mod_revisions: exactly one claimant may still win."""

    async def body(store: Store) -> None:
        async def claim(owner: int) -> bool:
            result = await store.txn(
                [Compare("/claim", "value", "!=", b"taken")],
                [Put("/claim", b"taken"), Put(f"/winner/{owner}", b"")],
            )
            return result.succeeded

        outcomes = await asyncio.gather(*(claim(owner) for owner in range(12)))
        assert outcomes.count(True) == 1
        winners = (await store.range("/winner/")).kvs
        assert [kv.key for kv in winners] == [f"/winner/{outcomes.index(True)}"]

    etcd_backend.run(body)


def test_txn_names_the_lease_etcd_does_not_know(etcd_backend: Backend) -> None:
    async def body(store: Store) -> None:
        known = await store.lease_grant(30)
        with pytest.raises(LeaseNotFoundError) as caught:
            await store.txn([], [Put("/l/a", b"", lease=known.id), Put("/l/b", b"", lease=424242)])
        assert caught.value.lease_id == 424242
        assert await store.get("/l/a") is None

    etcd_backend.run(body)


# --------------------------------------------------------------------------- close


def test_close_lets_a_lagging_watch_receive_what_was_committed_before(
    etcd_backend: Backend,
) -> None:
    """A watch that starts behind etcd's head is caught up only every 100 ms by etcd; close()
    waits (briefly) until such a watch has everything committed before it."""

    async def main() -> None:
        store = etcd_backend.open()
        first = await store.put("/lag/a", b"1")
        second = await store.put("/lag/b", b"2")

        async def consume() -> list[int]:
            return [event.revision async for event in store.watch("/lag/", start_revision=first)]

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0.01)  # the watch exists, etcd has not replayed history yet
        await store.close()
        assert await asyncio.wait_for(consumer, 2.0) == [first, second]

    for _ in range(3):  # etcd's replay timer is not ours: make a lucky pass unlikely
        asyncio.run(main())


def test_closing_a_watch_ends_a_reader_whose_grpc_read_ignores_cancellation(
    closed_endpoint: str,
) -> None:
    """grpcio's aio `call.read()` on an established stream can swallow its task's
    cancellation and wait for the next message (seen about once in 300 closes under load);
    `aclose()` must cancel the call itself, and the reader must end rather than reconnect."""

    class DeafRead:
        """A stream whose pending read ends only when the call is cancelled."""

        def __init__(self) -> None:
            self.cancelled = asyncio.Event()

        def cancel(self) -> None:
            self.cancelled.set()

        async def read(self) -> None:
            while not self.cancelled.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await self.cancelled.wait()
            raise StopAsyncIteration  # stands for the CANCELLED status a cancelled call ends with

    async def main() -> None:
        store = EtcdStore([closed_endpoint], connect_timeout=0.1)
        try:
            watch = store.watch("/", start_revision=1)
            call = DeafRead()

            async def reader() -> None:
                watch._call = call  # type: ignore[attr-defined]
                with contextlib.suppress(StopAsyncIteration):
                    await call.read()

            watch._reader = asyncio.create_task(reader())  # type: ignore[attr-defined]
            await asyncio.sleep(0)
            await asyncio.wait_for(close_watch(watch), 1.0)
            assert call.cancelled.is_set()
            assert watch._reader.done()  # type: ignore[attr-defined]
            assert [event async for event in watch] == []
        finally:
            await store.close()

    asyncio.run(main())
