"""What every OpenStack-compatible request shares (Neutron `/v2.0` and Octavia `/v2.0/lbaas`):
who is calling (X-Auth-Token or the configured no-auth project), the request id header, the
request body (size-limited JSON object wrapped in the resource's member key, unknown
attributes refused), and Neutron's list conventions (equality filters with repeated keys as
OR, `fields=`, `sort_key`/`sort_dir`, `limit`/`marker` paging with `<collection>_links`).

Owns no topology rule and no translation: those are in `translate.py` (Neutron) and
`hivenet.api.octavia`. Reads of whole kinds go through `scan`, one store range at one
revision. Must not write to the store.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pydantic
from fastapi import FastAPI, Request
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response

from hivenet.api.auth import READ_METHODS, Principal, TokenRegistry
from hivenet.api.tokens import ExpiredTokenError, lookup_project_token
from hivenet.model import TOPOLOGY_PREFIX, TopologyObject, decode
from hivenet.model.topology import DEFAULT_TENANT
from hivenet.store.base import Store
from hivenet.store.keys import STATE_PREFIX, parse_state_key
from hivenet.store.topology import TopologyRepository

T = TypeVar("T", bound=TopologyObject)
_log = logging.getLogger("hivenet.api.openstack")

REQUEST_ID_HEADER = "x-openstack-request-id"
# A Neutron request body larger than this is refused (Neutron's own limit is 112 KiB).
MAX_BODY_BYTES = 112 * 1024
SCAN_BATCH = 1000
# What keystoneauth's `auth_type: none` plugin sends as X-Auth-Token.
NOAUTH_TOKEN = "notused"


class OpenStackError(Exception):
    """A refusal in OpenStack's terms: HTTP status, error type (e.g. `NetworkNotFound`) and a
    message that names the field and the value."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def bad_request(message: str) -> OpenStackError:
    return OpenStackError(400, "HTTPBadRequest", message)


def not_found(resource: str, object_id: str) -> OpenStackError:
    words = resource.replace("_", " ")
    type_name = "".join(part.capitalize() for part in resource.split("_"))
    return OpenStackError(404, f"{type_name}NotFound", f"{words} {object_id} could not be found")


def conflict(error_type: str, message: str) -> OpenStackError:
    return OpenStackError(409, error_type, message)


# --------------------------------------------------------------------------------------------
# Who is calling


class TokenResolver(Protocol):
    """token -> Principal (None: unknown). The seam for Keystone token validation."""

    async def resolve(self, token: str) -> Principal | None: ...


@dataclass(frozen=True)
class HiveNetTokens:
    """HiveNet's own tokens, the same as on `/v1`: the server's admin token (every project)
    and the project tokens of `/v1/tokens` (one project, one role), looked up in the store on
    every request (a revocation holds on the next request)."""

    registry: Callable[[], TokenRegistry]
    store: Callable[[], Awaitable[Store]]

    async def resolve(self, token: str) -> Principal | None:
        principal = self.registry().lookup(token)
        if principal is not None:
            return principal
        try:
            return await lookup_project_token(await self.store(), token)
        except ExpiredTokenError as exc:
            raise OpenStackError(401, "HTTPUnauthorized", f"X-Auth-Token: {exc}") from None


@dataclass(frozen=True)
class OpenStackOptions:
    """How `hivenet serve` exposes the OpenStack APIs.

    `noauth_project`: requests without X-Auth-Token act for this project (an operator's
    `auth_type: none` setup, which trusts whoever reaches the server: such a caller may also
    set the cluster admin's attributes, as Neutron's noauth context is an admin); None
    refuses them with 401. `resolver`: replaces HiveNet token lookup (Keystone)."""

    noauth_project: str | None = None
    resolver: TokenResolver | None = None


@dataclass(frozen=True)
class Caller:
    """The principal and the project its writes default to. `noauth`: no token was sent and
    the server acts for its `--openstack-noauth-project`."""

    principal: Principal
    noauth: bool = False

    @property
    def is_admin(self) -> bool:
        return self.principal.is_admin

    @property
    def may_set_infrastructure(self) -> bool:
        """May set what binds objects to the physical world or to other projects (a network's
        `shared` and `router:external`, a port's `binding:host_id`/`binding:profile`)."""
        return self.principal.is_admin or self.noauth

    @property
    def project_id(self) -> str:
        return self.principal.tenant_id or DEFAULT_TENANT

    def sees(self, obj: TopologyObject) -> bool:
        return self.principal.may_access(obj.tenant_id)

    def owner_for(self, requested: str | None) -> str:
        """The project a new object belongs to: the requested one if the caller may act for
        it, else a 403."""
        if requested is None or requested == "":
            return self.project_id
        if not self.principal.may_access(requested):
            raise OpenStackError(
                403,
                "HTTPForbidden",
                f"project_id={requested!r}: this token acts for project {self.project_id!r}",
            )
        return requested

    def require_infrastructure(self, attribute: str, value: object) -> None:
        """403 naming the attribute unless the caller may set cluster-admin attributes."""
        if not self.may_set_infrastructure:
            raise OpenStackError(
                403,
                "HTTPForbidden",
                f"{attribute}={value!r}: only the cluster admin may set {attribute} "
                f"(this token: {self.principal.describe()})",
            )


async def caller_of(request: Request, options: OpenStackOptions, resolver: TokenResolver) -> Caller:
    """Who is calling; 401 without a valid token, 403 for a reader's write."""
    token = request.headers.get("x-auth-token")
    if token == NOAUTH_TOKEN and options.noauth_project is not None:
        token = None
    if not token:
        if options.noauth_project is None:
            raise OpenStackError(
                401,
                "HTTPUnauthorized",
                "missing X-Auth-Token (start `hivenet serve --openstack-noauth-project P` "
                "for auth_type none)",
            )
        return Caller(Principal(name="noauth", tenant_id=options.noauth_project), noauth=True)
    principal = await resolver.resolve(token)
    if principal is None:
        raise OpenStackError(401, "HTTPUnauthorized", "invalid X-Auth-Token")
    if request.method not in READ_METHODS and not principal.may_write:
        raise OpenStackError(
            403,
            "HTTPForbidden",
            f"role {principal.role.value!r} may only read: {request.method} "
            f"{request.url.path} needs role member or admin (this token: "
            f"{principal.describe()})",
        )
    return Caller(principal)


# --------------------------------------------------------------------------------------------
# Request id and body size


class RequestIdMiddleware(BaseHTTPMiddleware):
    """Every response carries `x-openstack-request-id: req-<uuid>`; a body announced larger
    than MAX_BODY_BYTES is refused before it is read."""

    def __init__(
        self,
        app: Any,
        render_error: Callable[[OpenStackError], Response],
        resources: Mapping[str, str],
    ) -> None:
        super().__init__(app)
        self._render_error = render_error
        self._resources = resources

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        request_id = f"req-{uuid.uuid4()}"
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            response = self._render_error(
                OpenStackError(
                    413,
                    "HTTPRequestEntityTooLarge",
                    f"request body of {length} bytes is larger than {MAX_BODY_BYTES}",
                )
            )
        else:
            try:
                response = await call_next(request)
            except Exception as exc:  # a bug: answer 500 here, never let it reach the /v1 app
                _log.exception("%s %s failed (%s)", request.method, request.url.path, request_id)
                response = self._render_error(translate_error(exc, self._resources))
        response.headers[REQUEST_ID_HEADER] = request_id
        return response


async def read_member(request: Request, member: str) -> dict[str, Any]:
    """The object under `member` in a JSON body `{member: {...}}`."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise OpenStackError(
            413,
            "HTTPRequestEntityTooLarge",
            f"request body of {len(raw)} bytes is larger than {MAX_BODY_BYTES}",
        )
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) != {member} or not isinstance(data[member], dict):
        raise bad_request(f"the request body must be a JSON object {{{member!r}: {{...}}}}")
    body: dict[str, Any] = data[member]
    return body


def validated(model: type[pydantic.BaseModel], body: Mapping[str, Any]) -> Any:
    """`body` parsed by `model` (extra fields forbidden); a 400 naming each bad field."""
    try:
        return model.model_validate(dict(body))
    except pydantic.ValidationError as exc:
        raise bad_request(validation_message(exc)) from None


def validation_message(exc: pydantic.ValidationError) -> str:
    return request_validation_message(exc.errors())


def request_validation_message(errors: Sequence[Any]) -> str:
    """One sentence per bad field, naming the attribute and the value."""
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            return "the request body is not valid JSON"
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        if error.get("type") == "extra_forbidden":
            parts.append(f"unrecognized attribute {location!r}")
            continue
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        value = error.get("input")
        shown = "" if isinstance(value, dict) else f" (got {str(value)[:100]!r})"
        parts.append(f"invalid value for {location or 'body'}{shown}: {message}")
    return "; ".join(parts) or "invalid request body"


# --------------------------------------------------------------------------------------------
# Reads of whole kinds


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Objects of some kinds and the active-port keys, as of one store read each."""

    objects: dict[str, dict[str, TopologyObject]]
    revisions: dict[str, int]  # object id -> mod_revision
    active_ports: frozenset[tuple[str, str]]  # (host, port id) an agent has bound

    def of(self, cls: type[T]) -> list[T]:
        found = self.objects.get(cls.KIND, {})
        return [obj for obj in found.values() if isinstance(obj, cls)]

    def get(self, cls: type[T], object_id: str) -> T | None:
        obj = self.objects.get(cls.KIND, {}).get(object_id)
        return obj if isinstance(obj, cls) else None


async def scan(
    repository: TopologyRepository, kinds: Iterable[type[TopologyObject]], *, state: bool = False
) -> Snapshot:
    """Every object of `kinds` (and, with `state`, which ports agents have bound) read at one
    store revision."""
    store = repository.store
    revision = await store.current_revision()
    objects: dict[str, dict[str, TopologyObject]] = {}
    revisions: dict[str, int] = {}
    for cls in kinds:
        found: dict[str, TopologyObject] = {}
        prefix = f"{TOPOLOGY_PREFIX}{cls.KIND}/"
        async for key, value, mod_revision in _range_all(store, prefix, revision):
            obj = decode(cls.KIND, value)
            found[obj.id] = obj
            revisions[obj.id] = mod_revision
            del key
        objects[cls.KIND] = found
    active: set[tuple[str, str]] = set()
    if state:
        async for key, _value, _rev in _range_all(store, STATE_PREFIX, revision):
            try:
                host, kind, object_id = parse_state_key(key)
            except ValueError:
                continue
            if kind == "port":
                active.add((host, object_id))
    return Snapshot(objects, revisions, frozenset(active))


async def _range_all(store: Store, prefix: str, revision: int) -> Any:
    start_after: str | None = None
    while True:
        result = await store.range(
            prefix, revision=revision, limit=SCAN_BATCH, start_after=start_after
        )
        for kv in result.kvs:
            yield kv.key, kv.value, kv.mod_revision
        if not result.more or not result.kvs:
            return
        start_after = result.kvs[-1].key


async def port_is_active(repository: TopologyRepository, host_id: str, port_id: str) -> bool:
    from hivenet.store.keys import port_active_key

    return await repository.store.get(port_active_key(host_id, port_id)) is not None


# --------------------------------------------------------------------------------------------
# List conventions


@dataclass(frozen=True)
class ListQuery:
    filters: dict[str, list[str]]
    fields: list[str]
    sort: list[tuple[str, bool]]  # (key, ascending)
    limit: int | None
    marker: str | None
    page_reverse: bool


_RESERVED = {"fields", "sort_key", "sort_dir", "limit", "marker", "page_reverse"}


def parse_list_query(request: Request, attributes: Iterable[str]) -> ListQuery:
    known = set(attributes)
    params = request.query_params
    filters: dict[str, list[str]] = {}
    for key, value in params.multi_items():
        if key in _RESERVED:
            continue
        if key not in known:
            raise bad_request(f"{key!r} is not a filter of this collection (value {value!r})")
        filters.setdefault(key, []).extend(value.split(",") if key == "tags" else [value])
    # As Neutron: a field the resource does not have is left out, not refused (`openstack port
    # list --long` asks for `trunk_details` whether or not trunks exist).
    fields = [f for f in params.getlist("fields") if f]
    keys, dirs = params.getlist("sort_key"), params.getlist("sort_dir")
    if len(dirs) > len(keys):
        raise bad_request(f"sort_dir={dirs!r} needs as many sort_key values")
    sort: list[tuple[str, bool]] = []
    for index, key in enumerate(keys):
        if key not in known:
            raise bad_request(f"sort_key={key!r}: no such attribute")
        direction = dirs[index] if index < len(dirs) else "asc"
        if direction not in ("asc", "desc"):
            raise bad_request(f"sort_dir={direction!r}: must be 'asc' or 'desc'")
        sort.append((key, direction == "asc"))
    limit_text = params.get("limit")
    limit: int | None = None
    if limit_text is not None and limit_text != "":
        if not limit_text.isdigit() or not limit_text.isascii():
            raise bad_request(f"limit={limit_text!r}: must be a non-negative integer")
        limit = int(limit_text) or None
    reverse_text = params.get("page_reverse", "false").lower()
    if reverse_text not in ("true", "false"):
        raise bad_request(f"page_reverse={reverse_text!r}: must be true or false")
    return ListQuery(filters, fields, sort, limit, params.get("marker"), reverse_text == "true")


def filter_text(value: Any) -> list[str]:
    """How a response value compares with a query string (Neutron matches bools as text)."""
    if isinstance(value, bool):
        return [str(value), str(value).lower()]
    if value is None:
        return ["", "None", "null"]
    return [str(value)]


def matches(item: Mapping[str, Any], filters: Mapping[str, Sequence[str]]) -> bool:
    for key, wanted in filters.items():
        value = item.get(key)
        if key == "tags":
            if not set(wanted) <= set(value or ()):
                return False
            continue
        if isinstance(value, list):
            if not any(str(element) in wanted for element in value):
                return False
            continue
        if not any(text in wanted for text in filter_text(value)):
            return False
    return True


def _sort_key(key: str) -> Callable[[dict[str, Any]], tuple[int, Any]]:
    return lambda item: _sort_value(item.get(key))


def _sort_value(value: Any) -> tuple[int, Any]:
    if value is None:
        return (0, "")
    if isinstance(value, bool | int | float):
        return (1, value)
    return (2, str(value))


def page_of(
    items: list[dict[str, Any]],
    query: ListQuery,
    collection: str,
    base_url: str,
    extra_filters: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """The list response: filtered, sorted (default by id), paged, fields projected."""
    chosen = [item for item in items if matches(item, query.filters)]
    if extra_filters is not None:
        chosen = [item for item in chosen if extra_filters(item)]
    keys = [*query.sort, ("id", query.sort[0][1] if query.sort else True)]
    for key, ascending in reversed(keys):
        chosen.sort(key=_sort_key(key), reverse=not ascending)
    if query.page_reverse:
        chosen.reverse()
    if query.marker is not None:
        ids = [item["id"] for item in chosen]
        if query.marker not in ids:
            raise bad_request(f"marker={query.marker!r}: no such object in this listing")
        chosen = chosen[ids.index(query.marker) + 1 :]
    links: list[dict[str, str]] = []
    if query.limit is not None and len(chosen) > query.limit:
        chosen = chosen[: query.limit]
        links.append({"rel": "next", "href": _next_href(base_url, query, chosen[-1]["id"])})
    if query.page_reverse:
        chosen.reverse()
    projected = [_project(item, query.fields) for item in chosen]
    body: dict[str, Any] = {collection: projected}
    if links:
        body[f"{collection}_links"] = links
    return body


def _next_href(base_url: str, query: ListQuery, marker: str) -> str:
    from urllib.parse import urlencode

    params: list[tuple[str, str]] = []
    for key, values in query.filters.items():
        params.extend((key, v) for v in values)
    params.extend(("fields", f) for f in query.fields)
    for key, ascending in query.sort:
        params.extend((("sort_key", key), ("sort_dir", "asc" if ascending else "desc")))
    params.append(("limit", str(query.limit)))
    params.append(("marker", marker))
    if query.page_reverse:
        params.append(("page_reverse", "True"))
    return f"{base_url}?{urlencode(params)}"


def _project(item: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    if not fields:
        return item
    return {key: item[key] for key in fields if key in item}


def show_fields(request: Request, item: dict[str, Any]) -> dict[str, Any]:
    return _project(item, [f for f in request.query_params.getlist("fields") if f])


def collection_url(request: Request) -> str:
    return str(request.url.remove_query_params(list(request.query_params.keys())))


def translate_error(exc: Exception, resources: Mapping[str, str]) -> OpenStackError:
    """Any refusal (or failure) in OpenStack's terms."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from hivenet.store.base import StoreError, StoreUnavailableError
    from hivenet.store.topology import (
        AddressInUseError,
        ConflictError,
        DanglingReferenceError,
        InvalidFieldError,
        NotFoundError,
        OverQuotaError,
        ReferencedError,
        RevisionMismatchError,
    )

    if isinstance(exc, OpenStackError):
        return exc
    if isinstance(exc, OverQuotaError):
        resource = resources.get(exc.kind, exc.kind)
        return conflict(
            "OverQuota",
            f"Quota exceeded for resources: ['{resource}']: project {exc.project} may hold "
            f"{exc.limit} and holds {exc.usage}",
        )
    if isinstance(exc, NotFoundError):
        return not_found(resources.get(exc.kind, exc.kind), exc.object_id)
    if isinstance(exc, DanglingReferenceError):
        return not_found(resources.get(exc.kind, exc.kind), exc.value)
    if isinstance(exc, ReferencedError):
        return conflict("InUse", str(exc))
    if isinstance(exc, RevisionMismatchError):
        return OpenStackError(412, "RevisionNumberConstraintFailed", str(exc))
    if isinstance(exc, ConflictError):
        return conflict("Conflict", str(exc))
    if isinstance(exc, AddressInUseError):
        return conflict("IpAddressAlreadyAllocated", str(exc))
    if isinstance(exc, InvalidFieldError):
        return bad_request(str(exc))
    if isinstance(exc, pydantic.ValidationError):
        return bad_request(validation_message(exc))
    if isinstance(exc, RequestValidationError):
        return bad_request(request_validation_message(exc.errors()))
    if isinstance(exc, HTTPException):
        names = {404: "HTTPNotFound", 405: "HTTPMethodNotAllowed"}
        return OpenStackError(
            exc.status_code, names.get(exc.status_code, "HTTPError"), str(exc.detail)
        )
    if isinstance(exc, StoreUnavailableError):
        return OpenStackError(503, "ServiceUnavailable", f"store unavailable: {exc}")
    if isinstance(exc, StoreError):
        return OpenStackError(500, "StoreError", f"store error: {exc}")
    return OpenStackError(500, "InternalError", f"internal error: {type(exc).__name__}")


def visible_or_404(caller: Caller, obj: Any, resource: str, object_id: str) -> Any:
    """`obj` when it exists and the caller may see it; otherwise the resource's 404 (another
    project's object does not exist as far as the caller can tell)."""
    if obj is None or not caller.sees(obj):
        raise not_found(resource, object_id)
    return obj


def owned_or_error(caller: Caller, obj: Any, resource: str, object_id: str, readable: bool) -> Any:
    """`obj` when the caller may change it (its project's); a 403 when it may only read it
    (`readable`: a shared or external network and its subnets); otherwise the 404."""
    if obj is None or not (caller.sees(obj) or readable):
        raise not_found(resource, object_id)
    if not caller.sees(obj):
        words = resource.replace("_", " ")
        raise OpenStackError(
            403,
            "HTTPForbidden",
            f"{words} {object_id} is shared by another project: this token may read it and "
            f"attach ports to it, not change it (this token: {caller.principal.describe()})",
        )
    return obj


def wrapped_body(
    name: str, member: str, body: type[pydantic.BaseModel]
) -> type[pydantic.BaseModel]:
    """The request model `{member: body}` (nothing else allowed), for validation and OpenAPI."""
    return pydantic.create_model(
        name,
        __config__=pydantic.ConfigDict(extra="forbid"),
        **{member: (body, ...)},  # type: ignore[call-overload]
    )


def openstack_subapp(
    title: str,
    description: str,
    render: Callable[[OpenStackError], Response],
    resources: Mapping[str, str],
) -> FastAPI:
    """A FastAPI app for one OpenStack API: its error shape, request ids, its own OpenAPI."""
    app = FastAPI(
        title=title, version="2.0", description=description, docs_url=None, redoc_url=None
    )
    install_openstack_errors(app, render, resources)
    app.add_middleware(RequestIdMiddleware, render_error=render, resources=resources)
    return app


def install_openstack_errors(
    app: FastAPI, render: Callable[[OpenStackError], Response], resources: Mapping[str, str]
) -> None:
    """Render every expected refusal with `render`. Handled here, inside the sub-app, so the
    outer /v1 app never sees them; anything unexpected is caught by `RequestIdMiddleware`."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from hivenet.store.base import StoreError
    from hivenet.store.topology import TopologyError

    async def handler(_request: Request, exc: Exception) -> Response:
        return render(translate_error(exc, resources))

    for exc_class in (
        OpenStackError,
        HTTPException,
        RequestValidationError,
        TopologyError,
        StoreError,
        pydantic.ValidationError,
    ):
        app.add_exception_handler(exc_class, handler)
