"""`POST /v1/traces`: a synthetic packet simulated in the API server from the store: the
routed path with its steps, egress host and tunnel key, the megaflow; defaults from the
port; learned tables and host liveness from the store; no side effect (the store is
unchanged); clear 4xx for unknown ports, other tenants and impossible headers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from hivenet.api.auth import Principal, authenticate
from hivenet.api.resources import PLURALS
from hivenet.cli.context import CliState
from hivenet.cli.main import app as cli_app
from hivenet.store.keys import arp_entry_key
from tests.integration.api.conftest import Api
from tests.integration.api.test_lbstats import Hosts, _client
from tests.integration.routed_topology import VM1_MAC, VM2_MAC, create_routed


def routed(api: Api, tenant: str = "t1") -> dict[str, Any]:
    """The shared routed topology (tests/integration/routed_topology.py), hosts h1 and h2
    live; "hosts" is their fake agents."""
    hosts = Hosts(api)
    for host_id in ("h1", "h2"):
        hosts.start(host_id)
    ids = create_routed(lambda kind, body: api.create(PLURALS[kind], body), tenant)
    return {**ids, "hosts": hosts}


def learn_arp(api: Api, hosts: Hosts, router_id: str, ip: str, mac: str) -> None:
    store = hosts._store()

    async def put() -> None:
        await store.put(arp_entry_key(router_id, ip), mac.encode(), lease=hosts.leases["h1"])

    hosts.call(put)


def trace(api: Api, body: dict[str, Any]) -> Any:
    return api.post("/v1/traces", body)


def test_routed_trace_shows_path_egress_and_megaflow_without_side_effects(api: Api) -> None:
    ids = routed(api)
    learn_arp(api, ids["hosts"], ids["router"], "10.0.2.20", VM2_MAC)
    before = api.dump()
    response = trace(
        api, {"from_port": ids["vm1"]["id"], "ip_dst": "10.0.2.20", "proto": "tcp", "dst_port": 80}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["simulated_by"] == "api" and body["ingress_host"] == "h1"
    # Defaults from the port: its MAC and address, its gateway's MAC.
    assert body["packet"]["eth_src"] == VM1_MAC and body["packet"]["ip_src"] == "10.0.1.10"
    assert body["packet"]["eth_dst"] == ids["rport-a"]["mac"]
    assert body["packet"]["tp_dst"] == "80" and body["packet"]["tp_src"] == "49152"
    assert body["drop_reason"] is None
    assert [(e["port_id"], e["host"], e["tunnel_key"], e["remote_ip"]) for e in body["egress"]] == [
        (ids["vm2"]["id"], "h2", ids["vm2"]["tunnel_key"], "192.0.2.2")
    ]
    kinds = [step["kind"] for step in body["path"]]
    assert kinds.count("router") == 1 and kinds.count("bridge") == 2
    assert any(step["event"] == "rule" or step["device_kind"] == "router" for step in body["steps"])
    match = body["megaflow"]["match"]
    assert match["ip_dst"].startswith("10.0.2.20") and body["megaflow"]["install"]
    assert any(action.startswith("set eth_dst=") for action in body["actions"])
    assert f"router:{ids['router']}" in body["tags"]
    assert api.dump() == before  # nothing written: no learning, no NAT, no flow

    # Without the ARP entry the router would ask: the trace says so and drops nothing real.
    icmp = trace(api, {"from_port": ids["vm2"]["id"], "ip_dst": "10.0.1.10", "proto": "icmp"})
    assert icmp.status_code == 200, icmp.text
    assert icmp.json()["packet"]["ip_proto"] == "1"
    assert any("arp" in g["description"].lower() for g in icmp.json()["generated"])


def test_egress_host_down_is_traced(api: Api) -> None:
    ids = routed(api)
    learn_arp(api, ids["hosts"], ids["router"], "10.0.2.20", VM2_MAC)
    ids["hosts"].die("h2")
    body = trace(api, {"from_port": ids["vm1"]["id"], "ip_dst": "10.0.2.20"}).json()
    assert body["drop_reason"] is not None and "down" in body["drop_reason"]


def test_bad_requests_name_the_field(api: Api) -> None:
    ids = routed(api)
    vm1 = ids["vm1"]["id"]
    cases = [
        ({"from_port": "nope", "ip_dst": "10.0.2.20"}, 404, None),
        ({"from_port": vm1, "ip_dst": "10.0.2.999"}, 422, "ip_dst"),
        ({"from_port": vm1, "ip_dst": "10.0.2.20", "dst_port": 70000}, 422, "dst_port"),
        ({"from_port": vm1, "ip_dst": "10.0.2.20", "proto": "sctp"}, 422, "proto"),
        (
            {"from_port": vm1, "ip_dst": "10.0.2.20", "proto": "icmp", "dst_port": 80},
            422,
            "dst_port",
        ),
        ({"from_port": vm1, "ip_dst": "fd00::1"}, 422, "ip_src"),
        ({"from_port": vm1, "ip_dst": "10.0.2.20", "ip_src": "fd00::2"}, 422, "ip_src"),
        ({"from_port": vm1, "ip_dst": "10.0.2.20", "tcp_flags": "syn,bogus"}, 422, "tcp_flags"),
        ({"from_port": vm1, "ip_dst": "10.0.2.20", "eth_src": "zz"}, 422, "eth_src"),
        ({"from_port": vm1, "ip_dst": "10.0.2.20", "extra": 1}, 422, "extra"),
    ]
    for body, status, field in cases:
        response = trace(api, body)
        assert response.status_code == status, (body, response.text)
        if field is not None:
            details = response.json()["error"]["details"]
            assert any(field in str(d.get("field")) for d in details), (body, details)
    assert (
        api.client.post("/v1/traces", json={"from_port": vm1, "ip_dst": "10.0.2.20"}).status_code
        == 401
    )


def test_other_tenants_port_is_not_found(api: Api) -> None:
    ids = routed(api, tenant="t1")
    for tenant, status in (("t1", 200), ("t2", 404)):
        api.app.dependency_overrides[authenticate] = lambda t=tenant: Principal(f"{t}-user", t)
        try:
            response = trace(api, {"from_port": ids["vm1"]["id"], "ip_dst": "10.0.2.20"})
            assert response.status_code == status, (tenant, response.text)
        finally:
            api.app.dependency_overrides.clear()


def test_client_and_cli(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = routed(api)
    learn_arp(api, ids["hosts"], ids["router"], "10.0.2.20", VM2_MAC)
    monkeypatch.setattr(CliState, "client", lambda self: _client(api))
    runner = CliRunner()
    args = ["trace", "--from-port", ids["vm1"]["id"], "--ip-dst", "10.0.2.20", "--dst-port", "443"]
    shown = runner.invoke(cli_app, args, env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "FORWARDED" in shown.stdout and "megaflow" in shown.stdout
    assert "h2" in shown.stdout and str(ids["vm2"]["tunnel_key"]) in shown.stdout
    as_json = runner.invoke(cli_app, [*args, "--json"])
    assert json.loads(as_json.stdout)["packet"]["tp_dst"] == "443"
    bad = runner.invoke(cli_app, [*args[:-2], "--proto", "icmp", "--dst-port", "80"])
    assert bad.exit_code == 1 and "dst_port" in bad.output


def test_graph_for_the_page_is_tenant_scoped(api: Api) -> None:
    ids = routed(api, tenant="t1")
    api.create("bridges", {"name": "other", "tenant_id": "t2"})
    graph = api.request("GET", "/v1/graph").json()
    kinds = {node["id"]: node["kind"] for node in graph["nodes"]}
    assert kinds[ids["router"]] == "router" and kinds[ids["vm1"]["id"]] == "vm"
    assert kinds["host:h1"] == "host"
    assert any(e["kind"] == "link" and {e["source"], e["target"]} == {ids["router"], ids["net-a"]}
               for e in graph["edges"])  # fmt: skip
    assert {n["state"] for n in graph["nodes"] if n["kind"] == "host"} == {"live"}
    api.app.dependency_overrides[authenticate] = lambda: Principal("t2-user", "t2")
    try:
        mine = api.request("GET", "/v1/graph").json()
    finally:
        api.app.dependency_overrides.clear()
    assert [n["label"] for n in mine["nodes"]] == ["other"]
    assert api.client.get("/ui").status_code == 200  # the page itself needs no token
    assert api.client.get("/v1/graph").status_code == 401
