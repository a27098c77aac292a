"""Synchronous HTTP client for the native HiveNet REST API (`/v1`).

Owns the wire side of the REST contract as seen by a caller: URLs per kind, bearer auth,
`If-Match`/`ETag` revisions, pagination, and turning every error response into a typed
exception that carries the server's JSON error (status, message, field-level details).
Must not import the API server, the store or anything that listens; it only talks HTTP, so
the CLI, the lab and tests can use it against any running server.

Retries (`RetryPolicy`): a request that meets a 503 or a lost connection is sent again, after
the server's `Retry-After` (or a short back-off), when sending it twice cannot do harm: reads;
creates, which always name their object (the caller's `id`, else an `Idempotency-Key` made
here once per create), so a retry returns the first result; PUT and PATCH without `If-Match`
(they set fields to values); DELETE (a retry that finds the object gone is done). A write
with `If-Match` is retried only when the 503 says it was not applied. A server that cannot
be reached at all (connection refused) is reported at once, not retried.

TLS: an `https://` server's certificate and name are always verified, against the system trust
store or the CA bundle given as `ca_cert`; a certificate that fails is `TlsVerificationError`
(never retried). Only `insecure=True` turns verification off, and says so with an
`InsecureTlsWarning` each time a client is made that way.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from hivenet.api.tls import (
    client_ssl_context,
    insecure_ssl_context,
    verification_failure,
)
from hivenet.model import KINDS, TopologyObject

API_PREFIX = "/v1"
DEFAULT_TIMEOUT_SECONDS = 10.0
MAX_PAGE_SIZE = 1000

# Collection name per kind, as the REST contract spells it (the plural of the model KIND).
COLLECTIONS: dict[str, str] = {kind: f"{kind}s" for kind in KINDS}

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"

# Fields the server owns: a client must not send them on create (the server rejects them).
SERVER_OWNED_FIELDS: dict[str, frozenset[str]] = {"port": frozenset({"tunnel_key"})}


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """One field-level problem reported by the server."""

    field: str | None
    value: Any
    message: str

    def describe(self) -> str:
        if self.field is None:
            return self.message
        return f"{self.field}={self.value!r}: {self.message}"


class ApiClientError(Exception):
    """Base of every error raised by `HivenetClient`."""


class ApiConnectionError(ApiClientError):
    """The server could not be reached (refused, DNS, timeout); the request did not complete."""

    def __init__(self, base_url: str, reason: str) -> None:
        super().__init__(f"cannot reach the HiveNet API at {base_url}: {reason}")
        self.base_url = base_url
        self.reason = reason


class TlsVerificationError(ApiConnectionError):
    """The server's TLS certificate was not accepted (unknown CA, wrong name, expired)."""

    def __init__(self, base_url: str, reason: str) -> None:
        super().__init__(base_url, f"its TLS certificate was not accepted: {reason}")
        self.verify_reason = reason


class InsecureTlsWarning(UserWarning):
    """A client was made with `insecure=True`: it accepts any server certificate."""


class ApiError(ApiClientError):
    """The server answered with an error status. `body` is the server's `error` object."""

    def __init__(
        self,
        status: int,
        message: str,
        details: tuple[ErrorDetail, ...] = (),
        *,
        method: str = "",
        url: str = "",
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.details = details
        self.method = method
        self.url = url
        self.body: Mapping[str, Any] = body or {}


class BadRequestError(ApiError):
    """400: the request body is not valid JSON or not an object."""


class AuthenticationError(ApiError):
    """401: missing or wrong bearer token."""


class NotFoundError(ApiError):
    """404: no such object (or no such collection)."""


class ConflictError(ApiError):
    """409: still referenced, duplicate id, peer already linked."""


class PreconditionFailedError(ApiError):
    """412: `If-Match` named a revision other than the object's current one."""


class ValidationError(ApiError):
    """422: unknown field, bad value, or a reference to a missing object."""


class ServiceUnavailableError(ApiError):
    """503: the store is unavailable (locked, unreachable, electing a leader).

    `write_outcome` is "not_applied", "unknown" (read `read_back` to find out) or None (the
    request writes nothing); `failed` names what failed, as the server saw it."""

    @property
    def store(self) -> Mapping[str, Any]:
        store = self.body.get("store")
        return store if isinstance(store, Mapping) else {}

    @property
    def write_outcome(self) -> str | None:
        outcome = self.store.get("write")
        return None if outcome is None else str(outcome)

    @property
    def failed(self) -> str:
        return str(self.store.get("failed") or "")

    @property
    def read_back(self) -> str | None:
        path = self.store.get("read_back")
        return None if path is None else str(path)


class ServerError(ApiError):
    """500 and any other 5xx: for example a corrupt store."""


_ERRORS_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    412: PreconditionFailedError,
    422: ValidationError,
    503: ServiceUnavailableError,
}


def error_class_for(status: int) -> type[ApiError]:
    if status in _ERRORS_BY_STATUS:
        return _ERRORS_BY_STATUS[status]
    return ServerError if status >= 500 else ApiError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long a request is retried (see the module docstring)."""

    attempts: int = 5  # tries in all, the first included
    first_pause: float = 0.2  # seconds; doubles per retry unless the server says Retry-After
    max_pause: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts!r}")

    def pause(self, retry: int, retry_after: str | None) -> float:
        if retry_after is not None and retry_after.strip().isdigit():
            return min(float(retry_after), self.max_pause)
        return min(self.first_pause * 2**retry, self.max_pause)


NO_RETRY = RetryPolicy(attempts=1)


@dataclass(frozen=True, slots=True)
class _Retryable:
    """When a request may be sent again: `always` (sending it twice does no harm), else only
    when the server said it was not applied or it never left this client."""

    always: bool
    gone_is_done: bool = False  # DELETE: a 404 after a try of unknown outcome means done


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object as the server returned it, with its store revision (from the ETag)."""

    kind: str
    data: dict[str, Any]
    revision: int | None

    @property
    def id(self) -> str:
        return str(self.data["id"])

    def to_model(self) -> TopologyObject:
        return KINDS[self.kind].model_validate(self.data)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list: items sorted by id; `next_marker` is None on the last page."""

    items: list[dict[str, Any]] = field(default_factory=list)
    next_marker: str | None = None


def parse_etag(etag: str | None) -> int | None:
    """The revision in an `ETag: "<rev>"` header (weak tags tolerated); None if absent/odd."""
    if not etag:
        return None
    text = etag.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    return int(text) if text.isdigit() else None


def _error_from_response(response: httpx.Response) -> ApiError:
    status = response.status_code
    reason = response.reason_phrase or "error"
    try:
        payload = response.json()
    except ValueError:
        payload = None
    error_body: dict[str, Any] = {}
    message = ""
    details: list[ErrorDetail] = []
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error_body = payload["error"]
        message = str(error_body.get("message") or "")
        for raw in error_body.get("details") or ():
            if isinstance(raw, dict):
                raw_field = raw.get("field")
                details.append(
                    ErrorDetail(
                        field=None if raw_field is None else str(raw_field),
                        value=raw.get("value"),
                        message=str(raw.get("message") or ""),
                    )
                )
            else:
                details.append(ErrorDetail(field=None, value=None, message=str(raw)))
    elif isinstance(payload, dict) and "detail" in payload:
        # Not the HiveNet error shape (e.g. a framework default); keep what it says.
        message = str(payload["detail"])
        error_body = dict(payload)
    else:
        text = response.text.strip()
        message = text[:300] if text else reason
    if not message:
        message = reason
    request = response.request
    return error_class_for(status)(
        status,
        message,
        tuple(details),
        method=request.method,
        url=str(request.url),
        body=error_body,
    )


class HivenetClient:
    """A client for one HiveNet API server. Use as a context manager or call `close()`.

    `base_url` is the server root (e.g. `http://127.0.0.1:9696`); the `/v1` prefix is added
    here. `token` is sent as `Authorization: Bearer <token>` when given. For an `https://`
    root, `ca_cert` names the PEM bundle of the CA(s) to trust (default: the system trust
    store); `insecure=True` accepts any certificate and warns (`InsecureTlsWarning`).
    A `ca_cert` that cannot be used raises `hivenet.api.tls.TlsFileError`.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        transport: httpx.BaseTransport | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        ca_cert: str | os.PathLike[str] | None = None,
        insecure: bool = False,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry if retry is not None else RetryPolicy()
        self._sleep = sleep
        headers = {"Accept": "application/json", "User-Agent": "hivenet-client/0.1"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if insecure:
            warnings.warn(
                f"TLS certificate verification is off for {self.base_url}: anyone between "
                "here and the server can read and change the traffic, the token included",
                InsecureTlsWarning,
                stacklevel=2,
            )
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=timeout,
            transport=transport,
            # A plain-http server needs no CA: a bundle is checked only when it will be used.
            verify=insecure_ssl_context()
            if insecure
            else client_ssl_context(ca_cert if self.base_url.startswith("https://") else None),
        )

    def __enter__(self) -> HivenetClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing -------------------------------------------------------------------------

    @staticmethod
    def collection_path(kind: str) -> str:
        if kind not in COLLECTIONS:
            raise ValueError(f"unknown kind {kind!r}; known kinds: {', '.join(COLLECTIONS)}")
        return f"{API_PREFIX}/{COLLECTIONS[kind]}"

    @classmethod
    def object_path(cls, kind: str, object_id: str) -> str:
        if not object_id:
            raise ValueError(f"{kind} id must not be empty")
        return f"{cls.collection_path(kind)}/{quote(object_id, safe='')}"

    def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        if_revision: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        all_headers = dict(headers or {})
        if if_revision is not None:
            all_headers["If-Match"] = f'"{if_revision}"'
        if method == "GET":
            retryable = _Retryable(always=True)
        elif method == "DELETE":
            retryable = _Retryable(always=if_revision is None, gone_is_done=True)
        elif method == "POST":  # creates: they always name their object (see create())
            retryable = _Retryable(always=True)
        else:
            retryable = _Retryable(always=if_revision is None)
        outcome_unknown = False
        for retry in range(self.retry.attempts):
            last = retry == self.retry.attempts - 1
            try:
                response = self._http.request(
                    method,
                    path,
                    json=json_body,
                    params={k: v for k, v in (params or {}).items() if v is not None},
                    headers=all_headers,
                )
            except httpx.TransportError as exc:
                refused = verification_failure(exc)
                if refused is not None:  # the same certificate again: no retry
                    raise TlsVerificationError(self.base_url, refused.reason) from exc
                # No server to talk to: say so at once (a retry would only delay that).
                never_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                if last or never_sent or not retryable.always:
                    reason = (
                        f"timed out ({type(exc).__name__})"
                        if isinstance(exc, httpx.TimeoutException)
                        else str(exc) or type(exc).__name__
                    )
                    raise ApiConnectionError(self.base_url, reason) from exc
                outcome_unknown = True
                self._sleep(self.retry.pause(retry, None))
                continue
            if response.status_code == 503 and not last:
                error = _error_from_response(response)
                assert isinstance(error, ServiceUnavailableError)
                if retryable.always or error.write_outcome == "not_applied":
                    outcome_unknown = outcome_unknown or error.write_outcome == "unknown"
                    self._sleep(self.retry.pause(retry, response.headers.get("Retry-After")))
                    continue
            if response.status_code == 404 and retryable.gone_is_done and outcome_unknown:
                return response  # an earlier try deleted it
            if response.is_error:
                raise _error_from_response(response)
            return response
        raise AssertionError("unreachable: the last try returns or raises")

    def _stored(self, kind: str, response: httpx.Response) -> StoredObject:
        data = response.json()
        if not isinstance(data, dict):
            raise ApiError(
                response.status_code,
                f"expected a JSON object from {response.request.url}, got {type(data).__name__}",
            )
        return StoredObject(kind, data, parse_etag(response.headers.get("ETag")))

    # -- API ------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """`GET /v1/health` (no auth): `{"status": "ok", "revision": N}`."""
        data = self._request("GET", f"{API_PREFIX}/health").json()
        return data if isinstance(data, dict) else {"status": data}

    def create(
        self, kind: str, fields: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> StoredObject:
        """`POST`: the server validates, assigns an id if absent and returns the stored object.

        Without an `id` in `fields`, the create carries an `Idempotency-Key` (`idempotency_key`,
        else a new random one), so that its retries, here or by the caller with the same key,
        make one object."""
        headers = {}
        if "id" not in fields or idempotency_key is not None:
            headers[IDEMPOTENCY_KEY_HEADER] = idempotency_key or str(uuid.uuid4())
        response = self._request(
            "POST", self.collection_path(kind), json_body=dict(fields), headers=headers
        )
        return self._stored(kind, response)

    def create_object(self, obj: TopologyObject) -> StoredObject:
        """Create from a model value (server-owned fields such as a port's tunnel_key left out)."""
        body = obj.model_dump(mode="json", exclude=set(SERVER_OWNED_FIELDS.get(obj.KIND, ())))
        return self.create(obj.KIND, body)

    def get(self, kind: str, object_id: str) -> StoredObject:
        return self._stored(kind, self._request("GET", self.object_path(kind, object_id)))

    def list_page(
        self,
        kind: str,
        filters: Mapping[str, str | None] | None = None,
        *,
        limit: int | None = None,
        marker: str | None = None,
    ) -> Page:
        """One page, sorted by id. `filters`: name, tenant_id and the per-kind parent id."""
        if limit is not None and not 1 <= limit <= MAX_PAGE_SIZE:
            raise ValueError(f"limit={limit}: must be between 1 and {MAX_PAGE_SIZE}")
        params: dict[str, Any] = dict(filters or {})
        params["limit"] = limit
        params["marker"] = marker
        payload = self._request("GET", self.collection_path(kind), params=params).json()
        if not isinstance(payload, dict) or not isinstance(payload.get("items"), list):
            raise ApiError(200, f"malformed list response for {kind}: expected {{'items': [...]}}")
        next_marker = payload.get("next_marker")
        return Page(list(payload["items"]), None if next_marker is None else str(next_marker))

    def iter_all(
        self,
        kind: str,
        filters: Mapping[str, str | None] | None = None,
        *,
        page_size: int = MAX_PAGE_SIZE,
    ) -> Iterator[dict[str, Any]]:
        """Every matching object, following `next_marker` page after page."""
        marker: str | None = None
        while True:
            page = self.list_page(kind, filters, limit=page_size, marker=marker)
            yield from page.items
            if page.next_marker is None or not page.items:
                return
            marker = page.next_marker

    def list_all(
        self, kind: str, filters: Mapping[str, str | None] | None = None
    ) -> list[dict[str, Any]]:
        return list(self.iter_all(kind, filters))

    def replace(
        self,
        kind: str,
        object_id: str,
        fields: Mapping[str, Any],
        *,
        if_revision: int | None = None,
    ) -> StoredObject:
        """`PUT`: full replacement; 412 if `if_revision` is not the current revision."""
        response = self._request(
            "PUT",
            self.object_path(kind, object_id),
            json_body=dict(fields),
            if_revision=if_revision,
        )
        return self._stored(kind, response)

    def update(
        self,
        kind: str,
        object_id: str,
        changes: Mapping[str, Any],
        *,
        if_revision: int | None = None,
    ) -> StoredObject:
        """`PATCH`: merge `changes` into the object; 412 if `if_revision` is stale."""
        response = self._request(
            "PATCH",
            self.object_path(kind, object_id),
            json_body=dict(changes),
            if_revision=if_revision,
        )
        return self._stored(kind, response)

    def load_balancer_stats(self, load_balancer_id: str) -> dict[str, Any]:
        """`GET /v1/load_balancers/{id}/stats`: active connections, bytes in/out (total and
        per member), summed over the live hosts that report them (listed in `hosts`)."""
        return self.object_stats("load_balancer", load_balancer_id)

    def trace(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """`POST /v1/traces`: simulate a synthetic packet from a port (no side effect)."""
        return _json_object(self._request("POST", "/v1/traces", json_body=dict(request)))

    def live_trace(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """`POST /v1/traces/live`: arm a live trace; returns its id, host and expiry."""
        return _json_object(self._request("POST", "/v1/traces/live", json_body=dict(request)))

    def get_live_trace(self, trace_id: str) -> dict[str, Any]:
        """`GET /v1/traces/live/{id}`: its status and the records so far."""
        return _json_object(self._request("GET", f"/v1/traces/live/{quote(trace_id, safe='')}"))

    def object_stats(self, kind: str, object_id: str) -> dict[str, Any]:
        """`GET /v1/<plural>/{id}/stats` (ports, bridges, routers, chains, hosts, load
        balancers): the object's counters summed over the live hosts."""
        path = f"{self.object_path(kind, object_id)}/stats"
        return _json_object(self._request("GET", path))

    def router_uplinks(self, router_id: str) -> dict[str, Any]:
        """`GET /v1/routers/{id}/uplinks`: the router's uplinks (host, interface, host alive,
        link, BGP sessions) and its learned routes."""
        return _json_object(
            self._request("GET", f"{self.object_path('router', router_id)}/uplinks")
        )

    def create_token(
        self,
        project: str,
        role: str,
        *,
        name: str | None = None,
        expires_at: str | None = None,
    ) -> dict[str, Any]:
        """`POST /v1/tokens`: a project token; the answer's `secret` is shown this once."""
        body: dict[str, Any] = {"project": project, "role": role}
        if name is not None:
            body["name"] = name
        if expires_at is not None:
            body["expires_at"] = expires_at
        return _json_object(self._request("POST", "/v1/tokens", json_body=body))

    def list_tokens(self) -> list[dict[str, Any]]:
        """`GET /v1/tokens`: the tokens this caller manages (no secrets)."""
        items = _json_object(self._request("GET", "/v1/tokens")).get("items")
        return list(items) if isinstance(items, list) else []

    def revoke_token(self, token_id: str) -> None:
        """`DELETE /v1/tokens/{id}`: its next request on any API server is refused."""
        self._request("DELETE", f"/v1/tokens/{quote(token_id, safe='')}")

    def get_quotas(self, project: str) -> dict[str, Any]:
        """`GET /v1/quotas/{project}`: {"project", "quotas", "usage"} (limits per kind)."""
        return _json_object(self._request("GET", f"/v1/quotas/{quote(project, safe='')}"))

    def set_quotas(self, project: str, limits: dict[str, int]) -> dict[str, Any]:
        """`PUT /v1/quotas/{project}`: change the named kinds' limits (-1: unlimited)."""
        path = f"/v1/quotas/{quote(project, safe='')}"
        return _json_object(self._request("PUT", path, json_body=limits))

    def reset_quotas(self, project: str) -> None:
        """`DELETE /v1/quotas/{project}`: every kind back to its default."""
        self._request("DELETE", f"/v1/quotas/{quote(project, safe='')}")

    def delete(
        self,
        kind: str,
        object_id: str,
        *,
        cascade: bool = False,
        if_revision: int | None = None,
    ) -> None:
        """`DELETE`; 409 while still referenced unless `cascade` (which removes the referrers)."""
        self._request(
            "DELETE",
            self.object_path(kind, object_id),
            params={"cascade": "true" if cascade else "false"},
            if_revision=if_revision,
        )


def _json_object(response: httpx.Response) -> dict[str, Any]:
    data = response.json()
    if not isinstance(data, dict):
        raise ApiError(
            response.status_code,
            f"expected a JSON object from {response.request.url}, got {type(data).__name__}",
        )
    return data
