"""`GET /v1/routers/{id}/uplinks` (api/uplinks.py), the client's `router_uplinks` and what
`hivenet router show` prints with it: uplinks with host liveness, link and BGP sessions from
the gateways' reports (fake agents: a lease, a liveness key and a report in the app's store),
learned routes, 404s and tenant scoping."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from hivenet.api.auth import Principal, authenticate
from hivenet.cli.context import CliState
from hivenet.cli.main import app as cli_app
from hivenet.model.bgp import BgpSessionReport, UplinkReport
from hivenet.store.keys import uplink_status_key
from tests.integration.api.conftest import Api
from tests.integration.api.test_lbstats import Hosts, _client


def uplink_port(api: Api, port_id: str, router: str, host: str, address: str, tenant: str) -> None:
    api.create(
        "ports",
        {
            "id": port_id,
            "tenant_id": tenant,
            "device_kind": "router",
            "device_id": router,
            "addresses": [address],
            "host_id": host,
            "interface_name": f"eth-{port_id}"[:15],
        },
    )


def edge(api: Api) -> Hosts:
    """Live hosts h1 and h2 (fake agents); r1 (the admin's) with uplinks up1 on h1 and up2
    on h2, each with a bgp_peer; an unbound exterior port; a learned default route from p1
    and a static route."""
    hosts = Hosts(api)
    hosts.start("h1")
    hosts.start("h2")
    api.create("routers", {"id": "r1", "tenant_id": "admin"})
    uplink_port(api, "up1", "r1", "h1", "192.0.2.1/25", "admin")
    uplink_port(api, "up2", "r1", "h2", "192.0.2.129/25", "admin")
    api.create(
        "ports",
        {"id": "loose", "tenant_id": "admin", "device_kind": "router", "device_id": "r1"},
    )
    for peer_id, port_id, peer_ip in (("p1", "up1", "192.0.2.2"), ("p2", "up2", "192.0.2.130")):
        api.create(
            "bgp_peers",
            {
                "id": peer_id,
                "port_id": port_id,
                "local_as": 65001,
                "peer_as": 65000,
                "peer_ip": peer_ip,
            },
        )
    api.create(
        "routes",
        {
            "id": "learned1",
            "router_id": "r1",
            "dst_prefix": "0.0.0.0/0",
            "next_hop_port_id": "up1",
            "next_hop_gateway": "192.0.2.2",
            "learned_from": "p1",
        },
    )
    api.create(
        "routes",
        {
            "id": "static1",
            "router_id": "r1",
            "dst_prefix": "10.9.0.0/16",
            "next_hop_port_id": "up2",
        },
    )
    return hosts


def report(host: str, port: str, value: bytes, hosts: Hosts) -> None:
    store = hosts._store()

    async def put() -> None:
        await store.put(uplink_status_key(host, port), value, lease=hosts.leases[host])

    hosts.call(put)


ESTABLISHED = UplinkReport(
    interface="eth-up1",
    link_up=True,
    bgp={"p1": BgpSessionReport(state="Established", received=1, advertised=2)},
)


def live_edge(api: Api) -> Hosts:
    hosts = edge(api)
    report("h1", "up1", ESTABLISHED.model_dump_json().encode(), hosts)
    down = UplinkReport(
        interface="eth-up2", link_up=False, bgp={"p2": BgpSessionReport(state="Active")}
    )
    report("h2", "up2", down.model_dump_json().encode(), hosts)
    return hosts


def by_port(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {uplink["port_id"]: uplink for uplink in answer["uplinks"]}


def test_uplinks_liveness_sessions_and_learned_routes(api: Api) -> None:
    hosts = live_edge(api)
    response = api.request("GET", "/v1/routers/r1/uplinks")
    assert response.status_code == 200, response.text
    answer = response.json()
    uplinks = by_port(answer)
    assert set(uplinks) == {"up1", "up2"}  # not the unbound exterior port
    up1 = uplinks["up1"]
    assert (up1["host_id"], up1["interface_name"], up1["addresses"]) == (
        "h1",
        "eth-up1",
        ["192.0.2.1/25"],
    )
    assert up1["host_alive"] is True and up1["link_up"] is True
    (session,) = up1["bgp_peers"]
    assert session["peer_id"] == "p1" and session["peer_ip"] == "192.0.2.2"
    assert (session["state"], session["received"], session["advertised"]) == ("Established", 1, 2)
    assert uplinks["up2"]["link_up"] is False
    assert uplinks["up2"]["bgp_peers"][0]["state"] == "Active"
    assert answer["learned_routes"] == [
        {
            "route_id": "learned1",
            "dst_prefix": "0.0.0.0/0",
            "next_hop_gateway": "192.0.2.2",
            "next_hop_port_id": "up1",
            "learned_from": "p1",
        }
    ]

    # h2's agent dies: its lease takes the liveness key and the report with it.
    hosts.die("h2")
    up2 = by_port(api.request("GET", "/v1/routers/r1/uplinks").json())["up2"]
    assert up2["host_alive"] is False and up2["link_up"] is None
    assert up2["bgp_peers"][0]["state"] is None and up2["bgp_peers"][0]["received"] is None


def test_a_report_that_does_not_parse_is_skipped(api: Api) -> None:
    hosts = edge(api)
    report("h1", "up1", b'{"interface": "eth-up1", "link_up": "maybe"}', hosts)
    up1 = by_port(api.request("GET", "/v1/routers/r1/uplinks").json())["up1"]
    assert up1["host_alive"] is True and up1["link_up"] is None
    assert up1["bgp_peers"][0]["state"] is None


def test_auth_unknown_ids_and_tenants(api: Api) -> None:
    live_edge(api)
    assert api.client.get("/v1/routers/r1/uplinks").status_code == 401
    missing = api.request("GET", "/v1/routers/nope/uplinks")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    assert api.request("GET", f"/v1/routers/{'x' * 300}/uplinks").status_code == 404
    # A project's router with an uplink the cluster admin bound to h1.
    api.create("routers", {"id": "t1r", "tenant_id": "t1"})
    uplink_port(api, "t1up", "t1r", "h1", "192.0.2.5/25", "t1")
    for tenant in ("t1", "t2"):
        api.app.dependency_overrides[authenticate] = lambda t=tenant: Principal(f"{t}-user", t)
        try:
            # The admin's router does not exist for a project.
            assert api.request("GET", "/v1/routers/r1/uplinks").status_code == 404
            own = api.request("GET", "/v1/routers/t1r/uplinks")
            if tenant == "t2":
                assert own.status_code == 404
                continue
            assert own.status_code == 200, own.text
            (uplink,) = own.json()["uplinks"]
            # Its own port's fields, but no infrastructure state.
            assert uplink["port_id"] == "t1up" and uplink["host_id"] == "h1"
            assert uplink["host_alive"] is None and uplink["link_up"] is None
        finally:
            api.app.dependency_overrides.clear()
    admin_view = by_port(api.request("GET", "/v1/routers/t1r/uplinks").json())
    assert admin_view["t1up"]["host_alive"] is True


def test_client_and_router_show(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    live_edge(api)
    api.create("routers", {"id": "plain", "tenant_id": "admin"})
    with _client(api) as client:
        assert {u["port_id"] for u in client.router_uplinks("r1")["uplinks"]} == {"up1", "up2"}
    monkeypatch.setattr(CliState, "client", lambda self: _client(api))
    runner = CliRunner()
    shown = runner.invoke(cli_app, ["router", "show", "r1"], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    out = shown.stdout
    assert "Uplinks" in out and "Learned routes" in out
    up1_line = next(line for line in out.splitlines() if "up1" in line and "h1" in line)
    assert "eth-up1" in up1_line and "Established" in up1_line and "yes" in up1_line
    assert "received 1, advertised 2" in up1_line
    up2_line = next(line for line in out.splitlines() if "up2" in line and "h2" in line)
    assert "DOWN" in up2_line and "Active" in up2_line
    route_line = next(line for line in out.splitlines() if "0.0.0.0/0" in line)
    assert "192.0.2.2" in route_line and "p1" in route_line
    assert "static1" not in out and "10.9.0.0/16" not in out
    as_json = json.loads(runner.invoke(cli_app, ["router", "show", "r1", "--json"]).stdout)
    assert as_json["id"] == "r1"
    assert {u["port_id"] for u in as_json["uplinks"]} == {"up1", "up2"}
    assert [r["route_id"] for r in as_json["learned_routes"]] == ["learned1"]
    # A router without uplinks nor learned routes prints just its fields, its JSON is the
    # object alone.
    plain = runner.invoke(cli_app, ["router", "show", "plain"], env={"COLUMNS": "250"})
    assert plain.exit_code == 0 and "plain" in plain.stdout and "Uplinks" not in plain.stdout
    plain_json = json.loads(runner.invoke(cli_app, ["router", "show", "plain", "--json"]).stdout)
    assert plain_json["id"] == "plain" and "uplinks" not in plain_json
    missing = runner.invoke(cli_app, ["router", "show", "nope"])
    assert missing.exit_code == 1 and "404" in missing.output
