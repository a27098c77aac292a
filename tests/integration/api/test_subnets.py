"""`/v1/subnets` and port fixed IPs over HTTP: allocation, field-named refusals, 409 for a
subnet in use, and two API servers on one store allocating at once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from hivenet.api import create_app

from .conftest import Api, start
from .test_resources import unchanged
from .test_two_servers import _in_parallel


def network(api: Api, cidr: str = "10.1.0.0/24", **fields: Any) -> tuple[str, str]:
    bridge = api.create("bridges", {"name": "net"})
    subnet = api.create("subnets", {"bridge_id": bridge["id"], "cidr": cidr, **fields})
    return bridge["id"], subnet["id"]


def vm_port(bridge_id: str, subnet_id: str, address: str | None = None) -> dict[str, Any]:
    fixed: dict[str, Any] = {"subnet_id": subnet_id}
    if address is not None:
        fixed["ip_address"] = address
    return {"device_kind": "bridge", "device_id": bridge_id, "fixed_ips": [fixed]}


def test_subnet_defaults_and_list_by_bridge(api: Api) -> None:
    bridge_id, subnet_id = network(api)
    got = api.request("GET", f"/v1/subnets/{subnet_id}").json()
    assert got["gateway_ip"] == "10.1.0.1"
    assert got["allocation_pools"] == [{"start": "10.1.0.2", "end": "10.1.0.254"}]
    assert got["enable_dhcp"] is True and got["lease_time"] == 86400
    other_bridge = api.create("bridges", {"name": "other"})
    api.create("subnets", {"bridge_id": other_bridge["id"], "cidr": "10.2.0.0/24"})
    listed = api.request("GET", "/v1/subnets", params={"bridge_id": bridge_id}).json()
    assert [s["id"] for s in listed["items"]] == [subnet_id]


def test_port_gets_an_address_and_frees_it(api: Api) -> None:
    bridge_id, subnet_id = network(api)
    port = api.create("ports", vm_port(bridge_id, subnet_id))
    assert port["fixed_ips"] == [{"subnet_id": subnet_id, "ip_address": "10.1.0.2"}]
    assert port["addresses"] == ["10.1.0.2/24"]
    assert api.request("GET", f"/v1/ports/{port['id']}").json() == port
    assert api.request("DELETE", f"/v1/ports/{port['id']}").status_code == 204
    again = api.create("ports", vm_port(bridge_id, subnet_id, "10.1.0.2"))
    assert again["addresses"] == ["10.1.0.2/24"]
    api.assert_consistent()


@pytest.mark.parametrize(
    ("address", "status", "words"),
    [
        ("10.9.0.5", 422, "outside subnet"),
        ("10.1.0.0", 422, "network or broadcast"),
        ("10.1.0.255", 422, "network or broadcast"),
        ("10.1.0.7", 422, "in use"),
        ("not-an-ip", 422, ""),
    ],
)
def test_bad_addresses_are_refused_by_field_and_change_nothing(
    api: Api, address: str, status: int, words: str
) -> None:
    bridge_id, subnet_id = network(api)
    api.create("ports", vm_port(bridge_id, subnet_id, "10.1.0.7"))
    with unchanged(api):
        refused = api.post("/v1/ports", vm_port(bridge_id, subnet_id, address))
    assert refused.status_code == status, refused.text
    error = refused.json()["error"]
    assert error["details"][0]["field"].startswith("fixed_ips")
    assert words in error["message"]
    if words:
        assert error["details"][0]["value"] == address


def test_subnet_with_ports_cannot_be_deleted(api: Api) -> None:
    bridge_id, subnet_id = network(api)
    port = api.create("ports", vm_port(bridge_id, subnet_id))
    with unchanged(api):
        refused = api.request("DELETE", f"/v1/subnets/{subnet_id}")
    assert refused.status_code == 409
    assert refused.json()["error"]["details"][0]["value"] == port["id"]
    assert api.request("DELETE", f"/v1/ports/{port['id']}").status_code == 204
    assert api.request("DELETE", f"/v1/subnets/{subnet_id}").status_code == 204
    api.assert_consistent()


def test_subnet_update_keeps_cidr(api: Api) -> None:
    _bridge_id, subnet_id = network(api)
    patched = api.request(
        "PATCH", f"/v1/subnets/{subnet_id}", json={"dns_nameservers": ["10.1.0.53"]}
    )
    assert patched.status_code == 200 and patched.json()["dns_nameservers"] == ["10.1.0.53"]
    with unchanged(api):
        refused = api.request("PATCH", f"/v1/subnets/{subnet_id}", json={"cidr": "10.1.0.0/23"})
    assert refused.status_code == 422
    assert refused.json()["error"]["details"][0]["field"] == "cidr"


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[tuple[Api, Api]]:
    state_dir = tmp_path / "hn-state"
    url = f"sqlite:///{tmp_path}/state.db"
    with ExitStack() as stack:
        serve = contextmanager(start)
        first = stack.enter_context(serve(create_app(url, state_dir), state_dir))
        second = stack.enter_context(serve(create_app(url, state_dir), state_dir))
        yield first, second


def test_two_servers_allocating_at_once_never_share_an_address(
    two_servers: tuple[Api, Api],
) -> None:
    first, second = two_servers
    bridge_id, subnet_id = network(first, "10.3.0.0/26")  # 61 pool addresses

    def create_many(api: Api) -> list[str]:
        return [
            api.create("ports", vm_port(bridge_id, subnet_id))["fixed_ips"][0]["ip_address"]
            for _ in range(20)
        ]

    got_first, got_second = _in_parallel(lambda: create_many(first), lambda: create_many(second))
    got = [*got_first, *got_second]  # type: ignore[misc]
    assert len(got) == 40 and len(set(got)) == 40
    first.assert_consistent()
