"""Octavia v2 over HTTP: load balancers on the router of their VIP network, listeners, pools
(with the listener's default pool set in the same write), members, health monitors, the
status tree and stats, algorithm mapping and what is refused."""

from __future__ import annotations

from typing import Any

from hivenet.model import LoadBalancerStats
from hivenet.store.keys import host_alive_key, lb_stats_key
from tests.integration.openstack.conftest import OpenStackApi

LBAAS = "/v2.0/lbaas"


def _fault(response: Any) -> str:
    body = response.json()
    assert body["faultcode"] == "Client", body
    message: str = body["faultstring"]
    return message


def _routed_network(openstack: OpenStackApi) -> tuple[str, str, str]:
    """(network, subnet, router): a 10.0.0.0/24 network with an interface on a router."""
    network = openstack.create("networks", "network", {"name": "web"})
    subnet = openstack.create(
        "subnets", "subnet", {"network_id": network["id"], "cidr": "10.0.0.0/24"}
    )
    router = openstack.create("routers", "router", {"name": "r"})
    added = openstack.request(
        "PUT",
        f"/v2.0/routers/{router['id']}/add_router_interface",
        json={"subnet_id": subnet["id"]},
    )
    assert added.status_code == 200, added.text
    return network["id"], subnet["id"], router["id"]


def _create(openstack: OpenStackApi, path: str, member: str, body: dict[str, Any]) -> Any:
    response = openstack.request("POST", f"{LBAAS}/{path}", json={member: body})
    assert response.status_code == 201, response.text
    return response.json()[member]


def test_a_load_balancer_end_to_end(openstack: OpenStackApi) -> None:
    network_id, subnet_id, router_id = _routed_network(openstack)
    lb = _create(
        openstack, "loadbalancers", "loadbalancer", {"name": "lb1", "vip_subnet_id": subnet_id}
    )
    assert lb["vip_network_id"] == network_id and lb["provisioning_status"] == "ACTIVE"
    vip_port = openstack.show("ports", "port", lb["vip_port_id"])
    assert vip_port["fixed_ips"] == [{"subnet_id": subnet_id, "ip_address": lb["vip_address"]}]
    pinned = _create(
        openstack,
        "loadbalancers",
        "loadbalancer",
        {"vip_network_id": network_id, "vip_address": "10.0.0.100"},
    )
    assert pinned["vip_address"] == "10.0.0.100" and pinned["vip_subnet_id"] is None
    listener = _create(
        openstack,
        "listeners",
        "listener",
        {"loadbalancer_id": lb["id"], "protocol": "TCP", "protocol_port": 80, "name": "l1"},
    )
    pool = _create(
        openstack,
        "pools",
        "pool",
        {"listener_id": listener["id"], "protocol": "TCP", "lb_algorithm": "SOURCE_IP_PORT"},
    )
    assert pool["lb_algorithm"] == "SOURCE_IP_PORT"
    assert pool["listeners"] == [{"id": listener["id"]}]
    shown = openstack.request("GET", f"{LBAAS}/listeners/{listener['id']}").json()["listener"]
    assert shown["default_pool_id"] == pool["id"]
    members = [
        _create(
            openstack,
            f"pools/{pool['id']}/members",
            "member",
            {"address": address, "protocol_port": 8080},
        )
        for address in ("10.0.0.11", "10.0.0.12")
    ]
    monitor = _create(
        openstack,
        "healthmonitors",
        "healthmonitor",
        {
            "pool_id": pool["id"],
            "type": "HTTP",
            "delay": 5,
            "timeout": 3,
            "max_retries": 2,
            "url_path": "/health",
        },
    )
    assert monitor["http_method"] == "GET" and monitor["expected_codes"] == "200"

    auth = {"Authorization": f"Bearer {openstack.admin_token}"}
    native_lb = openstack.client.get(f"/v1/load_balancers/{lb['id']}", headers=auth).json()
    assert native_lb["router_id"] == router_id
    native_pool = openstack.client.get(f"/v1/pools/{pool['id']}", headers=auth).json()
    assert native_pool["algorithm"] == "maglev"

    tree = openstack.request("GET", f"{LBAAS}/loadbalancers/{lb['id']}/status").json()
    (tree_listener,) = tree["statuses"]["loadbalancer"]["listeners"]
    (tree_pool,) = tree_listener["pools"]
    assert {m["id"] for m in tree_pool["members"]} == {m["id"] for m in members}
    assert tree_pool["health_monitor"]["id"] == monitor["id"]

    # Agents' reports: one live host reports counters.
    openstack.put_key(host_alive_key("hv1"), b"{}")
    openstack.client.post("/v1/hosts", json={"id": "hv1"}, headers=auth)
    report = {
        "load_balancer": LoadBalancerStats(
            active_connections=3, total_connections=7, bytes_in=10, bytes_out=20
        ).model_dump()
    }
    import json

    openstack.put_key(lb_stats_key("hv1", lb["id"]), json.dumps(report).encode())
    stats = openstack.request("GET", f"{LBAAS}/loadbalancers/{lb['id']}/stats").json()["stats"]
    assert stats["active_connections"] == 3 and stats["total_connections"] == 7

    listed = openstack.request(
        "GET", f"{LBAAS}/pools/{pool['id']}/members?address=10.0.0.12"
    ).json()
    assert [m["address"] for m in listed["members"]] == ["10.0.0.12"]
    in_use = openstack.request("DELETE", f"{LBAAS}/loadbalancers/{lb['id']}")
    assert in_use.status_code == 409
    gone = openstack.request("DELETE", f"{LBAAS}/loadbalancers/{lb['id']}?cascade=true")
    assert gone.status_code == 204
    assert openstack.request("GET", f"/v2.0/ports/{lb['vip_port_id']}").status_code == 404
    for path in (
        f"listeners/{listener['id']}",
        f"pools/{pool['id']}",
        f"healthmonitors/{monitor['id']}",
    ):
        assert openstack.request("GET", f"{LBAAS}/{path}").status_code == 404


def test_refusals_name_the_field(openstack: OpenStackApi) -> None:
    network_id, _subnet, _router = _routed_network(openstack)
    lonely = openstack.create("networks", "network", {"name": "no-router"})
    lonely_subnet = openstack.create(
        "subnets", "subnet", {"network_id": lonely["id"], "cidr": "10.1.0.0/24"}
    )
    before = openstack.dump()
    no_router = openstack.request(
        "POST",
        f"{LBAAS}/loadbalancers",
        json={"loadbalancer": {"vip_subnet_id": lonely_subnet["id"]}},
    )
    assert no_router.status_code == 400 and "router" in _fault(no_router)
    assert openstack.dump() == before  # the VIP port allocated before the refusal is not kept
    lb = _create(
        openstack,
        "loadbalancers",
        "loadbalancer",
        {"vip_network_id": network_id, "vip_address": "10.0.0.100"},
    )
    http = openstack.request(
        "POST",
        f"{LBAAS}/listeners",
        json={"listener": {"loadbalancer_id": lb["id"], "protocol": "HTTP", "protocol_port": 80}},
    )
    assert http.status_code == 400 and "HTTP" in _fault(http)
    least = openstack.request(
        "POST",
        f"{LBAAS}/pools",
        json={
            "pool": {
                "loadbalancer_id": lb["id"],
                "protocol": "TCP",
                "lb_algorithm": "LEAST_CONNECTIONS",
            }
        },
    )
    assert least.status_code == 400 and "LEAST_CONNECTIONS" in _fault(least)
    cookie = openstack.request(
        "POST",
        f"{LBAAS}/pools",
        json={
            "pool": {
                "loadbalancer_id": lb["id"],
                "protocol": "TCP",
                "lb_algorithm": "ROUND_ROBIN",
                "session_persistence": {"type": "HTTP_COOKIE"},
            }
        },
    )
    assert cookie.status_code == 400 and "HTTP_COOKIE" in _fault(cookie)
    unknown = openstack.request(
        "POST", f"{LBAAS}/pools", json={"pool": {"loadbalancer_id": lb["id"], "colour": 1}}
    )
    assert unknown.status_code == 400 and "colour" in _fault(unknown)
    pool = _create(
        openstack,
        "pools",
        "pool",
        {
            "loadbalancer_id": lb["id"],
            "protocol": "UDP",
            "lb_algorithm": "SOURCE_IP",
            "session_persistence": {"type": "SOURCE_IP"},
        },
    )
    assert pool["session_persistence"]["type"] == "SOURCE_IP"
    http_check = openstack.request(
        "POST",
        f"{LBAAS}/healthmonitors",
        json={
            "healthmonitor": {
                "pool_id": pool["id"],
                "type": "HTTP",
                "delay": 5,
                "timeout": 3,
                "max_retries": 2,
            }
        },
    )
    assert http_check.status_code == 400 and "type" in _fault(http_check)
    v6_member = openstack.request(
        "POST",
        f"{LBAAS}/pools/{pool['id']}/members",
        json={"member": {"address": "2001:db8::1", "protocol_port": 53}},
    )
    assert v6_member.status_code == 400 and "address" in _fault(v6_member)
    missing = openstack.request("GET", f"{LBAAS}/loadbalancers/nope")
    assert missing.status_code == 404 and "x-openstack-request-id" in missing.headers
    other = openstack.as_project("alpha").request("GET", f"{LBAAS}/loadbalancers/{lb['id']}")
    assert other.status_code == 404
