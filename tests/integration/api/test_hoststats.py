"""`GET /v1/{ports,bridges,routers,chains,hosts}/{id}/stats`, the client's `object_stats`,
the CLI verbs `hivenet port stats` etc., and the API server's `GET /metrics` (parsed by the
Prometheus client's parser): sums over live hosts, 404s and tenant scoping, bounded labels."""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from hivenet.api.auth import Principal, authenticate
from hivenet.cli.context import CliState
from hivenet.cli.main import app as cli_app
from hivenet.store.keys import host_stats_key
from tests.integration.api.conftest import Api
from tests.integration.api.test_lbstats import Hosts, _client


def host_report(port_id: str, rx: int, drops: int, router_id: str, chain_id: str) -> bytes:
    return json.dumps(
        {
            "ports": {
                port_id: {
                    "rx_packets": rx,
                    "rx_bytes": rx * 100,
                    "tx_packets": 1,
                    "tx_bytes": 100,
                    "drops": drops,
                }
            },
            "devices": {router_id: {"kind": "router", "packets": rx, "bytes": rx * 100}},
            "chains": {chain_id: {"packets": rx, "bytes": rx * 100}},
            "drops": {"no_route": drops},
        }
    ).encode()


def publish(hosts: Hosts, host_id: str, value: bytes) -> None:
    store = hosts._store()

    async def put() -> None:
        await store.put(host_stats_key(host_id), value, lease=hosts.leases[host_id])

    hosts.call(put)


def topology(api: Api, tenant: str = "t1") -> dict[str, str]:
    bridge = api.create("bridges", {"name": "net", "tenant_id": tenant})
    router = api.create("routers", {"name": "r", "tenant_id": tenant})
    port = api.create(
        "ports", {"device_kind": "bridge", "device_id": bridge["id"], "tenant_id": tenant}
    )
    chain = api.create("chains", {"name": "c", "tenant_id": tenant})
    return {
        "port": port["id"],
        "router": router["id"],
        "chain": chain["id"],
        "bridge": bridge["id"],
    }


def test_sums_over_live_hosts_only(api: Api) -> None:
    ids = topology(api)
    hosts = Hosts(api)
    for host_id in ("h1", "h2", "h3"):
        hosts.start(host_id)
    publish(hosts, "h1", host_report(ids["port"], 10, 2, ids["router"], ids["chain"]))
    publish(hosts, "h2", host_report(ids["port"], 5, 1, ids["router"], ids["chain"]))
    publish(hosts, "h3", b"{not json")  # skipped, never summed
    port = api.request("GET", f"/v1/ports/{ids['port']}/stats").json()
    assert port["rx_packets"] == 15 and port["rx_bytes"] == 1500 and port["drops"] == 3
    assert port["hosts"] == ["h1", "h2"]
    router = api.request("GET", f"/v1/routers/{ids['router']}/stats").json()
    assert (router["packets"], router["bytes"], router["kind"]) == (15, 1500, "router")
    chain = api.request("GET", f"/v1/chains/{ids['chain']}/stats").json()
    assert chain["packets"] == 15
    bridge = api.request("GET", f"/v1/bridges/{ids['bridge']}/stats").json()
    assert bridge["packets"] == 0 and bridge["hosts"] == []
    host = api.request("GET", "/v1/hosts/h1/stats").json()
    assert host["alive"] and host["drops"] == {"no_route": 2}

    hosts.die("h2")
    port = api.request("GET", f"/v1/ports/{ids['port']}/stats").json()
    assert port["rx_packets"] == 10 and port["hosts"] == ["h1"]
    dead = api.request("GET", "/v1/hosts/h2/stats").json()
    assert not dead["alive"] and dead["drops"] == {}


def test_auth_unknown_ids_and_tenants(api: Api) -> None:
    ids = topology(api, tenant="t1")
    api.create("hosts", {"id": "h1"})
    assert api.client.get(f"/v1/ports/{ids['port']}/stats").status_code == 401
    missing = api.request("GET", "/v1/ports/nope/stats")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    assert api.request("GET", f"/v1/routers/{'x' * 300}/stats").status_code == 404
    for tenant, status in (("t1", 200), ("t2", 404)):
        api.app.dependency_overrides[authenticate] = lambda t=tenant: Principal(f"{t}-user", t)
        try:
            for path in (f"/v1/ports/{ids['port']}/stats", f"/v1/chains/{ids['chain']}/stats"):
                response = api.request("GET", path)
                assert response.status_code == status, (tenant, path, response.text)
            # Hosts are the operator's: no tenant sees their stats.
            assert api.request("GET", "/v1/hosts/h1/stats").status_code == 404
        finally:
            api.app.dependency_overrides.clear()


def test_client_and_cli_verbs(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = topology(api)
    hosts = Hosts(api)
    hosts.start("h1")
    publish(hosts, "h1", host_report(ids["port"], 7, 3, ids["router"], ids["chain"]))
    with _client(api) as client:
        assert client.object_stats("port", ids["port"])["rx_packets"] == 7
    monkeypatch.setattr(CliState, "client", lambda self: _client(api))
    runner = CliRunner()
    shown = runner.invoke(cli_app, ["port", "stats", ids["port"]], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "rx packets" in shown.stdout and "700" in shown.stdout
    assert "reported by h1" in shown.stdout
    host = runner.invoke(cli_app, ["host", "stats", "h1"], env={"COLUMNS": "200"})
    assert host.exit_code == 0, host.output
    assert "drops: no_route" in host.stdout
    as_json = runner.invoke(cli_app, ["router", "stats", ids["router"], "--json"])
    assert json.loads(as_json.stdout)["packets"] == 7
    missing = runner.invoke(cli_app, ["chain", "stats", "nope"])
    assert missing.exit_code == 1 and "404" in missing.output


def metric_samples(text: str) -> list[Any]:
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def test_metrics_endpoint_counts_by_route_template(api: Api) -> None:
    ids = topology(api)
    for _ in range(3):
        api.request("GET", f"/v1/ports/{ids['port']}")
    api.request("GET", "/v1/ports/no-such-port")
    api.client.get("/nowhere/at/all")
    response = api.client.get("/metrics")  # no auth, as Prometheus scrapes
    assert response.status_code == 200
    samples = metric_samples(response.text)
    requests = {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for s in samples
        if s.name == "hivenet_api_requests_total"
    }
    template = "/v1/ports/{object_id}"
    assert requests[("GET", template, "200")] == 3
    assert requests[("GET", template, "404")] == 1
    assert requests[("GET", "unmatched", "404")] == 1
    # Labels never carry an id: the series set is bounded by the routes.
    assert not any(ids["port"] in route for _m, route, _s in requests)
    revision = [s.value for s in samples if s.name == "hivenet_api_store_revision"]
    assert revision and revision[0] > 0
