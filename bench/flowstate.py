"""Benchmark of stateful forwarding end to end in one process: new NATed connections per
second per agent (upcall -> simulation with security-group conntrack and router SNAT ->
commit -> push of the new conntrack/NAT entries over the memory underlay -> the gateway's
agent decoding and installing them), flow-state bytes pushed per connection, and memory per
100k tracked connections (conntrack + NAT entries, as a gateway holds them).

Peer measured in the same run: the same new flows through the same two agents on the same
topology with the stateful parts taken out (no security group, no port security, no SNAT):
plain routed forwarding, so the table shows what connection tracking, NAT and the flow-state
push cost per new connection, as a ratio.

Also measured in the same run: the same stateful connections with the flow-state messages
unauthenticated (no HMAC seal/verify, no replay window, no tunnel source check), as agents
ran before the underlay was authenticated; alternating runs, the median of each, so the
table shows what the HMAC costs per new connection.

And the rate goal's peer, in the same run: the same end-to-end measurement
(`WARM_RATE_SNIPPET`, what `connections_per_second` does) with the code of another git
revision (`--base`, default `main`: the previous release), its `src/` and `bench/` unpacked
to a temporary directory (`bench/baseline.py`), this tree's, this tree's with every
connection simulated (no connection templates: `agent/pipeline.py`, `sim/replay.py`) and
this tree's in batches; every side runs in child processes, alternating, `--rounds` times
each, and the median of each is compared (`versus_base`); the children time CPU time of
their own process (`bench/baseline.py`), as the machine may be shared. The shared tables are
warm on every side (`warm`: both hosts' MACs and the next hop known, as once the hosts have
spoken; the base's tables are warmed through its pipeline), so no simulation learns or
floods.

Owns nothing but this measurement: memory datapaths, no sockets, no store (the SNAT range is
claimed locally); files only in the base revision's temporary directory. Prints a human
table, then exactly one JSON line.
Usage: `python bench/flowstate.py [--quick] [--where N] [--base REV] [--rounds N]`
(`--where N`: also the N source lines that allocated the most bytes per connection,
tracemalloc by line, in the table and in the JSON line as `where`; `--base ''`: no base).

Memory mode: `python bench/flowstate.py --memory-sizes 100000,1000000 [--baseline-src DIR]
[--calibrate N]` measures only the bytes per connection (both agents, tables + flows + tags,
tracemalloc) at each size, so growth is linear and the constant is known; the flow tables
are sized to hold every connection's flow, the delivered frames are not counted. The
connections are built directly (`build_direct`): connection 0 goes through the pipeline with
its flow-state questions recorded, every other one asks the agent's own hook the same
questions, commits and pushes through `FlowStateSync` (the gateway decodes and installs) and
installs the flow the simulation would have (connection 0's, with its own match, NAT
rewrite and tags): no per-packet simulation, ~1.3 ms of CPU per connection under tracemalloc
instead of ~3. Before each measurement the direct build is checked equal to the pipeline at
300 connections (flows with actions and tags, both agents' entries), and `--calibrate N`
(default 5000) also measures N connections both ways, in the table. `--baseline-src` runs
the same in a subprocess with another checkout's `src` first on the path (e.g. the previous
commit's, `git worktree add`), alternating with this code, and prints the ratios.

Refresh mode: `python bench/flowstate.py --refresh-scan N [--base REV] [--rounds N]` measures
the agent's tick scan of used flows (`FlowStateSync._touch_used`: each used flow's conntrack
and NAT entries get their idle timers restarted) over N connections whose flows are all used
before each of 20 ticks 0.5 s apart: CPU microseconds per used flow per tick, this tree and
`--base`'s, alternating in child processes, and the speed-up. The connections are SYNs
(conntrack SYN_SENT: 120 s; NAT: 7440 s), so the short timeout's entries move most often.
Over 20k flows the scan is sliced (`flowstate_sync.SCAN_FLOWS_PER_SLICE`: a tick scans a
share of the flows, a pass of 2 ticks by default all of them), so the figure is the CPU of a
tick spread over all used flows, as the agent spends it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import ipaddress
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from operator import and_
from pathlib import Path
from typing import Any

from hivenet.agent.flowstate_sync import FlowStateSync
from hivenet.agent.pipeline import FlowPipeline
from hivenet.datapath.memory import MemoryDatapath, MemoryUnderlay
from hivenet.flows.actions import SetField
from hivenet.flows.table import flow_match_values
from hivenet.flowstate import NatRange
from hivenet.flowstate.auth import Keyring
from hivenet.model import (
    Bridge,
    Chain,
    DeviceKind,
    Direction,
    NatTarget,
    Port,
    Router,
    Rule,
    RuleAction,
    SecurityGroup,
    SecurityGroupRule,
    TopologyObject,
    TunnelZone,
    TunnelZoneMember,
)
from hivenet.packets import build_tcp_segment
from hivenet.packets.flowmatch import FlowMatch
from hivenet.sim import MemoryTables, TopologyView

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline

SNAT_IP = "203.0.113.2"
VM_MAC, OUT_MAC = "02:00:00:00:00:01", "02:00:00:00:00:03"
R_IN_MAC, R_OUT_MAC = "02:00:00:00:ff:01", "02:00:00:00:ff:02"


def build_hosts(
    stateful: bool = True,
    authenticate: bool = True,
    max_flows: int = 100_000,
    templates: bool = True,
) -> tuple[dict[str, FlowStateSync], dict[str, MemoryDatapath], Port, dict[str, FlowPipeline]]:
    """Two agents (h1: the VM, h2: the outside port). `stateful=False` is the peer: the same
    topology without security group, port security or NAT rules. `authenticate` (as agents
    run): flow state sealed with a cluster key, tunnel sources checked. The shared tables
    know the router's next hop and both hosts' MACs (`warm`), as in a network whose hosts
    have spoken before. `templates=False`: every new connection simulated (no connection
    templates, `agent/pipeline.py`)."""
    objects: list[TopologyObject] = [
        Bridge(id="net"),
        Bridge(id="ext"),
        Chain(id="pre"),
        Chain(id="post"),
        Router(id="r", inbound_chain_id="pre", outbound_chain_id="post"),
        Rule(chain_id="pre", action=RuleAction.REV_SNAT),
        Rule(
            chain_id="post",
            action=RuleAction.SNAT,
            nw_src=ipaddress.ip_network("10.0.0.0/24"),
            nat_targets=(
                NatTarget(
                    address_from=ipaddress.ip_address(SNAT_IP),
                    address_to=ipaddress.ip_address(SNAT_IP),
                    port_from=1024,
                    port_to=65535,
                ),
            ),
        ),
        SecurityGroup(id="sg"),
        SecurityGroupRule(id="egress", security_group_id="sg", direction=Direction.EGRESS),
        Port(
            id="r-net",
            device_kind=DeviceKind.ROUTER,
            device_id="r",
            mac=R_IN_MAC,
            addresses=(ipaddress.ip_interface("10.0.0.1/24"),),
            peer_id="b-net",
        ),
        Port(id="b-net", device_kind=DeviceKind.BRIDGE, device_id="net", peer_id="r-net"),
        Port(
            id="r-ext",
            device_kind=DeviceKind.ROUTER,
            device_id="r",
            mac=R_OUT_MAC,
            addresses=(ipaddress.ip_interface("203.0.113.1/24"),),
            peer_id="b-ext",
        ),
        Port(id="b-ext", device_kind=DeviceKind.BRIDGE, device_id="ext", peer_id="r-ext"),
        Port(
            id="vm",
            device_kind=DeviceKind.BRIDGE,
            device_id="net",
            host_id="h1",
            interface_name="hnvm",
            mac=VM_MAC,
            tunnel_key=1,
            addresses=(ipaddress.ip_interface("10.0.0.11/24"),),
            port_security_enabled=True,
            security_group_ids=("sg",),
        ),
        Port(
            id="out",
            device_kind=DeviceKind.BRIDGE,
            device_id="ext",
            host_id="h2",
            interface_name="hnout",
            mac=OUT_MAC,
            tunnel_key=2,
            addresses=(ipaddress.ip_interface("203.0.113.100/24"),),
        ),
        TunnelZone(
            id="tz",
            members=(
                TunnelZoneMember(host_id="h1", underlay_ip=ipaddress.ip_address("192.0.2.1")),
                TunnelZoneMember(host_id="h2", underlay_ip=ipaddress.ip_address("192.0.2.2")),
            ),
        ),
    ]
    if not stateful:
        objects = [
            o.model_copy(update={"port_security_enabled": False, "security_group_ids": ()})
            if isinstance(o, Port) and o.id == "vm"
            else o
            for o in objects
            if not isinstance(o, Rule | SecurityGroup | SecurityGroupRule)
        ]
    underlay = MemoryUnderlay()
    syncs: dict[str, FlowStateSync] = {}
    datapaths: dict[str, MemoryDatapath] = {}
    pipelines: dict[str, FlowPipeline] = {}
    vm_port = next(o for o in objects if isinstance(o, Port) and o.id == "vm")
    keyring = Keyring.new(bytes(range(32)), 0.0)
    for index, host in enumerate(("h1", "h2"), 1):
        view = TopologyView.from_objects(objects)
        tables = MemoryTables()
        warm(tables)
        datapath = MemoryDatapath(host, f"192.0.2.{index}", underlay, max_flows=max_flows)
        sync = FlowStateSync(host, datapath, view, authenticate=authenticate, keyring=keyring)
        if authenticate:
            datapath.set_tunnel_peers([f"192.0.2.{3 - index}"])
        sync.allocator.claim_all(NatRange.parse(SNAT_IP, SNAT_IP, 1024, 65535))
        pipelines[host] = FlowPipeline(
            host, datapath, view, tables, stateful=sync, templates=templates
        )
        datapath.bind_port(index, "hnvm" if index == 1 else "hnout")
        syncs[host], datapaths[host] = sync, datapath
    return syncs, datapaths, vm_port, pipelines


def warm(tables: Any) -> None:
    """What the shared tables hold once the hosts have spoken: the router's next hop's MAC,
    the VM's MAC on its bridge and the outside host's on its own (else every simulation
    learns the VM's MAC again and floods to the outside port, as no agent publishes here).
    Only `MemoryTables`' two dicts, which every revision compared has."""
    mac = {
        name: int(text.replace(":", ""), 16) for name, text in (("vm", VM_MAC), ("out", OUT_MAC))
    }
    tables.neighbours[("r", 4, int(ipaddress.ip_address("203.0.113.100")))] = mac["out"]
    tables.macs[("net", 0, mac["vm"])] = "vm"
    tables.macs[("ext", 0, mac["out"])] = "out"


# Connections per destination (server port): half the SNAT range, so no destination passes
# the allocator's low-water mark (75% in use), where the previous code recounted the used
# ports on every allocation (quadratic: the 100k runs that did not finish).
PER_DESTINATION = 32_000


def syn_frames(count: int) -> list[bytes]:
    """To the outside host, varying ports: every SYN is a new connection."""
    return [
        build_tcp_segment(
            eth_src=VM_MAC,
            eth_dst=R_IN_MAC,
            ip_src="10.0.0.11",
            ip_dst="203.0.113.100",
            src_port=1024 + n % PER_DESTINATION,
            dst_port=1 + n // PER_DESTINATION,
            flags=0x02,
        )
        for n in range(count)
    ]


def connections_per_second(
    count: int,
    stateful: bool = True,
    authenticate: bool = True,
    batch: int = 0,
    templates: bool = True,
) -> dict[str, float]:
    """`batch` > 0: upcalls handled `batch` at a time (`FlowPipeline.batch()`: one flow-state
    push per peer per batch, flows installed and packets sent after it), as a datapath would
    hand over one receive batch; 0: one at a time, as the agent runs today."""
    syncs, datapaths, _, pipelines = build_hosts(stateful, authenticate, templates=templates)
    # To the outside host, varying ports: every SYN is a new connection (SG conntrack entry
    # in the VM port's zone + SNAT binding), pushed to the gateway host before it leaves.
    frames = syn_frames(count)
    h1, h2 = datapaths["h1"], datapaths["h2"]
    gc.collect()
    started = time.perf_counter()
    if stateful and batch:
        pipeline = pipelines["h1"]
        for first in range(0, count, batch):
            with pipeline.batch():
                for frame in frames[first : first + batch]:
                    h1.receive(1, frame)
    elif stateful:
        for frame in frames:
            h1.receive(1, frame)
    else:
        # Without state the megaflow would serve every later SYN; drop it after each packet
        # so that every frame is a new-flow simulation, as it is on the stateful path.
        for frame in frames:
            h1.receive(1, frame)
            h1.invalidate(("router:r",))
    elapsed = time.perf_counter() - started
    if h1.counters()["misses"] != count:
        raise SystemExit(f"{h1.counters()['misses']} of {count} frames were new flows")
    delivered = len(h2.take(2))
    sync1, sync2 = syncs["h1"], syncs["h2"]
    return {
        "connections": count,
        "delivered": delivered,
        "per_second": round(count / elapsed, 1),
        "us_per_connection": round(elapsed / count * 1e6, 1),
        "pushed_bytes_per_connection": round(sync1.counters.pushed_bytes / count, 1),
        "pushed_entries_per_connection": round(sync1.counters.pushed_entries / count, 2),
        "peer_installed_entries": sync2.counters.received_entries,
        "peer_rejected": sync2.counters.rejected_unauthenticated + sync2.counters.rejected_replayed,
    }


def hmac_cost(count: int, rounds: int = 3) -> tuple[dict[str, float], dict[str, float]]:
    """(with HMAC, without), each the run of median rate among `rounds` alternating runs."""
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for _ in range(rounds):
        for authenticate in (False, True):
            runs[authenticate].append(connections_per_second(count, authenticate=authenticate))
    median = rounds // 2
    with_hmac, without = (
        sorted(runs[flag], key=lambda r: r["per_second"])[median] for flag in (True, False)
    )
    return with_hmac, without


BATCH = 64  # upcalls per batch: the userspace datapath's receive batch size


# The rate measurement for any revision (the base's `build_hosts` returns 3 or 4 values and
# does not warm the tables): the shared tables warmed as `warm` does, through the pipeline
# the datapath hands upcalls to, then `count` SYNs as `connections_per_second` sends them.
WARM_RATE_SNIPPET = """
import gc
hosts = bench.build_hosts()
syncs, datapaths = hosts[0], hosts[1]
vm_mac, out_mac = (int(text.replace(":", ""), 16) for text in (bench.VM_MAC, bench.OUT_MAC))
for datapath in datapaths.values():
    tables = datapath._handler.__self__.context.tables
    tables.macs[("net", 0, vm_mac)] = "vm"
    tables.macs[("ext", 0, out_mac)] = "out"
frames = [
    bench.build_tcp_segment(
        eth_src=bench.VM_MAC, eth_dst=bench.R_IN_MAC, ip_src="10.0.0.11",
        ip_dst="203.0.113.100", src_port=1024 + n % 32000, dst_port=1 + n // 32000, flags=0x02,
    )
    for n in range({count})
]
h1, h2 = datapaths["h1"], datapaths["h2"]
gc.collect()
started = time.perf_counter()
for frame in frames:
    h1.receive(1, frame)
elapsed = time.perf_counter() - started
assert h1.counters()["misses"] == {count}, h1.counters()
print(json.dumps({{"per_second": round({count} / elapsed, 1),
                  "delivered": len(h2.take(2)),
                  "peer_installed_entries": syncs["h2"].counters.received_entries}}))
"""


def versus_base(count: int, base: str, rounds: int) -> dict[str, object]:
    """End-to-end rate of git revision `base`, of this tree one upcall at a time (as the
    agent runs), of this tree without connection templates (every connection simulated, as
    before them) and of this tree in batches of BATCH upcalls, each in a child process,
    alternating `rounds` times; the median of each and the ratios to the base. Every side
    runs on warm tables (`warm`; `WARM_RATE_SNIPPET` for the base and this tree)."""
    snippet = WARM_RATE_SNIPPET.format(count=count)
    sides = {  # name: (tree, snippet)
        "base": (baseline.checkout(base), snippet),
        "current": (baseline.current_tree(), snippet),
        "simulated": (
            baseline.current_tree(),
            f"print(json.dumps(bench.connections_per_second({count}, templates=False)))\n",
        ),
        "batched": (
            baseline.current_tree(),
            f"print(json.dumps(bench.connections_per_second({count}, batch={BATCH})))\n",
        ),
    }
    rates: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side, (tree, code) in sides.items():
            result = baseline.run(tree, "flowstate", code)
            if result["delivered"] != count or result["peer_installed_entries"] == 0:
                raise SystemExit(f"{side}: {result['delivered']} of {count} delivered: invalid")
            rates[side].append(float(result["per_second"]))  # type: ignore[arg-type]
    median = {side: statistics.median(runs) for side, runs in rates.items()}
    return {
        "base": base,
        "base_commit": baseline.describe(base),
        "rounds": rounds,
        "clock": "process CPU time",
        "batch": BATCH,
        "tables": "warm",
        **{f"{side}_per_second": median[side] for side in sides},
        **{f"{side}_runs": rates[side] for side in sides},
        "ratio": round(median["current"] / median["base"], 3),
        "batched_ratio": round(median["batched"] / median["base"], 3),
        "templates_ratio": round(median["current"] / median["simulated"], 3),
    }


# The refresh scan (`FlowStateSync._touch_used`, the agent's tick: every used flow's
# connection entries have their idle timers restarted) over `count` connections whose flows
# are all used before each of `ticks` ticks 0.5 s apart, CPU time of the scans only. Uses only
# what the previous releases have too (`build_hosts`, `build_direct`, the agent's scan), so
# `baseline.run` runs the same source on both trees.
REFRESH_SNIPPET = """
hosts = bench.build_hosts()
syncs, datapaths = hosts[0], hosts[1]
bench.build_direct({count}, hosts)
sync = syncs["h1"]
flows = list(datapaths["h1"].flows())
now = sync.clock()
spent = 0.0
for _ in range({ticks}):
    now += 0.5
    for flow in flows:
        flow.last_used = now
    started = time.process_time()
    sync._touch_used(now)
    spent += time.process_time() - started
live = len(sync.conntrack) + len(sync.nat)
print(json.dumps({{"flows": len(flows), "live_entries": live,
                  "us_per_used_flow": spent / {ticks} / len(flows) * 1e6}}))
"""


def refresh_scan(count: int, base: str, rounds: int, ticks: int = 20) -> None:
    """Refresh mode: `REFRESH_SNIPPET` with this tree and with `base`'s, alternating `rounds`
    times in child processes; prints the table and one JSON line."""
    snippet = REFRESH_SNIPPET.format(count=count, ticks=ticks)
    sides = {"base": baseline.checkout(base), "current": baseline.current_tree()}
    runs: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side, tree in sides.items():
            result = baseline.run(tree, "flowstate", snippet)
            if result["flows"] != count or result["live_entries"] != 2 * count:
                raise SystemExit(f"{side}: {result} (want {count} flows, all entries live)")
            runs[side].append(float(result["us_per_used_flow"]))  # type: ignore[arg-type]
    median = {side: statistics.median(values) for side, values in runs.items()}
    ratio = median["base"] / median["current"]
    label = f"code of {base} ({baseline.describe(base)}), median"
    print(f"{'refresh scan, us CPU per used flow per tick':<52} {'value':>14}")
    print("-" * 67)
    print(f"{label:<52} {median['base']:>14.2f}")
    print(f"{'this tree, median':<52} {median['current']:>14.2f}")
    print(f"{'speed-up (base / this tree)':<52} {ratio:>14.2f}")
    print(
        json.dumps(
            {
                "bench": "flowstate_refresh",
                "python": platform.python_version(),
                "connections": count,
                "ticks": ticks,
                "tick_interval": 0.5,
                "clock": "process CPU time",
                "base": base,
                "base_commit": baseline.describe(base),
                "us_per_used_flow": median,
                "runs": runs,
                "speedup": round(ratio, 3),
            },
            separators=(",", ":"),
        )
    )


def memory_per_100k(count: int, where: int = 0) -> tuple[dict[str, float], list[dict[str, object]]]:
    syncs, datapaths, _, _ = build_hosts()
    frames = syn_frames(count)
    gateway = syncs["h2"]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    snapshot_before = tracemalloc.take_snapshot() if where else None
    for frame in frames:
        datapaths["h1"].receive(1, frame)
    datapaths["h2"].take(2)
    # The gateway holds what was pushed to it: conntrack (port zone) + NAT entries only.
    gc.collect()
    sender_flows = len(datapaths["h1"].flow_table)
    after = tracemalloc.get_traced_memory()[0]
    by_line: list[dict[str, object]] = []
    if snapshot_before is not None:
        grown = tracemalloc.take_snapshot().compare_to(snapshot_before, "lineno")
        for stat in grown[:where]:
            origin = stat.traceback[0]
            by_line.append(
                {
                    "line": f"{origin.filename.split('/src/')[-1]}:{origin.lineno}",
                    "bytes_per_connection": round(stat.size_diff / count, 1),
                    "objects_per_connection": round(stat.count_diff / count, 2),
                }
            )
    tracemalloc.stop()
    entries = len(gateway.conntrack) + len(gateway.nat)
    sender = syncs["h1"]
    return {
        "connections": count,
        "gateway_entries": entries,
        "sender_entries": len(sender.conntrack) + len(sender.nat),
        "sender_flows": sender_flows,
        "bytes_both_hosts_incl_flows": after - before,
        "bytes_per_connection_both_hosts_incl_flows": round((after - before) / count, 1),
        "mb_per_100k_connections_both_hosts_incl_flows": round(
            (after - before) / count * 100_000 / 1e6, 1
        ),
    }, by_line


class _Recorder:
    """A flow-state hook that passes every question to the agent's hook and records it
    (method, packet, rule, zone, decision): the template connection's simulation."""

    def __init__(self, hook: Any) -> None:
        self.hook, self.transaction, self.record = hook, hook.transaction, hook.record
        self.calls: list[tuple[str, Any, Any, str, Any]] = []

    def conntrack(self, packet: Any, zone: str, now: float) -> Any:
        decision = self.hook.conntrack(packet, zone, now)
        self.calls.append(("conntrack", packet, None, zone, decision))
        return decision

    def nat(self, packet: Any, rule: Any, zone: str, now: float) -> Any:
        decision = self.hook.nat(packet, rule, zone, now)
        self.calls.append(("nat", packet, rule, zone, decision))
        return decision


def _template(
    sync: FlowStateSync, datapath: MemoryDatapath, pipelines: dict[str, FlowPipeline]
) -> tuple[list[tuple[str, Any, Any, str, Any]], Any]:
    """Connection 0 through the real pipeline, its hook questions and result recorded."""
    begin, recorders = sync.begin, []

    def recording_begin(frame: bytes, match: Any = None) -> Any:
        recorders.append(_Recorder(begin(frame, match)))
        return recorders[-1]

    sync.begin = recording_begin  # type: ignore[method-assign]
    try:
        datapath.receive(1, syn_frames(1)[0])
    finally:
        del sync.begin
    (recorder,) = recorders
    return recorder.calls, pipelines["h1"].last_result


DIRECT_BATCH = 512  # connections per flow-state push in the direct build


def build_direct(count: int, hosts: Any) -> None:
    """Open `count` connections (the first through the real pipeline, the rest as its replay)
    without simulating each: per connection the same hook questions the simulation of
    connection 0 asked (conntrack in the port's zone, reverse SNAT, SNAT: the agent's own
    `TransactionHook`, so the real tables), the same commit and push (`FlowStateSync.finish`:
    encode, seal, the gateway's decode and install) and the flow the simulation would install
    (connection 0's result with this connection's match, NAT rewrites and tags). The caller
    checks it against the pipeline at a small size (`check_direct`)."""
    syncs, datapaths, _, pipelines = hosts
    sync, datapath = syncs["h1"], datapaths["h1"]
    calls, template = _template(sync, datapath, pipelines)
    rewrites0: dict[str, int] = {}
    connection_tags: set[int] = set()
    for _, _, _, _, decision in calls:
        connection_tags |= decision.tags
        rewrites0.update(getattr(decision, "rewrites", {}))
    static_tags = template.tags - connection_tags
    # Fresh objects per connection, as each simulation makes its own, built positionally
    # (dataclasses.replace is most of a connection's cost here).
    calls_with_fields = [(call, packet_fields(call[1])) for call in calls]
    first_fields = packet_fields(template.match)
    action_fields = [(type(a), dataclasses.astuple(a)) for a in template.actions]
    mask = template.mask
    for n in range(1, count):
        if n % DIRECT_BATCH == 1:
            sync.begin_batch()
        tp_src, tp_dst = 1024 + n % PER_DESTINATION, 1 + n // PER_DESTINATION
        now = datapath.clock()
        match = with_ports(first_fields, tp_src, tp_dst)
        hook = sync.begin(b"", match)
        tags = set(static_tags)
        rewrites: dict[str, int] = {}
        for (method, _, rule, zone, _), fields in calls_with_fields:
            seen = with_ports(fields, tp_src, tp_dst)
            if method == "conntrack":
                decision = hook.conntrack(seen, zone, now)
            else:
                decision = hook.nat(seen, rule, zone, now)
                rewrites.update(decision.rewrites)
            tags |= decision.tags
        actions = tuple(
            SetField(args[0], rewrites[args[0]])
            if kind is SetField and rewrites0.get(args[0]) == args[1]
            else kind(*args)
            for kind, args in action_fields
        )
        sync.finish(hook, template, "vm", now)  # reads only the result's path and verdict
        datapath.install_flow(
            tuple(map(and_, flow_match_values(match), mask)),
            mask,
            actions,
            tags,
            idle_timeout=template.idle_timeout,
            mtu=template.mtu,
        )
        if n % DIRECT_BATCH == 0 or n == count - 1:
            sync.end_batch(now)


def packet_fields(match: FlowMatch) -> list[Any]:
    """`match`'s field values in constructor order (for `with_ports`)."""
    return [getattr(match, field.name) for field in dataclasses.fields(match)]


_TP_SRC, _TP_DST = (
    [field.name for field in dataclasses.fields(FlowMatch)].index(name)
    for name in ("tp_src", "tp_dst")
)


def with_ports(fields: list[Any], tp_src: int, tp_dst: int) -> FlowMatch:
    fields[_TP_SRC], fields[_TP_DST] = tp_src, tp_dst
    return FlowMatch(*fields)


def _state(hosts: Any) -> object:
    syncs, datapaths, _, _ = hosts
    flows = {
        (flow.match, flow.mask, flow.actions, frozenset(flow.tags))
        for flow in datapaths["h1"].flow_table.flows()
    }
    tables = [
        (
            sorted((r.zone, r.key, r.state) for r in s.conntrack.snapshot(0.0)),
            sorted(map(repr, (r.binding for r in s.nat.snapshot(0.0)))),
        )
        for s in syncs.values()
    ]
    return flows, tables, len(datapaths["h2"].flow_table)


def check_direct(count: int) -> None:
    """The direct build's state equals the real pipeline's for `count` connections (flows with
    their actions and tags on the sender, conntrack/NAT entries on both agents): else exit."""
    piped = build_hosts(max_flows=count + 1)
    for frame in syn_frames(count):
        piped[1]["h1"].receive(1, frame)
    direct = build_hosts(max_flows=count + 1)
    build_direct(count, direct)
    if _state(piped) != _state(direct):
        raise SystemExit(f"direct build differs from the pipeline at {count} connections")


def memory_only(count: int, direct: bool = True) -> float:
    """Bytes per connection, both agents, tables + flows + tags (delivered frames dropped).
    `direct`: built by `build_direct` (checked equal to the pipeline by `check_direct`),
    else every connection through the pipeline (slow under tracemalloc)."""
    hosts = build_hosts(max_flows=count + 1)
    syncs, datapaths, _, _ = hosts
    frames = [] if direct else syn_frames(count)
    gc.collect()
    gc.disable()  # full collections over millions of live objects: minutes, and no garbage
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    if direct:
        build_direct(count, hosts)
    for index, frame in enumerate(frames):
        datapaths["h1"].receive(1, frame)
        if index % 1000 == 999:  # frames delivered are the benchmark's, not state
            datapaths["h2"].take(2)
            datapaths["h2"].deliveries.clear()
    datapaths["h2"].take(2)
    datapaths["h2"].deliveries.clear()
    gc.enable()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    entries = len(syncs["h2"].conntrack) + len(syncs["h2"].nat)
    if len(datapaths["h1"].flow_table) != count or entries != 2 * count:
        raise SystemExit(f"{count} connections did not all hold a flow and 2 entries: invalid")
    return (after - before) / count


def _memory_row(size: int, direct: bool, baseline_src: str | None) -> float:
    """Bytes per connection at `size`, this tree in this process or `baseline_src`'s `src`
    in a child process (checked against its own pipeline first when `direct`)."""
    if baseline_src is None:
        if direct:
            check_direct(CHECK_SIZE)
        return round(memory_only(size, direct), 1)
    env = dict(os.environ, PYTHONPATH=os.path.join(baseline_src, "src"))
    out = subprocess.run(
        [sys.executable, __file__, "--memory-one", str(size), "direct" if direct else "pipeline"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return round(float(out.strip().splitlines()[-1]), 1)


CHECK_SIZE = 300  # connections built both ways and compared before each direct measurement


def memory_mode(sizes: list[int], baseline_src: str | None, calibrate: int) -> None:
    """Bytes per connection at each size (direct build), and at `calibrate` connections
    through the pipeline and the direct build both (how far the direct build is from the
    per-packet path), for this tree and the baseline, alternating."""
    sides = {"this": None} if not baseline_src else {"this": None, "baseline": baseline_src}
    rows: dict[str, dict[str, float]] = {side: {} for side in sides}
    columns = [str(size) for size in sizes]
    if calibrate:
        columns += [f"pipeline {calibrate}", f"direct {calibrate}"]
    for column in columns:
        for side, src in sides.items():
            size = int(column.split()[-1])
            direct = not column.startswith("pipeline")
            rows[side][column] = _memory_row(size, direct, src)
            print(f"  {side} {column}: {rows[side][column]} B/connection", file=sys.stderr)
    width = max(14, *(len(column) + 2 for column in columns))
    print(
        f"{'bytes/connection (2 agents, tables+flows+tags)':<48}"
        + "".join(f"{column:>{width}}" for column in columns)
    )
    print("-" * (48 + width * len(columns)))
    for side, values in rows.items():
        print(f"{side:<48}" + "".join(f"{values[c]:>{width},.1f}" for c in columns))
    ratios = {}
    if baseline_src:
        ratios = {c: round(rows["this"][c] / rows["baseline"][c], 3) for c in columns}
        print(f"{'this / baseline':<48}" + "".join(f"{ratios[c]:>{width}.3f}" for c in columns))
    print(
        json.dumps(
            {
                "bench": "flowstate_memory",
                "python": platform.python_version(),
                "build": f"direct (checked equal to the pipeline at {CHECK_SIZE})",
                "bytes_per_connection": rows,
                "this_vs_baseline": ratios,
            },
            separators=(",", ":"),
        )
    )


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--memory-one":  # the baseline's subprocess
        direct = sys.argv[3] == "direct"
        if direct:
            check_direct(CHECK_SIZE)
        print(memory_only(int(sys.argv[2]), direct))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer connections")
    parser.add_argument(
        "--where", type=int, default=0, metavar="N", help="top N allocating lines (tracemalloc)"
    )
    parser.add_argument(
        "--base",
        default="main",
        metavar="REV",
        help="git revision whose code is the rate's peer (default main; '' for none)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side vs --base")
    parser.add_argument(
        "--memory-sizes",
        metavar="N,N",
        help="memory mode: bytes per connection at these connection counts only",
    )
    parser.add_argument(
        "--baseline-src", metavar="DIR", help="memory mode: checkout to compare (its top directory)"
    )
    parser.add_argument(
        "--calibrate",
        type=int,
        default=5000,
        metavar="N",
        help="memory mode: also N connections through the pipeline and directly (0: not)",
    )
    parser.add_argument(
        "--refresh-scan",
        type=int,
        metavar="N",
        help="refresh mode: the tick's scan of N used connections' flows, vs --base only",
    )
    args = parser.parse_args()
    if args.where < 0:
        parser.error(f"--where must be >= 0, got {args.where}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.memory_sizes:
        try:
            sizes = [int(part) for part in args.memory_sizes.split(",")]
        except ValueError:
            parser.error(
                f"--memory-sizes must be counts like 100000,1000000, got {args.memory_sizes!r}"
            )
        if any(size < 1 for size in sizes):
            parser.error(f"--memory-sizes must be counts >= 1, got {args.memory_sizes!r}")
        if args.calibrate < 0:
            parser.error(f"--calibrate must be >= 0, got {args.calibrate}")
        if args.baseline_src and not os.path.isdir(
            os.path.join(args.baseline_src, "src", "hivenet")
        ):
            # Else the child would import this tree's package and compare it with itself.
            parser.error(
                f"--baseline-src must be a checkout (holding src/hivenet), got"
                f" {args.baseline_src!r}"
            )
        memory_mode(sizes, args.baseline_src, args.calibrate)
        return
    if args.refresh_scan is not None:
        if args.refresh_scan < 1 or not args.base:
            parser.error(
                f"--refresh-scan needs N >= 1 and a --base, got {args.refresh_scan} and"
                f" {args.base!r}"
            )
        refresh_scan(args.refresh_scan, args.base, args.rounds)
        return
    count = 2_000 if args.quick else 20_000
    against = versus_base(count, args.base, args.rounds) if args.base else None
    rate, unauthenticated = hmac_cost(count)
    peer = connections_per_second(count, stateful=False, authenticate=False)
    if rate["peer_installed_entries"] == 0 or rate["peer_rejected"]:
        raise SystemExit("the gateway did not install authenticated flow state: invalid")
    if peer["delivered"] != count or rate["delivered"] != count:
        raise SystemExit(
            f"not every connection was delivered (stateful {rate['delivered']}, "
            f"stateless {peer['delivered']} of {count}): benchmark invalid"
        )
    ratio = rate["per_second"] / peer["per_second"]
    memory, by_line = memory_per_100k(count, args.where)
    print(f"{'measure':<52} {'value':>14}")
    print("-" * 67)
    print(
        f"{'new NATed connections/s per agent (incl. push+install)':<52} {rate['per_second']:>14,.0f}"
    )
    print(f"{'us per new connection':<52} {rate['us_per_connection']:>14}")
    print(f"{'peer: new routed flows/s, same agents, no state':<52} {peer['per_second']:>14,.0f}")
    print(f"{'stateful / stateless rate':<52} {ratio:>14.2f}")
    if against is not None:
        label = f"same, code of {against['base']} ({against['base_commit']}), median"
        rows = [
            (label, f"{against['base_per_second']:,.0f}"),
            ("same, this tree, one upcall at a time", f"{against['current_per_second']:,.0f}"),
            (
                "same, this tree, every connection simulated",
                f"{against['simulated_per_second']:,.0f}",
            ),
            (
                f"same, this tree, batches of {BATCH} upcalls",
                f"{against['batched_per_second']:,.0f}",
            ),
            ("this tree / base (one at a time)", f"{against['ratio']:.2f}"),
            (f"this tree / base (batches of {BATCH})", f"{against['batched_ratio']:.2f}"),
            (
                "connection templates / every connection simulated",
                f"{against['templates_ratio']:.2f}",
            ),
        ]
        for name, value in rows:
            print(f"{name:<52} {value:>14}")
    hmac_ratio = rate["per_second"] / unauthenticated["per_second"]
    print(
        f"{'same, flow state unauthenticated (no HMAC)':<52} "
        f"{unauthenticated['per_second']:>14,.0f}"
    )
    print(f"{'with HMAC / without HMAC rate':<52} {hmac_ratio:>14.3f}")
    print(
        f"{'flow-state bytes pushed per connection':<52} {rate['pushed_bytes_per_connection']:>14}"
    )
    print(f"{'entries pushed per connection':<52} {rate['pushed_entries_per_connection']:>14}")
    print(
        f"{'MB per 100k connections (2 agents, tables + flows)':<52} "
        f"{memory['mb_per_100k_connections_both_hosts_incl_flows']:>14}"
    )
    print(
        f"{'bytes per connection (2 agents, tables + flows)':<52} "
        f"{memory['bytes_per_connection_both_hosts_incl_flows']:>14}"
    )
    for entry in by_line:
        print(f"  {entry['line']:<50} {entry['bytes_per_connection']:>14} B/conn")
    print(
        json.dumps(
            {
                "bench": "flowstate",
                "python": platform.python_version(),
                "rate": rate,
                "stateless_peer": peer,
                "stateful_vs_stateless": round(ratio, 3),
                "versus_base": against,
                "without_hmac": unauthenticated,
                "with_vs_without_hmac": round(hmac_ratio, 3),
                "memory": memory,
                **({"where": by_line} if args.where else {}),
            },
            separators=(",", ":"),
        )
    )


if __name__ == "__main__":
    main()
