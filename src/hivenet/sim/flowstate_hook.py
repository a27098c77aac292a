"""The simulation's hook into connection tracking and NAT (`hivenet.flowstate`).

Owns the protocol the engine calls when a rule needs flow state: `conntrack` for the
`match_forward_flow` / `match_return_flow` conditions (and the security-group chains), `nat`
for the `dnat`/`snat`/`rev_dnat`/`rev_snat` actions, and the decisions they return. A
decision carries, besides its answer, the flow tags it depended on (a conntrack entry, a NAT
binding: when that entry appears, changes or expires the agent invalidates the flows that
carry the tag), whether the result may be cached at all, and whether it depended on the TCP
flags (then the megaflow must match them: a cached flow for a lone mid-stream segment must
not stop a later SYN of the same 5-tuple from opening a connection).

`NoFlowState` answers every question with `FlowStateUnsupported`, which the engine turns
into a drop whose reason says so (never cached); `sim/stateful.py` has the real hook.
Pure: no I/O, no clock (the engine passes `now`).
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
class ConntrackDecision:
    """What connection tracking says of a packet in one zone.

    `is_return`: the packet belongs to a connection first seen in the other direction (or is
    an ICMP error related to one). `verdict`: the conntrack verdict's name, for the trace.
    `tags`: flow tags of the connection (both directions of its key, so a flow cached while
    the key was unknown is invalidated when either side opens it). `cacheable`: False when
    the answer depended on something a megaflow cannot hold (an ICMP error's quote).
    `reads_tcp_flags`: the answer would differ for other TCP flags.
    """

    is_return: bool
    verdict: str = ""
    tags: frozenset[int] = frozenset()
    cacheable: bool = True
    reads_tcp_flags: bool = False


@dataclass(frozen=True, slots=True)
class NatDecision:
    """Header rewrites a NAT action performs (FlowMatch field -> new value), the tags the
    decision depends on, whether the result may be cached, and `applied` (False: a reverse
    NAT rule found no binding, so the rule did nothing and evaluation continues).

    `inner_rewrites`: for an ICMP error about a NATed connection, the rewrites of the
    datagram it quotes (FlowMatch field names of that datagram: ip_src, ip_dst, tp_src,
    tp_dst, icmp_id). No flow action can express them: such a decision is never cacheable
    and the engine applies them to the frame itself.
    """

    rewrites: Mapping[str, int] = field(default_factory=dict)
    tags: frozenset[int] = frozenset()
    cacheable: bool = True
    applied: bool = True
    inner_rewrites: Mapping[str, int] = field(default_factory=dict)
    description: str = ""


class FlowStateHook(Protocol):
    def conntrack(self, packet: FlowMatch, zone: str, now: float) -> ConntrackDecision:
        """Classify `packet` (as the simulation currently sees it) in conntrack `zone`."""
        ...

    def nat(self, packet: FlowMatch, rule: CompiledRule, zone: str, now: float) -> NatDecision:
        """Rewrites for a dnat/snat/rev_dnat/rev_snat rule matched by `packet` in `zone`."""
        ...


class NoFlowState:
    """The placeholder: every flow-state question is answered "not supported"."""

    def conntrack(self, packet: FlowMatch, zone: str, now: float) -> ConntrackDecision:
        raise FlowStateUnsupported(
            "connection tracking (match_forward/return_flow) not supported yet"
        )

    def nat(self, packet: FlowMatch, rule: CompiledRule, zone: str, now: float) -> NatDecision:
        raise FlowStateUnsupported(f"NAT action {rule.action.value!r} not supported yet")


NO_FLOW_STATE = NoFlowState()
