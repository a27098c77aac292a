"""What a simulation returns: `SimulationResult` (actions, wildcard match, tags, generated
packets, learned entries, trace) and its parts.

Owns the result's shape (a trace step says where it happened as a `Here`) and its human
rendering (`format_trace`). It does not compute
anything: the walk (`sim/walk.py`, `sim/engine.py`) fills it, `agent/` acts on it. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import and_
from typing import Any, NamedTuple

from hivenet.flows.actions import Action
from hivenet.flows.table import Tag, flow_match_values
from hivenet.flowstate.transaction import tag_text
from hivenet.packets.flowmatch import FIELD_NAMES, FULL_MASKS, FlowMatch
from hivenet.sim.tables import LearnedEntry


class Here(NamedTuple):
    """Where the walk is: the port, device or chain a trace step or a drop is about, and the
    branch depth (devices crossed so far on this path; flood copies and generated packets
    nest)."""

    kind: str  # "port", "bridge", "router", "chain", "sim"
    id: str
    name: str
    depth: int


class TraceStep(NamedTuple):
    """One step of a packet's walk: where it happened, what happened (a short verb:
    "ingress", "learn", "route", "rule", "drop", "output", ...) and the detail."""

    where: Here
    event: str
    detail: str

    @property
    def device_kind(self) -> str:
        return self.where.kind

    @property
    def device_id(self) -> str:
        return self.where.id

    @property
    def device_name(self) -> str:
        return self.where.name

    @property
    def depth(self) -> int:
        return self.where.depth

    def nested(self) -> TraceStep:
        """The same step one branch level deeper (a generated packet's walk)."""
        where = self.where
        return TraceStep(where._replace(depth=where.depth + 1), self.event, self.detail)

    def format(self) -> str:
        where = self.where
        indent = "  " * where.depth
        text = where.kind
        if where.id:
            name = where.name if where.name != where.id else ""
            text += f" {name}({where.id})" if name else f" {where.id}"
        return (
            f"{indent}[{text}] {self.event}: {self.detail}"
            if self.detail
            else (f"{indent}[{text}] {self.event}")
        )


@dataclass(frozen=True, slots=True)
class GeneratedPacket:
    """A packet the simulation created (ARP reply, ICMP error, ...) with the actions that
    deliver it, computed by simulating it from the port it leaves through."""

    frame: bytes
    actions: tuple[Action, ...]
    description: str
    drop_reason: str | None = None


@dataclass(frozen=True, slots=True)
class SimulationResult:
    actions: tuple[Action, ...]
    match: FlowMatch
    mask: tuple[int, ...]
    tags: frozenset[Tag]
    generated: tuple[GeneratedPacket, ...] = ()
    learned: tuple[LearnedEntry, ...] = ()
    install: bool = True
    idle_timeout: float = 60.0
    drop_reason: str | None = None
    trace: tuple[TraceStep, ...] = ()
    # The frame the actions apply to when the simulation changed bytes no flow action can
    # reach (the datagram quoted by a NATed ICMP error; such a result is never installed).
    # None: the frame that was simulated.
    frame: bytes | None = None
    # A service of the host agent that takes the packet itself (sim/metadata.py), if any.
    handoff: str | None = None
    # The largest IP packet (L3 bytes) the installed flow may carry: the smallest MTU of the
    # networks it outputs to (0: none). A bigger packet hitting the flow is sent back to the
    # simulation, which answers it with ICMP (`sim/mtu.py`); sizes are not flow-match fields.
    mtu: int = 0
    # For a result that opened a connection and may be replayed for the next one of its kind
    # (`sim/replay.py`): (the mask of the bits read other than by flow-state questions, and
    # of the TCP flags those read; the questions as asked). None: not replayable, or not
    # recorded (`SimContext`).
    replay: tuple[tuple[int, ...], tuple[Any, ...]] | None = None

    @property
    def masked_match(self) -> tuple[int, ...]:
        """The flow key to install: `match` under `mask`."""
        return tuple(map(and_, flow_match_values(self.match), self.mask))

    @property
    def is_drop(self) -> bool:
        return self.drop_reason is not None

    def wildcard(self) -> dict[str, int]:
        """{field: mask} of the fields the result depends on (full-width fields as -1)."""
        out: dict[str, int] = {}
        for name, bits in zip(FIELD_NAMES, self.mask, strict=True):
            if bits:
                out[name] = -1 if bits == FULL_MASKS[name] else bits
        return out

    def format_trace(self) -> str:
        lines = [step.format() for step in self.trace]
        wildcard = ", ".join(
            name if bits == -1 else f"{name}/{bits:#x}" for name, bits in self.wildcard().items()
        )
        lines.append(f"=> actions: {[str(a) for a in self.actions]}")
        if self.drop_reason:
            lines.append(f"=> drop: {self.drop_reason}")
        lines.append(f"=> match on: {wildcard}")
        lines.append(
            f"=> install: {self.install} (idle {self.idle_timeout}s"
            + (f", mtu {self.mtu})" if self.mtu else ")")
        )
        if self.learned:
            lines.append("=> learned: " + "; ".join(str(e) for e in self.learned))
        for packet in self.generated:
            lines.append(
                f"=> generated {packet.description}: {[str(a) for a in packet.actions]}"
                + (f" (dropped: {packet.drop_reason})" if packet.drop_reason else "")
            )
        lines.append(f"=> tags: {tag_texts(self)}")
        return "\n".join(lines)


def tag_texts(result: SimulationResult) -> list[str]:
    """The result's tags as text, sorted (`flowstate.transaction.tag_text`: a connection tag
    spells its zone, found among the devices the packet crossed)."""
    zones = {step.device_id for step in result.trace if step.device_id}
    return sorted(tag_text(tag, zones) for tag in result.tags)
