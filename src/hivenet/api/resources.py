"""The `/v1/<plural>` collections: one router factory, parametrized by topology kind.

Owns the HTTP meaning of create/list/get/replace/patch/delete for every kind in
`hivenet.model.KINDS` (status codes, `ETag`/`If-Match`, `Location`, pagination, body parsing,
tenant scoping via the caller's `Principal`). The rules that need the store (references,
peering, tunnel keys, concurrency) belong to `TopologyRepository`; this module must not
reimplement them nor touch store keys.

Creates are idempotent on request: a create whose id is taken by an object that the same
request would have made (every field it sends equal, the rest at their defaults) answers with
that object (201, `Idempotent-Replay: true`) instead of 409, so a client may retry a create
whose answer it lost. A client that does not choose the id sends `Idempotency-Key: <key>`; the
id is then derived from (tenant, kind, key), so every retry names the same object.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable
from typing import Any

import pydantic
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, create_model

from hivenet.api.auth import Principal, authenticate
from hivenet.api.errors import ApiError, ErrorBody, detail
from hivenet.api.tenancy import check_infrastructure, scope_of
from hivenet.model import KINDS, Port, TopologyObject, is_shared
from hivenet.model.types import ObjectId
from hivenet.store.topology import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    AlreadyExistsError,
    NotFoundError,
    TopologyRepository,
    Versioned,
)

API_PREFIX = "/v1"
# Collection name per kind: the plural of the model KIND.
PLURALS: dict[str, str] = {kind: f"{kind}s" for kind in KINDS}
# The parent filter each child collection accepts as a query parameter.
CHILD_FILTERS: dict[str, str] = {
    "port": "device_id",
    "route": "router_id",
    "rule": "chain_id",
    "load_balancer": "router_id",
    "listener": "load_balancer_id",
    "pool": "load_balancer_id",
    "member": "pool_id",
    "health_monitor": "pool_id",
    "security_group_rule": "security_group_id",
    "floating_ip": "router_id",
    "subnet": "bridge_id",
    "bgp_peer": "port_id",
}
# Fields only the server sets: a create that names them is refused.
SERVER_OWNED_FIELDS: dict[str, frozenset[str]] = {"port": frozenset({"tunnel_key"})}

_object_id_adapter: pydantic.TypeAdapter[str] = pydantic.TypeAdapter(ObjectId)

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
IDEMPOTENT_REPLAY_HEADER = "Idempotent-Replay"
_IDEMPOTENCY_KEY_MAX = 255
# Fixed: the same (tenant, kind, key) must give the same id on every server, forever.
_IDEMPOTENCY_NAMESPACE = uuid.UUID("5b0c6f1e-7d3a-4c57-9a64-2f1d3e8b9c10")

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "malformed JSON body or header",
        401: "missing or invalid bearer token",
        403: "the token may not act on that tenant",
        404: "no such object",
        409: "conflict: still referenced, duplicate id (of another request), port already linked",
        412: "If-Match does not name the current revision",
        422: "validation failed: the details name each field and value",
        500: "store corrupt",
        503: "store unavailable: `error.store` says what failed and whether the write was "
        "applied (not_applied: retry; unknown: read it back, or retry an idempotent create)",
    }.items()
}


async def get_repository(request: Request) -> TopologyRepository:
    repository: TopologyRepository = await request.app.state.store_holder.repository()
    return repository


def etag(revision: int) -> str:
    return f'"{revision}"'


def parse_if_match(request: Request) -> int | None:
    """The revision an `If-Match` header demands; None when absent or `*`."""
    header = request.headers.get("if-match")
    if header is None or header.strip() == "*":
        return None
    text = header.strip()
    if text.startswith('"') and text.endswith('"') and len(text) >= 2:
        text = text[1:-1]
    if not text.isdigit() or not text.isascii():
        raise ApiError(
            400,
            f"If-Match must be one revision in quotes, like '\"12\"' (got {header!r})",
            [detail("If-Match", header, "not a revision")],
        )
    return int(text)


async def read_json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON in the request body: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(
            400,
            f"the request body must be a JSON object, not a JSON {type(data).__name__}",
        )
    return data


def _object_body(stored: Versioned[Any]) -> dict[str, Any]:
    body: dict[str, Any] = stored.obj.model_dump(mode="json")
    return body


def object_response(
    stored: Versioned[Any], status: int = 200, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        _object_body(stored),
        status_code=status,
        headers={"ETag": etag(stored.mod_revision), **(headers or {})},
    )


def _checked_path_id(cls: type[TopologyObject], object_id: str) -> str:
    """A path id that no object could have is simply not found."""
    try:
        return _object_id_adapter.validate_python(object_id)
    except pydantic.ValidationError:
        raise NotFoundError(cls.KIND, object_id) from None


def _check_body_id(data: dict[str, Any], object_id: str) -> None:
    if "id" in data and data["id"] != object_id:
        raise ApiError(
            422,
            f"id {data['id']!r} in the body does not match {object_id!r} in the path",
            [detail("id", data["id"], f"must match the path id {object_id!r}")],
        )


def idempotent_id(tenant_id: str | None, kind: str, key: str) -> str:
    """The id a create with `Idempotency-Key: key` gets: the same for every retry."""
    return str(uuid.uuid5(_IDEMPOTENCY_NAMESPACE, f"{tenant_id or ''}/{kind}/{key}"))


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
    if key is not None and not (
        0 < len(key) <= _IDEMPOTENCY_KEY_MAX and key.isascii() and key.isprintable()
    ):
        raise ApiError(
            400,
            f"{IDEMPOTENCY_KEY_HEADER} must be 1-{_IDEMPOTENCY_KEY_MAX} printable ASCII "
            f"characters (got {key!r})",
            [detail(IDEMPOTENCY_KEY_HEADER, key, "not a valid idempotency key")],
        )
    return key


def _is_replay(requested: TopologyObject, stored: TopologyObject, sent: set[str]) -> bool:
    """True when `stored` is what the create of `requested` made: equal in every field except
    those the server fills with a fresh value (left out of the request)."""
    fresh = {
        name
        for name, info in type(requested).model_fields.items()
        if name not in sent and info.default_factory is not None
    } | SERVER_OWNED_FIELDS.get(requested.KIND, frozenset())
    return requested.model_dump(exclude=fresh) == stored.model_dump(exclude=fresh)


def _require_tenant(principal: Principal, obj: TopologyObject) -> None:
    if not principal.may_access(obj.tenant_id):
        # Objects of other tenants do not exist as far as this caller can tell.
        raise NotFoundError(obj.KIND, obj.id)


async def _shared(repository: TopologyRepository, obj: TopologyObject) -> bool:
    """Every project may read (and reference) it: a shared bridge, a subnet of one."""
    return is_shared(obj) or await repository.shared_via_parent(obj)


async def _require_readable(
    principal: Principal, obj: TopologyObject, repository: TopologyRepository
) -> None:
    """A caller may read its own objects and the shared ones (it may reference those)."""
    if not principal.may_access(obj.tenant_id) and not await _shared(repository, obj):
        raise NotFoundError(obj.KIND, obj.id)


async def _refuse_shared(
    principal: Principal,
    cls: type[TopologyObject],
    object_id: str,
    repository: TopologyRepository,
) -> None:
    """After a tenant's write was refused as 'not found': a 403 when the object is another
    project's shared one (the caller reads it, so hiding it would be a lie); else nothing."""
    if principal.is_admin:
        return
    try:
        stored = await repository.get(cls, object_id)
    except NotFoundError:
        return
    if not principal.may_access(stored.obj.tenant_id) and await _shared(repository, stored.obj):
        raise ApiError(
            403,
            f"{cls.KIND} {object_id} is shared by another project: this token may read and "
            f"reference it, not change it (this token: {principal.describe()})",
            [detail("id", object_id, "another project's shared object")],
        )


def _require_tenant_write(principal: Principal, obj: TopologyObject) -> None:
    if not principal.may_access(obj.tenant_id):
        raise ApiError(
            403,
            f"tenant_id={obj.tenant_id!r}: this token acts for tenant {principal.tenant_id!r}",
            [detail("tenant_id", obj.tenant_id, "not your tenant")],
        )


async def _modify_as(
    principal: Principal,
    repository: TopologyRepository,
    cls: type[TopologyObject],
    object_id: str,
    change: Callable[[TopologyObject], TopologyObject],
    expected: int | None,
) -> Versioned[TopologyObject]:
    """A PUT/PATCH's read-modify-write as `principal` (its project's objects only; another
    project's shared object: 403, see `_refuse_shared`)."""
    try:
        return await repository.modify(
            cls,
            object_id,
            change,
            expected_revision=expected,
            precondition=lambda current: _require_tenant(principal, current),
            scope=scope_of(principal),
        )
    except NotFoundError:
        await _refuse_shared(principal, cls, object_id, repository)
        raise


def _kept_when_omitted(cls: type[TopologyObject]) -> tuple[str, ...]:
    """Fields a full replacement (PUT) keeps when the body omits them: the owner tenant and
    the fields the model would fill with a fresh random value (a port's MAC), so a PUT that
    leaves them out neither moves the object to the default tenant nor re-rolls its MAC."""
    generated = [
        name
        for name, info in cls.model_fields.items()
        if info.default_factory is not None and name != "id"
    ]
    return ("tenant_id", *generated)


def _child_filter_dependency(kind: str) -> Callable[..., dict[str, str]]:
    field = CHILD_FILTERS.get(kind)
    if field is None:

        def no_filter() -> dict[str, str]:
            return {}

        return no_filter

    def child_filter(
        value: str | None = Query(None, alias=field, description=f"only {kind}s with this {field}"),
    ) -> dict[str, str]:
        return {field: value} if value is not None else {}

    return child_filter


def kind_router(cls: type[TopologyObject]) -> APIRouter:
    """The routes of one collection."""
    kind = cls.KIND
    plural = PLURALS[kind]
    schema_ref = {"$ref": f"#/components/schemas/{cls.__name__}"}
    owned = SERVER_OWNED_FIELDS.get(kind, frozenset())
    kept_when_omitted = _kept_when_omitted(cls)
    page_model: type[BaseModel] = create_model(
        f"{cls.__name__}Page",
        items=(list[cls], ...),  # type: ignore[valid-type]
        next_marker=(str | None, None),
    )
    router = APIRouter(prefix=f"{API_PREFIX}/{plural}", tags=[plural], responses=_ERROR_RESPONSES)

    @router.post(
        "",
        status_code=201,
        response_model=cls,
        operation_id=f"create_{kind}",
        summary=f"Create a {kind}",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": schema_ref}},
            }
        },
    )
    async def create_object(
        request: Request,
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> Response:
        data = await read_json_object(request)
        rejected = sorted(owned & data.keys())
        if rejected:
            raise ApiError(
                422,
                f"{', '.join(rejected)}: allocated by the server, do not send it",
                [detail(field, data[field], "allocated by the server") for field in rejected],
            )
        if principal.tenant_id is not None:
            data.setdefault("tenant_id", principal.tenant_id)
        idempotency_key = _idempotency_key(request)
        if idempotency_key is not None:
            data.setdefault("id", idempotent_id(principal.tenant_id, kind, idempotency_key))
        obj = cls.model_validate(data)
        _require_tenant_write(principal, obj)
        check_infrastructure(principal, cls, None, obj)
        location = f"{API_PREFIX}/{plural}/{obj.id}"
        request.state.created_location = location  # for a 503: where to read the outcome
        try:
            stored = await repository.create(obj, scope=scope_of(principal))
        except AlreadyExistsError:
            existing = await repository.get(cls, obj.id)
            if not (
                principal.may_access(existing.obj.tenant_id)
                and _is_replay(obj, existing.obj, set(data))
            ):
                raise
            return object_response(
                existing, 201, {"Location": location, IDEMPOTENT_REPLAY_HEADER: "true"}
            )
        return object_response(stored, 201, {"Location": location})

    @router.get(
        "",
        response_model=page_model,
        operation_id=f"list_{plural}",
        summary=f"List {plural} (sorted by id)",
    )
    async def list_objects(
        name: str | None = Query(None, description="exact name"),
        tenant_id: str | None = Query(None, description="exact tenant id"),
        limit: int = Query(DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE),
        marker: str | None = Query(None, description="the next_marker of the previous page"),
        child_filter: dict[str, str] = Depends(_child_filter_dependency(kind)),
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> Response:
        # A project lists its own objects and the shared ones (see `_require_readable`).
        page = await repository.list(
            cls,
            name=name,
            tenant_id=tenant_id,
            field_filters=child_filter,
            limit=limit,
            marker=marker,
            scope=scope_of(principal),
        )
        return JSONResponse(
            {"items": [_object_body(item) for item in page.items], "next_marker": page.next_marker}
        )

    @router.get(
        "/{object_id}",
        response_model=cls,
        operation_id=f"get_{kind}",
        summary=f"Get a {kind}",
    )
    async def get_object(
        object_id: str,
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> Response:
        stored = await repository.get(cls, _checked_path_id(cls, object_id))
        await _require_readable(principal, stored.obj, repository)
        return object_response(stored)

    @router.put(
        "/{object_id}",
        response_model=cls,
        operation_id=f"replace_{kind}",
        summary=f"Replace a {kind} (If-Match optional)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": schema_ref}},
            }
        },
    )
    async def replace_object(
        request: Request,
        object_id: str,
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> Response:
        check_infrastructure(principal, cls, None, None)
        object_id = _checked_path_id(cls, object_id)
        expected = parse_if_match(request)
        data = await read_json_object(request)
        _check_body_id(data, object_id)

        def replace(current: TopologyObject) -> TopologyObject:
            fields = {"id": object_id, **data}
            for name in kept_when_omitted:
                fields.setdefault(name, getattr(current, name))
            replacement = cls.model_validate(fields)
            _require_tenant_write(principal, replacement)
            check_infrastructure(principal, cls, current, replacement)
            return replacement

        stored = await _modify_as(principal, repository, cls, object_id, replace, expected)
        return object_response(stored)

    @router.patch(
        "/{object_id}",
        response_model=cls,
        operation_id=f"patch_{kind}",
        summary=f"Change some fields of a {kind} (If-Match optional)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "description": f"any subset of the fields of {cls.__name__}",
                        }
                    }
                },
            }
        },
    )
    async def patch_object(
        request: Request,
        object_id: str,
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> Response:
        check_infrastructure(principal, cls, None, None)
        object_id = _checked_path_id(cls, object_id)
        expected = parse_if_match(request)
        data = await read_json_object(request)
        _check_body_id(data, object_id)

        def merge(current: TopologyObject) -> TopologyObject:
            replacement = cls.model_validate({**current.model_dump(mode="json"), **data})
            _require_tenant_write(principal, replacement)
            check_infrastructure(principal, cls, current, replacement)
            return replacement

        stored = await _modify_as(principal, repository, cls, object_id, merge, expected)
        return object_response(stored)

    @router.delete(
        "/{object_id}",
        status_code=204,
        response_class=Response,
        operation_id=f"delete_{kind}",
        summary=f"Delete a {kind}",
    )
    async def delete_object(
        request: Request,
        object_id: str,
        cascade: bool = Query(
            False, description="also delete owned children and clear optional references"
        ),
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> Response:
        check_infrastructure(principal, cls, None, None)
        object_id = _checked_path_id(cls, object_id)
        expected = parse_if_match(request)
        try:
            await repository.delete(
                cls,
                object_id,
                cascade=cascade,
                expected_revision=expected,
                precondition=lambda current: _require_tenant(principal, current),
                scope=scope_of(principal),
            )
        except NotFoundError:
            await _refuse_shared(principal, cls, object_id, repository)
            raise
        return Response(status_code=204)

    return router


@functools.cache
def topology_routers() -> tuple[APIRouter, ...]:
    """The collection routers, built once per process (building them dominates app start)."""
    return tuple(kind_router(cls) for cls in KINDS.values())


__all__ = [
    "API_PREFIX",
    "CHILD_FILTERS",
    "PLURALS",
    "SERVER_OWNED_FIELDS",
    "kind_router",
    "topology_routers",
]

# Port is the one kind with server-owned fields; keep the table honest if the model changes.
assert SERVER_OWNED_FIELDS["port"] <= Port.model_fields.keys()
