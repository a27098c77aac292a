"""Just enough of Keystone's v3 API (`/identity/v3`) for the OpenStack clients to name a
project without a Keystone: the version document and `GET /projects/{id}`.

HiveNet's projects are names (an object's `tenant_id`, a token's project): any valid name is
a project, shown to the cluster admin and to its own tokens, and missing (404) for anyone
else. `openstack quota show|set <project>` look the project up here first (with
`identity_endpoint_override` pointing at it). Behind a real Keystone this is never asked.
Must not touch the store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from hivenet.api.neutron.common import Caller, OpenStackError, openstack_subapp
from hivenet.model.types import ObjectId

IDENTITY_PATH = "/identity/v3"
_DOMAIN = "default"


def keystone_error(error: OpenStackError) -> Response:
    return JSONResponse(
        {"error": {"code": error.status, "title": error.error_type, "message": error.message}},
        status_code=error.status,
    )


def _project(project: str) -> dict[str, Any]:
    return {
        "id": project,
        "name": project,
        "domain_id": _DOMAIN,
        "enabled": True,
        "is_domain": False,
        "parent_id": _DOMAIN,
        "description": "",
        "tags": [],
        "links": {},
    }


def identity_app(caller_of: Callable[[Request], Awaitable[Caller]]) -> FastAPI:
    app = openstack_subapp(
        "HiveNet identity (project lookup)",
        "The part of Keystone v3 the OpenStack clients need to name a project.",
        keystone_error,
        {},
    )

    @app.get("/")
    @app.get("")
    async def version(request: Request) -> JSONResponse:
        base = str(request.base_url).rstrip("/") + IDENTITY_PATH + "/"
        return JSONResponse(
            {
                "version": {
                    "id": "v3.14",
                    "status": "stable",
                    "updated": "2024-01-01T00:00:00Z",
                    "links": [{"rel": "self", "href": base}],
                    "media-types": [
                        {
                            "base": "application/json",
                            "type": "application/vnd.openstack.identity-v3+json",
                        }
                    ],
                }
            }
        )

    @app.get("/projects/{project_id}")
    async def show_project(project_id: ObjectId, request: Request) -> JSONResponse:
        caller = await caller_of(request)
        if not caller.principal.may_access(project_id):
            raise OpenStackError(404, "Not Found", f"Could not find project: {project_id}.")
        return JSONResponse({"project": _project(project_id)})

    @app.get("/projects")
    async def list_projects(request: Request, name: str | None = None) -> JSONResponse:
        caller = await caller_of(request)
        wanted = name if name is not None else caller.principal.tenant_id
        found = [] if wanted is None or not caller.principal.may_access(wanted) else [wanted]
        return JSONResponse({"projects": [_project(p) for p in found], "links": {}})

    return app
