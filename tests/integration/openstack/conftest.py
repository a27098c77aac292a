"""Fixtures for the Neutron/Octavia tests: the whole HiveNet app on a fresh memory store,
driven over HTTP by `fastapi.testclient` (`OpenStackApi`), with the admin token, project
tokens issued through `/v1/tokens` (`OpenStackApi.issue`, `as_project`) and `auth_type: none`
acting for project `demo`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hivenet.api import create_app
from hivenet.api.auth import ADMIN_TOKEN_FILE
from hivenet.api.neutron import OpenStackOptions
from hivenet.store.base import KeyValue, Store
from tests.unit.store_topology.invariants import dump

NOAUTH_PROJECT = "demo"


@dataclass
class OpenStackApi:
    client: TestClient
    admin_token: str
    token: str | None = None  # None: no X-Auth-Token (auth_type none)

    def as_token(self, token: str | None) -> OpenStackApi:
        return OpenStackApi(self.client, self.admin_token, token)

    def as_admin(self) -> OpenStackApi:
        return self.as_token(self.admin_token)

    def issue(self, project: str, role: str = "member") -> str:
        """A new project token (its secret), issued by the cluster admin on /v1/tokens."""
        response = self.client.post(
            "/v1/tokens",
            json={"project": project, "role": role},
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )
        assert response.status_code == 201, response.text
        secret: str = response.json()["secret"]
        return secret

    def as_project(self, project: str, role: str = "member") -> OpenStackApi:
        """This API as a new `role` token of `project`."""
        return self.as_token(self.issue(project, role))

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}))
        if self.token is not None:
            headers["X-Auth-Token"] = self.token
        return self.client.request(method, url, headers=headers, **kwargs)

    def create(self, collection: str, member: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.request("POST", f"/v2.0/{collection}", json={member: body})
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()[member]
        return created

    def show(self, collection: str, member: str, object_id: str) -> dict[str, Any]:
        response = self.request("GET", f"/v2.0/{collection}/{object_id}")
        assert response.status_code == 200, response.text
        shown: dict[str, Any] = response.json()[member]
        return shown

    def store(self) -> Store:
        async def get() -> Store:
            store: Store = await self.client.app.state.store_holder.store()  # type: ignore[attr-defined]
            return store

        return self.client.portal.call(get)  # type: ignore[union-attr]

    def dump(self) -> tuple[int, list[KeyValue]]:
        store = self.store()

        async def read() -> tuple[int, list[KeyValue]]:
            return await dump(store)

        return self.client.portal.call(read)  # type: ignore[union-attr]

    def put_key(self, key: str, value: bytes) -> None:
        store = self.store()

        async def write() -> None:
            await store.put(key, value)

        self.client.portal.call(write)  # type: ignore[union-attr]


@pytest.fixture
def openstack(tmp_path: Path) -> Iterator[OpenStackApi]:
    state_dir = tmp_path / "hn-state"
    app = create_app(
        "memory://",
        state_dir,
        openstack=OpenStackOptions(noauth_project=NOAUTH_PROJECT),
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        token = (state_dir / ADMIN_TOKEN_FILE).read_text().strip()
        yield OpenStackApi(client, token)
