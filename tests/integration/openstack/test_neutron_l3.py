"""Neutron subnets, fixed IPs, router interfaces, the external gateway with SNAT and floating
IPs over HTTP, checked against the native objects they are made of."""

from __future__ import annotations

from typing import Any

from tests.integration.openstack.conftest import OpenStackApi


def _native(openstack: OpenStackApi, plural: str, object_id: str) -> Any:
    auth = {"Authorization": f"Bearer {openstack.admin_token}"}
    response = openstack.client.get(f"/v1/{plural}/{object_id}", headers=auth)
    return response


def _natives(openstack: OpenStackApi, plural: str) -> list[dict[str, Any]]:
    auth = {"Authorization": f"Bearer {openstack.admin_token}"}
    items: list[dict[str, Any]] = openstack.client.get(
        f"/v1/{plural}?limit=1000", headers=auth
    ).json()["items"]
    return items


def _network_with_subnet(openstack: OpenStackApi, cidr: str, **extra: Any) -> tuple[Any, Any]:
    network = openstack.create("networks", "network", {"name": f"net-{cidr}", **extra})
    subnet = openstack.create(
        "subnets", "subnet", {"network_id": network["id"], "cidr": cidr, "ip_version": 4}
    )
    return network, subnet


def test_subnets_and_fixed_ips(openstack: OpenStackApi) -> None:
    network = openstack.create("networks", "network", {"name": "n"})
    subnet = openstack.create(
        "subnets",
        "subnet",
        {
            "network_id": network["id"],
            "cidr": "10.0.0.0/24",
            "ip_version": 4,
            "allocation_pools": [{"start": "10.0.0.10", "end": "10.0.0.20"}],
            "dns_nameservers": ["192.0.2.53"],
        },
    )
    assert subnet["gateway_ip"] == "10.0.0.1" and subnet["dns_nameservers"] == ["192.0.2.53"]
    assert openstack.show("networks", "network", network["id"])["subnets"] == [subnet["id"]]
    port = openstack.create("ports", "port", {"network_id": network["id"]})
    assert port["fixed_ips"] == [{"subnet_id": subnet["id"], "ip_address": "10.0.0.10"}]
    pinned = openstack.create(
        "ports", "port", {"network_id": network["id"], "fixed_ips": [{"ip_address": "10.0.0.50"}]}
    )
    assert pinned["fixed_ips"][0] == {"subnet_id": subnet["id"], "ip_address": "10.0.0.50"}
    before = openstack.dump()
    taken = openstack.request(
        "POST",
        "/v2.0/ports",
        json={"port": {"network_id": network["id"], "fixed_ips": [{"ip_address": "10.0.0.50"}]}},
    )
    assert taken.status_code == 409
    assert taken.json()["NeutronError"]["type"] == "IpAddressAlreadyAllocated"
    outside = openstack.request(
        "POST",
        "/v2.0/ports",
        json={"port": {"network_id": network["id"], "fixed_ips": [{"ip_address": "10.9.0.5"}]}},
    )
    assert outside.status_code == 400 and "10.9.0.5" in outside.json()["NeutronError"]["message"]
    assert openstack.dump() == before  # refused writes leave nothing behind
    found = openstack.request("GET", "/v2.0/ports?fixed_ips=ip_address=10.0.0.50").json()["ports"]
    assert [p["id"] for p in found] == [pinned["id"]]
    moved = openstack.request(
        "PUT",
        f"/v2.0/ports/{pinned['id']}",
        json={"port": {"fixed_ips": [{"ip_address": "10.0.0.60"}]}},
    )
    assert moved.json()["port"]["fixed_ips"][0]["ip_address"] == "10.0.0.60"
    in_use = openstack.request("DELETE", f"/v2.0/subnets/{subnet['id']}")
    assert in_use.status_code == 409 and in_use.json()["NeutronError"]["type"] == "SubnetInUse"
    for p in (port, pinned):
        assert openstack.request("DELETE", f"/v2.0/ports/{p['id']}").status_code == 204
    assert openstack.request("DELETE", f"/v2.0/subnets/{subnet['id']}").status_code == 204
    overlapping = openstack.create(
        "subnets", "subnet", {"network_id": network["id"], "cidr": "10.0.0.0/25"}
    )
    assert overlapping["allocation_pools"] == [{"start": "10.0.0.2", "end": "10.0.0.126"}]


def test_router_interfaces(openstack: OpenStackApi) -> None:
    network, subnet = _network_with_subnet(openstack, "10.1.0.0/24")
    router = openstack.create("routers", "router", {"name": "r"})
    added = openstack.request(
        "PUT",
        f"/v2.0/routers/{router['id']}/add_router_interface",
        json={"subnet_id": subnet["id"]},
    )
    assert added.status_code == 200, added.text
    info = added.json()
    assert info["subnet_id"] == subnet["id"] and info["network_id"] == network["id"]
    port = openstack.show("ports", "port", info["port_id"])
    assert port["device_owner"] == "network:router_interface" and port["device_id"] == router["id"]
    assert port["fixed_ips"] == [{"subnet_id": subnet["id"], "ip_address": "10.1.0.1"}]
    router_ports = [p for p in _natives(openstack, "ports") if p["device_id"] == router["id"]]
    assert [p["addresses"] for p in router_ports] == [["10.1.0.1/24"]]
    before = openstack.dump()
    again = openstack.request(
        "PUT",
        f"/v2.0/routers/{router['id']}/add_router_interface",
        json={"subnet_id": subnet["id"]},
    )
    assert again.status_code == 400
    assert openstack.dump() == before
    assert openstack.request("DELETE", f"/v2.0/ports/{info['port_id']}").status_code == 409
    assert openstack.request("DELETE", f"/v2.0/routers/{router['id']}").status_code == 409
    removed = openstack.request(
        "PUT",
        f"/v2.0/routers/{router['id']}/remove_router_interface",
        json={"subnet_id": subnet["id"]},
    )
    assert removed.status_code == 200 and removed.json()["port_id"] == info["port_id"]
    assert openstack.request("GET", f"/v2.0/ports/{info['port_id']}").status_code == 404
    # By port: the port's address becomes the router's.
    own = openstack.create(
        "ports", "port", {"network_id": network["id"], "fixed_ips": [{"ip_address": "10.1.0.254"}]}
    )
    by_port = openstack.request(
        "PUT", f"/v2.0/routers/{router['id']}/add_router_interface", json={"port_id": own["id"]}
    )
    assert by_port.status_code == 200, by_port.text
    shown = openstack.show("ports", "port", own["id"])
    assert shown["device_owner"] == "network:router_interface"
    assert shown["fixed_ips"][0]["ip_address"] == "10.1.0.254"


def test_gateway_snat_and_floating_ips(openstack: OpenStackApi) -> None:
    admin = openstack.as_admin()
    external = admin.create("networks", "network", {"name": "public", "router:external": True})
    assert external["router:external"] is True
    ext_subnet = admin.create(
        "subnets",
        "subnet",
        {
            "network_id": external["id"],
            "cidr": "198.51.100.0/24",
            "allocation_pools": [{"start": "198.51.100.10", "end": "198.51.100.99"}],
        },
    )
    network, subnet = _network_with_subnet(openstack, "10.2.0.0/24")
    router = openstack.create(
        "routers", "router", {"name": "r", "external_gateway_info": {"network_id": external["id"]}}
    )
    gateway = router["external_gateway_info"]
    assert gateway["network_id"] == external["id"] and gateway["enable_snat"] is True
    assert gateway["external_fixed_ips"] == [
        {"subnet_id": ext_subnet["id"], "ip_address": "198.51.100.10"}
    ]
    openstack.request(
        "PUT",
        f"/v2.0/routers/{router['id']}/add_router_interface",
        json={"subnet_id": subnet["id"]},
    )
    native_router = _native(openstack, "routers", router["id"]).json()
    rules = [
        r
        for r in _natives(openstack, "rules")
        if r["chain_id"] == native_router["outbound_chain_id"]
    ]
    assert [(r["action"], r["nw_src"], r["nat_targets"][0]["address_from"]) for r in rules] == [
        ("snat", "10.2.0.0/24", "198.51.100.10")
    ]
    routes = [r for r in _natives(openstack, "routes") if r["router_id"] == router["id"]]
    assert [(r["dst_prefix"], r["next_hop_gateway"]) for r in routes] == [
        ("0.0.0.0/0", "198.51.100.1")
    ]
    no_snat = openstack.request(
        "PUT",
        f"/v2.0/routers/{router['id']}",
        json={
            "router": {
                "external_gateway_info": {"network_id": external["id"], "enable_snat": False}
            }
        },
    )
    assert (
        no_snat.status_code == 200
        and no_snat.json()["router"]["external_gateway_info"]["enable_snat"] is False
    )
    assert [r for r in _natives(openstack, "rules") if r["action"] == "snat"] == []
    kept = no_snat.json()["router"]["external_gateway_info"]["external_fixed_ips"]
    assert kept == gateway["external_fixed_ips"]  # same network again: same address

    vm = openstack.create("ports", "port", {"network_id": network["id"]})
    fip = openstack.create("floatingips", "floatingip", {"floating_network_id": external["id"]})
    assert fip["status"] == "DOWN" and fip["port_id"] is None
    associated = openstack.request(
        "PUT", f"/v2.0/floatingips/{fip['id']}", json={"floatingip": {"port_id": vm["id"]}}
    )
    assert associated.status_code == 200, associated.text
    body = associated.json()["floatingip"]
    assert (
        body["router_id"] == router["id"]
        and body["fixed_ip_address"] == vm["fixed_ips"][0]["ip_address"]
    )
    native = _native(openstack, "floating_ips", fip["id"]).json()
    assert (
        native["floating_ip_address"] == fip["floating_ip_address"]
        and native["router_id"] == router["id"]
    )
    busy = openstack.request(
        "PUT", f"/v2.0/routers/{router['id']}", json={"router": {"external_gateway_info": None}}
    )
    assert busy.status_code == 409
    released = openstack.request(
        "PUT", f"/v2.0/floatingips/{fip['id']}", json={"floatingip": {"port_id": None}}
    )
    assert released.json()["floatingip"]["port_id"] is None
    assert _native(openstack, "floating_ips", fip["id"]).status_code == 404
    again = openstack.request(
        "PUT", f"/v2.0/floatingips/{fip['id']}", json={"floatingip": {"port_id": vm["id"]}}
    )
    assert again.status_code == 200
    assert openstack.request("DELETE", f"/v2.0/ports/{vm['id']}").status_code == 204
    assert _native(openstack, "floating_ips", fip["id"]).status_code == 404  # disassociated
    assert openstack.show("floatingips", "floatingip", fip["id"])["port_id"] is None
    assert openstack.request("DELETE", f"/v2.0/floatingips/{fip['id']}").status_code == 204
    cleared = openstack.request(
        "PUT", f"/v2.0/routers/{router['id']}", json={"router": {"external_gateway_info": None}}
    )
    assert cleared.status_code == 200 and cleared.json()["router"]["external_gateway_info"] is None
    assert [r for r in _natives(openstack, "routes") if r["router_id"] == router["id"]] == []
    not_external = openstack.request(
        "PUT",
        f"/v2.0/routers/{router['id']}",
        json={"router": {"external_gateway_info": {"network_id": network["id"]}}},
    )
    assert (
        not_external.status_code == 400
        and "router:external" in not_external.json()["NeutronError"]["message"]
    )
