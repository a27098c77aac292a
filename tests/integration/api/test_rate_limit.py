"""The per-client rate limit: token buckets (pure, driven by a hand clock), the middleware in
front of a bare ASGI app (fake clock), and the real app: 429 with Retry-After and a message
naming the limit, one bucket per token, made-up tokens charged to their address."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hivenet.api import create_app
from hivenet.api.auth import ADMIN_TOKEN_FILE
from hivenet.api.ratelimit import RateLimit, RateLimitMiddleware, TokenBuckets, parse_rate


def test_a_bucket_gives_its_burst_then_its_rate() -> None:
    buckets = TokenBuckets(RateLimit(rate=2, burst=3))
    assert [buckets.take("a", 0.0) for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a", 0.0) == pytest.approx(0.5)
    assert buckets.take("b", 0.0) == 0  # another client has its own
    assert buckets.take("a", 0.25) == pytest.approx(0.25)  # half a token so far
    assert buckets.take("a", 0.5) == 0
    assert buckets.take("a", 100.0) == 0  # refills up to the burst, no more
    assert [buckets.take("a", 100.0) for _ in range(3)] == [0, 0, pytest.approx(0.5)]
    # A clock that steps back never adds tokens.
    assert buckets.take("a", 50.0) > 0


def test_wait_takes_nothing_and_the_least_recent_client_is_dropped_first() -> None:
    buckets = TokenBuckets(RateLimit(rate=1, burst=1), max_clients=2)
    assert buckets.wait("a", 0.0) == 0 and buckets.wait("a", 0.0) == 0
    assert buckets.take("a", 0.0) == 0 and buckets.wait("a", 0.0) == pytest.approx(1)
    buckets.take("b", 0.0)
    buckets.take("c", 0.0)  # "a" was used least recently: dropped
    assert len(buckets) == 2
    assert buckets.take("a", 0.0) == 0  # back with a full bucket


@pytest.mark.parametrize(
    ("text", "rate"), [("50/s", 50.0), ("2.5/s", 2.5), ("7", 7.0), ("0", 0.0), (" 3/s ", 3.0)]
)
def test_parse_rate(text: str, rate: float) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "-1/s", "nan", "inf/s", "5/m"])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(text)


def test_a_bad_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="burst"):
        RateLimit(rate=5, burst=0)
    assert not RateLimit(rate=0, burst=0).enabled


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _call(app: Any, headers: list[tuple[bytes, bytes]], client: str = "10.0.0.1") -> list[Any]:
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
    scope["client"] = (client, 40000)
    asyncio.run(app(scope, receive, send))
    return sent


def _status(sent: list[Any]) -> int:
    status: int = sent[0]["status"]
    return status


def test_the_middleware_refuses_with_429_and_retry_after_before_the_app() -> None:
    calls: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        auth = dict(scope["headers"]).get(b"authorization", b"")
        status = 401 if auth == b"Bearer wrong" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    clock = _Clock()
    app = RateLimitMiddleware(inner, RateLimit(rate=0.5, burst=2), clock=clock)
    good = [(b"authorization", b"Bearer good")]
    assert [_status(_call(app, good)) for _ in range(2)] == [200, 200]
    refused = _call(app, good)
    assert _status(refused) == 429 and len(calls) == 2
    assert dict(refused[0]["headers"])[b"retry-after"] == b"2"
    body = refused[1]["body"].decode()
    assert "at most 0.5 requests/s with bursts of 2 per client (this token)" in body
    assert '"field":"rate_limit"' in body
    # Another token from the same address has its own bucket; the OpenStack header counts.
    assert _status(_call(app, [(b"x-auth-token", b"other")])) == 200
    clock.now = 2.0
    assert _status(_call(app, good)) == 200

    # Made-up tokens: each 401 is charged to the address, which then refuses every token.
    wrong = [(b"authorization", b"Bearer wrong")]
    assert [_status(_call(app, wrong, "10.0.0.9")) for _ in range(2)] == [401, 401]
    assert _status(_call(app, [(b"authorization", b"Bearer fresh")], "10.0.0.9")) == 429
    assert _status(_call(app, [], "10.0.0.9")) == 429
    assert _status(_call(app, [], "10.0.0.8")) == 200  # another address is not


def test_the_served_app_limits_each_token(tmp_path: Path) -> None:
    state_dir = tmp_path / "hn-state"
    app = create_app("memory://", state_dir, rate_limit=RateLimit(rate=0.01, burst=3))
    with TestClient(app) as client:
        token = (state_dir / ADMIN_TOKEN_FILE).read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        assert [client.get("/v1/bridges", headers=auth).status_code for _ in range(3)] == [200] * 3
        refused = client.get("/v1/bridges", headers=auth)
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 99
        assert "rate limit exceeded: at most 0.01 requests/s" in refused.json()["error"]["message"]
        # Neutron is behind the same limit.
        neutron = client.get("/v2.0/networks", headers={"X-Auth-Token": token})
        assert neutron.status_code == 429


def test_no_limit_when_off(tmp_path: Path) -> None:
    state_dir = tmp_path / "hn-state"
    app = create_app("memory://", state_dir, rate_limit=RateLimit(rate=0, burst=1))
    with TestClient(app) as client:
        assert all(client.get("/v1/health").status_code == 200 for _ in range(20))
