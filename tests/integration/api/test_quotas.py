"""`/v1/quotas/{project}` and quotas through the /v1 and Neutron APIs: the cluster admin
reads, sets and resets; a project reads its own only; a create past the quota is a 409
naming the kind, the project, the limit and the usage, whoever makes it; a delete frees it."""

from __future__ import annotations

from hivenet.store.quota import DEFAULT_QUOTAS
from tests.integration.api.conftest import Api
from tests.integration.api.tenants import Caller, issue


def test_the_admin_reads_sets_and_resets_a_projects_quotas(api: Api) -> None:
    shown = api.request("GET", "/v1/quotas/acme")
    assert shown.status_code == 200, shown.text
    assert shown.json() == {
        "project": "acme",
        "quotas": dict(DEFAULT_QUOTAS),
        "usage": dict.fromkeys(DEFAULT_QUOTAS, 0),
    }
    changed = api.request("PUT", "/v1/quotas/acme", json={"router": 1, "port": -1})
    assert changed.status_code == 200, changed.text
    assert changed.json()["quotas"] == {**DEFAULT_QUOTAS, "router": 1, "port": -1}
    # Kinds left out keep their limits.
    again = api.request("PUT", "/v1/quotas/acme", json={"bridge": 3})
    assert again.json()["quotas"] == {**DEFAULT_QUOTAS, "router": 1, "port": -1, "bridge": 3}
    assert api.request("DELETE", "/v1/quotas/acme").status_code == 204
    assert api.request("GET", "/v1/quotas/acme").json()["quotas"] == dict(DEFAULT_QUOTAS)


def test_bad_quota_bodies_name_the_field(api: Api) -> None:
    for body, field in (
        ({"host": 3}, "host"),
        ({"router": -2}, "router"),
        ({"port": "x"}, "port"),
    ):
        response = api.request("PUT", "/v1/quotas/acme", json=body)
        assert response.status_code == 422, response.text
        assert [d["field"] for d in response.json()["error"]["details"]] == [field]
    assert api.request("GET", "/v1/quotas/acme").json()["quotas"] == dict(DEFAULT_QUOTAS)


def test_a_project_reads_its_own_quotas_only_and_changes_none(api: Api) -> None:
    member = issue(api, "acme", "admin")  # even a project admin
    assert member.request("GET", "/v1/quotas/acme").status_code == 200
    other = member.request("GET", "/v1/quotas/globex")
    assert other.status_code == 403 and "globex" in other.json()["error"]["message"]
    for method, body in (("PUT", {"router": 1000}), ("DELETE", None)):
        refused = member.request(method, "/v1/quotas/acme", json=body)
        assert refused.status_code == 403, refused.text
        assert "only the cluster admin" in refused.json()["error"]["message"]
    assert api.request("GET", "/v1/quotas/acme").json()["quotas"] == dict(DEFAULT_QUOTAS)


def test_no_token_is_issued_for_the_admins_own_tenant(api: Api) -> None:
    response = api.request("POST", "/v1/tokens", json={"project": "admin", "role": "member"})
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "project"


def _over_quota(response: object, kind: str, limit: int, usage: int) -> None:
    assert response.status_code == 409, response.text  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    assert f"project acme may hold {limit} {kind} objects and holds {usage}" in error["message"]
    assert error["details"] == [
        {
            "field": kind,
            "value": usage,
            "project": "acme",
            "limit": limit,
            "message": f"over quota: limit {limit}, in use {usage}",
        }
    ]


def test_over_quota_is_a_409_for_the_member_and_the_admin_in_its_name(api: Api) -> None:
    member: Caller = issue(api, "acme", "member")
    api.request("PUT", "/v1/quotas/acme", json={"bridge": 2})
    first = member.create("bridges", {"name": "one"})
    api.create("bridges", {"name": "two", "tenant_id": "acme"})
    before = api.dump()
    _over_quota(member.request("POST", "/v1/bridges", json={}), "bridge", 2, 2)
    _over_quota(api.post("/v1/bridges", {"tenant_id": "acme"}), "bridge", 2, 2)
    assert api.dump() == before
    # The admin's own objects have no quota.
    for _ in range(3):
        api.create("bridges", {})
    usage = member.request("GET", "/v1/quotas/acme").json()["usage"]
    assert usage["bridge"] == 2
    assert member.request("DELETE", f"/v1/bridges/{first['id']}").status_code == 204
    member.create("bridges", {"name": "three"})
    api.assert_consistent()


def test_neutron_over_quota_and_quota_api(api: Api) -> None:
    admin = {"X-Auth-Token": api.token}
    put = api.client.put(
        "/v2.0/quotas/acme", json={"quota": {"network": 1, "router": 0}}, headers=admin
    )
    assert put.status_code == 200, put.text
    assert put.json()["quota"]["network"] == 1 and put.json()["quota"]["router"] == 0
    created = api.client.post(
        "/v2.0/networks", json={"network": {"name": "n", "project_id": "acme"}}, headers=admin
    )
    assert created.status_code == 201, created.text
    refused = api.client.post(
        "/v2.0/networks", json={"network": {"name": "m", "project_id": "acme"}}, headers=admin
    )
    assert refused.status_code == 409, refused.text
    error = refused.json()["NeutronError"]
    assert error["type"] == "OverQuota"
    assert "['network']" in error["message"] and "may hold 1 and holds 1" in error["message"]

    for path in ("/v2.0/quotas/acme/details", "/v2.0/quotas/acme/details.json"):
        details = api.client.get(path, headers=admin).json()["quota"]
        assert details["network"] == {"limit": 1, "used": 1, "reserved": 0}
        assert details["port"] == {"limit": 500, "used": 0, "reserved": 0}
    default = api.client.get("/v2.0/quotas/acme/default", headers=admin).json()["quota"]
    assert default["network"] == 100
    # check_limit (what `openstack quota set` sends) refuses a limit below the usage ...
    below = api.client.put(
        "/v2.0/quotas/acme", json={"quota": {"network": 0, "check_limit": True}}, headers=admin
    )
    assert below.status_code == 400 and "below the current usage 1" in below.text
    # ... force sets it: nothing is deleted.
    forced = api.client.put(
        "/v2.0/quotas/acme", json={"quota": {"network": 0, "force": True}}, headers=admin
    )
    assert forced.status_code == 200 and forced.json()["quota"]["network"] == 0
    networks = api.client.get("/v2.0/networks", headers=admin).json()["networks"]
    assert [n["name"] for n in networks if n["project_id"] == "acme"] == ["n"]
    unknown = api.client.put("/v2.0/quotas/acme", json={"quota": {"subnetpool": 5}}, headers=admin)
    assert unknown.status_code == 400 and "subnetpool" in unknown.text
    assert api.client.delete("/v2.0/quotas/acme", headers=admin).status_code == 204
    shown = api.client.get("/v2.0/quotas/acme", headers=admin).json()["quota"]
    assert shown["network"] == 100 and shown["project_id"] == "acme"


def test_every_counted_kind_is_held_to_its_quota_on_v1(api: Api) -> None:
    """Chains, rules, routes, address groups and the load-balancer kinds: one each at a
    limit of 1, the second is a 409 naming the kind, and nothing is written."""
    kinds = [
        "chain", "rule", "route", "ip_addr_group", "port_group",
        "load_balancer", "listener", "pool", "member", "health_monitor",
    ]  # fmt: skip
    api.request("PUT", "/v1/quotas/acme", json=dict.fromkeys(kinds, 1))
    member: Caller = issue(api, "acme", "member")
    router = member.create("routers", {"name": "r"})
    chain = member.create("chains", {"name": "c"})
    lb = member.create("load_balancers", {"router_id": router["id"]})
    pool = member.create("pools", {"load_balancer_id": lb["id"]})
    bodies = {
        "chain": {"name": "c2"},
        "rule": {"chain_id": chain["id"], "action": "drop"},
        "route": {"router_id": router["id"], "dst_prefix": "10.0.0.0/8", "type": "blackhole"},
        "ip_addr_group": {},
        "port_group": {},
        "load_balancer": {"router_id": router["id"]},
        "listener": {"load_balancer_id": lb["id"], "vip_address": "10.0.0.5", "protocol_port": 80},
        "pool": {"load_balancer_id": lb["id"]},
        "member": {"pool_id": pool["id"], "address": "10.0.1.5", "protocol_port": 80},
        "health_monitor": {"pool_id": pool["id"], "type": "tcp"},
    }
    for kind in ("rule", "route", "ip_addr_group", "port_group", "listener", "member",
                 "health_monitor"):  # fmt: skip
        member.create(f"{kind}s", bodies[kind])
    before = api.dump()
    for kind in kinds:
        _over_quota(member.request("POST", f"/v1/{kind}s", json=bodies[kind]), kind, 1, 1)
    assert api.dump() == before
    usage = member.request("GET", "/v1/quotas/acme").json()["usage"]
    assert {kind: usage[kind] for kind in kinds} == dict.fromkeys(kinds, 1)
    api.assert_consistent()


def test_octavia_and_neutron_l3_creates_are_held_to_the_same_quotas(api: Api) -> None:
    admin = {"X-Auth-Token": api.token}
    project = {"X-Auth-Token": issue(api, "acme", "member").token}

    def post(path: str, member: str, body: dict[str, object]) -> dict[str, object]:
        response = api.client.post(path, json={member: body}, headers=project)
        assert response.status_code == 201, response.text
        created: dict[str, object] = response.json()[member]
        return created

    network = post("/v2.0/networks", "network", {"name": "web"})
    subnet = post("/v2.0/subnets", "subnet", {"network_id": network["id"], "cidr": "10.0.0.0/24"})
    router = post("/v2.0/routers", "router", {"name": "r"})
    added = api.client.put(
        f"/v2.0/routers/{router['id']}/add_router_interface",
        json={"subnet_id": subnet["id"]},
        headers=project,
    )
    assert added.status_code == 200, added.text
    limits = {"load_balancer": 1, "pool": 1, "member": 1, "chain": 0}
    assert api.request("PUT", "/v1/quotas/acme", json=limits).status_code == 200
    lb = post("/v2.0/lbaas/loadbalancers", "loadbalancer", {"vip_subnet_id": subnet["id"]})
    pool = post(
        "/v2.0/lbaas/pools",
        "pool",
        {"loadbalancer_id": lb["id"], "protocol": "TCP", "lb_algorithm": "ROUND_ROBIN"},
    )
    member_body = {"address": "10.0.0.20", "protocol_port": 80}
    post(f"/v2.0/lbaas/pools/{pool['id']}/members", "member", member_body)
    before = api.dump()
    for path, member, body, kind in (
        ("/v2.0/lbaas/loadbalancers", "loadbalancer", {"vip_subnet_id": subnet["id"]}, "load_balancer"),
        ("/v2.0/lbaas/pools", "pool", {"loadbalancer_id": lb["id"], "protocol": "TCP",
                                       "lb_algorithm": "ROUND_ROBIN"}, "pool"),
        (f"/v2.0/lbaas/pools/{pool['id']}/members", "member",
         {"address": "10.0.0.21", "protocol_port": 80}, "member"),
    ):  # fmt: skip
        refused = api.client.post(path, json={member: body}, headers=project)
        assert refused.status_code == 403, refused.text  # Octavia's status for a quota
        assert f"['{kind}']" in refused.json()["faultstring"], refused.text
        assert "may hold 1 and holds 1" in refused.json()["faultstring"]
    # A Neutron gateway needs the router's NAT chains: past the chain quota, nothing is set.
    external = api.client.post(
        "/v2.0/networks", json={"network": {"name": "pub", "router:external": True}}, headers=admin
    ).json()["network"]
    api.client.post(
        "/v2.0/subnets",
        json={"subnet": {"network_id": external["id"], "cidr": "203.0.113.0/24"}},
        headers=admin,
    )
    before = api.dump()
    gateway = api.client.put(
        f"/v2.0/routers/{router['id']}",
        json={"router": {"external_gateway_info": {"network_id": external["id"]}}},
        headers=project,
    )
    assert gateway.status_code == 409, gateway.text
    error = gateway.json()["NeutronError"]
    assert error["type"] == "OverQuota" and "['chain']" in error["message"]
    assert api.dump() == before
    api.assert_consistent()
