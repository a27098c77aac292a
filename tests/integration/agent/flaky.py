"""`FlakyStore`: a Store wrapper that can be cut off from its agent and reconnected.

While partitioned every call raises StoreUnavailableError and open watches fail at once,
as a lost TCP connection to the store would; the store itself keeps running (other clients,
lease expiry). Test-only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from hivenet.store.base import Event, Store, StoreUnavailableError


class FlakyStore:
    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.down = False
        self._cut = asyncio.Event()

    def partition(self) -> None:
        self.down = True
        self._cut.set()

    def heal(self) -> None:
        self.down = False
        self._cut = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not asyncio.iscoroutinefunction(attribute):
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailableError(f"{name}: partitioned from the store")
            return await attribute(*args, **kwargs)

        return call

    def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[Event]:
        if self.down:
            return _FailedWatch()
        return _FlakyWatch(self, self.inner.watch(prefix, start_revision=start_revision))


class _FailedWatch:
    def __aiter__(self) -> _FailedWatch:
        return self

    async def __anext__(self) -> Event:
        raise StoreUnavailableError("watch: partitioned from the store")


class _FlakyWatch:
    def __init__(self, store: FlakyStore, inner: AsyncIterator[Event]) -> None:
        self.store = store
        self.inner = inner
        self.cut = store._cut

    def __aiter__(self) -> _FlakyWatch:
        return self

    async def __anext__(self) -> Event:
        if self.store.down:
            await self._close()
            raise StoreUnavailableError("watch: partitioned from the store")
        cut = asyncio.ensure_future(self.cut.wait())
        following = asyncio.ensure_future(self.inner.__anext__())
        done, _ = await asyncio.wait({cut, following}, return_when=asyncio.FIRST_COMPLETED)
        if following in done:
            cut.cancel()
            return following.result()
        following.cancel()
        await self._close()
        raise StoreUnavailableError("watch: partitioned from the store")

    async def _close(self) -> None:
        close = getattr(self.inner, "aclose", None)
        if close is not None:
            await close()
