"""Backends for the store contract suite: every test taking `backend` runs against each one.

`BACKEND_NAMES` are the backends that give every test a brand-new store (revision 1);
`CONTRACT_BACKEND_NAMES` adds "etcd": one throwaway 3-member cluster per test session
(`etcd_cluster.py`), wiped before each test (every key deleted, every lease revoked), so a test
sees an empty store whose revision is wherever the cluster is (the suite asserts revisions
relative to the start). The model test needs revision 1, so it keeps `BACKEND_NAMES`; its etcd
variant is `test_etcd_model.py`.
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

from hivenet.lab.etcd import EtcdCluster
from hivenet.store import Store, open_store
from tests.store.etcd_cluster import running_cluster, wipe

BACKEND_NAMES = ["memory", "sqlite-file", "sqlite-file-thread"]
ETCD_BACKEND_NAME = "etcd"
CONTRACT_BACKEND_NAMES = [*BACKEND_NAMES, ETCD_BACKEND_NAME]
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


@dataclass
class EtcdBackend(Backend):
    """The session's etcd cluster, wiped before each store is opened.

    Options only the SQLite backend has are handled here: `lease_check_interval` is dropped
    (etcd checks lease expiry itself, every 500 ms), and a test that drives lease time with
    `clock` is skipped, saying why: etcd expires leases on its own clock, which no test can
    move (etcd's real-clock expiry is `test_lease_expires_on_the_real_clock`).
    """

    cluster: EtcdCluster | None = None

    def open(self, **options: Any) -> Store:
        assert self.cluster is not None
        if "clock" in options:
            pytest.skip("etcd expires leases on its own clock; a fake clock cannot drive it")
        options.pop("lease_check_interval", None)
        wipe(self.cluster)
        return super().open(**options)


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


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """One 3-member etcd cluster on free 127.0.0.1 ports for the whole session."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture(params=CONTRACT_BACKEND_NAMES)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == ETCD_BACKEND_NAME:
        cluster: EtcdCluster = request.getfixturevalue("etcd_cluster")
        yield EtcdBackend(ETCD_BACKEND_NAME, cluster.url, cluster=cluster)
        return
    yield make_backend(request.param, tmp_path)
