"""Issue 15, the API tenancy rules: project tokens (hashed, revocable on every server),
roles, infrastructure for the cluster admin only, and references checked for the caller's
project in the write's own store txn (another project's object looks exactly missing)."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import pytest

import hivenet.api.tokens as tokens_module
from tests.integration.api.conftest import Api
from tests.integration.api.tenants import Caller, issue

# ---- tokens


def test_a_token_is_shown_once_and_stored_only_as_its_hash(api: Api) -> None:
    response = api.post("/v1/tokens", {"project": "acme", "role": "member", "name": "ci"})
    assert response.status_code == 201, response.text
    created = response.json()
    secret = created["secret"]
    assert len(secret) >= 43 and created["project"] == "acme" and created["role"] == "member"
    assert response.headers["Location"] == f"/v1/tokens/{created['id']}"
    listed = api.request("GET", "/v1/tokens").json()["items"]
    assert [t["id"] for t in listed] == [created["id"]]
    assert "secret" not in listed[0]
    _, kvs = api.dump()
    hashed = hashlib.sha256(secret.encode()).hexdigest()
    assert [kv.key for kv in kvs if kv.key.startswith("/hivenet/v1/auth/")] == [
        f"/hivenet/v1/auth/tokens/{hashed}"
    ]
    assert not any(secret.encode() in kv.value or secret in kv.key for kv in kvs)
    # It works, for its project.
    Caller(api, secret).create("bridges", {"name": "b"})


def test_a_revoked_token_is_refused_on_the_next_request_of_every_server(
    two_servers: tuple[Api, Api],
) -> None:
    first, second = two_servers
    member = issue(first, "acme", "member")
    on_second = Caller(second, member.token)
    assert on_second.request("GET", "/v1/bridges").status_code == 200
    token_id = first.request("GET", "/v1/tokens").json()["items"][0]["id"]
    assert first.request("DELETE", f"/v1/tokens/{token_id}").status_code == 204
    for caller in (member, on_second):
        response = caller.request("GET", "/v1/bridges")
        assert response.status_code == 401, response.text
        assert response.json()["error"]["message"] == "invalid bearer token"
    assert first.request("DELETE", f"/v1/tokens/{token_id}").status_code == 404


def test_an_expired_token_is_refused(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    member = issue(api, "acme", "member", expires_at=soon.isoformat())
    assert member.request("GET", "/v1/bridges").status_code == 200
    monkeypatch.setattr(tokens_module, "_now", lambda: soon + dt.timedelta(seconds=1))
    response = member.request("GET", "/v1/bridges")
    assert response.status_code == 401
    assert "expired" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"project": "acme", "role": "owner"}, "role"),
        ({"project": "", "role": "member"}, "project"),
        ({"project": "acme", "role": "member", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"project": "acme", "role": "member", "expires_at": "2999-01-01T00:00:00"}, "expires_at"),
        ({"project": "acme", "role": "member", "secret": "mine"}, "secret"),
    ],
)
def test_bad_token_requests_name_the_field(api: Api, body: dict[str, Any], field: str) -> None:
    before = api.dump()
    response = api.post("/v1/tokens", body)
    assert response.status_code == 422, response.text
    assert field in response.text
    assert api.dump() == before


def test_who_may_issue_list_and_revoke(api: Api) -> None:
    acme_admin = issue(api, "acme", "admin")
    # A project admin issues any role of its own project, including admin.
    acme_member = issue(api, "acme", "member", by=acme_admin.token)
    acme_reader = issue(api, "acme", "reader", by=acme_admin.token)
    issue(api, "acme", "admin", by=acme_admin.token)
    other_admin = issue(api, "globex", "admin")
    refused = acme_admin.request("POST", "/v1/tokens", json={"project": "globex", "role": "reader"})
    assert refused.status_code == 403
    assert refused.json()["error"]["details"][0]["field"] == "project"
    for caller, role in ((acme_member, "member"), (acme_reader, "reader")):
        for method, url, body in (
            ("POST", "/v1/tokens", {"project": "acme", "role": "reader"}),
            ("GET", "/v1/tokens", None),
        ):
            response = caller.request(method, url, json=body)
            assert response.status_code == 403, response.text
            assert f"role {role!r}" in response.json()["error"]["message"]
    # A project admin lists and revokes its own project's tokens only.
    acme_ids = {t["id"] for t in acme_admin.request("GET", "/v1/tokens").json()["items"]}
    assert len(acme_ids) == 4
    all_tokens = api.request("GET", "/v1/tokens").json()["items"]
    (globex_id,) = [t["id"] for t in all_tokens if t["project"] == "globex"]
    assert acme_admin.request("DELETE", f"/v1/tokens/{globex_id}").status_code == 404
    assert other_admin.request("GET", "/v1/bridges").status_code == 200
    member_id = next(
        t["id"] for t in all_tokens if t["project"] == "acme" and t["role"] == "member"
    )
    assert acme_admin.request("DELETE", f"/v1/tokens/{member_id}").status_code == 204
    assert acme_member.request("GET", "/v1/bridges").status_code == 401


# ---- roles


def test_a_reader_may_only_read(api: Api) -> None:
    bridge = api.create("bridges", {"name": "b", "tenant_id": "acme"})
    reader = issue(api, "acme", "reader")
    assert reader.request("GET", f"/v1/bridges/{bridge['id']}").status_code == 200
    assert [b["id"] for b in reader.request("GET", "/v1/bridges").json()["items"]] == [bridge["id"]]
    before = api.dump()
    for method, url, body in (
        ("POST", "/v1/bridges", {"name": "x"}),
        ("PATCH", f"/v1/bridges/{bridge['id']}", {"name": "x"}),
        ("PUT", f"/v1/bridges/{bridge['id']}", {"name": "x"}),
        ("DELETE", f"/v1/bridges/{bridge['id']}", None),
    ):
        response = reader.request(method, url, json=body)
        assert response.status_code == 403, (method, response.text)
        assert "role 'reader' may only read" in response.json()["error"]["message"]
    assert api.dump() == before


def test_a_member_writes_its_project_and_cannot_see_others(api: Api) -> None:
    member = issue(api, "acme", "member")
    theirs = api.create("bridges", {"name": "theirs", "tenant_id": "globex"})
    mine = member.create("bridges", {"name": "mine"})
    assert mine["tenant_id"] == "acme"
    assert [b["id"] for b in member.request("GET", "/v1/bridges").json()["items"]] == [mine["id"]]
    before = api.dump()
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        body = {"name": "x"} if method in ("PATCH", "PUT") else None
        response = member.request(method, f"/v1/bridges/{theirs['id']}", json=body)
        assert response.status_code == 404, (method, response.text)
    response = member.request("POST", "/v1/bridges", json={"name": "x", "tenant_id": "globex"})
    assert response.status_code == 403
    assert api.dump() == before
    assert member.request("DELETE", f"/v1/bridges/{mine['id']}").status_code == 204


# ---- infrastructure


def test_infrastructure_is_for_the_cluster_admin_only(api: Api) -> None:
    host = api.create("hosts", {"name": "h1"})
    zone = api.create("tunnel_zones", {"name": "z"})
    acme_admin = issue(api, "acme", "admin")
    bridge = acme_admin.create("bridges", {"name": "b"})
    port = acme_admin.create("ports", {"device_kind": "bridge", "device_id": bridge["id"]})
    before = api.dump()
    refusals: list[tuple[str, str, dict[str, Any] | None, str]] = [
        ("POST", "/v1/hosts", {"name": "h2"}, "kind"),
        ("PATCH", f"/v1/hosts/{host['id']}", {"name": "h"}, "kind"),
        ("DELETE", f"/v1/tunnel_zones/{zone['id']}", None, "kind"),
        ("POST", "/v1/tunnel_zones", {"name": "z2"}, "kind"),
        (
            "POST",
            "/v1/ports",
            {
                "device_kind": "bridge",
                "device_id": bridge["id"],
                "host_id": host["id"],
                "interface_name": "tap1",
            },
            "host_id",
        ),
        (
            "PATCH",
            f"/v1/ports/{port['id']}",
            {"host_id": host["id"], "interface_name": "tap1"},
            "host_id",
        ),
        ("PATCH", f"/v1/bridges/{bridge['id']}", {"shared": True}, "shared"),
        ("POST", "/v1/bridges", {"name": "s", "shared": True}, "shared"),
        (  # the L2 gateway: joining an external VTEP is the admin's
            "POST",
            "/v1/ports",
            {
                "device_kind": "bridge",
                "device_id": bridge["id"],
                "vtep_ip": "192.0.2.200",
                "vtep_vni": 5000,
            },
            "vtep_ip",
        ),
    ]
    for method, url, body, field in refusals:
        response = acme_admin.request(method, url, json=body)
        assert response.status_code == 403, (method, url, response.text)
        error = response.json()["error"]
        assert error["details"][0]["field"] == field
        assert field in error["message"] or "infrastructure" in error["message"]
    assert api.dump() == before
    # The cluster admin binds the tenant's port; the tenant keeps the binding when it
    # changes other fields, and may not change it.
    bound = api.request(
        "PATCH", f"/v1/ports/{port['id']}", json={"host_id": host["id"], "interface_name": "t1"}
    )
    assert bound.status_code == 200, bound.text
    renamed = acme_admin.request("PATCH", f"/v1/ports/{port['id']}", json={"name": "vm1"})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["host_id"] == host["id"]
    moved = acme_admin.request("PATCH", f"/v1/ports/{port['id']}", json={"interface_name": "t2"})
    assert moved.status_code == 403
    assert moved.json()["error"]["details"][0]["field"] == "interface_name"


# ---- references


def _without_ids(response: Any, *ids: str) -> tuple[int, str]:
    text = response.text
    for number, object_id in enumerate(ids):
        text = text.replace(object_id, f"<id{number}>")
    return response.status_code, text


def test_a_reference_to_another_projects_object_looks_missing(api: Api) -> None:
    member = issue(api, "acme", "member")
    theirs = api.create("bridges", {"name": "theirs", "tenant_id": "globex"})
    their_chain = api.create("chains", {"name": "c", "tenant_id": "globex"})
    missing = "0b5d4c3a-0000-4000-8000-000000000000"
    before = api.dump()
    for body_of in (
        lambda target: {"device_kind": "bridge", "device_id": target},
        lambda target: {"device_kind": "router", "device_id": target},
    ):
        foreign = member.request("POST", "/v1/ports", json=body_of(theirs["id"]))
        absent = member.request("POST", "/v1/ports", json=body_of(missing))
        assert foreign.status_code == 422
        assert _without_ids(foreign, theirs["id"]) == _without_ids(absent, missing)
    foreign = member.request(
        "POST", "/v1/rules", json={"chain_id": their_chain["id"], "action": "accept"}
    )
    absent = member.request("POST", "/v1/rules", json={"chain_id": missing, "action": "accept"})
    assert _without_ids(foreign, their_chain["id"]) == _without_ids(absent, missing)
    assert foreign.status_code == 422
    assert api.dump() == before
    # Through an update too, and for a route's next hop and a port's subnet.
    bridge = member.create("bridges", {"name": "mine", "inbound_chain_id": None})
    router = member.create("routers", {"name": "r"})
    their_router = api.create("routers", {"tenant_id": "globex"})
    their_port = api.create(
        "ports", {"device_kind": "router", "device_id": their_router["id"], "tenant_id": "globex"}
    )
    their_subnet = api.create(
        "subnets", {"bridge_id": theirs["id"], "cidr": "10.9.0.0/24", "tenant_id": "globex"}
    )
    before = api.dump()
    cases = [
        ("PATCH", f"/v1/bridges/{bridge['id']}", "inbound_chain_id", their_chain["id"], None),
        (
            "POST",
            "/v1/routes",
            "next_hop_port_id",
            their_port["id"],
            {"router_id": router["id"], "dst_prefix": "0.0.0.0/0"},
        ),
        (
            "POST",
            "/v1/ports",
            "fixed_ips",
            their_subnet["id"],
            {"device_kind": "bridge", "device_id": bridge["id"]},
        ),
    ]
    for method, url, field, target, base in cases:

        def body(value: str, field: str = field, base: Any = base) -> dict[str, Any]:
            if field == "fixed_ips":
                return {**base, "fixed_ips": [{"subnet_id": value}]}
            return {**(base or {}), field: value}

        foreign = member.request(method, url, json=body(target))
        absent = member.request(method, url, json=body(missing))
        assert foreign.status_code == 422, foreign.text
        assert _without_ids(foreign, target) == _without_ids(absent, missing)
        assert foreign.json()["error"]["details"][0]["field"] == field
    assert api.dump() == before


def test_a_shared_bridge_may_be_referenced_and_read_but_not_changed(api: Api) -> None:
    external = api.create("bridges", {"name": "ext", "tenant_id": "ops", "shared": True})
    subnet = api.create(
        "subnets", {"bridge_id": external["id"], "cidr": "10.9.0.0/24", "tenant_id": "ops"}
    )
    private = api.create("bridges", {"name": "private", "tenant_id": "ops"})
    api.create("subnets", {"bridge_id": private["id"], "cidr": "10.8.0.0/24", "tenant_id": "ops"})
    member = issue(api, "acme", "member")
    assert member.request("GET", f"/v1/bridges/{external['id']}").status_code == 200
    assert member.request("GET", f"/v1/subnets/{subnet['id']}").status_code == 200
    listed = member.request("GET", "/v1/bridges").json()["items"]
    assert [b["id"] for b in listed] == [external["id"]]
    subnets = member.request("GET", "/v1/subnets").json()["items"]
    assert [s["id"] for s in subnets] == [subnet["id"]]
    port = member.create(
        "ports",
        {
            "device_kind": "bridge",
            "device_id": external["id"],
            "fixed_ips": [{"subnet_id": subnet["id"]}],
        },
    )
    assert port["tenant_id"] == "acme" and port["fixed_ips"][0]["ip_address"].startswith("10.9.")
    before = api.dump()
    for method, url, body in (
        ("PATCH", f"/v1/bridges/{external['id']}", {"name": "x"}),
        ("PUT", f"/v1/bridges/{external['id']}", {"name": "x", "shared": True}),
        ("DELETE", f"/v1/bridges/{external['id']}", None),
        ("PATCH", f"/v1/subnets/{subnet['id']}", {"name": "x"}),
        ("DELETE", f"/v1/subnets/{subnet['id']}", None),
    ):
        response = member.request(method, url, json=body)
        assert response.status_code == 403, response.text
        assert "shared by another project" in response.json()["error"]["message"]
    # Attaching ports is what sharing grants; adding a subnet to the bridge is not.
    added = member.request(
        "POST", "/v1/subnets", json={"bridge_id": external["id"], "cidr": "10.7.0.0/24"}
    )
    assert added.status_code == 422, added.text
    assert added.json()["error"]["details"][0]["field"] == "bridge_id"
    assert "shared by another project" in added.json()["error"]["message"]
    # The private bridge stays a missing one: 404 on every method.
    for method, body in (("GET", None), ("PATCH", {"name": "x"}), ("DELETE", None)):
        response = member.request(method, f"/v1/bridges/{private['id']}", json=body)
        assert response.status_code == 404, response.text
    assert api.dump() == before
    # The port is acme's own: acme changes and deletes it.
    assert member.request("DELETE", f"/v1/ports/{port['id']}").status_code == 204
    api.assert_consistent()


def test_deleting_an_own_object_never_cascades_into_another_project(api: Api) -> None:
    """The owner of a shared bridge cannot delete other projects' ports on it, and is not
    told their ids."""
    owner = issue(api, "ops", "member")
    shared = owner.create("bridges", {"name": "ext"})
    api.request("PATCH", f"/v1/bridges/{shared['id']}", json={"shared": True})
    port = issue(api, "acme", "member").create(
        "ports", {"device_kind": "bridge", "device_id": shared["id"]}
    )
    before = api.dump()
    for cascade in ("false", "true"):
        response = owner.request("DELETE", f"/v1/bridges/{shared['id']}?cascade={cascade}")
        assert response.status_code == 409, response.text
        assert "other projects" in response.text and port["id"] not in response.text
    assert api.dump() == before
    api.assert_consistent()


def test_bgp_peers_and_learned_routes_are_infrastructure(api: Api) -> None:
    """A project's router may have an uplink, but only the cluster admin makes it speak BGP,
    and only speakers mark routes as learned."""
    acme_admin = issue(api, "acme", "admin")
    router = acme_admin.create("routers", {"name": "r"})
    uplink = acme_admin.create(
        "ports",
        {"device_kind": "router", "device_id": router["id"], "addresses": ["192.0.2.1/25"]},
    )
    peer_body = {
        "port_id": uplink["id"],
        "local_as": 65001,
        "peer_as": 65000,
        "peer_ip": "192.0.2.2",
    }
    before = api.dump()
    response = acme_admin.request("POST", "/v1/bgp_peers", json=peer_body)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["details"][0]["field"] == "kind"
    assert api.dump() == before
    peer = api.create("bgp_peers", peer_body)
    route_body = {
        "router_id": router["id"],
        "dst_prefix": "0.0.0.0/0",
        "next_hop_port_id": uplink["id"],
        "next_hop_gateway": "192.0.2.2",
        "learned_from": peer["id"],
    }
    response = acme_admin.request("POST", "/v1/routes", json=route_body)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["details"][0]["field"] == "learned_from"
    # Its learned routes keep a plain delete of the peer from happening; a cascade takes them
    # with it (a withdrawal in the same txn).
    learned = api.create("routes", route_body)
    assert api.request("DELETE", f"/v1/bgp_peers/{peer['id']}").status_code == 409
    response = api.request("DELETE", f"/v1/bgp_peers/{peer['id']}?cascade=true")
    assert response.status_code == 204, response.text
    assert api.request("GET", f"/v1/routes/{learned['id']}").status_code == 404
