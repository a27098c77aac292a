"""`/v1/quotas/{project}`: read, change and reset a project's quotas (`store/quota.py`).

Who: the cluster admin reads and changes any project's quotas; a project token may read its
own project's (limits and usage), never change them. PUT changes only the kinds it names
(like Neutron's quota update); DELETE puts every kind back to its default. Lowering a limit
below the usage deletes nothing: it refuses further creates until enough is deleted.
Must not contain the quota check itself (that is in the store txn of every write).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from hivenet.api.auth import Principal, authenticate
from hivenet.api.errors import ApiError, ErrorBody, detail
from hivenet.model.types import ObjectId
from hivenet.store.base import Store
from hivenet.store.quota import (
    DEFAULT_QUOTAS,
    QUOTA_MAX,
    UNLIMITED,
    read_quotas,
    read_usage,
    reset_quotas,
    set_quotas,
)

QUOTAS_PATH = "/v1/quotas"

_Limit = (
    int | None,
    Field(default=None, ge=UNLIMITED, le=QUOTA_MAX, description="-1: unlimited"),
)
QuotaUpdate: type[BaseModel] = create_model(
    "QuotaUpdate",
    __config__=ConfigDict(extra="forbid"),
    __doc__="The limits to change (kinds left out keep theirs).",
    **dict.fromkeys(DEFAULT_QUOTAS, _Limit),  # type: ignore[call-overload]
)
QuotaLimits: type[BaseModel] = create_model(
    "QuotaLimits",
    **dict.fromkeys(DEFAULT_QUOTAS, (int, ...)),  # type: ignore[call-overload]
)


class ProjectQuotas(BaseModel):
    project: str
    quotas: QuotaLimits  # type: ignore[valid-type]
    usage: QuotaLimits  # type: ignore[valid-type]


async def _store(request: Request) -> Store:
    store: Store = await request.app.state.store_holder.store()
    return store


def _require_cluster_admin(principal: Principal, project: str) -> None:
    if not principal.is_admin:
        raise ApiError(
            403,
            f"only the cluster admin may change quotas (this token: {principal.describe()})",
            [detail("project", project, "cluster admin only")],
        )


def _require_readable(principal: Principal, project: str) -> None:
    if not principal.may_access(project):
        raise ApiError(
            403,
            f"project={project!r}: this token may read the quotas of project "
            f"{principal.tenant_id!r} only",
            [detail("project", project, "not your project")],
        )


async def project_quotas(store: Store, project: str) -> dict[str, Any]:
    return {
        "project": project,
        "quotas": await read_quotas(store, project),
        "usage": await read_usage(store, project),
    }


def quotas_router() -> APIRouter:
    router = APIRouter(
        prefix=QUOTAS_PATH,
        tags=["quotas"],
        responses={status: {"model": ErrorBody} for status in (401, 403, 409, 422, 500, 503)},
    )

    @router.get("/{project}", response_model=ProjectQuotas, operation_id="get_quotas")
    async def get_quotas(
        project: ObjectId, request: Request, principal: Principal = Depends(authenticate)
    ) -> dict[str, Any]:
        """The project's limit and usage per kind (a project token: its own project's)."""
        _require_readable(principal, project)
        return await project_quotas(await _store(request), project)

    @router.put("/{project}", response_model=ProjectQuotas, operation_id="set_quotas")
    async def update_quotas(
        project: ObjectId,
        body: QuotaUpdate,  # type: ignore[valid-type]
        request: Request,
        principal: Principal = Depends(authenticate),
    ) -> dict[str, Any]:
        """Change the named kinds' limits (cluster admin). A limit below the usage deletes
        nothing; it refuses creates until the usage is below it."""
        _require_cluster_admin(principal, project)
        store = await _store(request)
        await set_quotas(store, project, body.model_dump(exclude_none=True))  # type: ignore[attr-defined]
        return await project_quotas(store, project)

    @router.delete(
        "/{project}", status_code=204, response_class=Response, operation_id="reset_quotas"
    )
    async def delete_quotas(
        project: ObjectId, request: Request, principal: Principal = Depends(authenticate)
    ) -> Response:
        """Every kind back to its default limit (cluster admin)."""
        _require_cluster_admin(principal, project)
        await reset_quotas(await _store(request), project)
        return Response(status_code=204)

    return router
