"""Fixtures for the API tests: an app on a fresh store driven by `fastapi.testclient`, with
helpers to read the store from the app's own event loop (to prove failed requests changed
nothing)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from hivenet.api import create_app
from hivenet.api.auth import ADMIN_TOKEN_FILE
from hivenet.store.base import KeyValue, Store
from tests.unit.store_topology.invariants import assert_consistent, dump


@dataclass
class Api:
    app: FastAPI
    client: TestClient
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return self.client.request(method, url, headers=headers, **kwargs)

    def post(self, url: str, body: Any) -> Any:
        return self.request("POST", url, json=body)

    def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.post(f"/v1/{plural}", body)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    def _store(self) -> Store:
        async def get() -> Store:
            store: Store = await self.app.state.store_holder.store()
            return store

        return self.client.portal.call(get)  # type: ignore[union-attr]

    def dump(self) -> tuple[int, list[KeyValue]]:
        store = self._store()

        async def read() -> tuple[int, list[KeyValue]]:
            return await dump(store)

        return self.client.portal.call(read)  # type: ignore[union-attr]

    def assert_consistent(self) -> None:
        store = self._store()

        async def check() -> None:
            await assert_consistent(store)

        self.client.portal.call(check)  # type: ignore[union-attr]


def start(app: FastAPI, state_dir: Path) -> Iterator[Api]:
    with TestClient(app) as client:
        token = (state_dir / ADMIN_TOKEN_FILE).read_text().strip()
        yield Api(app, client, token)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    state_dir = tmp_path / "hn-state"
    yield from start(create_app("memory://", state_dir), state_dir)


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[tuple[Api, Api]]:
    """Two API apps on one store file (as two `hivenet serve` processes would be)."""
    state_dir = tmp_path / "hn-state"
    url = f"sqlite:///{tmp_path}/state.db"
    with ExitStack() as stack:
        serve = contextmanager(start)
        first = stack.enter_context(serve(create_app(url, state_dir), state_dir))
        second = stack.enter_context(serve(create_app(url, state_dir), state_dir))
        yield first, second
