"""A virtual bridge during a walk: `receive()` a packet that came in through one of its ports.

Owns VLAN admission (access vs trunk ports), MAC learning (into the walk's overlay and the
learned entries), the bridge's chains, the ARP proxy, unicast forwarding by static and
learned MACs, and flooding (one copy per eligible port, with the right 802.1Q tag).
Leaving through a port is `sim/ports.py`'s; chain evaluation is `sim/chains.py`'s.
Must not touch I/O, the clock, the store or the datapath.
"""

from __future__ import annotations

from hivenet.packets.flowmatch import ETH_TYPE_ARP, FULL_MASKS
from hivenet.sim import ports, replies
from hivenet.sim.chains import run_chain
from hivenet.sim.tables import LearnedMac, ip_text, mac_entry_tag, mac_text
from hivenet.sim.topology import BridgeInfo, PortInfo
from hivenet.sim.walk import MULTICAST_BIT, Here, PacketState, Walk, memo_tag, memo_value

ARP_REQUEST = 1
_mac_tag = memo_tag(mac_entry_tag)

_forward_text = memo_value(lambda mac, port_id: f"{mac_text(mac)} -> port {port_id}")

_FULL_VLAN = FULL_MASKS["vlan"]
_FULL_ETH_SRC = FULL_MASKS["eth_src"]
_FULL_ETH_DST = FULL_MASKS["eth_dst"]


def receive(
    walk: Walk, packet: PacketState, bridge: BridgeInfo, in_port: PortInfo, depth: int
) -> None:
    here = walk.enter("bridge", bridge, depth)
    if here is None:
        return
    # walk.read() of vlan and eth_src, inline (every bridge a packet crosses reads both).
    reads = walk.reads
    modified = packet.modified
    if "vlan" not in modified:
        reads["vlan"] = reads.get("vlan", 0) | _FULL_VLAN
    if in_port.vlan_id is not None:
        if packet.vlan:
            walk.drop(
                here,
                "vlan_mismatch",
                f"tagged frame (vlan {packet.vlan}) on access port {in_port.id}",
            )
            return
        vlan = in_port.vlan_id
    else:
        vlan = packet.vlan
    src = packet.eth_src
    if "eth_src" not in modified:
        reads["eth_src"] = reads.get("eth_src", 0) | _FULL_ETH_SRC
    if not src & MULTICAST_BIT and (vlan, src) not in bridge.static_macs:
        learn_mac(walk, bridge, vlan, src, in_port, here)
    if bridge.inbound_chain_id is not None and not run_chain(
        walk, packet, bridge.inbound_chain_id, in_port, None, in_port, depth
    ):
        return
    if bridge.arp_proxy and _answer_arp_proxy(walk, packet, bridge, in_port, here):
        return
    dst = packet.eth_dst
    if dst & MULTICAST_BIT:
        walk.read(packet, "eth_dst", MULTICAST_BIT)
        walk.step(here, "flood", f"multicast {mac_text(dst)}")
        flood(walk, packet, bridge, in_port, vlan, depth)
        return
    walk.read(packet, "eth_dst", _FULL_ETH_DST)  # (its multicast bit with the rest)
    out_port = _unicast_port(walk, bridge, vlan, dst)
    if out_port is None:
        walk.step(here, "flood", f"unknown unicast {mac_text(dst)}")
        flood(walk, packet, bridge, in_port, vlan, depth)
        return
    if out_port.id == in_port.id:
        walk.drop(here, "same_port", f"{mac_text(dst)} is on the ingress port")
        return
    walk.step(here, "forward", _forward_text((dst, out_port.id)))
    _send(walk, packet, bridge, in_port, out_port, vlan, depth, flooding=False)


def _unicast_port(walk: Walk, bridge: BridgeInfo, vlan: int, dst: int) -> PortInfo | None:
    """The bridge's port for `dst` (static, else learned), or None: flood it."""
    out_port_id = bridge.static_macs.get((vlan, dst))
    if out_port_id is None:
        key = (bridge.id, vlan, dst)
        walk.tags.add(_mac_tag(key))
        out_port_id = walk.mac_overlay.get(key)
        if out_port_id is None:
            out_port_id = walk.tables.mac_port(bridge.id, vlan, dst)
        walk.lookups.setdefault(("mac", bridge.id, vlan, dst), out_port_id)
    out_port = walk.view.ports.get(out_port_id) if out_port_id is not None else None
    if out_port is None or out_port.device_id != bridge.id:
        return None
    return out_port


def learn_mac(
    walk: Walk, bridge: BridgeInfo, vlan: int, mac: int, in_port: PortInfo, here: Here
) -> None:
    key = (bridge.id, vlan, mac)
    walk.tags.add(_mac_tag(key))
    known = walk.mac_overlay.get(key)
    if known is None:
        known = walk.tables.mac_port(bridge.id, vlan, mac)
    if known != in_port.id:
        walk.mac_overlay[key] = in_port.id
        walk.learned.append(LearnedMac(bridge.id, vlan, mac, in_port.id))
        walk.step(here, "learn", f"{mac_text(mac)} vlan {vlan} on port {in_port.id}")


def _answer_arp_proxy(
    walk: Walk, packet: PacketState, bridge: BridgeInfo, in_port: PortInfo, here: Here
) -> bool:
    """Answer an ARP request for an address the bridge proxies; True when answered."""
    walk.read(packet, "eth_type", FULL_MASKS["eth_type"])
    if packet.eth_type != ETH_TYPE_ARP:
        return False
    walk.read(packet, "arp_op", FULL_MASKS["arp_op"])
    if packet.arp_op != ARP_REQUEST:
        return False
    walk.read(packet, "arp_tpa", FULL_MASKS["arp_tpa"])
    mac = bridge.arp_proxy_entries.get(packet.arp_tpa)
    if mac is None:
        return False
    walk.read(packet, "arp_spa", FULL_MASKS["arp_spa"])
    walk.read(packet, "arp_sha", FULL_MASKS["arp_sha"])
    walk.no_cache("ARP proxy answers every request", here.depth)
    reply = replies.arp_reply(
        sender_mac=mac,
        sender_ip=packet.arp_tpa,
        target_mac=packet.arp_sha,
        target_ip=packet.arp_spa,
    )
    walk.step(here, "arp-proxy", f"{ip_text(4, packet.arp_tpa)} is-at {mac_text(mac)}")
    walk.reply(reply, in_port, "ARP reply (bridge proxy)")
    walk.drop_reasons.append("arp_proxied")
    return True


def flood(
    walk: Walk, packet: PacketState, bridge: BridgeInfo, in_port: PortInfo, vlan: int, depth: int
) -> None:
    """One copy out of every port of `vlan` but the ingress one (the flood set)."""
    all_ports = walk.view.ports
    for port_id in bridge.port_ids:
        if port_id == in_port.id:
            continue
        port = all_ports[port_id]
        if port.vlan_id is not None and port.vlan_id != vlan:
            continue
        if port.vlan_id is None and port.peer_id is None and not port.bound:
            walk.tags.add(port.tag)  # binding it later must widen the flood
            continue
        _send(walk, packet.copy(), bridge, in_port, port, vlan, depth, flooding=True)


def _send(
    walk: Walk,
    packet: PacketState,
    bridge: BridgeInfo,
    in_port: PortInfo,
    out_port: PortInfo,
    vlan: int,
    depth: int,
    *,
    flooding: bool,
) -> None:
    """Through the bridge's outbound chain, tagged for `out_port`, out of it."""
    if bridge.outbound_chain_id is not None and not run_chain(
        walk, packet, bridge.outbound_chain_id, in_port, out_port.id, in_port, depth
    ):
        return
    wanted_tag = 0 if out_port.vlan_id is not None else vlan
    if packet.vlan != wanted_tag:
        packet.vlan = wanted_tag
        packet.modified.add("vlan")
    ports.egress(walk, packet, out_port, in_port, depth, flooding=flooding)
