"""`PrefixMirror`: keep a local copy of one key prefix of the store, fed by a watch.

Owns the load-then-follow protocol every agent cache uses (topology, shared tables, host
state): read the whole prefix at one revision R (paginated, all pages at R so the snapshot is
consistent), then watch from R + 1 and hand each change to a callback. When the watch falls
behind compaction it reloads and reports only the difference, so consumers see a stream of
(key, value | None) changes and never a full reload. When the store is unreachable it keeps
what it has (the agent goes on forwarding: "headless") and retries with capped backoff, then
resumes from the last revision it applied.

Must not interpret values: decoding belongs to the consumer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from hivenet.store.base import CompactedError, EventType, Store, StoreError

log = logging.getLogger(__name__)

# (key, value or None when deleted, store revision of the change)
ChangeHandler = Callable[[str, bytes | None, int], None]
# A whole (re)load at once: [(key, value or None)], revision. Lets the consumer compile once.
SnapshotHandler = Callable[[list[tuple[str, bytes | None]], int], None]

PAGE_SIZE = 1000


class PrefixMirror:
    def __init__(
        self,
        store: Store,
        prefix: str,
        on_change: ChangeHandler,
        *,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
        on_snapshot: SnapshotHandler | None = None,
    ) -> None:
        self._store = store
        self.prefix = prefix
        self._on_change = on_change
        self._on_snapshot = on_snapshot
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self.values: dict[str, bytes] = {}
        self.revision = 0  # last store revision applied
        self.connected = False
        self.resyncs = 0
        self.callback_errors = 0
        self.loaded = asyncio.Event()

    async def load(self) -> int:
        """Read the whole prefix at one revision; report differences from what we hold."""
        snapshot: dict[str, bytes] = {}
        first = await self._store.range(self.prefix, limit=PAGE_SIZE)
        revision = first.revision
        page = first
        while True:
            for kv in page.kvs:
                snapshot[kv.key] = kv.value
            if not page.more or not page.kvs:
                break
            page = await self._store.range(
                self.prefix, revision=revision, limit=PAGE_SIZE, start_after=page.kvs[-1].key
            )
        changes: list[tuple[str, bytes | None]]
        if not self.values:  # the first load: everything is a change
            changes = list(snapshot.items())
            self.values = snapshot
        else:
            changes = [(key, None) for key in self.values if key not in snapshot]
            changes.extend((k, v) for k, v in snapshot.items() if self.values.get(k) != v)
            for key, value in changes:
                if value is None:
                    del self.values[key]
                else:
                    self.values[key] = value
        if self._on_snapshot is not None:
            self._deliver(self._on_snapshot, changes, revision)
        else:
            for key, value in changes:
                self._deliver(self._on_change, key, value, revision)
        self.revision = revision
        self.loaded.set()
        return revision

    def _deliver(self, handler: Callable[..., None], *args: object) -> None:
        """A consumer's bug must not end the watch: the mirror would freeze silently."""
        try:
            handler(*args)
        except Exception:
            self.callback_errors += 1
            log.exception("mirror %s: change handler failed", self.prefix)

    async def run(self) -> None:
        """Load (if not yet) and follow forever; survives store outages and compaction."""
        delay = self._retry_initial
        while True:
            try:
                if not self.loaded.is_set():
                    await self.load()
                else:
                    # A watch is opened lazily by some backends: only a round trip proves the
                    # store answers again (else `connected` would read True during an outage).
                    await self._store.current_revision()
                self.connected = True
                delay = self._retry_initial
                async for event in self._store.watch(self.prefix, start_revision=self.revision + 1):
                    if event.type is EventType.PUT:
                        self.values[event.kv.key] = event.kv.value
                        self._deliver(self._on_change, event.kv.key, event.kv.value, event.revision)
                    else:
                        self.values.pop(event.kv.key, None)
                        self._deliver(self._on_change, event.kv.key, None, event.revision)
                    self.revision = event.revision
                # The watch ended without error: the store was closed under us. Reconnect.
                raise StoreError("watch ended")
            except CompactedError as exc:
                log.warning("mirror %s: %s; resyncing", self.prefix, exc)
                self.resyncs += 1
                self.loaded.clear()
            except asyncio.CancelledError:
                self.connected = False
                raise
            except (StoreError, OSError) as exc:
                self.connected = False
                log.warning(
                    "mirror %s: store unavailable (%s); retry in %.1fs", self.prefix, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
