"""The state one simulation shares between the devices it walks through: `Walk`.

Owns what every device module (`sim/ports.py`, `sim/bridge.py`, `sim/router.py`,
`sim/chains.py`) reads and writes while a packet is walked: the packet as currently seen
(`PacketState`, one per branch), the megaflow wildcard (`Walk.read`), the flow tags, the
trace, the drop reasons, learned table entries and their per-simulation overlay, the
emissions, the packets to generate afterwards (`PendingReply`, ICMP errors), and the
translation of emissions into one ordered action list. `Here` says where the walk is (for a
trace step or a drop) in one value (`sim/result.py`, as the trace records it).
Must not hold device logic (which device does what with a packet lives in the device
modules) and must not touch I/O, the clock (`now` is passed in), the store or the datapath.

Megaflow soundness: a field read goes through `Walk.read()`, which records the bits in the
wildcard unless the simulation itself already overwrote that field (its value is then fixed
by earlier, recorded decisions). Any decision taken on a packet value records at least the
bits that decision depended on; over-approximating (recording more bits) is always safe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from sys import intern
from typing import Any, TypeVar

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
from hivenet.flows.table import Tag
from hivenet.model import DeviceKind
from hivenet.model.subnet import DEFAULT_UNDERLAY_MTU
from hivenet.packets import dec_ttl, pop_vlan, push_vlan, rewrite_frame
from hivenet.packets.checksum import ipv4_header_checksum_ok
from hivenet.packets.flowmatch import (
    ETH_TYPE_IPV4,
    ETH_TYPE_IPV6,
    FIELD_NAMES,
    FULL_MASKS,
    FlowMatch,
)
from hivenet.packets.mtu import ip_size
from hivenet.packets.options import ipv4_source_routed
from hivenet.packets.slots import slot_builder
from hivenet.sim import replies
from hivenet.sim.dhcp import DhcpBudget
from hivenet.sim.flowstate_hook import NO_FLOW_STATE, FlowStateHook
from hivenet.sim.result import Here, TraceStep
from hivenet.sim.tables import LearnedEntry, LearnedMac, TablesView
from hivenet.sim.topology import BridgeInfo, PortInfo, RouterInfo, TopologyView

MULTICAST_BIT = 1 << 40  # the I/G bit of the first octet of a MAC, as an int
TCP_FLAG_RST = 0x04

DEFAULT_IDLE_TIMEOUT = 60.0
MAX_DEVICES_PER_PATH = 16
MAX_DEVICES_PER_SIMULATION = 256

_new_tuple = tuple.__new__  # builds a NamedTuple from a tuple of all its fields
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
    # The host's underlay MTU: what a bridge without its own `mtu` gives its VMs, less VXLAN.
    underlay_mtu: int = DEFAULT_UNDERLAY_MTU
    # Per-port DHCP flood budget (mutable, keyed by port; None: no limit, as for traces).
    dhcp_budget: DhcpBudget | None = None
    # This host runs the metadata service: VM ports' packets for 169.254.169.254 go to it
    # (sim/metadata.py) and DHCP gives VMs a route to it.
    metadata: bool = False
    # Record the flow-state questions the walk asks, so that a result which opened a
    # connection can be replayed for the next connection of its kind without a walk
    # (`sim/replay.py`, `SimulationResult.replay`).
    record_questions: bool = False


def sim_here(depth: int) -> Here:
    """The simulation itself (not one device): no-cache notes, generated packets."""
    return Here("sim", "", "", depth)


class PacketState:
    """The packet as the simulation currently sees it (one per branch; copied at forks).

    Holds the FlowMatch field values, the fields the simulation rewrote (`modified`), the
    number of TTL decrements so far and the 802.1Q tag currently on the frame (`vlan`).
    `first_router`: the port by which the packet entered the first router on its path and the
    packet as that router received it (None until routed): who answers it when it does not
    fit the egress MTU (`sim/mtu.py`).
    """

    __slots__ = (*FIELD_NAMES, "first_router", "last_match", "modified", "ttl_decrements")

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
    first_router: tuple[PortInfo, PacketState] | None
    # The FlowMatch `to_match` last returned, with the field values it was made of.
    last_match: tuple[tuple[int, ...], FlowMatch]

    @classmethod
    def of(cls, match: FlowMatch) -> PacketState:
        state = cls()
        _copy_fields(state, match)
        state.modified = set()
        state.ttl_decrements = 0
        state.first_router = None
        state.last_match = (_field_values(match), match)
        return state

    def copy(self) -> PacketState:
        other = PacketState()
        _copy_fields(other, self)
        other.modified = set(self.modified)
        other.ttl_decrements = self.ttl_decrements
        other.first_router = self.first_router
        other.last_match = self.last_match
        return other

    def to_match(self) -> FlowMatch:
        """The packet's current fields as a FlowMatch: the same (immutable) object while
        they are those of the last one made, or of the match the walk started from (every
        conntrack and NAT question asks for one, and a walk's questions mostly see the packet
        as it entered: ~0.5 us instead of building a 23-field FlowMatch each time)."""
        values = _field_values(self)
        seen, match = self.last_match
        if values == seen:
            return match
        match = _match_of(self)
        self.last_match = (values, match)
        return match

    def set(self, field: str, value: int) -> None:
        setattr(self, field, value)
        self.modified.add(field)

    @property
    def ip_version(self) -> int:
        return 4 if self.eth_type == ETH_TYPE_IPV4 else 6 if self.eth_type == ETH_TYPE_IPV6 else 0


def _field_copier() -> Callable[[object, object], None]:
    """`copy(dst, src)`: every FlowMatch field of `src` set on `dst`, one statement each (a
    loop of getattr/setattr over 23 names costs ~3x more; this runs on every simulation).
    The source holds only the field names of FIELD_NAMES, never topology text."""
    body = "".join(f"    dst.{name} = src.{name}\n" for name in FIELD_NAMES)
    namespace: dict[str, object] = {}
    exec(compile(f"def copy(dst, src):\n{body}", "<PacketState fields>", "exec"), namespace)
    return namespace["copy"]  # type: ignore[return-value]


def _mask_builder() -> Callable[[dict[str, int]], tuple[int, ...]]:
    """`mask(reads)`: the FlowMatch-ordered tuple of each field's read bits, cut to the
    field's width (0 for a field never read), one expression per field (~45% less than
    mapping over the names). The source holds only field names and integers."""
    values = ", ".join(f"get({name!r}, 0) & {FULL_MASKS[name]}" for name in FIELD_NAMES)
    source = f"def mask(reads):\n    get = reads.get\n    return ({values})\n"
    namespace: dict[str, object] = {}
    exec(compile(source, "<megaflow mask>", "exec"), namespace)
    return namespace["mask"]  # type: ignore[return-value]


_copy_fields = _field_copier()
_mask_of = _mask_builder()
_field_values = attrgetter(*FIELD_NAMES)
# The FlowMatch of a packet's current fields, as `FlowMatch(...)` makes it, each slot set
# through its descriptor (the frozen `__init__` calls `object.__setattr__` per field: ~4.3 us
# for 23 fields, and every conntrack or NAT question asks for one); the constructor itself
# if FlowMatch gains checks or fields other than FIELD_NAMES.
_match_of: Callable[[PacketState], FlowMatch] = slot_builder(FlowMatch, "attributes", FIELD_NAMES)


_TAG_MEMO_LIMIT = 1 << 16


def memo_tag(make: Callable[[str, int, int], str]) -> Callable[[tuple[str, int, int]], str]:
    """`tag(key)`: `make(*key)` interned and remembered per key triple (a table entry's tag
    is spelled on every simulation that looks the entry up; the caller's key is the one it
    looks the entry up by, built once). A pure function of its key, so never stale;
    bounded (emptied when full)."""
    cache: dict[tuple[str, int, int], str] = {}
    get = cache.get

    def tag(key: tuple[str, int, int]) -> str:
        found = get(key)
        if found is None:
            if len(cache) >= _TAG_MEMO_LIMIT:
                cache.clear()
            found = cache[key] = intern(make(*key))
        return found

    return tag


_VALUE_MEMO_LIMIT = 1 << 16
_V = TypeVar("_V")


def memo_value(make: Callable[..., _V]) -> Callable[[tuple[Any, ...]], _V]:
    """`value(key)`: `make(*key)` remembered per key tuple, for immutable values a walk
    builds from a few plain values (flow actions and their trace text: a frozen dataclass's
    constructor sets each field through `object.__setattr__`). A pure function of its key,
    so never stale; bounded (emptied when full)."""
    cache: dict[tuple[Any, ...], _V] = {}
    get = cache.get

    def value(key: tuple[Any, ...]) -> _V:
        found = get(key)
        if found is None:
            if len(cache) >= _VALUE_MEMO_LIMIT:
                cache.clear()
            found = cache[key] = make(*key)
        return found

    return value


set_field_action: Callable[[tuple[str, int]], SetField] = memo_value(SetField)
DEC_TTL = DecTtl()


@dataclass(slots=True)
class PendingReply:
    """A packet to generate once the main walk is over: it leaves through `port` (which may
    be interior: the reply then continues into the peer device)."""

    frame: bytes
    port: PortInfo
    description: str


class Walk:
    """One simulation: the state shared by all branches of one packet and by every device
    module it passes through."""

    __slots__ = (
        "_ip_size",
        "ctx",
        "device_budget",
        "drop_reasons",
        "emissions",
        "frame",
        "generation",
        "handoff",
        "idle_timeout",
        "ingress_port",
        "inner_rewrites",
        "install",
        "learned",
        "lookups",
        "mac_overlay",
        "match",
        "mtu",
        "mtu_answered",
        "nat_read",
        "nat_written",
        "neighbour_overlay",
        "now",
        "pending",
        "questions",
        "reads",
        "recorded_reads",
        "state_reads",
        "tables",
        "tags",
        "trace",
        "view",
    )

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
        # The bits only flow-state questions read (a connection's key; the TCP flags when
        # the answer depended on them): part of the megaflow, not of a replay's match.
        self.state_reads: dict[str, int] = {}
        # Fields a NAT decision wrote, and whether a decision then read one of them (its
        # value comes from the NAT table: such a walk cannot be replayed with another one).
        self.nat_written: set[str] = set()
        self.nat_read = False
        # The flow-state questions asked (`sim/replay.py`), when the context records them
        # and nothing so far made the walk unfit to replay; None otherwise.
        self.questions: list[Any] | None = [] if ctx.record_questions else None
        # Ids of (field, mask) tuples whose every mask is in `reads` (sim/chains.py).
        self.recorded_reads: set[int] = set()
        self.tags: set[Tag] = set()
        self.trace: list[TraceStep] = []
        self.learned: list[LearnedEntry] = []
        self.mac_overlay: dict[tuple[str, int, int], str] = {}
        self.neighbour_overlay: dict[tuple[str, int, int], int] = {}
        self.emissions: list[tuple[PacketState, Output | Tunnel]] = []
        self.pending: list[PendingReply] = []
        self.drop_reasons: list[str] = []
        self.handoff: str | None = None
        self.install = True
        self.idle_timeout = DEFAULT_IDLE_TIMEOUT
        self.device_budget = MAX_DEVICES_PER_SIMULATION
        # What forwarding decisions saw in the shared tables, by entry: if this simulation
        # itself later learns a different value (e.g. a generated ARP request teaches a
        # router the entry it just missed), the result is stale at birth and not cached.
        self.lookups: dict[tuple[str, str, int, int], object] = {}
        # Rewrites of the datagram a NATed ICMP error quotes (no flow action can do them).
        self.inner_rewrites: dict[str, int] = {}
        # The port the packet entered the topology by (None for a generated packet), and the
        # smallest egress MTU of its emissions (0: none yet; see sim/mtu.py).
        self.ingress_port: PortInfo | None = None
        self.mtu = 0
        self.mtu_answered = False  # one ICMP answer per packet, even when flooded
        self._ip_size: tuple[int, int, bool] | bool | None = False

    # ------------------------------------------------------------------ bookkeeping

    def read(self, packet: PacketState, field: str, mask: int) -> None:
        if field in packet.modified:
            if mask and field in self.nat_written:
                self.nat_read = True
            return
        reads = self.reads
        reads[field] = reads.get(field, 0) | mask

    def full_reader(self, packet: PacketState) -> Callable[..., None]:
        """`read(*fields)`: `self.read(packet, field, <all its bits>)` for each, in one call."""
        reads = self.reads
        modified = packet.modified

        def read(*fields: str) -> None:
            for field in fields:
                if field not in modified:
                    reads[field] = reads.get(field, 0) | FULL_MASKS[field]
                elif field in self.nat_written:
                    self.nat_read = True

        return read

    def read_state(self, packet: PacketState, pairs: tuple[tuple[str, int], ...]) -> None:
        """Record what a flow-state question read: (field, mask) pairs (`state_reads`)."""
        modified = packet.modified
        reads = self.state_reads
        for field, mask in pairs:
            if field not in modified:
                reads[field] = reads.get(field, 0) | mask

    def enter(self, kind: str, device: BridgeInfo | RouterInfo, depth: int) -> Here | None:
        """The walk reached `device` (its flows now carry the device's tag): where it is, or
        None when the device is down and the frame was dropped."""
        self.tags.add(device.tag)
        here = _new_tuple(Here, (kind, device.id, device.name, depth))
        if not device.admin_up:
            self.drop(here, "device_down", f"{kind} is down")
            return None
        return here

    def step(self, here: Here, event: str, detail: str) -> None:
        # TraceStep(here, event, detail) without the NamedTuple's Python-level __new__:
        # about half the cost, and a simulation takes a dozen steps or more.
        self.trace.append(_new_tuple(TraceStep, (here, event, detail)))

    def drop(self, here: Here, reason: str, detail: str = "") -> None:
        self.drop_reasons.append(reason)
        self.step(here, "drop", f"{reason}: {detail}" if detail else reason)

    def consume(self, here: Here, reason: str, what: str) -> None:
        """The packet ends here without being dropped as an error (ARP, ND answered)."""
        self.drop_reasons.append(reason)
        self.step(here, "consume", what)

    def hand_off(self, here: Here, service: str, what: str) -> None:
        """The packet goes to a service of the host agent (`SimulationResult.handoff`),
        not into the topology."""
        self.handoff = service
        self.consume(here, service, what)

    def no_cache(self, why: str, depth: int) -> None:
        if self.install:
            self.step(sim_here(depth), "no-cache", why)
        self.install = False

    def ip_size(self) -> tuple[int, int, bool] | None:
        """(IP version, L3 length, may be fragmented) of the packet (rewrites keep them)."""
        size = self._ip_size
        if size is False:
            size = self._ip_size = ip_size(self.frame)
        return size  # type: ignore[return-value]

    def ipv4_header_valid(self) -> bool:
        """Whether the received IPv4 packet's header checksum is right (rewrites on the way
        keep it right or wrong: they update it incrementally)."""
        frame = self.frame
        return ipv4_header_checksum_ok(frame, 18 if frame[12:14] == b"\x81\x00" else 14)

    def ipv4_source_routed(self) -> bool:
        """Whether the received IPv4 packet carries a source route option (rewrites on the
        way never add or remove options)."""
        frame = self.frame
        return ipv4_source_routed(frame, 18 if frame[12:14] == b"\x81\x00" else 14)

    def reply(self, frame: bytes, port: PortInfo, description: str) -> None:
        """Generate `frame` out of `port` once the walk is over."""
        self.pending.append(PendingReply(frame, port, description))

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
        *,
        mtu: int = 0,
    ) -> bytes | None:
        """An ICMP/ICMPv6 error about `seen` (None when RFC 1812/4443 forbid one). From a
        router: sourced from the router port's address, preferably the one on the sender's
        subnet. From a bridge: on behalf of the destination, like a firewall's REJECT."""
        version = packet.ip_version
        if router_port is None:
            return replies.icmp_error(seen, kind, source_mac=None, source_ip=source_ip, mtu=mtu)
        if source_ip is None:
            candidates = router_port.addresses_of(version)
            preferred = next((a for a in candidates if a.contains(packet.ip_src)), None)
            chosen = preferred or next(iter(candidates), None)
            if chosen is None:
                return None
            source_ip = chosen.ip
        return replies.icmp_error(
            seen, kind, source_mac=router_port.mac, source_ip=source_ip, mtu=mtu
        )

    def send_icmp_error(
        self,
        packet: PacketState,
        kind: str,
        in_port: PortInfo,
        depth: int,
        source_ip: int | None = None,
    ) -> None:
        self.no_cache(f"ICMP {kind} answers every packet", depth)
        seen = self.frame_as_seen(packet)
        router_port = in_port if in_port.device_kind is DeviceKind.ROUTER else None
        reply = self.icmp_error(packet, seen, kind, router_port, source_ip)
        if reply is not None:
            self.reply(reply, in_port, f"ICMP {kind}")

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
        if len(self.emissions) == 1:  # most simulations
            return self._one_emission_actions(), None
        return self._ordered_actions(), None

    def _one_emission_actions(self) -> tuple[Action, ...]:
        """`_ordered_actions()` for a walk with one emission, without its bookkeeping."""
        packet, out = self.emissions[0]
        original = self.match
        self.reads["vlan"] = FULL_MASKS["vlan"]
        actions: list[Action] = []
        modified = packet.modified
        if modified:
            for field in _SETTABLE_ORDER:
                if field in modified:
                    actions.append(set_field_action((field, getattr(packet, field))))
        if packet.vlan != original.vlan:
            if original.vlan:
                actions.append(PopVlan())
            if packet.vlan:
                actions.append(PushVlan(packet.vlan))
        if packet.ttl_decrements:
            actions.extend([DEC_TTL] * packet.ttl_decrements)
        actions.append(out)
        return tuple(actions)

    def _ordered_actions(self) -> tuple[Action, ...]:
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
                        actions.append(set_field_action((field, value)))
                        current[field] = value
                elif field in current:
                    self.reads[field] = FULL_MASKS[field]
                    actions.append(set_field_action((field, getattr(original, field))))
                    del current[field]
            if packet.vlan != current_vlan:
                if current_vlan:
                    actions.append(PopVlan())
                if packet.vlan:
                    actions.append(PushVlan(packet.vlan))
                current_vlan = packet.vlan
            while current_decrements < packet.ttl_decrements:
                actions.append(DEC_TTL)
                current_decrements += 1
            state = (out, current_vlan, current_decrements, tuple(sorted(current.items())))
            if state in emitted:
                continue
            emitted.add(state)
            actions.append(out)
        return tuple(actions)

    def mask(self) -> tuple[int, ...]:
        """The megaflow's mask: every bit the walk's decisions and its flow-state questions
        read."""
        if not self.state_reads:
            return _mask_of(self.reads)
        merged = dict(self.reads)
        for field, bits in self.state_reads.items():
            merged[field] = merged.get(field, 0) | bits
        return _mask_of(merged)

    def logic_mask(self) -> tuple[int, ...]:
        """The bits the walk's decisions other than flow-state questions read."""
        return _mask_of(self.reads)
