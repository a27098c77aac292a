"""`hivenet subnet create|list|show|update|delete` and `port create --subnet` against a real
API server: the allocation shows in `port show`, a subnet in use is a 409."""

from __future__ import annotations

from tests.integration.cli.conftest import Hivenet


def test_subnet_verbs_and_a_port_on_it(hivenet: Hivenet, unique: str) -> None:
    bridge, subnet = f"br-{unique}", f"sn-{unique}"
    hivenet.ok("bridge", "create", "--id", bridge, "--mtu", "1400")
    created = hivenet.json(
        "subnet", "create", "--id", subnet, "--bridge-id", bridge, "--cidr", "10.7.0.0/24",
        "--pool", "10.7.0.10-10.7.0.19", "--pool", "10.7.0.30-10.7.0.39",
        "--dns", "10.7.0.53", "--host-route", "192.168.0.0/16=10.7.0.254",
        "--domain", "acme.example", "--lease-time", "600",
    )  # fmt: skip
    assert created["gateway_ip"] == "10.7.0.1"
    assert created["allocation_pools"] == [
        {"start": "10.7.0.10", "end": "10.7.0.19"},
        {"start": "10.7.0.30", "end": "10.7.0.39"},
    ]
    assert created["host_routes"] == [{"destination": "192.168.0.0/16", "nexthop": "10.7.0.254"}]
    assert created["domain_name"] == "acme.example" and created["lease_time"] == 600
    listed = hivenet.ok("subnet", "list", "--bridge-id", bridge).stdout
    assert subnet in listed and "10.7.0.10-10.7.0.19" in listed

    port = hivenet.ok(
        "port", "create", "--device-kind", "bridge", "--device-id", bridge,
        "--subnet", subnet, "-q",
    ).stdout.strip()  # fmt: skip
    shown = hivenet.ok("port", "show", port).stdout
    assert f"10.7.0.10 on subnet {subnet}" in shown and "10.7.0.10/24" in shown
    pinned = hivenet.json(
        "port", "create", "--device-kind", "bridge", "--device-id", bridge,
        "--subnet", f"{subnet}=10.7.0.77",
    )  # fmt: skip
    assert pinned["fixed_ips"] == [{"subnet_id": subnet, "ip_address": "10.7.0.77"}]

    taken = hivenet.fails(
        "port", "create", "--device-kind", "bridge", "--device-id", bridge,
        "--subnet", f"{subnet}=10.7.0.77",
    )  # fmt: skip
    assert "422" in taken.stderr and "fixed_ips" in taken.stderr and "in use" in taken.stderr

    updated = hivenet.json("subnet", "update", subnet, "--no-dhcp", "--dns", "10.7.0.54")
    assert updated["enable_dhcp"] is False and updated["dns_nameservers"] == ["10.7.0.54"]
    assert hivenet.json("subnet", "show", subnet)["enable_dhcp"] is False

    in_use = hivenet.fails("subnet", "delete", subnet)
    assert "409" in in_use.stderr and port in in_use.stderr
    hivenet.ok("port", "delete", port)
    hivenet.ok("port", "delete", pinned["id"])
    hivenet.ok("subnet", "delete", subnet)
    hivenet.fails("subnet", "show", subnet)


def test_bad_subnet_options_name_the_field(hivenet: Hivenet, unique: str) -> None:
    bridge = f"br-{unique}"
    hivenet.ok("bridge", "create", "--id", bridge)
    refused = hivenet.fails(
        "subnet", "create", "--bridge-id", bridge, "--cidr", "10.7.0.0/24",
        "--gateway", "10.8.0.1",
    )  # fmt: skip
    assert "gateway_ip" in refused.stderr and "10.8.0.1" in refused.stderr
    usage = hivenet.fails(
        "subnet", "create", "--bridge-id", bridge, "--cidr", "10.7.0.0/24", "--pool", "10.7.0.9",
        code=2,
    )  # fmt: skip
    assert "START-END" in usage.stderr
