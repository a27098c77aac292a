"""Simulation benchmark: new-flow simulations per second on one core, megaflow hit rate for a
realistic traffic mix, and where the time goes (cProfile).

Reference topology: two bridges joined by a router, VMs on four hosts, and a 50-rule chain on
every port in both directions (VM ports and both ends of the interior links), so a routed
flow crosses six 50-rule chains. Rules look like security-group rules (protocol, destination
port, source prefix); each chain ends with an accept so every rule is evaluated.

Peer measured in the same run: the slow reference evaluator of the same rules
(`sim.rules.rule_matches_reference`, the oracle the tests check the compiled matcher against)
walking the same 50-rule chains for the same packets; the table prints the compiled
matcher's rate as a ratio to it. Whole-simulation rates are printed as measured (no constant
target): compare runs of this script on the same machine, not against a number in a file.

Peer engine, in the same run: the previous release's code (`--base`, default the git
revision `main`, unpacked by `bench/baseline.py`) runs the same measurement on the same
packets (the same seeded topology and work list), as does this tree, each in a child
process, alternating `--rounds` times; medians and their ratio are printed
(`engine_vs_base`); both sides first simulate the whole work list once, so the rate is that
of compiled chains (a chain's matcher is compiled on its first packet since e876180; before,
at view build), with first-packet latency through the agent (`FlowPipeline` on memory
datapaths, four hosts: upcall -> simulation -> flow install -> execute; only packets that
missed every flow counted) as p50/p99 for both. The child runs time CPU time of their own
process (`bench/baseline.py`), not the wall clock of a shared machine.

Usage: `python bench/simulation.py [--base REV] [--rounds N]` (`--base ''`: no base).
Prints a table, then exactly one JSON line.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import ipaddress
import json
import pstats
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hivenet.flows.table import FlowTable
from hivenet.model import (
    Bridge,
    Chain,
    DeviceKind,
    Port,
    PortRange,
    Router,
    Rule,
    RuleAction,
    TopologyObject,
    TunnelZone,
    TunnelZoneMember,
)
from hivenet.model.types import int_to_mac
from hivenet.packets import build_tcp_segment, extract_flow_match
from hivenet.packets.flowmatch import FIELD_NAMES, FlowMatch
from hivenet.sim import MemoryTables, SimContext, TopologyView, simulate
from hivenet.sim.rules import compile_chain, rule_matches_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline

HOSTS = ("h1", "h2", "h3", "h4")
VMS_PER_BRIDGE = 150
RULES_PER_CHAIN = 50
SERVICE_PORTS = (22, 80, 443, 5432, 6379, 8080)


def mac(n: int) -> str:
    return int_to_mac((0x02 << 40) | n)


@dataclass
class Reference:
    objects: list[TopologyObject]
    vms: list[tuple[str, str, str, int]]  # (port id, bridge, ip, mac int)
    router_macs: dict[str, int]


def security_chain(chain_id: str, rng: random.Random) -> list[TopologyObject]:
    objects: list[TopologyObject] = [Chain(id=chain_id, name=chain_id)]
    for position in range(RULES_PER_CHAIN - 1):
        # Allow rules for services/prefixes the benchmark traffic does not use, so that
        # every packet walks the whole chain (the worst case) before the final accept.
        objects.append(
            Rule(
                chain_id=chain_id,
                position=position,
                action=rng.choice([RuleAction.ACCEPT, RuleAction.DROP]),
                nw_proto=rng.choice([6, 17]),
                tp_dst=PortRange(start=9000 + position, end=9000 + position),
                nw_src=ipaddress.ip_network(f"172.{16 + position % 16}.0.0/16"),
            )
        )
    objects.append(Rule(chain_id=chain_id, position=RULES_PER_CHAIN, action=RuleAction.ACCEPT))
    return objects


def reference_topology() -> Reference:
    rng = random.Random(7)
    objects: list[TopologyObject] = [
        TunnelZone(
            id="tz",
            members=tuple(
                TunnelZoneMember(host_id=h, underlay_ip=ipaddress.ip_address(f"192.0.2.{i}"))
                for i, h in enumerate(HOSTS, 1)
            ),
        ),
        Bridge(id="b1"),
        Bridge(id="b2"),
        Router(id="r1"),
    ]
    key = 0

    def chains_for(port_id: str) -> dict[str, str]:
        objects.extend(security_chain(f"{port_id}-in", rng))
        objects.extend(security_chain(f"{port_id}-out", rng))
        return {"inbound_chain_id": f"{port_id}-in", "outbound_chain_id": f"{port_id}-out"}

    router_macs: dict[str, int] = {}
    for subnet, bridge in ((1, "b1"), (2, "b2")):
        key += 1
        router_port = f"r1-{bridge}"
        router_macs[bridge] = (0x02 << 40) | (0xFF00 + subnet)
        objects.append(
            Port(
                id=router_port,
                device_kind=DeviceKind.ROUTER,
                device_id="r1",
                mac=int_to_mac(router_macs[bridge]),
                addresses=(ipaddress.ip_interface(f"10.0.{subnet}.1/24"),),
                peer_id=f"{bridge}-r1",
                tunnel_key=key,
                **chains_for(router_port),
            )
        )
        key += 1
        objects.append(
            Port(
                id=f"{bridge}-r1",
                device_kind=DeviceKind.BRIDGE,
                device_id=bridge,
                peer_id=router_port,
                tunnel_key=key,
                **chains_for(f"{bridge}-r1"),
            )
        )
    vms: list[tuple[str, str, str, int]] = []
    for subnet, bridge in ((1, "b1"), (2, "b2")):
        for index in range(VMS_PER_BRIDGE):
            key += 1
            port_id = f"vm-{bridge}-{index}"
            mac_int = (0x02 << 40) | key
            objects.append(
                Port(
                    id=port_id,
                    device_kind=DeviceKind.BRIDGE,
                    device_id=bridge,
                    mac=int_to_mac(mac_int),
                    addresses=(ipaddress.ip_interface(f"10.0.{subnet}.{10 + index}/24"),),
                    host_id=HOSTS[index % len(HOSTS)],
                    interface_name=f"hn{key}",
                    tunnel_key=key,
                    **chains_for(port_id),
                )
            )
            vms.append((port_id, bridge, f"10.0.{subnet}.{10 + index}", mac_int))
    return Reference(objects, vms, router_macs)


def warm_tables(reference: Reference) -> MemoryTables:
    """Steady state: every VM MAC learned, every VM IP resolved by the router."""
    tables = MemoryTables()
    for port_id, bridge, ip, mac_int in reference.vms:
        tables.macs[(bridge, 0, mac_int)] = port_id
        tables.neighbours[("r1", 4, int(ipaddress.IPv4Address(ip)))] = mac_int
    return tables


def connection_frame(
    reference: Reference, client: int, server: int, sport: int, dport: int
) -> tuple[str, bytes]:
    port_id, bridge, ip, mac_int = reference.vms[client]
    _, server_bridge, server_ip, server_mac = reference.vms[server]
    dst_mac = server_mac if bridge == server_bridge else reference.router_macs[bridge]
    frame = build_tcp_segment(
        eth_src=mac_int,
        eth_dst=dst_mac,
        ip_src=ip,
        ip_dst=server_ip,
        src_port=sport,
        dst_port=dport,
    )
    return port_id, frame


def measure_throughput(
    view: TopologyView, tables: MemoryTables, work: list[tuple[str, bytes, FlowMatch]]
) -> tuple[float, float, int]:
    contexts = {h: SimContext(topology=view, tables=tables, local_host_id=h) for h in HOSTS}
    host_of = {p.id: p.host_id for p in view.ports.values() if p.host_id}
    routed = 0
    started = time.perf_counter()
    for port_id, frame, match in work:
        result = simulate(frame, port_id, contexts[host_of[port_id] or "h1"], 0.0, match=match)
        routed += any(type(a).__name__ == "DecTtl" for a in result.actions)
    with_match = len(work) / (time.perf_counter() - started)
    started = time.perf_counter()
    for port_id, frame, _ in work:
        simulate(frame, port_id, contexts[host_of[port_id] or "h1"], 0.0)
    with_parse = len(work) / (time.perf_counter() - started)
    return with_match, with_parse, routed


def measure_chain_peer(
    reference: Reference, work: list[tuple[str, bytes, FlowMatch]]
) -> dict[str, float]:
    """Chain evaluations/s of one 50-rule chain for the benchmark's packets: the compiled
    matcher against the reference evaluator (the peer), same rules, same packets, same
    verdicts (checked)."""
    chain_id = reference.vms[0][0] + "-in"
    rules = [o for o in reference.objects if isinstance(o, Rule) and o.chain_id == chain_id]
    compiled = compile_chain(chain_id, chain_id, rules, {})
    ordered = [r.rule for r in compiled.rules]
    matches = [match for _, _, match in work]
    values = [{name: getattr(m, name) for name in FIELD_NAMES} for m in matches]

    def reference_verdict(packet_values: dict[str, int]) -> int:
        for index, rule in enumerate(ordered):
            if rule_matches_reference(rule, packet_values, None, None, (), {}):
                return index
        return -1

    started = time.perf_counter()
    compiled_verdicts = [compiled.matcher(m, 0, None, None, frozenset()) for m in matches]
    compiled_rate = len(matches) / (time.perf_counter() - started)
    sample = values[:1000]
    started = time.perf_counter()
    reference_verdicts = [reference_verdict(v) for v in sample]
    reference_rate = len(sample) / (time.perf_counter() - started)
    if reference_verdicts != compiled_verdicts[: len(sample)]:
        raise SystemExit("compiled chain and reference evaluator disagree: benchmark invalid")
    return {
        "compiled_per_second": compiled_rate,
        "reference_per_second": reference_rate,
        "ratio": compiled_rate / reference_rate,
    }


def measure_hit_rate(reference: Reference, view: TopologyView, packets: int) -> dict[str, float]:
    """A realistic mix: clients open connections to a few services on a few hundred VMs,
    each connection sends several packets; one megaflow table per host."""
    rng = random.Random(11)
    tables = warm_tables(reference)
    host_of = {p.id: p.host_id or "h1" for p in view.ports.values()}
    contexts = {h: SimContext(topology=view, tables=tables, local_host_id=h) for h in HOSTS}
    flow_tables = {h: FlowTable() for h in HOSTS}
    servers = rng.sample(range(len(reference.vms)), 40)
    hits = misses = sent = 0
    while sent < packets:
        client = rng.randrange(len(reference.vms))
        server = rng.choice(servers)
        if server == client:
            continue
        sport = rng.randrange(32768, 61000)
        dport = SERVICE_PORTS[server % len(SERVICE_PORTS)]
        port_id, frame = connection_frame(reference, client, server, sport, dport)
        match = extract_flow_match(frame, view.ports[port_id].tunnel_key)
        host = host_of[port_id]
        for _ in range(rng.randint(1, 12)):  # packets of this connection
            sent += 1
            if flow_tables[host].lookup(match, 0.0) is not None:
                hits += 1
                continue
            misses += 1
            result = simulate(frame, port_id, contexts[host], 0.0, match=match)
            if result.install:
                flow_tables[host].install(
                    result.masked_match, result.mask, result.actions, result.tags, 0.0
                )
    return {
        "packets": sent,
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / sent,
        "flows": sum(len(t) for t in flow_tables.values()),
    }


# Run in a child process by both this tree and the base revision (`bench` is that tree's
# copy of this module): only names both have are used, so the work is the same packets.
ENGINE_CHILD = """
import statistics, time
from hivenet.agent.pipeline import FlowPipeline
from hivenet.datapath.memory import MemoryDatapath, MemoryUnderlay
reference = bench.reference_topology()
view = bench.TopologyView.from_objects(reference.objects)
rng = bench.random.Random(3)
work = []
for _ in range(COUNT):
    client, server = rng.sample(range(len(reference.vms)), 2)
    port_id, frame = bench.connection_frame(
        reference, client, server, rng.randrange(32768, 61000), rng.choice(bench.SERVICE_PORTS)
    )
    work.append((port_id, frame, bench.extract_flow_match(frame, view.ports[port_id].tunnel_key)))
tables = bench.warm_tables(reference)
bench.measure_throughput(view, tables, work)  # every chain the work reaches compiled
with_match, with_parse, _ = bench.measure_throughput(view, tables, work)
underlay = MemoryUnderlay()
datapaths = {}
for index, host in enumerate(bench.HOSTS, 1):
    datapaths[host] = MemoryDatapath(host, f"192.0.2.{index}", underlay)
    FlowPipeline(host, datapaths[host], view, bench.warm_tables(reference))
for port in view.ports.values():
    if port.host_id:
        datapaths[port.host_id].bind_port(port.tunnel_key, f"hn{port.tunnel_key}")
samples = []
for port_id, frame, _ in work:
    port = view.ports[port_id]
    datapath = datapaths[port.host_id]
    misses = datapath.counters()["misses"]
    started = time.perf_counter()
    datapath.receive(port.tunnel_key, frame)
    elapsed = time.perf_counter() - started
    if datapath.counters()["misses"] == misses + 1:
        samples.append(elapsed)
samples.sort()
print(json.dumps({
    "with_match": with_match,
    "with_parse": with_parse,
    "first_packets": len(samples),
    "p50_us": samples[len(samples) // 2] * 1e6,
    "p99_us": samples[min(len(samples) - 1, len(samples) * 99 // 100)] * 1e6,
}))
"""


def engine_vs_base(base: str, rounds: int, count: int = 5000) -> dict[str, object]:
    """This tree's engine against `base`'s on the same packets: simulations/s (median of
    `rounds` alternating child runs each) and first-packet latency through the agent."""
    snippet = ENGINE_CHILD.replace("COUNT", str(count))
    trees = {"current": baseline.current_tree(), "base": baseline.checkout(base)}
    runs: dict[str, list[dict[str, float]]] = {"current": [], "base": []}
    for _ in range(rounds):
        for side in ("base", "current"):
            runs[side].append(baseline.run(trees[side], "simulation", snippet))  # type: ignore[arg-type]
    out: dict[str, object] = {
        "base": base,
        "base_commit": baseline.describe(base),
        "rounds": rounds,
    }
    for side in ("current", "base"):
        for name in ("with_match", "with_parse", "p50_us", "p99_us"):
            out[f"{side}_{name}"] = round(statistics.median(r[name] for r in runs[side]), 1)
        out[f"{side}_first_packets"] = min(r["first_packets"] for r in runs[side])
    out["ratio"] = round(out["current_with_match"] / out["base_with_match"], 3)  # type: ignore[operator]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--base",
        default="main",
        metavar="REV",
        help="git revision whose engine is the peer (default main; '' for none)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side vs --base")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    against = engine_vs_base(args.base, args.rounds) if args.base else None
    reference = reference_topology()
    started = time.perf_counter()
    view = TopologyView.from_objects(reference.objects)
    build_seconds = time.perf_counter() - started
    tables = warm_tables(reference)
    rng = random.Random(3)
    work: list[tuple[str, bytes, FlowMatch]] = []
    for _ in range(5000):
        client, server = rng.sample(range(len(reference.vms)), 2)
        port_id, frame = connection_frame(
            reference, client, server, rng.randrange(32768, 61000), rng.choice(SERVICE_PORTS)
        )
        work.append((port_id, frame, extract_flow_match(frame, view.ports[port_id].tunnel_key)))
    measure_throughput(view, tables, work)  # warm up: every chain the work reaches compiled
    with_match, with_parse, routed = measure_throughput(view, tables, work)
    hit = measure_hit_rate(reference, view, 60_000)
    chain_peer = measure_chain_peer(reference, work)

    profiler = cProfile.Profile()
    contexts = {h: SimContext(topology=view, tables=tables, local_host_id=h) for h in HOSTS}
    host_of = {p.id: p.host_id or "h1" for p in view.ports.values()}
    profiler.enable()
    for port_id, frame, match in work[:2000]:
        simulate(frame, port_id, contexts[host_of[port_id]], 0.0, match=match)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(12)
    profile_lines = [
        line for line in stream.getvalue().splitlines() if line.strip() and "/" in line
    ][:12]

    rules = sum(1 for o in reference.objects if isinstance(o, Rule))
    some_rule = next(o for o in reference.objects if isinstance(o, Rule))
    started = time.perf_counter()
    for position in range(20):
        view.apply(some_rule.model_copy(update={"position": position}))
    rule_update_ms = (time.perf_counter() - started) / 20 * 1000
    rows = [
        ("topology", f"2 bridges, 1 router, {len(reference.vms)} VMs on {len(HOSTS)} hosts"),
        ("rules", f"{rules} ({RULES_PER_CHAIN} per chain, in+out on every port)"),
        ("view build (snapshot via apply_all)", f"{build_seconds:.2f} s"),
        ("one rule change (recompile its chain)", f"{rule_update_ms:.2f} ms"),
        ("new-flow simulations/s (match given)", f"{with_match:,.0f}"),
        ("new-flow simulations/s (incl. parse)", f"{with_parse:,.0f}"),
        ("routed share of the sample", f"{routed / len(work):.0%}"),
        ("50-rule chain evals/s, compiled", f"{chain_peer['compiled_per_second']:,.0f}"),
        ("50-rule chain evals/s, reference (peer)", f"{chain_peer['reference_per_second']:,.0f}"),
        ("compiled / reference", f"{chain_peer['ratio']:.1f}x"),
        ("megaflow hit rate (mix)", f"{hit['hit_rate']:.1%} of {hit['packets']:,} packets"),
        ("megaflows installed", f"{hit['flows']:,}"),
    ]
    if against is not None:
        base_name = f"{against['base']} ({against['base_commit']})"
        rows += [
            ("engine, this tree (child runs, median)", f"{against['current_with_match']:,.0f}/s"),
            (f"engine, {base_name} (peer)", f"{against['base_with_match']:,.0f}/s"),
            ("this tree / base", f"{against['ratio']:.2f}x"),
            (
                "first packet via agent p50/p99, this tree",
                f"{against['current_p50_us']:.0f} / {against['current_p99_us']:.0f} us",
            ),
            (
                f"first packet via agent p50/p99, {against['base']}",
                f"{against['base_p50_us']:.0f} / {against['base_p99_us']:.0f} us",
            ),
        ]
    width = max(len(name) for name, _ in rows)
    print("HiveNet simulation benchmark (one core)")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print("  cProfile, top functions by own time (2000 simulations):")
    print("    ncalls  tottime  percall  cumtime  percall  function")
    for line in profile_lines:
        print(f"    {line.strip()}")
    print(
        json.dumps(
            {
                "bench": "simulation",
                "simulations_per_second": round(with_match),
                "simulations_per_second_with_parse": round(with_parse),
                "chain_compiled_per_second": round(chain_peer["compiled_per_second"]),
                "chain_reference_per_second": round(chain_peer["reference_per_second"]),
                "chain_compiled_vs_reference": round(chain_peer["ratio"], 2),
                "routed_share": round(routed / len(work), 3),
                "rules_per_chain": RULES_PER_CHAIN,
                "vms": len(reference.vms),
                "megaflow_hit_rate": round(hit["hit_rate"], 4),
                "megaflow_packets": hit["packets"],
                "megaflows": hit["flows"],
                "view_build_seconds": round(build_seconds, 3),
                "rule_update_ms": round(rule_update_ms, 3),
                "engine_vs_base": against,
            }
        )
    )


if __name__ == "__main__":
    main()
