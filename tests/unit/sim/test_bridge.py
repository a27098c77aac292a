"""Bridge simulation: learning, unicast, flooding across hosts, VLANs, ARP proxy, ports."""

from __future__ import annotations

import pytest

from hivenet.flows.actions import Drop, Output, PopVlan, PushVlan, Tunnel
from hivenet.model.types import mac_to_int
from hivenet.packets import parse_frame
from hivenet.sim import LearnedMac
from tests.unit.sim.topo import Sim, Topo, arp_who_has, mac, udp

HOSTS = {"h1": "192.0.2.1", "h2": "192.0.2.2", "h3": "192.0.2.3"}


def three_host_bridge() -> Topo:
    topo = Topo()
    topo.bridge("b1")
    topo.vm_port("b1", "vm1", "h1", mac_n=1)
    topo.vm_port("b1", "vm2", "h2", mac_n=2)
    topo.vm_port("b1", "vm3", "h3", mac_n=3)
    topo.vm_port("b1", "vm4", "h1", mac_n=4)
    topo.vm_port("b1", "unbound", None, mac_n=5)
    topo.zone(HOSTS)
    return topo


def key(topo: Topo, port_id: str) -> int:
    return topo.ports[port_id].tunnel_key


def test_unknown_unicast_floods_one_copy_per_port_across_hosts() -> None:
    topo = three_host_bridge()
    sim = Sim(topo.view())
    result = sim.run(udp(mac(1), mac(9), "10.0.0.1", "10.0.0.9"), "vm1")
    assert set(result.actions) == {
        Tunnel("192.0.2.2", key(topo, "vm2")),
        Tunnel("192.0.2.3", key(topo, "vm3")),
        Output(key(topo, "vm4")),
    }
    assert len(result.actions) == 3  # no copy back to vm1, none to the unbound port
    assert result.learned == (LearnedMac("b1", 0, mac_to_int(mac(1)), "vm1"),)
    assert f"mac:b1:0:{mac(9)}" in result.tags  # the miss is tagged
    assert "port:unbound" in result.tags  # binding it later must widen the flood
    assert result.install


def test_learned_mac_gives_unicast_and_the_sender_is_learned_on_another_host() -> None:
    topo = three_host_bridge()
    sim = Sim(topo.view())
    sim.run(udp(mac(1), mac(2), "10.0.0.1", "10.0.0.2"), "vm1")
    reply = sim.run(udp(mac(2), mac(1), "10.0.0.2", "10.0.0.1"), "vm2")
    assert reply.actions == (Output(key(topo, "vm1")),)
    # The same packet simulated on h2 (the sender's host) tunnels to h1.
    remote = Sim(sim.view, host="h2", tables=sim.tables).run(
        udp(mac(2), mac(1), "10.0.0.2", "10.0.0.1"), "vm2"
    )
    assert remote.actions == (Tunnel("192.0.2.1", key(topo, "vm1")),)
    assert remote.learned == ()  # already known: re-learning publishes nothing


def test_broadcast_reads_only_the_group_bit_of_eth_dst() -> None:
    topo = three_host_bridge()
    sim = Sim(topo.view())
    result = sim.run(arp_who_has(mac(1), "10.0.0.1", "10.0.0.2"), "vm1")
    wildcard = result.wildcard()
    assert wildcard["eth_dst"] == 1 << 40
    assert "ip_dst" not in wildcard and "arp_tpa" not in wildcard
    assert len(result.actions) == 3


def test_mac_moving_to_another_port_is_relearned() -> None:
    topo = three_host_bridge()
    sim = Sim(topo.view())
    sim.run(udp(mac(1), mac(2), "10.0.0.1", "10.0.0.2"), "vm1")
    moved = sim.run(udp(mac(1), mac(2), "10.0.0.1", "10.0.0.2"), "vm4")
    assert moved.learned == (LearnedMac("b1", 0, mac_to_int(mac(1)), "vm4"),)


def test_destination_on_the_ingress_port_is_dropped() -> None:
    topo = three_host_bridge()
    sim = Sim(topo.view())
    sim.run(udp(mac(7), mac(1), "10.0.0.7", "10.0.0.1"), "vm1")  # learn mac 7 on vm1
    result = sim.run(udp(mac(1), mac(7), "10.0.0.1", "10.0.0.7"), "vm1")
    assert result.drop_reason == "same_port"
    assert result.actions == (Drop("same_port"),)


@pytest.mark.parametrize(
    ("where", "reason"),
    [("ingress", "port_down"), ("egress", "port_down"), ("bridge", "device_down")],
)
def test_admin_down(where: str, reason: str) -> None:
    topo = Topo()
    topo.bridge("b1", admin_state_up=where != "bridge")
    topo.vm_port("b1", "vm1", "h1", mac_n=1, admin_state_up=where != "ingress")
    topo.vm_port("b1", "vm2", "h1", mac_n=2, admin_state_up=where != "egress")
    sim = Sim(topo.view())
    sim.tables.macs[("b1", 0, mac_to_int(mac(2)))] = "vm2"
    result = sim.run(udp(mac(1), mac(2), "10.0.0.1", "10.0.0.2"), "vm1")
    assert result.drop_reason == reason
    assert result.actions == (Drop(reason),)


def test_flood_skips_a_down_port_silently() -> None:
    topo = Topo()
    topo.bridge("b1")
    topo.vm_port("b1", "vm1", "h1", mac_n=1)
    topo.vm_port("b1", "vm2", "h1", mac_n=2, admin_state_up=False)
    topo.vm_port("b1", "vm3", "h1", mac_n=3)
    result = Sim(topo.view()).run(udp(mac(1), mac(9), "10.0.0.1", "10.0.0.9"), "vm1")
    assert result.actions == (Output(key(topo, "vm3")),)
    assert "port:vm2" in result.tags  # bringing it up must invalidate the flood


def vlan_bridge() -> Topo:
    topo = Topo()
    topo.bridge("b1")
    topo.vm_port("b1", "a10", "h1", mac_n=1, vlan_id=10)
    topo.vm_port("b1", "b10", "h1", mac_n=2, vlan_id=10)
    topo.vm_port("b1", "a20", "h1", mac_n=3, vlan_id=20)
    topo.vm_port("b1", "trunk", "h1", mac_n=4)
    return topo


def test_vlan_access_port_floods_within_its_vlan_and_tags_on_the_trunk() -> None:
    topo = vlan_bridge()
    result = Sim(topo.view()).run(udp(mac(1), mac(9), "10.0.0.1", "10.0.0.9"), "a10")
    # Access ports leave untagged, the trunk copy carries VLAN 10; never VLAN 20.
    assert result.actions == (
        Output(key(topo, "b10")),
        PushVlan(10),
        Output(key(topo, "trunk")),
    )
    assert result.learned == (LearnedMac("b1", 10, mac_to_int(mac(1)), "a10"),)


def test_vlan_tagged_frame_from_trunk_reaches_access_ports_untagged() -> None:
    topo = vlan_bridge()
    sim = Sim(topo.view())
    result = sim.run(udp(mac(4), mac(9), "10.0.0.4", "10.0.0.9", vlan=20), "trunk")
    assert result.actions == (PopVlan(), Output(key(topo, "a20")))
    # Learned in VLAN 20 only: a VLAN-10 frame to that MAC still floods.
    to_trunk_host = sim.run(udp(mac(1), mac(4), "10.0.0.1", "10.0.0.4"), "a10")
    assert len(to_trunk_host.actions) == 3
    to_trunk_20 = sim.run(udp(mac(3), mac(4), "10.0.0.3", "10.0.0.4"), "a20")
    assert to_trunk_20.actions == (PushVlan(20), Output(key(topo, "trunk")))


def test_vlan_tagged_frame_on_access_port_is_dropped() -> None:
    topo = vlan_bridge()
    result = Sim(topo.view()).run(udp(mac(1), mac(2), "10.0.0.1", "10.0.0.2", vlan=10), "a10")
    assert result.drop_reason == "vlan_mismatch"


def test_untagged_trunk_frame_stays_off_access_ports() -> None:
    topo = vlan_bridge()
    result = Sim(topo.view()).run(udp(mac(4), mac(9), "10.0.0.4", "10.0.0.9"), "trunk")
    assert result.drop_reason == "no_output"  # VLAN 0 has no other port


def test_arp_proxy_answers_from_port_addresses() -> None:
    topo = Topo()
    topo.bridge("b1", arp_proxy=True)
    topo.vm_port("b1", "vm1", "h1", mac_n=1, addresses=("10.0.0.1/24",))
    topo.vm_port("b1", "vm2", "h2", mac_n=2, addresses=("10.0.0.2/24",))
    topo.zone(HOSTS)
    sim = Sim(topo.view())
    result = sim.run(arp_who_has(mac(1), "10.0.0.1", "10.0.0.2"), "vm1")
    assert result.drop_reason == "arp_proxied"
    assert not result.install
    (reply,) = result.generated
    assert reply.actions == (Output(key(topo, "vm1")),)
    arp = parse_frame(reply.frame).arp
    assert arp is not None and arp.operation == 2
    assert arp.sender_mac == mac_to_int(mac(2)) and arp.target_mac == mac_to_int(mac(1))
    # An address nobody owns is flooded as usual.
    unknown = sim.run(arp_who_has(mac(1), "10.0.0.1", "10.0.0.77"), "vm1")
    assert unknown.actions == (Tunnel("192.0.2.2", key(topo, "vm2")),)


def test_bridge_loop_is_cut_by_the_device_limit() -> None:
    from hivenet.model import DeviceKind, Port

    topo = Topo()
    topo.bridge("b1")
    topo.bridge("b2")
    topo.vm_port("b1", "vm1", "h1", mac_n=1)
    topo.vm_port("b2", "vm2", "h1", mac_n=2)
    for link in ("x", "y"):  # two parallel links: a broadcast loop
        topo.add(
            Port(
                id=f"b1-{link}", device_kind=DeviceKind.BRIDGE, device_id="b1", peer_id=f"b2-{link}"
            )
        )
        topo.add(
            Port(
                id=f"b2-{link}", device_kind=DeviceKind.BRIDGE, device_id="b2", peer_id=f"b1-{link}"
            )
        )
    result = Sim(topo.view()).run(udp(mac(1), mac(9), "10.0.0.1", "10.0.0.9"), "vm1")
    assert "device_limit" in result.format_trace()
    # Without spanning tree a looped frame also comes back to its sender; each port still
    # gets one copy (identical copies are merged) and the walk stays bounded.
    assert sorted(result.actions, key=str) == [Output(key(topo, "vm1")), Output(key(topo, "vm2"))]


def test_a_broadcast_arp_request_is_copied_only_to_hosts_with_a_port_on_the_bridge() -> None:
    """A flood of ARP requests (issue 16) reaches the hosts of the bridge's bound ports, not
    every host of the zone; without a router to answer it, one megaflow serves every target."""
    topo = three_host_bridge()
    topo.bridge("b2")
    topo.vm_port("b2", "elsewhere", "h4", mac_n=7)
    topo.zone({**HOSTS, "h4": "192.0.2.4"})
    sim = Sim(topo.view())
    result = sim.run(arp_who_has(mac(1), "10.0.0.1", "10.0.0.77"), "vm1")
    assert set(result.actions) == {
        Tunnel("192.0.2.2", key(topo, "vm2")),
        Tunnel("192.0.2.3", key(topo, "vm3")),
        Output(key(topo, "vm4")),
    }
    assert result.install
    other = sim.run(arp_who_has(mac(1), "10.0.0.1", "10.0.0.78"), "vm1")
    assert (other.masked_match, other.mask) == (result.masked_match, result.mask)
