"""The error side of the REST contract: one JSON shape for every failure, and the mapping from
each exception (validation, repository refusals, store trouble, HTTP routing) to a status.

    {"error": {"status": 422, "message": "...",
               "details": [{"field": "mac", "value": "zz", "message": "invalid MAC ..."}]}}

`field` is None for a problem that concerns the object as a whole. A 503 (the store could
not answer) adds what the operator and the client need to act on it:

    "store": {"failed": "172.31.250.254:2379 (the leader)", "write": "unknown",
              "read_back": "/v1/bridges/b1"}

`failed` names what failed (a member, "no leader", a locked database); `write` is
"not_applied" (retry), "unknown" (it reached a member that failed before answering: GET
`read_back` to see whether it was applied, or repeat a create with the same id or
Idempotency-Key, which returns the first result), or null for a request that writes nothing.
Owns nothing else: it must not touch the store or decide what a request means.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from hivenet.store.base import (
    StoreCorruptError,
    StoreError,
    StoreUnavailableError,
    WriteOutcome,
)
from hivenet.store.quota import QuotaConflictError, QuotaValueError
from hivenet.store.topology import (
    ConflictError,
    DanglingReferenceError,
    InvalidFieldError,
    NotFoundError,
    OverQuotaError,
    ReferencedError,
    RevisionMismatchError,
)

_log = logging.getLogger("hivenet.api")

# A location part that names a field; others are pydantic's union member tags
# ("lax-or-strict[...]", "function-after[...]") that mean nothing to a client.
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Seconds a client should wait before retrying after a 503 (the store was locked, or its
# members were electing a leader, which takes about a second).
RETRY_AFTER_SECONDS = 1
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ErrorDetailBody(BaseModel):
    field: str | None
    value: Any = None
    message: str


class StoreFailureBody(BaseModel):
    """What a 503 says about the store: what failed and what became of the write."""

    failed: str
    write: str | None = None  # "not_applied" | "unknown" | None (the request writes nothing)
    read_back: str | None = None  # GET this to learn whether an "unknown" write was applied


class ErrorInfoBody(BaseModel):
    status: int
    message: str
    details: list[ErrorDetailBody] = []
    store: StoreFailureBody | None = None  # 503 only


class ErrorBody(BaseModel):
    """Every non-2xx response carries this body."""

    error: ErrorInfoBody


class ApiError(Exception):
    """A refusal decided by the API layer itself (bad JSON, bad header, auth, ...)."""

    def __init__(
        self,
        status: int,
        message: str,
        details: Sequence[Mapping[str, Any]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = [dict(d) for d in details]
        self.headers = dict(headers or {})


def detail(field: str | None, value: object, message: str) -> dict[str, Any]:
    return {"field": field, "value": _json_safe(value), "message": message}


def error_response(
    status: int,
    message: str,
    details: Sequence[Mapping[str, Any]] = (),
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    error = {"status": status, "message": message, "details": list(details), **(extra or {})}
    return JSONResponse({"error": error}, status_code=status, headers=dict(headers or {}))


def _json_safe(value: object) -> Any:
    """`value` if JSON can carry it as is, else its text (IP networks, enums, bytes, ...)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        return str(value)
    return value


def _pydantic_message(error: Mapping[str, Any], field: str | None) -> str:
    if error.get("type") == "extra_forbidden" and field is not None:
        return f"unknown field {field!r}"
    message = str(error.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    return message


def validation_details(
    errors: Sequence[Mapping[str, Any]], *, strip_location: int = 0
) -> list[dict[str, Any]]:
    """Pydantic error dicts as contract details; the first `strip_location` parts of each
    location (e.g. "query", "path") are dropped from the field name."""
    merged: dict[tuple[str | None, str], dict[str, Any]] = {}
    for error in errors:
        parts = list(error.get("loc", ()))[strip_location:]
        location = [
            str(part) for part in parts if isinstance(part, int) or _FIELD_NAME.match(str(part))
        ]
        last = parts[-1] if parts else None
        if (
            error.get("type") == "extra_forbidden"
            and isinstance(last, str)
            and not _FIELD_NAME.match(last)
        ):
            # The client's own key, whatever its characters: it is what must be named.
            location.append(last)
        field = ".".join(location) if location else None
        value = error.get("input") if field is not None else None
        message = _pydantic_message(error, field)
        # A value checked against a union fails once per member: report it once.
        key = (field, repr(value))
        if key in merged:
            if message not in merged[key]["message"]:
                merged[key]["message"] += f"; {message}"
            continue
        merged[key] = detail(field, value, message)
    return list(merged.values())


def _summary(details: Sequence[Mapping[str, Any]], fallback: str) -> str:
    parts = [
        f"{d['field']}: {d['message']}" if d.get("field") else str(d["message"]) for d in details
    ]
    return "; ".join(parts) if parts else fallback


# --------------------------------------------------------------------------------------------
# Handlers


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.details, exc.headers)


async def _request_validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "malformed JSON in the request body")
    details = validation_details(errors, strip_location=1)
    return error_response(422, _summary(details, "invalid request"), details)


async def _model_validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, pydantic.ValidationError)
    details = validation_details(exc.errors())
    return error_response(422, f"invalid {exc.title}: {_summary(details, '')}", details)


async def _not_found(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NotFoundError)
    return error_response(404, str(exc))


async def _referenced(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ReferencedError)
    details = [
        {
            "field": "/".join(r.fields),
            "value": r.id,
            "kind": r.kind,
            "message": f"{r.kind} {r.id} references {exc.kind} {exc.object_id} "
            f"through {'/'.join(r.fields)}",
        }
        for r in exc.referrers
    ]
    return error_response(409, str(exc), details)


async def _dangling(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DanglingReferenceError)
    return error_response(
        422, str(exc), [detail(exc.field, exc.value, f"no {exc.kind} with that id")]
    )


async def _invalid_field(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidFieldError)
    return error_response(422, str(exc), [detail(exc.field, exc.value, exc.reason)])


async def _conflict(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(409, str(exc))


async def _over_quota(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OverQuotaError)
    return error_response(
        409,
        str(exc),
        [
            {
                "field": exc.kind,
                "value": exc.usage,
                "project": exc.project,
                "limit": exc.limit,
                "message": f"over quota: limit {exc.limit}, in use {exc.usage}",
            }
        ],
    )


async def _quota_value(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QuotaValueError)
    return error_response(422, str(exc), [detail(exc.field, exc.value, exc.reason)])


async def _revision_mismatch(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RevisionMismatchError)
    return error_response(
        412,
        f"If-Match revision {exc.expected} does not match the current revision {exc.actual}",
        headers={"ETag": f'"{exc.actual}"'},
    )


def _store_failure(request: Request, exc: StoreUnavailableError) -> tuple[str, dict[str, Any]]:
    """The 503's message and its `store` object (see the module docstring)."""
    failed = exc.failed or str(exc)
    if request.method in _READ_METHODS:
        return f"store unavailable: {exc}", {"failed": failed, "write": None, "read_back": None}
    if exc.outcome is WriteOutcome.NOT_APPLIED:
        return (
            f"store unavailable: {exc}; the write was not applied: retry",
            {"failed": failed, "write": "not_applied", "read_back": None},
        )
    created_location = getattr(request.state, "created_location", None)
    read_back = created_location or request.url.path
    hint = f"GET {read_back} tells whether it was applied"
    if created_location:
        hint += "; repeating the create with the same id or Idempotency-Key is safe"
    return (
        f"store unavailable: {exc}; whether the write was applied is unknown: {hint}",
        {"failed": failed, "write": "unknown", "read_back": read_back},
    )


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StoreUnavailableError)
    _log.warning("store unavailable: %s", exc)
    message, store = _store_failure(request, exc)
    return error_response(
        503,
        message,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        extra={"store": store},
    )


async def _store_corrupt(_request: Request, exc: Exception) -> JSONResponse:
    _log.error("store corrupt: %s", exc)
    return error_response(500, f"store corrupt: {exc}")


async def _store_error(_request: Request, exc: Exception) -> JSONResponse:
    _log.error("store error: %s", exc)
    return error_response(500, f"store error: {exc}")


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    _log.exception("internal error", exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    # Starlette picks the handler of the most specific class in the exception's MRO.
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(pydantic.ValidationError, _model_validation)
    app.add_exception_handler(NotFoundError, _not_found)
    app.add_exception_handler(ReferencedError, _referenced)
    app.add_exception_handler(DanglingReferenceError, _dangling)
    app.add_exception_handler(InvalidFieldError, _invalid_field)
    app.add_exception_handler(ConflictError, _conflict)
    app.add_exception_handler(OverQuotaError, _over_quota)
    app.add_exception_handler(QuotaValueError, _quota_value)
    app.add_exception_handler(QuotaConflictError, _conflict)
    app.add_exception_handler(RevisionMismatchError, _revision_mismatch)
    app.add_exception_handler(StoreUnavailableError, _store_unavailable)
    app.add_exception_handler(StoreCorruptError, _store_corrupt)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
