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
(`connections_per_second`) with the code of another git revision (`--base`, default `main`:
the previous release), its `src/` and `bench/` unpacked to a temporary directory
(`bench/baseline.py`); both sides run in child processes, alternating, `--rounds` times each,
and the median of each is compared (`versus_base`); the children time CPU time of their
own process (`bench/baseline.py`), as the machine may be shared.

Owns nothing but this measurement: memory datapaths, no sockets, no store (the SNAT range is
claimed locally); files only in the base revision's temporary directory. Prints a human
table, then exactly one JSON line.
Usage: `python bench/flowstate.py [--quick] [--where N] [--base REV] [--rounds N]`
(`--where N`: also the N source lines that allocated the most bytes per connection,
tracemalloc by line, in the table and in the JSON line as `where`; `--base ''`: no base).

Memory mode: `python bench/flowstate.py --memory-sizes 100000,1000000 [--baseline-src DIR]`
measures only the bytes per connection (both agents, tables + flows + tags, tracemalloc) at
each size, so growth is linear and the constant is known; the flow tables are sized to hold
every connection's flow, the delivered frames are not counted. `--baseline-src` runs the
same measurement in a subprocess with another checkout's `src` first on the path (e.g. the
previous commit's, `git worktree add`), alternating with this code, and prints the ratio.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

from hivenet.agent.flowstate_sync import FlowStateSync
from hivenet.agent.pipeline import FlowPipeline
from hivenet.datapath.memory import MemoryDatapath, MemoryUnderlay
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
from hivenet.sim import MemoryTables, TopologyView

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline

SNAT_IP = "203.0.113.2"
VM_MAC, OUT_MAC = "02:00:00:00:00:01", "02:00:00:00:00:03"
R_IN_MAC, R_OUT_MAC = "02:00:00:00:ff:01", "02:00:00:00:ff:02"


def build_hosts(
    stateful: bool = True, authenticate: bool = True, max_flows: int = 100_000
) -> tuple[dict[str, FlowStateSync], dict[str, MemoryDatapath], Port, dict[str, FlowPipeline]]:
    """Two agents (h1: the VM, h2: the outside port). `stateful=False` is the peer: the same
    topology without security group, port security or NAT rules. `authenticate` (as agents
    run): flow state sealed with a cluster key, tunnel sources checked."""
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
        tables.neighbours[("r", 4, int(ipaddress.ip_address("203.0.113.100")))] = int(
            OUT_MAC.replace(":", ""), 16
        )
        datapath = MemoryDatapath(host, f"192.0.2.{index}", underlay, max_flows=max_flows)
        sync = FlowStateSync(host, datapath, view, authenticate=authenticate, keyring=keyring)
        if authenticate:
            datapath.set_tunnel_peers([f"192.0.2.{3 - index}"])
        sync.allocator.claim_all(NatRange.parse(SNAT_IP, SNAT_IP, 1024, 65535))
        pipelines[host] = FlowPipeline(host, datapath, view, tables, stateful=sync)
        datapath.bind_port(index, "hnvm" if index == 1 else "hnout")
        syncs[host], datapaths[host] = sync, datapath
    return syncs, datapaths, vm_port, pipelines


def syn_frames(count: int) -> list[bytes]:
    """To the outside host, varying ports: every SYN is a new connection."""
    return [
        build_tcp_segment(
            eth_src=VM_MAC,
            eth_dst=R_IN_MAC,
            ip_src="10.0.0.11",
            ip_dst="203.0.113.100",
            src_port=1024 + n % 64000,
            dst_port=1 + n // 64000,
            flags=0x02,
        )
        for n in range(count)
    ]


def connections_per_second(
    count: int, stateful: bool = True, authenticate: bool = True, batch: int = 0
) -> dict[str, float]:
    """`batch` > 0: upcalls handled `batch` at a time (`FlowPipeline.batch()`: one flow-state
    push per peer per batch, flows installed and packets sent after it), as a datapath would
    hand over one receive batch; 0: one at a time, as the agent runs today."""
    syncs, datapaths, _, pipelines = build_hosts(stateful, authenticate)
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


def versus_base(count: int, base: str, rounds: int) -> dict[str, object]:
    """End-to-end rate of git revision `base`, of this tree one upcall at a time (as the
    agent runs) and of this tree in batches of BATCH upcalls, each in a child process,
    alternating `rounds` times; the median of each and the ratios to the base."""
    call = f"bench.connections_per_second({count})"
    sides = {  # name: (tree, call)
        "base": (baseline.checkout(base), call),
        "current": (baseline.current_tree(), call),
        "batched": (
            baseline.current_tree(),
            f"bench.connections_per_second({count}, batch={BATCH})",
        ),
    }
    rates: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side, (tree, expression) in sides.items():
            result = baseline.run(tree, "flowstate", f"print(json.dumps({expression}))\n")
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
        **{f"{side}_per_second": median[side] for side in sides},
        **{f"{side}_runs": rates[side] for side in sides},
        "ratio": round(median["current"] / median["base"], 3),
        "batched_ratio": round(median["batched"] / median["base"], 3),
    }


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


def memory_only(count: int) -> float:
    """Bytes per connection, both agents, tables + flows + tags (delivered frames dropped)."""
    syncs, datapaths, _, _ = build_hosts(max_flows=count + 1)
    frames = syn_frames(count)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for index, frame in enumerate(frames):
        datapaths["h1"].receive(1, frame)
        if index % 1000 == 999:  # frames delivered are the benchmark's, not state
            datapaths["h2"].take(2)
            datapaths["h2"].deliveries.clear()
    datapaths["h2"].take(2)
    datapaths["h2"].deliveries.clear()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    entries = len(syncs["h2"].conntrack) + len(syncs["h2"].nat)
    if len(datapaths["h1"].flow_table) != count or entries != 2 * count:
        raise SystemExit(f"{count} connections did not all hold a flow and 2 entries: invalid")
    return (after - before) / count


def memory_mode(sizes: list[int], baseline_src: str | None) -> None:
    rows: dict[str, dict[int, float]] = {"this": {}}
    if baseline_src:
        rows["baseline"] = {}
    for size in sizes:
        rows["this"][size] = round(memory_only(size), 1)
        if baseline_src:
            env = dict(os.environ, PYTHONPATH=os.path.join(baseline_src, "src"))
            out = subprocess.run(
                [sys.executable, __file__, "--memory-one", str(size)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            rows["baseline"][size] = float(out.strip().splitlines()[-1])
    print(
        f"{'bytes per connection (2 agents, tables+flows+tags)':<52} "
        + "".join(f"{size:>12,}" for size in sizes)
    )
    print("-" * (53 + 12 * len(sizes)))
    for name, values in rows.items():
        print(f"{name:<52} " + "".join(f"{values[size]:>12,.1f}" for size in sizes))
    ratios = {}
    if baseline_src:
        ratios = {size: round(rows["this"][size] / rows["baseline"][size], 3) for size in sizes}
        print(f"{'this / baseline':<52} " + "".join(f"{ratios[size]:>12.3f}" for size in sizes))
    print(
        json.dumps(
            {
                "bench": "flowstate_memory",
                "python": platform.python_version(),
                "bytes_per_connection": {name: values for name, values in rows.items()},
                "this_vs_baseline": ratios,
            },
            separators=(",", ":"),
        )
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-one":  # the baseline's subprocess
        print(memory_only(int(sys.argv[2])))
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
    parser.add_argument("--baseline-src", metavar="DIR", help="memory mode: checkout to compare")
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
        memory_mode(sizes, args.baseline_src)
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
                f"same, this tree, batches of {BATCH} upcalls",
                f"{against['batched_per_second']:,.0f}",
            ),
            ("this tree / base (one at a time)", f"{against['ratio']:.2f}"),
            (f"this tree / base (batches of {BATCH})", f"{against['batched_ratio']:.2f}"),
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
