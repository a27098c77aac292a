"""Trace a synthetic packet: `TraceSpec` (the headers asked for, defaults from the ingress
port), `build_trace_frame`, `trace_simulation` (the same `simulate()` the agents run, its
flow state made side-effect free) and `trace_report` (the result as JSON-able data).

Side effects, none: learned MAC/ARP entries are only returned by `simulate()` (the caller
does not apply them); a trace's flow-state hook is a transaction over the caller's tables that
is always rolled back (NAT bindings it made are removed, their ports freed; conntrack is
never written); no flow is installed (the report shows the megaflow that would be).
Owns the translation of the result for people: each step, the actions, where the packet
leaves (port, host, tunnel key), the megaflow (match fields under the wildcard mask).
Pure: no I/O, no clock (the caller passes `now`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hivenet.flows.actions import Action, Output, SetField, Tunnel
from hivenet.model.types import int_to_mac
from hivenet.packets import FlowMatch
from hivenet.packets.builders import (
    build_arp_request,
    build_echo_request,
    build_tcp_segment,
    build_udp_datagram,
)
from hivenet.packets.flowmatch import FIELD_NAMES
from hivenet.sim.engine import SimContext, simulate
from hivenet.sim.result import SimulationResult, tag_texts
from hivenet.sim.stateful import TransactionHook
from hivenet.sim.topology import TopologyView

PROTOCOLS = ("tcp", "udp", "icmp", "arp")
TCP_FLAG_BITS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08, "ack": 0x10, "urg": 0x20}
BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"
_MAC_FIELDS = frozenset({"eth_src", "eth_dst", "arp_sha", "arp_tha"})
_IP_FIELDS = frozenset({"ip_src", "ip_dst", "arp_spa", "arp_tpa", "nd_target"})


class TraceSpecError(ValueError):
    """A header combination no packet can have; `field` names the culprit."""

    def __init__(self, field: str, value: object, why: str) -> None:
        super().__init__(f"{field}: {value!r}: {why}")
        self.field = field
        self.value = value
        self.why = why


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """The synthetic packet. None: the default (`resolve_spec` fills them from the port)."""

    ip_dst: str
    proto: str = "tcp"
    eth_src: str | None = None
    eth_dst: str | None = None
    ip_src: str | None = None
    src_port: int | None = None
    dst_port: int | None = None
    tcp_flags: str = "syn"
    vlan: int = 0
    ttl: int = 64


def parse_tcp_flags(text: str) -> int:
    """'syn', 'syn,ack', 'ack|psh' -> the flag bits."""
    bits = 0
    for name in text.replace("|", ",").split(","):
        name = name.strip().lower()
        if not name:
            continue
        if name not in TCP_FLAG_BITS:
            raise TraceSpecError("tcp_flags", text, f"unknown flag {name!r}")
        bits |= TCP_FLAG_BITS[name]
    return bits


def _address(field: str, text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise TraceSpecError(field, text, "not an IP address") from None


def default_eth_dst(view: TopologyView, port_id: str, ip_dst: str) -> str:
    """The MAC a VM on `port_id` would send to for `ip_dst`: the port on the same bridge that
    has that address, else the gateway (the router port peered to the bridge whose subnet holds
    the port's own address), else broadcast."""
    port = view.ports[port_id]
    destination = _address("ip_dst", ip_dst)
    bridge = view.bridges.get(port.device_id)
    if bridge is None:
        return BROADCAST_MAC
    gateway: str | None = None
    own_networks = [(a.version, a.network, a.mask) for a in port.addresses]
    for other_id in bridge.port_ids:
        other = view.ports.get(other_id)
        if other is None:
            continue
        if any(
            a.version == destination.version and a.ip == int(destination) for a in other.addresses
        ):
            return int_to_mac(other.mac)
        peer = view.ports.get(other.peer_id) if other.peer_id else None
        if peer is None:
            continue
        for address in peer.addresses:
            if (address.version, address.ip & address.mask, address.mask) in own_networks or (
                not own_networks and address.version == destination.version
            ):
                gateway = gateway or int_to_mac(peer.mac)
    return gateway or BROADCAST_MAC


def resolve_spec(view: TopologyView, port_id: str, spec: TraceSpec) -> TraceSpec:
    """Fill the defaults from the ingress port (MAC, first address of the destination's IP
    version, the MAC it would send to) and check the combination; TraceSpecError otherwise."""
    port = view.ports[port_id]
    destination = _address("ip_dst", spec.ip_dst)
    if spec.proto not in PROTOCOLS:
        raise TraceSpecError("proto", spec.proto, f"expected one of {', '.join(PROTOCOLS)}")
    ip_src = spec.ip_src
    if ip_src is None:
        own = [a.text.split("/")[0] for a in port.addresses if a.version == destination.version]
        if not own:
            raise TraceSpecError(
                "ip_src", None, f"port {port_id} has no IPv{destination.version} address; give one"
            )
        ip_src = own[0]
    source = _address("ip_src", ip_src)
    if source.version != destination.version:
        raise TraceSpecError(
            "ip_src", ip_src, f"IPv{source.version} but ip_dst is IPv{destination.version}"
        )
    has_ports = spec.proto in ("tcp", "udp")
    for name in ("src_port", "dst_port"):
        value = getattr(spec, name)
        if value is not None and not has_ports:
            raise TraceSpecError(name, value, f"{spec.proto} has no ports")
        if value is not None and not 0 <= value <= 65535:
            raise TraceSpecError(name, value, "must be 0-65535")
    if spec.proto in ("icmp", "arp") and destination.version != 4:
        raise TraceSpecError("proto", spec.proto, "only with IPv4 addresses here")
    if not 1 <= spec.ttl <= 255:
        raise TraceSpecError("ttl", spec.ttl, "must be 1-255")
    if not 0 <= spec.vlan <= 4094:
        raise TraceSpecError("vlan", spec.vlan, "must be 0-4094")
    if spec.proto == "tcp":
        parse_tcp_flags(spec.tcp_flags)
    eth_src = spec.eth_src or int_to_mac(port.mac)
    eth_dst = spec.eth_dst or (
        BROADCAST_MAC if spec.proto == "arp" else default_eth_dst(view, port_id, spec.ip_dst)
    )
    return dataclasses.replace(
        spec,
        eth_src=eth_src,
        eth_dst=eth_dst,
        ip_src=ip_src,
        src_port=spec.src_port if spec.src_port is not None else (49152 if has_ports else None),
        dst_port=spec.dst_port if spec.dst_port is not None else (80 if has_ports else None),
    )


def build_trace_frame(spec: TraceSpec) -> bytes:
    """The frame of a resolved spec (ValueError from the builders names a bad field)."""
    assert spec.eth_src is not None and spec.eth_dst is not None and spec.ip_src is not None
    if spec.proto == "arp":
        return build_arp_request(
            sender_mac=spec.eth_src, sender_ip=spec.ip_src, target_ip=spec.ip_dst, vlan=spec.vlan
        )
    if spec.proto == "icmp":
        return build_echo_request(
            eth_src=spec.eth_src,
            eth_dst=spec.eth_dst,
            ip_src=spec.ip_src,
            ip_dst=spec.ip_dst,
            identifier=0x7ACE,
            sequence=1,
            vlan=spec.vlan,
            ttl=spec.ttl,
        )
    assert spec.src_port is not None and spec.dst_port is not None
    headers = {
        "eth_src": spec.eth_src,
        "eth_dst": spec.eth_dst,
        "ip_src": spec.ip_src,
        "ip_dst": spec.ip_dst,
        "src_port": spec.src_port,
        "dst_port": spec.dst_port,
        "vlan": spec.vlan,
        "ttl": spec.ttl,
    }
    if spec.proto == "udp":
        return build_udp_datagram(**headers)  # type: ignore[arg-type]
    return build_tcp_segment(flags=parse_tcp_flags(spec.tcp_flags), **headers)  # type: ignore[arg-type]


def trace_simulation(
    frame: bytes,
    port_id: str,
    context: SimContext,
    now: float,
    hook: TransactionHook | None = None,
) -> SimulationResult:
    """`simulate()` with `hook` as the flow state, rolled back whatever happens."""
    if hook is None:
        return simulate(frame, port_id, context, now)
    try:
        return simulate(frame, port_id, dataclasses.replace(context, flow_state=hook), now)
    finally:
        hook.transaction.rollback()


def format_field(name: str, value: int, ip_version: int) -> str:
    if name in _MAC_FIELDS:
        return int_to_mac(value)
    if name in _IP_FIELDS:
        version = 4 if name.startswith("arp_") else ip_version
        return str(ipaddress.ip_address(value) if version == 4 else ipaddress.IPv6Address(value))
    if name in ("eth_type",):
        return f"{value:#06x}"
    return str(value)


def _ip_version(match: FlowMatch) -> int:
    return 6 if match.eth_type == 0x86DD else 4


def describe_action(action: Action, view: TopologyView, ip_version: int) -> str:
    if isinstance(action, SetField):
        return f"set {action.field}={format_field(action.field, action.value, ip_version)}"
    if isinstance(action, Output):
        return f"output port {view.port_by_tunnel_key.get(action.port_key, action.port_key)}"
    if isinstance(action, Tunnel):
        port_id = view.port_by_tunnel_key.get(action.tunnel_key, "?")
        return f"tunnel to {action.remote_ip} key {action.tunnel_key} (port {port_id})"
    return type(action).__name__.lower() + (
        f" {action.reason}" if hasattr(action, "reason") else ""
    )


def egress_of(
    actions: tuple[Action, ...], view: TopologyView, local_host_id: str
) -> list[dict[str, Any]]:
    """Where the packet leaves: port, device, host and (tunnelled) tunnel key and remote IP."""
    host_of_ip = {ip: host for host, ip in view.host_underlay_ip.items()}
    out: list[dict[str, Any]] = []
    for action in actions:
        if isinstance(action, Output):
            key, host, remote = action.port_key, local_host_id, None
        elif isinstance(action, Tunnel):
            key, remote = action.tunnel_key, action.remote_ip
            host = host_of_ip.get(remote, "")
        else:
            continue
        port_id = view.port_by_tunnel_key.get(key, "")
        port = view.ports.get(port_id)
        out.append(
            {
                "port_id": port_id,
                "port_name": port.name if port is not None else "",
                "device_id": port.device_id if port is not None else "",
                "host": host,
                "tunnel_key": key,
                "remote_ip": remote,
            }
        )
    return out


def megaflow(result: SimulationResult) -> dict[str, str]:
    """field -> value (or value/mask) of the fields the installed flow would match."""
    version = _ip_version(result.match)
    out: dict[str, str] = {}
    for name, bits in result.wildcard().items():
        value = format_field(name, getattr(result.match, name), version)
        out[name] = value if bits == -1 else f"{value}/{bits:#x}"
    return out


def packet_fields(match: FlowMatch) -> dict[str, str]:
    """The non-zero header fields of the packet as simulated (in_port omitted)."""
    version = _ip_version(match)
    return {
        name: format_field(name, getattr(match, name), version)
        for name in FIELD_NAMES
        if name != "in_port" and getattr(match, name)
    }


def trace_report(
    result: SimulationResult,
    view: TopologyView,
    ingress_port_id: str,
    local_host_id: str,
    *,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The trace as JSON-able data (the API's response body, the UI's input)."""
    version = _ip_version(result.match)
    devices: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for step in result.trace:
        key = (step.device_kind, step.device_id)
        if step.device_id and step.device_kind in ("port", "bridge", "router") and key not in seen:
            seen.add(key)
            devices.append(
                {"kind": step.device_kind, "id": step.device_id, "name": step.device_name}
            )
    return {
        "ingress_port": ingress_port_id,
        "ingress_host": local_host_id,
        **(extra or {}),
        "packet": packet_fields(result.match),
        "steps": [
            {
                "device_kind": step.device_kind,
                "device_id": step.device_id,
                "device_name": step.device_name,
                "event": step.event,
                "detail": step.detail,
                "depth": step.depth,
            }
            for step in result.trace
        ],
        "path": devices,
        "actions": [describe_action(action, view, version) for action in result.actions],
        "egress": egress_of(result.actions, view, local_host_id),
        "drop_reason": result.drop_reason,
        "megaflow": {
            "match": megaflow(result),
            "install": result.install,
            "idle_timeout": result.idle_timeout,
        },
        "tags": tag_texts(result),
        "generated": [
            {
                "description": packet.description,
                "actions": [describe_action(action, view, version) for action in packet.actions],
                "drop_reason": packet.drop_reason,
            }
            for packet in result.generated
        ],
        "learned": [str(entry) for entry in result.learned],
    }
