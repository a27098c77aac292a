"""The `/v1/tokens` project tokens on the Neutron and Octavia APIs: a member writes its
project, a reader only reads (403 naming the role on every write), the cluster admin sees
everything; the cluster admin's attributes (`shared`, `router:external`, host bindings) are
refused to project tokens; shared networks are read and attached to by every project and
changed only by their own; a revoked token stops working on the next request."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.openstack.conftest import OpenStackApi
from tests.integration.openstack.test_octavia import LBAAS, _routed_network


def _error(response: Any) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["NeutronError"]
    return error


def _fault(response: Any) -> str:
    message: str = response.json()["faultstring"]
    return message


def test_a_member_writes_its_project_and_sees_only_it(openstack: OpenStackApi) -> None:
    alpha = openstack.as_project("alpha")
    network = alpha.create("networks", "network", {"name": "a-net"})
    assert network["project_id"] == "alpha" and network["shared"] is False
    subnet = alpha.create("subnets", "subnet", {"network_id": network["id"], "cidr": "10.1.0.0/24"})
    port = alpha.create("ports", "port", {"network_id": network["id"]})
    assert port["project_id"] == "alpha"
    assert port["fixed_ips"][0]["subnet_id"] == subnet["id"]
    beta = openstack.as_project("beta")
    for path in (f"/v2.0/networks/{network['id']}", f"/v2.0/ports/{port['id']}"):
        assert beta.request("GET", path).status_code == 404
        assert beta.request("DELETE", path).status_code == 404
    assert beta.request("GET", "/v2.0/ports").json()["ports"] == []
    admin_ids = {
        n["id"] for n in openstack.as_admin().request("GET", "/v2.0/networks").json()["networks"]
    }
    assert network["id"] in admin_ids


def test_a_reader_reads_and_every_write_is_403(openstack: OpenStackApi) -> None:
    alpha = openstack.as_project("alpha")
    network = alpha.create("networks", "network", {"name": "n"})
    reader = openstack.as_project("alpha", "reader")
    assert reader.show("networks", "network", network["id"])["name"] == "n"
    listed = reader.request("GET", "/v2.0/networks").json()["networks"]
    assert [n["id"] for n in listed] == [network["id"]]
    before = openstack.dump()
    writes = [
        ("POST", "/v2.0/networks", {"network": {"name": "x"}}),
        ("PUT", f"/v2.0/networks/{network['id']}", {"network": {"name": "x"}}),
        ("DELETE", f"/v2.0/networks/{network['id']}", None),
        ("POST", "/v2.0/ports", {"port": {"network_id": network["id"]}}),
        ("PUT", f"/v2.0/networks/{network['id']}/tags/t", None),
        ("POST", f"{LBAAS}/loadbalancers", {"loadbalancer": {"vip_network_id": network["id"]}}),
        ("DELETE", f"{LBAAS}/pools/0d6f0f6e-0000-0000-0000-000000000000", None),
    ]
    for method, path, body in writes:
        response = reader.request(method, path, json=body)
        assert response.status_code == 403, (method, path, response.text)
        text = response.text
        assert "'reader' may only read" in text and "project alpha" in text, text
    assert openstack.dump() == before
    assert reader.request("GET", f"{LBAAS}/loadbalancers").status_code == 200


def test_project_tokens_may_not_set_the_cluster_admins_attributes(
    openstack: OpenStackApi,
) -> None:
    admin = openstack.as_admin()
    assert admin.request("POST", "/v1/hosts", json={"id": "hv1"}, headers={
        "Authorization": f"Bearer {openstack.admin_token}"}).status_code == 201  # fmt: skip
    alpha = openstack.as_project("alpha")
    network = alpha.create("networks", "network", {"name": "n"})
    before = openstack.dump()
    refused = [
        ("POST", "/v2.0/networks", {"network": {"shared": True}}, "shared"),
        ("POST", "/v2.0/networks", {"network": {"router:external": True}}, "router:external"),
        ("PUT", f"/v2.0/networks/{network['id']}", {"network": {"shared": True}}, "shared"),
        (
            "PUT",
            f"/v2.0/networks/{network['id']}",
            {"network": {"router:external": True}},
            "router:external",
        ),
        (
            "POST",
            "/v2.0/ports",
            {"port": {"network_id": network["id"], "binding:host_id": "hv1"}},
            "binding:host_id",
        ),
        (
            "POST",
            "/v2.0/ports",
            {"port": {"network_id": network["id"], "binding:profile": {"interface_name": "x"}}},
            "binding:profile",
        ),
    ]
    for method, path, body, attribute in refused:
        response = alpha.request(method, path, json=body)
        assert response.status_code == 403, (body, response.text)
        message = _error(response)["message"]
        assert message.startswith(f"{attribute}=") and "cluster admin" in message, message
    assert openstack.dump() == before
    # Saying what already holds is no change.
    same = alpha.request(
        "PUT", f"/v2.0/networks/{network['id']}", json={"network": {"shared": False}}
    )
    assert same.status_code == 200, same.text
    # The cluster admin (Nova, in OpenStack) binds the project's port.
    port = alpha.create("ports", "port", {"network_id": network["id"]})
    bound = admin.request(
        "PUT", f"/v2.0/ports/{port['id']}", json={"port": {"binding:host_id": "hv1"}}
    )
    assert bound.status_code == 200, bound.text
    assert bound.json()["port"]["binding:host_id"] == "hv1"
    assert bound.json()["port"]["project_id"] == "alpha"


def test_a_shared_network_is_read_and_attached_to_by_every_project(
    openstack: OpenStackApi,
) -> None:
    admin = openstack.as_admin()
    shared = admin.create("networks", "network", {"name": "common", "shared": True})
    assert shared["shared"] is True and shared["project_id"] == "admin"
    subnet = admin.create("subnets", "subnet", {"network_id": shared["id"], "cidr": "10.9.0.0/24"})
    private = admin.create("networks", "network", {"name": "private"})
    alpha = openstack.as_project("alpha")
    names = {n["name"] for n in alpha.request("GET", "/v2.0/networks").json()["networks"]}
    assert names == {"common"}
    assert alpha.show("networks", "network", shared["id"])["shared"] is True
    assert alpha.show("subnets", "subnet", subnet["id"])["cidr"] == "10.9.0.0/24"
    listed = alpha.request("GET", "/v2.0/subnets").json()["subnets"]
    assert [s["id"] for s in listed] == [subnet["id"]]
    port = alpha.create(
        "ports",
        "port",
        {"network_id": shared["id"], "fixed_ips": [{"subnet_id": subnet["id"]}]},
    )
    assert port["project_id"] == "alpha" and port["network_id"] == shared["id"]
    assert port["fixed_ips"][0]["ip_address"].startswith("10.9.0.")
    # The port is alpha's: alpha changes and sees it, beta does not even see it.
    renamed = alpha.request("PUT", f"/v2.0/ports/{port['id']}", json={"port": {"name": "vm"}})
    assert renamed.status_code == 200, renamed.text
    beta = openstack.as_project("beta")
    assert beta.request("GET", f"/v2.0/ports/{port['id']}").status_code == 404
    assert beta.request("GET", "/v2.0/ports").json()["ports"] == []
    # Nobody but its project changes the network or its subnets: 403, they can read them.
    before = openstack.dump()
    for method, path, body in (
        ("PUT", f"/v2.0/networks/{shared['id']}", {"network": {"name": "mine"}}),
        ("DELETE", f"/v2.0/networks/{shared['id']}", None),
        ("PUT", f"/v2.0/subnets/{subnet['id']}", {"subnet": {"name": "mine"}}),
        ("DELETE", f"/v2.0/subnets/{subnet['id']}", None),
        ("POST", "/v2.0/subnets", {"subnet": {"network_id": shared["id"], "cidr": "10.8.0.0/24"}}),
    ):
        response = alpha.request(method, path, json=body)
        assert response.status_code == 403, (method, path, response.text)
        assert "shared by another project" in _error(response)["message"]
    # The private network stays invisible: 404, as if it did not exist.
    assert alpha.request("GET", f"/v2.0/networks/{private['id']}").status_code == 404
    missing = alpha.request("POST", "/v2.0/ports", json={"port": {"network_id": private["id"]}})
    assert missing.status_code == 404 and _error(missing)["type"] == "NetworkNotFound"
    assert openstack.dump() == before
    # Its owner cannot delete it while other projects' ports are on it.
    in_use = admin.request("DELETE", f"/v2.0/networks/{shared['id']}")
    assert in_use.status_code == 409 and _error(in_use)["type"] == "NetworkInUse"
    assert alpha.request("DELETE", f"/v2.0/ports/{port['id']}").status_code == 204
    # Unsharing takes it out of other projects' sight.
    unshared = admin.request(
        "PUT", f"/v2.0/networks/{shared['id']}", json={"network": {"shared": False}}
    )
    assert unshared.status_code == 200 and unshared.json()["network"]["shared"] is False
    assert alpha.request("GET", f"/v2.0/networks/{shared['id']}").status_code == 404
    assert alpha.request("GET", f"/v2.0/subnets/{subnet['id']}").status_code == 404


def test_external_networks_keep_their_behaviour(openstack: OpenStackApi) -> None:
    """Readable by every project, usable for gateways and floating IPs, no foreign ports."""
    admin = openstack.as_admin()
    public = admin.create("networks", "network", {"name": "public", "router:external": True})
    admin.create("subnets", "subnet", {"network_id": public["id"], "cidr": "203.0.113.0/24"})
    alpha = openstack.as_project("alpha")
    assert alpha.show("networks", "network", public["id"])["router:external"] is True
    refused = alpha.request("POST", "/v2.0/ports", json={"port": {"network_id": public["id"]}})
    assert refused.status_code == 404
    changed = alpha.request(
        "PUT", f"/v2.0/networks/{public['id']}", json={"network": {"name": "x"}}
    )
    assert changed.status_code == 403


def test_octavia_on_project_tokens(openstack: OpenStackApi) -> None:
    alpha = openstack.as_project("alpha")
    _network, subnet_id, _router = _routed_network(alpha)
    created = alpha.request(
        "POST", f"{LBAAS}/loadbalancers", json={"loadbalancer": {"vip_subnet_id": subnet_id}}
    )
    assert created.status_code == 201, created.text
    lb = created.json()["loadbalancer"]
    assert lb["project_id"] == "alpha"
    beta = openstack.as_project("beta")
    assert beta.request("GET", f"{LBAAS}/loadbalancers/{lb['id']}").status_code == 404
    assert beta.request("GET", f"{LBAAS}/loadbalancers").json()["loadbalancers"] == []
    stolen = beta.request(
        "POST", f"{LBAAS}/loadbalancers", json={"loadbalancer": {"vip_subnet_id": subnet_id}}
    )
    assert stolen.status_code == 404, stolen.text
    reader = openstack.as_project("alpha", "reader")
    assert reader.request("GET", f"{LBAAS}/loadbalancers/{lb['id']}").status_code == 200
    refused = reader.request("DELETE", f"{LBAAS}/loadbalancers/{lb['id']}")
    assert refused.status_code == 403 and "may only read" in _fault(refused)
    admin = openstack.as_admin()
    assert admin.request("GET", f"{LBAAS}/loadbalancers/{lb['id']}").status_code == 200


@pytest.mark.parametrize("api", ["/v2.0/networks", f"{LBAAS}/loadbalancers"])
def test_a_revoked_or_expired_token_is_refused_at_once(openstack: OpenStackApi, api: str) -> None:
    secret = openstack.issue("alpha")
    user = openstack.as_token(secret)
    assert user.request("GET", api).status_code == 200
    auth = {"Authorization": f"Bearer {openstack.admin_token}"}
    tokens = openstack.client.get("/v1/tokens", headers=auth).json()["items"]
    for token in tokens:
        assert openstack.client.delete(f"/v1/tokens/{token['id']}", headers=auth).status_code == 204
    assert user.request("GET", api).status_code == 401
