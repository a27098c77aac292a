"""Pure connection tracking and NAT state (MidoNet's flow state): the tables, their wire
format, which peers need which entries, and the per-simulation transaction the simulation's
flow-state hook is built on.

Modules: `keys` (FlowKey), `conntrack` (ConntrackTable, TCP state machine), `nat` (NatTable),
`portblocks` (SNAT port blocks leased per host), `schedule` (expiry and refresh), `wire`
(binary encoding), `peers` (push targets), `transaction` (FlowStateTransaction).
Must not touch I/O, the clock (`now` is passed in), the store or the datapath; imports only
`hivenet.packets`.
"""

from hivenet.flowstate.conntrack import (
    DEFAULT_TIMEOUTS,
    TCP_TRANSITIONS,
    Classification,
    ConnState,
    ConntrackRecord,
    ConntrackTable,
    ConntrackTimeouts,
    Direction,
    Verdict,
)
from hivenet.flowstate.keys import FlowKey, FlowKeyError, key_of_embedded, key_of_match
from hivenet.flowstate.nat import (
    IcmpErrorTranslation,
    NatBinding,
    NatError,
    NatKind,
    NatPortsExhausted,
    NatRecord,
    NatTable,
    NatTargetsExhausted,
    NatTimeouts,
)
from hivenet.flowstate.peers import group_by_peer, hosts_of_stateful_groups, push_targets
from hivenet.flowstate.portblocks import (
    BLOCK_SIZE,
    AllocatedPort,
    Destination,
    NatRange,
    PortBlock,
    PortBlockAllocator,
    PortBlockError,
    parse_block_key,
)
from hivenet.flowstate.schedule import RefreshPolicy
from hivenet.flowstate.transaction import (
    FlowStateTransaction,
    NatAction,
    NatOutcome,
    TransactionResult,
    conntrack_tag,
    nat_key_tag,
    nat_reply_tag,
    nat_tag,
)
from hivenet.flowstate.wire import WireFormatError, decode, decode_stream, encode, encode_batches

__all__ = [
    "BLOCK_SIZE",
    "DEFAULT_TIMEOUTS",
    "TCP_TRANSITIONS",
    "AllocatedPort",
    "Classification",
    "ConnState",
    "ConntrackRecord",
    "ConntrackTable",
    "ConntrackTimeouts",
    "Destination",
    "Direction",
    "FlowKey",
    "FlowKeyError",
    "FlowStateTransaction",
    "IcmpErrorTranslation",
    "NatAction",
    "NatBinding",
    "NatError",
    "NatKind",
    "NatOutcome",
    "NatPortsExhausted",
    "NatRange",
    "NatRecord",
    "NatTable",
    "NatTargetsExhausted",
    "NatTimeouts",
    "PortBlock",
    "PortBlockAllocator",
    "PortBlockError",
    "RefreshPolicy",
    "TransactionResult",
    "Verdict",
    "WireFormatError",
    "conntrack_tag",
    "decode",
    "decode_stream",
    "encode",
    "encode_batches",
    "group_by_peer",
    "hosts_of_stateful_groups",
    "key_of_embedded",
    "key_of_match",
    "nat_key_tag",
    "nat_reply_tag",
    "nat_tag",
    "parse_block_key",
    "push_targets",
]
