"""DHCP through real agents: a VM port whose address IPAM gave gets OFFER/ACK from its own
host's agent (nothing reaches other hosts), the answer follows an address change at the next
renewal, and every message is counted by verdict."""

from __future__ import annotations

import ipaddress

from hivenet.model import Bridge, DeviceKind, FixedIp, Port, Subnet
from hivenet.packets import build_udp_datagram
from hivenet.packets.dhcp import (
    DHCP_ACK,
    DHCP_CLIENT_PORT,
    DHCP_DISCOVER,
    DHCP_NAK,
    DHCP_OFFER,
    DHCP_REQUEST,
    DHCP_SERVER_PORT,
    DhcpMessage,
    build_dhcp_request_message,
)
from hivenet.packets.parse import parse_frame
from hivenet.store.topology import TopologyRepository
from tests.integration.agent.test_agents import cloud, received
from tests.integration.common import run

MAC = "02:00:00:00:0d:01"


def dhcp(message_type: int, ciaddr: str = "0.0.0.0") -> bytes:
    message = build_dhcp_request_message(
        client_mac=MAC,
        xid=5,
        message_type=message_type,
        ciaddr=int(ipaddress.ip_address(ciaddr)),
    )
    return build_udp_datagram(
        eth_src=MAC,
        eth_dst="ff:ff:ff:ff:ff:ff",
        ip_src=ciaddr,
        ip_dst="255.255.255.255",
        src_port=DHCP_CLIENT_PORT,
        dst_port=DHCP_SERVER_PORT,
        payload=message.encode(),
    )


async def on_subnet(
    repo: TopologyRepository, bridge: Bridge, subnet: Subnet, host: str, ifname: str, mac: str
) -> Port:
    """A VM port bound on `host` whose address IPAM allocates on `subnet`."""
    port = Port(
        device_kind=DeviceKind.BRIDGE,
        device_id=bridge.id,
        host_id=host,
        interface_name=ifname,
        mac=mac,
        fixed_ips=(FixedIp(subnet_id=subnet.id),),
    )
    return (await repo.create(port)).obj


def replies(frames: list[bytes]) -> list[DhcpMessage]:
    return [DhcpMessage.decode(parse_frame(frame).payload) for frame in frames]


def test_the_local_agent_answers_and_follows_the_model() -> None:
    async def scenario() -> None:
        async with cloud("memory://") as c:
            bridge = (await c.repo.create(Bridge(name="net1", mtu=1400))).obj
            subnet = Subnet.model_validate(
                {"bridge_id": bridge.id, "cidr": "10.5.0.0/24", "dns_nameservers": ["10.5.0.53"]}
            )
            await c.repo.create(subnet)
            vm = await on_subnet(c.repo, bridge, subnet, "h1", "hnvm1", MAC)
            other = await on_subnet(c.repo, bridge, subnet, "h2", "hnvm2", "02:00:00:00:0d:02")
            for host in ("h1", "h2"):
                await c.start_agent(host)
            await c.synced()

            c.datapaths["h1"].receive(vm.tunnel_key, dhcp(DHCP_DISCOVER))
            (offer,) = replies(received(c, "h1", vm))
            assert offer.message_type == DHCP_OFFER
            assert ipaddress.IPv4Address(offer.yiaddr) == ipaddress.IPv4Address("10.5.0.2")
            assert offer.option(26) == (1400).to_bytes(2, "big")
            assert received(c, "h2", other) == []  # nothing left the host

            # The address changes in the store: the next renewal NAKs, a new DISCOVER offers it.
            await c.repo.modify(
                Port,
                vm.id,
                lambda p: p.model_copy(
                    update={
                        "fixed_ips": (
                            FixedIp(
                                subnet_id=subnet.id, ip_address=ipaddress.ip_address("10.5.0.77")
                            ),
                        )
                    }
                ),
            )
            await c.synced()
            c.datapaths["h1"].receive(vm.tunnel_key, dhcp(DHCP_REQUEST, ciaddr="10.5.0.2"))
            (nak,) = replies(received(c, "h1", vm))
            assert nak.message_type == DHCP_NAK
            c.datapaths["h1"].receive(vm.tunnel_key, dhcp(DHCP_REQUEST, ciaddr="10.5.0.77"))
            (ack,) = replies(received(c, "h1", vm))
            assert ack.message_type == DHCP_ACK
            assert ipaddress.IPv4Address(ack.yiaddr) == ipaddress.IPv4Address("10.5.0.77")

            # A flood: answered up to the budget, then counted and dropped.
            for _ in range(30):
                c.datapaths["h1"].receive(vm.tunnel_key, dhcp(DHCP_DISCOVER))
            answered = len(received(c, "h1", vm))
            counters = c.agents["h1"].pipeline.counters()
            assert 0 < answered < 30
            assert counters["drop.dhcp_over_budget"] == 30 - answered
            assert counters["drop.dhcp_offer"] == 1 + answered
            assert counters["drop.dhcp_nak"] == 1 and counters["drop.dhcp_ack"] == 1

    run(scenario())
