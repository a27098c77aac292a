"""DHCP answered at port ingress by the simulation: a generated reply straight back out of the
VM's own port (nothing crosses the bridge), never cached, counted by verdict; ports the
responder does not serve keep today's behaviour (the request floods on the bridge)."""

from __future__ import annotations

import ipaddress
from typing import Any

from hivenet.flows.actions import Output
from hivenet.flowstate import ConntrackTable, FlowStateTransaction, NatTable, PortBlockAllocator
from hivenet.model import FixedIp, Subnet
from hivenet.packets import build_udp_datagram, extract_flow_match
from hivenet.packets.dhcp import (
    DHCP_ACK,
    DHCP_CLIENT_PORT,
    DHCP_DISCOVER,
    DHCP_NAK,
    DHCP_OFFER,
    DHCP_REQUEST,
    DHCP_SERVER_PORT,
    OPTION_INTERFACE_MTU,
    OPTION_REQUESTED_IP,
    DhcpMessage,
    addresses_option,
    build_dhcp_request_message,
)
from hivenet.packets.parse import parse_frame
from hivenet.sim import MemoryTables, SimContext, SimulationResult, simulate
from hivenet.sim.dhcp import DhcpBudget
from hivenet.sim.stateful import TransactionHook
from tests.unit.sim.topo import Topo, port_mac, udp

VM_IP = "10.0.1.20"


def topology(*, dhcp: bool = True, security: bool = False, **bridge: Any) -> Topo:
    topo = Topo()
    topo.bridge("b1", **bridge)
    topo.router("r1")
    topo.link("b1", "r1", "10.0.1.1/24")
    topo.add(
        Subnet.model_validate(
            {
                "id": "s1",
                "bridge_id": "b1",
                "cidr": "10.0.1.0/24",
                "enable_dhcp": dhcp,
                "dns_nameservers": ["10.0.1.53"],
            }
        )
    )
    fixed = (FixedIp(subnet_id="s1", ip_address=ipaddress.IPv4Address(VM_IP)),)
    extra: dict[str, Any] = {"port_security_enabled": security}
    topo.vm_port("b1", "vm1", mac_n=0xA01, addresses=(f"{VM_IP}/24",), fixed_ips=fixed, **extra)
    # vm2: no fixed IP, and no port security (whose guard reads the UDP ports of every frame).
    topo.vm_port("b1", "vm2", mac_n=0xA02, addresses=("10.0.1.30/24",), port_security_enabled=False)
    topo.vm_port("b1", "vm3", "h2", mac_n=0xA03, addresses=("10.0.1.40/24",))
    topo.zone({"h1": "192.168.100.1", "h2": "192.168.100.2"})
    return topo


def dhcp_frame(
    topo: Topo,
    port: str,
    message_type: int,
    *options: tuple[int, bytes],
    src: str = "0.0.0.0",
    dst: str = "255.255.255.255",
    dst_mac: int | str = "ff:ff:ff:ff:ff:ff",
    ciaddr: int = 0,
) -> bytes:
    mac = port_mac(topo, port)
    message = build_dhcp_request_message(
        client_mac=mac, xid=77, message_type=message_type, options=options, ciaddr=ciaddr
    )
    return build_udp_datagram(
        eth_src=mac,
        eth_dst=dst_mac,
        ip_src=src,
        ip_dst=dst,
        src_port=DHCP_CLIENT_PORT,
        dst_port=DHCP_SERVER_PORT,
        payload=message.encode(),
    )


def run(topo: Topo, frame: bytes, port: str, ctx: SimContext | None = None) -> SimulationResult:
    view = topo.view()
    # Port security needs connection tracking: give the walk real (empty) flow-state tables.
    hook = TransactionHook(FlowStateTransaction(ConntrackTable(), NatTable(PortBlockAllocator())))
    context = ctx or SimContext(
        topology=view, tables=MemoryTables(), local_host_id="h1", flow_state=hook
    )
    return simulate(frame, port, context, 0.0)


def reply_of(result: SimulationResult) -> tuple[DhcpMessage, Any]:
    assert len(result.generated) == 1, result.format_trace()
    generated = result.generated[0]
    parsed = parse_frame(generated.frame)
    return DhcpMessage.decode(parsed.payload), generated


def test_discover_is_answered_out_of_the_same_port_only() -> None:
    topo = topology()
    result = run(topo, dhcp_frame(topo, "vm1", DHCP_DISCOVER), "vm1")
    assert result.drop_reason == "dhcp_offer" and not result.install
    offer, generated = reply_of(result)
    assert offer.message_type == DHCP_OFFER
    assert offer.yiaddr == int(ipaddress.ip_address(VM_IP))
    assert offer.option(OPTION_INTERFACE_MTU) == (1450).to_bytes(2, "big")
    assert generated.actions == (Output(topo.ports["vm1"].tunnel_key),)
    # The reply comes from the gateway's router port, addressed as RFC 2131 says.
    frame = parse_frame(generated.frame)
    assert frame.ethernet.src == port_mac(topo, "r1-b1")


def test_renewal_unicast_to_the_gateway_is_acked_and_another_address_naked() -> None:
    topo = topology()
    renew = dhcp_frame(
        topo,
        "vm1",
        DHCP_REQUEST,
        src=VM_IP,
        dst="10.0.1.1",
        dst_mac=port_mac(topo, "r1-b1"),
        ciaddr=int(ipaddress.ip_address(VM_IP)),
    )
    ack, _ = reply_of(run(topo, renew, "vm1"))
    assert ack.message_type == DHCP_ACK
    other = dhcp_frame(
        topo, "vm1", DHCP_REQUEST, addresses_option(OPTION_REQUESTED_IP, "10.0.1.30")
    )
    result = run(topo, other, "vm1")
    nak, _ = reply_of(result)
    assert nak.message_type == DHCP_NAK and nak.yiaddr == 0
    assert result.drop_reason == "dhcp_nak"


def test_unserved_ports_and_disabled_subnets_flood_as_before() -> None:
    topo = topology()
    result = run(topo, dhcp_frame(topo, "vm2", DHCP_DISCOVER), "vm2")  # no fixed IP
    assert result.generated == () and result.drop_reason is None
    assert Output(topo.ports["vm1"].tunnel_key) in result.actions  # flooded on the bridge
    off = topology(dhcp=False)
    assert run(off, dhcp_frame(off, "vm1", DHCP_DISCOVER), "vm1").generated == ()
    # A flow of a port on a subnet without DHCP depends on that subnet: turning DHCP on
    # invalidates it (it read no tp_dst bits that would keep DHCP apart).
    plain = udp(port_mac(off, "vm1"), port_mac(off, "vm3"), VM_IP, "10.0.1.40", dport=67)
    cached = run(off, plain, "vm1")
    assert cached.install and "subnet:s1" in cached.tags
    # A port without fixed IPs reads nothing for DHCP.
    unserved = udp(port_mac(topo, "vm2"), port_mac(topo, "vm3"), "10.0.1.30", "10.0.1.40")
    assert "tp_dst" not in run(topo, unserved, "vm2").wildcard()


def test_port_security_lets_dhcp_in_and_still_blocks_a_vm_server() -> None:
    topo = topology(security=True)
    offer, _ = reply_of(run(topo, dhcp_frame(topo, "vm1", DHCP_DISCOVER), "vm1"))
    assert offer.message_type == DHCP_OFFER
    rogue = build_udp_datagram(
        eth_src=port_mac(topo, "vm1"),
        eth_dst="ff:ff:ff:ff:ff:ff",
        ip_src=VM_IP,
        ip_dst="255.255.255.255",
        src_port=DHCP_SERVER_PORT,
        dst_port=DHCP_CLIENT_PORT,
        payload=b"\x02" * 300,
    )
    assert run(topo, rogue, "vm1").drop_reason == "spoofed_dhcp_server"


def test_malformed_dhcp_is_dropped_and_counted_never_answered() -> None:
    topo = topology()
    mac = port_mac(topo, "vm1")
    for payload in (b"", b"\x01" * 50, dhcp_frame(topo, "vm1", DHCP_DISCOVER)[42:200]):
        frame = build_udp_datagram(
            eth_src=mac,
            eth_dst="ff:ff:ff:ff:ff:ff",
            ip_src="0.0.0.0",
            ip_dst="255.255.255.255",
            src_port=DHCP_CLIENT_PORT,
            dst_port=DHCP_SERVER_PORT,
            payload=payload,
        )
        result = run(topo, frame, "vm1")
        assert result.drop_reason == "dhcp_malformed" and result.generated == ()
        assert not result.install


def test_a_discover_flood_spends_the_port_budget() -> None:
    topo = topology()
    view = topo.view()
    ctx = SimContext(
        topology=view,
        tables=MemoryTables(),
        local_host_id="h1",
        dhcp_budget=DhcpBudget(burst=3, rate=1.0),
    )
    frame = dhcp_frame(topo, "vm1", DHCP_DISCOVER)
    reasons = [simulate(frame, "vm1", ctx, 100.0).drop_reason for _ in range(5)]
    assert reasons == ["dhcp_offer"] * 3 + ["dhcp_over_budget"] * 2
    assert simulate(frame, "vm1", ctx, 101.0).drop_reason == "dhcp_offer"


def test_ordinary_udp_megaflows_do_not_pin_every_destination_port() -> None:
    """The DHCP check reads only the tp_dst bits that tell a port apart from 67."""
    topo = topology()
    frame = udp(port_mac(topo, "vm1"), port_mac(topo, "vm3"), VM_IP, "10.0.1.40", dport=5001)
    result = run(topo, frame, "vm1")
    assert result.install and result.drop_reason is None
    tp_dst_mask = result.wildcard().get("tp_dst", 0)
    assert tp_dst_mask not in (-1, 0xFFFF)
    # Every port the flow covers is not the DHCP server port.
    covered = extract_flow_match(frame, 0).tp_dst & tp_dst_mask
    assert DHCP_SERVER_PORT & tp_dst_mask != covered


def test_the_mtu_follows_the_bridge_and_the_underlay() -> None:
    topo = topology(mtu=1400)
    offer, _ = reply_of(run(topo, dhcp_frame(topo, "vm1", DHCP_DISCOVER), "vm1"))
    assert offer.option(OPTION_INTERFACE_MTU) == (1400).to_bytes(2, "big")
    plain = topology()
    ctx = SimContext(
        topology=plain.view(), tables=MemoryTables(), local_host_id="h1", underlay_mtu=9000
    )
    big, _ = reply_of(run(plain, dhcp_frame(plain, "vm1", DHCP_DISCOVER), "vm1", ctx))
    assert big.option(OPTION_INTERFACE_MTU) == (8950).to_bytes(2, "big")
