"""Observability benchmark: what the traffic counters cost on the forwarding path, and how
long a trace takes.

Counters (agent/metrics.py): the same host (one of four, the reference topology of
bench/simulation.py with fewer VMs: two bridges, a router, 50-rule chains on every port)
forwards through `FlowPipeline` over the memory datapath, with and without `HostStats`
hooked in, in alternating rounds (medians reported):
- upcall path: packets handed to the pipeline as misses (each one simulated, installed);
- fast path: packets hitting installed flows (the counters add no code there; measured
  anyway, so the ratio shows the noise floor);
- scan: `HostStats.scan()` (accounting the queued upcalls, then the installed flows' hits),
  as a fraction of one core at the agent's 2 s interval.
Peer in the same run: the same forwarding without counters (ratio = with / without).

Trace latency: `POST /v1/traces` through the API app (in-process ASGI client, memory store),
cold (the snapshot of the store is built), warm (cached per store revision) and after a
non-topology write (as agents publish stats: tables and liveness read again, the topology view
reused); and the
simulation alone (`trace_simulation` on a ready view, what an agent-side trace would cost
before any transport).

Prints a table, then exactly one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastapi.testclient import TestClient

import simulation  # bench/simulation.py: the reference topology
from hivenet.agent.metrics import HostStats
from hivenet.agent.pipeline import FlowPipeline
from hivenet.api import create_app
from hivenet.datapath.memory import MemoryDatapath, MemoryUnderlay
from hivenet.model.topology import encode, topology_key
from hivenet.sim import SimContext, TopologyView
from hivenet.sim.tracing import TraceSpec, build_trace_frame, resolve_spec, trace_simulation
from hivenet.store.keys import host_stats_key

ROUNDS = 7
NEW_FLOWS = 1500
HITS = 30_000


def build(
    reference: simulation.Reference, with_counters: bool
) -> tuple[MemoryDatapath, FlowPipeline, HostStats]:
    view = TopologyView.from_objects(reference.objects)
    tables = simulation.warm_tables(reference)
    underlay = MemoryUnderlay()
    datapaths = {
        host: MemoryDatapath(host, f"192.0.2.{index}", underlay)
        for index, host in enumerate(simulation.HOSTS, 1)
    }
    for port in view.ports.values():
        if port.host_id and port.port.interface_name:
            datapaths[port.host_id].bind_port(port.tunnel_key, port.port.interface_name)
    datapath = datapaths["h1"]
    stats = HostStats("h1", view, datapath.flows)
    pipeline = FlowPipeline(
        "h1",
        datapath,
        view,
        tables,
        on_simulated=stats.on_simulated if with_counters else None,
    )
    return datapath, pipeline, stats


def workload(reference: simulation.Reference) -> list[tuple[int, bytes]]:
    view = TopologyView.from_objects(reference.objects)
    local = [i for i, vm in enumerate(reference.vms) if view.ports[vm[0]].host_id == "h1"]
    frames: list[tuple[int, bytes]] = []
    for n in range(NEW_FLOWS):
        client = local[n % len(local)]
        server = (client + 1 + n) % len(reference.vms)
        if server == client:
            server = (server + 1) % len(reference.vms)
        port_id, frame = simulation.connection_frame(reference, client, server, 20000 + n, 80)
        frames.append((view.ports[port_id].tunnel_key, frame))
    return frames


def forwarding_round(
    reference: simulation.Reference, frames: list[tuple[int, bytes]], with_counters: bool
) -> tuple[float, float, float, int]:
    """(new flows/s, hits/s, scan seconds, flows) of one round."""
    datapath, pipeline, stats = build(reference, with_counters)
    started = time.perf_counter()
    for key, frame in frames:
        pipeline.handle_upcall(key, frame)  # every packet simulated (as a miss would be)
    upcall_rate = len(frames) / (time.perf_counter() - started)
    hit_frames = [frames[i % len(frames)] for i in range(HITS)]
    started = time.perf_counter()
    for key, frame in hit_frames:
        datapath.receive(key, frame)
    hit_rate = HITS / (time.perf_counter() - started)
    started = time.perf_counter()
    stats.scan()
    scan_seconds = time.perf_counter() - started
    return upcall_rate, hit_rate, scan_seconds, len(datapath.flow_table)


def measure_counters(reference: simulation.Reference) -> dict[str, float]:
    frames = workload(reference)
    results: dict[bool, list[tuple[float, float, float, int]]] = {False: [], True: []}
    for index in range(ROUNDS):
        for with_counters in (False, True) if index % 2 else (True, False):
            results[with_counters].append(forwarding_round(reference, frames, with_counters))
    off, on = results[False], results[True]
    # The hook's own cost, timed alone over the very results the pipeline produced.
    datapath, pipeline, _ = build(reference, False)
    simulated = []
    for key, frame in frames:
        pipeline.handle_upcall(key, frame)
        result = pipeline.last_result
        port = pipeline.topology.port_by_key(key)
        assert result is not None and port is not None
        simulated.append((port.id, result, len(frame), (result.masked_match, result.mask)))
    stats = HostStats("h1", pipeline.topology, datapath.flows)
    started = time.perf_counter()
    for port_id, result, size, installed in simulated:
        stats.on_simulated(port_id, result, size, installed)
    hook_seconds = (time.perf_counter() - started) / len(simulated)

    def median(rows: list[tuple[float, float, float, int]], index: int) -> float:
        return statistics.median(row[index] for row in rows)

    return {
        "upcall_rate_without": median(off, 0),
        "upcall_rate_with": median(on, 0),
        "upcall_ratio": median(on, 0) / median(off, 0),
        "hit_rate_without": median(off, 1),
        "hit_rate_with": median(on, 1),
        "hit_ratio": median(on, 1) / median(off, 1),
        "hook_us_per_upcall": hook_seconds * 1e6,
        "hook_fraction_of_upcall": hook_seconds * median(off, 0),
        "scan_seconds": median(on, 2),
        "scan_flows": median(on, 3),
        "scan_core_fraction_at_2s": median(on, 2) / 2.0,
    }


def measure_trace(reference: simulation.Reference) -> dict[str, float]:
    view = TopologyView.from_objects(reference.objects)
    tables = simulation.warm_tables(reference)
    client, server = reference.vms[0], reference.vms[-1]
    spec = resolve_spec(view, client[0], TraceSpec(ip_dst=server[2], dst_port=80))
    frame = build_trace_frame(spec)
    context = SimContext(topology=view, tables=tables, local_host_id="h1")
    samples = []
    for _ in range(200):
        started = time.perf_counter()
        trace_simulation(frame, client[0], context, 0.0)
        samples.append(time.perf_counter() - started)
    simulate_ms = statistics.median(samples) * 1000

    with tempfile.TemporaryDirectory() as state_dir:
        app = create_app("memory://", Path(state_dir))
        with TestClient(app) as http:
            token = (Path(state_dir) / "admin-token").read_text().strip()

            async def load() -> None:
                # Raw puts (no reference bookkeeping): the trace reads only the objects.
                store = await app.state.store_holder.store()
                for obj in reference.objects:
                    await store.put(topology_key(obj.KIND, obj.id), encode(obj))

            http.portal.call(load)  # type: ignore[union-attr]
            headers = {"Authorization": f"Bearer {token}"}
            body = {"from_port": client[0], "ip_dst": server[2], "dst_port": 80}
            started = time.perf_counter()
            first = http.post("/v1/traces", json=body, headers=headers)
            cold_ms = (time.perf_counter() - started) * 1000
            assert first.status_code == 200, first.text
            warm = []
            for _ in range(100):
                started = time.perf_counter()
                response = http.post("/v1/traces", json=body, headers=headers)
                warm.append(time.perf_counter() - started)
                assert response.status_code == 200

            async def publish_stats(index: int) -> None:  # as agents do every 2 s
                store = await app.state.store_holder.store()
                await store.put(host_stats_key("h2"), str(index).encode())

            busy = []
            for index in range(50):
                http.portal.call(publish_stats, index)  # type: ignore[union-attr]
                started = time.perf_counter()
                response = http.post("/v1/traces", json=body, headers=headers)
                busy.append(time.perf_counter() - started)
                assert response.status_code == 200
    return {
        "trace_simulate_ms": simulate_ms,
        "trace_api_cold_ms": cold_ms,
        "trace_api_warm_ms": statistics.median(warm) * 1000,
        "trace_api_warm_p90_ms": sorted(warm)[int(len(warm) * 0.9)] * 1000,
        "trace_api_busy_ms": statistics.median(busy) * 1000,
        "objects": len(reference.objects),
    }


def main() -> None:
    simulation.VMS_PER_BRIDGE = 12
    reference = simulation.reference_topology()
    counters = measure_counters(reference)
    trace = asyncio.run(asyncio.to_thread(measure_trace, reference))
    print(f"reference: {trace['objects']:.0f} topology objects (2 bridges, router, 50-rule chains)")
    print(f"{'measure':<44}{'without':>12}{'with':>12}{'ratio':>8}")
    print(
        f"{'upcall path (new flows/s)':<44}{counters['upcall_rate_without']:>12.0f}"
        f"{counters['upcall_rate_with']:>12.0f}{counters['upcall_ratio']:>8.3f}"
    )
    print(
        f"{'fast path (flow hits/s, memory datapath)':<44}{counters['hit_rate_without']:>12.0f}"
        f"{counters['hit_rate_with']:>12.0f}{counters['hit_ratio']:>8.3f}"
    )
    print(
        f"counter hook alone: {counters['hook_us_per_upcall']:.1f} us per upcall = "
        f"{counters['hook_fraction_of_upcall'] * 100:.2f}% of an upcall's time"
    )
    print(
        f"scan ({NEW_FLOWS} queued upcalls, {counters['scan_flows']:.0f} flows): {counters['scan_seconds'] * 1000:.2f} ms "
        f"({counters['scan_core_fraction_at_2s'] * 100:.3f}% of a core at a 2 s interval)"
    )
    print(
        f"trace: simulate {trace['trace_simulate_ms']:.2f} ms; API cold "
        f"{trace['trace_api_cold_ms']:.1f} ms, warm {trace['trace_api_warm_ms']:.2f} ms "
        f"(p90 {trace['trace_api_warm_p90_ms']:.2f} ms); after a non-topology write "
        f"{trace['trace_api_busy_ms']:.1f} ms"
    )
    print(json.dumps({"benchmark": "trace", **counters, **trace}, sort_keys=True))


if __name__ == "__main__":
    main()
