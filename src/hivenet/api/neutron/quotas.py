"""Neutron's quota API over HiveNet's quotas (`store/quota.py`): `GET/PUT/DELETE
/v2.0/quotas/{project_id}`, `.../default` and `.../details` (also `details.json`), so
`openstack quota show|set|delete` work.

Who: the cluster admin reads and changes any project's quotas; a project reads its own. A PUT
changes the named resources only; with `check_limit` (what `openstack quota set` sends) a
limit below the current usage is refused, as Neutron does; without it (or with `force`) it is
set and only refuses further creates. Resources Neutron has and HiveNet does not limit
(subnetpool, rbac_policy, ...) are not shown and are refused in a PUT.
Must not contain the quota check itself (that is in every write's store txn).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from hivenet.api.neutron.common import Caller, OpenStackError, bad_request, read_member
from hivenet.store.base import Store
from hivenet.store.quota import (
    DEFAULT_QUOTAS,
    NEUTRON_RESOURCES,
    QuotaValueError,
    read_quotas,
    read_usage,
    reset_quotas,
    set_quotas,
)


def _forbidden(caller: Caller, project_id: str, what: str) -> OpenStackError:
    return OpenStackError(
        403,
        "HTTPForbidden",
        f"project_id={project_id!r}: {what} (this token: {caller.principal.describe()})",
    )


def _as_neutron(by_kind: dict[str, int]) -> dict[str, int]:
    return {resource: by_kind[kind] for resource, kind in NEUTRON_RESOURCES.items()}


def add_quota_routes(app: FastAPI, caller_of: Any, store_of: Any) -> None:
    """`caller_of(request) -> Caller`, `store_of() -> Store` (both awaitable)."""

    async def readable(request: Request, project_id: str) -> tuple[Caller, Store]:
        caller: Caller = await caller_of(request)
        if not caller.principal.may_access(project_id):
            raise _forbidden(caller, project_id, "a project may read only its own quotas")
        store: Store = await store_of()
        return caller, store

    async def admin(request: Request, project_id: str) -> Store:
        caller: Caller = await caller_of(request)
        if not caller.is_admin:
            raise _forbidden(caller, project_id, "only the cluster admin may change quotas")
        store: Store = await store_of()
        return store

    @app.get("/quotas/{project_id}")
    async def show_quota(project_id: str, request: Request) -> JSONResponse:
        _, store = await readable(request, project_id)
        limits = await read_quotas(store, project_id)
        return JSONResponse({"quota": {**_as_neutron(limits), "project_id": project_id}})

    @app.get("/quotas/{project_id}/default")
    async def show_quota_default(project_id: str, request: Request) -> JSONResponse:
        await readable(request, project_id)
        return JSONResponse(
            {"quota": {**_as_neutron(dict(DEFAULT_QUOTAS)), "project_id": project_id}}
        )

    @app.get("/quotas/{project_id}/details")
    @app.get("/quotas/{project_id}/details.json")
    async def show_quota_details(project_id: str, request: Request) -> JSONResponse:
        _, store = await readable(request, project_id)
        limits = _as_neutron(await read_quotas(store, project_id))
        used = _as_neutron(await read_usage(store, project_id))
        details: dict[str, Any] = {
            resource: {"limit": limits[resource], "used": used[resource], "reserved": 0}
            for resource in NEUTRON_RESOURCES
        }
        return JSONResponse({"quota": {**details, "project_id": project_id}})

    @app.put("/quotas/{project_id}")
    async def update_quota(project_id: str, request: Request) -> JSONResponse:
        store = await admin(request, project_id)
        body = await read_member(request, "quota")
        check_limit = body.pop("check_limit", False) is True
        if body.pop("force", False) is True:
            check_limit = False
        body.pop("project_id", None)
        body.pop("tenant_id", None)
        changes: dict[str, object] = {}
        for resource, limit in body.items():
            kind = NEUTRON_RESOURCES.get(resource)
            if kind is None:
                raise bad_request(
                    f"{resource}={limit!r}: not a quota HiveNet keeps "
                    f"({', '.join(NEUTRON_RESOURCES)})"
                )
            changes[kind] = limit
        if check_limit:
            usage = await read_usage(store, project_id)
            for kind, limit in changes.items():
                if isinstance(limit, int) and 0 <= limit < usage[kind]:
                    resource = next(r for r, k in NEUTRON_RESOURCES.items() if k == kind)
                    raise bad_request(
                        f"{resource}={limit}: below the current usage {usage[kind]} of "
                        f"project {project_id} (check_limit); use --force to set it anyway"
                    )
        try:
            limits = await set_quotas(store, project_id, changes)
        except QuotaValueError as exc:
            resource = next((r for r, k in NEUTRON_RESOURCES.items() if k == exc.field), exc.field)
            raise bad_request(f"{resource}={exc.value!r}: {exc.reason}") from None
        return JSONResponse({"quota": _as_neutron(limits)})

    @app.delete("/quotas/{project_id}", status_code=204)
    async def delete_quota(project_id: str, request: Request) -> Response:
        store = await admin(request, project_id)
        await reset_quotas(store, project_id)
        return Response(status_code=204)
