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

Dispatch: in a chain of `DISPATCH_MIN_RULES` rules or more, most rules usually name a
protocol and a destination port (security-group rules). Such a rule cannot match a packet of
another protocol or port, so the matcher tests only a packet's candidates: the rules that
need its (ip_proto, tp_dst), found by a binary search on tp_dst per protocol, and the rules
of its protocol that need no port, in order; the earliest match of the two wins. A rule is
left out only on a non-inverted condition that is false for every other value, and each
candidate still tests all its conditions, so the result is the straight-line matcher's
(checked against the reference by the tests); the megaflow mask (`reads_through`) does not
change. A chain whose rules do not split (or would be repeated too often) keeps the
straight-line function.

When: `compile_chain` builds each rule's condition text, the constants and the reads at
once, but writes the matcher's source (with its dispatch plan) and runs Python's `compile()`
(most of a chain's compile time) on the matcher's first call, which then puts the compiled
function in the chain's `matcher` itself; rule descriptions (for traces)
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
_PLAIN_ACTIONS = frozenset(
    {RuleAction.ACCEPT, RuleAction.DROP, RuleAction.REJECT, RuleAction.RETURN}
)


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
    # The matcher's source (`source`), written when first asked for: on the matcher's first
    # call, or by a test.
    make_source: Callable[[], str] = dataclasses.field(repr=False, compare=False, default=str)
    _source: str | None = dataclasses.field(default=None, repr=False, compare=False)
    # The flow tag of the chain ("chain:<id>", interned) and `reads_through` as
    # ((field, mask), ...) pairs: what every evaluation adds, computed once per compile.
    tag: str = ""
    read_pairs: tuple[tuple[tuple[str, int], ...], ...] = ()
    # Every rule ends the chain (accept, drop, reject, return) and none has a conntrack
    # condition: the matcher's first match is the verdict (`sim/chains.py`'s fast path).
    plain: bool = False
    # The trace steps of a plain chain's verdicts, by (rule index, depth): values of the
    # chain's own rules, made on first use (`sim/chains.py`; None until then, as for most
    # chains of a large topology). A topology change replaces the compiled chain, and this
    # with it.
    steps: dict[tuple[int, int], Any] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )
    # `rule_refutations()`: per rule, what proves it does not match a packet from fewer
    # fields than its reads; made on first use by a walk that records precise reads.
    refutations: ChainRefutations | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    @property
    def source(self) -> str:
        if self._source is None:
            object.__setattr__(self, "_source", self.make_source())
        assert self._source is not None
        return self._source


# Per rule: (dl_type or None, inv_dl_type, nw_proto or None, inv_nw_proto, the rule's reads
# as (field, mask) pairs).
RuleRefutation = tuple[int | None, bool, int | None, bool, tuple[tuple[str, int], ...]]
ETH_TYPE_PAIRS = (("eth_type", FULL_MASKS["eth_type"]),)
PROTO_PAIRS = (("eth_type", FULL_MASKS["eth_type"]), ("ip_proto", FULL_MASKS["ip_proto"]))
IP_ETH_TYPES = (ETH_TYPE_IPV4, ETH_TYPE_IPV6)
_REFUTED_READS_MAX = 1024  # remembered evaluations per chain (emptied when full)


class ChainRefutations:
    """What proves, rule by rule, that a chain's rules did not match a packet, from fewer
    fields than their reads (`chain_reads`)."""

    __slots__ = ("_reads", "rules")

    def __init__(self, rules: tuple[RuleRefutation, ...]) -> None:
        self.rules = rules
        # (through, matched, eth_type, ip_proto) -> the evaluation's (field, mask) pairs
        self._reads: dict[tuple[int, tuple[int, ...], int, int], tuple[tuple[str, int], ...]] = {}

    def chain_reads(
        self, through: int, matched: tuple[int, ...], eth_type: int, proto: int
    ) -> tuple[tuple[str, int], ...]:
        """The (field, mask) pairs evaluating rules 0..`through` of the chain read for a
        packet of `eth_type` and IP protocol `proto`, the matcher having returned the rules
        `matched`: a matched rule read all its fields, one that did not match only those of
        a failing `dl_type` or `nw_proto` condition when there is one, else all its fields.
        A pure function of its arguments, remembered per chain (bounded)."""
        key = (through, matched, eth_type, proto)
        found = self._reads.get(key)
        if found is not None:
            return found
        is_ip = eth_type in IP_ETH_TYPES
        reads: dict[str, int] = {}
        for index in range(through + 1):
            dl_type, inv_dl_type, nw_proto, inv_nw_proto, pairs = self.rules[index]
            if index not in matched:
                if dl_type is not None and (eth_type == dl_type) == inv_dl_type:
                    pairs = ETH_TYPE_PAIRS
                elif nw_proto is not None and (is_ip and proto == nw_proto) == inv_nw_proto:
                    pairs = PROTO_PAIRS
            for field, mask in pairs:
                reads[field] = reads.get(field, 0) | mask
        found = _shared_pairs(tuple(reads.items()))
        if len(self._reads) >= _REFUTED_READS_MAX:
            self._reads.clear()
        self._reads[key] = found
        return found


def rule_refutations(chain: CompiledChain) -> ChainRefutations:
    """`chain.refutations`, made once per compiled chain (a topology change replaces the
    chain, and this with it).

    A rule's header conditions are one conjunction (`_RuleCompiler.conditions`): when one of
    them fails for a packet, it fails for every packet equal in that condition's fields, so
    those fields alone show that the rule did not match. The ones kept: `dl_type` (reads
    eth_type) and `nw_proto` (reads eth_type and ip_proto), the tests that tell a security
    group's DHCP, ARP and ICMPv6 rules from a TCP connection's packet; a rule that fails
    some other way reads all its fields, as `read_pairs` says."""
    made = chain.refutations
    if made is None:
        made = ChainRefutations(
            tuple(
                (
                    compiled.rule.dl_type,
                    compiled.rule.inv_dl_type,
                    compiled.rule.nw_proto,
                    compiled.rule.inv_nw_proto,
                    _shared_pairs(tuple(compiled.reads.items())),
                )
                for compiled in chain.rules
            )
        )
        object.__setattr__(chain, "refutations", made)
    return made


class _RuleCompiler:
    """Builds the source of one chain's matcher, collecting constants and reads."""

    def __init__(self) -> None:
        self.constants: list[object] = []

    def constant(self, value: object) -> str:
        self.constants.append(value)
        return f"K[{len(self.constants) - 1}]"

    def use(self, reads: dict[str, int], field: str, mask: int | None = None) -> str:
        if field not in _READABLE_FIELDS:
            raise ValueError(f"rule compiler: field {field!r} is not readable")
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


# Chains shorter than this are matched by one straight-line function (a dispatch costs about
# as much as testing a few rules).
DISPATCH_MIN_RULES = 8
# A dispatched matcher repeats the rules that need no particular protocol once per protocol
# branch: past this many rule tests in all (per rule of the chain), it is not used.
_DISPATCH_GROWTH = 3
# Port leaves of the tp_dst search tree hold up to this many ports, tested one by one.
_LEAF_PORTS = 3


@dataclass(frozen=True, slots=True)
class _Dispatch:
    """A chain's rules by what a packet must have for them to match, each in chain order:
    `ports[ip_proto][tp_dst]` the rules that need that protocol (TCP or UDP) and that
    destination port; `protos[ip_proto]` those that need that protocol (or none) and no
    particular port; `default` those that need no particular protocol."""

    ports: dict[int, dict[int, tuple[int, ...]]]
    protos: dict[int, tuple[int, ...]]
    default: tuple[int, ...]


def _protocol_constraint(rule: Rule) -> tuple[frozenset[int] | None, int | None]:
    """(the ip_proto values a packet must have for `rule` to match, or None: any; the one
    tp_dst it must have, or None: any). Only non-inverted conditions constrain: each of them
    is false, as compiled above and in `rule_matches_reference`, for any other value."""
    protos: frozenset[int] | None = None
    needs: list[frozenset[int]] = []
    if rule.nw_proto is not None and not rule.inv_nw_proto:
        needs.append(frozenset({rule.nw_proto}))
    if (rule.tp_src is not None and not rule.inv_tp_src) or (
        rule.tp_dst is not None and not rule.inv_tp_dst
    ):
        needs.append(frozenset(_L4_PORT_PROTOCOLS))
    if rule.icmp_type is not None and not rule.inv_icmp:
        needs.append(frozenset(_ICMP_PROTOCOLS))
    for need in needs:
        protos = need if protos is None else protos & need
    port = None
    tp_dst = rule.tp_dst
    if tp_dst is not None and not rule.inv_tp_dst and tp_dst.start == tp_dst.end:
        port = tp_dst.start
    return protos, port


def _dispatch_plan(rules: Sequence[Rule]) -> _Dispatch | None:
    """The rules grouped so that a packet's candidates are `protos[ip_proto]` (else
    `default`) and `ports[ip_proto][tp_dst]`: a rule in neither cannot match the packet.
    None when some protocol's candidates are the whole chain anyway, or when the groups
    would repeat too many rules."""
    constraints = [_protocol_constraint(rule) for rule in rules]
    named = sorted({p for protos, _ in constraints if protos is not None for p in protos})
    if not named:
        return None
    default = tuple(i for i, (protos, _) in enumerate(constraints) if protos is None)
    protos_of = {
        p: tuple(
            i
            for i, (protos, port) in enumerate(constraints)
            if port is None and (protos is None or p in protos)
        )
        for p in named
    }
    ports: dict[int, dict[int, list[int]]] = {}
    for i, (protos, port) in enumerate(constraints):
        if port is not None and protos is not None:
            for p in protos:  # TCP and/or UDP: a tp_dst condition requires one of them
                ports.setdefault(p, {}).setdefault(port, []).append(i)
    tests = (
        len(default)
        + sum(map(len, protos_of.values()))
        + sum(len(members) for by_port in ports.values() for members in by_port.values())
    )
    if tests > _DISPATCH_GROWTH * len(rules) + 16:
        return None
    if any(len(members) == len(rules) for members in protos_of.values()):
        return None
    return _Dispatch(
        ports={p: {port: tuple(m) for port, m in by_port.items()} for p, by_port in ports.items()},
        protos=protos_of,
        default=default,
    )


_MATCHER_ARGS = "packet, start, in_port_id, out_port_id, in_port_groups"


def _matcher_source(
    tests: Sequence[str], rule_fields: Sequence[Iterable[str]], dispatch: _Dispatch | None
) -> str:
    """The matcher's source: one function testing every rule in order or, dispatched, only a
    packet's candidates: a binary search on tp_dst (per protocol) finds the earliest match
    among the rules that need that port, then the rules of the packet's protocol that need
    no port are tested in order, each winning only over a later port match. Only FlowMatch
    field names, integers and `K[...]` constants appear in it."""
    out = [f"def chain_matcher({_MATCHER_ARGS}):\n"]
    fields = sorted(set().union(*rule_fields))
    if dispatch is not None:
        fields = sorted({*fields, "ip_proto", "tp_dst"})
    out.extend(f"    {field} = packet.{field}\n" for field in fields)
    if dispatch is None:
        out.extend(f"    if {tests[i]}:\n        return {i}\n" for i in range(len(tests)))
        out.append("    return -1\n")
        return "".join(out)

    def port_tree(by_port: Mapping[int, tuple[int, ...]], ports: Sequence[int], pad: str) -> None:
        if len(ports) > _LEAF_PORTS:
            middle = len(ports) // 2
            out.append(f"{pad}if tp_dst < {ports[middle]}:\n")
            port_tree(by_port, ports[:middle], pad + "    ")
            out.append(f"{pad}else:\n")
            port_tree(by_port, ports[middle:], pad + "    ")
            return
        for n, port in enumerate(ports):
            out.append(f"{pad}{'if' if n == 0 else 'elif'} tp_dst == {port}:\n")
            for k, i in enumerate(by_port[port]):
                out.append(f"{pad}    {'if' if k == 0 else 'elif'} {tests[i]}:\n")
                out.append(f"{pad}        found = {i}\n")

    out.append("    found = -1\n")
    for n, (proto, by_port) in enumerate(sorted(dispatch.ports.items())):
        out.append(f"    {'if' if n == 0 else 'elif'} ip_proto == {proto}:\n")
        port_tree(by_port, sorted(by_port), "        ")
    branches: list[tuple[int | None, tuple[int, ...]]] = [
        *sorted(dispatch.protos.items()),
        (None, dispatch.default),
    ]
    for n, (named, members) in enumerate(branches):
        head = "else" if named is None else f"{'if' if n == 0 else 'elif'} ip_proto == {named}"
        out.append(f"    {head}:\n")
        for i in members:
            out.append(f"        if {tests[i]}:\n")
            out.append(f"            return {i} if found < 0 or {i} < found else found\n")
        out.append("        pass\n")
    out.append("    return found\n")
    return "".join(out)


# (field, mask) tuples of chains' `read_pairs`, one object per content: security-group chains
# of a topology mostly read the same fields with the same masks (less memory; the walk records
# a tuple it already recorded once, by identity). Bounded: emptied when full (only sharing is
# lost).
_PAIRS: dict[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]] = {}
_PAIRS_LIMIT = 65536


def _shared_pairs(pairs: tuple[tuple[str, int], ...]) -> tuple[tuple[str, int], ...]:
    shared = _PAIRS.get(pairs)
    if shared is None:
        if len(_PAIRS) >= _PAIRS_LIMIT:
            _PAIRS.clear()
        shared = _PAIRS[pairs] = pairs
    return shared


def compile_chain(
    chain_id: str,
    chain_name: str,
    rules: Iterable[Rule],
    ip_addr_groups: Mapping[str, IpAddrGroup],
    *,
    dispatch_min_rules: int | None = None,
) -> CompiledChain:
    """Compile `rules` (any order; sorted here by (position, id)) into a `CompiledChain`.
    A chain of at least `dispatch_min_rules` (default `DISPATCH_MIN_RULES`) rules gets a
    dispatched matcher (see the module doc), when its rules allow one."""
    ordered = sorted(rules, key=lambda r: (r.position, r.id))
    for rule in ordered:
        if rule.chain_id != chain_id:
            raise ValueError(
                f"rule {rule.id}: chain_id={rule.chain_id!r} is not chain {chain_id!r}"
            )
    compiler = _RuleCompiler()
    compiled: list[CompiledRule] = []
    tests: list[str] = []
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
        tests.append(test)
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
    dispatched = len(ordered) >= (
        DISPATCH_MIN_RULES if dispatch_min_rules is None else dispatch_min_rules
    )
    constants = tuple(compiler.constants)

    def make_source() -> str:
        # On first use, like compile() (an agent loading 20k chains compiles few at once).
        dispatch = _dispatch_plan(ordered) if dispatched else None
        return _matcher_source(tests, [rule.reads.keys() for rule in compiled], dispatch)

    def compile_matcher() -> ChainMatcher:
        namespace: dict[str, Any] = {"K": constants, "__builtins__": {}}
        exec(compile(chain.source, f"<chain {chain_id}>", "exec"), namespace)
        matcher: ChainMatcher = namespace["chain_matcher"]
        return matcher

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
        make_source=make_source,
        tag=intern(f"chain:{chain_id}"),
        read_pairs=tuple(_shared_pairs(tuple(reads.items())) for reads in reads_through),
        plain=all(
            rule.action in _PLAIN_ACTIONS and rule.conntrack_condition is None for rule in compiled
        ),
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
