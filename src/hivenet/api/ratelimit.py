"""Requests per client: `RateLimitMiddleware`, a pure ASGI middleware in front of every route
(/v1, the Neutron and Octavia apps, /identity, /ui, /metrics), and the token buckets it keeps.

Each client has a token bucket of `burst` requests refilled at `rate` per second; a request
that finds its bucket empty is answered 429 with `Retry-After` (whole seconds until a request
would pass) before the application sees it. The client is its bearer token (`Authorization:
Bearer`, or the OpenStack `X-Auth-Token`), by SHA-256, never kept in clear; a request without
one is its client address. So that made-up tokens do not buy fresh buckets, every request
that the application answers 401 also takes from its address's bucket, and a request with a
token is refused while its address's bucket is empty: guessing tokens is held to the same rate
as an unauthenticated client.

The buckets live in this process: each API server limits on its own (N servers behind a
balancer let a client N times the rate). At most `max_clients` buckets are kept; the one
used least recently goes first (a client coming back starts with a full bucket).
`TokenBuckets` is pure (it takes `now`); only the middleware reads the clock.
Must not know what a route does nor read the body.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from hivenet.api import DEFAULT_RATE_BURST, DEFAULT_RATE_LIMIT
from hivenet.api.errors import detail, error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["DEFAULT_RATE_BURST", "DEFAULT_RATE_LIMIT", "RateLimit", "RateLimitMiddleware"]
DEFAULT_MAX_CLIENTS = 100_000


@dataclass(frozen=True, slots=True)
class RateLimit:
    """`rate` requests per second per client, `burst` at once (rate 0: no limit)."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.rate >= 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a number >= 0 (0: off), got {self.rate!r}")
        if self.rate > 0 and self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst!r}")

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def describe(self) -> str:
        return f"{self.rate:g} requests/s with bursts of {self.burst}"


def parse_rate(text: str) -> float:
    """'50/s', '50' or '0' (off) -> requests per second."""
    value = text.strip()
    if value.endswith("/s"):
        value = value[:-2]
    try:
        rate = float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a rate like 50/s (0: off)") from None
    if not (rate >= 0 and math.isfinite(rate)):
        raise ValueError(f"{text!r} is not a rate like 50/s (0: off)")
    return rate


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One token bucket per client key, at most `max_clients` of them (least recently used
    dropped first)."""

    def __init__(self, limit: RateLimit, max_clients: int = DEFAULT_MAX_CLIENTS) -> None:
        if max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, got {max_clients!r}")
        self.limit = limit
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _refilled(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(self.limit.burst), now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.limit.burst), bucket.tokens + elapsed * self.limit.rate)
            bucket.updated = now
        return bucket

    def wait(self, key: str, now: float) -> float:
        """Seconds until `key` has a whole token (0: it has one now); takes nothing."""
        bucket = self._refilled(key, now)
        return 0.0 if bucket.tokens >= 1 else (1 - bucket.tokens) / self.limit.rate

    def take(self, key: str, now: float) -> float:
        """Take one token: 0 when taken, else the seconds until one would be there (nothing
        is taken)."""
        waited = self.wait(key, now)
        if waited == 0:
            self._buckets[key].tokens -= 1
        return waited


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == wanted:
            text: str = value.decode("latin-1")
            return text
    return None


def client_keys(scope: Scope) -> tuple[str | None, str]:
    """(the token's key or None, the address's key) of a request."""
    client = scope.get("client")
    address = f"addr:{client[0] if client else 'unknown'}"
    token: str | None = None
    authorization = _header(scope, b"authorization")
    if authorization is not None and authorization[:7].lower() == "bearer ":
        token = authorization[7:].strip()
    if not token:
        token = (_header(scope, b"x-auth-token") or "").strip() or None
    if token is None:
        return None, address
    return "token:" + hashlib.sha256(token.encode()).hexdigest(), address


class RateLimitMiddleware:
    """429 for a client over its rate (see the module docstring)."""

    def __init__(
        self,
        app: Asgi,
        limit: RateLimit,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self.app = app
        self.limit = limit
        self.clock = clock
        self.buckets = TokenBuckets(limit, max_clients)

    def _refusal(self, waited: float, key: str) -> Asgi:
        retry_after = max(1, math.ceil(waited))
        who = "this token" if key.startswith("token:") else "this client address"
        return error_response(
            429,
            f"rate limit exceeded: at most {self.limit.describe()} per client ({who}); "
            f"retry after {retry_after} s",
            [detail("rate_limit", self.limit.describe(), "exceeded")],
            headers={"Retry-After": str(retry_after)},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.limit.enabled:
            await self.app(scope, receive, send)
            return
        token_key, address_key = client_keys(scope)
        now = self.clock()
        if token_key is None:
            waited, key = self.buckets.take(address_key, now), address_key
        else:
            # An address whose made-up tokens used up its bucket is refused before any lookup.
            waited, key = self.buckets.wait(address_key, now), address_key
            if waited == 0:
                waited, key = self.buckets.take(token_key, now), token_key
        if waited > 0:
            await self._refusal(waited, key)(scope, receive, send)
            return
        if token_key is None:
            await self.app(scope, receive, send)
            return

        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message.get("status") == 401:
                self.buckets.take(address_key, self.clock())
            await send(message)

        await self.app(scope, receive, watching_send)
