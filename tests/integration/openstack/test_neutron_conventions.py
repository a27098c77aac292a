"""Neutron v2.0 over HTTP: the conventions clients rely on (wrapping, filters, fields, sorting,
paging, errors, request ids, discovery), project scoping, the default security group, port
binding, and that /v1 and /v2.0 are one state."""

from __future__ import annotations

import json
from pathlib import Path

from hivenet.store.keys import port_active_key
from tests.integration.openstack.conftest import NOAUTH_PROJECT, OpenStackApi


def _error(response: object) -> dict[str, str]:
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"NeutronError"}, body
    error: dict[str, str] = body["NeutronError"]
    assert set(error) == {"type", "message", "detail"}
    return error


def test_discovery_documents(openstack: OpenStackApi) -> None:
    root = openstack.request("GET", "/")
    assert root.status_code == 200
    (version,) = root.json()["versions"]
    assert version["id"] == "v2.0" and version["status"] == "CURRENT"
    assert version["links"][0]["href"].endswith("/v2.0/")
    listing = openstack.request("GET", "/v2.0/")
    assert listing.status_code == 200
    collections = {r["collection"] for r in listing.json()["resources"]}
    assert {"networks", "ports", "routers", "security-groups"} <= collections
    # keystoneauth accepts /v2.0 itself as a versioned endpoint through this key.
    assert listing.json()["version"]["id"] == "v2.0"


def test_extensions_list_exactly_what_is_served(openstack: OpenStackApi) -> None:
    aliases = {
        e["alias"] for e in openstack.request("GET", "/v2.0/extensions").json()["extensions"]
    }
    assert {"router", "security-group", "binding", "external-net", "port-security"} <= aliases
    assert "qos" not in aliases and "dvr" not in aliases
    shown = openstack.request("GET", "/v2.0/extensions/binding")
    assert shown.status_code == 200 and shown.json()["extension"]["alias"] == "binding"
    missing = openstack.request("GET", "/v2.0/extensions/qos")
    assert missing.status_code == 404 and _error(missing)["type"] == "ExtensionNotFound"


def test_request_id_on_success_and_error(openstack: OpenStackApi) -> None:
    ok = openstack.request("GET", "/v2.0/networks")
    bad = openstack.request("GET", "/v2.0/networks/nope")
    ids = {ok.headers["x-openstack-request-id"], bad.headers["x-openstack-request-id"]}
    assert len(ids) == 2 and all(i.startswith("req-") for i in ids)


def test_bad_bodies_are_400_with_the_attribute_named(openstack: OpenStackApi) -> None:
    before = openstack.dump()
    unknown = openstack.request("POST", "/v2.0/networks", json={"network": {"vlan": 5}})
    assert unknown.status_code == 400
    assert "vlan" in _error(unknown)["message"]
    unwrapped = openstack.request("POST", "/v2.0/networks", json={"name": "n"})
    assert unwrapped.status_code == 400
    not_json = openstack.request(
        "POST", "/v2.0/networks", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400 and _error(not_json)["type"] == "HTTPBadRequest"
    wrong_type = openstack.request(
        "POST", "/v2.0/networks", json={"network": {"admin_state_up": "maybe"}}
    )
    assert wrong_type.status_code == 400 and "admin_state_up" in _error(wrong_type)["message"]
    huge = openstack.request("POST", "/v2.0/networks", json={"network": {"name": "x" * 200_000}})
    assert huge.status_code == 413
    assert openstack.dump() == before


def test_not_found_and_in_use(openstack: OpenStackApi) -> None:
    missing = openstack.request("GET", "/v2.0/networks/0d6f0f6e-0000-0000-0000-000000000000")
    assert missing.status_code == 404 and _error(missing)["type"] == "NetworkNotFound"
    network = openstack.create("networks", "network", {"name": "n"})
    openstack.create("ports", "port", {"network_id": network["id"]})
    in_use = openstack.request("DELETE", f"/v2.0/networks/{network['id']}")
    assert in_use.status_code == 409 and _error(in_use)["type"] == "NetworkInUse"
    port_on_nothing = openstack.request(
        "POST", "/v2.0/ports", json={"port": {"network_id": "no-such-network"}}
    )
    assert port_on_nothing.status_code == 404
    assert _error(port_on_nothing)["type"] == "NetworkNotFound"


def test_filters_fields_sorting_and_paging(openstack: OpenStackApi) -> None:
    names = ["delta", "alpha", "charlie", "bravo", "echo"]
    for name in names:
        openstack.create("networks", "network", {"name": name, "admin_state_up": name != "echo"})
    by_name = openstack.request("GET", "/v2.0/networks?name=alpha&name=bravo").json()["networks"]
    assert sorted(n["name"] for n in by_name) == ["alpha", "bravo"]
    down = openstack.request("GET", "/v2.0/networks?admin_state_up=false").json()["networks"]
    assert [n["name"] for n in down] == ["echo"]
    projected = openstack.request("GET", "/v2.0/networks?fields=name&fields=id").json()
    assert all(set(n) == {"name", "id"} for n in projected["networks"])
    descending = openstack.request("GET", "/v2.0/networks?sort_key=name&sort_dir=desc").json()
    assert [n["name"] for n in descending["networks"]] == sorted(names, reverse=True)
    seen: list[str] = []
    url: str | None = "/v2.0/networks?sort_key=name&sort_dir=asc&limit=2"
    pages = 0
    while url is not None:
        page = openstack.request("GET", url).json()
        seen.extend(n["name"] for n in page["networks"])
        nexts = [link["href"] for link in page.get("networks_links", []) if link["rel"] == "next"]
        url = nexts[0] if nexts else None
        pages += 1
    assert seen == sorted(names) and pages == 3
    unknown_filter = openstack.request("GET", "/v2.0/networks?colour=red")
    assert unknown_filter.status_code == 400 and "colour" in _error(unknown_filter)["message"]
    bad_sort = openstack.request("GET", "/v2.0/networks?sort_key=name&sort_dir=sideways")
    assert bad_sort.status_code == 400


def test_projects_see_only_their_own(openstack: OpenStackApi) -> None:
    alpha, beta = openstack.as_project("alpha"), openstack.as_project("beta")
    mine = alpha.create("networks", "network", {"name": "mine"})
    assert mine["project_id"] == "alpha" and mine["tenant_id"] == "alpha"
    assert beta.request("GET", f"/v2.0/networks/{mine['id']}").status_code == 404
    assert beta.request("DELETE", f"/v2.0/networks/{mine['id']}").status_code == 404
    assert [n["name"] for n in beta.request("GET", "/v2.0/networks").json()["networks"]] == []
    foreign = beta.request(
        "POST", "/v2.0/networks", json={"network": {"name": "x", "project_id": "alpha"}}
    )
    assert foreign.status_code == 403
    admin_view = openstack.as_admin().request("GET", "/v2.0/networks").json()["networks"]
    assert [n["id"] for n in admin_view] == [mine["id"]]
    assert openstack.as_token("forged").request("GET", "/v2.0/networks").status_code == 401
    noauth = openstack.create("networks", "network", {"name": "dev"})
    assert noauth["project_id"] == NOAUTH_PROJECT


def test_default_security_group_per_project(openstack: OpenStackApi) -> None:
    alpha = openstack.as_project("alpha")
    groups = alpha.request("GET", "/v2.0/security-groups?name=default").json()["security_groups"]
    assert len(groups) == 1
    rules = groups[0]["security_group_rules"]
    shape = sorted(
        (r["direction"], r["ethertype"], r["remote_group_id"] is not None) for r in rules
    )
    assert shape == [
        ("egress", "IPv4", False),
        ("egress", "IPv6", False),
        ("ingress", "IPv4", True),
        ("ingress", "IPv6", True),
    ]
    again = alpha.request("GET", "/v2.0/security-groups").json()["security_groups"]
    assert [g["id"] for g in again] == [groups[0]["id"]]
    refused = alpha.request("DELETE", f"/v2.0/security-groups/{groups[0]['id']}")
    assert refused.status_code == 409
    beta_groups = openstack.as_project("beta").request("GET", "/v2.0/security-groups").json()
    assert [g["id"] for g in beta_groups["security_groups"]] != [groups[0]["id"]]
    # A port with port security gets the default group.
    network = alpha.create("networks", "network", {"name": "n"})
    port = alpha.create("ports", "port", {"network_id": network["id"]})
    assert port["security_groups"] == [groups[0]["id"]] and port["port_security_enabled"]


def test_security_group_rules(openstack: OpenStackApi) -> None:
    group = openstack.create("security-groups", "security_group", {"name": "web"})
    assert {r["direction"] for r in group["security_group_rules"]} == {"egress"}
    body = {
        "security_group_id": group["id"],
        "direction": "ingress",
        "protocol": "tcp",
        "port_range_min": 22,
        "port_range_max": 22,
        "remote_ip_prefix": "10.0.0.0/8",
    }
    rule = openstack.create("security-group-rules", "security_group_rule", body)
    assert rule["protocol"] == "tcp" and rule["port_range_min"] == 22
    duplicate = openstack.request(
        "POST", "/v2.0/security-group-rules", json={"security_group_rule": body}
    )
    assert duplicate.status_code == 409 and _error(duplicate)["type"] == "SecurityGroupRuleExists"
    bad_range = {**body, "port_range_min": 30, "port_range_max": 20}
    refused = openstack.request(
        "POST", "/v2.0/security-group-rules", json={"security_group_rule": bad_range}
    )
    assert refused.status_code == 400 and "port_range" in _error(refused)["message"]
    bad_protocol = {**body, "protocol": "tcpx"}
    refused = openstack.request(
        "POST", "/v2.0/security-group-rules", json={"security_group_rule": bad_protocol}
    )
    assert refused.status_code == 400 and "tcpx" in _error(refused)["message"]
    listed = openstack.request(
        "GET", f"/v2.0/security-group-rules?security_group_id={group['id']}&direction=ingress"
    ).json()["security_group_rules"]
    assert [r["id"] for r in listed] == [rule["id"]]
    assert (
        openstack.request("DELETE", f"/v2.0/security-group-rules/{rule['id']}").status_code == 204
    )


def test_port_binding_and_status_follow_the_agent(openstack: OpenStackApi) -> None:
    admin = openstack.as_admin()
    host = admin.request(
        "POST",
        "/v1/hosts",
        json={"id": "hv1"},
        headers={"Authorization": f"Bearer {openstack.admin_token}"},
    )
    assert host.status_code == 201, host.text
    network = openstack.create("networks", "network", {"name": "n"})
    unknown_host = openstack.request(
        "POST",
        "/v2.0/ports",
        json={"port": {"network_id": network["id"], "binding:host_id": "hv9"}},
    )
    assert unknown_host.status_code == 400 and "hv9" in _error(unknown_host)["message"]
    port = openstack.create(
        "ports",
        "port",
        {
            "network_id": network["id"],
            "binding:host_id": "hv1",
            "device_id": "vm-1",
            "device_owner": "compute:nova",
        },
    )
    assert port["binding:vif_type"] == "tap" and port["status"] == "DOWN"
    assert port["device_id"] == "vm-1" and port["device_owner"] == "compute:nova"
    native = admin.request(
        "GET",
        f"/v1/ports/{port['id']}",
        headers={"Authorization": f"Bearer {openstack.admin_token}"},
    ).json()
    assert native["host_id"] == "hv1"
    assert native["interface_name"] == "tap" + port["id"][:11]
    openstack.put_key(port_active_key("hv1", port["id"]), b"{}")
    assert openstack.show("ports", "port", port["id"])["status"] == "ACTIVE"
    listed = openstack.request("GET", f"/v2.0/ports?network_id={network['id']}").json()["ports"]
    assert [p["status"] for p in listed] == ["ACTIVE"]
    profiled = openstack.create(
        "ports",
        "port",
        {
            "network_id": network["id"],
            "binding:host_id": "hv1",
            "binding:profile": {"interface_name": "hnvm7"},
        },
    )
    native = admin.request(
        "GET",
        f"/v1/ports/{profiled['id']}",
        headers={"Authorization": f"Bearer {openstack.admin_token}"},
    ).json()
    assert native["interface_name"] == "hnvm7"
    unbound = openstack.request(
        "PUT", f"/v2.0/ports/{port['id']}", json={"port": {"binding:host_id": ""}}
    )
    assert unbound.status_code == 200 and unbound.json()["port"]["binding:vif_type"] == "unbound"


def test_native_and_neutron_are_one_state(openstack: OpenStackApi) -> None:
    auth = {"Authorization": f"Bearer {openstack.admin_token}"}
    network = openstack.create("networks", "network", {"name": "before"})
    renamed = openstack.client.patch(
        f"/v1/bridges/{network['id']}", json={"name": "after"}, headers=auth
    )
    assert renamed.status_code == 200
    shown = openstack.show("networks", "network", network["id"])
    assert shown["name"] == "after" and shown["revision_number"] > network["revision_number"]
    updated = openstack.request(
        "PUT",
        f"/v2.0/networks/{network['id']}",
        json={"network": {"admin_state_up": False, "description": "d"}},
    )
    assert updated.status_code == 200
    native = openstack.client.get(f"/v1/bridges/{network['id']}", headers=auth).json()
    assert native["admin_state_up"] is False
    stale = openstack.request(
        "PUT",
        f"/v2.0/networks/{network['id']}",
        json={"network": {"name": "x"}},
        headers={"If-Match": f"revision_number={network['revision_number']}"},
    )
    assert stale.status_code == 412


def test_port_update_security_and_pairs(openstack: OpenStackApi) -> None:
    network = openstack.create("networks", "network", {"name": "n"})
    port = openstack.create(
        "ports",
        "port",
        {"network_id": network["id"], "allowed_address_pairs": [{"ip_address": "10.0.0.5"}]},
    )
    assert port["allowed_address_pairs"] == [
        {"ip_address": "10.0.0.5", "mac_address": port["mac_address"]}
    ]
    insecure = openstack.request(
        "PUT",
        f"/v2.0/ports/{port['id']}",
        json={"port": {"port_security_enabled": False, "security_groups": []}},
    )
    assert insecure.status_code == 200, insecure.text
    body = insecure.json()["port"]
    assert body["security_groups"] == [] and body["allowed_address_pairs"] == []
    conflicting = openstack.request(
        "POST",
        "/v2.0/ports",
        json={
            "port": {
                "network_id": network["id"],
                "port_security_enabled": False,
                "security_groups": [port["id"]],
            }
        },
    )
    assert conflicting.status_code == 409
    tagged = openstack.request("PUT", f"/v2.0/ports/{port['id']}/tags", json={"tags": ["b", "a"]})
    assert tagged.json() == {"tags": ["a", "b"]}
    assert openstack.show("ports", "port", port["id"])["tags"] == ["a", "b"]
    assert (
        json.loads(json.dumps(openstack.request("GET", "/v2.0/ports?tags=a").json()))["ports"][0][
            "id"
        ]
        == port["id"]
    )
    assert openstack.request("DELETE", f"/v2.0/ports/{port['id']}").status_code == 204
    assert openstack.request("GET", f"/v2.0/ports/{port['id']}").status_code == 404


def test_without_a_noauth_project_a_token_is_required(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from hivenet.api import create_app

    state_dir = tmp_path / "hn-state"
    with TestClient(create_app("memory://", state_dir)) as client:
        for headers in ({}, {"X-Auth-Token": "notused"}):
            refused = client.get("/v2.0/networks", headers=headers)
            assert refused.status_code == 401, headers
            assert refused.json()["NeutronError"]["type"] == "HTTPUnauthorized"
        token = (state_dir / "admin-token").read_text().strip()
        assert client.get("/v2.0/networks", headers={"X-Auth-Token": token}).status_code == 200
        octavia = client.get("/v2.0/lbaas/loadbalancers")
        assert octavia.status_code == 401 and octavia.json()["faultcode"] == "Client"


def test_fields_the_resource_lacks_are_left_out_as_neutron_does(openstack: OpenStackApi) -> None:
    """`openstack port list --long` asks for `fields=trunk_details` whether or not trunks
    exist; Neutron answers without it, so must HiveNet (a 400 failed the CLI)."""
    network = openstack.create("networks", "network", {"name": "n"})
    port = openstack.create("ports", "port", {"network_id": network["id"]})
    response = openstack.request("GET", "/v2.0/ports?fields=id&fields=status&fields=trunk_details")
    assert response.status_code == 200, response.text
    assert response.json()["ports"] == [{"id": port["id"], "status": "DOWN"}]
    # An unknown filter is still refused.
    assert openstack.request("GET", "/v2.0/ports?trunk_details=x").status_code == 400
