"""Project tokens: `/v1/tokens` (issue, list, revoke) and their lookup on every request.

A token belongs to one project with one role (`auth.Role`). Its secret
(`secrets.token_urlsafe(32)`) is shown once, in the create answer; the store keeps only its
SHA-256 under `/hivenet/v1/auth/tokens/<sha256 hex>` (a key space of its own, not a topology
kind), written and deleted in guarded store txns. Every request with a token that is not the
admin token reads that one key (`resolve_project_token`), so a revocation or an expiry takes
effect on the next request on every API server; the secret is hashed before the lookup, so
the lookup leaks nothing through its timing. What is cached is only the decoding of a stored
value, by (store, key, mod revision): the same revision of a key is the same bytes, so the
read still happens every time and a revoked token (key gone) or a changed one (new revision)
is never answered from the cache.

Who may issue/list/revoke: the cluster admin for any project; a project admin for its own
project (any role: admin is the highest a project has); members and readers not at all.
Must not contain topology rules.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import uuid
import weakref
from collections import OrderedDict
from typing import Any

import pydantic
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from hivenet.api.auth import Principal, Role, authenticate
from hivenet.api.errors import ApiError, ErrorBody, detail
from hivenet.model.topology import DEFAULT_TENANT
from hivenet.model.types import ObjectId
from hivenet.store.base import Compare, Delete, Put, Store, StoreCorruptError

TOKENS_PREFIX = "/hivenet/v1/auth/tokens/"
TOKENS_PATH = "/v1/tokens"


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def token_key(hashed: str) -> str:
    return f"{TOKENS_PREFIX}{hashed}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: ObjectId
    role: Role
    name: str = Field(default="", max_length=255)
    expires_at: dt.datetime | None = None


class TokenInfo(BaseModel):
    """A token as stored and listed: everything but the secret. Frozen: a decoded value is
    shared by the requests that read the same stored revision."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    project: ObjectId
    role: Role
    name: str = ""
    created_at: dt.datetime
    created_by: str
    expires_at: dt.datetime | None = None

    def expired(self, now: dt.datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


class TokenCreated(TokenInfo):
    secret: str = Field(description="the bearer token; shown this once, never stored")


class TokenList(BaseModel):
    items: list[TokenInfo]


def _decode(key: str, raw: bytes) -> TokenInfo:
    try:
        return TokenInfo.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        raise StoreCorruptError(f"stored value of {key} is not a valid token: {exc}") from exc


_DECODED_PER_STORE = 4096  # decoded token values kept per store (least recently used go)
_decoded: weakref.WeakKeyDictionary[Store, OrderedDict[tuple[str, int], TokenInfo]] = (
    weakref.WeakKeyDictionary()
)


def _decode_cached(store: Store, key: str, mod_revision: int, raw: bytes) -> TokenInfo:
    """`_decode`, remembered by (store, key, mod revision): that names one stored value."""
    cache = _decoded.get(store)
    if cache is None:
        cache = _decoded[store] = OrderedDict()
    cached = cache.get((key, mod_revision))
    if cached is not None:
        cache.move_to_end((key, mod_revision))
        return cached
    info = _decode(key, raw)
    cache[(key, mod_revision)] = info
    if len(cache) > _DECODED_PER_STORE:
        cache.popitem(last=False)
    return info


async def _store(request: Request) -> Store:
    store: Store = await request.app.state.store_holder.store()
    return store


class ExpiredTokenError(Exception):
    """A project token past its `expires_at` (each API answers it with its own 401)."""


async def lookup_project_token(store: Store, secret: str) -> Principal | None:
    """The principal of a project token (None: unknown or revoked); `ExpiredTokenError`
    when it has expired. One store read; shared by /v1 and the OpenStack APIs."""
    key = token_key(token_hash(secret))
    kv = await store.get(key)
    if kv is None:
        return None
    info = _decode_cached(store, key, kv.mod_revision, kv.value)
    if info.expired(_now()):
        raise ExpiredTokenError(f"token {info.id} expired at {info.expires_at:%Y-%m-%dT%H:%M:%SZ}")
    return Principal(name=f"token {info.id}", tenant_id=info.project, role=info.role)


async def resolve_project_token(request: Request, secret: str) -> Principal | None:
    """The principal of a project token (None: unknown or revoked; 401 when expired)."""
    try:
        return await lookup_project_token(await _store(request), secret)
    except ExpiredTokenError as exc:
        raise ApiError(401, f"bearer {exc}", headers={"WWW-Authenticate": "Bearer"}) from None


def _require_token_admin(principal: Principal, project: str | None = None) -> None:
    """Only the cluster admin and project admins manage tokens (of their project)."""
    if principal.is_admin:
        return
    if principal.role is not Role.ADMIN:
        raise ApiError(
            403,
            f"role {principal.role.value!r} may not manage tokens (this token: "
            f"{principal.describe()}); a project admin or the cluster admin may",
            [detail("role", principal.role.value, "not a token admin")],
        )
    if project is not None and project != principal.tenant_id:
        raise ApiError(
            403,
            f"project={project!r}: this token manages the tokens of project "
            f"{principal.tenant_id!r} only",
            [detail("project", project, "not your project")],
        )


async def _all_tokens(store: Store) -> list[tuple[str, int, TokenInfo]]:
    result = await store.range(TOKENS_PREFIX)
    return [(kv.key, kv.mod_revision, _decode(kv.key, kv.value)) for kv in result.kvs]


def tokens_router() -> APIRouter:
    router = APIRouter(
        prefix=TOKENS_PATH,
        tags=["tokens"],
        responses={status: {"model": ErrorBody} for status in (401, 403, 404, 409, 422, 500, 503)},
    )

    @router.post("", status_code=201, response_model=TokenCreated, operation_id="create_token")
    async def create_token(
        body: TokenRequest, request: Request, principal: Principal = Depends(authenticate)
    ) -> JSONResponse:
        """Issue a token for `project` with `role`; the answer holds its secret, once."""
        _require_token_admin(principal, body.project)
        if body.project == DEFAULT_TENANT:
            # The cluster admin's own tenant (infrastructure) has no quota: no tenant acts in it.
            raise ApiError(
                422,
                f"project={body.project!r} is the cluster admin's own tenant; "
                "issue tokens for other projects",
                [detail("project", body.project, "reserved for the cluster admin")],
            )
        now = _now()
        if body.expires_at is not None:
            if body.expires_at.tzinfo is None:
                raise ApiError(
                    422,
                    f"expires_at={body.expires_at.isoformat()!r}: give a time zone (Z or +hh:mm)",
                    [detail("expires_at", body.expires_at.isoformat(), "no time zone")],
                )
            if body.expires_at <= now:
                raise ApiError(
                    422,
                    f"expires_at={body.expires_at.isoformat()!r} is in the past",
                    [detail("expires_at", body.expires_at.isoformat(), "in the past")],
                )
        secret = secrets.token_urlsafe(32)
        info = TokenInfo(
            id=str(uuid.uuid4()),
            project=body.project,
            role=body.role,
            name=body.name,
            created_at=now,
            created_by=principal.name,
            expires_at=body.expires_at,
        )
        key = token_key(token_hash(secret))
        store = await _store(request)
        result = await store.txn(
            [Compare(key, "create_revision", "==", 0)],
            [Put(key, info.model_dump_json().encode())],
        )
        if not result.succeeded:  # two equal 256-bit secrets: never, but never overwrite
            raise ApiError(409, "token collision; retry")
        created = TokenCreated(**info.model_dump(), secret=secret)
        return JSONResponse(
            json.loads(created.model_dump_json()),
            status_code=201,
            headers={"Location": f"{TOKENS_PATH}/{info.id}"},
        )

    @router.get("", response_model=TokenList, operation_id="list_tokens")
    async def list_tokens(
        request: Request, principal: Principal = Depends(authenticate)
    ) -> dict[str, Any]:
        """The tokens the caller manages (no secrets), oldest first."""
        _require_token_admin(principal)
        tokens = [
            info
            for _key, _revision, info in await _all_tokens(await _store(request))
            if principal.may_access(info.project)
        ]
        tokens.sort(key=lambda info: (info.created_at, info.id))
        return {"items": [json.loads(info.model_dump_json()) for info in tokens]}

    @router.delete(
        "/{token_id}", status_code=204, response_class=Response, operation_id="revoke_token"
    )
    async def revoke_token(
        token_id: str, request: Request, principal: Principal = Depends(authenticate)
    ) -> Response:
        """Revoke a token: its next request, on any API server, is refused (401)."""
        _require_token_admin(principal)
        store = await _store(request)
        for key, revision, info in await _all_tokens(store):
            if info.id == token_id and principal.may_access(info.project):
                await store.txn([Compare(key, "mod_revision", "==", revision)], [Delete(key)])
                return Response(status_code=204)  # a concurrent revoke also leaves it gone
        raise ApiError(404, f"no token with id {token_id!r}")

    return router
