"""What a simulation returns: `SimulationResult` (actions, wildcard match, tags, generated
packets, learned entries, trace) and its parts.

Owns the result's shape and its human rendering (`format_trace`). It does not compute
anything: the walk (`sim/walk.py`, `sim/engine.py`) fills it, `agent/` acts on it. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from hivenet.flows.actions import Action
from hivenet.packets.flowmatch import FIELD_NAMES, FULL_MASKS, FlowMatch
from hivenet.sim.tables import LearnedEntry


class TraceStep(NamedTuple):
    """One step of a packet's walk. `depth` is the branch depth (flood copies nest)."""

    device_kind: str  # "port", "bridge", "router", "chain", "sim"
    device_id: str
    device_name: str
    event: str  # short verb: "ingress", "learn", "lookup", "rule", "drop", "output", ...
    detail: str
    depth: int = 0

    def format(self) -> str:
        indent = "  " * self.depth
        where = self.device_kind
        if self.device_id:
            name = self.device_name if self.device_name != self.device_id else ""
            where += f" {name}({self.device_id})" if name else f" {self.device_id}"
        return (
            f"{indent}[{where}] {self.event}: {self.detail}"
            if self.detail
            else (f"{indent}[{where}] {self.event}")
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
    tags: frozenset[str]
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

    @property
    def masked_match(self) -> tuple[int, ...]:
        """The flow key to install: `match` under `mask`."""
        return self.match.masked(self.mask)

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
        lines.append(f"=> install: {self.install} (idle {self.idle_timeout}s)")
        if self.learned:
            lines.append("=> learned: " + "; ".join(str(e) for e in self.learned))
        for packet in self.generated:
            lines.append(
                f"=> generated {packet.description}: {[str(a) for a in packet.actions]}"
                + (f" (dropped: {packet.drop_reason})" if packet.drop_reason else "")
            )
        lines.append(f"=> tags: {sorted(self.tags)}")
        return "\n".join(lines)
