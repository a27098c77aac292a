"""SQLite-backend specifics: several processes on one file, locks, corruption, persistence,
store URLs. The backend-independent semantics are in `test_contract.py`."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Literal

import pytest

from hivenet.store import (
    Event,
    EventType,
    InvalidRequestError,
    Put,
    SqliteStore,
    StoreCorruptError,
    StoreUnavailableError,
    open_store,
)
from tests.store.conftest import FakeClock
from tests.store.multiprocess_worker import Report, run_worker


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


# --------------------------------------------------------------------------- processes


def test_four_processes_each_see_every_event_once_in_order(tmp_path: Path) -> None:
    path = str(tmp_path / "hn-shared.db")
    workers, writes = 4, 40
    # Each worker: `writes` puts/txns, then one prefix delete of its 5 keys (one event each).
    total = workers * (writes + 5)

    async def prepare() -> int:
        store = SqliteStore(path)
        await store.put("/before", b"not watched")
        start = await store.current_revision() + 1
        await store.close()
        return start

    start = asyncio.run(prepare())
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.queues.Queue[Report] = context.Queue()
    processes = [
        context.Process(
            target=run_worker,
            args=(path, worker, writes, start, total, results),
            name=f"hn-store-worker-{worker}",
        )
        for worker in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        reports = dict(results.get(timeout=60) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    failures = {worker: report for worker, report in reports.items() if isinstance(report, str)}
    assert not failures
    assert [process.exitcode for process in processes] == [0] * workers

    streams = list(reports.values())
    reference = streams[0]
    assert isinstance(reference, list)
    assert len(reference) == total
    for stream in streams[1:]:
        assert stream == reference  # same events, same order, no duplicates, nothing missing
    revisions = [revision for _, _, _, revision in reference]
    assert revisions == sorted(revisions)
    puts = [event for event in reference if event[0] == "put"]
    deletes = [event for event in reference if event[0] == "delete"]
    assert len(puts) == workers * writes and len(deletes) == workers * 5
    # Every write got its own revision; each prefix delete shared one for its 5 keys.
    assert len(set(revisions)) == workers * writes + workers
    assert revisions[0] == start and revisions[-1] == start + workers * writes + workers - 1

    async def check_log() -> None:
        store = SqliteStore(path)
        logged = [event async for event in _until(store, "/mp/", start, total)]
        assert [(e.type.value, e.kv.key, e.kv.value, e.revision) for e in logged] == reference
        await store.close()

    run(check_log)


async def _until(store: SqliteStore, prefix: str, start: int, count: int) -> AsyncIterator[Event]:
    events = store.watch(prefix, start_revision=start)
    for _ in range(count):
        yield await asyncio.wait_for(anext(events), 5)


def test_second_connection_sees_writes_by_polling_and_expires_leases_once(tmp_path: Path) -> None:
    path = str(tmp_path / "hn-two.db")
    clock = FakeClock()

    async def body() -> None:
        writer = SqliteStore(path, clock=clock, lease_check_interval=0.01)
        reader = SqliteStore(path, clock=clock, lease_check_interval=0.01)
        try:
            start = await reader.current_revision() + 1
            events = reader.watch("/p/", start_revision=start)
            lease = await writer.lease_grant(5)
            await writer.put("/p/host", b"alive", lease=lease.id)
            sent = time.monotonic()
            event = await asyncio.wait_for(anext(events), 2)
            # Different store objects share no in-process wake-up: this came by polling.
            assert event.kv.key == "/p/host" and time.monotonic() - sent < 0.5
            assert await reader.lease_keepalive(lease.id) == 5  # leases live in the file
            clock.advance(6)  # both stores' background tasks race to expire it
            deleted = await asyncio.wait_for(anext(events), 2)
            assert deleted.type is EventType.DELETE
            await asyncio.sleep(0.1)
            assert await writer.current_revision() == deleted.revision  # expired exactly once
            await events.aclose()  # type: ignore[attr-defined]  # SqliteStore's watch has it
        finally:
            await writer.close()
            await reader.close()

    run(body)


# --------------------------------------------------------------------------- locking


@pytest.mark.parametrize("execution", ["auto", "thread", "loop"])
def test_locked_database_gives_unavailable_and_writes_nothing(
    tmp_path: Path, execution: Literal["auto", "thread", "loop"]
) -> None:
    path = str(tmp_path / "hn-locked.db")

    async def body() -> None:
        store = SqliteStore(path, busy_timeout=0.3, execution=execution)
        try:
            await store.put("/k", b"before")
            before = await store.current_revision()
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticking = asyncio.create_task(tick())
            started = time.monotonic()
            try:
                with pytest.raises(StoreUnavailableError, match="locked") as caught:
                    await store.put("/k", b"during")
                assert path in str(caught.value)
                assert time.monotonic() - started >= 0.25  # it waited the busy timeout
                if execution != "loop":
                    # The wait ran on the worker thread: the event loop kept running meanwhile.
                    assert ticks >= 10
                else:
                    assert ticks <= 1  # "loop" execution blocks the loop while it waits
                # WAL: readers are not blocked by a writer.
                assert (await store.get("/k")).value == b"before"  # type: ignore[union-attr]
            finally:
                ticking.cancel()
                blocker.execute("ROLLBACK")
                blocker.close()
            assert await store.current_revision() == before
            assert await store.put("/k", b"after") == before + 1
        finally:
            await store.close()

    run(body)


def test_creating_a_store_on_a_locked_new_file_gives_unavailable(tmp_path: Path) -> None:
    path = str(tmp_path / "hn-new-locked.db")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("PRAGMA journal_mode = WAL")
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailableError, match="locked"):
            SqliteStore(path, busy_timeout=0.1)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_unopenable_path_gives_unavailable_naming_it(tmp_path: Path) -> None:
    path = str(tmp_path / "no-such-dir" / "hn.db")
    with pytest.raises(StoreUnavailableError) as caught:
        SqliteStore(path)
    assert path in str(caught.value)


# --------------------------------------------------------------------------- corruption


def test_non_sqlite_file_gives_corrupt_error_naming_path(tmp_path: Path) -> None:
    path = tmp_path / "hn-garbage.db"
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 200)
    with pytest.raises(StoreCorruptError) as caught:
        SqliteStore(path)
    assert str(path) in str(caught.value)
    assert path.read_bytes().startswith(b"this is not a database")  # nothing written


def test_clobbered_header_gives_corrupt_error(tmp_path: Path) -> None:
    path = tmp_path / "hn-header.db"
    _make_store_file(path, keys=10)
    with path.open("r+b") as database:
        database.write(b"\xa5" * 100)
    with pytest.raises(StoreCorruptError, match=str(path)):
        SqliteStore(path)


def test_damaged_pages_give_corrupt_error_on_read(tmp_path: Path) -> None:
    path = tmp_path / "hn-pages.db"
    _make_store_file(path, keys=2000)
    size = path.stat().st_size
    with sqlite3.connect(path) as connection:
        page_size = int(connection.execute("PRAGMA page_size").fetchone()[0])
    connection.close()
    assert size > 8 * page_size
    with path.open("r+b") as database:
        database.seek(2 * page_size)
        database.write(b"\xa5" * (size - 2 * page_size))

    async def body() -> None:
        store = SqliteStore(path)
        try:
            await store.range("/k/")
            await store.put("/k/new", b"")
        finally:
            await store.close()

    with pytest.raises(StoreCorruptError, match=str(path)):
        run(body)


def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hn-foreign.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE users (name TEXT)")
    connection.close()
    with pytest.raises(StoreCorruptError, match="not a HiveNet store"):
        SqliteStore(path)


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hn-future.db"
    _make_store_file(path, keys=1)
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE meta SET value = 99 WHERE name = 'schema_version'")
    connection.close()
    with pytest.raises(StoreCorruptError, match="schema version 99"):
        SqliteStore(path)


def _page_stats(path: Path) -> tuple[int, int]:
    """The file's page size and how many overflow pages its `kv` table uses."""
    with sqlite3.connect(path) as connection:
        page_size = int(connection.execute("PRAGMA page_size").fetchone()[0])
        overflow = connection.execute(
            "SELECT COUNT(*) FROM dbstat WHERE name = 'kv' AND pagetype = 'overflow'"
        ).fetchone()[0]
    connection.close()
    return page_size, int(overflow)


def test_new_store_keeps_rule_sized_values_in_their_leaf_pages(tmp_path: Path) -> None:
    """A stored rule is ~1.1 kB of JSON: with SQLite's default 4 KB pages each spilled into
    an overflow page of its own (one more page read per rule at an agent's start-up)."""
    path = tmp_path / "hn-pages.db"

    async def body() -> None:
        store = SqliteStore(path)
        try:
            await store.txn([], [Put(f"/k/{i:04d}", b"r" * 1400) for i in range(200)])
        finally:
            await store.close()

    run(body)
    assert _page_stats(path) == (8192, 0)


def test_existing_store_keeps_its_page_size(tmp_path: Path) -> None:
    """A store created with 4 KB pages (before HiveNet chose 8 KB) opens, reads and writes as
    before: the page size of a database is fixed when it is created."""
    path = tmp_path / "hn-old-pages.db"
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA page_size = 4096")
        connection.execute("PRAGMA journal_mode = WAL").fetchone()
    connection.close()
    _make_store_file(path, keys=3)

    async def body() -> None:
        store = SqliteStore(path)
        try:
            await store.put("/k/big", b"r" * 1400)
            assert [kv.key for kv in (await store.range("/k/")).kvs] == [
                "/k/00000",
                "/k/00001",
                "/k/00002",
                "/k/big",
            ]
        finally:
            await store.close()

    run(body)
    page_size, overflow = _page_stats(path)
    assert page_size == 4096
    assert overflow >= 1  # the 1.4 kB value did not fit its 4 KB leaf: the old layout


def _make_store_file(path: Path, *, keys: int) -> None:
    async def fill() -> None:
        store = SqliteStore(path)
        await store.txn([], [])
        for index in range(keys):
            await store.put(f"/k/{index:05d}", b"v" * 100)
        await store.close()

    run(fill)


# --------------------------------------------------------------------------- persistence


def test_state_history_and_leases_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "hn-persist.db"

    async def body() -> None:
        store = SqliteStore(path)
        first = await store.put("/k", b"1")
        lease = await store.lease_grant(60)
        await store.put("/leased", b"x", lease=lease.id)
        last = await store.put("/k", b"2")
        await store.close()

        reopened = SqliteStore(path)
        try:
            assert await reopened.current_revision() == last
            assert (await reopened.get("/k")).value == b"2"  # type: ignore[union-attr]
            assert [kv.value for kv in (await reopened.range("/k", revision=first)).kvs] == [b"1"]
            history = [event async for event in _until(reopened, "/", first, 3)]
            assert [event.revision for event in history] == [first, first + 1, last]
            assert await reopened.lease_keepalive(lease.id) == 60
            newer = await reopened.lease_grant(5)
            assert newer.id > lease.id  # lease ids are never reused
        finally:
            await reopened.close()

    run(body)


# --------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("memory://", ":memory:"),
        ("sqlite:///:memory:", ":memory:"),
        ("sqlite:///{tmp}/hn-url.db", "{tmp}/hn-url.db"),
        ("sqlite:////{tmp}/hn-url.db", "{tmp}/hn-url.db"),
    ],
)
def test_open_store_urls(tmp_path: Path, url: str, path: str) -> None:
    tmp = str(tmp_path).lstrip("/")
    store = open_store(url.format(tmp=tmp))
    assert isinstance(store, SqliteStore)
    assert store.path == path.format(tmp="/" + tmp)
    asyncio.run(store.close())


def test_memory_stores_are_independent() -> None:
    async def body() -> None:
        first, second = open_store("memory://"), open_store("memory://")
        await first.put("/k", b"1")
        assert await second.get("/k") is None
        await first.close()
        await second.close()

    run(body)


def test_etcd_url_opens_the_etcd_backend() -> None:
    # Lazily: nothing connects until the first call (tests/store/test_etcd_store.py has more).
    store = open_store("etcd://127.0.0.1:2379,127.0.0.1:22379")
    assert not isinstance(store, SqliteStore)
    assert store.endpoints == ["127.0.0.1:2379", "127.0.0.1:22379"]  # type: ignore[attr-defined]
    asyncio.run(store.close())


@pytest.mark.parametrize("url", ["http://localhost/db", "sqlite://relative.db", "sqlite:///", ""])
def test_bad_urls_are_rejected_naming_the_url(url: str) -> None:
    with pytest.raises(InvalidRequestError, match="store url"):
        open_store(url)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"execution": "sometimes"}, "execution"),
        ({"busy_timeout": -1}, "busy_timeout"),
        ({"watch_poll_interval": "fast"}, "watch_poll_interval"),
        ({"lease_check_interval": -0.5}, "lease_check_interval"),
    ],
)
def test_bad_store_options_are_rejected_naming_them(
    tmp_path: Path, options: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        open_store(f"sqlite://{tmp_path}/hn-options.db", **options)
    assert not (tmp_path / "hn-options.db").exists()  # rejected before touching the disk
