"""Virtual ports during a walk: a packet entering a device through a port (`ingress`) and
leaving one (`egress`), to a peer port (interior) or out of the overlay (exterior: a local
interface or a tunnel to the port's host).

Owns port admin state and binding, port security (anti-spoofing and the security-group
chains of a VM port), the port's own inbound/outbound chains, the device budget (loop
protection), the egress MTU check of what leaves the overlay (`sim/mtu.py`) and the hand-off
to the device behind the port (`sim/bridge.py`,
`sim/router.py`). Port-ingress services (answering a local port's own requests before any
device sees them) belong in `ingress`, after port security: DHCP (`sim/dhcp.py`), the metadata service (`sim/metadata.py`).
Must not touch I/O, the clock, the store or the datapath.
"""

from __future__ import annotations

from sys import intern

from hivenet.flows.actions import Output, Tunnel
from hivenet.model import DeviceKind
from hivenet.packets.flowmatch import FULL_MASKS
from hivenet.sim import bridge as bridge_device
from hivenet.sim import dhcp, metadata, mtu
from hivenet.sim import router as router_device
from hivenet.sim.chains import run_chain
from hivenet.sim.result import TraceStep
from hivenet.sim.secgroups import spoof_reason
from hivenet.sim.topology import PortInfo
from hivenet.sim.walk import MAX_DEVICES_PER_SIMULATION, Here, PacketState, Walk, memo_value

_new_tuple = tuple.__new__  # Here(...) without the NamedTuple's Python-level __new__
_INTO = {kind: f"into {kind.value}" for kind in DeviceKind}
_BRIDGE = DeviceKind.BRIDGE
_HOST_TAGS: dict[str, str] = {}  # "host:<id>" by host id (a few per deployment)


def _output_to(key: int) -> tuple[Output, str]:
    return Output(key), f"output to local port key {key}"


def _tunnel_to(host_id: str, underlay_ip: str, key: int) -> tuple[Tunnel, str]:
    return Tunnel(underlay_ip, key), f"tunnel to host {host_id} ({underlay_ip}) key {key}"


# An exterior port's action and its trace text, by the values they are made of.
_output_action = memo_value(_output_to)
_tunnel_action = memo_value(_tunnel_to)


def ingress(walk: Walk, packet: PacketState, port_id: str, depth: int) -> None:
    """`packet` enters the topology (or the next device) through port `port_id`."""
    view = walk.view
    port = view.ports.get(port_id)
    if port is None:
        walk.tags.add(intern(f"port:{port_id}"))
        walk.drop(Here("port", port_id, port_id, depth), "unknown_port", "port not in topology")
        return
    walk.tags.add(port.tag)
    here = _new_tuple(Here, ("port", port.id, port.name, depth))
    walk.trace.append(_new_tuple(TraceStep, (here, "ingress", _INTO[port.device_kind])))
    if not port.admin_up:
        walk.drop(here, "port_down", "ingress port is down")
        return
    if port.interface_vlan is not None and not _pop_interface_vlan(walk, packet, port, here):
        return
    guard = view.security.guards.get(port.id)
    if guard is not None:
        spoofed = spoof_reason(guard, packet, walk.full_reader(packet))
        if spoofed is not None:
            walk.drop(here, spoofed, "port security")
            return
        if guard.from_vm_chain_id is not None and not run_chain(
            walk, packet, guard.from_vm_chain_id, port, None, port, depth
        ):
            return
    # Port-ingress services answer a VM's own requests: exterior ports only (both check it
    # first and leave an interior port's packet untouched: not asked at all here).
    if port.peer_id is None and (
        dhcp.serve_at_ingress(walk, packet, port, here)
        or (walk.ctx.metadata and metadata.serve_at_ingress(walk, packet, port, here))
    ):
        return
    if port.inbound_chain_id is not None and not run_chain(
        walk, packet, port.inbound_chain_id, port, None, port, depth
    ):
        return
    depth += 1
    walk.device_budget -= 1
    limit = walk.ctx.max_devices_per_path
    if depth > limit or walk.device_budget < 0:
        walk.drop(
            here._replace(depth=depth),
            "device_limit",
            f"more than {limit} devices on the path (loop?)"
            if walk.device_budget >= 0
            else f"more than {MAX_DEVICES_PER_SIMULATION} devices in one simulation",
        )
        return
    if port.device_kind is _BRIDGE:
        bridge = view.bridges.get(port.device_id)
        if bridge is not None:
            bridge_device.receive(walk, packet, bridge, port, depth)
            return
    else:
        router = view.routers.get(port.device_id)
        if router is not None:
            router_device.receive(walk, packet, router, port, depth)
            return
    walk.tags.add(intern(f"{port.device_kind.value}:{port.device_id}"))
    walk.drop(here._replace(depth=depth), "unknown_device", port.device_id)


def egress(
    walk: Walk,
    packet: PacketState,
    port: PortInfo,
    device_in_port: PortInfo,
    depth: int,
    *,
    flooding: bool = False,
) -> None:
    """`packet` leaves its device through `port` (it came in by `device_in_port`); a
    flood copy skips a port that cannot take it instead of dropping the whole packet."""
    walk.tags.add(port.tag)
    here = _new_tuple(Here, ("port", port.id, port.name, depth))
    if not port.admin_up:
        if flooding:
            walk.step(here, "skip", "port is down")
        else:
            walk.drop(here, "port_down", "egress port is down")
        return
    if port.peer_id is None and not port.bound:
        if flooding:
            walk.step(here, "skip", "exterior port not bound")
        else:
            walk.drop(here, "port_unbound", "egress port not bound")
        return
    if port.outbound_chain_id is not None and not run_chain(
        walk, packet, port.outbound_chain_id, device_in_port, port.id, device_in_port, depth
    ):
        return
    guard = walk.view.security.guards.get(port.id)
    if (
        guard is not None
        and guard.to_vm_chain_id is not None
        and not run_chain(
            walk, packet, guard.to_vm_chain_id, device_in_port, port.id, device_in_port, depth
        )
    ):
        return
    if port.peer_id is not None:
        walk.trace.append(_new_tuple(TraceStep, (here, "egress", f"to peer port {port.peer_id}")))
        ingress(walk, packet, port.peer_id, depth)
        return
    _exterior_output(walk, packet, port, here, flooding)


def _exterior_output(
    walk: Walk, packet: PacketState, port: PortInfo, here: Here, flooding: bool
) -> None:
    """Out of the overlay: Output to a local interface or Tunnel to the port's host, if the
    packet fits the egress MTU (`sim/mtu.py`)."""
    if not port.tunnel_key:
        walk.drop(here, "no_tunnel_key", "port has no tunnel key")
        return
    if port.id in walk.view.down_ports:
        walk.drop(here, "egress_port_down", f"port {port.id} is down (link)")
        return
    action: Output | Tunnel
    if port.vtep is not None:  # an L2 gateway's external VTEP: straight there, from here
        action = Tunnel(*port.vtep)
        detail = f"tunnel to VTEP {port.vtep[0]} VNI {port.vtep[1]}"
    elif port.host_id == walk.ctx.local_host_id:
        action, detail = _output_action((port.tunnel_key,))
    else:
        host_id = port.host_id or ""
        tag = _HOST_TAGS.get(host_id)
        if tag is None:
            if len(_HOST_TAGS) >= 1 << 14:
                _HOST_TAGS.clear()
            tag = _HOST_TAGS[host_id] = intern(f"host:{host_id}")
        walk.tags.add(tag)
        if host_id in walk.view.down_hosts:
            walk.drop(here, "egress_host_down", f"host {host_id} is down")
            return
        underlay_ip = walk.view.host_underlay_ip.get(host_id)
        if underlay_ip is None:
            walk.drop(here, "no_underlay", f"host {host_id} has no underlay IP")
            return
        action, detail = _tunnel_action((host_id, underlay_ip, port.tunnel_key))
    if port.interface_vlan is not None:  # L2 gateway: the interface's VLAN, tagged
        walk.read(packet, "vlan", FULL_MASKS["vlan"])
        if packet.vlan:  # no QinQ
            reason = f"vlan {packet.vlan} frame to a port on vlan {port.interface_vlan}"
            if flooding:
                walk.step(here, "skip", reason)
            else:
                walk.drop(here, "vlan_stacked", reason)
            return
        packet.vlan = port.interface_vlan
        packet.modified.add("vlan")
    limit = mtu.egress_mtu(walk, port, tunnel=action.__class__ is Tunnel)
    if limit and not mtu.admit(walk, packet, limit, here, flooding=flooding):
        return
    walk.step(here, "output", detail)
    walk.emissions.append((packet, action))


def _pop_interface_vlan(walk: Walk, packet: PacketState, port: PortInfo, here: Here) -> bool:
    """A port bound to VLAN `interface_vlan` of its interface (the L2 gateway) takes frames of
    that VLAN only, untagged from here on; False (dropped) for anything else on the wire."""
    walk.read(packet, "vlan", FULL_MASKS["vlan"])
    if packet.vlan != port.interface_vlan:
        walk.drop(
            here,
            "vlan_mismatch",
            f"frame on vlan {packet.vlan or 'none'} at a port of vlan {port.interface_vlan}",
        )
        return False
    packet.vlan = 0
    packet.modified.add("vlan")
    return True
