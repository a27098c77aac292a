"""PrefixMirror: load at one revision, follow the watch, and resync with only the difference
when the history it needs was compacted while it was away."""

from __future__ import annotations

import asyncio

from hivenet.agent.mirror import PrefixMirror
from hivenet.store import open_store

from .flaky import FlakyStore
from .test_agents import eventually


def test_mirror_follows_then_resyncs_after_compaction_with_only_the_difference() -> None:
    async def scenario() -> None:
        store = open_store("memory://")
        for i in range(5):
            await store.put(f"/p/k{i}", b"v0")
        await store.put("/other/x", b"ignored")
        link = FlakyStore(store)
        changes: list[tuple[str, bytes | None]] = []
        mirror = PrefixMirror(
            link,
            "/p/",
            lambda k, v, _r: changes.append((k, v)),  # type: ignore[arg-type]
            retry_initial=0.01,
            retry_max=0.05,
        )
        task = asyncio.create_task(mirror.run())
        try:
            await asyncio.wait_for(mirror.loaded.wait(), 5)
            assert sorted(changes) == [(f"/p/k{i}", b"v0") for i in range(5)]
            changes.clear()
            await store.put("/p/k0", b"v1")
            await eventually(lambda: changes == [("/p/k0", b"v1")])
            changes.clear()

            link.partition()
            await asyncio.sleep(0.05)
            await store.put("/p/k1", b"v1")
            await store.delete("/p/k2")
            await store.put("/p/k9", b"new")
            await store.put("/p/k1", b"v2")  # two changes, the mirror needs only the last
            await store.compact(await store.current_revision())
            link.heal()
            await eventually(lambda: mirror.resyncs == 1 and mirror.connected)
            await eventually(lambda: len(changes) == 3)
            assert sorted(changes, key=lambda c: c[0]) == [
                ("/p/k1", b"v2"),
                ("/p/k2", None),
                ("/p/k9", b"new"),
            ]
            assert mirror.values == {
                "/p/k0": b"v1",
                "/p/k1": b"v2",
                "/p/k3": b"v0",
                "/p/k4": b"v0",
                "/p/k9": b"new",
            }
            # And it follows again afterwards.
            await store.delete("/p/k3")
            await eventually(lambda: ("/p/k3", None) in changes)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_failing_handler_is_counted_and_the_mirror_keeps_following() -> None:
    async def scenario() -> None:
        store = open_store("memory://")
        seen: list[str] = []

        def handler(key: str, value: bytes | None, _revision: int) -> None:
            if key == "/p/bad":
                raise RuntimeError("consumer bug")
            seen.append(key)

        mirror = PrefixMirror(store, "/p/", handler)
        task = asyncio.create_task(mirror.run())
        try:
            await asyncio.wait_for(mirror.loaded.wait(), 5)
            await store.put("/p/bad", b"x")
            await store.put("/p/good", b"y")
            await eventually(lambda: seen == ["/p/good"])
            assert mirror.callback_errors == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await store.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
