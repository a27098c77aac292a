"""`LeaseKeeper`: keeps leases alive over any `Store` (one task per lease, a refresh every
ttl/3) and reports each lease it loses.

Owns: the refresh schedule and the loss reports. It works only through the `Store` protocol
(`lease_keepalive`, `lease_revoke`), so every backend gets the same behaviour. It must not
grant leases (callers do: they choose the TTL and attach their keys), hold backend logic, or
decide what a loss means (the agent does: re-register, rewrite its keys...).

A lease is reported lost, once, when:
- the store says it no longer exists (LeaseNotFoundError: it expired or someone revoked it), or
- no refresh has succeeded for a whole TTL (StoreUnavailableError...): the store has expired
  it by now, or will, and this keeper cannot tell which. Failed refreshes are retried every
  ttl/9 until then.
The expiry estimate is taken from the moment each successful refresh was *sent*, so it errs
early, never late. Time is the injected `hivenet.clock.Clock` (monotonic by default): tests
give the keeper and the store one `ManualClock` and move time by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from hivenet.clock import SYSTEM_CLOCK, Clock
from hivenet.store.base import (
    InvalidRequestError,
    Lease,
    LeaseNotFoundError,
    Store,
    StoreError,
)

__all__ = ["KeptLease", "LeaseKeeper", "LeaseLoss"]

_log = logging.getLogger(__name__)

_MIN_RETRY_INTERVAL: Final = 0.05


@dataclass(frozen=True, slots=True)
class LeaseLoss:
    """Why a kept lease was given up: `error` is the store's last answer."""

    lease_id: int
    reason: str
    error: StoreError


class KeptLease:
    """A lease the keeper refreshes; `wait_lost()` returns when (if ever) it is lost."""

    def __init__(self, lease: Lease, loop: asyncio.AbstractEventLoop, now: float) -> None:
        self.lease = lease
        self.ttl = lease.ttl  # the TTL of the last refresh (the store may round it)
        self.refreshes = 0
        self.expires_at = now + lease.ttl  # keeper's clock; refined by each refresh
        self._lost: asyncio.Future[LeaseLoss] = loop.create_future()
        self.task: asyncio.Task[None] | None = None

    @property
    def lease_id(self) -> int:
        return self.lease.id

    @property
    def loss(self) -> LeaseLoss | None:
        return self._lost.result() if self._lost.done() else None

    async def wait_lost(self) -> LeaseLoss:
        return await asyncio.shield(self._lost)

    def _report(self, loss: LeaseLoss) -> bool:
        if self._lost.done():
            return False
        self._lost.set_result(loss)
        return True

    def __repr__(self) -> str:
        state = f"lost: {self.loss.reason}" if self.loss else f"{self.refreshes} refreshes"
        return f"<KeptLease {self.lease.id} ttl={self.ttl} {state}>"


LossHandler = Callable[[LeaseLoss], object]


class LeaseKeeper:
    """Refreshes every lease handed to `keep()` at `refresh_fraction` x TTL until it is
    released, the keeper closes, or the lease is lost (then `on_loss(loss)` is called, and may
    be a coroutine function).

    Use one keeper per event loop (`async with LeaseKeeper(store) as keeper:`).
    """

    def __init__(
        self,
        store: Store,
        *,
        on_loss: LossHandler | None = None,
        refresh_fraction: float = 1 / 3,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not isinstance(store, Store):
            raise InvalidRequestError(f"store must implement the Store protocol, got {store!r}")
        if (
            not isinstance(refresh_fraction, int | float)
            or isinstance(refresh_fraction, bool)
            or not 0 < refresh_fraction < 1
        ):
            raise InvalidRequestError(
                f"refresh_fraction must be a number in (0, 1), got {refresh_fraction!r}"
            )
        if on_loss is not None and not callable(on_loss):
            raise InvalidRequestError(f"on_loss must be callable, got {on_loss!r}")
        if not isinstance(clock, Clock):
            raise InvalidRequestError(f"clock must be a hivenet.clock.Clock, got {clock!r}")
        self._store = store
        self._clock = clock
        self._on_loss = on_loss
        self._refresh_fraction = float(refresh_fraction)
        self._kept: dict[int, KeptLease] = {}
        self._closed = False

    async def __aenter__(self) -> LeaseKeeper:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def kept(self) -> list[int]:
        """Ids of the leases being refreshed now (lost or released ones are not)."""
        return [lease_id for lease_id, kept in self._kept.items() if kept.loss is None]

    def get(self, lease_id: int) -> KeptLease | None:
        return self._kept.get(lease_id)

    def keep(self, lease: Lease) -> KeptLease:
        """Start refreshing `lease` (the first refresh is sent at once)."""
        if self._closed:
            raise InvalidRequestError("LeaseKeeper is closed")
        if not isinstance(lease, Lease):
            raise InvalidRequestError(f"lease must be a Lease (from lease_grant), got {lease!r}")
        if not isinstance(lease.ttl, int) or lease.ttl < 1:
            raise InvalidRequestError(f"lease.ttl must be an int >= 1, got {lease.ttl!r}")
        if lease.id in self._kept:
            raise InvalidRequestError(f"lease {lease.id} is already kept")
        loop = asyncio.get_running_loop()
        kept = KeptLease(lease, loop, self._clock())
        kept.task = loop.create_task(self._refresh(kept), name=f"hn-lease-{lease.id}")
        self._kept[lease.id] = kept
        return kept

    async def release(self, lease_id: int, *, revoke: bool = False) -> None:
        """Stop refreshing `lease_id`; with `revoke`, also revoke it (its keys go at once)."""
        kept = self._kept.pop(lease_id, None)
        if kept is None:
            raise InvalidRequestError(f"lease_id {lease_id!r} is not kept by this keeper")
        await _stop(kept)
        if revoke:
            with contextlib.suppress(LeaseNotFoundError):
                await self._store.lease_revoke(lease_id)

    async def close(self, *, revoke: bool = False) -> None:
        """Stop every refresh (and revoke the leases if asked). Idempotent."""
        self._closed = True
        for lease_id in list(self._kept):
            kept = self._kept.pop(lease_id)
            await _stop(kept)
            if revoke and kept.loss is None:
                try:
                    await self._store.lease_revoke(lease_id)
                except StoreError as error:  # expiry will remove it anyway
                    _log.warning("could not revoke lease %d: %s", lease_id, error)

    async def _refresh(self, kept: KeptLease) -> None:
        clock = self._clock
        lease_id = kept.lease_id
        while True:
            sent_at = clock()
            try:
                ttl = await self._store.lease_keepalive(lease_id)
            except LeaseNotFoundError as error:
                await self._lose(kept, "the store no longer has it (expired or revoked)", error)
                return
            except StoreError as error:
                now = clock()
                if now >= kept.expires_at:
                    await self._lose(
                        kept, f"no refresh succeeded within its TTL of {kept.ttl}s", error
                    )
                    return
                retry_in = max(_MIN_RETRY_INTERVAL, kept.ttl / 9)
                _log.info(
                    "lease %d refresh failed (%s); retrying in %.2fs", lease_id, error, retry_in
                )
                await clock.sleep(min(retry_in, kept.expires_at - now))
                continue
            kept.ttl = ttl
            kept.refreshes += 1
            kept.expires_at = sent_at + ttl
            await clock.sleep(ttl * self._refresh_fraction)

    async def _lose(self, kept: KeptLease, reason: str, error: StoreError) -> None:
        loss = LeaseLoss(kept.lease_id, reason, error)
        if not kept._report(loss):
            return
        _log.warning("lease %d lost: %s (%s)", kept.lease_id, reason, error)
        if self._on_loss is None:
            return
        try:
            outcome = self._on_loss(loss)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:
            _log.exception("on_loss handler failed for lease %d", kept.lease_id)


async def _stop(kept: KeptLease) -> None:
    task = kept.task
    # An on_loss handler may release its own lease: its task is the one running it.
    if task is not None and not task.done() and task is not asyncio.current_task():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
