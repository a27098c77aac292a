"""The real flow-state hook: `TransactionHook` answers the engine's conntrack and NAT questions
from a `flowstate.FlowStateTransaction` (one per simulated packet), and `push_targets_of`
says which hosts must receive the state a simulation created.

Owns the translation between the simulation's view (FlowMatch, compiled rules, zones) and
the flow-state tables (FlowKey, NatRange), the decisions' tags and cacheability, the ICMP
error translation of quoted datagrams (`NatDecision.inner_rewrites`), the static 1:1 NAT of
floating IPs (ports kept, no port block to lease: one fixed address maps to one floating
address, so nothing can collide), the record of SNAT targets that ran out of ports (the
agent leases another block through the store) and `snat_targets_served` (the SNAT ranges a
host leases a block of ahead of the first packet).
Does not own the tables, committing (the agent does, after the simulation) or sending.
Pure: no I/O, no clock.

Tags: a conntrack decision carries the connection's `conntrack_tag`, which is the same for
both directions of a key, so a flow cached while the key was unknown (e.g. a drop of an
unsolicited packet) is invalidated when either side opens the connection. A forward NAT
decision (dnat/snat) carries its binding's `nat_tag` alone: every change to the binding of
its original key names that tag (its creation, a peer's replacement, expiry, eviction), and
a binding that a newer one with the same original or translated key replaces, or that a
SYN's DNAT rebinding drops (even when the rebinding then fails or is rolled back), is handed
to the agent (`NatTable.take_replaced`), which removes its flows as an expired binding's.
A reverse
decision (rev_dnat/rev_snat) carries the `nat_reply_tag` of the key its reply lookup used,
hit or miss (and the binding's `nat_tag` on a hit), so a cached "no binding" is invalidated
when a binding with that translated key appears: a commit invalidates each new binding's
`nat_reply_tag` too (`HookRecord.commit_tags`), though no forward flow carries it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hivenet.flows.actions import Output, Tunnel
from hivenet.flowstate import (
    BLOCK_SIZE,
    FlowKey,
    FlowStateTransaction,
    NatAction,
    NatBinding,
    NatError,
    NatKind,
    NatPortsExhausted,
    NatRange,
    PortBlock,
    Verdict,
    conntrack_tag,
    key_of_match,
    nat_tag,
)
from hivenet.flowstate.keys import is_icmp_error
from hivenet.model import RuleAction
from hivenet.packets.flowmatch import FlowMatch
from hivenet.packets.slots import slot_builder
from hivenet.sim.flowstate_hook import ConntrackDecision, FlowStateUnsupported, NatDecision
from hivenet.sim.result import SimulationResult
from hivenet.sim.rules import CompiledRule
from hivenet.sim.secgroups import FLOATING_IP_RULE
from hivenet.sim.topology import TopologyView

# A NAT rule's action -> (table action, binding kind, whether it reverses, its trace name).
# Looked up once per NAT question: an enum member read off its class (`NatAction.SNAT`) or
# its `.value` is a Python-level descriptor call each (~0.2-0.3 us) on this path.
_KIND_OF_ACTION = {
    rule_action: (action, kind, reverses, action.value)
    for rule_action, action, kind, reverses in (
        (RuleAction.DNAT, NatAction.DNAT, NatKind.DNAT, False),
        (RuleAction.SNAT, NatAction.SNAT, NatKind.SNAT, False),
        (RuleAction.REV_DNAT, NatAction.REV_DNAT, NatKind.DNAT, True),
        (RuleAction.REV_SNAT, NatAction.REV_SNAT, NatKind.SNAT, True),
    )
}
_SNAT_ACTION = NatAction.SNAT
_NEW = Verdict.NEW
_KEY_FIELDS = {"ip_src": 1, "ip_dst": 2, "tp_src": 4, "tp_dst": 5}
# The decisions of every conntrack and NAT question (three per new NATed connection), built
# without the frozen dataclasses' per-field `object.__setattr__` (~1.3 us less each).
_conntrack_decision = slot_builder(ConntrackDecision, "keywords")
_nat_decision = slot_builder(NatDecision, "keywords")


def connection_tags(zone: str, key: FlowKey) -> frozenset[int]:
    """The tags of the connection `key` (either direction) belongs to in `zone`."""
    return frozenset({conntrack_tag(zone, key)})


def _rewrite_key(key: FlowKey, rewrites: dict[str, int]) -> FlowKey:
    values = list(key)
    for name, value in rewrites.items():
        if name == "icmp_id":
            values[4] = values[5] = value
        elif name in _KEY_FIELDS:
            values[_KEY_FIELDS[name]] = value
    return FlowKey.unchecked(*values)


@dataclass(slots=True)
class HookRecord:
    """What the hook saw besides the transaction: connections a commit would open (their
    flows must be invalidated on commit) and SNAT targets without a free port."""

    used: bool = False  # any conntrack or NAT question was asked
    # (zone, key, its `conntrack_tag` as the simulation spelled it) per connection a commit
    # would open.
    opened: list[tuple[str, FlowKey, int]] = field(default_factory=list)
    exhausted: list[NatRange] = field(default_factory=list)
    # Per binding a forward NAT rule used: its `nat_tag` (the decision's tag) and its
    # `nat_reply_tag` (the decision does not carry it: only for `commit_tags`), as the
    # simulation spelled them.
    binding_tags: list[tuple[NatBinding, int, int]] = field(default_factory=list)

    def commit_tags(self, bindings: Sequence[NatBinding]) -> tuple[set[int], int]:
        """The tags a commit that opened `opened` and created `bindings` invalidates (each
        connection's `conntrack_tag`, each binding's `nat_tag` and `nat_reply_tag`: the
        strings the simulation made; the reply tag for the flows that cached a reply lookup's
        miss of the new translated key), and how many connections it opened. Every binding
        must be one this hook's `nat` made (matched by identity): a transaction's bindings
        are created only through its hook."""
        tags = {tag for _, _, tag in self.opened}
        known = self.binding_tags
        for binding in bindings:
            for candidate, forward_tag, reply_tag in known:
                if candidate is binding:
                    tags.add(forward_tag)
                    tags.add(reply_tag)
                    break
            else:
                raise ValueError(f"{binding} was not made through this hook's nat()")
        return tags, len(self.opened)


class TransactionHook:
    """`FlowStateHook` over one `FlowStateTransaction` (one simulated packet)."""

    def __init__(
        self,
        transaction: FlowStateTransaction,
        nat_targets: dict[str, list[NatRange]] | None = None,
    ) -> None:
        """`nat_targets`: rule id -> its parsed NAT targets, shared by the hooks of one
        topology revision (the owner empties it when the revision changes); default: this
        hook's own."""
        self.transaction = transaction
        self.record = HookRecord()
        self._targets: dict[str, list[NatRange]] = {} if nat_targets is None else nat_targets

    # ---------------------------------------------------------------- conntrack

    def conntrack(self, packet: FlowMatch, zone: str, now: float) -> ConntrackDecision:
        transaction = self.transaction
        record = self.record
        record.used = True
        # Classified once: remembered for the commit, with the tag of the classified key.
        classification, tag = transaction.classify(zone, packet, now)
        # RELATED: the error's own key says nothing; the quoted connection (the classified
        # key) is what it depends on.
        key = classification.key
        tags: frozenset[int] = frozenset()
        if key is not None and tag is not None:
            if classification.verdict is _NEW:
                record.opened.append((zone, key, tag))
            tags = frozenset((tag,))
        else:
            own_key = key_of_match(packet)
            if own_key is not None:
                tags = frozenset((transaction.texts.conntrack(zone, own_key),))
        return _conntrack_decision(
            is_return=classification.is_return,
            verdict=classification.verdict._value_,  # (`.value`: a descriptor call)
            tags=tags,
            cacheable=not is_icmp_error(packet),
            reads_tcp_flags=classification.depends_on_tcp_flags,
        )

    # ---------------------------------------------------------------- NAT

    def _nat_targets(self, rule: CompiledRule) -> list[NatRange]:
        targets = self._targets.get(rule.id)
        if targets is None:
            targets = self._targets[rule.id] = [
                NatRange.parse(
                    str(target.address_from),
                    str(target.address_to),
                    target.port_from,
                    target.port_to,
                )
                for target in rule.rule.nat_targets
            ]
        return targets

    def nat(self, packet: FlowMatch, rule: CompiledRule, zone: str, now: float) -> NatDecision:
        action, kind, reverses, action_name = _KIND_OF_ACTION[rule.action]
        transaction = self.transaction
        self.record.used = True
        key = key_of_match(packet)
        if key is None:
            return NatDecision(applied=False, description="no flow key: not translated")
        if is_icmp_error(packet):
            return self._icmp_error(packet, kind, zone, now)
        texts = transaction.texts
        if reverses:
            miss_tag = texts.nat_key(zone, kind, key)  # = nat_reply_tag of key.reversed()
            outcome = transaction.nat(zone, action, packet, (), now, key=key)
            if outcome.binding is None:
                return _nat_decision(tags=frozenset((miss_tag,)), applied=False)
            return _nat_decision(
                # The outcome's own dict (the binding makes a new one per call): no copy.
                rewrites=outcome.rewrites,
                tags=outcome.tags | {miss_tag},
                description=f"{action_name} {outcome.binding.translated} -> "
                f"{outcome.binding.original}",
            )
        targets = self._nat_targets(rule)
        if rule.rule.name == FLOATING_IP_RULE and action is _SNAT_ACTION:
            self._hold_static_block(targets, key)
        try:
            outcome = transaction.nat(zone, action, packet, targets, now, key=key)
        except NatPortsExhausted as exhausted:
            self.record.exhausted.extend(exhausted.targets)
            raise FlowStateUnsupported(f"nat_ports_exhausted: {exhausted}") from exhausted
        except NatError as error:
            raise FlowStateUnsupported(f"nat_error: {error}") from error
        binding = outcome.binding
        assert binding is not None  # dnat/snat always bind
        forward_tags = outcome.tags
        (forward_tag,) = forward_tags
        # Not a tag of this flow (see the module docstring): the commit invalidates it.
        reply_tag = texts.nat_reply(zone, kind, binding.translated)
        self.record.binding_tags.append((binding, forward_tag, reply_tag))
        return _nat_decision(
            rewrites=outcome.rewrites,
            tags=forward_tags,
            # False when the table kept a binding only because this is no SYN (a SYN on the
            # same 5-tuple would rebind: the answer read the TCP flags, the megaflow does not).
            # Until now the transaction noted it and no one read it: the flow was cached.
            cacheable=outcome.cacheable,
            description=f"{action_name} {binding.original} -> {binding.translated}",
        )

    def _hold_static_block(self, targets: list[NatRange], key: FlowKey) -> None:
        """1:1 NAT keeps the port; hold that port's block of the single floating address."""
        allocator = self.transaction.nat_table.allocator
        if allocator is None:
            return
        for target in targets:
            if target.address_count == 1 and target.keeps_port and key.tp_src:
                allocator.add_block(
                    PortBlock(target.ip_version, target.ip_from, key.tp_src // BLOCK_SIZE)
                )

    def _icmp_error(self, packet: FlowMatch, kind: NatKind, zone: str, now: float) -> NatDecision:
        transaction = self.transaction
        embedded = transaction.embedded
        if embedded is None:
            return NatDecision(applied=False, cacheable=False, description="no quoted datagram")
        transaction.cacheable = False
        translation = transaction.nat_table.icmp_error_translation(
            zone, kind, packet, embedded, now
        )
        if translation is None:
            return NatDecision(applied=False, cacheable=False)
        # Later devices of this walk see the quote as translated here.
        transaction.embedded = _rewrite_key(embedded, translation.inner_rewrites)
        return NatDecision(
            rewrites=dict(translation.outer_rewrites),
            tags=frozenset({nat_tag(translation.binding)}),
            cacheable=False,
            inner_rewrites=dict(translation.inner_rewrites),
            description=f"ICMP error about {translation.binding.translated} -> "
            f"{translation.binding.original}",
        )


def egress_hosts_of(result: SimulationResult, underlay_hosts: dict[str, str]) -> set[str]:
    """Hosts a result's actions tunnel to (`underlay_hosts`: underlay IP -> host id)."""
    hosts: set[str] = set()
    for action in result.actions:
        if isinstance(action, Tunnel):
            host = underlay_hosts.get(action.remote_ip)
            if host is not None:
                hosts.add(host)
    return hosts


def egress_port_keys_of(result: SimulationResult) -> set[int]:
    keys: set[int] = set()
    for action in result.actions:
        if isinstance(action, Output):
            keys.add(action.port_key)
        elif isinstance(action, Tunnel):
            keys.add(action.tunnel_key)
    return keys


def snat_targets_served(view: TopologyView, host_id: str) -> list[NatRange]:
    """The SNAT ranges (port-translating ones) a host may need ports of: those of SNAT rules
    in the chains of every device reachable from a port bound to `host_id` (through peered
    ports), of their floating-IP chains (hairpin SNAT) and of the chains those jump to. The
    agent leases a block of each ahead of the first packet. Floating IPs (1:1, ports kept)
    need no block leased ahead."""
    devices: set[str] = set()
    pending = [p.device_id for p in view.ports.values() if p.host_id == host_id]
    chain_ids: list[str | None] = []
    while pending:
        device_id = pending.pop()
        if device_id in devices:
            continue
        devices.add(device_id)
        device = view.routers.get(device_id) or view.bridges.get(device_id)
        if device is None:
            continue
        chain_ids += (device.inbound_chain_id, device.outbound_chain_id)
        floating = view.security.routers.get(device_id)
        if floating is not None:  # floating-IP chains: hairpin SNAT to the router's address
            chain_ids += (floating.pre_chain_id, floating.post_chain_id)
        for port_id in device.port_ids:
            port = view.ports.get(port_id)
            if port is None:
                continue
            chain_ids += (port.inbound_chain_id, port.outbound_chain_id)
            peer = view.ports.get(port.peer_id) if port.peer_id else None
            if peer is not None and peer.device_id not in devices:
                pending.append(peer.device_id)
    targets: dict[NatRange, None] = {}
    seen_chains: set[str] = set()
    while chain_ids:
        chain_id = chain_ids.pop()
        if chain_id is None or chain_id in seen_chains:
            continue
        seen_chains.add(chain_id)
        chain = view.chains.get(chain_id)
        if chain is None:
            continue
        for compiled in chain.rules:
            if compiled.jump_chain_id is not None:
                chain_ids.append(compiled.jump_chain_id)
            if compiled.action is not RuleAction.SNAT or compiled.rule.name == FLOATING_IP_RULE:
                continue
            for target in compiled.rule.nat_targets:
                nat_range = NatRange.parse(
                    str(target.address_from),
                    str(target.address_to),
                    target.port_from,
                    target.port_to,
                )
                if not nat_range.keeps_port:
                    targets[nat_range] = None
    return list(targets)
