"""The L2 gateway in the simulation: a bridge port bound to a VLAN of its interface, and a
bridge port that stands for an external VXLAN VTEP."""

from __future__ import annotations

from hivenet.flows.actions import Output, PopVlan, PushVlan, Tunnel
from hivenet.model import DeviceKind, Port
from hivenet.model.types import mac_to_int
from hivenet.sim import LearnedMac
from tests.unit.sim.topo import Sim, Topo, arp_who_has, mac, udp

HOSTS = {"h1": "192.0.2.1", "h2": "192.0.2.2", "h3": "192.0.2.3"}
VTEP_IP, VNI = "192.0.2.200", 7000


def gateway_bridge() -> Topo:
    """b1: vm1 on h1, vm2 on h2, `vlan` bound on h3 to VLAN 100 of its interface, `vtep` an
    external VTEP."""
    topo = Topo()
    topo.bridge("b1")
    topo.vm_port("b1", "vm1", "h1", mac_n=1)
    topo.vm_port("b1", "vm2", "h2", mac_n=2)
    topo.vm_port("b1", "vlan", "h3", mac_n=3, interface_vlan=100)
    topo.add(
        Port(
            id="vtep",
            device_kind=DeviceKind.BRIDGE,
            device_id="b1",
            vtep_ip=VTEP_IP,
            vtep_vni=VNI,
            tunnel_key=topo.key(),
        )
    )
    topo.zone(HOSTS)
    return topo


def key(topo: Topo, port_id: str) -> int:
    return topo.ports[port_id].tunnel_key


def tags_at_outputs(actions: tuple[object, ...], tag: int = 0) -> dict[object, int]:
    """Each output action -> the 802.1Q tag the frame carries there (0: none), starting from
    the frame's own `tag`."""
    seen = {}
    for action in actions:
        if isinstance(action, PushVlan):
            tag = action.vlan
        elif isinstance(action, PopVlan):
            tag = 0
        elif isinstance(action, Output | Tunnel):
            seen[action] = tag
    return seen


def test_a_flood_reaches_the_vtep_by_head_end_replication_and_the_vlan_port_tagged() -> None:
    topo = gateway_bridge()
    result = Sim(topo.view()).run(arp_who_has(mac(1), "10.0.0.1", "10.0.0.9"), "vm1")
    assert tags_at_outputs(result.actions) == {
        Tunnel("192.0.2.2", key(topo, "vm2")): 0,
        Tunnel(VTEP_IP, VNI): 0,  # straight from the ingress host, with the VTEP's VNI
        Tunnel("192.0.2.3", key(topo, "vlan")): 100,
    }


def test_unicast_to_a_mac_learned_on_the_vtep_is_tunnelled_to_it_from_any_host() -> None:
    topo = gateway_bridge()
    sim = Sim(topo.view(), host="h2")
    sim.run(udp(mac(2), mac(9), "10.0.0.2", "10.0.0.9"), "vm2")  # b1 learns vm2
    learned = sim.run(udp(mac(7), mac(2), "10.0.0.7", "10.0.0.2"), "vtep")
    # The VTEP's frame entered b1 on h2 (where the VTEP sent it): delivered and learned.
    assert learned.actions == (Output(key(topo, "vm2")),)
    assert learned.learned == (LearnedMac("b1", 0, mac_to_int(mac(7)), "vtep"),)
    reply = Sim(sim.view, host="h1", tables=sim.tables).run(
        udp(mac(1), mac(7), "10.0.0.1", "10.0.0.7"), "vm1"
    )
    assert reply.actions == (Tunnel(VTEP_IP, VNI),)
    assert sim.view.port_by_tunnel_key[VNI] == "vtep"  # traces and counters name it


def test_a_vtep_frame_is_never_flooded_back_to_the_vtep() -> None:
    topo = gateway_bridge()
    result = Sim(topo.view(), host="h3").run(arp_who_has(mac(7), "10.0.0.7", "10.0.0.1"), "vtep")
    assert Tunnel(VTEP_IP, VNI) not in result.actions
    assert Output(key(topo, "vlan")) in result.actions


def test_the_vlan_port_takes_its_vlan_untags_it_and_drops_anything_else() -> None:
    topo = gateway_bridge()
    sim = Sim(topo.view(), host="h3")
    sim.run(udp(mac(1), mac(9), "10.0.0.1", "10.0.0.9"), "vm1")  # b1 learns vm1
    tagged = sim.run(udp(mac(3), mac(1), "10.0.0.3", "10.0.0.1", vlan=100), "vlan")
    assert tagged.actions == (PopVlan(), Tunnel("192.0.2.1", key(topo, "vm1")))
    assert tagged.wildcard()["vlan"] == -1  # the flow is for VLAN 100 only (full width)
    for other in (0, 200):
        dropped = sim.run(udp(mac(3), mac(1), "10.0.0.3", "10.0.0.1", vlan=other), "vlan")
        assert dropped.drop_reason == "vlan_mismatch"


def test_unicast_to_the_vlan_port_is_tagged() -> None:
    topo = gateway_bridge()
    sim = Sim(topo.view(), host="h3")
    sim.run(udp(mac(3), mac(1), "10.0.0.3", "10.0.0.1", vlan=100), "vlan")  # learn mac(3)
    back = Sim(sim.view, host="h1", tables=sim.tables).run(
        udp(mac(1), mac(3), "10.0.0.1", "10.0.0.3"), "vm1"
    )
    assert back.actions == (PushVlan(100), Tunnel("192.0.2.3", key(topo, "vlan")))


def test_a_frame_tagged_inside_a_vlan_aware_bridge_is_not_double_tagged() -> None:
    topo = gateway_bridge()
    topo.vm_port("b1", "trunk", "h1", mac_n=5)  # no vlan_id: a trunk of b1
    flood = Sim(topo.view()).run(udp(mac(5), mac(8), "10.0.0.5", "10.0.0.8", vlan=7), "trunk")
    assert flood.drop_reason is None
    outputs = tags_at_outputs(flood.actions, tag=7)
    assert Tunnel("192.0.2.3", key(topo, "vlan")) not in outputs  # skipped: no QinQ
    assert outputs[Tunnel(VTEP_IP, VNI)] == 7  # the other copies keep the bridge's tag
    assert any(step.event == "skip" and "on vlan 100" in step.detail for step in flood.trace)
