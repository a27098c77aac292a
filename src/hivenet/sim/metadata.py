"""The metadata service address (169.254.169.254) at a VM port's ingress.

A VM asks `http://169.254.169.254/` for its instance id, host name, SSH keys and user data
(cloud-init). HiveNet answers on the VM's own host, as MidoNet and OVN do: the simulation
recognises the service's traffic at the port where it enters, after port security, and
hands each such packet to the host agent (`SimulationResult.handoff == "metadata"`), whose
proxy (agent/metadata.py) forwards it to the local metadata server. Owns: which packets
are the service's (TCP to port 80 of the address; an ARP request for it is answered here
with `METADATA_MAC`, so a VM with an on-link route reaches it without a router), and the
megaflows of every other packet of a served port reading just enough of `ip_dst` to tell
it from the service address. Nothing is cached for the service's own packets.

Served ports: exterior bridge ports (VM ports) when the context says the host runs the
service (`SimContext.metadata`). Must not touch I/O, the clock, the store or the datapath.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from hivenet.model import DeviceKind
from hivenet.packets.flowmatch import (
    ETH_TYPE_ARP,
    ETH_TYPE_IPV4,
    FULL_MASKS,
    IP_PROTO_TCP,
)
from hivenet.sim import replies
from hivenet.sim.masks import differing_mask
from hivenet.sim.topology import PortInfo

if TYPE_CHECKING:
    from hivenet.sim.result import Here
    from hivenet.sim.walk import PacketState, Walk

METADATA_ADDRESS = ipaddress.IPv4Address("169.254.169.254")
METADATA_NETWORK = ipaddress.IPv4Network("169.254.169.254/32")
METADATA_TCP_PORT = 80
# The MAC the service answers ARP with (locally administered, unicast).
METADATA_MAC = 0xFA_16_3E_A9_FE_FE
HANDOFF_METADATA = "metadata"
ARP_REQUEST = 1

_ADDRESS = int(METADATA_ADDRESS)


def serves(walk: Walk, port: PortInfo) -> bool:
    """Whether packets of `port` may be the service's: a VM port on a host running it."""
    return (
        walk.ctx.metadata
        and port.device_kind is DeviceKind.BRIDGE
        and port.peer_id is None
        and not port.port.vlan_id
    )


def serve_at_ingress(walk: Walk, packet: PacketState, port: PortInfo, here: Here) -> bool:
    """Take `packet` if it is for the metadata service: an ARP request for its address is
    answered (True), TCP to its port 80 is handed to the host's proxy (True), anything
    else to the address is dropped (True). False: not the service's; the flow then reads
    only the bits of the destination that tell it from the service address."""
    if not serves(walk, port):
        return False
    walk.read(packet, "eth_type", FULL_MASKS["eth_type"])
    if packet.eth_type == ETH_TYPE_ARP:
        walk.read(packet, "arp_tpa", differing_mask(packet.arp_tpa, _ADDRESS, 32))
        if packet.arp_tpa != _ADDRESS:
            return False
        walk.no_cache("ARP for the metadata service is answered per packet", here.depth)
        for field in ("arp_op", "arp_spa", "arp_sha"):
            walk.read(packet, field, FULL_MASKS[field])
        if packet.arp_op == ARP_REQUEST:
            reply = replies.arp_reply(
                sender_mac=METADATA_MAC,
                sender_ip=_ADDRESS,
                target_mac=packet.arp_sha,
                target_ip=packet.arp_spa,
            )
            walk.reply(reply, port, f"ARP reply for {METADATA_ADDRESS}")
        walk.consume(here, "metadata_arp", f"ARP for the metadata service {METADATA_ADDRESS}")
        return True
    if packet.eth_type != ETH_TYPE_IPV4:
        return False
    walk.read(packet, "ip_dst", differing_mask(packet.ip_dst, _ADDRESS, 128))
    if packet.ip_dst != _ADDRESS:
        return False
    walk.no_cache("the metadata service takes every packet itself", here.depth)
    walk.read(packet, "ip_proto", FULL_MASKS["ip_proto"])
    walk.read(packet, "tp_dst", FULL_MASKS["tp_dst"])
    if packet.ip_proto != IP_PROTO_TCP or packet.tp_dst != METADATA_TCP_PORT:
        walk.drop(here, "metadata_not_http", f"{METADATA_ADDRESS} serves TCP port 80 only")
        return True
    walk.hand_off(here, HANDOFF_METADATA, f"to this host's metadata service {METADATA_ADDRESS}")
    return True
