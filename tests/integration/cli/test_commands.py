"""The `hivenet <kind> create|list|show|update|delete` commands against a real API server."""

from __future__ import annotations

import json

import pytest

from hivenet.api.client import HivenetClient
from tests.integration.cli.conftest import Hivenet, RunningApi

# (kind command, create options that make a valid object, an update that changes something)
SIMPLE_KINDS = [
    ("bridge", ["--arp-proxy"], ["--set", "arp_proxy=false"], ("arp_proxy", False)),
    ("router", ["--admin-state-down"], ["--admin-state-up"], ("admin_state_up", True)),
    ("chain", [], ["--name", "renamed"], ("name", "renamed")),
    ("host", [], ["--tenant-id", "other"], ("tenant_id", "other")),
    ("port-group", ["--stateful"], ["--no-stateful"], ("stateful", False)),
    (
        "ip-addr-group",
        ["--address", "10.1.0.1", "--address", "10.1.0.2"],
        ["--address", "2001:db8::1"],
        ("addresses", ["2001:db8::1"]),
    ),
]


@pytest.mark.parametrize(
    ("command", "create_options", "update_options", "changed"),
    SIMPLE_KINDS,
    ids=[case[0] for case in SIMPLE_KINDS],
)
def test_every_verb_round_trips(
    hivenet: Hivenet,
    unique: str,
    command: str,
    create_options: list[str],
    update_options: list[str],
    changed: tuple[str, object],
) -> None:
    object_id = f"{command}-{unique}"
    name = f"name-{unique}"
    created = hivenet.json(command, "create", "--id", object_id, "--name", name, *create_options)
    assert created["id"] == object_id
    assert created["name"] == name

    assert hivenet.json(command, "show", object_id) == created
    listed = hivenet.json(command, "list", "--name", name)
    assert [item["id"] for item in listed["items"]] == [object_id]
    assert listed["next_marker"] is None

    table = hivenet.ok(command, "list").stdout
    assert object_id in table and name in table

    updated = hivenet.json(command, "update", object_id, *update_options)
    field, value = changed
    assert updated[field] == value
    assert hivenet.json(command, "show", object_id)[field] == value

    assert (
        f"deleted {command.replace('-', ' ')} {object_id}"
        in hivenet.ok(command, "delete", object_id).stdout
    )
    gone = hivenet.fails(command, "show", object_id)
    assert "404" in gone.stderr and object_id in gone.stderr


def test_show_table_hides_defaults_unless_all_fields(hivenet: Hivenet, unique: str) -> None:
    hivenet.ok("bridge", "create", "--id", f"b-{unique}", "--name", "shown")
    brief = hivenet.ok("bridge", "show", f"b-{unique}").stdout
    full = hivenet.ok("bridge", "show", f"b-{unique}", "--all-fields").stdout
    assert "shown" in brief and "revision" in brief
    assert "arp_proxy" not in brief
    assert "arp_proxy" in full and "outbound_chain_id" in full


def test_topology_with_ports_routes_rules_and_filters(hivenet: Hivenet, unique: str) -> None:
    bridge, router = f"br-{unique}", f"rt-{unique}"
    hivenet.ok("bridge", "create", "--id", bridge, "--name", f"net-{unique}")
    hivenet.ok("router", "create", "--id", router)
    uplink = hivenet.ok(
        "port", "create", "--device-kind", "bridge", "--device-id", bridge, "-q"
    ).stdout.strip()
    router_port = hivenet.json(
        "port", "create", "--id", f"rp-{unique}", "--device-kind", "router",
        "--device-id", router, "--address", "10.9.1.1/24", "--peer-id", uplink,
    )  # fmt: skip
    assert router_port["peer_id"] == uplink
    assert router_port["tunnel_key"] > 0
    assert hivenet.json("port", "show", uplink)["peer_id"] == router_port["id"]

    host = f"host-{unique}"
    hivenet.ok("host", "create", "--id", host)
    vm_port = hivenet.json(
        "port", "create", "--device-kind", "bridge", "--device-id", bridge,
        "--mac", "02:00:00:AA:bb:01", "--address", "10.9.1.11/24",
        "--host-id", host, "--interface", "hnvm1", "--set", "vlan_id=7",
    )  # fmt: skip
    assert vm_port["mac"] == "02:00:00:aa:bb:01"
    assert vm_port["vlan_id"] == 7
    assert vm_port["interface_name"] == "hnvm1"

    gateway_port = hivenet.json(
        "port", "create", "--device-kind", "bridge", "--device-id", bridge,
        "--host-id", host, "--interface", "hngw1", "--interface-vlan", "100",
    )  # fmt: skip
    assert gateway_port["interface_vlan"] == 100
    vtep_port = hivenet.json(
        "port", "create", "--device-kind", "bridge", "--device-id", bridge,
        "--vtep-ip", "192.0.2.200", "--vtep-vni", str(0xE00000 + int(unique, 16) % 0xFFFF),
    )  # fmt: skip
    assert vtep_port["vtep_ip"] == "192.0.2.200" and vtep_port["host_id"] is None

    on_bridge = hivenet.json("port", "list", "--device-id", bridge)["items"]
    assert sorted(item["id"] for item in on_bridge) == sorted(
        [uplink, vm_port["id"], gateway_port["id"], vtep_port["id"]]
    )

    route = hivenet.json(
        "route", "create", "--router-id", router, "--dst", "10.9.1.0/24",
        "--next-hop-port", router_port["id"], "--gateway", "10.9.1.254", "--weight", "50",
    )  # fmt: skip
    assert (route["dst_prefix"], route["next_hop_gateway"], route["weight"]) == (
        "10.9.1.0/24",
        "10.9.1.254",
        50,
    )
    blackhole = hivenet.json(
        "route", "create", "--router-id", router, "--dst", "10.0.0.0/8", "--type", "blackhole"
    )
    routes = hivenet.json("route", "list", "--router-id", router)["items"]
    assert sorted(item["id"] for item in routes) == sorted([route["id"], blackhole["id"]])
    route_table = hivenet.ok("route", "list", "--router-id", router).stdout
    assert "10.9.1.0/24" in route_table and "blackhole" in route_table

    chain = f"ch-{unique}"
    hivenet.ok("chain", "create", "--id", chain)
    ssh = hivenet.json(
        "rule", "create", "--chain-id", chain, "--action", "accept", "--position", "20",
        "--nw-src", "10.9.1.0/24", "--nw-proto", "6", "--tp-dst", "22",
        "--in-port-id", vm_port["id"],
    )  # fmt: skip
    assert ssh["tp_dst"] == {"start": 22, "end": 22}
    assert ssh["in_port_ids"] == [vm_port["id"]]
    dnat = hivenet.json(
        "rule", "create", "--chain-id", chain, "--action", "dnat", "--position", "10",
        "--tp-dst", "8000-8080", "--set",
        'nat_targets=[{"address_from": "10.9.1.11", "address_to": "10.9.1.11"}]',
    )  # fmt: skip
    assert dnat["tp_dst"] == {"start": 8000, "end": 8080}
    assert dnat["nat_targets"][0]["address_from"] == "10.9.1.11"
    rule_table = hivenet.ok("rule", "list", "--chain-id", chain).stdout
    assert rule_table.index("dnat") < rule_table.index("accept")  # shown in position order
    assert "8000-8080" in rule_table

    hivenet.ok("bridge", "update", bridge, "--inbound-chain-id", chain)
    assert hivenet.json("bridge", "show", bridge)["inbound_chain_id"] == chain

    zone = hivenet.json(
        "tunnel-zone", "create", "--member", f"{host}=192.168.7.1", "--vxlan-port", "4790"
    )
    assert zone["members"] == [{"host_id": host, "underlay_ip": "192.168.7.1"}]
    zone_table = hivenet.ok("tunnel-zone", "list").stdout
    assert f"{host}=192.168.7.1" in zone_table


def test_list_pages_with_limit_and_marker(hivenet: Hivenet, unique: str) -> None:
    ids = [f"pg-{unique}-{n}" for n in range(3)]
    for object_id in ids:
        hivenet.ok("chain", "create", "--id", object_id, "--tenant-id", f"t-{unique}")
    first = hivenet.json("chain", "list", "--tenant-id", f"t-{unique}", "--limit", "2")
    assert [item["id"] for item in first["items"]] == ids[:2]
    assert first["next_marker"] == ids[1]
    second = hivenet.json(
        "chain", "list", "--tenant-id", f"t-{unique}", "--limit", "2", "--marker", ids[1]
    )
    assert [item["id"] for item in second["items"]] == ids[2:]
    assert second["next_marker"] is None
    paged_table = hivenet.ok("chain", "list", "--tenant-id", f"t-{unique}", "--limit", "2")
    assert f"--marker {ids[1]}" in paged_table.stderr
    everything = hivenet.json("chain", "list", "--tenant-id", f"t-{unique}")
    assert [item["id"] for item in everything["items"]] == ids


def test_update_with_if_revision(hivenet: Hivenet, api_server: RunningApi, unique: str) -> None:
    bridge = f"rev-{unique}"
    hivenet.ok("bridge", "create", "--id", bridge)
    with HivenetClient(api_server.url, api_server.token) as client:
        revision = client.get("bridge", bridge).revision
    assert revision is not None
    hivenet.ok("bridge", "update", bridge, "--name", "first", "--if-revision", str(revision))
    stale = hivenet.fails(
        "bridge", "update", bridge, "--name", "second", "--if-revision", str(revision)
    )
    assert "412" in stale.stderr
    assert hivenet.json("bridge", "show", bridge)["name"] == "first"


def test_delete_referenced_needs_cascade(hivenet: Hivenet, unique: str) -> None:
    bridge = f"del-{unique}"
    hivenet.ok("bridge", "create", "--id", bridge)
    port = hivenet.ok(
        "port", "create", "--device-kind", "bridge", "--device-id", bridge, "-q"
    ).stdout.strip()
    refused = hivenet.fails("bridge", "delete", bridge)
    assert "409" in refused.stderr and port in refused.stderr
    hivenet.ok("bridge", "show", bridge)
    hivenet.ok("bridge", "delete", bridge, "--cascade")
    hivenet.fails("bridge", "show", bridge)
    hivenet.fails("port", "show", port)


def test_quiet_create_prints_only_the_id(hivenet: Hivenet) -> None:
    created_id = hivenet.ok("host", "create", "-q").stdout.strip()
    assert hivenet.json("host", "show", created_id)["id"] == created_id


def test_json_output_is_exactly_the_stored_object(hivenet: Hivenet, unique: str) -> None:
    output = hivenet.ok("router", "create", "--id", f"j-{unique}", "--json").stdout
    created = json.loads(output)
    assert set(created) == {
        "id", "tenant_id", "name", "external_ids", "admin_state_up", "inbound_chain_id",
        "outbound_chain_id",
    }  # fmt: skip


def test_create_with_an_idempotency_key_makes_one_object(hivenet: Hivenet, unique: str) -> None:
    key = f"key-{unique}"
    first = hivenet.ok("bridge", "create", "--name", unique, "--idempotency-key", key, "-q")
    again = hivenet.ok("bridge", "create", "--name", unique, "--idempotency-key", key, "-q")
    assert first.stdout.strip() == again.stdout.strip() != ""
    other = hivenet.fails("bridge", "create", "--name", "other", "--idempotency-key", key)
    assert "409" in other.stderr and "already exists" in other.stderr
