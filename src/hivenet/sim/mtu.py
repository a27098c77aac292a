"""The MTU at the overlay's edge: an IP packet leaving the overlay (to a local interface or a
tunnel to the egress host) must fit the egress network's MTU.

Owns the egress MTU of an exterior port (its bridge's `mtu`, else the underlay MTU less the
VXLAN overhead, as DHCP option 26 hands out: `model.subnet.overlay_mtu`; a tunnel never carries
more than the local underlay fits), the check of one emission against it, and the answer to a
packet that does not fit:
- IPv4 with DF, IPv6: ICMP "fragmentation needed" (type 3 code 4, RFC 1191) / ICMPv6 "packet
  too big" with the MTU, back to the sender's port. A routed packet is answered by the first
  router it entered, from that router port's address (on the sender's subnet, so the error
  goes straight back); a bridged one on the destination's behalf (source: the packet's
  destination IP and MAC), as a firewall's reject is. Drop reason `frag_needed`.
- IPv4 without DF: dropped, `too_big` (HiveNet does not fragment).
- a generated packet that does not fit is dropped, never answered; a flood copy is skipped,
  and answered (once per packet) only when the packet was unicast (a MAC the bridge has not
  learned yet), never for a broadcast or multicast (RFC 1812 4.3.2.7).
Sizes are not flow-match fields, so a packet that does not fit is never cached, and a result
that is installed carries the smallest MTU of its outputs (`Walk.mtu` -> `SimulationResult.mtu`):
the datapath sends a bigger packet hitting that flow back here (see `Datapath.install_flow`).
Must not touch I/O, the clock, the store or the datapath.
"""

from __future__ import annotations

from hivenet.model import DeviceKind
from hivenet.model.subnet import overlay_mtu
from hivenet.sim.topology import PortInfo
from hivenet.sim.walk import MULTICAST_BIT, Here, PacketState, Walk

_BRIDGE = DeviceKind.BRIDGE


def egress_mtu(walk: Walk, port: PortInfo, *, tunnel: bool) -> int:
    """The MTU an IP packet leaving the overlay through exterior `port` must fit (0: none
    known, e.g. a router's exterior port delivered locally)."""
    room = overlay_mtu(None, walk.ctx.underlay_mtu)  # what one VXLAN packet carries
    limit = 0
    if port.device_kind is _BRIDGE:
        bridge = walk.view.bridges.get(port.device_id)
        if bridge is not None:
            bridge_mtu = bridge.bridge.mtu  # overlay_mtu(bridge_mtu, underlay), one call less
            limit = bridge_mtu if bridge_mtu is not None else room
    if tunnel:
        limit = min(limit, room) if limit else room
    return limit


def admit(walk: Walk, packet: PacketState, limit: int, here: Here, *, flooding: bool) -> bool:
    """Whether the packet fits `limit` and may be emitted; if not, it is answered or dropped
    here (see the module doc) and the result is not cached."""
    walk.mtu = min(walk.mtu, limit) if walk.mtu else limit
    size = walk.ip_size()
    if size is None:
        return True
    version, length, may_fragment = size
    if length <= limit:
        return True
    walk.no_cache("the packet is larger than the egress MTU", here.depth)
    detail = f"{length} bytes > mtu {limit}"
    if may_fragment:
        _refuse(walk, here, "too_big", f"{detail}, DF clear (HiveNet does not fragment)", flooding)
        return False
    if walk.generation or (flooding and walk.match.eth_dst & MULTICAST_BIT):
        _refuse(walk, here, "too_big", detail, flooding)
        return False
    if not walk.mtu_answered:
        walk.mtu_answered = True
        kind = "fragmentation needed" if version == 4 else "packet too big"
        _answer(walk, packet, limit, f"ICMP {kind} (mtu {limit})")
    _refuse(walk, here, "frag_needed", detail, flooding)
    return False


def _refuse(walk: Walk, here: Here, reason: str, detail: str, flooding: bool) -> None:
    if flooding:  # the other copies still go; the reason counts if none does
        walk.drop_reasons.append(reason)
        walk.step(here, "skip", f"{reason}: {detail}")
    else:
        walk.drop(here, reason, detail)


def _answer(walk: Walk, packet: PacketState, limit: int, description: str) -> None:
    first = packet.first_router
    if first is not None:
        router_port, entered = first
        seen = walk.frame_as_seen(entered)
        reply = walk.icmp_error(entered, seen, "frag_needed", router_port, mtu=limit)
        if reply is not None:
            walk.reply(reply, router_port, description)
        return
    sender_port = walk.ingress_port
    if sender_port is None:
        return
    reply = walk.icmp_error(packet, walk.frame, "frag_needed", None, mtu=limit)
    if reply is not None:
        walk.reply(reply, sender_port, description)
