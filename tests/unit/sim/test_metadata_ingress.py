"""The metadata service address at a VM port's ingress (sim/metadata.py): ARP for it is
answered with the service's MAC, TCP to its port 80 is handed to the host's proxy and never
cached, other traffic to it is dropped, every other flow of the port stays cacheable and
does not match the service address, and DHCP gives the VM a route to it. A host that does
not run the service behaves as before."""

from __future__ import annotations

import ipaddress

from hivenet.flowstate import ConntrackTable, FlowStateTransaction, NatTable, PortBlockAllocator
from hivenet.model import Direction, FixedIp, SecurityGroup, SecurityGroupRule, Subnet
from hivenet.packets import extract_flow_match
from hivenet.packets.dhcp import (
    DHCP_ACK,
    DHCP_REQUEST,
    OPTION_CLASSLESS_ROUTES,
    OPTION_REQUESTED_IP,
    DhcpMessage,
)
from hivenet.packets.parse import parse_frame
from hivenet.sim import MemoryTables, SimContext, SimulationResult, simulate
from hivenet.sim.metadata import HANDOFF_METADATA, METADATA_MAC
from hivenet.sim.stateful import TransactionHook
from tests.unit.sim.test_dhcp_ingress import VM_IP, dhcp_frame, topology
from tests.unit.sim.topo import Topo, arp_who_has, port_mac, tcp, udp

SERVICE = "169.254.169.254"


def run(topo: Topo, frame: bytes, port: str = "vm1", *, metadata: bool = True) -> SimulationResult:
    hook = TransactionHook(FlowStateTransaction(ConntrackTable(), NatTable(PortBlockAllocator())))
    context = SimContext(
        topology=topo.view(),
        tables=MemoryTables(),
        local_host_id="h1",
        flow_state=hook,
        metadata=metadata,
    )
    return simulate(frame, port, context, 0.0)


def to_service(topo: Topo, *, src: str = VM_IP, port: str = "vm1", dport: int = 80) -> bytes:
    return tcp(port_mac(topo, port), port_mac(topo, "r1-b1"), src, SERVICE, dport=dport)


def test_arp_for_the_service_is_answered_with_its_mac_out_of_the_same_port() -> None:
    topo = topology()
    result = run(topo, arp_who_has(port_mac(topo, "vm1"), VM_IP, SERVICE))
    assert not result.install and result.handoff is None
    (reply,) = result.generated
    arp = parse_frame(reply.frame).arp
    assert arp is not None and arp.operation == 2
    assert arp.sender_mac == METADATA_MAC and str(ipaddress.IPv4Address(arp.sender_ip)) == SERVICE
    assert arp.target_mac == port_mac(topo, "vm1")
    assert [a.port_key for a in reply.actions] == [topo.ports["vm1"].tunnel_key]  # type: ignore[attr-defined]


def test_http_to_the_service_is_handed_to_the_host_and_never_cached() -> None:
    topo = topology()
    result = run(topo, to_service(topo))
    assert result.handoff == HANDOFF_METADATA
    assert not result.install and not result.generated
    assert "metadata" in result.format_trace()


def test_other_traffic_to_the_service_address_is_dropped() -> None:
    topo = topology()
    frame = udp(port_mac(topo, "vm1"), port_mac(topo, "r1-b1"), VM_IP, SERVICE, dport=80)
    result = run(topo, frame)
    assert result.handoff is None and result.drop_reason == "metadata_not_http"
    result = run(topo, to_service(topo, dport=8080))
    assert result.handoff is None and result.drop_reason == "metadata_not_http"


def test_a_host_without_the_service_routes_the_address_like_any_other() -> None:
    topo = topology()
    result = run(topo, to_service(topo), metadata=False)
    assert result.handoff is None
    arp = run(topo, arp_who_has(port_mac(topo, "vm1"), VM_IP, SERVICE), metadata=False)
    assert not any(
        (parsed := parse_frame(g.frame).arp) is not None and parsed.sender_mac == METADATA_MAC
        for g in arp.generated
    )


def test_other_flows_stay_cached_and_never_match_the_service_address() -> None:
    topo = topology()
    frame = tcp(port_mac(topo, "vm1"), port_mac(topo, "vm2"), VM_IP, "10.0.1.30", dport=80)
    result = run(topo, frame)
    assert result.install and result.handoff is None
    service_match = extract_flow_match(to_service(topo), topo.ports["vm1"].tunnel_key)
    assert service_match.masked(result.mask) != result.masked_match
    # Only the leading bit that tells 10.x from 169.x is read, not the whole address.
    assert result.wildcard()["ip_dst"] == (1 << 128) - (1 << 31)


def test_port_security_drops_a_spoofed_source_before_the_service_sees_it() -> None:
    topo = Topo()
    topo.bridge("b1")
    topo.router("r1")
    topo.link("b1", "r1", "10.0.1.1/24")
    topo.add(SecurityGroup(id="sg"))
    topo.add(SecurityGroupRule(id="out", security_group_id="sg", direction=Direction.EGRESS))
    topo.vm_port(
        "b1",
        "vm1",
        mac_n=0xA01,
        addresses=(f"{VM_IP}/24",),
        port_security_enabled=True,
        security_group_ids=("sg",),
    )
    topo.zone({"h1": "192.168.100.1"})
    result = run(topo, to_service(topo, src="10.0.1.99"))
    assert result.handoff is None and result.drop_reason is not None
    assert run(topo, to_service(topo)).handoff == HANDOFF_METADATA


def _routes(result: SimulationResult) -> set[tuple[str, str]]:
    (reply,) = result.generated
    message = DhcpMessage.decode(parse_frame(reply.frame).payload)
    assert message.message_type == DHCP_ACK
    raw = message.option(OPTION_CLASSLESS_ROUTES)
    assert raw is not None
    routes, position = set(), 0
    while position < len(raw):
        width = raw[position]
        size = (width + 7) // 8
        network = raw[position + 1 : position + 1 + size].ljust(4, b"\0")
        router = raw[position + 1 + size : position + 5 + size]
        routes.add(
            (f"{ipaddress.IPv4Address(network)}/{width}", str(ipaddress.IPv4Address(router)))
        )
        position += 5 + size
    return routes


def _request(topo: Topo) -> bytes:
    return dhcp_frame(
        topo, "vm1", DHCP_REQUEST, (OPTION_REQUESTED_IP, ipaddress.IPv4Address(VM_IP).packed)
    )


def test_dhcp_routes_the_service_through_the_gateway() -> None:
    topo = topology()
    assert _routes(run(topo, _request(topo))) == {
        (f"{SERVICE}/32", "10.0.1.1"),
        ("0.0.0.0/0", "10.0.1.1"),
    }
    without = run(topo, _request(topo), metadata=False)
    message = DhcpMessage.decode(parse_frame(without.generated[0].frame).payload)
    assert message.option(OPTION_CLASSLESS_ROUTES) is None


def test_dhcp_routes_the_service_on_link_without_a_gateway() -> None:
    topo = _without_gateway()
    assert _routes(run(topo, _request(topo))) == {(f"{SERVICE}/32", "0.0.0.0")}


def _without_gateway() -> Topo:
    topo = Topo()
    topo.bridge("b1")
    topo.router("r1")
    topo.link("b1", "r1", "10.0.1.1/24")
    topo.add(
        Subnet.model_validate(
            {"id": "s1", "bridge_id": "b1", "cidr": "10.0.1.0/24", "gateway_ip": None}
        )
    )
    fixed = (FixedIp(subnet_id="s1", ip_address=ipaddress.IPv4Address(VM_IP)),)
    topo.vm_port("b1", "vm1", mac_n=0xA01, addresses=(f"{VM_IP}/24",), fixed_ips=fixed)
    topo.zone({"h1": "192.168.100.1"})
    return topo
