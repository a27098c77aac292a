"""Connection templates: a simulation that opened a connection, replayed for the next
connection of its kind without walking the topology again.

A stateful pipeline simulates every new connection, although most of them differ from the
last one only in fields that nothing but the flow-state questions read (the source port of a
SYN leaving through SNAT). A walk records, besides its megaflow mask, the bits its other
decisions read (`Walk.logic_mask`) and each flow-state question it asked (the packet as the
walk saw it then, the zone, the NAT rule, the answer). `ConnectionTemplate.of` turns such a
result into a template; `replay(hook, match, frame, now)` asks the same questions again for a
new packet that equals the template's under the logic mask (with the TCP flags the questions
read: an ACK does not try a SYN's template, whose conntrack answer it could not share), and,
when every answer has the same shape as the template's (same conntrack direction and verdict,
same NAT fields rewritten, all cacheable), returns the result the walk would have returned: the template's actions with
the new NAT values, its mask, its tags other than its own connection's plus the new answers'
tags, and its trace with the NAT steps' new values.

Why that is the walk's result: the walk is deterministic in the packet bits its decisions
read, the state its tags name and its flow-state answers. The first are equal by the logic
mask, the answers are asked again (the same questions in the same order, each with the
packet as the walk would see it: the new packet's fields, those the walk set itself before
the question as the template saw them, the NAT values of this replay, the TTL less the same
decrements), and the state is the same while the flow that carries the template's tags is
installed (the caller checks `Flow.removed`: any change to what the template depended on
invalidates that flow). A walk that read a field after a NAT decision wrote it (its decisions
then depended on the allocated value), that learned, generated or dropped anything, forked
into several emissions, chose a load balancer member (a hash of the whole 5-tuple) or gave
an uncacheable answer gives no template (`SimulationResult.replay` is None). Frame facts
that are no match fields (an IPv4 header checksum, a source route option, a size beyond the
flow's MTU) make `replay` decline, as the walk would not forward such a packet.

Pure: no I/O, no clock. The caller (agent/pipeline.py) owns the templates' table, rolls the
transaction back when `replay` declines and simulates instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import and_
from typing import Any

from hivenet.flows.actions import SetField
from hivenet.flows.table import Tag, flow_match_values
from hivenet.packets.checksum import ipv4_header_checksum_ok
from hivenet.packets.flowmatch import FIELD_NAMES, FlowMatch
from hivenet.packets.mtu import ip_size
from hivenet.packets.options import ipv4_source_routed
from hivenet.packets.slots import slot_builder
from hivenet.sim.flowstate_hook import (
    ConntrackDecision,
    FlowStateHook,
    FlowStateUnsupported,
    NatDecision,
)
from hivenet.sim.result import SimulationResult, TraceStep
from hivenet.sim.rules import CompiledRule
from hivenet.sim.walk import set_field_action

_INDEX = {name: index for index, name in enumerate(FIELD_NAMES)}
# FlowMatch and SimulationResult without their frozen constructors' per-field setattr calls
# (`packets/slots.py`): every replay builds a match per question and one result.
_match = slot_builder(FlowMatch, "positional")
_result = slot_builder(SimulationResult, "keywords")
_TTL = _INDEX["ip_ttl"]

# What a walk records per flow-state question (sim/chains.py): (the NAT rule or None for a
# conntrack question, the zone, the packet as the walk saw it, the fields the walk had set
# itself by then other than by NAT, the answer, the trace position of the question's step).
RecordedQuestion = tuple[
    CompiledRule | None, str, FlowMatch, set[str], ConntrackDecision | NatDecision, int
]


def _shape(decision: ConntrackDecision | NatDecision) -> tuple[object, ...]:
    """What of an answer the walk acts on besides its tags and NAT values: equal shapes make
    equal walks."""
    if isinstance(decision, ConntrackDecision):
        return (
            decision.is_return,
            decision.verdict,
            decision.cacheable,
            decision.reads_tcp_flags,
        )
    return (
        decision.applied,
        tuple(decision.rewrites),
        decision.cacheable,
        bool(decision.inner_rewrites),
    )


@dataclass(frozen=True, slots=True)
class _Question:
    rule: CompiledRule | None
    zone: str
    # (field index, value) the walk had set itself (not NAT) when it asked: the template's.
    fixed: tuple[tuple[int, int], ...]
    ttl_decrements: int
    shape: tuple[object, ...]
    # Index of the trace step that shows this NAT decision's values (-1: none to redo).
    step: int


class ConnectionTemplate:
    """One replayable result (see the module docstring): `replay` builds a new connection's
    result; the caller keys it by its match under `logic_mask` (`masked`)."""

    __slots__ = ("_nat_actions", "_questions", "logic_mask", "result", "static_tags")

    def __init__(
        self,
        result: SimulationResult,
        logic_mask: tuple[int, ...],
        questions: tuple[_Question, ...],
        nat_actions: tuple[tuple[int, int], ...],
        static_tags: frozenset[Tag],
    ) -> None:
        self.result = result
        self.logic_mask = logic_mask
        self._questions = questions
        # (position in the actions, field index) of each SetField whose value NAT chose.
        self._nat_actions = nat_actions
        self.static_tags = static_tags

    @classmethod
    def of(cls, result: SimulationResult) -> ConnectionTemplate | None:
        """The template of `result`, or None when it records no replay or its actions do not
        show the NAT values its questions chose (a later rewrite of a NAT-written field)."""
        record = result.replay
        if record is None or not record[1]:
            return None
        logic_mask, recorded = record
        entry = flow_match_values(result.match)
        questions: list[_Question] = []
        answer_tags: set[Tag] = set()
        last_nat: dict[str, int] = {}
        question: RecordedQuestion
        for question in recorded:
            rule, zone, seen, fixed_names, decision, step = question
            seen_values = flow_match_values(seen)
            fixed = tuple(sorted((_INDEX[name], seen_values[_INDEX[name]]) for name in fixed_names))
            for name, value in last_nat.items():  # the walk saw the NAT values it chose
                if seen_values[_INDEX[name]] != value:
                    return None
            redo = -1  # an applied NAT's step follows its question (sim/chains.py `_nat`)
            if isinstance(decision, NatDecision) and decision.applied:
                last_nat.update(decision.rewrites)
                redo = step
            questions.append(
                _Question(
                    rule,
                    zone,
                    fixed,
                    entry[_TTL] - seen_values[_TTL],
                    _shape(decision),
                    redo,
                )
            )
            answer_tags |= decision.tags
        nat_actions: list[tuple[int, int]] = []
        written = set(last_nat)
        for position, action in enumerate(result.actions):
            if isinstance(action, SetField) and action.field in written:
                if action.value != last_nat[action.field]:
                    return None
                nat_actions.append((position, _INDEX[action.field]))
                written.discard(action.field)
        if written:  # a NAT value the actions do not carry: the walk overwrote it
            return None
        return cls(
            result,
            logic_mask,
            tuple(questions),
            tuple(nat_actions),
            frozenset(result.tags - answer_tags),
        )

    def replay(
        self, hook: FlowStateHook, match: FlowMatch, frame: bytes, now: float
    ) -> SimulationResult | None:
        """The result of simulating `frame` (whose match equals the template's under
        `logic_mask`),
        its flow-state questions answered by `hook`; None when an answer differs in shape
        from the template's or the frame is one the walk would not forward (the caller rolls
        `hook`'s transaction back and simulates)."""
        template = self.result
        if not _frame_forwardable(frame, template.mtu):
            return None
        current = list(flow_match_values(match))
        entry_ttl = current[_TTL]
        tags = set(self.static_tags)
        steps: list[tuple[int, NatDecision]] = []
        for question in self._questions:
            values = current.copy()
            for index, value in question.fixed:
                values[index] = value
            values[_TTL] = entry_ttl - question.ttl_decrements
            seen = _match(*values)
            try:
                decision: ConntrackDecision | NatDecision
                if question.rule is None:
                    decision = hook.conntrack(seen, question.zone, now)
                else:
                    decision = hook.nat(seen, question.rule, question.zone, now)
            except FlowStateUnsupported:
                return None
            if _shape(decision) != question.shape:
                return None
            tags |= decision.tags
            if isinstance(decision, NatDecision) and decision.applied:
                for name, value in decision.rewrites.items():
                    current[_INDEX[name]] = value
                if question.step >= 0:
                    steps.append((question.step, decision))
        actions: Any = template.actions
        for position, index in self._nat_actions:
            value = current[index]
            if actions[position].value != value:  # else the template's action (shared)
                if actions is template.actions:
                    actions = list(actions)
                actions[position] = set_field_action((FIELD_NAMES[index], value))
        if actions is not template.actions:
            actions = tuple(actions)
        trace = template.trace
        if steps:
            trace_list = list(trace)
            for position, decision in steps:
                old = trace_list[position]
                trace_list[position] = TraceStep(old.where, old.event, _nat_detail(decision))
            trace = tuple(trace_list)
        return _result(
            actions=actions,
            match=match,
            mask=template.mask,
            tags=frozenset(tags),
            idle_timeout=template.idle_timeout,
            trace=trace,
            mtu=template.mtu,
            replay=(self.logic_mask, ()),  # replayed: its flow may carry this template
        )


def _nat_detail(decision: NatDecision) -> str:
    """A NAT step's detail as `sim/chains.py` writes it."""
    return decision.description or ", ".join(
        f"{name}={value}" for name, value in decision.rewrites.items()
    )


def _frame_forwardable(frame: bytes, mtu: int) -> bool:
    """Whether the walk would have forwarded `frame` as it did the template's packet, as far
    as facts outside the flow match go: it fits `mtu` (0: none), and an IPv4 header's
    checksum is right and carries no source route (a router drops those, uncached)."""
    size = ip_size(frame)
    if size is None:
        return True
    if mtu and size[1] > mtu:
        return False
    if size[0] != 4:
        return True
    offset = 18 if frame[12:14] == b"\x81\x00" else 14
    return ipv4_header_checksum_ok(frame, offset) and not ipv4_source_routed(frame, offset)


def masked(match: FlowMatch, mask: tuple[int, ...]) -> tuple[int, ...]:
    """`match`'s field values under `mask`."""
    return tuple(map(and_, flow_match_values(match), mask))
