"""The packet simulation entry point: `simulate(frame, ingress_port_id, ctx, now)` walks one
packet through the virtual topology and returns a `SimulationResult`.

Owns the walk's beginning and end: parsing (a malformed frame is a drop, never cached), the
first port, the packets the walk generated (ARP/ND requests and replies, ICMP errors, RSTs:
each simulated from the port it leaves through, to a bounded depth) and the assembly of the
result. The walk itself is split by device over one shared state (`sim/walk.py`):
`sim/ports.py` (ingress, egress, port security, output or tunnel), `sim/bridge.py` (VLANs,
MAC learning, flooding, ARP proxy), `sim/router.py` (ARP/ND, local delivery, TTL, routes,
next hops) and `sim/chains.py` (rules, conntrack, NAT, load balancing, reject).
Must not touch I/O, the clock (`now` is passed in), the store or the datapath: the agent acts
on the result.

Tags built from ids (device, chain, host, MAC/ARP entry) are `sys.intern`ed: every cached
flow holds its tags, and equal tags across flows must be one object, not one each.
"""

from __future__ import annotations

from hivenet.flows.actions import Drop
from hivenet.packets import PacketError, extract_flow_match
from hivenet.packets.flowmatch import FIELD_NAMES, FULL_MASKS, FlowMatch
from hivenet.packets.icmp_quote import rewrite_icmp_quote
from hivenet.packets.slots import slot_builder
from hivenet.sim import ports
from hivenet.sim.result import GeneratedPacket, Here, SimulationResult, TraceStep
from hivenet.sim.walk import PacketState, SimContext, Walk, sim_here

__all__ = ["MAX_GENERATION_DEPTH", "PacketState", "SimContext", "simulate"]

MAX_GENERATION_DEPTH = 2


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
    walk = Walk(ctx, now, frame, match)
    walk.ingress_port = port
    ports.ingress(walk, PacketState.of(match), ingress_port_id, 0)
    actions, drop_reason = walk.build_actions()
    generated: tuple[GeneratedPacket, ...] = tuple(_run_generated(walk)) if walk.pending else ()
    if walk.learned:
        walk.check_lookups_still_valid()
    rewritten = None
    if walk.inner_rewrites and drop_reason is None:
        # A NATed ICMP error: its quote is translated here, the outer headers by the actions
        # (independent bytes; the ICMP checksum is fixed for both). Never cached (see _nat).
        rewritten = rewrite_icmp_quote(frame, walk.inner_rewrites)
    replay = None
    mask = walk.mask()
    questions = walk.questions
    if (
        questions
        and walk.install
        and not walk.nat_read
        and len(walk.emissions) == 1
        and not walk.drop_reasons
        and not generated
        and not walk.learned
        and walk.handoff is None
        and not walk.inner_rewrites
    ):
        replay = (_template_key_mask(walk.logic_mask(), mask), tuple(questions))
    return _result(
        replay=replay,
        actions=actions,
        match=match,
        mask=mask,
        tags=frozenset(walk.tags),
        generated=generated,
        learned=tuple(walk.learned),
        install=walk.install,
        idle_timeout=walk.idle_timeout,
        drop_reason=drop_reason,
        trace=tuple(walk.trace),
        frame=rewritten,
        handoff=walk.handoff,
        mtu=walk.mtu,
    )


# A `SimulationResult` without the frozen dataclass's per-field `object.__setattr__` calls
# (2.9 us of a ~50 us simulation).
_result = slot_builder(SimulationResult, "keywords")


_TCP_FLAGS = FIELD_NAMES.index("tcp_flags")


def _template_key_mask(logic: tuple[int, ...], mask: tuple[int, ...]) -> tuple[int, ...]:
    """The bits a connection template is looked up by (`sim/replay.py`): what the walk's
    decisions read besides its flow-state questions (`logic`), and the TCP flags those read
    (from the megaflow `mask`: a SYN's template is not tried by an ACK of a connection whose
    flow went: conntrack would answer it in another shape and the replay be declined)."""
    flags = mask[_TCP_FLAGS]
    if flags & ~logic[_TCP_FLAGS]:
        return (*logic[:_TCP_FLAGS], logic[_TCP_FLAGS] | flags, *logic[_TCP_FLAGS + 1 :])
    return logic


def _run_generated(walk: Walk) -> list[GeneratedPacket]:
    """Simulate every packet the walk generated from the port it leaves through; their own
    generated packets follow them (up to MAX_GENERATION_DEPTH)."""
    out: list[GeneratedPacket] = []
    for pending in walk.pending:
        if walk.generation >= MAX_GENERATION_DEPTH:
            break
        try:
            match = extract_flow_match(pending.frame, 0)
        except PacketError as error:  # a builder bug: say so rather than send garbage
            raise ValueError(f"generated {pending.description} is malformed: {error}") from error
        sub = Walk(walk.ctx, walk.now, pending.frame, match, walk.generation + 1)
        sub.mac_overlay = walk.mac_overlay
        sub.neighbour_overlay = walk.neighbour_overlay
        sub.learned = walk.learned  # entries learned by the reply's walk are results too
        packet = PacketState.of(match)
        walk.step(sim_here(0), "generated", pending.description)
        ports.egress(sub, packet, pending.port, pending.port, 0)
        actions, drop_reason = sub.build_actions()
        nested = _run_generated(sub)
        out.append(GeneratedPacket(pending.frame, actions, pending.description, drop_reason))
        out.extend(nested)
        walk.trace.extend(step.nested() for step in sub.trace)
    return out


def _malformed(frame: bytes, port_id: str, in_port_key: int, error: str) -> SimulationResult:
    match = FlowMatch(in_port=in_port_key)
    return SimulationResult(
        actions=(Drop("malformed"),),
        match=match,
        mask=tuple(FULL_MASKS[name] if name == "in_port" else 0 for name in FIELD_NAMES),
        tags=frozenset({f"port:{port_id}"}),
        install=False,
        drop_reason="malformed",
        trace=(TraceStep(Here("port", port_id, port_id, 0), "drop", f"malformed frame: {error}"),),
    )
