"""The small routed topology the trace, stats and page tests share, written through any
client: net-a (vm1 on h1, 10.0.1.10) - router r1 - net-b (vm2 on h2, 10.0.2.20), hosts h1
and h2 in tunnel zone `tz` (underlay 192.0.2.1 and .2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

VM1_MAC = "02:00:00:00:01:0a"
VM2_MAC = "02:00:00:00:02:14"

# (kind, body) -> the created object as the API returned it
Create = Callable[[str, dict[str, Any]], dict[str, Any]]


def create_routed(create: Create, tenant: str = "t1") -> dict[str, Any]:
    """Create the topology; returns "router", "net-a", "net-b" ids, "rport-a"/"rport-b" and
    "vm1"/"vm2" objects."""
    create(
        "tunnel_zone",
        {
            "id": "tz",
            "name": "tz",
            "members": [
                {"host_id": "h1", "underlay_ip": "192.0.2.1"},
                {"host_id": "h2", "underlay_ip": "192.0.2.2"},
            ],
        },
    )
    router = create("router", {"name": "r1", "tenant_id": tenant})
    ids: dict[str, Any] = {"router": router["id"]}
    for name, cidr in (("a", "10.0.1.1/24"), ("b", "10.0.2.1/24")):
        bridge = create("bridge", {"name": f"net-{name}", "tenant_id": tenant})
        rport = create(
            "port",
            {
                "device_kind": "router",
                "device_id": router["id"],
                "addresses": [cidr],
                "tenant_id": tenant,
            },
        )
        create(
            "port",
            {
                "device_kind": "bridge",
                "device_id": bridge["id"],
                "peer_id": rport["id"],
                "tenant_id": tenant,
            },
        )
        ids[f"net-{name}"] = bridge["id"]
        ids[f"rport-{name}"] = rport
    for vm, net, host, mac, cidr in (
        ("vm1", "net-a", "h1", VM1_MAC, "10.0.1.10/24"),
        ("vm2", "net-b", "h2", VM2_MAC, "10.0.2.20/24"),
    ):
        ids[vm] = create(
            "port",
            {
                "device_kind": "bridge",
                "device_id": ids[net],
                "host_id": host,
                "interface_name": f"hn{vm}",
                "mac": mac,
                "addresses": [cidr],
                "tenant_id": tenant,
            },
        )
    return ids
