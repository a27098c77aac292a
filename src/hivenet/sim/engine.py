"""The packet simulation engine: `simulate(frame, ingress_port_id, ctx, now)` walks one packet
through the virtual topology (ports, bridges, routers, chains) and returns a
`SimulationResult`.

Owns the walk and the device logic: port admin state and chains, interior-port hops, bridge
MAC learning / unicast / flooding / VLANs / ARP proxy, router ARP and ND, local delivery
(ping, port unreachable, RST), LPM + ECMP routing, TTL, next-hop resolution, ICMP errors,
rule-chain evaluation (accept/drop/reject/return/jump/continue, flow-state hook for
conntrack and NAT), the megaflow wildcard (every header bit a decision read), the flow tags,
and the translation of per-branch packet states into one ordered action list.
Must not touch I/O, the clock (`now` is passed in), the store or the datapath: the agent acts
on the result.

Megaflow soundness: a field read goes through `_Walk.read()`, which records the bits in the
wildcard unless the simulation itself already overwrote that field (its value is then fixed
by earlier, recorded decisions). Any decision taken on a packet value records at least the
bits that decision depended on; over-approximating (recording more bits) is always safe.

Tags built here from ids (device, chain, host, MAC/ARP entry) are `sys.intern`ed: every
cached flow holds its tags, and equal tags across flows must be one object, not one each.
"""

from __future__ import annotations

from dataclasses import dataclass
from sys import intern

from hivenet.flows.actions import (
    SETTABLE_FIELDS,
    Action,
    DecTtl,
    Drop,
    Output,
    PopVlan,
    PushVlan,
    SetField,
    Tunnel,
)
from hivenet.model import DeviceKind, RouteType, RuleAction
from hivenet.packets import (
    PacketError,
    dec_ttl,
    extract_flow_match,
    pop_vlan,
    push_vlan,
    rewrite_frame,
)
from hivenet.packets.flowmatch import (
    ETH_TYPE_ARP,
    ETH_TYPE_IPV4,
    ETH_TYPE_IPV6,
    FIELD_NAMES,
    FRAG_LATER,
    FULL_MASKS,
    IP_PROTO_ICMP,
    IP_PROTO_ICMPV6,
    IP_PROTO_TCP,
    IP_PROTO_UDP,
    FlowMatch,
)
from hivenet.packets.icmp_quote import rewrite_icmp_quote
from hivenet.sim import replies
from hivenet.sim.flowstate_hook import NO_FLOW_STATE, FlowStateHook, FlowStateUnsupported
from hivenet.sim.result import GeneratedPacket, SimulationResult, TraceStep
from hivenet.sim.routing import flow_hash
from hivenet.sim.rules import CompiledRule
from hivenet.sim.secgroups import full_mask_reader, spoof_reason
from hivenet.sim.tables import (
    LearnedEntry,
    LearnedMac,
    LearnedNeighbour,
    TablesView,
    ip_text,
    mac_entry_tag,
    mac_text,
    neighbour_entry_tag,
)
from hivenet.sim.topology import BridgeInfo, PortInfo, RouterInfo, TopologyView
from hivenet.sim.vips import VipRefusal

MULTICAST_BIT = 1 << 40  # the I/G bit of the first octet of a MAC, as an int
BROADCAST_MAC = (1 << 48) - 1
ARP_REQUEST = 1
ARP_REPLY = 2
ICMP_ECHO_REQUEST = 8
ICMPV6_ECHO_REQUEST = 128
ND_ROUTER_SOLICIT = 133
ND_REDIRECT = 137
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
TCP_FLAG_RST = 0x04

DEFAULT_IDLE_TIMEOUT = 60.0
# A drop installed while a next hop is being resolved: short, and tagged with the missing
# ARP/ND entry so learning it invalidates the drop at once.
UNRESOLVED_IDLE_TIMEOUT = 2.0
MAX_DEVICES_PER_PATH = 16
MAX_DEVICES_PER_SIMULATION = 256
MAX_JUMP_DEPTH = 16
MAX_GENERATION_DEPTH = 2

_MASKS = tuple((name, FULL_MASKS[name]) for name in FIELD_NAMES)
# Every field a flow-state key (flowstate.keys) is made of: the 5-tuple, ICMP echo ids and
# types (an echo request and its reply are told apart by type) and fragmentation.
_CONNTRACK_READS = (
    "eth_type",
    "ip_src",
    "ip_dst",
    "ip_proto",
    "ip_frag",
    "tp_src",
    "tp_dst",
    "icmp_type",
    "icmp_code",
    "icmp_id",
)
_FORWARD_NAT = (RuleAction.DNAT, RuleAction.SNAT)
_SETTABLE_ORDER = tuple(name for name in FIELD_NAMES if name in SETTABLE_FIELDS)


@dataclass(frozen=True, slots=True)
class SimContext:
    """Everything a simulation reads besides the packet. `tables` is shared across hosts;
    `local_host_id` decides Output (local port) vs Tunnel (remote host)."""

    topology: TopologyView
    tables: TablesView
    local_host_id: str
    flow_state: FlowStateHook = NO_FLOW_STATE
    max_devices_per_path: int = MAX_DEVICES_PER_PATH


class PacketState:
    """The packet as the simulation currently sees it (one per branch; copied at forks).

    Holds the FlowMatch field values, the fields the simulation rewrote (`modified`), the
    number of TTL decrements so far and the 802.1Q tag currently on the frame (`vlan`).
    """

    __slots__ = (*FIELD_NAMES, "modified", "ttl_decrements")

    in_port: int
    eth_src: int
    eth_dst: int
    eth_type: int
    vlan: int
    ip_src: int
    ip_dst: int
    ip_proto: int
    ip_tos: int
    ip_ttl: int
    ip_frag: int
    tp_src: int
    tp_dst: int
    tcp_flags: int
    icmp_type: int
    icmp_code: int
    icmp_id: int
    arp_op: int
    arp_sha: int
    arp_spa: int
    arp_tha: int
    arp_tpa: int
    nd_target: int
    modified: set[str]
    ttl_decrements: int

    @classmethod
    def of(cls, match: FlowMatch) -> PacketState:
        state = cls()
        for name in FIELD_NAMES:
            setattr(state, name, getattr(match, name))
        state.modified = set()
        state.ttl_decrements = 0
        return state

    def copy(self) -> PacketState:
        other = PacketState()
        for name in FIELD_NAMES:
            setattr(other, name, getattr(self, name))
        other.modified = set(self.modified)
        other.ttl_decrements = self.ttl_decrements
        return other

    def to_match(self) -> FlowMatch:
        return FlowMatch(**{name: getattr(self, name) for name in FIELD_NAMES})

    def set(self, field: str, value: int) -> None:
        setattr(self, field, value)
        self.modified.add(field)

    @property
    def ip_version(self) -> int:
        return 4 if self.eth_type == ETH_TYPE_IPV4 else 6 if self.eth_type == ETH_TYPE_IPV6 else 0


@dataclass(slots=True)
class _PendingReply:
    """A packet to generate once the main walk is over: it leaves through `port` (which may
    be interior: the reply then continues into the peer device)."""

    frame: bytes
    port: PortInfo
    description: str


class _ChainStop(Exception):
    """Internal: a chain verdict that ends the branch (drop, reject, unsupported)."""


class _Walk:
    """One simulation: the walk state shared by all branches of one packet."""

    def __init__(
        self,
        ctx: SimContext,
        now: float,
        frame: bytes,
        match: FlowMatch,
        generation: int = 0,
    ) -> None:
        self.ctx = ctx
        self.view = ctx.topology
        self.tables = ctx.tables
        self.now = now
        self.frame = frame
        self.match = match
        self.generation = generation
        self.reads: dict[str, int] = {"in_port": FULL_MASKS["in_port"]}
        self.tags: set[str] = set()
        self.trace: list[TraceStep] = []
        self.learned: list[LearnedEntry] = []
        self.mac_overlay: dict[tuple[str, int, int], str] = {}
        self.neighbour_overlay: dict[tuple[str, int, int], int] = {}
        self.emissions: list[tuple[PacketState, Output | Tunnel]] = []
        self.pending: list[_PendingReply] = []
        self.drop_reasons: list[str] = []
        self.install = True
        self.idle_timeout = DEFAULT_IDLE_TIMEOUT
        self.device_budget = MAX_DEVICES_PER_SIMULATION
        # What forwarding decisions saw in the shared tables, by entry: if this simulation
        # itself later learns a different value (e.g. a generated ARP request teaches a
        # router the entry it just missed), the result is stale at birth and not cached.
        self.lookups: dict[tuple[str, str, int, int], object] = {}
        # Rewrites of the datagram a NATed ICMP error quotes (no flow action can do them).
        self.inner_rewrites: dict[str, int] = {}

    # ------------------------------------------------------------------ bookkeeping

    def read(self, packet: PacketState, field: str, mask: int) -> None:
        if field in packet.modified:
            return
        reads = self.reads
        reads[field] = reads.get(field, 0) | mask

    def step(self, kind: str, ident: str, name: str, event: str, detail: str, depth: int) -> None:
        self.trace.append(TraceStep(kind, ident, name, event, detail, depth))

    def drop(self, kind: str, ident: str, name: str, reason: str, detail: str, depth: int) -> None:
        self.drop_reasons.append(reason)
        self.step(kind, ident, name, "drop", f"{reason}: {detail}" if detail else reason, depth)

    def no_cache(self, why: str, depth: int) -> None:
        if self.install:
            self.step("sim", "", "", "no-cache", why, depth)
        self.install = False

    # ------------------------------------------------------------------ ports

    def port_ingress(self, packet: PacketState, port_id: str, hops: int) -> None:
        port = self.view.ports.get(port_id)
        if port is None:
            self.tags.add(intern(f"port:{port_id}"))
            self.drop("port", port_id, port_id, "unknown_port", "port not in topology", hops)
            return
        self.tags.add(port.tag)
        self.step("port", port.id, port.name, "ingress", f"into {port.device_kind.value}", hops)
        if not port.admin_up:
            self.drop("port", port.id, port.name, "port_down", "ingress port is down", hops)
            return
        guard = self.view.security.guards.get(port.id)
        if guard is not None:
            spoofed = spoof_reason(
                guard, packet, full_mask_reader(lambda name, mask: self.read(packet, name, mask))
            )
            if spoofed is not None:
                self.drop("port", port.id, port.name, spoofed, "port security", hops)
                return
            if not self.run_chain(packet, guard.from_vm_chain_id, port, None, port, hops):
                return
        if port.inbound_chain_id is not None and not self.run_chain(
            packet, port.inbound_chain_id, port, None, port, hops
        ):
            return
        hops += 1
        self.device_budget -= 1
        if hops > self.ctx.max_devices_per_path or self.device_budget < 0:
            self.drop(
                "port",
                port.id,
                port.name,
                "device_limit",
                f"more than {self.ctx.max_devices_per_path} devices on the path (loop?)"
                if self.device_budget >= 0
                else f"more than {MAX_DEVICES_PER_SIMULATION} devices in one simulation",
                hops,
            )
            return
        if port.device_kind is DeviceKind.BRIDGE:
            bridge = self.view.bridges.get(port.device_id)
            if bridge is None:
                self.tags.add(intern(f"bridge:{port.device_id}"))
                self.drop("port", port.id, port.name, "unknown_device", port.device_id, hops)
                return
            self.bridge(packet, bridge, port, hops)
        else:
            router = self.view.routers.get(port.device_id)
            if router is None:
                self.tags.add(intern(f"router:{port.device_id}"))
                self.drop("port", port.id, port.name, "unknown_device", port.device_id, hops)
                return
            self.router(packet, router, port, hops)

    def port_egress(
        self,
        packet: PacketState,
        port: PortInfo,
        device_in_port: PortInfo,
        hops: int,
        *,
        flooding: bool = False,
    ) -> None:
        self.tags.add(port.tag)
        if not port.admin_up:
            if flooding:
                self.step("port", port.id, port.name, "skip", "port is down", hops)
            else:
                self.drop("port", port.id, port.name, "port_down", "egress port is down", hops)
            return
        if port.peer_id is None and not port.bound:
            if flooding:
                self.step("port", port.id, port.name, "skip", "exterior port not bound", hops)
            else:
                self.drop("port", port.id, port.name, "port_unbound", "egress port not bound", hops)
            return
        if port.outbound_chain_id is not None and not self.run_chain(
            packet, port.outbound_chain_id, device_in_port, port.id, device_in_port, hops
        ):
            return
        guard = self.view.security.guards.get(port.id)
        if guard is not None and not self.run_chain(
            packet, guard.to_vm_chain_id, device_in_port, port.id, device_in_port, hops
        ):
            return
        if port.peer_id is not None:
            self.step("port", port.id, port.name, "egress", f"to peer port {port.peer_id}", hops)
            self.port_ingress(packet, port.peer_id, hops)
            return
        self.exterior_output(packet, port, hops)

    def exterior_output(self, packet: PacketState, port: PortInfo, hops: int) -> None:
        if not port.tunnel_key:
            self.drop("port", port.id, port.name, "no_tunnel_key", "port has no tunnel key", hops)
            return
        action: Output | Tunnel
        if port.host_id == self.ctx.local_host_id:
            action = Output(port.tunnel_key)
            detail = f"output to local port key {port.tunnel_key}"
        else:
            host_id = port.host_id or ""
            self.tags.add(intern(f"host:{host_id}"))
            if host_id in self.view.down_hosts:
                detail = f"host {host_id} is down"
                self.drop("port", port.id, port.name, "egress_host_down", detail, hops)
                return
            underlay_ip = self.view.host_underlay_ip.get(host_id)
            if underlay_ip is None:
                self.drop(
                    "port",
                    port.id,
                    port.name,
                    "no_underlay",
                    f"host {host_id} has no underlay IP",
                    hops,
                )
                return
            action = Tunnel(underlay_ip, port.tunnel_key)
            detail = f"tunnel to host {host_id} ({underlay_ip}) key {port.tunnel_key}"
        self.step("port", port.id, port.name, "output", detail, hops)
        self.emissions.append((packet, action))

    # ------------------------------------------------------------------ chains

    def run_chain(
        self,
        packet: PacketState,
        chain_id: str,
        in_port: PortInfo,
        out_port_id: str | None,
        reply_port: PortInfo,
        hops: int,
    ) -> bool:
        """Evaluate a chain; True when the packet continues, False when the branch ended
        (drop, reject, unsupported). A top-level RETURN or falling off the end continues."""
        try:
            verdict = self._evaluate_chain(packet, chain_id, in_port, out_port_id, hops, [])
        except _ChainStop:
            return False
        if verdict == "reject":
            self.reject(packet, reply_port, hops)
            return False
        return verdict != "drop"

    def _evaluate_chain(
        self,
        packet: PacketState,
        chain_id: str,
        in_port: PortInfo,
        out_port_id: str | None,
        hops: int,
        stack: list[str],
    ) -> str:
        self.tags.add(intern(f"chain:{chain_id}"))
        chain = self.view.chains.get(chain_id)
        if chain is None:
            self.drop("chain", chain_id, chain_id, "unknown_chain", "chain not in topology", hops)
            return "drop"
        if chain_id in stack:
            self.drop(
                "chain", chain.id, chain.name, "jump_loop", " -> ".join([*stack, chain_id]), hops
            )
            return "drop"
        if len(stack) >= MAX_JUMP_DEPTH:
            self.drop("chain", chain.id, chain.name, "jump_depth", f"> {MAX_JUMP_DEPTH}", hops)
            return "drop"
        stack.append(chain_id)
        rules = chain.rules
        matcher = chain.matcher
        groups = in_port.port_group_ids
        start = 0
        evaluated_through = len(rules) - 1
        verdict = "continue"
        try:
            while True:
                index = matcher(packet, start, in_port.id, out_port_id, groups)
                if index < 0:
                    break
                if index < start:  # would loop forever: a compiler bug, not a topology one
                    raise RuntimeError(f"chain {chain.id}: matcher returned rule {index} < {start}")
                rule = rules[index]
                if rule.conntrack_condition is not None and not self._conntrack_holds(
                    packet, rule.conntrack_condition, in_port, chain.id, chain.name, hops
                ):
                    start = index + 1
                    continue
                action = rule.action
                self.step("chain", chain.id, chain.name, "rule", rule.description, hops)
                if action is RuleAction.CONTINUE:
                    start = index + 1
                    continue
                if action is RuleAction.JUMP:
                    target = rule.jump_chain_id or ""
                    sub = self._evaluate_chain(packet, target, in_port, out_port_id, hops, stack)
                    if sub in ("accept", "drop", "reject"):
                        evaluated_through = index
                        verdict = sub
                        break
                    start = index + 1
                    continue
                evaluated_through = index
                if action is RuleAction.ACCEPT:
                    verdict = "accept"
                elif action is RuleAction.DROP:
                    reason = (
                        rule.rule.name or "rule_drop"
                        if chain.id in self.view.security.chain_zones
                        else "rule_drop"
                    )
                    self.drop("chain", chain.id, chain.name, reason, rule.id, hops)
                    verdict = "drop"
                elif action is RuleAction.REJECT:
                    self.drop("chain", chain.id, chain.name, "rule_reject", rule.id, hops)
                    verdict = "reject"
                elif action is RuleAction.RETURN:
                    verdict = "return"
                elif self.view.vips.is_vip_rule(rule.id):
                    verdict = self._load_balance(packet, rule, in_port, chain.id, chain.name, hops)
                else:
                    self._nat(packet, rule, in_port, chain.id, chain.name, hops)
                    if action not in _FORWARD_NAT:
                        # rev_snat/rev_dnat undo a translation (if any) and go on, so one
                        # chain can reverse both NATs of a hairpinned or 1:1 connection.
                        start = index + 1
                        continue
                    verdict = "accept"
                break
        finally:
            if rules:
                for field, mask in chain.reads_through[evaluated_through].items():
                    self.read(packet, field, mask)
            stack.pop()
        return verdict

    def _zone(self, chain_id: str, in_port: PortInfo) -> str:
        """Conntrack/NAT zone: the port for its security-group chains, else the device."""
        return self.view.security.chain_zones.get(chain_id, in_port.device_id)

    def _conntrack_holds(
        self,
        packet: PacketState,
        condition: str,
        in_port: PortInfo,
        chain_id: str,
        chain_name: str,
        hops: int,
    ) -> bool:
        zone = self._zone(chain_id, in_port)
        try:
            decision = self.ctx.flow_state.conntrack(packet.to_match(), zone, self.now)
        except FlowStateUnsupported as unsupported:
            self.drop("chain", chain_id, chain_name, "unsupported", unsupported.reason, hops)
            self.no_cache("flow state unsupported", hops)
            raise _ChainStop from unsupported
        # Connection state is per flow: a cached flow must not outlive the connection's
        # direction, so everything the flow key is made of is part of the megaflow.
        for field in _CONNTRACK_READS:
            self.read(packet, field, FULL_MASKS[field])
        if decision.reads_tcp_flags:
            self.read(packet, "tcp_flags", FULL_MASKS["tcp_flags"])
        self.tags.update(decision.tags)
        self.step(
            "chain",
            chain_id,
            chain_name,
            "conntrack",
            f"zone {zone}: {decision.verdict or ('return' if decision.is_return else 'forward')}",
            hops,
        )
        if not decision.cacheable:
            self.no_cache("conntrack decision depends on the packet itself", hops)
        return decision.is_return == (condition == "return")

    def _nat(
        self,
        packet: PacketState,
        rule: CompiledRule,
        in_port: PortInfo,
        chain_id: str,
        chain_name: str,
        hops: int,
    ) -> bool:
        """Apply a NAT rule; False when a reverse NAT rule found nothing to undo (the
        evaluation then goes on with the next rule)."""
        zone = self._zone(chain_id, in_port)
        try:
            decision = self.ctx.flow_state.nat(packet.to_match(), rule, zone, self.now)
        except FlowStateUnsupported as unsupported:
            reason = (
                unsupported.reason.partition(":")[0]
                if ":" in unsupported.reason
                else ("unsupported")
            )
            self.drop("chain", chain_id, chain_name, reason, unsupported.reason, hops)
            self.no_cache("flow state unsupported", hops)
            raise _ChainStop from unsupported
        for field in _CONNTRACK_READS:
            self.read(packet, field, FULL_MASKS[field])
        self.tags.update(decision.tags)
        if not decision.cacheable:
            self.no_cache("NAT decision not cacheable", hops)
        if not decision.applied:
            return False
        for field, value in decision.rewrites.items():
            if field not in SETTABLE_FIELDS:
                raise ValueError(f"NAT decision rewrites field {field!r}, which is not settable")
            packet.set(field, value)
        if decision.inner_rewrites:
            self.inner_rewrites.update(decision.inner_rewrites)
        self.step(
            "chain",
            chain_id,
            chain_name,
            rule.action.value,
            decision.description
            or ", ".join(f"{name}={value}" for name, value in decision.rewrites.items()),
            hops,
        )
        return True

    def _load_balance(
        self,
        packet: PacketState,
        rule: CompiledRule,
        in_port: PortInfo,
        chain_id: str,
        chain_name: str,
        hops: int,
    ) -> str:
        """A flow to a VIP (sim/vips.py): DNAT to the member chosen for it, or to the member
        its connection already has (NAT state); "reject" when no member can take it."""
        for field in _CONNTRACK_READS:  # the choice hashes the 5-tuple; NAT keys on it
            self.read(packet, field, FULL_MASKS[field])
        vips = self.view.vips
        choice = vips.choose(rule.id, packet.to_match(), packet.ip_version, self.now)
        self.tags.update(choice.tags)
        if isinstance(choice, VipRefusal):
            self.drop("chain", chain_id, chain_name, choice.reason, choice.detail, hops)
            return "reject"
        self.step("chain", chain_id, chain_name, "lb", choice.description, hops)
        self._nat(packet, choice.rule, in_port, chain_id, chain_name, hops)
        binding = choice.selection.binding
        if packet.ip_dst == int(binding.backend_address) and packet.tp_dst == binding.backend_port:
            vips.remember(choice)
        return "accept"

    def reject(self, packet: PacketState, reply_port: PortInfo, hops: int) -> None:
        """Answer a rejected packet: TCP RST for TCP, ICMP admin-prohibited otherwise."""
        self.no_cache("reject answers every packet", hops)
        seen = self.frame_as_seen(packet)
        router_port = reply_port if reply_port.device_kind is DeviceKind.ROUTER else None
        self.read(packet, "ip_proto", FULL_MASKS["ip_proto"])
        self.read(packet, "eth_type", FULL_MASKS["eth_type"])
        if packet.ip_proto == IP_PROTO_TCP and packet.ip_version:
            self.read(packet, "tcp_flags", FULL_MASKS["tcp_flags"])
            if packet.tcp_flags & TCP_FLAG_RST:
                return
            reply = replies.tcp_reset(seen, source_mac=router_port.mac if router_port else None)
            if reply is not None:
                self.pending.append(_PendingReply(reply, reply_port, "TCP RST (reject)"))
            return
        reply = self.icmp_error(packet, seen, "admin_prohibited", router_port)
        if reply is not None:
            self.pending.append(_PendingReply(reply, reply_port, "ICMP admin prohibited"))

    # ------------------------------------------------------------------ bridge

    def bridge(self, packet: PacketState, bridge: BridgeInfo, in_port: PortInfo, hops: int) -> None:
        self.tags.add(bridge.tag)
        name = bridge.name
        if not bridge.admin_up:
            self.drop("bridge", bridge.id, name, "device_down", "bridge is down", hops)
            return
        self.read(packet, "vlan", FULL_MASKS["vlan"])
        if in_port.vlan_id is not None:
            if packet.vlan:
                self.drop(
                    "bridge",
                    bridge.id,
                    name,
                    "vlan_mismatch",
                    f"tagged frame (vlan {packet.vlan}) on access port {in_port.id}",
                    hops,
                )
                return
            vlan = in_port.vlan_id
        else:
            vlan = packet.vlan
        src = packet.eth_src
        self.read(packet, "eth_src", FULL_MASKS["eth_src"])
        if not src & MULTICAST_BIT and (vlan, src) not in bridge.static_macs:
            self.learn_mac(bridge, vlan, src, in_port, hops)
        if bridge.inbound_chain_id is not None and not self.run_chain(
            packet, bridge.inbound_chain_id, in_port, None, in_port, hops
        ):
            return
        if bridge.arp_proxy and self.bridge_arp_proxy(packet, bridge, in_port, hops):
            return
        dst = packet.eth_dst
        self.read(packet, "eth_dst", MULTICAST_BIT)
        if dst & MULTICAST_BIT:
            self.step("bridge", bridge.id, name, "flood", f"multicast {mac_text(dst)}", hops)
            self.flood(packet, bridge, in_port, vlan, hops)
            return
        self.read(packet, "eth_dst", FULL_MASKS["eth_dst"])
        out_port_id = bridge.static_macs.get((vlan, dst))
        if out_port_id is None:
            tag = intern(mac_entry_tag(bridge.id, vlan, dst))
            self.tags.add(tag)
            out_port_id = self.mac_overlay.get((bridge.id, vlan, dst))
            if out_port_id is None:
                out_port_id = self.tables.mac_port(bridge.id, vlan, dst)
            self.lookups.setdefault(("mac", bridge.id, vlan, dst), out_port_id)
        out_port = self.view.ports.get(out_port_id) if out_port_id is not None else None
        if out_port is None or out_port.device_id != bridge.id:
            self.step("bridge", bridge.id, name, "flood", f"unknown unicast {mac_text(dst)}", hops)
            self.flood(packet, bridge, in_port, vlan, hops)
            return
        if out_port.id == in_port.id:
            self.drop(
                "bridge",
                bridge.id,
                name,
                "same_port",
                f"{mac_text(dst)} is on the ingress port",
                hops,
            )
            return
        self.step(
            "bridge", bridge.id, name, "forward", f"{mac_text(dst)} -> port {out_port.id}", hops
        )
        self.bridge_output(packet, bridge, in_port, out_port, vlan, hops, flooding=False)

    def learn_mac(
        self, bridge: BridgeInfo, vlan: int, mac: int, in_port: PortInfo, hops: int
    ) -> None:
        key = (bridge.id, vlan, mac)
        self.tags.add(intern(mac_entry_tag(bridge.id, vlan, mac)))
        known = self.mac_overlay.get(key)
        if known is None:
            known = self.tables.mac_port(bridge.id, vlan, mac)
        if known != in_port.id:
            self.mac_overlay[key] = in_port.id
            self.learned.append(LearnedMac(bridge.id, vlan, mac, in_port.id))
            self.step(
                "bridge",
                bridge.id,
                bridge.name,
                "learn",
                f"{mac_text(mac)} vlan {vlan} on port {in_port.id}",
                hops,
            )

    def bridge_arp_proxy(
        self, packet: PacketState, bridge: BridgeInfo, in_port: PortInfo, hops: int
    ) -> bool:
        self.read(packet, "eth_type", FULL_MASKS["eth_type"])
        if packet.eth_type != ETH_TYPE_ARP:
            return False
        self.read(packet, "arp_op", FULL_MASKS["arp_op"])
        if packet.arp_op != ARP_REQUEST:
            return False
        self.read(packet, "arp_tpa", FULL_MASKS["arp_tpa"])
        mac = bridge.arp_proxy_entries.get(packet.arp_tpa)
        if mac is None:
            return False
        self.read(packet, "arp_spa", FULL_MASKS["arp_spa"])
        self.read(packet, "arp_sha", FULL_MASKS["arp_sha"])
        self.no_cache("ARP proxy answers every request", hops)
        reply = replies.arp_reply(
            sender_mac=mac,
            sender_ip=packet.arp_tpa,
            target_mac=packet.arp_sha,
            target_ip=packet.arp_spa,
        )
        self.step(
            "bridge",
            bridge.id,
            bridge.name,
            "arp-proxy",
            f"{ip_text(4, packet.arp_tpa)} is-at {mac_text(mac)}",
            hops,
        )
        self.pending.append(_PendingReply(reply, in_port, "ARP reply (bridge proxy)"))
        self.drop_reasons.append("arp_proxied")
        return True

    def flood(
        self, packet: PacketState, bridge: BridgeInfo, in_port: PortInfo, vlan: int, hops: int
    ) -> None:
        ports = self.view.ports
        for port_id in bridge.port_ids:
            if port_id == in_port.id:
                continue
            port = ports[port_id]
            if port.vlan_id is not None and port.vlan_id != vlan:
                continue
            if port.vlan_id is None and port.peer_id is None and not port.bound:
                self.tags.add(port.tag)  # binding it later must widen the flood
                continue
            self.bridge_output(packet.copy(), bridge, in_port, port, vlan, hops, flooding=True)

    def bridge_output(
        self,
        packet: PacketState,
        bridge: BridgeInfo,
        in_port: PortInfo,
        out_port: PortInfo,
        vlan: int,
        hops: int,
        *,
        flooding: bool,
    ) -> None:
        if bridge.outbound_chain_id is not None and not self.run_chain(
            packet, bridge.outbound_chain_id, in_port, out_port.id, in_port, hops
        ):
            return
        wanted_tag = 0 if out_port.vlan_id is not None else vlan
        if packet.vlan != wanted_tag:
            packet.vlan = wanted_tag
            packet.modified.add("vlan")
        self.port_egress(packet, out_port, in_port, hops, flooding=flooding)

    # ------------------------------------------------------------------ router

    def router(self, packet: PacketState, router: RouterInfo, in_port: PortInfo, hops: int) -> None:
        self.tags.add(router.tag)
        name = router.name
        if not router.admin_up:
            self.drop("router", router.id, name, "device_down", "router is down", hops)
            return
        self.read(packet, "vlan", FULL_MASKS["vlan"])
        if packet.vlan:
            self.drop("router", router.id, name, "vlan_tagged", f"vlan {packet.vlan}", hops)
            return
        self.read(packet, "eth_type", FULL_MASKS["eth_type"])
        eth_type = packet.eth_type
        if eth_type == ETH_TYPE_ARP:
            self.router_arp(packet, router, in_port, hops)
            return
        if eth_type not in (ETH_TYPE_IPV4, ETH_TYPE_IPV6):
            self.drop("router", router.id, name, "not_ip", f"ethertype {eth_type:#06x}", hops)
            return
        version = 4 if eth_type == ETH_TYPE_IPV4 else 6
        self.read(packet, "eth_dst", FULL_MASKS["eth_dst"])
        dst_mac = packet.eth_dst
        if dst_mac != in_port.mac and not dst_mac & MULTICAST_BIT:
            self.drop("router", router.id, name, "not_for_router", f"dst {mac_text(dst_mac)}", hops)
            return
        if version == 6:
            self.read(packet, "ip_proto", FULL_MASKS["ip_proto"])
            if packet.ip_proto == IP_PROTO_ICMPV6:
                self.read(packet, "icmp_type", FULL_MASKS["icmp_type"])
                if ND_ROUTER_SOLICIT <= packet.icmp_type <= ND_REDIRECT:
                    self.router_nd(packet, router, in_port, hops)
                    return
        if dst_mac & MULTICAST_BIT:
            self.drop("router", router.id, name, "multicast", "multicast is not routed", hops)
            return
        floating = self.view.security.routers.get(router.id)
        if floating is not None and not self.run_chain(
            packet, floating.pre_chain_id, in_port, None, in_port, hops
        ):
            return
        vips = self.view.vips.routers.get(router.id)
        if vips is not None and not self.run_chain(
            packet, vips.pre_chain_id, in_port, None, in_port, hops
        ):
            return
        if router.inbound_chain_id is not None and not self.run_chain(
            packet, router.inbound_chain_id, in_port, None, in_port, hops
        ):
            return
        own_mask = router.own_v4_read_mask if version == 4 else router.own_v6_read_mask
        self.read(packet, "ip_dst", own_mask)
        if own_mask and (version, packet.ip_dst) in router.own_addresses:
            self.router_local(packet, router, in_port, version, hops)
            return
        # TTL: without an earlier decrement "ttl <= 1" only depends on bits 7..1.
        self.read(packet, "ip_ttl", 0xFE if packet.ttl_decrements == 0 else 0xFF)
        if packet.ip_ttl <= 1:
            self.step("router", router.id, name, "ttl", f"ttl {packet.ip_ttl} expired", hops)
            self.send_icmp_error(packet, "time_exceeded", in_port, hops)
            self.drop("router", router.id, name, "ttl_expired", "", hops)
            return
        table = router.routes_v4 if version == 4 else router.routes_v6
        self.read(packet, "ip_dst", table.dst_read_mask)
        self.read(packet, "ip_src", table.src_read_mask)
        group = table.lookup(packet.ip_dst, packet.ip_src)
        if group is None:
            self.step(
                "router",
                router.id,
                name,
                "route",
                f"no route to {ip_text(version, packet.ip_dst)}",
                hops,
            )
            self.send_icmp_error(packet, "net_unreachable", in_port, hops)
            self.drop("router", router.id, name, "no_route", "", hops)
            return
        if len(group.next_hops) > 1:
            for field in ("ip_src", "ip_dst", "ip_proto", "tp_src", "tp_dst"):
                self.read(packet, field, FULL_MASKS[field])
            hop = group.choose(
                flow_hash(
                    packet.ip_src, packet.ip_dst, packet.ip_proto, packet.tp_src, packet.tp_dst
                )
            )
        else:
            hop = group.next_hops[0]
        self.step(
            "router",
            router.id,
            name,
            "route",
            f"{ip_text(version, packet.ip_dst)} via route {hop.route_id} ({hop.type.value}"
            + (f", ecmp 1 of {len(group.next_hops)}" if len(group.next_hops) > 1 else "")
            + ")",
            hops,
        )
        if hop.type is RouteType.BLACKHOLE:
            self.drop("router", router.id, name, "blackhole", hop.route_id, hops)
            return
        if hop.type is RouteType.REJECT:
            self.send_icmp_error(packet, "net_unreachable", in_port, hops)
            self.drop("router", router.id, name, "reject_route", hop.route_id, hops)
            return
        out_port = self.view.ports.get(hop.port_id or "")
        if out_port is None:
            self.drop("router", router.id, name, "unknown_port", f"next hop {hop.port_id}", hops)
            return
        if hop.gateway is not None:
            next_hop_ip = hop.gateway
        else:
            self.read(packet, "ip_dst", FULL_MASKS["ip_dst"])
            next_hop_ip = packet.ip_dst
        if floating is not None and not self.run_chain(
            packet, floating.post_chain_id, in_port, out_port.id, in_port, hops
        ):
            return
        if vips is not None and not self.run_chain(
            packet, vips.post_chain_id, in_port, out_port.id, in_port, hops
        ):
            return
        if router.outbound_chain_id is not None and not self.run_chain(
            packet, router.outbound_chain_id, in_port, out_port.id, in_port, hops
        ):
            return
        neighbour = self.resolve_neighbour(router, version, next_hop_ip)
        if neighbour is None:
            self.unresolved_next_hop(packet, router, out_port, version, next_hop_ip, hops)
            return
        packet.set("eth_src", out_port.mac)
        packet.set("eth_dst", neighbour)
        packet.ip_ttl -= 1
        packet.ttl_decrements += 1
        self.step(
            "router",
            router.id,
            name,
            "forward",
            f"next hop {ip_text(version, next_hop_ip)} is-at {mac_text(neighbour)}, out port {out_port.id}",
            hops,
        )
        self.port_egress(packet, out_port, in_port, hops)

    def resolve_neighbour(self, router: RouterInfo, version: int, ip: int) -> int | None:
        self.tags.add(intern(neighbour_entry_tag(router.id, version, ip)))
        key = (router.id, version, ip)
        mac = self.neighbour_overlay.get(key)
        if mac is None:
            mac = self.tables.neighbour_mac(router.id, version, ip)
        self.lookups.setdefault(("neighbour", router.id, version, ip), mac)
        return mac

    def learn_neighbour(
        self, router: RouterInfo, version: int, ip: int, mac: int, hops: int
    ) -> None:
        if not ip or mac & MULTICAST_BIT or not mac:
            return
        key = (router.id, version, ip)
        known = self.neighbour_overlay.get(key)
        if known is None:
            known = self.tables.neighbour_mac(router.id, version, ip)
        if known != mac:
            self.neighbour_overlay[key] = mac
            self.learned.append(LearnedNeighbour(router.id, version, ip, mac))
            self.step(
                "router",
                router.id,
                router.name,
                "learn",
                f"{ip_text(version, ip)} is-at {mac_text(mac)}",
                hops,
            )

    def unresolved_next_hop(
        self,
        packet: PacketState,
        router: RouterInfo,
        out_port: PortInfo,
        version: int,
        next_hop_ip: int,
        hops: int,
    ) -> None:
        source = next(iter(out_port.addresses_of(version)), None)
        self.idle_timeout = min(self.idle_timeout, UNRESOLVED_IDLE_TIMEOUT)
        if source is None:
            self.drop("router", router.id, router.name, "no_source_address", out_port.id, hops)
            return
        if version == 4:
            request = replies.arp_request(out_port.mac, source.ip, next_hop_ip)
            what = "ARP request"
        else:
            request = replies.neighbour_solicitation(out_port.mac, source.ip, next_hop_ip)
            what = "neighbour solicitation"
        self.pending.append(
            _PendingReply(request, out_port, f"{what} for {ip_text(version, next_hop_ip)}")
        )
        self.drop(
            "router",
            router.id,
            router.name,
            "neighbour_unresolved",
            f"{ip_text(version, next_hop_ip)} via port {out_port.id}",
            hops,
        )

    def router_arp(
        self, packet: PacketState, router: RouterInfo, in_port: PortInfo, hops: int
    ) -> None:
        self.no_cache("ARP is handled by the router per packet", hops)
        for field in ("arp_op", "arp_spa", "arp_sha", "arp_tpa", "eth_src"):
            self.read(packet, field, FULL_MASKS[field])
        sender_ip = packet.arp_spa
        if any(a.contains(sender_ip) for a in in_port.addresses_of(4)):
            self.learn_neighbour(router, 4, sender_ip, packet.arp_sha, hops)
        own = next((a for a in in_port.addresses_of(4) if a.ip == packet.arp_tpa), None)
        floating = self.view.security.routers.get(router.id)
        vips = self.view.vips.routers.get(router.id)
        if (
            packet.arp_op == ARP_REQUEST
            and own is None
            and vips is not None
            and packet.arp_tpa in vips.arp_answers.get(in_port.id, frozenset())
        ):
            floating = None  # answered below as a VIP
            self.tags.add(intern(f"chain:{vips.pre_chain_id}"))
            text = ip_text(4, packet.arp_tpa)
            self.step("router", router.id, router.name, "arp", f"reply VIP {text}", hops)
            reply = replies.arp_reply(
                sender_mac=in_port.mac,
                sender_ip=packet.arp_tpa,
                target_mac=packet.arp_sha,
                target_ip=packet.arp_spa,
            )
            self.pending.append(_PendingReply(reply, in_port, f"ARP reply for VIP {text}"))
        if (
            packet.arp_op == ARP_REQUEST
            and own is None
            and floating is not None
            and packet.arp_tpa in floating.arp_answers.get(in_port.id, frozenset())
        ):
            self.tags.add(intern(f"chain:{floating.pre_chain_id}"))
            reply = replies.arp_reply(
                sender_mac=in_port.mac,
                sender_ip=packet.arp_tpa,
                target_mac=packet.arp_sha,
                target_ip=packet.arp_spa,
            )
            text = ip_text(4, packet.arp_tpa)
            self.step("router", router.id, router.name, "arp", f"reply floating {text}", hops)
            self.pending.append(_PendingReply(reply, in_port, f"ARP reply for floating {text}"))
        if packet.arp_op == ARP_REQUEST and own is not None:
            reply = replies.arp_reply(
                sender_mac=in_port.mac,
                sender_ip=own.ip,
                target_mac=packet.arp_sha,
                target_ip=packet.arp_spa,
            )
            self.step(
                "router",
                router.id,
                router.name,
                "arp",
                f"reply {own.text} is-at {mac_text(in_port.mac)}",
                hops,
            )
            self.pending.append(_PendingReply(reply, in_port, f"ARP reply for {own.text}"))
        self.drop_reasons.append("arp_consumed")
        self.step("router", router.id, router.name, "consume", "ARP", hops)

    def router_nd(
        self, packet: PacketState, router: RouterInfo, in_port: PortInfo, hops: int
    ) -> None:
        self.no_cache("neighbour discovery is handled by the router per packet", hops)
        for field in ("ip_src", "nd_target", "eth_src", "icmp_type"):
            self.read(packet, field, FULL_MASKS[field])
        addresses = in_port.addresses_of(6)
        if packet.icmp_type == ND_NEIGHBOR_SOLICIT:
            if packet.ip_src and any(a.contains(packet.ip_src) for a in addresses):
                self.learn_neighbour(router, 6, packet.ip_src, packet.eth_src, hops)
            own = next((a for a in addresses if a.ip == packet.nd_target), None)
            if own is not None:
                advert = replies.neighbour_advertisement(
                    router_mac=in_port.mac,
                    target_ip=own.ip,
                    dst_mac=packet.eth_src,
                    dst_ip=packet.ip_src,
                )
                self.step("router", router.id, router.name, "nd", f"advertise {own.text}", hops)
                self.pending.append(_PendingReply(advert, in_port, f"NA for {own.text}"))
        elif packet.icmp_type == ND_NEIGHBOR_ADVERT and any(
            a.contains(packet.nd_target) for a in addresses
        ):
            self.learn_neighbour(router, 6, packet.nd_target, packet.eth_src, hops)
        self.drop_reasons.append("nd_consumed")
        self.step(
            "router", router.id, router.name, "consume", f"ICMPv6 type {packet.icmp_type}", hops
        )

    def router_local(
        self, packet: PacketState, router: RouterInfo, in_port: PortInfo, version: int, hops: int
    ) -> None:
        """A packet addressed to one of the router's own addresses."""
        self.no_cache("traffic to the router itself is answered per packet", hops)
        for field in ("ip_proto", "ip_frag", "icmp_type"):
            self.read(packet, field, FULL_MASKS[field])
        target = ip_text(version, packet.ip_dst)
        proto = packet.ip_proto
        seen = self.frame_as_seen(packet)
        echo_type = ICMP_ECHO_REQUEST if version == 4 else ICMPV6_ECHO_REQUEST
        icmp_proto = IP_PROTO_ICMP if version == 4 else IP_PROTO_ICMPV6
        if packet.ip_frag == FRAG_LATER:
            self.drop("router", router.id, router.name, "to_router", "fragment", hops)
            return
        if proto == icmp_proto and packet.icmp_type == echo_type:
            reply = replies.echo_reply(seen)
            if reply is not None:
                self.step(
                    "router", router.id, router.name, "ping", f"echo reply from {target}", hops
                )
                self.pending.append(_PendingReply(reply, in_port, f"echo reply from {target}"))
            self.drop_reasons.append("to_router")
            return
        if proto == IP_PROTO_UDP:
            self.send_icmp_error(packet, "port_unreachable", in_port, hops, source_ip=packet.ip_dst)
            self.drop("router", router.id, router.name, "to_router", f"udp to {target}", hops)
            return
        if proto == IP_PROTO_TCP:
            self.read(packet, "tcp_flags", FULL_MASKS["tcp_flags"])
            if not packet.tcp_flags & TCP_FLAG_RST:
                reset = replies.tcp_reset(seen, source_mac=in_port.mac)
                if reset is not None:
                    self.pending.append(_PendingReply(reset, in_port, f"TCP RST from {target}"))
            self.drop("router", router.id, router.name, "to_router", f"tcp to {target}", hops)
            return
        self.drop("router", router.id, router.name, "to_router", f"protocol {proto}", hops)

    # ------------------------------------------------------------------ generated packets

    def frame_as_seen(self, packet: PacketState) -> bytes:
        """The frame with this branch's rewrites applied (what the current device received)."""
        frame = self.frame
        original = self.match
        for field in _SETTABLE_ORDER:
            if field in packet.modified:
                frame = rewrite_frame(frame, field, getattr(packet, field))
        if packet.vlan != original.vlan:
            if original.vlan:
                frame = pop_vlan(frame)
            if packet.vlan:
                frame = push_vlan(frame, packet.vlan)
        for _ in range(packet.ttl_decrements):
            frame = dec_ttl(frame)
        return frame

    def icmp_error(
        self,
        packet: PacketState,
        seen: bytes,
        kind: str,
        router_port: PortInfo | None,
        source_ip: int | None = None,
    ) -> bytes | None:
        """An ICMP/ICMPv6 error about `seen` (None when RFC 1812/4443 forbid one). From a
        router: sourced from the router port's address, preferably the one on the sender's
        subnet. From a bridge: on behalf of the destination, like a firewall's REJECT."""
        version = packet.ip_version
        if router_port is None:
            return replies.icmp_error(seen, kind, source_mac=None, source_ip=source_ip)
        if source_ip is None:
            candidates = router_port.addresses_of(version)
            preferred = next((a for a in candidates if a.contains(packet.ip_src)), None)
            chosen = preferred or next(iter(candidates), None)
            if chosen is None:
                return None
            source_ip = chosen.ip
        return replies.icmp_error(seen, kind, source_mac=router_port.mac, source_ip=source_ip)

    def send_icmp_error(
        self,
        packet: PacketState,
        kind: str,
        in_port: PortInfo,
        hops: int,
        source_ip: int | None = None,
    ) -> None:
        self.no_cache(f"ICMP {kind} answers every packet", hops)
        seen = self.frame_as_seen(packet)
        router_port = in_port if in_port.device_kind is DeviceKind.ROUTER else None
        reply = self.icmp_error(packet, seen, kind, router_port, source_ip)
        if reply is not None:
            self.pending.append(_PendingReply(reply, in_port, f"ICMP {kind}"))

    def run_generated(self) -> list[GeneratedPacket]:
        out: list[GeneratedPacket] = []
        for pending in self.pending:
            if self.generation >= MAX_GENERATION_DEPTH:
                break
            try:
                match = extract_flow_match(pending.frame, 0)
            except PacketError as error:  # a builder bug: say so rather than send garbage
                raise ValueError(
                    f"generated {pending.description} is malformed: {error}"
                ) from error
            sub = _Walk(self.ctx, self.now, pending.frame, match, self.generation + 1)
            sub.mac_overlay = self.mac_overlay
            sub.neighbour_overlay = self.neighbour_overlay
            sub.learned = self.learned  # entries learned by the reply's walk are results too
            packet = PacketState.of(match)
            self.step("sim", "", "", "generated", pending.description, 0)
            sub.port_egress(packet, pending.port, pending.port, 0)
            actions, drop_reason = sub.build_actions()
            nested = sub.run_generated()
            out.append(GeneratedPacket(pending.frame, actions, pending.description, drop_reason))
            out.extend(nested)
            self.trace.extend(step._replace(depth=step.depth + 1) for step in sub.trace)
        return out

    # ------------------------------------------------------------------ result

    def check_lookups_still_valid(self) -> None:
        for entry in self.learned:
            if isinstance(entry, LearnedMac):
                key = ("mac", entry.bridge_id, entry.vlan, entry.mac)
                value: object = entry.port_id
            else:
                key = ("neighbour", entry.router_id, entry.version, entry.ip)
                value = entry.mac
            if key in self.lookups and self.lookups[key] != value:
                self.no_cache(f"{entry} was learned after a decision read it", 0)
                return

    def build_actions(self) -> tuple[tuple[Action, ...], str | None]:
        """One ordered action list for every emission (flood copies, possibly with different
        rewrites). Branches are ordered by TTL decrements (DecTtl cannot be undone); a field
        restored to its original value makes the flow depend on that original value."""
        if not self.emissions:
            reason = self.drop_reasons[0] if self.drop_reasons else "no_output"
            return (Drop(reason),), reason
        original = self.match
        actions: list[Action] = []
        current: dict[str, int] = {}
        current_vlan = original.vlan
        current_decrements = 0
        emitted: set[tuple[object, ...]] = set()
        self.reads["vlan"] = FULL_MASKS["vlan"]
        for packet, out in sorted(self.emissions, key=lambda e: e[0].ttl_decrements):
            for field in _SETTABLE_ORDER:
                if field in packet.modified:
                    value = getattr(packet, field)
                    if current.get(field) != value:
                        actions.append(SetField(field, value))
                        current[field] = value
                elif field in current:
                    self.reads[field] = FULL_MASKS[field]
                    actions.append(SetField(field, getattr(original, field)))
                    del current[field]
            if packet.vlan != current_vlan:
                if current_vlan:
                    actions.append(PopVlan())
                if packet.vlan:
                    actions.append(PushVlan(packet.vlan))
                current_vlan = packet.vlan
            while current_decrements < packet.ttl_decrements:
                actions.append(DecTtl())
                current_decrements += 1
            state = (out, current_vlan, current_decrements, tuple(sorted(current.items())))
            if state in emitted:
                continue
            emitted.add(state)
            actions.append(out)
        return tuple(actions), None

    def mask(self) -> tuple[int, ...]:
        reads = self.reads
        return tuple(reads.get(name, 0) & full for name, full in _MASKS)


def simulate(
    frame: bytes,
    ingress_port_id: str,
    ctx: SimContext,
    now: float,
    *,
    match: FlowMatch | None = None,
) -> SimulationResult:
    """Simulate `frame` entering the topology at `ingress_port_id`.

    `match` may be passed when the caller already extracted it (the datapath's upcall key);
    its `in_port` must be the ingress port's tunnel key. A malformed frame is dropped with
    reason "malformed" and never cached.
    """
    port = ctx.topology.ports.get(ingress_port_id)
    in_port_key = port.tunnel_key if port is not None else 0
    if match is None:
        try:
            match = extract_flow_match(frame, in_port_key)
        except PacketError as error:
            return _malformed(frame, ingress_port_id, in_port_key, str(error))
    elif match.in_port != in_port_key:
        raise ValueError(
            f"simulate: match.in_port={match.in_port} is not the tunnel key {in_port_key} "
            f"of ingress port {ingress_port_id!r}"
        )
    walk = _Walk(ctx, now, frame, match)
    walk.port_ingress(PacketState.of(match), ingress_port_id, 0)
    actions, drop_reason = walk.build_actions()
    generated = walk.run_generated()
    walk.check_lookups_still_valid()
    rewritten = None
    if walk.inner_rewrites and drop_reason is None:
        # A NATed ICMP error: its quote is translated here, the outer headers by the actions
        # (independent bytes; the ICMP checksum is fixed for both). Never cached (see _nat).
        rewritten = rewrite_icmp_quote(frame, walk.inner_rewrites)
    return SimulationResult(
        actions=actions,
        match=match,
        mask=walk.mask(),
        tags=frozenset(walk.tags),
        generated=tuple(generated),
        learned=tuple(walk.learned),
        install=walk.install,
        idle_timeout=walk.idle_timeout,
        drop_reason=drop_reason,
        trace=tuple(walk.trace),
        frame=rewritten,
    )


def _malformed(frame: bytes, port_id: str, in_port_key: int, error: str) -> SimulationResult:
    match = FlowMatch(in_port=in_port_key)
    return SimulationResult(
        actions=(Drop("malformed"),),
        match=match,
        mask=tuple(FULL_MASKS[name] if name == "in_port" else 0 for name in FIELD_NAMES),
        tags=frozenset({f"port:{port_id}"}),
        install=False,
        drop_reason="malformed",
        trace=(TraceStep("port", port_id, port_id, "drop", f"malformed frame: {error}"),),
    )
