"""The simulation's hook into connection tracking and NAT (`hivenet.flowstate`).

Owns the protocol the engine calls when a rule needs flow state: the `match_forward_flow` /
`match_return_flow` conditions and the `dnat`/`snat`/`rev_dnat`/`rev_snat` actions. The
conntrack/NAT implementation arrives in a later issue; until then `NoFlowState` answers every
question with `FlowStateUnsupported`, which the engine turns into a drop whose reason says
so (and which is never cached). Pure: no I/O, no clock (the engine passes `now`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from hivenet.packets.flowmatch import FlowMatch
from hivenet.sim.rules import CompiledRule


class FlowStateUnsupported(Exception):
    """The flow-state feature a rule needs is not available; `reason` is for the trace."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class NatDecision:
    """Header rewrites a NAT action performs (FlowMatch field -> new value), plus the tags
    the decision depends on (e.g. a NAT lease) and whether the result may be cached."""

    rewrites: Mapping[str, int] = field(default_factory=dict)
    tags: frozenset[str] = frozenset()
    cacheable: bool = True


class FlowStateHook(Protocol):
    def is_return_flow(self, packet: FlowMatch, device_id: str, now: float) -> bool:
        """True when `packet` belongs to a connection first seen in the other direction."""
        ...

    def nat(self, packet: FlowMatch, rule: CompiledRule, device_id: str, now: float) -> NatDecision:
        """Rewrites for a dnat/snat/rev_dnat/rev_snat rule matched by `packet`."""
        ...


class NoFlowState:
    """The placeholder: every flow-state question is answered "not supported yet"."""

    def is_return_flow(self, packet: FlowMatch, device_id: str, now: float) -> bool:
        raise FlowStateUnsupported(
            "connection tracking (match_forward/return_flow) not supported yet"
        )

    def nat(self, packet: FlowMatch, rule: CompiledRule, device_id: str, now: float) -> NatDecision:
        raise FlowStateUnsupported(f"NAT action {rule.action.value!r} not supported yet")


NO_FLOW_STATE = NoFlowState()
