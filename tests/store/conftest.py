"""Backends for the store contract suite: every test taking `backend` runs against each one.

An etcd backend joins by adding one entry to `BACKEND_NAMES` and one branch to `backend`.
pytest-asyncio is not used: `Backend.run` drives a test body with `asyncio.run`, so each test
gets a fresh event loop and a fresh store that is always closed, also on failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hivenet.store import Store, open_store

BACKEND_NAMES = ["memory", "sqlite-file", "sqlite-file-thread"]
TEST_TIMEOUT = 20.0


class FakeClock:
    """Wall-clock seconds that only move when the test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Backend:
    name: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)

    def open(self, **options: Any) -> Store:
        return open_store(self.url, **{**self.options, **options})

    def run(self, body: Callable[[Store], Awaitable[None]], **options: Any) -> None:
        """Open a store, run `body(store)` on a fresh event loop, always close the store."""

        async def main() -> None:
            store = self.open(**options)
            try:
                await asyncio.wait_for(body(store), TEST_TIMEOUT)
            finally:
                await store.close()

        asyncio.run(main())


def make_backend(name: str, directory: Path) -> Backend:
    if name == "memory":
        return Backend(name, "memory://")
    if name == "sqlite-file":
        return Backend(name, f"sqlite://{directory}/hn-store.db")
    if name == "sqlite-file-thread":
        # File mode with every SQLite call on the worker thread (default "auto" uses it only
        # when the file is locked or a call may be long).
        return Backend(name, f"sqlite://{directory}/hn-store.db", {"execution": "thread"})
    raise ValueError(f"unknown backend {name!r}")


@pytest.fixture(params=BACKEND_NAMES)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield make_backend(request.param, tmp_path)
