"""HiveNet flows package: the pure flow-table semantics shared by the simulation and datapaths.

Owns the flow action set (`actions`), the megaflow table and exact-match cache (`table`) and the
action executor that turns a frame plus actions into output frames (`execute`). Imports only
`hivenet.packets`; never the clock, sockets or threads. `execute` is not re-exported here so
that importing the table does not pull in the packet rewriters.
"""

from hivenet.flows.actions import (
    SETTABLE_FIELDS,
    Action,
    DecTtl,
    Drop,
    Output,
    PopVlan,
    PushVlan,
    SetField,
    Tunnel,
)
from hivenet.flows.table import ExactMatchCache, Flow, FlowTable, flow_match_values

__all__ = [
    "SETTABLE_FIELDS",
    "Action",
    "DecTtl",
    "Drop",
    "ExactMatchCache",
    "Flow",
    "FlowTable",
    "Output",
    "PopVlan",
    "PushVlan",
    "SetField",
    "Tunnel",
    "flow_match_values",
]
