"""`GET /v1/load_balancers/{id}/stats`, the client's `load_balancer_stats` and the CLI verb
`hivenet load-balancer stats`: auth, 404 and tenant scoping, the sum over live hosts (a host
without its liveness key, or whose lease is gone, does not count; a malformed report is
skipped), every member listed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from hivenet.api.auth import Principal, authenticate
from hivenet.api.client import HivenetClient
from hivenet.api.client import NotFoundError as ClientNotFoundError
from hivenet.cli.context import CliState
from hivenet.cli.main import app as cli_app
from hivenet.store.base import Store
from hivenet.store.keys import host_alive_key, lb_stats_key
from tests.integration.api.conftest import Api


def report(active: int, bytes_in: int, bytes_out: int, members: dict[str, int]) -> bytes:
    def stats(active: int, bytes_in: int = 0, bytes_out: int = 0) -> dict[str, int]:
        return {
            "active_connections": active,
            "total_connections": active,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "request_errors": 0,
        }

    body = {
        "load_balancer": stats(active, bytes_in, bytes_out),
        "members": {member_id: stats(count) for member_id, count in members.items()},
    }
    return json.dumps(body).encode()


class Hosts:
    """Fake agents: a lease per host with its liveness key and reports, in the app's store."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.leases: dict[str, int] = {}

    def _store(self) -> Store:
        return self.api._store()

    def call(self, coroutine_function: Any, *args: Any) -> Any:
        return self.api.client.portal.call(coroutine_function, *args)  # type: ignore[union-attr]

    def start(self, host_id: str, *, alive: bool = True) -> None:
        self.api.create("hosts", {"id": host_id})
        store = self._store()

        async def register() -> int:
            lease = await store.lease_grant(30)
            if alive:
                await store.put(host_alive_key(host_id), b"{}", lease=lease.id)
            return lease.id

        self.leases[host_id] = self.call(register)

    def publish(self, host_id: str, lb_id: str, value: bytes) -> None:
        store = self._store()

        async def put() -> None:
            await store.put(lb_stats_key(host_id, lb_id), value, lease=self.leases[host_id])

        self.call(put)

    def die(self, host_id: str) -> None:
        store = self._store()

        async def revoke() -> None:
            await store.lease_revoke(self.leases[host_id])

        self.call(revoke)


def make_lb(api: Api, tenant: str = "admin") -> None:
    api.create("routers", {"id": "r1", "tenant_id": tenant})
    api.create("load_balancers", {"id": "lb1", "router_id": "r1", "tenant_id": tenant})
    api.create("pools", {"id": "web", "load_balancer_id": "lb1", "tenant_id": tenant})
    for n in (1, 2):
        api.create(
            "members",
            {
                "id": f"m{n}",
                "pool_id": "web",
                "address": f"10.0.2.{10 + n}",
                "protocol_port": 80,
                "tenant_id": tenant,
            },
        )


def test_stats_sum_the_live_hosts_reports(api: Api) -> None:
    make_lb(api)
    hosts = Hosts(api)
    for host_id in ("h1", "h2", "h3"):
        hosts.start(host_id)
    hosts.start("h4", alive=False)  # a report without the host's liveness key: not counted
    hosts.publish("h1", "lb1", report(3, 300, 30, {"m1": 2, "m2": 1}))
    hosts.publish("h2", "lb1", report(2, 200, 20, {"m2": 2}))
    hosts.publish("h3", "lb1", b'{"load_balancer": {"active_connections": -1}}')  # malformed
    hosts.publish("h4", "lb1", report(50, 5000, 500, {"m1": 50}))
    hosts.publish("h1", "lb-other", report(7, 7, 7, {}))  # another load balancer's

    response = api.request("GET", "/v1/load_balancers/lb1/stats")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["load_balancer_id"] == "lb1"
    assert body["hosts"] == ["h1", "h2"]
    assert (body["active_connections"], body["bytes_in"], body["bytes_out"]) == (5, 500, 50)
    assert body["total_connections"] == 5
    assert {m: s["active_connections"] for m, s in body["members"].items()} == {"m1": 2, "m2": 3}

    # h2 stops (its lease goes): its report drops out of the sum.
    hosts.die("h2")
    body = api.request("GET", "/v1/load_balancers/lb1/stats").json()
    assert body["hosts"] == ["h1"]
    assert body["active_connections"] == 3
    assert {m: s["active_connections"] for m, s in body["members"].items()} == {"m1": 2, "m2": 1}


def test_no_report_gives_zeros_for_every_member(api: Api) -> None:
    make_lb(api)
    body = api.request("GET", "/v1/load_balancers/lb1/stats").json()
    assert body["hosts"] == [] and body["active_connections"] == 0 and body["bytes_in"] == 0
    assert set(body["members"]) == {"m1", "m2"}
    assert all(s["active_connections"] == 0 for s in body["members"].values())


def test_auth_unknown_ids_and_tenants(api: Api) -> None:
    make_lb(api, tenant="t1")
    assert api.client.get("/v1/load_balancers/lb1/stats").status_code == 401
    bad = api.client.get("/v1/load_balancers/lb1/stats", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401
    missing = api.request("GET", "/v1/load_balancers/nope/stats")
    assert missing.status_code == 404
    assert "nope" in missing.json()["error"]["message"]
    assert api.request("GET", f"/v1/load_balancers/{'x' * 300}/stats").status_code == 404
    for tenant, status in (("t1", 200), ("t2", 404)):
        api.app.dependency_overrides[authenticate] = lambda t=tenant: Principal(f"{t}-user", t)
        try:
            response = api.request("GET", "/v1/load_balancers/lb1/stats")
            assert response.status_code == status, (tenant, response.text)
        finally:
            api.app.dependency_overrides.clear()


def _client(api: Api) -> HivenetClient:
    return HivenetClient("http://testserver", api.token, transport=api.client._transport)


def test_client_and_cli_verb(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    make_lb(api)
    hosts = Hosts(api)
    hosts.start("h1")
    hosts.publish("h1", "lb1", report(4, 4096, 512, {"m1": 4}))
    with _client(api) as client:
        stats = client.load_balancer_stats("lb1")
        assert stats["active_connections"] == 4 and stats["hosts"] == ["h1"]
        with pytest.raises(ClientNotFoundError):
            client.load_balancer_stats("nope")

    monkeypatch.setattr(CliState, "client", lambda self: _client(api))
    runner = CliRunner()
    shown = runner.invoke(cli_app, ["load-balancer", "stats", "lb1"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "4096" in shown.stdout and "m1" in shown.stdout and "reported by h1" in shown.stdout
    as_json = runner.invoke(cli_app, ["load-balancer", "stats", "lb1", "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["bytes_out"] == 512
    missing = runner.invoke(cli_app, ["load-balancer", "stats", "nope"])
    assert missing.exit_code == 1
    assert "404" in missing.output
