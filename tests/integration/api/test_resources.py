"""The `/v1/<plural>` collections: every kind round-trips; every status code of the contract;
every refused request leaves the store exactly as it was."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from hivenet.model import KINDS
from tests.integration.api.conftest import Api

PLURALS = {kind: f"{kind}s" for kind in KINDS}


@contextmanager
def unchanged(api: Api) -> Iterator[None]:
    before = api.dump()
    yield
    assert api.dump() == before, "a refused request changed the store"


def base_objects(api: Api) -> dict[str, str]:
    """Ids of the objects other kinds need."""
    host = api.create("hosts", {"name": "hn-h1"})
    chain = api.create("chains", {"name": "c"})
    bridge = api.create("bridges", {"name": "b"})
    router = api.create("routers", {"name": "r"})
    router_port = api.create(
        "ports", {"device_kind": "router", "device_id": router["id"], "addresses": ["10.0.0.1/24"]}
    )
    load_balancer = api.create("load_balancers", {"router_id": router["id"]})
    pool = api.create("pools", {"load_balancer_id": load_balancer["id"]})
    security_group = api.create("security_groups", {"name": "sg"})
    return {
        "security_group": security_group["id"],
        "load_balancer": load_balancer["id"],
        "pool": pool["id"],
        "host": host["id"],
        "chain": chain["id"],
        "bridge": bridge["id"],
        "router": router["id"],
        "router_port": router_port["id"],
    }


BODIES: dict[str, Callable[[dict[str, str]], dict[str, Any]]] = {
    "bridge": lambda ids: {"name": "net", "inbound_chain_id": ids["chain"], "arp_proxy": True},
    "router": lambda ids: {"name": "edge", "outbound_chain_id": ids["chain"]},
    "port": lambda ids: {
        "device_kind": "bridge",
        "device_id": ids["bridge"],
        "mac": "02:00:00:00:00:0A",
        "addresses": ["10.0.0.5/24"],
        "vlan_id": 10,
        "host_id": ids["host"],
        "interface_name": "hn-tap9",
    },
    "route": lambda ids: {
        "router_id": ids["router"],
        "dst_prefix": "192.168.0.0/16",
        "next_hop_port_id": ids["router_port"],
        "next_hop_gateway": "10.0.0.254",
    },
    "chain": lambda ids: {"name": "fw"},
    "rule": lambda ids: {
        "chain_id": ids["chain"],
        "action": "dnat",
        "nat_targets": [
            {"address_from": "10.0.0.9", "address_to": "10.0.0.9", "port_from": 0, "port_to": 0}
        ],
        "nw_dst": "203.0.113.7/32",
        "tp_dst": {"start": 80, "end": 80},
        "nw_proto": 6,
    },
    "port_group": lambda ids: {"name": "web", "stateful": True},
    "ip_addr_group": lambda ids: {"addresses": ["10.0.0.5", "2001:db8::1"]},
    "host": lambda ids: {"name": "hn-h2"},
    "tunnel_zone": lambda ids: {
        "members": [{"host_id": ids["host"], "underlay_ip": "172.16.0.1"}],
        "vxlan_port": 4790,
    },
    "load_balancer": lambda ids: {"router_id": ids["router"], "admin_state_up": False},
    "listener": lambda ids: {
        "load_balancer_id": ids["load_balancer"],
        "vip_address": "203.0.113.10",
        "protocol": "tcp",
        "protocol_port": 443,
        "default_pool_id": ids["pool"],
        "allowed_cidrs": ["198.51.100.0/24"],
    },
    "pool": lambda ids: {
        "load_balancer_id": ids["load_balancer"],
        "algorithm": "maglev",
        "session_persistence": "source_ip",
        "persistence_timeout": 600,
    },
    "member": lambda ids: {
        "pool_id": ids["pool"],
        "address": "10.0.0.21",
        "protocol_port": 8443,
        "weight": 200,
    },
    "health_monitor": lambda ids: {
        "pool_id": ids["pool"],
        "type": "http",
        "delay": 10,
        "timeout": 4,
        "url_path": "/healthz",
        "expected_codes": "200-299,302",
    },
    "security_group": lambda ids: {"description": "web servers"},
    "security_group_rule": lambda ids: {
        "security_group_id": ids["security_group"],
        "direction": "ingress",
        "ethertype": "IPv4",
        "protocol": 6,
        "port_range_min": 22,
        "port_range_max": 22,
        "remote_ip_prefix": "198.51.100.0/24",
    },
    "subnet": lambda ids: {
        "bridge_id": ids["bridge"],
        "cidr": "10.9.0.0/24",
        "gateway_ip": "10.9.0.1",
        "allocation_pools": [{"start": "10.9.0.10", "end": "10.9.0.99"}],
        "dns_nameservers": ["10.9.0.53"],
        "host_routes": [{"destination": "192.168.0.0/16", "nexthop": "10.9.0.254"}],
        "enable_dhcp": True,
        "lease_time": 3600,
        "domain_name": "acme.example",
    },
    "floating_ip": lambda ids: {
        "floating_ip_address": "203.0.113.50",
        "router_id": ids["router"],
        "fixed_ip_address": "10.0.0.5",
    },
    "bgp_peer": lambda ids: {
        "port_id": ids["router_port"],
        "local_as": 65001,
        "peer_as": 4200000000,
        "peer_ip": "10.0.0.2",
        "hold_time": 3,
        "advertise": ["198.51.100.0/24"],
    },
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_round_trips(api: Api, kind: str) -> None:
    plural = PLURALS[kind]
    body = BODIES[kind](base_objects(api))

    created = api.post(f"/v1/{plural}", body)
    assert created.status_code == 201, created.text
    obj = created.json()
    assert created.headers["Location"] == f"/v1/{plural}/{obj['id']}"
    etag = created.headers["ETag"]
    assert etag.startswith('"') and etag.strip('"').isdigit()
    for field, value in body.items():
        if field == "mac":
            value = value.lower()
        assert obj[field] == value, field

    fetched = api.request("GET", f"/v1/{plural}/{obj['id']}")
    assert (fetched.status_code, fetched.json(), fetched.headers["ETag"]) == (200, obj, etag)

    # PUT of what GET returned changes nothing, not even the revision.
    replaced = api.request("PUT", f"/v1/{plural}/{obj['id']}", json=obj, headers={"If-Match": etag})
    assert (replaced.status_code, replaced.json(), replaced.headers["ETag"]) == (200, obj, etag)

    patched = api.request(
        "PATCH", f"/v1/{plural}/{obj['id']}", json={"name": "renamed"}, headers={"If-Match": etag}
    )
    assert patched.status_code == 200, patched.text
    assert patched.json() == {**obj, "name": "renamed"}
    assert int(patched.headers["ETag"].strip('"')) > int(etag.strip('"'))

    listed = api.request("GET", f"/v1/{plural}", params={"name": "renamed"})
    assert listed.json() == {"items": [patched.json()], "next_marker": None}

    deleted = api.request("DELETE", f"/v1/{plural}/{obj['id']}")
    assert (deleted.status_code, deleted.content) == (204, b"")
    assert api.request("GET", f"/v1/{plural}/{obj['id']}").status_code == 404
    api.assert_consistent()


def test_ports_get_server_allocated_tunnel_keys(api: Api) -> None:
    ids = base_objects(api)
    port = api.create("ports", {"device_kind": "bridge", "device_id": ids["bridge"]})
    assert port["tunnel_key"] >= 1
    with unchanged(api):
        refused = api.post(
            "/v1/ports", {"device_kind": "bridge", "device_id": ids["bridge"], "tunnel_key": 5}
        )
        assert refused.status_code == 422
        assert refused.json()["error"]["details"][0]["field"] == "tunnel_key"
        changed = api.request(
            "PATCH", f"/v1/ports/{port['id']}", json={"tunnel_key": port["tunnel_key"] + 1}
        )
        assert changed.status_code == 422
        assert changed.json()["error"]["details"][0]["field"] == "tunnel_key"
    # A PUT without tunnel_key and mac keeps both.
    body = {k: v for k, v in port.items() if k not in ("tunnel_key", "mac")}
    replaced = api.request("PUT", f"/v1/ports/{port['id']}", json={**body, "name": "p"})
    assert replaced.status_code == 200
    assert replaced.json() == {**port, "name": "p"}


def test_put_replaces_every_field_and_patch_merges(api: Api) -> None:
    ids = base_objects(api)
    bridge = api.create(
        "bridges", {"name": "b", "inbound_chain_id": ids["chain"], "arp_proxy": True}
    )
    url = f"/v1/bridges/{bridge['id']}"
    patched = api.request("PATCH", url, json={"arp_proxy": False}).json()
    assert patched == {**bridge, "arp_proxy": False}
    replaced = api.request("PUT", url, json={"name": "only-name"}).json()
    assert replaced == {**bridge, "name": "only-name", "inbound_chain_id": None, "arp_proxy": False}
    # Null clears an optional reference through PATCH too.
    api.request("PATCH", url, json={"inbound_chain_id": ids["chain"]})
    cleared = api.request("PATCH", url, json={"inbound_chain_id": None}).json()
    assert cleared["inbound_chain_id"] is None
    api.assert_consistent()


def test_list_paginates_and_filters_children(api: Api) -> None:
    ids = base_objects(api)
    other_bridge = api.create("bridges", {"name": "b2"})
    created = [
        api.create(
            "ports", {"id": f"p{i:03d}", "device_kind": "bridge", "device_id": ids["bridge"]}
        )
        for i in range(5)
    ]
    api.create("ports", {"id": "q000", "device_kind": "bridge", "device_id": other_bridge["id"]})
    pages: list[list[str]] = []
    marker: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2, "device_id": ids["bridge"]}
        if marker:
            params["marker"] = marker
        page = api.request("GET", "/v1/ports", params=params).json()
        pages.append([item["id"] for item in page["items"]])
        marker = page["next_marker"]
        if marker is None:
            break
    assert pages == [["p000", "p001"], ["p002", "p003"], ["p004"]]
    assert [p["id"] for p in created] == [f"p{i:03d}" for i in range(5)]
    everything = api.request("GET", "/v1/ports").json()["items"]
    assert [p["id"] for p in everything] == sorted(p["id"] for p in everything)
    assert len(everything) == 7  # + the router port
    by_router = api.request("GET", "/v1/routes", params={"router_id": ids["router"]}).json()
    assert by_router == {"items": [], "next_marker": None}
    assert api.request("GET", "/v1/ports", params={"tenant_id": "nobody"}).json()["items"] == []
    for bad in ({"limit": 0}, {"limit": 1001}, {"limit": "many"}):
        refused = api.request("GET", "/v1/ports", params=bad)
        assert refused.status_code == 422
        assert refused.json()["error"]["details"][0]["field"] == "limit"


# ---- refusals: status code, error body, and an untouched store


def test_malformed_json_is_400(api: Api) -> None:
    ids = base_objects(api)
    with unchanged(api):
        for payload in (b"{not json", b"", b'{"name": "x"', b"\xff\xfe"):
            for method, url in (
                ("POST", "/v1/bridges"),
                ("PUT", f"/v1/bridges/{ids['bridge']}"),
                ("PATCH", f"/v1/bridges/{ids['bridge']}"),
            ):
                response = api.request(
                    method, url, content=payload, headers={"Content-Type": "application/json"}
                )
                assert response.status_code == 400, (method, payload)
                error = response.json()["error"]
                assert error["status"] == 400 and "JSON" in error["message"]
        not_object = api.request("POST", "/v1/bridges", json=[{"name": "x"}])
        assert not_object.status_code == 400
        assert "JSON object" in not_object.json()["error"]["message"]


@pytest.mark.parametrize(
    ("plural", "body", "field", "value"),
    [
        ("bridges", {"colour": "red"}, "colour", "red"),
        ("ports", {"device_kind": "bridge", "device_id": "{bridge}", "mac": "zz"}, "mac", "zz"),
        (
            "ports",
            {"device_kind": "bridge", "device_id": "{bridge}", "addresses": ["10.0.0.300/24"]},
            "addresses.0",
            "10.0.0.300/24",
        ),
        (
            "routes",
            {"router_id": "{router}", "dst_prefix": "10.0.0.0/33", "type": "blackhole"},
            "dst_prefix",
            "10.0.0.0/33",
        ),
        (
            "rules",
            {"chain_id": "{chain}", "action": "accept", "tp_dst": {"start": 90, "end": 80}},
            "tp_dst",
            {"start": 90, "end": 80},
        ),
        (
            "rules",
            {"chain_id": "{chain}", "action": "accept", "tp_src": {"start": 1, "end": 70000}},
            "tp_src.end",
            70000,
        ),
        (
            "ports",
            {"device_kind": "bridge", "device_id": "{bridge}", "vlan_id": 4095},
            "vlan_id",
            4095,
        ),
        ("bridges", {"id": "bad id!"}, "id", "bad id!"),
        ("rules", {"chain_id": "{chain}", "action": "teleport"}, "action", "teleport"),
    ],
)
def test_bad_values_are_422_naming_field_and_value(
    api: Api, plural: str, body: dict[str, Any], field: str, value: Any
) -> None:
    ids = base_objects(api)
    filled = {k: v.format(**ids) if isinstance(v, str) else v for k, v in body.items()}
    with unchanged(api):
        response = api.post(f"/v1/{plural}", filled)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["status"] == 422
    assert {"field": field, "value": value} in [
        {"field": d["field"], "value": d["value"]} for d in error["details"]
    ], error
    assert field.split(".")[0] in error["message"]


def test_cross_field_errors_are_422_with_the_reason(api: Api) -> None:
    ids = base_objects(api)
    with unchanged(api):
        response = api.post(
            "/v1/ports",
            {"device_kind": "bridge", "device_id": ids["bridge"], "host_id": ids["host"]},
        )
    assert response.status_code == 422
    (only,) = response.json()["error"]["details"]
    assert only["field"] is None and "host_id and interface_name go together" in only["message"]


def test_l2_gateway_ports_round_trip_and_a_taken_vni_is_refused_naming_it(api: Api) -> None:
    ids = base_objects(api)
    vtep = {"device_kind": "bridge", "device_id": ids["bridge"], "vtep_ip": "192.0.2.200"}
    created = api.post("/v1/ports", vtep | {"vtep_vni": 0xE00001})
    assert created.status_code == 201, created.text
    assert (created.json()["vtep_ip"], created.json()["vtep_vni"]) == ("192.0.2.200", 0xE00001)
    taken = created.json()["tunnel_key"]  # another port's tunnel key cannot be a VNI
    with unchanged(api):
        refused = api.post("/v1/ports", vtep | {"vtep_vni": taken})
    assert refused.status_code == 422, refused.text
    assert {"field": "vtep_vni", "value": taken} in [
        {"field": d["field"], "value": d["value"]} for d in refused.json()["error"]["details"]
    ]
    vlan = {
        "device_kind": "bridge",
        "device_id": ids["bridge"],
        "host_id": ids["host"],
        "interface_name": "hn-gw1",
        "interface_vlan": 100,
    }
    bound = api.post("/v1/ports", vlan)
    assert bound.status_code == 201 and bound.json()["interface_vlan"] == 100, bound.text


def test_missing_reference_is_422_naming_field_and_value(api: Api) -> None:
    ids = base_objects(api)
    with unchanged(api):
        response = api.post("/v1/ports", {"device_kind": "router", "device_id": ids["bridge"]})
        assert response.status_code == 422
        assert response.json()["error"]["details"] == [
            {"field": "device_id", "value": ids["bridge"], "message": "no router with that id"}
        ]
        patched = api.request(
            "PATCH", f"/v1/bridges/{ids['bridge']}", json={"outbound_chain_id": "nope"}
        )
        assert patched.status_code == 422
        assert patched.json()["error"]["details"][0]["field"] == "outbound_chain_id"


def test_unknown_objects_are_404(api: Api) -> None:
    with unchanged(api):
        for method in ("GET", "PUT", "PATCH", "DELETE"):
            kwargs = {"json": {"name": "x"}} if method in ("PUT", "PATCH") else {}
            for object_id in ("nope", "bad%20id"):
                response = api.request(method, f"/v1/chains/{object_id}", **kwargs)
                assert response.status_code == 404, (method, object_id)
                assert response.json()["error"]["status"] == 404
        assert api.request("GET", "/v1/spaceships").status_code == 404


def test_conflicts_are_409(api: Api) -> None:
    ids = base_objects(api)
    bridge_port = api.create("ports", {"device_kind": "bridge", "device_id": ids["bridge"]})
    linked = api.create(
        "ports",
        {"device_kind": "router", "device_id": ids["router"], "peer_id": bridge_port["id"]},
    )
    with unchanged(api):
        duplicate = api.post("/v1/chains", {"id": ids["chain"]})
        assert (
            duplicate.status_code == 409
            and "already exists" in duplicate.json()["error"]["message"]
        )
        relink = api.post(
            "/v1/ports",
            {"device_kind": "router", "device_id": ids["router"], "peer_id": bridge_port["id"]},
        )
        assert relink.status_code == 409
        assert linked["id"] in relink.json()["error"]["message"]
        referenced = api.request("DELETE", f"/v1/bridges/{ids['bridge']}")
        assert referenced.status_code == 409
        details = referenced.json()["error"]["details"]
        assert details == [
            {
                "field": "device_id",
                "value": bridge_port["id"],
                "kind": "port",
                "message": f"port {bridge_port['id']} references bridge {ids['bridge']} "
                "through device_id",
            }
        ]
        explicit_false = api.request("DELETE", f"/v1/bridges/{ids['bridge']}?cascade=false")
        assert explicit_false.status_code == 409
    assert api.request("DELETE", f"/v1/bridges/{ids['bridge']}?cascade=true").status_code == 204
    assert api.request("GET", f"/v1/ports/{linked['id']}").json()["peer_id"] is None
    api.assert_consistent()


def test_if_match_mismatch_is_412(api: Api) -> None:
    chain = api.client.post("/v1/chains", json={"name": "a"}, headers=api.auth)
    etag = chain.headers["ETag"]
    url = f"/v1/chains/{chain.json()['id']}"
    current = api.request("PATCH", url, json={"name": "b"}, headers={"If-Match": etag})
    assert current.status_code == 200
    with unchanged(api):
        for method, kwargs in (
            ("PUT", {"json": {"name": "c"}}),
            ("PATCH", {"json": {"name": "c"}}),
            ("DELETE", {}),
        ):
            stale = api.request(method, url, headers={"If-Match": etag}, **kwargs)
            assert stale.status_code == 412, method
            assert stale.json()["error"]["status"] == 412
            assert stale.headers["ETag"] == current.headers["ETag"]
        malformed = api.request("DELETE", url, headers={"If-Match": "yesterday"})
        assert malformed.status_code == 400
    assert (
        api.request("DELETE", url, headers={"If-Match": current.headers["ETag"]}).status_code == 204
    )


def test_body_id_must_match_the_path(api: Api) -> None:
    ids = base_objects(api)
    with unchanged(api):
        for method in ("PUT", "PATCH"):
            response = api.request(method, f"/v1/chains/{ids['chain']}", json={"id": "other"})
            assert response.status_code == 422
            assert response.json()["error"]["details"][0] == {
                "field": "id",
                "value": "other",
                "message": f"must match the path id {ids['chain']!r}",
            }


def test_owner_fields_are_immutable_through_the_api(api: Api) -> None:
    ids = base_objects(api)
    other = api.create("routers", {})
    with unchanged(api):
        response = api.request(
            "PATCH", f"/v1/ports/{ids['router_port']}", json={"device_id": other["id"]}
        )
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "device_id"
