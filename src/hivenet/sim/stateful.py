"""The real flow-state hook: `TransactionHook` answers the engine's conntrack and NAT questions
from a `flowstate.FlowStateTransaction` (one per simulated packet), and `push_targets_of`
says which hosts must receive the state a simulation created.

Owns the translation between the simulation's view (FlowMatch, compiled rules, zones) and
the flow-state tables (FlowKey, NatRange), the decisions' tags and cacheability, the ICMP
error translation of quoted datagrams (`NatDecision.inner_rewrites`), the static 1:1 NAT of
floating IPs (ports kept, no port block to lease: one fixed address maps to one floating
address, so nothing can collide) and the record of SNAT targets that ran out of ports (the
agent leases another block through the store and the sender's retransmission gets through).
Does not own the tables, committing (the agent does, after the simulation) or sending.
Pure: no I/O, no clock.

Tags: a conntrack decision carries `conntrack_tag` of both directions of the packet's key, so
a flow cached while the key was unknown (e.g. a drop of an unsolicited packet) is
invalidated when either side opens the connection; a NAT decision carries the binding's
`nat_tag` and `nat_reply_tag` of the key a reply lookup used, so a cached "no binding" is
invalidated when a binding with that translated key appears.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from hivenet.flows.actions import Output, Tunnel
from hivenet.flowstate import (
    BLOCK_SIZE,
    FlowKey,
    FlowStateTransaction,
    NatAction,
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
from hivenet.flowstate.keys import format_address, is_icmp_error
from hivenet.model import RuleAction
from hivenet.packets.flowmatch import FlowMatch
from hivenet.sim.flowstate_hook import ConntrackDecision, FlowStateUnsupported, NatDecision
from hivenet.sim.result import SimulationResult
from hivenet.sim.rules import CompiledRule
from hivenet.sim.secgroups import FLOATING_IP_RULE

_KIND_OF_ACTION = {
    RuleAction.DNAT: (NatAction.DNAT, NatKind.DNAT),
    RuleAction.SNAT: (NatAction.SNAT, NatKind.SNAT),
    RuleAction.REV_DNAT: (NatAction.REV_DNAT, NatKind.DNAT),
    RuleAction.REV_SNAT: (NatAction.REV_SNAT, NatKind.SNAT),
}
_KEY_FIELDS = {"ip_src": 1, "ip_dst": 2, "tp_src": 4, "tp_dst": 5}


def nat_reply_tag(zone: str, kind: NatKind, translated: FlowKey) -> str:
    """Tag of "the binding whose translated key is `translated`" (present or not)."""
    return (
        f"natr:{zone}:{kind.name.lower()}:{translated.ip_proto}:"
        f"{format_address(translated.ip_version, translated.ip_src)}:{translated.tp_src}-"
        f"{format_address(translated.ip_version, translated.ip_dst)}:{translated.tp_dst}"
    )


def connection_tags(zone: str, key: FlowKey) -> frozenset[str]:
    return frozenset({conntrack_tag(zone, key), conntrack_tag(zone, key.reversed())})


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
    opened: list[tuple[str, FlowKey]] = field(default_factory=list)
    exhausted: list[NatRange] = field(default_factory=list)


class TransactionHook:
    """`FlowStateHook` over one `FlowStateTransaction` (one simulated packet)."""

    def __init__(self, transaction: FlowStateTransaction) -> None:
        self.transaction = transaction
        self.record = HookRecord()
        self._targets: dict[str, list[NatRange]] = {}

    # ---------------------------------------------------------------- conntrack

    def conntrack(self, packet: FlowMatch, zone: str, now: float) -> ConntrackDecision:
        transaction = self.transaction
        self.record.used = True
        classification = transaction.conntrack.classify(zone, packet, now, transaction.embedded)
        transaction.is_return_flow(zone, packet, now)  # records it for commit
        if classification.verdict is Verdict.NEW and classification.key is not None:
            self.record.opened.append((zone, classification.key))
        key = classification.key if classification.key is not None else key_of_match(packet)
        tags = connection_tags(zone, key) if key is not None else frozenset()
        if classification.verdict is Verdict.RELATED and classification.key is not None:
            # The error's own key says nothing; the quoted connection is what it depends on.
            tags = connection_tags(zone, classification.key)
        return ConntrackDecision(
            is_return=classification.is_return,
            verdict=classification.verdict.value,
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
        action, kind = _KIND_OF_ACTION[rule.action]
        transaction = self.transaction
        self.record.used = True
        key = key_of_match(packet)
        if key is None:
            return NatDecision(applied=False, description="no flow key: not translated")
        if is_icmp_error(packet):
            return self._icmp_error(packet, kind, zone, now)
        if action in (NatAction.REV_DNAT, NatAction.REV_SNAT):
            miss_tag = nat_reply_tag(zone, kind, key.reversed())
            outcome = transaction.nat(zone, action, packet, (), now)
            if outcome.binding is None:
                return NatDecision(tags=frozenset({miss_tag}), applied=False)
            return NatDecision(
                rewrites=dict(outcome.rewrites),
                tags=outcome.tags | {miss_tag},
                description=f"{action.value} {outcome.binding.translated} -> "
                f"{outcome.binding.original}",
            )
        targets = self._nat_targets(rule)
        if rule.rule.name == FLOATING_IP_RULE and action is NatAction.SNAT:
            self._hold_static_block(targets, key)
        try:
            outcome = transaction.nat(zone, action, packet, targets, now)
        except NatPortsExhausted as exhausted:
            self.record.exhausted.extend(exhausted.targets)
            raise FlowStateUnsupported(f"nat_ports_exhausted: {exhausted}") from exhausted
        except NatError as error:
            raise FlowStateUnsupported(f"nat_error: {error}") from error
        binding = outcome.binding
        assert binding is not None  # dnat/snat always bind
        return NatDecision(
            rewrites=dict(outcome.rewrites),
            tags=outcome.tags | {nat_reply_tag(zone, kind, binding.translated)},
            description=f"{action.value} {binding.original} -> {binding.translated}",
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


def iter_hosts(hosts: Iterable[str | None]) -> Iterable[str]:
    return (host for host in hosts if host)
