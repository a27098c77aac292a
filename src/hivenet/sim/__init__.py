"""Pure packet simulation: a frame entering a virtual port is walked through the topology
(ports, bridges, routers, rule chains) and the result says what the datapath must do with it
and with every packet that matches the same wildcard flow.

Owns `simulate()` and everything it reads (`TopologyView`, `TablesView`) and returns
(`SimulationResult`). Must not touch I/O, the clock, the store or the datapath.
"""

from hivenet.sim.engine import SimContext, simulate
from hivenet.sim.flowstate_hook import (
    NO_FLOW_STATE,
    FlowStateHook,
    FlowStateUnsupported,
    NatDecision,
    NoFlowState,
)
from hivenet.sim.result import GeneratedPacket, Here, SimulationResult, TraceStep
from hivenet.sim.tables import (
    LearnedEntry,
    LearnedMac,
    LearnedNeighbour,
    MemoryTables,
    TablesView,
    mac_entry_tag,
    neighbour_entry_tag,
)
from hivenet.sim.topology import TopologyView

__all__ = [
    "NO_FLOW_STATE",
    "FlowStateHook",
    "FlowStateUnsupported",
    "GeneratedPacket",
    "Here",
    "LearnedEntry",
    "LearnedMac",
    "LearnedNeighbour",
    "MemoryTables",
    "NatDecision",
    "NoFlowState",
    "SimContext",
    "SimulationResult",
    "TablesView",
    "TopologyView",
    "TraceStep",
    "mac_entry_tag",
    "neighbour_entry_tag",
    "simulate",
]
