"""`sim/secgroups.py`: the anti-spoofing verdicts, and the incremental compilation of
security-group and floating-IP chains in the `TopologyView` (what a change recompiles and
which tags it returns)."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from hivenet.model import (
    AllowedAddressPair,
    Direction,
    FloatingIp,
    Port,
    SecurityGroup,
    SecurityGroupRule,
)
from hivenet.packets import build_arp_reply, build_udp_datagram, extract_flow_match
from hivenet.packets.builders import build_neighbor_solicitation
from hivenet.sim.secgroups import spoof_reason
from tests.unit.sim.topo import Topo, mac

VM_MAC = mac(1)


def eui64_link_local(mac_text: str) -> str:
    """fe80:: + the modified EUI-64 of a MAC, as Linux makes it (written out independently)."""
    octets = [int(part, 16) for part in mac_text.split(":")]
    octets[0] ^= 0x02
    words = [octets[0] << 8 | octets[1], octets[2] << 8 | 0xFF, 0xFE << 8 | octets[3]]
    words.append(octets[4] << 8 | octets[5])
    return "fe80::" + ":".join(f"{word:x}" for word in words)


def guarded_view() -> tuple[Topo, object]:
    topo = Topo()
    topo.bridge("b")
    topo.add(SecurityGroup(id="sg"))
    topo.add(SecurityGroup(id="peers"))
    topo.add(
        SecurityGroupRule(
            id="r1",
            security_group_id="sg",
            direction=Direction.INGRESS,
            protocol=6,
            port_range_min=22,
            port_range_max=22,
            remote_group_id="peers",
        )
    )
    topo.vm_port(
        "b",
        "vm1",
        mac_n=1,
        addresses=("10.0.0.11/24",),
        port_security_enabled=True,
        security_group_ids=("sg",),
        allowed_address_pairs=(
            AllowedAddressPair(ip_address=ipaddress.ip_network("10.0.5.0/24"), mac_address=mac(9)),
        ),
    )
    topo.vm_port(
        "b",
        "vm2",
        mac_n=2,
        addresses=("10.0.0.12/24",),
        port_security_enabled=True,
        security_group_ids=("peers",),
    )
    topo.vm_port("b", "vm3", mac_n=3, addresses=("10.0.0.13/24",))
    return topo, topo.view()


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (
            build_udp_datagram(
                eth_src=VM_MAC,
                eth_dst=mac(2),
                ip_src="10.0.0.11",
                ip_dst="10.0.0.12",
                src_port=1,
                dst_port=2,
            ),
            None,
        ),
        (
            build_udp_datagram(
                eth_src=mac(7),
                eth_dst=mac(2),
                ip_src="10.0.0.11",
                ip_dst="10.0.0.12",
                src_port=1,
                dst_port=2,
            ),
            "spoofed_mac",
        ),
        (
            build_udp_datagram(
                eth_src=VM_MAC,
                eth_dst=mac(2),
                ip_src="10.0.0.99",
                ip_dst="10.0.0.12",
                src_port=1,
                dst_port=2,
            ),
            "spoofed_ip",
        ),
        # The pair's prefix only with the pair's MAC.
        (
            build_udp_datagram(
                eth_src=mac(9),
                eth_dst=mac(2),
                ip_src="10.0.5.7",
                ip_dst="10.0.0.12",
                src_port=1,
                dst_port=2,
            ),
            None,
        ),
        (
            build_udp_datagram(
                eth_src=VM_MAC,
                eth_dst=mac(2),
                ip_src="10.0.5.7",
                ip_dst="10.0.0.12",
                src_port=1,
                dst_port=2,
            ),
            "spoofed_ip",
        ),
        (
            build_udp_datagram(
                eth_src=VM_MAC,
                eth_dst="ff:ff:ff:ff:ff:ff",
                ip_src="0.0.0.0",
                ip_dst="255.255.255.255",
                src_port=68,
                dst_port=67,
            ),
            None,
        ),
        (
            build_udp_datagram(
                eth_src=VM_MAC,
                eth_dst="ff:ff:ff:ff:ff:ff",
                ip_src="10.0.0.11",
                ip_dst="255.255.255.255",
                src_port=67,
                dst_port=68,
            ),
            "spoofed_dhcp_server",
        ),
        (
            build_arp_reply(
                sender_mac=VM_MAC, sender_ip="10.0.0.12", target_mac=mac(2), target_ip="10.0.0.12"
            ),
            "spoofed_arp",
        ),
        (
            build_arp_reply(
                sender_mac=mac(7), sender_ip="10.0.0.11", target_mac=mac(2), target_ip="10.0.0.12"
            ),
            "spoofed_mac",
        ),
        (
            build_arp_reply(
                sender_mac=VM_MAC, sender_ip="10.0.0.11", target_mac=mac(2), target_ip="10.0.0.12"
            ),
            None,
        ),
        # A DHCP renewal from an address the port no longer has reaches the server (to NAK).
        (
            build_udp_datagram(
                eth_src=VM_MAC,
                eth_dst="ff:ff:ff:ff:ff:ff",
                ip_src="10.0.0.99",
                ip_dst="255.255.255.255",
                src_port=68,
                dst_port=67,
            ),
            None,
        ),
        # Neighbour discovery from the MAC's own link-local address; not from another one.
        (
            build_neighbor_solicitation(
                src_mac=VM_MAC, src_ip=eui64_link_local(VM_MAC), target_ip="fe80::1"
            ),
            None,
        ),
        (
            build_neighbor_solicitation(src_mac=VM_MAC, src_ip="fe80::99", target_ip="fe80::1"),
            "spoofed_ip",
        ),
    ],
)
def test_spoof_verdicts(frame: bytes, reason: str | None) -> None:
    _, view = guarded_view()
    guard = view.security.guards["vm1"]  # type: ignore[attr-defined]
    read: list[str] = []
    assert spoof_reason(guard, extract_flow_match(frame, 1), lambda *f: read.extend(f)) == reason
    assert "eth_src" in read


def test_rule_change_recompiles_member_ports_only() -> None:
    _, view = guarded_view()
    before = view.chains["sg-out.vm1"]  # type: ignore[attr-defined]
    other = view.chains["sg-out.vm2"]  # type: ignore[attr-defined]
    tags = view.apply(
        SecurityGroupRule(  # type: ignore[attr-defined]
            id="r2", security_group_id="sg", direction=Direction.INGRESS, protocol=17
        )
    )
    assert "chain:sg-out.vm1" in tags and "chain:sg-out.vm2" not in tags
    assert view.chains["sg-out.vm1"] is not before  # type: ignore[attr-defined]
    assert view.chains["sg-out.vm2"] is other  # type: ignore[attr-defined]


def test_remote_group_member_change_recompiles_the_ports_that_use_it() -> None:
    topo, view = guarded_view()
    port = view.ports["vm2"].port  # type: ignore[attr-defined]
    tags = view.apply(
        port.model_copy(
            update={  # type: ignore[attr-defined]
                "addresses": (ipaddress.ip_interface("10.0.0.42/24"),)
            }
        )
    )
    assert "chain:sg-out.vm1" in tags and "chain:sg-out.vm3" not in tags
    chain = view.chains["sg-out.vm1"]  # type: ignore[attr-defined]
    ssh = next(r for r in chain.rules if r.rule.name == "sg-rule r1")
    assert ssh.rule.ip_addr_group_src_id == "sgm.peers"
    # Turning port security off removes the guard and the chains.
    port1: Port = view.ports["vm1"].port  # type: ignore[attr-defined]
    view.apply(
        port1.model_copy(
            update={  # type: ignore[attr-defined]
                "port_security_enabled": False,
                "security_group_ids": (),
                "allowed_address_pairs": (),
            }
        )
    )
    assert "vm1" not in view.security.guards  # type: ignore[attr-defined]
    assert "sg-out.vm1" not in view.chains  # type: ignore[attr-defined]
    del topo


def test_floating_ip_compiles_router_chains_and_arp_answers() -> None:
    topo = Topo()
    topo.bridge("net")
    topo.bridge("ext")
    topo.router("r")
    topo.vm_port("net", "vm", mac_n=1, addresses=("10.0.0.5/24",))
    topo.link("net", "r", "10.0.0.1/24")
    _, uplink = topo.link("ext", "r", "203.0.113.1/24")
    view = topo.view()
    tags = view.apply(
        FloatingIp(
            id="f",
            floating_ip_address=ipaddress.ip_address("203.0.113.9"),
            router_id="r",
            port_id="vm",
        )
    )
    assert {"router:r", "chain:fip-pre.r", "chain:fip-post.r"} <= tags
    nat = view.security.routers["r"]
    assert nat.arp_answers == {uplink.id: frozenset({int(ipaddress.ip_address("203.0.113.9"))})}
    actions = [rule.action.value for rule in view.chains["fip-pre.r"].rules]
    assert actions == ["rev_snat", "rev_dnat", "dnat"]
    view.remove("floating_ip", "f")
    assert "r" not in view.security.routers and "fip-pre.r" not in view.chains


def test_model_rejects_bad_security_input_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="port_range_min"):
        SecurityGroupRule(
            security_group_id="g",
            direction=Direction.INGRESS,
            protocol=6,
            port_range_min=80,
            port_range_max=22,
        )
    with pytest.raises(ValidationError, match="remote_ip_prefix"):
        SecurityGroupRule(
            security_group_id="g",
            direction=Direction.INGRESS,
            remote_ip_prefix=ipaddress.ip_network("2001:db8::/32"),
        )
    with pytest.raises(ValidationError, match="port_security_enabled"):
        Port(
            device_kind="bridge",
            device_id="b",
            security_group_ids=("g",),
            port_security_enabled=False,
        )
    with pytest.raises(ValidationError, match="fixed_ip_address"):
        FloatingIp(
            floating_ip_address=ipaddress.ip_address("203.0.113.9"),
            router_id="r",
            fixed_ip_address=ipaddress.ip_address("2001:db8::1"),
        )


def test_a_vm_port_gets_anti_spoofing_by_default_and_false_turns_it_off() -> None:
    topo = Topo()
    topo.bridge("b")
    default = topo.vm_port("b", "vm1", mac_n=1, addresses=("10.0.0.11/24",))
    off = topo.vm_port(
        "b", "vm2", mac_n=2, addresses=("10.0.0.12/24",), port_security_enabled=False
    )
    bare = topo.vm_port("b", "vm3", mac_n=3)  # no address: no VM port yet, nothing to guard
    assert default.port_security_enabled and not off.port_security_enabled
    assert not bare.port_security_enabled
    view = topo.view()
    guard = view.security.guards["vm1"]
    # In no security group: anti-spoofing only, no filtering chains.
    assert guard.from_vm_chain_id is None and guard.to_vm_chain_id is None
    assert "sg-in.vm1" not in view.chains
    assert set(view.security.guards) == {"vm1"}
    spoofed = build_udp_datagram(
        eth_src=mac(1),
        eth_dst=mac(2),
        ip_src="10.0.0.99",
        ip_dst="10.0.0.12",
        src_port=1,
        dst_port=2,
    )
    assert spoof_reason(guard, extract_flow_match(spoofed, 1), lambda *names: None) == "spoofed_ip"
    # Interior and router ports are never VM ports.
    router_port = Port(device_kind="router", device_id="r", addresses=("10.0.0.1/24",))
    assert not router_port.port_security_enabled
