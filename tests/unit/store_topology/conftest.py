"""Fixtures: every repository test runs on the in-memory store and on a SQLite file.

pytest-asyncio is not used: `run(body)` drives an async test body with `asyncio.run` and a
fresh, always-closed store (`body(repository)`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from hivenet.store import open_store
from hivenet.store.topology import TopologyRepository

TEST_TIMEOUT = 30.0

RepoBody = Callable[[TopologyRepository], Awaitable[None]]
Runner = Callable[[RepoBody], None]


def run_on(url: str, body: RepoBody, **repository_options: int) -> None:
    async def main() -> None:
        store = open_store(url)
        try:
            await asyncio.wait_for(
                body(TopologyRepository(store, **repository_options)), TEST_TIMEOUT
            )
        finally:
            await store.close()

    asyncio.run(main())


@pytest.fixture(params=["memory", "sqlite-file"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite://{tmp_path}/hn-topology.db"


@pytest.fixture
def run(store_url: str) -> Runner:
    return lambda body: run_on(store_url, body)
