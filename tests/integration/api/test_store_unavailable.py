"""A store that cannot answer a write: what the 503 says, and how creates stay idempotent.

The store's `txn` is made to fail once, as the etcd backend fails when a member dies under a
write: after applying it (outcome unknown) or before (not applied). The API must say what
failed and what became of the write; a retried create (same id, or same Idempotency-Key)
returns the first result; `HivenetClient` retries such writes by itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from hivenet.api.client import (
    NO_RETRY,
    ConflictError,
    HivenetClient,
    ServiceUnavailableError,
)
from hivenet.store import StoreUnavailableError, WriteOutcome
from hivenet.store.base import Store
from tests.integration.api.conftest import Api

LEADER = "127.0.0.1:2379 (the leader)"


class FailNextWrite:
    """Replaces a store's txn: the next `times` txns fail (after applying when `applied`)."""

    def __init__(self, store: Store, *, applied: bool, times: int = 1) -> None:
        self._txn = store.txn
        self.applied = applied
        self.times = times

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.times <= 0:
            return await self._txn(*args, **kwargs)
        self.times -= 1
        if self.applied:
            await self._txn(*args, **kwargs)
            raise StoreUnavailableError(
                f"txn: {LEADER} failed mid-call (Socket closed)",
                outcome=WriteOutcome.UNKNOWN,
                failed=LEADER,
            )
        raise StoreUnavailableError(
            "txn: no etcd member answered within 5s (no leader)",
            outcome=WriteOutcome.NOT_APPLIED,
            failed="no leader",
        )


@pytest.fixture
def fail_next_write(api: Api, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    store = api._store()

    def arm(*, applied: bool, times: int = 1) -> FailNextWrite:
        failing = FailNextWrite(store, applied=applied, times=times)
        monkeypatch.setattr(store, "txn", failing)
        return failing

    yield arm


def client_of(api: Api, **options: Any) -> HivenetClient:
    sleeps: list[float] = []
    client = HivenetClient(
        "http://testserver",
        api.token,
        transport=api.client._transport,
        sleep=sleeps.append,
        **options,
    )
    client.sleeps = sleeps  # type: ignore[attr-defined]
    return client


def test_a_create_of_unknown_outcome_says_so_and_how_to_read_it_back(
    api: Api, fail_next_write: Any
) -> None:
    fail_next_write(applied=True)
    refused = api.post("/v1/bridges", {"id": "b1", "name": "one"})
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    error = refused.json()["error"]
    assert error["store"] == {"failed": LEADER, "write": "unknown", "read_back": "/v1/bridges/b1"}
    assert "GET /v1/bridges/b1" in error["message"] and "Idempotency-Key" in error["message"]
    assert LEADER in error["message"]
    # It was applied: reading back shows it, and the same create again returns it.
    assert api.request("GET", "/v1/bridges/b1").json()["name"] == "one"
    again = api.post("/v1/bridges", {"id": "b1", "name": "one"})
    assert again.status_code == 201 and again.headers["Idempotent-Replay"] == "true"
    assert again.json() == api.request("GET", "/v1/bridges/b1").json()
    other = api.post("/v1/bridges", {"id": "b1", "name": "another"})
    assert other.status_code == 409


def test_a_write_not_applied_says_retry_and_a_read_says_nothing_about_writes(
    api: Api, fail_next_write: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_next_write(applied=False)
    refused = api.post("/v1/bridges", {"id": "b1"})
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["store"] == {"failed": "no leader", "write": "not_applied", "read_back": None}
    assert "not applied: retry" in error["message"]
    assert api.request("GET", "/v1/bridges/b1").status_code == 404

    store = api._store()

    async def unreachable(*_args: Any, **_kwargs: Any) -> Any:
        raise StoreUnavailableError("get: no member answered", failed="no leader")

    monkeypatch.setattr(store, "get", unreachable)
    read = api.request("GET", "/v1/bridges/b1").json()["error"]
    assert read["store"] == {"failed": "no leader", "write": None, "read_back": None}


def test_an_update_of_unknown_outcome_points_at_the_object(api: Api, fail_next_write: Any) -> None:
    api.create("bridges", {"id": "b1"})
    fail_next_write(applied=True)
    refused = api.request("PATCH", "/v1/bridges/b1", json={"name": "x"})
    assert refused.json()["error"]["store"]["read_back"] == "/v1/bridges/b1"


def test_idempotency_key_names_one_object_per_tenant_kind_and_key(api: Api) -> None:
    def create(plural: str, body: dict[str, Any], key: str) -> Any:
        return api.request("POST", f"/v1/{plural}", json=body, headers={"Idempotency-Key": key})

    first = create("bridges", {"name": "a"}, "k-1")
    assert first.status_code == 201 and "Idempotent-Replay" not in first.headers
    again = create("bridges", {"name": "a"}, "k-1")
    assert again.status_code == 201 and again.headers["Idempotent-Replay"] == "true"
    assert again.json() == first.json()
    assert create("bridges", {"name": "b"}, "k-1").status_code == 409
    assert create("bridges", {"name": "a"}, "k-2").json()["id"] != first.json()["id"]
    assert create("chains", {"name": "a"}, "k-1").json()["id"] != first.json()["id"]
    for bad in (b"", b"x" * 256, "é".encode()):
        refused = api.request("POST", "/v1/bridges", json={}, headers={"Idempotency-Key": bad})
        assert refused.status_code == 400
        assert refused.json()["error"]["details"][0]["field"] == "Idempotency-Key"


def test_a_retried_port_create_ignores_what_the_server_generated(api: Api) -> None:
    bridge = api.create("bridges", {})
    body = {"id": "p1", "device_kind": "bridge", "device_id": bridge["id"]}
    port = api.create("ports", body)  # mac and tunnel_key chosen by the server
    again = api.post("/v1/ports", body)
    assert again.status_code == 201 and again.json() == port


def test_the_client_retries_a_create_of_unknown_outcome_into_one_object(
    api: Api, fail_next_write: Any
) -> None:
    failing = fail_next_write(applied=True)
    with client_of(api) as client:
        created = client.create("bridge", {"name": "retried"})
        assert failing.times == 0 and client.sleeps == [1.0]  # type: ignore[attr-defined]
        assert [b["id"] for b in client.list_all("bridge")] == [created.id]
        # The caller's own key: the same create later returns the same object.
        keyed = client.create("bridge", {"name": "k"}, idempotency_key="mine")
        assert client.create("bridge", {"name": "k"}, idempotency_key="mine") == keyed


def test_the_client_retries_a_delete_of_unknown_outcome_and_finds_it_done(
    api: Api, fail_next_write: Any
) -> None:
    api.create("bridges", {"id": "b1"})
    fail_next_write(applied=True)
    with client_of(api) as client:
        client.delete("bridge", "b1")
    assert api.request("GET", "/v1/bridges/b1").status_code == 404


def test_without_retries_the_client_error_carries_the_outcome(
    api: Api, fail_next_write: Any
) -> None:
    fail_next_write(applied=True)
    with (
        client_of(api, retry=NO_RETRY) as client,
        pytest.raises(ServiceUnavailableError) as refused,
    ):
        client.create("bridge", {"id": "b1"})
    assert refused.value.write_outcome == "unknown" and refused.value.failed == LEADER
    assert refused.value.read_back == "/v1/bridges/b1"


def test_a_conditional_write_is_retried_only_when_not_applied(
    api: Api, fail_next_write: Any
) -> None:
    created = api.create("bridges", {"id": "b1"})
    revision = int(api.request("GET", "/v1/bridges/b1").headers["ETag"].strip('"'))
    assert created["id"] == "b1"
    with client_of(api) as client:
        fail_next_write(applied=False)
        updated = client.update("bridge", "b1", {"name": "x"}, if_revision=revision)
        assert updated.data["name"] == "x"
        fail_next_write(applied=True)
        with pytest.raises(ServiceUnavailableError):
            client.update("bridge", "b1", {"name": "y"}, if_revision=updated.revision)
        with pytest.raises(ConflictError):
            client.create("bridge", {"id": "b1", "name": "z"})
