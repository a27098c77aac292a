"""`snat_targets_served`: which SNAT ranges a host leases a port block of ahead of need."""

from __future__ import annotations

import ipaddress

from hivenet.flowstate import NatRange
from hivenet.model import Bridge, Chain, DeviceKind, NatTarget, Port, Router, Rule, RuleAction
from hivenet.sim import TopologyView
from hivenet.sim.stateful import snat_targets_served


def snat_rule(chain_id: str, address: str, ports: tuple[int, int] = (1024, 65535)) -> Rule:
    return Rule(
        chain_id=chain_id,
        action=RuleAction.SNAT,
        nat_targets=(
            NatTarget(
                address_from=ipaddress.ip_address(address),
                address_to=ipaddress.ip_address(address),
                port_from=ports[0],
                port_to=ports[1],
            ),
        ),
    )


def view() -> TopologyView:
    """vm (h1) on `net`, peered to router r, whose outbound chain jumps to `nat`; a second
    router r2 with its own SNAT range is not connected to anything h1 binds; `lonely` (h2)
    sits alone on bridge `island`."""
    return TopologyView.from_objects(
        [
            Bridge(id="net"),
            Bridge(id="island"),
            Chain(id="post"),
            Chain(id="nat"),
            Chain(id="post2"),
            Router(id="r", outbound_chain_id="post"),
            Router(id="r2", outbound_chain_id="post2"),
            Rule(chain_id="post", action=RuleAction.JUMP, jump_chain_id="nat"),
            snat_rule("nat", "203.0.113.2"),
            snat_rule("nat", "203.0.113.3", (0, 0)),  # keeps ports: nothing to lease ahead
            snat_rule("post2", "198.51.100.2"),
            Port(
                id="r-net",
                device_kind=DeviceKind.ROUTER,
                device_id="r",
                mac="02:00:00:00:ff:01",
                addresses=(ipaddress.ip_interface("10.0.0.1/24"),),
                peer_id="b-net",
            ),
            Port(id="b-net", device_kind=DeviceKind.BRIDGE, device_id="net", peer_id="r-net"),
            Port(
                id="vm",
                device_kind=DeviceKind.BRIDGE,
                device_id="net",
                host_id="h1",
                interface_name="hnvm",
            ),
            Port(
                id="lonely",
                device_kind=DeviceKind.BRIDGE,
                device_id="island",
                host_id="h2",
                interface_name="hnlonely",
            ),
        ]
    )


def test_ranges_of_routers_reachable_from_the_hosts_ports_through_jumps() -> None:
    assert snat_targets_served(view(), "h1") == [
        NatRange.parse("203.0.113.2", "203.0.113.2", 1024, 65535)
    ]


def test_a_host_without_a_path_to_a_snat_router_or_without_ports_needs_none() -> None:
    assert snat_targets_served(view(), "h2") == []
    assert snat_targets_served(view(), "h3") == []
