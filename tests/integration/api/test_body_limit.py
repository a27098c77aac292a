"""`BodyLimitMiddleware` on its own (an ASGI app fed chunk by chunk, to pin exactly when it
stops reading) and inside `create_app` with its default limit. The real server over TLS with
`--max-body-bytes` is in tests/integration/cli/test_tls.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hivenet.api import DEFAULT_MAX_BODY_BYTES, create_app
from hivenet.api.auth import ADMIN_TOKEN_FILE
from hivenet.api.bodylimit import BodyLimitMiddleware

LIMIT = 1000


class Upstream:
    """The server's side: hands out `chunks` as http.request messages, records what is sent."""

    def __init__(self, chunks: Sequence[bytes]) -> None:
        self.chunks = list(chunks)
        self.reads = 0
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.reads += 1
        if not self.chunks:
            return {"type": "http.disconnect"}
        chunk = self.chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks)}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    def json(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))


class EchoApp:
    """Reads the whole body (as a framework does) and answers 200 with its length; after a
    disconnect it raises, as Starlette's `request.body()` does."""

    def __init__(self) -> None:
        self.called = False
        self.body = b""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.called = True
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                await send({"type": "http.response.start", "status": 400, "headers": []})
                raise ConnectionResetError("client disconnected")
            self.body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(self.body)).encode()})


def _scope(content_length: int | None) -> dict[str, Any]:
    headers = [(b"content-type", b"application/json")]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    return {"type": "http", "method": "POST", "path": "/v1/bridges", "headers": headers}


def _run(chunks: Sequence[bytes], content_length: int | None) -> tuple[Upstream, EchoApp]:
    upstream, app = Upstream(chunks), EchoApp()
    middleware = BodyLimitMiddleware(app, max_body_bytes=LIMIT)
    asyncio.run(middleware(_scope(content_length), upstream.receive, upstream.send))
    return upstream, app


def test_content_length_over_the_limit_is_refused_unread() -> None:
    upstream, app = _run([b"x" * (LIMIT + 1)], LIMIT + 1)
    assert not app.called and upstream.reads == 0
    assert upstream.status == 413
    assert upstream.json() == {
        "error": {
            "status": 413,
            "message": f"request body too large: Content-Length {LIMIT + 1} bytes, "
            f"the limit is {LIMIT} bytes",
            "details": [
                {
                    "field": "Content-Length",
                    "value": LIMIT + 1,
                    "message": f"over the limit of {LIMIT} bytes",
                }
            ],
        }
    }


@pytest.mark.parametrize("content_length", [LIMIT, None])
def test_a_body_at_the_limit_passes(content_length: int | None) -> None:
    upstream, app = _run([b"y" * 400, b"y" * 400, b"y" * 200], content_length)
    assert upstream.status == 200 and app.body == b"y" * LIMIT


def test_chunked_body_is_cut_at_the_first_chunk_over_the_limit() -> None:
    upstream, app = _run([b"z" * 400] * 10, None)
    # 400, 800, 1200: the third read crosses the limit and is the last one made upstream.
    assert upstream.reads == 3
    assert app.body == b"z" * 800  # the crossing chunk never reached the application
    assert upstream.status == 413 and len(upstream.sent) == 2  # the app's own 400 was dropped
    error = upstream.json()["error"]
    assert error["message"] == (
        f"request body too large: 1200 bytes received so far, the limit is {LIMIT} bytes"
    )
    assert error["details"] == [
        {"field": "body", "value": 1200, "message": f"over the limit of {LIMIT} bytes"}
    ]


def test_an_error_unrelated_to_the_limit_still_propagates() -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        raise RuntimeError("boom")

    upstream = Upstream([b"small"])
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(
            BodyLimitMiddleware(failing, LIMIT)(_scope(None), upstream.receive, upstream.send)
        )


def test_create_app_applies_the_default_limit_to_every_api(tmp_path: Path) -> None:
    state_dir = tmp_path / "hn-state"
    with TestClient(create_app("memory://", state_dir)) as client:
        token = (state_dir / ADMIN_TOKEN_FILE).read_text().strip()
        headers = {"Authorization": f"Bearer {token}", "X-Auth-Token": token}
        headers["Content-Type"] = "application/json"
        near = b'{"name": "near"}'
        near += b" " * (DEFAULT_MAX_BODY_BYTES - len(near))
        assert client.post("/v1/bridges", content=near, headers=headers).status_code == 201
        over = near + b" "
        for path in ("/v1/bridges", "/v2.0/networks", "/v2.0/lbaas/loadbalancers"):
            response = client.post(path, content=over, headers=headers)
            assert response.status_code == 413, (path, response.text)
            message = response.json()["error"]["message"]
            assert f"Content-Length {DEFAULT_MAX_BODY_BYTES + 1} bytes" in message
