"""The API server's maximum request body size: `BodyLimitMiddleware`, a pure ASGI middleware
in front of every route (/v1, the Neutron and Octavia apps mounted at /v2.0, /ui, /metrics).

Owns only the decision to refuse a body, and never holds one: a request whose Content-Length
exceeds the limit is answered 413 before the application sees it; a body without one (chunked)
is counted as the application reads it, and the read that goes over the limit is the last:
the 413 is sent at once, the application is told the client disconnected, and whatever it
still sends or raises because of that is dropped. The 413 carries the error shape of
`errors.py` (which the OpenStack SDKs also read: they take any top-level `message`).
Must not read the body ahead of the application nor know what a route does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from hivenet.api import DEFAULT_MAX_BODY_BYTES
from hivenet.api.errors import detail, error_response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


class BodyLimitMiddleware:
    """Refuse request bodies longer than `max_body_bytes` with 413 (see the module docstring)."""

    def __init__(self, app: Asgi, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes!r}")
        self.app = app
        self.max_body_bytes = max_body_bytes

    def _refusal(self, received: int, *, declared: bool) -> Asgi:
        limit = self.max_body_bytes
        if declared:
            message = (
                f"request body too large: Content-Length {received} bytes, "
                f"the limit is {limit} bytes"
            )
            problem = detail("Content-Length", received, f"over the limit of {limit} bytes")
        else:
            message = (
                f"request body too large: {received} bytes received so far, "
                f"the limit is {limit} bytes"
            )
            problem = detail("body", received, f"over the limit of {limit} bytes")
        return error_response(413, message, [problem])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None:
            if declared > self.max_body_bytes:
                await self._refusal(declared, declared=True)(scope, receive, send)
                return
            # The server stops a body at its Content-Length: nothing more to count.
            await self.app(scope, receive, send)
            return

        received = 0
        refused = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    refused = True
                    if not response_started:
                        await self._refusal(received, declared=False)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused:
                return  # the 413 is the answer
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # The application failed on the body it was cut off from; the client has its 413.
