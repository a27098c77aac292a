"""Rule chains during a walk: `run_chain()` evaluates one chain for a packet at a port or
device and says whether the packet goes on.

Owns rule actions (accept/drop/reject/return/jump/continue), jump loops and depth, the
flow-state hook questions (conntrack conditions, NAT rules through `_nat`), the load
balancer's member choice for VIP rules, and answering a rejected packet (TCP RST or ICMP
admin-prohibited). Which rules match is the compiled chain's matcher (`sim/rules.py`); which
chain runs where is the caller's (ports, bridge, router).
Must not touch I/O, the clock, the store or the datapath.
"""

from __future__ import annotations

from collections.abc import Sequence
from sys import intern

from hivenet.flows.actions import SETTABLE_FIELDS
from hivenet.model import DeviceKind, RuleAction
from hivenet.packets.flowmatch import FULL_MASKS, IP_PROTO_TCP
from hivenet.sim import replies
from hivenet.sim.flowstate_hook import FlowStateUnsupported
from hivenet.sim.result import TraceStep
from hivenet.sim.rules import CompiledChain, CompiledRule, rule_refutations
from hivenet.sim.secgroups import drop_reason_of
from hivenet.sim.topology import PortInfo
from hivenet.sim.vips import VipRefusal
from hivenet.sim.walk import TCP_FLAG_RST, Here, PacketState, Walk

MAX_JUMP_DEPTH = 16
_new_tuple = tuple.__new__  # Here(...) without the NamedTuple's Python-level __new__
# A compiled chain by id without `CompiledChains.get`'s Python frame (it skips the lazy
# `__missing__`: a None falls back to `get`, which decodes and compiles a stored chain).
_dict_get = dict.get

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
_CONNTRACK_READ_PAIRS = tuple((field, FULL_MASKS[field]) for field in _CONNTRACK_READS)
_TCP_FLAGS_READ_PAIRS = (("tcp_flags", FULL_MASKS["tcp_flags"]),)
_FORWARD_NAT = (RuleAction.DNAT, RuleAction.SNAT)
# A rule action's trace name (`.value` is a descriptor call per read).
_ACTION_NAMES = {action: action.value for action in RuleAction}
# Enum members as module constants: `RuleAction.X` is a descriptor call on every access.
_CONTINUE, _JUMP, _ACCEPT, _DROP, _REJECT, _RETURN = (
    RuleAction.CONTINUE,
    RuleAction.JUMP,
    RuleAction.ACCEPT,
    RuleAction.DROP,
    RuleAction.REJECT,
    RuleAction.RETURN,
)


def _read_pairs(walk: Walk, packet: PacketState, pairs: tuple[tuple[str, int], ...]) -> None:
    """`walk.read(packet, field, mask)` for every (field, mask) pair, in one loop. A tuple
    recorded whole before in this walk adds nothing (the masks are OR-ed): skipped. Chains
    of the same shape share their tuples (`sim/rules.py` interns them), so a path through
    several such chains records their reads once."""
    key = id(pairs)  # the tuple is held by its chain (or this module) for the whole walk
    recorded = walk.recorded_reads
    if key in recorded:
        return
    if _record_pairs(walk, packet, pairs):
        recorded.add(key)


def _record_pairs(walk: Walk, packet: PacketState, pairs: tuple[tuple[str, int], ...]) -> bool:
    """Record the (field, mask) pairs in `walk.reads`, but a field the walk rewrote (a read
    of one a NAT decision wrote makes the walk no replay, `Walk.nat_read`); whether every
    field was recorded."""
    modified = packet.modified
    reads = walk.reads
    whole = True
    for field, mask in pairs:
        if field in modified:
            whole = False
            if mask and field in walk.nat_written:
                walk.nat_read = True
        else:
            reads[field] = reads.get(field, 0) | mask
    return whole


def _chain_reads(
    walk: Walk, packet: PacketState, chain: CompiledChain, through: int, matched: list[int]
) -> None:
    """Record what evaluating rules 0..`through` read: precisely when the walk records
    flow-state questions, else the chain's shared union (`read_pairs`)."""
    if walk.questions is not None:
        _record_chain_reads(walk, packet, chain, through, matched)
    else:
        _read_pairs(walk, packet, chain.read_pairs[through])


def _record_chain_reads(
    walk: Walk, packet: PacketState, chain: CompiledChain, through: int, matched: Sequence[int]
) -> None:
    """What evaluating rules 0..`through` of `chain` read, rule by rule (a walk that records
    flow-state questions, for its replay's logic mask, `sim/replay.py`): a rule the matcher
    returned (`matched`) read all its fields, one that did not match only those of a
    condition that fails, when `rule_refutations` knows one. Never fewer bits than the
    walk's decisions depended on, so also the megaflow's."""
    pairs = rule_refutations(chain).chain_reads(
        through, tuple(matched), packet.eth_type, packet.ip_proto
    )
    _record_pairs(walk, packet, pairs)


def _rule_step(chain: CompiledChain, index: int, rule: CompiledRule, depth: int) -> TraceStep:
    """The trace step of `rule` deciding in `chain` at `depth`, remembered by the chain."""
    steps = chain.steps
    if steps is None:
        steps = {}
        object.__setattr__(chain, "steps", steps)
    step = steps[index, depth] = TraceStep(
        Here("chain", chain.id, chain.name, depth), "rule", rule.description
    )
    return step


class _ChainStop(Exception):
    """Internal: a chain verdict that ends the branch (drop, reject, unsupported)."""


def run_chain(
    walk: Walk,
    packet: PacketState,
    chain_id: str,
    in_port: PortInfo,
    out_port_id: str | None,
    reply_port: PortInfo,
    depth: int,
) -> bool:
    """Evaluate a chain; True when the packet continues, False when the branch ended
    (drop, reject, unsupported). A top-level RETURN or falling off the end continues.
    A rejected packet is answered out of `reply_port`."""
    chains = walk.view.chains
    chain = _dict_get(chains, chain_id)
    if chain is None:
        chain = chains.get(chain_id)
    if chain is not None and chain.plain:
        # The common chain (security groups, port filters): every rule ends the chain and
        # none asks the flow state, so the first match is the verdict: no jump stack, no
        # loop (what `_evaluate` does for it, without its generality).
        walk.tags.add(chain.tag)
        index = chain.matcher(packet, 0, in_port.id, out_port_id, in_port.port_group_ids)
        if walk.questions is not None:
            if chain.rules:
                through = len(chain.rules) - 1 if index < 0 else index
                _record_chain_reads(walk, packet, chain, through, (index,))
        elif index < 0:
            if chain.read_pairs:
                _read_pairs(walk, packet, chain.read_pairs[-1])
        else:
            pairs = chain.read_pairs[index]
            if id(pairs) not in walk.recorded_reads:
                _read_pairs(walk, packet, pairs)
        if index < 0:
            return True
        rule = chain.rules[index]
        action = rule.action
        steps = chain.steps
        step = steps.get((index, depth)) if steps is not None else None
        if step is None:
            step = _rule_step(chain, index, rule, depth)
        walk.trace.append(step)
        if action is _ACCEPT or action is _RETURN:
            return True
        here = step.where
        if action is _DROP:
            walk.drop(here, _drop_reason(walk, chain.id, rule), rule.id)
            return False
        walk.drop(here, "rule_reject", rule.id)
        reject(walk, packet, reply_port, depth)
        return False
    try:
        verdict = _evaluate(walk, packet, chain_id, in_port, out_port_id, depth, [])
    except _ChainStop:
        return False
    if verdict == "reject":
        reject(walk, packet, reply_port, depth)
        return False
    return verdict != "drop"


def _evaluate(
    walk: Walk,
    packet: PacketState,
    chain_id: str,
    in_port: PortInfo,
    out_port_id: str | None,
    depth: int,
    stack: list[str],
) -> str:
    chain = walk.view.chains.get(chain_id)
    if chain is None:
        walk.tags.add(intern(f"chain:{chain_id}"))
        walk.drop(
            Here("chain", chain_id, chain_id, depth), "unknown_chain", "chain not in topology"
        )
        return "drop"
    walk.tags.add(chain.tag)
    here = _new_tuple(Here, ("chain", chain.id, chain.name, depth))
    if chain_id in stack:
        walk.drop(here, "jump_loop", " -> ".join([*stack, chain_id]))
        return "drop"
    if len(stack) >= MAX_JUMP_DEPTH:
        walk.drop(here, "jump_depth", f"> {MAX_JUMP_DEPTH}")
        return "drop"
    stack.append(chain_id)
    rules = chain.rules
    matcher = chain.matcher
    groups = in_port.port_group_ids
    start = 0
    evaluated_through = len(rules) - 1
    recorded_through = -1  # the rules whose reads are recorded already (a forward NAT's)
    matched: list[int] = []  # the rules the matcher returned
    verdict = "continue"
    try:
        while True:
            index = matcher(packet, start, in_port.id, out_port_id, groups)
            if index < 0:
                break
            matched.append(index)
            if index < start:  # would loop forever: a compiler bug, not a topology one
                raise RuntimeError(f"chain {chain.id}: matcher returned rule {index} < {start}")
            rule = rules[index]
            if rule.conntrack_condition is not None and not _conntrack_holds(
                walk, packet, rule.conntrack_condition, in_port, here
            ):
                start = index + 1
                continue
            action = rule.action
            walk.step(here, "rule", rule.description)
            if action is _CONTINUE:
                start = index + 1
                continue
            if action is _JUMP:
                target = rule.jump_chain_id or ""
                sub = _evaluate(walk, packet, target, in_port, out_port_id, depth, stack)
                if sub in ("accept", "drop", "reject"):
                    evaluated_through = index
                    verdict = sub
                    break
                start = index + 1
                continue
            evaluated_through = index
            if action is _ACCEPT:
                verdict = "accept"
            elif action is _DROP:
                walk.drop(here, _drop_reason(walk, chain.id, rule), rule.id)
                verdict = "drop"
            elif action is _REJECT:
                walk.drop(here, "rule_reject", rule.id)
                verdict = "reject"
            elif action is _RETURN:
                verdict = "return"
            elif walk.view.vips.is_vip_rule(rule.id):
                verdict = _load_balance(walk, packet, rule, in_port, here)
            else:
                if action in _FORWARD_NAT:
                    # The rules' reads were of the packet before the rewrite: recorded now
                    # (afterwards they would read NAT-chosen values, `Walk.nat_read`).
                    _chain_reads(walk, packet, chain, index, matched)
                    recorded_through = index
                _nat(walk, packet, rule, in_port, here)
                if action not in _FORWARD_NAT:
                    # rev_snat/rev_dnat undo a translation (if any) and go on, so one
                    # chain can reverse both NATs of a hairpinned or 1:1 connection.
                    start = index + 1
                    continue
                verdict = "accept"
            break
    finally:
        if rules and recorded_through != evaluated_through:
            _chain_reads(walk, packet, chain, evaluated_through, matched)
        stack.pop()
    return verdict


def _drop_reason(walk: Walk, chain_id: str, rule: CompiledRule) -> str:
    """A security-group chain's drop rules name their reason; other chains' say rule_drop."""
    if chain_id in walk.view.security.chain_zones:
        return drop_reason_of(rule.rule, "rule_drop")
    return "rule_drop"


def _zone(walk: Walk, chain_id: str, in_port: PortInfo) -> str:
    """Conntrack/NAT zone: the port for its security-group chains, else the device."""
    return walk.view.security.chain_zones.get(chain_id, in_port.device_id)


def _conntrack_holds(
    walk: Walk, packet: PacketState, condition: str, in_port: PortInfo, here: Here
) -> bool:
    zone = _zone(walk, here.id, in_port)
    try:
        seen = packet.to_match()
        decision = walk.ctx.flow_state.conntrack(seen, zone, walk.now)
    except FlowStateUnsupported as unsupported:
        walk.drop(here, "unsupported", unsupported.reason)
        walk.no_cache("flow state unsupported", here.depth)
        raise _ChainStop from unsupported
    # Connection state is per flow: a cached flow must not outlive the connection's
    # direction, so everything the flow key is made of is part of the megaflow.
    walk.read_state(packet, _CONNTRACK_READ_PAIRS)
    if decision.reads_tcp_flags:
        walk.read_state(packet, _TCP_FLAGS_READ_PAIRS)
    walk.tags.update(decision.tags)
    direction = decision.verdict or ("return" if decision.is_return else "forward")
    if walk.questions is not None:
        walk.questions.append(
            (None, zone, seen, packet.modified - walk.nat_written, decision, len(walk.trace))
        )
    walk.step(here, "conntrack", f"zone {zone}: {direction}")
    if not decision.cacheable:
        walk.no_cache("conntrack decision depends on the packet itself", here.depth)
    return decision.is_return == (condition == "return")


def _nat(
    walk: Walk, packet: PacketState, rule: CompiledRule, in_port: PortInfo, here: Here
) -> bool:
    """Apply a NAT rule; False when a reverse NAT rule found nothing to undo (the
    evaluation then goes on with the next rule)."""
    zone = _zone(walk, here.id, in_port)
    try:
        seen = packet.to_match()
        decision = walk.ctx.flow_state.nat(seen, rule, zone, walk.now)
    except FlowStateUnsupported as unsupported:
        reason = (
            unsupported.reason.partition(":")[0] if ":" in unsupported.reason else "unsupported"
        )
        walk.drop(here, reason, unsupported.reason)
        walk.no_cache("flow state unsupported", here.depth)
        raise _ChainStop from unsupported
    walk.read_state(packet, _CONNTRACK_READ_PAIRS)
    walk.tags.update(decision.tags)
    if walk.questions is not None:
        walk.questions.append(
            (rule, zone, seen, packet.modified - walk.nat_written, decision, len(walk.trace))
        )
    if not decision.cacheable:
        walk.no_cache("NAT decision not cacheable", here.depth)
    if not decision.applied:
        return False
    for field, value in decision.rewrites.items():
        if field not in SETTABLE_FIELDS:
            raise ValueError(f"NAT decision rewrites field {field!r}, which is not settable")
        packet.set(field, value)
    if decision.rewrites:
        walk.nat_written.update(decision.rewrites)
        # Reads of the new values must reach `_read_pairs` again (a tuple it recorded
        # whole before the rewrite would be skipped): a walk that reads one is no replay.
        walk.recorded_reads.clear()
    if decision.inner_rewrites:
        walk.inner_rewrites.update(decision.inner_rewrites)
    walk.step(
        here,
        _ACTION_NAMES[rule.action],
        decision.description
        or ", ".join(f"{name}={value}" for name, value in decision.rewrites.items()),
    )
    return True


def _load_balance(
    walk: Walk, packet: PacketState, rule: CompiledRule, in_port: PortInfo, here: Here
) -> str:
    """A flow to a VIP (sim/vips.py): DNAT to the member chosen for it, or to the member
    its connection already has (NAT state); "reject" when no member can take it."""
    _read_pairs(walk, packet, _CONNTRACK_READ_PAIRS)  # the choice hashes the 5-tuple
    walk.questions = None  # a member chosen by the 5-tuple's hash: never replayed
    vips = walk.view.vips
    choice = vips.choose(rule.id, packet.to_match(), packet.ip_version, walk.now)
    walk.tags.update(choice.tags)
    if isinstance(choice, VipRefusal):
        walk.drop(here, choice.reason, choice.detail)
        return "reject"
    walk.step(here, "lb", choice.description)
    _nat(walk, packet, choice.rule, in_port, here)
    binding = choice.selection.binding
    if packet.ip_dst == int(binding.backend_address) and packet.tp_dst == binding.backend_port:
        vips.remember(choice)
    return "accept"


def reject(walk: Walk, packet: PacketState, reply_port: PortInfo, depth: int) -> None:
    """Answer a rejected packet: TCP RST for TCP, ICMP admin-prohibited otherwise."""
    walk.no_cache("reject answers every packet", depth)
    seen = walk.frame_as_seen(packet)
    router_port = reply_port if reply_port.device_kind is DeviceKind.ROUTER else None
    walk.read(packet, "ip_proto", FULL_MASKS["ip_proto"])
    walk.read(packet, "eth_type", FULL_MASKS["eth_type"])
    if packet.ip_proto == IP_PROTO_TCP and packet.ip_version:
        walk.read(packet, "tcp_flags", FULL_MASKS["tcp_flags"])
        if packet.tcp_flags & TCP_FLAG_RST:
            return
        reply = replies.tcp_reset(seen, source_mac=router_port.mac if router_port else None)
        if reply is not None:
            walk.reply(reply, reply_port, "TCP RST (reject)")
        return
    reply = walk.icmp_error(packet, seen, "admin_prohibited", router_port)
    if reply is not None:
        walk.reply(reply, reply_port, "ICMP admin prohibited")
