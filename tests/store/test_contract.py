"""The `Store` contract (etcd v3 semantics), run against every backend in `conftest.BACKEND_NAMES`.

Revisions are asserted relative to the store's starting revision, so a backend that starts at
another number (etcd starts at 1, like ours) passes the same tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from hivenet.store import (
    CompactedError,
    Compare,
    Delete,
    Event,
    EventType,
    FutureRevisionError,
    Get,
    InvalidRequestError,
    KeyValue,
    LeaseNotFoundError,
    Put,
    Store,
    StoreUnavailableError,
)
from tests.store.conftest import Backend, FakeClock


async def take(events: AsyncIterator[Event], count: int, timeout: float = 5.0) -> list[Event]:
    """The next `count` events, failing the test if they do not come within `timeout`."""

    async def collect() -> list[Event]:
        return [await anext(events) for _ in range(count)]

    return await asyncio.wait_for(collect(), timeout)


async def assert_quiet(events: AsyncIterator[Event], seconds: float = 0.1) -> None:
    """No further event arrives within `seconds`."""
    pending = asyncio.ensure_future(anext(events))
    done, _ = await asyncio.wait({pending}, timeout=seconds)
    if done:
        raise AssertionError(f"unexpected event {pending.result()}")
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending


async def close_watch(events: AsyncIterator[Event]) -> None:
    """Disconnect a watch: every backend's watch iterator must support `aclose()`."""
    aclose = getattr(events, "aclose", None)
    assert aclose is not None, f"watch iterator {events!r} cannot be closed"
    await aclose()


def summary(events: list[Event]) -> list[tuple[str, str, bytes, int]]:
    return [(event.type.value, event.kv.key, event.kv.value, event.revision) for event in events]


# --------------------------------------------------------------------------- key values


def test_every_put_bumps_revision_by_one(backend: Backend) -> None:
    async def body(store: Store) -> None:
        start = await store.current_revision()
        assert start >= 1
        revisions = [await store.put(f"/k/{index}", b"v") for index in range(5)]
        assert revisions == [start + 1 + index for index in range(5)]
        assert await store.current_revision() == start + 5

    backend.run(body)


def test_versions_and_create_revision_follow_etcd(backend: Backend) -> None:
    async def body(store: Store) -> None:
        assert await store.get("/k") is None
        first = await store.put("/k", b"one")
        second = await store.put("/k", b"two")
        assert await store.get("/k") == KeyValue("/k", b"two", first, second, 2, 0)
        assert await store.delete("/k") == 1
        assert await store.get("/k") is None
        recreated = await store.put("/k", b"three")
        # A delete resets the version and the next put starts a new generation.
        assert await store.get("/k") == KeyValue("/k", b"three", recreated, recreated, 1, 0)
        assert recreated == second + 2

    backend.run(body)


def test_delete_of_missing_key_changes_nothing(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.put("/k", b"v")
        before = await store.current_revision()
        assert await store.delete("/missing") == 0
        assert await store.delete("/nothing/", prefix=True) == 0
        assert await store.current_revision() == before

    backend.run(body)


def test_delete_prefix_removes_only_that_prefix_in_one_revision(backend: Backend) -> None:
    async def body(store: Store) -> None:
        for key in ("/a/1", "/a/2", "/a/3/x", "/ab", "/a"):
            await store.put(key, key.encode())
        before = await store.current_revision()
        events = store.watch("/", start_revision=before + 1)
        assert await store.delete("/a/", prefix=True) == 3
        assert await store.current_revision() == before + 1
        remaining = await store.range("/")
        assert [kv.key for kv in remaining.kvs] == ["/a", "/ab"]
        deleted = await take(events, 3)
        assert summary(deleted) == [
            ("delete", "/a/1", b"", before + 1),
            ("delete", "/a/2", b"", before + 1),
            ("delete", "/a/3/x", b"", before + 1),
        ]
        assert [event.prev_kv.value for event in deleted if event.prev_kv] == [
            b"/a/1",
            b"/a/2",
            b"/a/3/x",
        ]
        await close_watch(events)

    backend.run(body)


def test_values_are_opaque_bytes(backend: Backend) -> None:
    async def body(store: Store) -> None:
        blob = bytes(range(256)) * 40
        await store.put("/blob", blob)
        await store.put("/empty", b"")
        await store.put("/ключ/ü/🙂", b"\x00")
        assert (await store.get("/blob")).value == blob  # type: ignore[union-attr]
        assert (await store.get("/empty")).value == b""  # type: ignore[union-attr]
        assert (await store.get("/ключ/ü/🙂")).value == b"\x00"  # type: ignore[union-attr]

    backend.run(body)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda store: store.put("", b"v"), "key"),
        (lambda store: store.put(7, b"v"), "key"),
        (lambda store: store.put("/k", "text"), "value"),
        (lambda store: store.put("/k", b"v", lease=-1), "lease"),
        (lambda store: store.get(None), "key"),
        (lambda store: store.range("/", limit=-1), "limit"),
        (lambda store: store.range("/", revision=-3), "revision"),
        (lambda store: store.range(b"/"), "prefix"),
        (lambda store: store.delete(""), "key"),
        (lambda store: store.lease_grant(0), "ttl"),
        (lambda store: store.lease_keepalive(0), "lease_id"),
        (lambda store: store.compact(0), "revision"),
        (lambda store: store.txn([Compare("/k", "version", "~", 1)], []), "compare.op"),  # type: ignore[arg-type]
        (lambda store: store.txn([Compare("/k", "colour", "==", 1)], []), "compare.target"),  # type: ignore[arg-type]
        (lambda store: store.txn([Compare("/k", "value", "==", 1)], []), "compare.value"),
        (lambda store: store.txn([Compare("/k", "version", "==", b"1")], []), "compare.value"),
        (lambda store: store.txn([], [Put("/k", b"1"), Put("/k", b"2")]), "put more than once"),
        (lambda store: store.txn([], [Put("/a/k", b"1"), Delete("/a/", True)]), "put and deleted"),
        (lambda store: store.txn([], ["put /k"]), "success ops"),
    ],
)
def test_bad_input_is_rejected_naming_the_field(backend: Backend, call: object, field: str) -> None:
    async def body(store: Store) -> None:
        before = await store.current_revision()
        with pytest.raises(InvalidRequestError, match=field):
            await call(store)  # type: ignore[operator]
        assert await store.current_revision() == before

    backend.run(body)


async def _watch_first(store: Store, prefix: str, start_revision: int) -> Event:
    async for event in store.watch(prefix, start_revision=start_revision):
        return event
    raise AssertionError("watch ended")


def test_watch_with_bad_start_revision_is_rejected(backend: Backend) -> None:
    async def body(store: Store) -> None:
        with pytest.raises(InvalidRequestError, match="start_revision"):
            await _watch_first(store, "/", 0)

    backend.run(body)


# --------------------------------------------------------------------------- range


def test_range_is_sorted_and_respects_prefix_boundaries(backend: Backend) -> None:
    async def body(store: Store) -> None:
        keys = ["/t/b", "/t/a", "/t/a/z", "/t/\U0010ffff", "/t/é", "/t", "/u/a", "/s/z"]
        for key in keys:
            await store.put(key, b"")
        result = await store.range("/t/")
        expected = sorted(key for key in keys if key.startswith("/t/"))
        assert [kv.key for kv in result.kvs] == expected
        assert result.count == len(expected)
        assert not result.more
        assert result.revision == await store.current_revision()
        everything = await store.range("")
        assert [kv.key for kv in everything.kvs] == sorted(keys)
        high = await store.range("/t/\U0010ffff")
        assert [kv.key for kv in high.kvs] == ["/t/\U0010ffff"]

    backend.run(body)


def test_range_pagination_visits_every_key_once(backend: Backend) -> None:
    async def body(store: Store) -> None:
        keys = [f"/p/{index:03d}" for index in range(23)]
        for key in reversed(keys):
            await store.put(key, key.encode())
        await store.put("/q/outside", b"")
        seen: list[str] = []
        start_after: str | None = None
        pages = 0
        while True:
            page = await store.range("/p/", limit=5, start_after=start_after)
            pages += 1
            assert page.count == 23
            assert len(page.kvs) <= 5
            seen.extend(kv.key for kv in page.kvs)
            if not page.more:
                break
            start_after = page.kvs[-1].key
        assert seen == keys
        assert pages == 5
        exact = await store.range("/p/", limit=23)
        assert len(exact.kvs) == 23 and not exact.more

    backend.run(body)


def test_range_at_past_revisions_sees_each_snapshot(backend: Backend) -> None:
    async def body(store: Store) -> None:
        snapshots: dict[int, dict[str, bytes]] = {}
        state: dict[str, bytes] = {}
        steps: list[tuple[str, str, bytes]] = [
            ("put", "/h/a", b"1"),
            ("put", "/h/b", b"1"),
            ("put", "/h/a", b"2"),
            ("delete", "/h/a", b""),
            ("put", "/h/c", b"1"),
            ("delete_prefix", "/h/", b""),
            ("put", "/h/a", b"3"),
        ]
        for action, key, value in steps:
            if action == "put":
                revision = await store.put(key, value)
                state[key] = value
            else:
                await store.delete(key, prefix=action == "delete_prefix")
                revision = await store.current_revision()
                for doomed in [
                    k for k in state if k == key or (action != "delete" and k.startswith(key))
                ]:
                    del state[doomed]
            snapshots[revision] = dict(state)
        for revision, expected in snapshots.items():
            result = await store.range("/h/", revision=revision)
            assert result.revision == revision
            assert {kv.key: kv.value for kv in result.kvs} == expected, revision
            assert result.count == len(expected)
        current = await store.current_revision()
        with pytest.raises(FutureRevisionError):
            await store.range("/h/", revision=current + 1)

    backend.run(body)


def test_historical_range_paginates(backend: Backend) -> None:
    async def body(store: Store) -> None:
        for index in range(10):
            await store.put(f"/h/{index}", b"old")
        snapshot = await store.current_revision()
        await store.delete("/h/", prefix=True)
        page = await store.range("/h/", revision=snapshot, limit=4, start_after="/h/3")
        assert [kv.key for kv in page.kvs] == ["/h/4", "/h/5", "/h/6", "/h/7"]
        assert page.more and page.count == 10

    backend.run(body)


def test_historical_pages_skip_deleted_keys_and_fill_up(backend: Backend) -> None:
    """Pages of a past revision whose prefix has runs of deleted keys (deleted before the
    snapshot, or deleted and written again after it): every page but the last is full, the
    pages together are exactly the snapshot, and `count` is the snapshot's size."""

    async def body(store: Store) -> None:
        for index in range(40):
            await store.put(f"/g/{index:02d}", f"v{index}".encode())
        for index in [*range(3, 11), 17, 18, 25, *range(30, 38)]:
            await store.delete(f"/g/{index:02d}")
        await store.put("/g/04", b"back")  # a deleted key written again before the snapshot
        snapshot = await store.current_revision()
        expected = (await store.range("/g/")).kvs
        for index in (0, 4, 17, 39):  # changed or deleted after the snapshot
            await store.put(f"/g/{index:02d}", b"later")
        await store.delete("/g/01")
        await store.put("/g/99", b"new")
        assert len(expected) == 40 - 19 + 1
        for size in (1, 3, 7, 50):
            seen: list[KeyValue] = []
            start_after: str | None = None
            while True:
                page = await store.range(
                    "/g/", revision=snapshot, limit=size, start_after=start_after
                )
                assert page.count == len(expected) and page.revision == snapshot
                seen.extend(page.kvs)
                if not page.more:
                    break
                assert len(page.kvs) == size, (size, start_after)
                start_after = page.kvs[-1].key
            assert seen == expected, size

    backend.run(body)


# --------------------------------------------------------------------------- compaction


def test_compaction_drops_old_revisions_but_keeps_current_state(backend: Backend) -> None:
    async def body(store: Store) -> None:
        first = await store.put("/c/a", b"1")  # never touched again: must survive compaction
        await store.put("/c/b", b"1")
        await store.put("/c/b", b"2")
        await store.put("/c/gone", b"x")
        await store.delete("/c/gone")
        compact_at = await store.put("/c/b", b"3")
        later = await store.put("/c/d", b"1")
        await store.compact(compact_at)
        for revision in (first, compact_at):
            with pytest.raises(CompactedError) as caught:
                await store.range("/c/", revision=revision)
            assert caught.value.compact_revision == compact_at
        after = await store.range("/c/", revision=later)
        assert {kv.key: kv.value for kv in after.kvs} == {"/c/a": b"1", "/c/b": b"3", "/c/d": b"1"}
        now = await store.range("/c/")
        assert {kv.key: kv.value for kv in now.kvs} == {"/c/a": b"1", "/c/b": b"3", "/c/d": b"1"}
        with pytest.raises(CompactedError):
            await store.compact(compact_at)
        with pytest.raises(FutureRevisionError):
            await store.compact(later + 1)

    backend.run(body)


def test_watch_below_compaction_raises_and_above_keeps_prev_kv(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.put("/w/a", b"1")
        compact_at = await store.put("/w/b", b"1")
        await store.compact(compact_at)
        with pytest.raises(CompactedError):
            await _watch_first(store, "/w/", compact_at)
        update = await store.put("/w/a", b"2")
        event = await _watch_first(store, "/w/", compact_at + 1)
        assert event.revision == update
        assert event.prev_kv is not None and event.prev_kv.value == b"1"

    backend.run(body)


def test_lagging_watcher_gets_compacted_error_caught_up_watcher_does_not(backend: Backend) -> None:
    async def body(store: Store) -> None:
        start = await store.current_revision() + 1
        for index in range(3):
            await store.put(f"/l/{index}", b"")
        caught_up = store.watch("/l/", start_revision=start)
        assert len(await take(caught_up, 3)) == 3
        await assert_quiet(caught_up, 0.02)  # it has polled past the last revision
        lagging = store.watch("/l/", start_revision=start)
        await store.compact(await store.current_revision())
        with pytest.raises(CompactedError):
            await anext(lagging)
        newest = await store.put("/l/new", b"")
        assert summary(await take(caught_up, 1)) == [("put", "/l/new", b"", newest)]
        await close_watch(caught_up)

    backend.run(body)


# --------------------------------------------------------------------------- txn


def test_txn_compares_on_every_target(backend: Backend) -> None:
    async def body(store: Store) -> None:
        lease = await store.lease_grant(60)
        created = await store.put("/x", b"b", lease=lease.id)
        modified = await store.put("/x", b"m", lease=lease.id)
        cases: list[tuple[Compare, bool]] = [
            (Compare("/x", "value", "==", b"m"), True),
            (Compare("/x", "value", "!=", b"m"), False),
            (Compare("/x", "value", "<", b"n"), True),
            (Compare("/x", "value", ">", b"n"), False),
            (Compare("/x", "version", "==", 2), True),
            (Compare("/x", "version", ">", 2), False),
            (Compare("/x", "create_revision", "==", created), True),
            (Compare("/x", "create_revision", "<", created), False),
            (Compare("/x", "mod_revision", "==", modified), True),
            (Compare("/x", "mod_revision", "!=", modified), False),
            (Compare("/x", "lease", "==", lease.id), True),
            (Compare("/x", "lease", "==", 0), False),
            # A missing key reads as version/revisions/lease 0 and value b"".
            (Compare("/missing", "version", "==", 0), True),
            (Compare("/missing", "create_revision", "==", 0), True),
            (Compare("/missing", "mod_revision", ">", 0), False),
            (Compare("/missing", "lease", "==", 0), True),
            (Compare("/missing", "value", "==", b""), True),
        ]
        for compare, expected in cases:
            result = await store.txn([compare], [Get("/x")], [])
            assert result.succeeded is expected, compare
        both = await store.txn([cases[0][0], cases[1][0]], [], [])
        assert not both.succeeded  # all compares must hold

    backend.run(body)


def test_txn_success_branch_is_one_revision_with_ordered_responses(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.put("/t/old", b"o")
        await store.put("/t/del/1", b"d")
        await store.put("/t/del/2", b"d")
        before = await store.current_revision()
        events = store.watch("/t/", start_revision=before + 1)
        result = await store.txn(
            [Compare("/t/new", "create_revision", "==", 0)],
            [
                Put("/t/new", b"n"),
                Put("/t/old", b"o2"),
                Get("/t/", prefix=True),
                Delete("/t/del/", prefix=True),
                Get("/t/new"),
                Delete("/t/none"),
            ],
            [Put("/t/failure", b"f")],
        )
        assert result.succeeded
        assert result.revision == before + 1 == await store.current_revision()
        created, replaced, listed, deleted, got, none_deleted = result.responses
        assert created is None
        assert isinstance(replaced, KeyValue) and replaced.value == b"o"
        assert isinstance(listed, list)
        assert [kv.key for kv in listed] == ["/t/del/1", "/t/del/2", "/t/new", "/t/old"]
        assert listed[2].mod_revision == before + 1  # Get sees the txn's own earlier Put
        assert deleted == 2
        assert isinstance(got, list) and [kv.value for kv in got] == [b"n"]
        assert none_deleted == 0
        assert summary(await take(events, 4)) == [
            ("put", "/t/new", b"n", before + 1),
            ("put", "/t/old", b"o2", before + 1),
            ("delete", "/t/del/1", b"", before + 1),
            ("delete", "/t/del/2", b"", before + 1),
        ]
        assert await store.get("/t/failure") is None
        await close_watch(events)

    backend.run(body)


def test_failed_compare_changes_nothing_and_runs_failure_branch(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.put("/f/k", b"v1")
        before = await store.current_revision()
        untouched = await store.txn(
            [Compare("/f/k", "value", "==", b"other")], [Put("/f/k", b"v2"), Delete("/f/x")]
        )
        assert not untouched.succeeded
        assert untouched.responses == []
        assert untouched.revision == before == await store.current_revision()
        assert (await store.get("/f/k")).value == b"v1"  # type: ignore[union-attr]
        failure = await store.txn(
            [Compare("/f/k", "version", ">", 5)],
            [Put("/f/k", b"v2")],
            [Get("/f/k"), Put("/f/conflict", b"1")],
        )
        assert not failure.succeeded
        assert failure.revision == before + 1
        assert failure.responses[0] == [await store.get("/f/k")]
        assert (await store.get("/f/conflict")) is not None
        read_only = await store.txn([], [Get("/f/k")])
        assert read_only.succeeded and read_only.revision == before + 1

    backend.run(body)


def test_txn_that_fails_midway_is_rolled_back_entirely(backend: Backend) -> None:
    async def body(store: Store) -> None:
        await store.put("/r/k", b"keep")
        before = await store.current_revision()
        with pytest.raises(LeaseNotFoundError):
            await store.txn(
                [],
                [
                    Put("/r/k", b"lost"),
                    Delete("/r/", prefix=False),
                    Put("/r/leased", b"x", lease=987654),
                ],
            )
        assert await store.current_revision() == before
        assert (await store.get("/r/k")).value == b"keep"  # type: ignore[union-attr]
        assert await store.get("/r/leased") is None
        events = store.watch("/r/", start_revision=before + 1)
        await assert_quiet(events)
        await close_watch(events)

    backend.run(body)


def test_concurrent_compare_and_swap_lets_exactly_one_writer_win(backend: Backend) -> None:
    async def body(store: Store) -> None:
        async def claim(owner: int) -> bool:
            result = await store.txn(
                [Compare("/lock", "create_revision", "==", 0)], [Put("/lock", str(owner).encode())]
            )
            return result.succeeded

        outcomes = await asyncio.gather(*(claim(owner) for owner in range(20)))
        assert outcomes.count(True) == 1
        winner = outcomes.index(True)
        assert (await store.get("/lock")).value == str(winner).encode()  # type: ignore[union-attr]

    backend.run(body)


def test_concurrent_puts_get_distinct_consecutive_revisions(backend: Backend) -> None:
    async def body(store: Store) -> None:
        start = await store.current_revision()
        revisions = await asyncio.gather(*(store.put(f"/c/{n}", b"") for n in range(50)))
        assert sorted(revisions) == list(range(start + 1, start + 51))

    backend.run(body)


# --------------------------------------------------------------------------- watch


def test_watch_delivers_history_then_live_events_with_prev_kv(backend: Backend) -> None:
    async def body(store: Store) -> None:
        first = await store.put("/w/a", b"1")
        await store.put("/other", b"ignored")
        second = await store.put("/w/a", b"2")
        events = store.watch("/w/", start_revision=first)
        history = await take(events, 2)
        assert summary(history) == [("put", "/w/a", b"1", first), ("put", "/w/a", b"2", second)]
        assert history[0].prev_kv is None
        assert history[1].prev_kv == KeyValue("/w/a", b"1", first, first, 1, 0)
        await store.delete("/w/a")
        live = await take(events, 1)
        assert live[0].type is EventType.DELETE
        assert live[0].kv == KeyValue("/w/a", b"", 0, second + 1, 0, 0)
        assert live[0].prev_kv == KeyValue("/w/a", b"2", first, second, 2, 0)
        await close_watch(events)

    backend.run(body)


def test_watch_from_a_future_revision_waits_for_it(backend: Backend) -> None:
    async def body(store: Store) -> None:
        start = await store.current_revision()
        events = store.watch("/f/", start_revision=start + 3)
        for index in range(4):
            await store.put("/f/k", str(index).encode())
        assert summary(await take(events, 2)) == [
            ("put", "/f/k", b"2", start + 3),
            ("put", "/f/k", b"3", start + 4),
        ]
        await close_watch(events)

    backend.run(body)


def test_watch_resume_after_disconnect_is_exactly_once(backend: Backend) -> None:
    async def body(store: Store) -> None:
        start = await store.current_revision() + 1
        writer_done = asyncio.Event()

        async def writer() -> None:
            for index in range(60):
                await store.put(f"/e/{index % 7}", str(index).encode())
                if index % 9 == 0:
                    await asyncio.sleep(0)
            writer_done.set()

        received: list[Event] = []
        next_revision = start
        writing = asyncio.create_task(writer())
        while len(received) < 60:
            events = store.watch("/e/", start_revision=next_revision)
            # Disconnect after a few events: the next watch resumes from last revision + 1.
            for event in await take(events, min(7, 60 - len(received))):
                received.append(event)
                next_revision = event.revision + 1
            await close_watch(events)
        await writing
        assert [event.kv.value for event in received] == [str(n).encode() for n in range(60)]
        assert [event.revision for event in received] == list(range(start, start + 60))

    backend.run(body)


def test_watchers_see_their_prefix_only_and_all_see_same_order(backend: Backend) -> None:
    async def body(store: Store) -> None:
        start = await store.current_revision() + 1
        watchers = {
            prefix: store.watch(prefix, start_revision=start) for prefix in ("/a/", "/b/", "/")
        }
        for index in range(30):
            await store.put(f"/{'ab'[index % 2]}/{index}", b"")
        got = {
            prefix: await take(events, 30 if prefix == "/" else 15)
            for prefix, events in watchers.items()
        }
        assert all(event.kv.key.startswith("/a/") for event in got["/a/"])
        assert all(event.kv.key.startswith("/b/") for event in got["/b/"])
        merged = sorted(got["/a/"] + got["/b/"], key=lambda event: event.revision)
        assert summary(merged) == summary(got["/"])
        for events in watchers.values():
            await assert_quiet(events, 0.02)
            await close_watch(events)

    backend.run(body)


def test_many_watches_of_one_prefix_each_get_their_own_exact_stream(backend: Backend) -> None:
    """Watches of one prefix that started at different revisions (past, present, future),
    joined late, or read at different paces each get exactly the events from their start,
    in order; writes under another prefix reach none of them. (The SQLite backend shares one
    poll among watches at the same place in the log: this is what must not leak.)"""

    async def body(store: Store) -> None:
        base = await store.current_revision()
        await store.put("/w/k0", b"0")  # base + 1
        await store.put("/w/k1", b"1")  # base + 2
        starts = [base + 1, base + 2, base + 3, base + 3, base + 5, base + 8]
        watches = [store.watch("/w/", start_revision=start) for start in starts]
        lease = await store.lease_grant(60)
        expected: list[tuple[str, str, bytes, int]] = [
            ("put", "/w/k0", b"0", base + 1),
            ("put", "/w/k1", b"1", base + 2),
        ]
        # Every other step also writes under another prefix, which no watch here sees.
        for step in range(8):
            if step == 3:
                await store.delete("/w/k0")
                change = ("delete", "/w/k0", b"")
            elif step == 5:
                await store.put("/w/leased", b"l", lease=lease.id)
                change = ("put", "/w/leased", b"l")
            elif step == 6:
                await store.lease_revoke(lease.id)
                change = ("delete", "/w/leased", b"")
            else:
                await store.put(f"/w/s{step}", str(step).encode())
                change = ("put", f"/w/s{step}", str(step).encode())
            expected.append((*change, await store.current_revision()))
            if step % 2:
                await store.put(f"/other/{step}", b"x")
        # Read the watches at different paces: one event at a time from some, all at once
        # from the others, interleaved.
        got: list[list[Event]] = [[] for _ in watches]
        for round_ in range(len(expected)):
            for index, events in enumerate(watches):
                if index % 2 == 0 and round_ == 0:
                    got[index] = await take(events, len(_from(expected, starts[index])))
                elif index % 2 == 1 and len(got[index]) < len(_from(expected, starts[index])):
                    got[index] += await take(events, 1)
        for index, start in enumerate(starts):
            assert summary(got[index]) == _from(expected, start), start - base
        late = store.watch("/w/", start_revision=starts[2])
        assert summary(await take(late, len(_from(expected, starts[2])))) == _from(
            expected, starts[2]
        )
        # Live: every watch has caught up; each new change reaches each of them once.
        for round_ in range(3):
            await store.put(f"/other/live{round_}", b"x")
            await store.put("/w/live", str(round_).encode())
            live = ("put", "/w/live", str(round_).encode(), await store.current_revision())
            for events in [*watches, late]:
                assert summary(await take(events, 1)) == [live]
        for events in [*watches, late]:
            await assert_quiet(events, 0.02)
            await close_watch(events)

    backend.run(body)


def _from(
    expected: list[tuple[str, str, bytes, int]], start: int
) -> list[tuple[str, str, bytes, int]]:
    return [event for event in expected if event[3] >= start]


def test_close_ends_watch_iterators_and_later_calls_fail(backend: Backend) -> None:
    async def main() -> None:
        store = backend.open()
        start = await store.current_revision()

        async def consume() -> list[Event]:
            return [event async for event in store.watch("/", start_revision=start + 1)]

        consumer = asyncio.create_task(consume())
        await store.put("/k", b"v")
        await asyncio.sleep(0.05)
        await store.close()
        received = await asyncio.wait_for(consumer, 2.0)
        assert summary(received) == [("put", "/k", b"v", start + 1)]
        with pytest.raises(StoreUnavailableError, match="closed"):
            await store.put("/k", b"again")
        assert [event async for event in store.watch("/", start_revision=1)] == []
        await store.close()  # idempotent

    asyncio.run(main())


# --------------------------------------------------------------------------- leases


def test_put_with_unknown_lease_fails(backend: Backend) -> None:
    async def body(store: Store) -> None:
        before = await store.current_revision()
        with pytest.raises(LeaseNotFoundError) as caught:
            await store.put("/l", b"v", lease=424242)
        assert caught.value.lease_id == 424242
        assert await store.current_revision() == before
        with pytest.raises(LeaseNotFoundError):
            await store.lease_keepalive(424242)
        with pytest.raises(LeaseNotFoundError):
            await store.lease_revoke(424242)

    backend.run(body)


def test_revoke_deletes_attached_keys_in_one_revision(backend: Backend) -> None:
    async def body(store: Store) -> None:
        lease = await store.lease_grant(30)
        other = await store.lease_grant(30)
        assert lease.ttl == 30 and lease.id != other.id and lease.id > 0
        await store.put("/s/h1/a", b"", lease=lease.id)
        await store.put("/s/h1/b", b"", lease=lease.id)
        await store.put("/s/h2/a", b"", lease=other.id)
        await store.put("/s/free", b"")
        before = await store.current_revision()
        events = store.watch("/s/", start_revision=before + 1)
        await store.lease_revoke(lease.id)
        assert await store.current_revision() == before + 1
        assert summary(await take(events, 2)) == [
            ("delete", "/s/h1/a", b"", before + 1),
            ("delete", "/s/h1/b", b"", before + 1),
        ]
        assert [kv.key for kv in (await store.range("/s/")).kvs] == ["/s/free", "/s/h2/a"]
        with pytest.raises(LeaseNotFoundError):
            await store.put("/s/h1/c", b"", lease=lease.id)
        await close_watch(events)

    backend.run(body)


def test_revoking_a_lease_without_keys_does_not_bump_revision(backend: Backend) -> None:
    async def body(store: Store) -> None:
        lease = await store.lease_grant(5)
        before = await store.current_revision()
        await store.lease_revoke(lease.id)
        assert await store.current_revision() == before

    backend.run(body)


def test_put_without_lease_detaches_key_from_lease(backend: Backend) -> None:
    async def body(store: Store) -> None:
        lease = await store.lease_grant(30)
        await store.put("/d/k", b"1", lease=lease.id)
        await store.put("/d/k", b"2")
        assert (await store.get("/d/k")).lease == 0  # type: ignore[union-attr]
        await store.lease_revoke(lease.id)
        assert (await store.get("/d/k")).value == b"2"  # type: ignore[union-attr]

    backend.run(body)


def test_lease_expiry_deletes_keys_without_any_store_call(backend: Backend) -> None:
    clock = FakeClock()

    async def body(store: Store) -> None:
        lease = await store.lease_grant(10)
        kept = await store.lease_grant(10)
        await store.put("/x/host1/port", b"up", lease=lease.id)
        await store.put("/x/host1/link", b"up", lease=lease.id)
        await store.put("/x/host2/port", b"up", lease=kept.id)
        before = await store.current_revision()
        events = store.watch("/x/", start_revision=before + 1)
        clock.advance(6)
        assert await store.lease_keepalive(kept.id) == 10  # kept now lives until +16
        await assert_quiet(events, 0.1)
        clock.advance(6)  # lease is past its deadline, kept is not
        # Nobody calls the store: the background expiry check must find the lease.
        deleted = await take(events, 2, timeout=3.0)
        assert summary(deleted) == [
            ("delete", "/x/host1/link", b"", before + 1),
            ("delete", "/x/host1/port", b"", before + 1),
        ]
        assert [kv.key for kv in (await store.range("/x/")).kvs] == ["/x/host2/port"]
        with pytest.raises(LeaseNotFoundError):
            await store.lease_keepalive(lease.id)
        await close_watch(events)

    backend.run(body, clock=clock, lease_check_interval=0.01)


def test_write_after_deadline_expires_lease_before_writing(backend: Backend) -> None:
    clock = FakeClock()

    async def body(store: Store) -> None:
        lease = await store.lease_grant(5)
        await store.put("/y/k", b"", lease=lease.id)
        before = await store.current_revision()
        clock.advance(5)
        # The background check runs rarely here; the write itself must see the expiry first.
        with pytest.raises(LeaseNotFoundError):
            await store.put("/y/k2", b"", lease=lease.id)
        assert await store.get("/y/k") is None
        assert await store.current_revision() == before + 1  # the expiry, not the failed put
        assert await store.put("/y/k3", b"") == before + 2

    backend.run(body, clock=clock, lease_check_interval=3600)


def test_lease_expires_on_the_real_clock(backend: Backend) -> None:
    async def body(store: Store) -> None:
        lease = await store.lease_grant(1)
        revision = await store.put("/z/k", b"", lease=lease.id)
        events = store.watch("/z/", start_revision=revision + 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        [event] = await take(events, 1, timeout=3.0)
        assert event.type is EventType.DELETE
        assert 0.8 <= loop.time() - started <= 2.0
        await close_watch(events)

    backend.run(body, lease_check_interval=0.05)


def test_cancelled_wait_on_a_watch_loses_no_event(backend: Backend) -> None:
    async def body(store: Store) -> None:
        start = await store.current_revision() + 1
        events = store.watch("/c/", start_revision=start)
        received: list[Event] = []
        for index in range(20):
            # A consumer polling with a timeout: some waits are cancelled mid-flight.
            with contextlib.suppress(TimeoutError):
                received.append(await asyncio.wait_for(anext(events), 0.0005))
            await store.put(f"/c/{index}", b"")
        while len(received) < 20:
            received.append(await asyncio.wait_for(anext(events), 5))
        assert [event.revision for event in received] == list(range(start, start + 20))
        await assert_quiet(events, 0.05)
        await close_watch(events)

    backend.run(body)
