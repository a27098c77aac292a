"""The server around the collections: auth and the token file, health, OpenAPI, store
trouble (locked -> 503, corrupt -> 500), tenant scoping, concurrent If-Match writers, and
`run_server` as a real process on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from hivenet.api import create_app
from hivenet.api.auth import ADMIN_TOKEN_FILE, Principal, TokenFileError, authenticate
from hivenet.model import KINDS
from tests.integration.api.conftest import Api, start
from tests.unit.store_topology.invariants import assert_consistent, dump

# ---- auth and the token file


def test_token_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    state_dir = tmp_path / "hn-state" / "nested"
    app = create_app("memory://", state_dir)
    with TestClient(app):
        token_file = state_dir / ADMIN_TOKEN_FILE
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        first = token_file.read_text().strip()
        assert len(first) >= 43  # token_urlsafe(32)
    with TestClient(create_app("memory://", state_dir)) as client:
        assert (state_dir / ADMIN_TOKEN_FILE).read_text().strip() == first
        ok = client.get("/v1/bridges", headers={"Authorization": f"Bearer {first}"})
        assert ok.status_code == 200


def test_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    state_dir = tmp_path / "hn-state"
    state_dir.mkdir()
    token_file = state_dir / ADMIN_TOKEN_FILE
    token_file.write_text("leaked\n")
    token_file.chmod(0o644)
    with (
        pytest.raises(TokenFileError, match="mode 0644"),
        TestClient(create_app("memory://", state_dir)),
    ):
        pass


def test_requests_without_a_valid_token_are_401(api: Api) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {api.token}"}):
        for method, url in (
            ("GET", "/v1/bridges"),
            ("POST", "/v1/bridges"),
            ("DELETE", "/v1/bridges/x"),
        ):
            response = api.client.request(method, url, headers=headers)
            assert response.status_code == 401, (method, url, headers)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert response.json()["error"]["status"] == 401


def test_health_openapi_and_docs_need_no_token(api: Api) -> None:
    health = api.client.get("/v1/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["revision"] >= 1
    api.create("chains", {})
    assert api.client.get("/v1/health").json()["revision"] == health.json()["revision"] + 1
    assert api.client.get("/docs").status_code == 200
    assert api.client.get("/openapi.json").status_code == 200


def test_openapi_has_request_and_response_schemas_per_kind(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for kind, cls in KINDS.items():
        name = cls.__name__
        assert set(schemas[name]["properties"]) == set(cls.model_fields), kind
        collection = spec["paths"][f"/v1/{kind}s"]
        item = spec["paths"][f"/v1/{kind}s/{{object_id}}"]
        assert set(collection) == {"get", "post"}
        assert set(item) == {"get", "put", "patch", "delete"}
        ref = {"$ref": f"#/components/schemas/{name}"}
        assert collection["post"]["requestBody"]["content"]["application/json"]["schema"] == ref
        assert item["put"]["requestBody"]["content"]["application/json"]["schema"] == ref
        assert (
            collection["post"]["responses"]["201"]["content"]["application/json"]["schema"] == ref
        )
        assert item["get"]["responses"]["200"]["content"]["application/json"]["schema"] == ref
        assert "422" in collection["post"]["responses"]
    ports = spec["paths"]["/v1/ports"]["get"]["parameters"]
    assert "device_id" in {p["name"] for p in ports}


# ---- store trouble


def test_locked_store_is_503_and_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "hn-api.db"
    state_dir = tmp_path / "hn-state"
    app = create_app(f"sqlite://{db}", state_dir, store_options={"busy_timeout": 0.2})
    for api in start(app, state_dir):
        api.create("bridges", {"id": "b1"})
        before = api.dump()
        locker = sqlite3.connect(db, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            refused = api.post("/v1/bridges", {"id": "b2"})
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert "locked" in refused.json()["error"]["message"]
            # Readers are not blocked (WAL): the API still serves GETs.
            assert api.request("GET", "/v1/bridges/b1").status_code == 200
            assert api.dump() == before
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert api.post("/v1/bridges", {"id": "b2"}).status_code == 201


def test_store_locked_at_startup_is_served_once_free(tmp_path: Path) -> None:
    db = tmp_path / "hn-api.db"
    state_dir = tmp_path / "hn-state"
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    app = create_app(f"sqlite://{db}", state_dir, store_options={"busy_timeout": 0.1})
    try:
        for api in start(app, state_dir):
            health = api.client.get("/v1/health")
            assert health.status_code == 503
            assert "store unavailable" in health.json()["error"]["message"]
            locker.execute("ROLLBACK")
            assert api.client.get("/v1/health").status_code == 200
            api.create("chains", {"id": "c1"})
    finally:
        locker.close()


def test_corrupt_store_file_is_500_saying_so(tmp_path: Path) -> None:
    db = tmp_path / "hn-api.db"
    db.write_bytes(b"this is not a SQLite database, it is garbage\n" * 200)
    original = db.read_bytes()
    state_dir = tmp_path / "hn-state"
    for api in start(create_app(f"sqlite://{db}", state_dir), state_dir):
        for method, url in (("GET", "/v1/health"), ("GET", "/v1/bridges"), ("POST", "/v1/bridges")):
            response = api.request(method, url, json={})
            assert response.status_code == 500, (method, url)
            message = response.json()["error"]["message"]
            assert message.startswith("store corrupt:") and str(db) in message
    assert db.read_bytes() == original


def test_corrupt_object_in_the_store_is_500(api: Api) -> None:
    async def poison() -> None:
        store = await api.app.state.store_holder.store()
        await store.put("/hivenet/v1/topology/chain/c1", b"[]")

    api.client.portal.call(poison)  # type: ignore[union-attr]
    response = api.request("GET", "/v1/chains/c1")
    assert response.status_code == 500
    assert "store corrupt" in response.json()["error"]["message"]


# ---- tenant scoping


def test_a_tenant_principal_sees_and_writes_only_its_tenant(api: Api) -> None:
    admin_chain = api.create("chains", {"name": "admin-only"})
    api.app.dependency_overrides[authenticate] = lambda: Principal("t1-user", "t1")
    try:
        mine = api.create("chains", {"name": "mine"})
        assert mine["tenant_id"] == "t1"
        assert [c["id"] for c in api.request("GET", "/v1/chains").json()["items"]] == [mine["id"]]
        with_other = api.request("GET", "/v1/chains", params={"tenant_id": "admin"}).json()
        assert with_other["items"] == []
        for method in ("GET", "PATCH", "DELETE"):
            kwargs = {"json": {"name": "x"}} if method == "PATCH" else {}
            hidden = api.request(method, f"/v1/chains/{admin_chain['id']}", **kwargs)
            assert hidden.status_code == 404, method
        moved = api.request("PATCH", f"/v1/chains/{mine['id']}", json={"tenant_id": "admin"})
        assert moved.status_code == 403
        assert api.post("/v1/chains", {"tenant_id": "admin"}).status_code == 403
    finally:
        api.app.dependency_overrides.clear()
    assert api.request("GET", f"/v1/chains/{admin_chain['id']}").json() == admin_chain


# ---- concurrency through the API


def test_concurrent_if_match_writers_exactly_one_wins(tmp_path: Path) -> None:
    state_dir = tmp_path / "hn-state"
    app = create_app(f"sqlite://{tmp_path}/hn-api.db", state_dir)

    async def main() -> None:
        async with app.router.lifespan_context(app):
            token = (state_dir / ADMIN_TOKEN_FILE).read_text().strip()
            transport = httpx.ASGITransport(app=app)
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(
                transport=transport, base_url="http://hn-test", headers=headers
            ) as client:
                created = await client.post("/v1/bridges", json={"id": "b1", "name": "start"})
                etag = created.headers["ETag"]
                responses = await asyncio.gather(
                    *(
                        client.put(
                            "/v1/bridges/b1",
                            json={"name": f"writer-{i}"},
                            headers={"If-Match": etag},
                        )
                        for i in range(8)
                    )
                )
                statuses = sorted(r.status_code for r in responses)
                assert statuses == [200] + [412] * 7, statuses
                (winner,) = [r for r in responses if r.status_code == 200]
                final = await client.get("/v1/bridges/b1")
                assert final.json()["name"] == winner.json()["name"]
                assert final.headers["ETag"] == winner.headers["ETag"]
                # Concurrent creates of ports: distinct tunnel keys through the API too.
                ports = await asyncio.gather(
                    *(
                        client.post("/v1/ports", json={"device_kind": "bridge", "device_id": "b1"})
                        for _ in range(20)
                    )
                )
                assert {p.status_code for p in ports} == {201}
                assert len({p.json()["tunnel_key"] for p in ports}) == 20
                store = await app.state.store_holder.store()
                await assert_consistent(store)
                assert (await dump(store))[0] == await store.current_revision()

    asyncio.run(asyncio.wait_for(main(), 30))


# ---- run_server as a process


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_run_server_serves_on_loopback(tmp_path: Path) -> None:
    port = _free_port()
    state_dir = tmp_path / "hn-state"
    code = (
        "import sys; from pathlib import Path; from hivenet.api import run_server; "
        "run_server(sys.argv[1], '127.0.0.1', int(sys.argv[2]), Path(sys.argv[3]), "
        "log_level='warning')"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", code, f"sqlite://{tmp_path}/hn.db", str(port), str(state_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                health = httpx.get(f"{base}/v1/health", timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read() if server.stderr else b""
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        assert health.status_code == 200
        token = (state_dir / ADMIN_TOKEN_FILE).read_text().strip()
        created = httpx.post(
            f"{base}/v1/hosts", json={"name": "hn-h"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert created.status_code == 201
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, 9)
            server.wait()
