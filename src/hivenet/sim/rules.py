"""Rule chains compiled for the hot path: header conditions of `model.Rule` turned into one
matcher function per chain, plus what each rule reads (for the megaflow wildcard).

Owns the meaning of every header condition of a rule (with its `inv_*` flag), the fields and
bits each condition reads, and the compilation of a chain's rules into a single Python
function. It does not evaluate actions (accept/drop/jump/...: `sim/chains.py` does) nor
connection-tracking conditions (`match_forward_flow`/`match_return_flow` go through the
flow-state hook in the engine). Pure: no I/O, no clock.

Why code generation: a chain of 50 rules is evaluated on every new flow, several times per
simulation (port and device chains). An interpreter walking condition objects costs ~1 us
per rule in CPython; a generated function with one `if` per rule costs a few tens of ns. The
generated source only ever contains integer literals, comparison operators, a fixed set of
local names (FlowMatch field names) and indexes into a constants tuple, so no text from a
topology object (names, ids) reaches `compile()`.

Matcher semantics: `matcher(packet, start, in_port_id, out_port_id, in_port_groups)` returns
the index of the first rule at or after `start` whose header conditions all hold, or -1.

When: `compile_chain` builds the source, the constants and the reads at once, but runs
Python's `compile()` (most of a chain's compile time) on the matcher's first call, which then
puts the compiled function in the chain's `matcher` itself; rule descriptions (for traces)
are also made on first use. An agent loading 20k chains (`bench/startup.py`) pays for the
chains its simulations reach, when they first reach them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from sys import intern
from typing import Any

from hivenet.model import FragmentPolicy, IpAddrGroup, Rule, RuleAction
from hivenet.model.types import mac_to_int
from hivenet.packets.flowmatch import (
    ETH_TYPE_IPV4,
    ETH_TYPE_IPV6,
    FRAG_LATER,
    FRAG_NONE,
    FULL_MASKS,
    IP_PROTO_ICMP,
    IP_PROTO_ICMPV6,
    IP_PROTO_TCP,
    IP_PROTO_UDP,
)

# (packet, start, in_port_id, out_port_id, in_port_groups) -> rule index or -1
ChainMatcher = Callable[[Any, int, "str | None", "str | None", frozenset[str]], int]

# Fields a generated matcher may read from the packet state (all FlowMatch field names).
_READABLE_FIELDS = frozenset(
    {
        "eth_src",
        "eth_dst",
        "eth_type",
        "vlan",
        "ip_src",
        "ip_dst",
        "ip_proto",
        "ip_tos",
        "ip_frag",
        "tp_src",
        "tp_dst",
        "icmp_type",
        "icmp_code",
    }
)

_ETH_TYPE_FOR_VERSION = {4: ETH_TYPE_IPV4, 6: ETH_TYPE_IPV6}
_L4_PORT_PROTOCOLS = (IP_PROTO_TCP, IP_PROTO_UDP)
_ICMP_PROTOCOLS = (IP_PROTO_ICMP, IP_PROTO_ICMPV6)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule with what the engine needs at evaluation time."""

    rule: Rule
    id: str
    action: RuleAction
    jump_chain_id: str | None
    # Connection tracking condition, evaluated by the engine through the flow-state hook:
    # "forward", "return" or None.
    conntrack_condition: str | None
    # {field: mask} read by this rule's header conditions (whether they match or not).
    reads: Mapping[str, int]
    # `describe_rule(rule)`, made when first asked for (`description`): an agent loading a
    # large topology compiles every rule, and most are never on a simulation's path.
    _description: str | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def description(self) -> str:
        if self._description is None:
            object.__setattr__(self, "_description", describe_rule(self.rule))
        assert self._description is not None
        return self._description


@dataclass(frozen=True, slots=True)
class CompiledChain:
    """A chain's rules in evaluation order, with its generated matcher.

    `reads_through[i]` is the union of the reads of rules 0..i: when evaluation stops at rule
    i (or, for i = len-1, falls off the end), the packet fields in it are what the verdict
    depended on. Using the union from rule 0 even when evaluation resumed after a jump is an
    over-approximation: more specific, never unsound.
    """

    id: str
    name: str
    rules: tuple[CompiledRule, ...]
    matcher: ChainMatcher
    reads_through: tuple[Mapping[str, int], ...]
    ip_addr_group_ids: frozenset[str]
    source: str
    # The flow tag of the chain ("chain:<id>", interned) and `reads_through` as
    # ((field, mask), ...) pairs: what every evaluation adds, computed once per compile.
    tag: str = ""
    read_pairs: tuple[tuple[tuple[str, int], ...], ...] = ()


class _RuleCompiler:
    """Builds the source of one chain's matcher, collecting constants and reads."""

    def __init__(self) -> None:
        self.constants: list[object] = []
        self.fields_used: set[str] = set()

    def constant(self, value: object) -> str:
        self.constants.append(value)
        return f"K[{len(self.constants) - 1}]"

    def use(self, reads: dict[str, int], field: str, mask: int | None = None) -> str:
        if field not in _READABLE_FIELDS:
            raise ValueError(f"rule compiler: field {field!r} is not readable")
        self.fields_used.add(field)
        full = FULL_MASKS[field]
        reads[field] = reads.get(field, 0) | (full if mask is None else mask & full)
        return field

    def conditions(
        self, rule: Rule, ip_addr_groups: Mapping[str, IpAddrGroup]
    ) -> tuple[list[str], dict[str, int]]:
        reads: dict[str, int] = {}
        conds: list[str] = []

        def add(expression: str, inverted: bool) -> None:
            conds.append(f"(not ({expression}))" if inverted else f"({expression})")

        if rule.in_port_ids:
            add(f"in_port_id in {self.constant(frozenset(rule.in_port_ids))}", rule.inv_in_port)
        if rule.out_port_ids:
            add(
                f"out_port_id in {self.constant(frozenset(rule.out_port_ids))}",
                rule.inv_out_port,
            )
        if rule.port_group_id is not None:
            add(f"{self.constant(rule.port_group_id)} in in_port_groups", rule.inv_port_group)
        for group_id, field, inverted in (
            (rule.ip_addr_group_src_id, "ip_src", rule.inv_ip_addr_group_src),
            (rule.ip_addr_group_dst_id, "ip_dst", rule.inv_ip_addr_group_dst),
        ):
            if group_id is None:
                continue
            group = ip_addr_groups.get(group_id)
            addresses = group.addresses if group is not None else ()
            v4 = frozenset(int(a) for a in addresses if a.version == 4)
            v6 = frozenset(int(a) for a in addresses if a.version == 6)
            eth_type = self.use(reads, "eth_type")
            value = self.use(reads, field)
            add(
                f"({eth_type} == {ETH_TYPE_IPV4} and {value} in {self.constant(v4)}) or "
                f"({eth_type} == {ETH_TYPE_IPV6} and {value} in {self.constant(v6)})",
                inverted,
            )
        for mac, mac_mask, field, inverted in (
            (rule.dl_src, rule.dl_src_mask, "eth_src", rule.inv_dl_src),
            (rule.dl_dst, rule.dl_dst_mask, "eth_dst", rule.inv_dl_dst),
        ):
            if mac is None:
                continue
            mask = mac_to_int(mac_mask) if mac_mask is not None else FULL_MASKS[field]
            value = self.use(reads, field, mask)
            add(f"({value} & {mask}) == {mac_to_int(mac) & mask}", inverted)
        if rule.dl_type is not None:
            add(f"{self.use(reads, 'eth_type')} == {rule.dl_type}", rule.inv_dl_type)
        if rule.vlan_id is not None:
            add(f"{self.use(reads, 'vlan')} == {rule.vlan_id}", rule.inv_vlan)
        for network, field, inverted in (
            (rule.nw_src, "ip_src", rule.inv_nw_src),
            (rule.nw_dst, "ip_dst", rule.inv_nw_dst),
        ):
            if network is None:
                continue
            eth_type = self.use(reads, "eth_type")
            expression = f"{eth_type} == {_ETH_TYPE_FOR_VERSION[network.version]}"
            if network.prefixlen:
                mask = int(network.netmask)
                value = self.use(reads, field, mask)
                expression += f" and ({value} & {mask}) == {int(network.network_address)}"
            add(expression, inverted)
        if rule.nw_proto is not None:
            eth_type = self.use(reads, "eth_type")
            proto = self.use(reads, "ip_proto")
            add(
                f"{eth_type} in ({ETH_TYPE_IPV4}, {ETH_TYPE_IPV6}) and {proto} == {rule.nw_proto}",
                rule.inv_nw_proto,
            )
        if rule.nw_tos is not None:
            eth_type = self.use(reads, "eth_type")
            tos = self.use(reads, "ip_tos")
            add(
                f"{eth_type} in ({ETH_TYPE_IPV4}, {ETH_TYPE_IPV6}) and {tos} == {rule.nw_tos}",
                rule.inv_nw_tos,
            )
        for port_range, field, inverted in (
            (rule.tp_src, "tp_src", rule.inv_tp_src),
            (rule.tp_dst, "tp_dst", rule.inv_tp_dst),
        ):
            if port_range is None:
                continue
            proto = self.use(reads, "ip_proto")
            frag = self.use(reads, "ip_frag")
            value = self.use(reads, field)
            if port_range.start == port_range.end:
                test = f"{value} == {port_range.start}"
            else:
                test = f"{port_range.start} <= {value} <= {port_range.end}"
            add(
                f"{proto} in {_L4_PORT_PROTOCOLS} and {frag} != {FRAG_LATER} and {test}",
                inverted,
            )
        if rule.icmp_type is not None:
            proto = self.use(reads, "ip_proto")
            frag = self.use(reads, "ip_frag")
            icmp = f"{proto} in {_ICMP_PROTOCOLS} and {frag} != {FRAG_LATER}"
            icmp += f" and {self.use(reads, 'icmp_type')} == {rule.icmp_type}"
            if rule.icmp_code is not None:
                icmp += f" and {self.use(reads, 'icmp_code')} == {rule.icmp_code}"
            add(icmp, rule.inv_icmp)
        policy = rule.fragment_policy
        if policy is not FragmentPolicy.ANY:
            frag = self.use(reads, "ip_frag")
            test = {
                FragmentPolicy.HEADER: f"{frag} != {FRAG_LATER}",
                FragmentPolicy.NONHEADER: f"{frag} == {FRAG_LATER}",
                FragmentPolicy.UNFRAGMENTED: f"{frag} == {FRAG_NONE}",
            }[policy]
            add(test, False)
        return conds, reads


def describe_rule(rule: Rule) -> str:
    """A one-line human description: position, action and the conditions that are set."""
    skip = {"id", "tenant_id", "name", "chain_id", "position", "action", "jump_chain_id"}
    parts = [f"#{rule.position} {rule.action.value}"]
    if rule.jump_chain_id:
        parts.append(f"-> chain {rule.jump_chain_id}")
    for field_name, value in rule:
        if field_name in skip or value in (None, (), False):
            continue
        if field_name == "fragment_policy" and value is FragmentPolicy.ANY:
            continue
        if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
            value = str(value)
        parts.append(f"{field_name}={value}")
    return " ".join(parts)


def compile_chain(
    chain_id: str,
    chain_name: str,
    rules: Iterable[Rule],
    ip_addr_groups: Mapping[str, IpAddrGroup],
) -> CompiledChain:
    """Compile `rules` (any order; sorted here by (position, id)) into a `CompiledChain`."""
    ordered = sorted(rules, key=lambda r: (r.position, r.id))
    for rule in ordered:
        if rule.chain_id != chain_id:
            raise ValueError(
                f"rule {rule.id}: chain_id={rule.chain_id!r} is not chain {chain_id!r}"
            )
    compiler = _RuleCompiler()
    compiled: list[CompiledRule] = []
    blocks: list[str] = []
    reads_through: list[dict[str, int]] = []
    cumulative: dict[str, int] = {}
    group_ids: set[str] = set()
    for index, rule in enumerate(ordered):
        conds, reads = compiler.conditions(rule, ip_addr_groups)
        for group_id in (rule.ip_addr_group_src_id, rule.ip_addr_group_dst_id):
            if group_id is not None:
                group_ids.add(group_id)
        for field, mask in reads.items():
            cumulative[field] = cumulative.get(field, 0) | mask
        reads_through.append(dict(cumulative))
        guard = [f"start <= {index}"]
        test = " and ".join(guard + conds) or "True"
        blocks.append(f"    if {test}:\n        return {index}\n")
        conntrack = (
            "forward" if rule.match_forward_flow else "return" if rule.match_return_flow else None
        )
        compiled.append(
            CompiledRule(
                rule=rule,
                id=rule.id,
                action=rule.action,
                jump_chain_id=rule.jump_chain_id,
                conntrack_condition=conntrack,
                reads=reads,
            )
        )
    loads = "".join(f"    {field} = packet.{field}\n" for field in sorted(compiler.fields_used))
    source = (
        "def chain_matcher(packet, start, in_port_id, out_port_id, in_port_groups):\n"
        + loads
        + "".join(blocks)
        + "    return -1\n"
    )
    constants = tuple(compiler.constants)

    def compile_matcher() -> ChainMatcher:
        namespace: dict[str, object] = {"K": constants, "__builtins__": {}}
        exec(compile(source, f"<chain {chain_id}>", "exec"), namespace)
        return namespace["chain_matcher"]  # type: ignore[return-value]

    def first_call(
        packet: Any,
        start: int,
        in_port_id: str | None,
        out_port_id: str | None,
        in_port_groups: frozenset[str],
    ) -> int:
        # Python's compile() is most of a chain's compile time: done when a simulation
        # first needs the chain, then the chain holds the compiled matcher itself (no
        # indirection on later calls). An agent loading 20k chains is ready sooner; each
        # chain's first packet pays its compile once.
        matcher = compile_matcher()
        object.__setattr__(chain, "matcher", matcher)
        return matcher(packet, start, in_port_id, out_port_id, in_port_groups)

    chain = CompiledChain(
        id=chain_id,
        name=chain_name,
        rules=tuple(compiled),
        matcher=first_call,
        reads_through=tuple(reads_through),
        ip_addr_group_ids=frozenset(group_ids),
        source=source,
        tag=intern(f"chain:{chain_id}"),
        read_pairs=tuple(tuple(reads.items()) for reads in reads_through),
    )
    return chain


def rule_matches_reference(
    rule: Rule,
    values: Mapping[str, int],
    in_port_id: str | None,
    out_port_id: str | None,
    in_port_groups: Sequence[str],
    ip_addr_groups: Mapping[str, IpAddrGroup],
) -> bool:
    """Straightforward (slow) evaluation of a rule's header conditions, written independently
    of the compiler: the tests check the generated matcher against it."""

    def check(condition: bool, inverted: bool) -> bool:
        return condition != inverted

    eth_type = values["eth_type"]
    is_ip = eth_type in (ETH_TYPE_IPV4, ETH_TYPE_IPV6)
    version = 4 if eth_type == ETH_TYPE_IPV4 else 6 if eth_type == ETH_TYPE_IPV6 else 0
    if rule.in_port_ids and not check(in_port_id in rule.in_port_ids, rule.inv_in_port):
        return False
    if rule.out_port_ids and not check(out_port_id in rule.out_port_ids, rule.inv_out_port):
        return False
    if rule.port_group_id is not None and not check(
        rule.port_group_id in in_port_groups, rule.inv_port_group
    ):
        return False
    for group_id, field, inverted in (
        (rule.ip_addr_group_src_id, "ip_src", rule.inv_ip_addr_group_src),
        (rule.ip_addr_group_dst_id, "ip_dst", rule.inv_ip_addr_group_dst),
    ):
        if group_id is None:
            continue
        group = ip_addr_groups.get(group_id)
        members = {(a.version, int(a)) for a in (group.addresses if group else ())}
        if not check((version, values[field]) in members, inverted):
            return False
    for mac, mac_mask, field, inverted in (
        (rule.dl_src, rule.dl_src_mask, "eth_src", rule.inv_dl_src),
        (rule.dl_dst, rule.dl_dst_mask, "eth_dst", rule.inv_dl_dst),
    ):
        if mac is None:
            continue
        mask = mac_to_int(mac_mask) if mac_mask else (1 << 48) - 1
        if not check(values[field] & mask == mac_to_int(mac) & mask, inverted):
            return False
    if rule.dl_type is not None and not check(eth_type == rule.dl_type, rule.inv_dl_type):
        return False
    if rule.vlan_id is not None and not check(values["vlan"] == rule.vlan_id, rule.inv_vlan):
        return False
    for network, field, inverted in (
        (rule.nw_src, "ip_src", rule.inv_nw_src),
        (rule.nw_dst, "ip_dst", rule.inv_nw_dst),
    ):
        if network is None:
            continue
        inside = version == network.version and (
            ipaddress.ip_address(values[field]) in network
            if version == 4
            else ipaddress.IPv6Address(values[field]) in network
        )
        if not check(inside, inverted):
            return False
    if rule.nw_proto is not None and not check(
        is_ip and values["ip_proto"] == rule.nw_proto, rule.inv_nw_proto
    ):
        return False
    if rule.nw_tos is not None and not check(
        is_ip and values["ip_tos"] == rule.nw_tos, rule.inv_nw_tos
    ):
        return False
    has_l4_ports = values["ip_proto"] in (6, 17) and values["ip_frag"] != FRAG_LATER
    for port_range, field, inverted in (
        (rule.tp_src, "tp_src", rule.inv_tp_src),
        (rule.tp_dst, "tp_dst", rule.inv_tp_dst),
    ):
        if port_range is None:
            continue
        if not check(has_l4_ports and port_range.contains(values[field]), inverted):
            return False
    if rule.icmp_type is not None:
        is_icmp = values["ip_proto"] in (1, 58) and values["ip_frag"] != FRAG_LATER
        same = is_icmp and values["icmp_type"] == rule.icmp_type
        if rule.icmp_code is not None:
            same = same and values["icmp_code"] == rule.icmp_code
        if not check(same, rule.inv_icmp):
            return False
    frag = values["ip_frag"]
    policy = rule.fragment_policy
    if policy is FragmentPolicy.HEADER and frag == FRAG_LATER:
        return False
    if policy is FragmentPolicy.NONHEADER and frag != FRAG_LATER:
        return False
    return not (policy is FragmentPolicy.UNFRAGMENTED and frag != FRAG_NONE)
