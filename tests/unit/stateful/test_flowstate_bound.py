"""`FlowStateSync` with bounded tables: entries a full table evicts to make room for a peer's
push lose their flows (as expired entries do), the evictions are counted in the agent's
counters, and the default bound scales with memory."""

from __future__ import annotations

from hivenet.agent.flowstate_sync import (
    MAX_DEFAULT_ENTRIES,
    MIN_DEFAULT_ENTRIES,
    FlowStateSync,
    default_max_entries,
)
from hivenet.datapath.memory import MemoryDatapath
from hivenet.flows.actions import Drop
from hivenet.flowstate import ConnState, ConntrackRecord, FlowKey, conntrack_tag, encode
from hivenet.packets.flowmatch import FIELD_NAMES, FULL_MASKS
from hivenet.sim import TopologyView

ZONE = "port-1"


def key(port: int) -> FlowKey:
    return FlowKey(4, 0x0A000001, 0xC000020A, 6, port, 80)


def install_flow_tagged(datapath: MemoryDatapath, port: int, tag: str) -> None:
    mask = tuple(FULL_MASKS[name] if name == "tp_src" else 0 for name in FIELD_NAMES)
    match = tuple(port if name == "tp_src" else 0 for name in FIELD_NAMES)
    datapath.install_flow(match, mask, [Drop()], [tag])


def test_an_entry_evicted_for_a_peers_push_loses_its_flows_and_is_counted() -> None:
    now = 100.0
    datapath = MemoryDatapath("h1", "192.0.2.1", clock=lambda: now)
    sync = FlowStateSync("h1", datapath, TopologyView(), clock=lambda: now, max_entries=2)
    for port in (1000, 1001):
        sync.receive(
            encode([ConntrackRecord(ZONE, key(port), ConnState.SYN_SENT, now + 60)], now=now)
        )
        install_flow_tagged(datapath, port, conntrack_tag(ZONE, key(port)))
    assert len(datapath.flows()) == 2
    sync.receive(
        encode([ConntrackRecord(ZONE, key(1002), ConnState.ESTABLISHED, now + 60)], now=now)
    )
    assert len(sync.conntrack) == 2
    assert sync.conntrack.get(ZONE, key(1000), now) is None  # the oldest half-open
    assert [flow.match[FIELD_NAMES.index("tp_src")] for flow in datapath.flows()] == [1001]
    counters = sync.counters_snapshot()
    assert counters["max_entries"] == 2
    assert counters["evicted_connections_half_open"] == 1
    assert counters["evicted_connections_other"] == 0


def test_default_bound_is_one_entry_per_16_kib_within_limits() -> None:
    assert default_max_entries(8 << 30) == 524_288
    assert default_max_entries(256 << 20) == MIN_DEFAULT_ENTRIES
    assert default_max_entries(1 << 50) == MAX_DEFAULT_ENTRIES
    assert MIN_DEFAULT_ENTRIES <= default_max_entries() <= MAX_DEFAULT_ENTRIES
