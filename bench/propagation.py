"""How fast does a change reach every agent, and what does an agent cost?

Measures, in one run:
- propagation: time from an API-level write (TopologyRepository txn committed) to every agent
  having applied it to its TopologyView, p50/p99 over (write, agent) pairs and for the last
  agent of each write; for 3 real agent processes on a sqlite file, and for 100 and 1000
  lightweight in-process agents (HostAgent + memory datapath) sharing one store;
  with --etcd also on a local 3-member etcd cluster (needs /usr/bin/etcd);
- agent cache load time and memory for a topology of 10k ports;
- CPU of an idle agent (process CPU seconds per wall second while nothing changes).
Peer measured in the same run: for each in-process agent count, the same writes observed by
as many bare store watches (a `Store.watch` on the key, nothing applied): the store's own
delivery time. The table prints the agents' figures as a ratio to it, so the cost of the
agent (decode, TopologyView update, invalidation) is separated from the store's. With
`--base REV ...`, the in-process agents also with the code of those git revisions (this
module copied into each tree).
Clocks: the in-process rows run each in a child process (`bench/baseline.py`) whose clock is
the process's CPU time (the machine is shared; all agents are in that one process); the
3-process row is wall time. Writes start once the agents' start-up writes are done (see
`settle`).

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import baseline
from hivenet.agent.agent import HostAgent
from hivenet.datapath.memory import MemoryDatapath
from hivenet.model import Bridge, DeviceKind, Host, Port, encode, topology_key
from hivenet.store import open_store
from hivenet.store.base import Store
from hivenet.store.topology import TopologyRepository

LEASE_TTL = 300  # in-process agents (see `in_process`)


def _renamer(k: int) -> Callable[[Bridge], Bridge]:
    def rename(bridge: Bridge) -> Bridge:
        return bridge.model_copy(update={"name": f"marker-{k}"})

    return rename


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Probe:
    """Records when each agent applies the marker bridge's k-th rename."""

    def __init__(self) -> None:
        self.applied: dict[int, list[float]] = {}

    def watch(self, agent: HostAgent, marker_key: str) -> None:
        original = agent._on_topology_change
        marker_id = marker_key.rsplit("/", 1)[1]

        def on_change(key: str, value: bytes | None, revision: int) -> None:
            original(key, value, revision)
            if key == marker_key and value is not None:
                # Applied: the agent's compiled view has the new name (read from it, so the
                # probe adds no decoding of its own to each agent's work).
                info = agent.topology.bridges.get(marker_id)
                name = info.name if info is not None else ""
                if name.startswith("marker-") and name != "marker-start":
                    self.applied.setdefault(int(name[7:]), []).append(time.perf_counter())

        agent.topology_mirror._on_change = on_change


async def in_process(
    store_url: str, agents_count: int, writes: int, gc_threshold: int = 0
) -> dict[str, float]:
    """`gc_threshold`: the cyclic GC's generation-0 threshold during the writes (0: the
    interpreter's, 700), to show what the collections cost: in one heap holding 1000
    agents a young collection took ~4 ms of CPU and a generation-1 one ~40 ms, ~50 ms per
    write together, where each agent's own process would collect its own small heap."""
    store = open_store(store_url)
    repo = TopologyRepository(store)
    marker = (await repo.create(Bridge(name="marker-start"))).obj
    marker_key = topology_key("bridge", marker.id)
    probe = Probe()
    agents = []
    for index in range(agents_count):
        host_id = f"hn-bench-{index}"
        # A lease that outlives the start-up: 1000 agents starting on one shared core took
        # longer than a 30 s lease on a loaded machine, every lease expired, and the
        # re-registration storm (1000 writes, each seen by 1000 agents) landed in the
        # measured writes. One agent per process starts in a fraction of that.
        agent = HostAgent(
            store, MemoryDatapath(host_id, "192.0.2.1"), host_id=host_id, lease_ttl=LEASE_TTL
        )
        probe.watch(agent, marker_key)
        agents.append(agent)
    started = time.perf_counter()
    await asyncio.gather(*(a.start(load_timeout=300) for a in agents))
    startup = time.perf_counter() - started
    if startup > LEASE_TTL / 2:
        print(f"warning: {agents_count} agents took {startup:.0f} s to start", file=sys.stderr)
    quiet = await settle(store, agents)
    # As each agent process does once started (agent/cli.py): the loaded state is moved out
    # of the cyclic GC's generations. Here one heap holds every agent's, so a full collection
    # walked 1000 agents' views in one pause (1.1 s measured), where an agent's own process
    # would walk one.
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    if gc_threshold:
        gc.set_threshold(gc_threshold, *thresholds[1:])
    latencies: list[float] = []
    last_agent: list[float] = []
    for k in range(writes):
        written = time.perf_counter()
        await repo.modify(Bridge, marker.id, _renamer(k))
        committed = time.perf_counter()
        deadline = committed + 30
        while len(probe.applied.get(k, ())) < agents_count and time.perf_counter() < deadline:
            await asyncio.sleep(0.0005)
        times = probe.applied.get(k, [])
        if len(times) < agents_count:
            raise RuntimeError(f"write {k}: only {len(times)}/{agents_count} agents applied it")
        latencies.extend(t - written for t in times)
        last_agent.append(max(times) - written)
    for agent in agents:
        await agent.stop(graceful=False)
    await store.close()
    gc.set_threshold(*thresholds)
    gc.unfreeze()
    return {
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "all_p50_ms": percentile(last_agent, 0.5) * 1000,
        "all_p99_ms": percentile(last_agent, 0.99) * 1000,
        "startup_s": startup,
        "settle_s": quiet,
    }


async def settle(store: Store, agents: list[HostAgent], quiet_for: float = 1.0) -> float:
    """Wait until the agents' start-up writes are done: each has published its first traffic
    report (`HostStatsReporter`, 2 s after its start) and the store's revision has not moved
    for `quiet_for` seconds. Without it the first writes were measured while the last of 1000
    agents' first reports (each seen by all 1000 state watches) were still landing: ~100 of
    them during 30 writes, each a burst of 1000 wake-ups in front of the marker's. Returns
    the seconds waited."""
    started = time.monotonic()  # wall time: `perf_counter` is CPU time in a --base child
    deadline = started + LEASE_TTL / 4
    revision, since = -1, started
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        current = await store.current_revision()
        if current != revision:
            revision, since = current, time.monotonic()
            continue
        published = all(_start_writes_done(a) for a in agents)
        if published and time.monotonic() - since >= quiet_for:
            return time.monotonic() - started
    raise RuntimeError(f"the store did not go quiet in {LEASE_TTL / 4:.0f} s after start-up")


def _start_writes_done(agent: HostAgent) -> bool:
    reporter = getattr(agent, "host_stats_reporter", None)  # older revisions: none
    first_report = reporter is None or reporter._published is not None
    return first_report and not getattr(agent, "_to_publish", None)


async def bare_watches(store_url: str, watchers: int, writes: int) -> dict[str, float]:
    """The peer: the same writes seen by `watchers` plain store watches on the marker key."""
    store = open_store(store_url)
    repo = TopologyRepository(store)
    marker = (await repo.create(Bridge(name="marker-start"))).obj
    marker_key = topology_key("bridge", marker.id)
    start_revision = await store.current_revision() + 1
    seen: dict[int, list[float]] = {}

    async def watch() -> None:
        async for event in store.watch(marker_key, start_revision=start_revision):
            name = json.loads(event.kv.value)["name"] if event.kv.value else ""
            if name.startswith("marker-") and name != "marker-start":
                seen.setdefault(int(name[7:]), []).append(time.perf_counter())

    tasks = [asyncio.create_task(watch()) for _ in range(watchers)]
    await asyncio.sleep(0.2)  # every watch registered before the first write
    latencies: list[float] = []
    last_watcher: list[float] = []
    try:
        for k in range(writes):
            written = time.perf_counter()
            await repo.modify(Bridge, marker.id, _renamer(k))
            deadline = time.perf_counter() + 30
            while len(seen.get(k, ())) < watchers and time.perf_counter() < deadline:
                await asyncio.sleep(0.0005)
            times = seen.get(k, [])
            if len(times) < watchers:
                raise RuntimeError(f"write {k}: only {len(times)}/{watchers} watches saw it")
            latencies.extend(t - written for t in times)
            last_watcher.append(max(times) - written)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()
    return {
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "all_p50_ms": percentile(last_watcher, 0.5) * 1000,
        "all_p99_ms": percentile(last_watcher, 0.99) * 1000,
    }


CHILD_SCRIPT = """
import asyncio, json, sys, time
from hivenet.agent.agent import HostAgent
from hivenet.datapath.memory import MemoryDatapath
from hivenet.store import open_store

async def main(store_url, host_id, marker_key):
    store = open_store(store_url)
    agent = HostAgent(store, MemoryDatapath(host_id, "192.0.2.1"), host_id=host_id, lease_ttl=30)
    original = agent._on_topology_change
    def on_change(key, value, revision):
        original(key, value, revision)
        if key == marker_key and value is not None:
            print(json.loads(value)["name"], time.time(), flush=True)
    agent.topology_mirror._on_change = on_change
    await agent.start()
    print("ready", time.time(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await agent.stop()
    await store.close()

asyncio.run(main(*sys.argv[1:4]))
"""


async def real_processes(store_url: str, processes: int, writes: int) -> dict[str, float]:
    store = open_store(store_url)
    repo = TopologyRepository(store)
    marker = (await repo.create(Bridge(name="marker-start"))).obj
    marker_key = topology_key("bridge", marker.id)
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD_SCRIPT,
            store_url,
            f"hn-bench-p{i}",
            marker_key,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for i in range(processes)
    ]
    applied: dict[int, list[float]] = {}

    async def read(child: asyncio.subprocess.Process, ready: asyncio.Event) -> None:
        assert child.stdout is not None
        async for line in child.stdout:
            name, _, stamp = line.decode().strip().partition(" ")
            if name == "ready":
                ready.set()
            elif name.startswith("marker-") and name != "marker-start":
                applied.setdefault(int(name[7:]), []).append(float(stamp))

    readiness = [asyncio.Event() for _ in children]
    readers = [asyncio.create_task(read(c, r)) for c, r in zip(children, readiness, strict=True)]
    try:
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readiness)), 60)
        latencies: list[float] = []
        last_agent: list[float] = []
        for k in range(writes):
            written = time.time()
            await repo.modify(Bridge, marker.id, _renamer(k))
            deadline = time.time() + 30
            while len(applied.get(k, ())) < processes and time.time() < deadline:
                await asyncio.sleep(0.001)
            times = applied.get(k, [])
            if len(times) < processes:
                raise RuntimeError(f"write {k}: only {len(times)}/{processes} agents applied it")
            latencies.extend(t - written for t in times)
            last_agent.append(max(times) - written)
            await asyncio.sleep(0.01)
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
        for child in children:
            try:
                await asyncio.wait_for(child.wait(), 10)
            except TimeoutError:
                child.kill()  # our own child, by its handle
        for reader in readers:
            reader.cancel()
        await store.close()
    return {
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "all_p50_ms": percentile(last_agent, 0.5) * 1000,
        "all_p99_ms": percentile(last_agent, 0.99) * 1000,
    }


async def fill_ports(store: Store, ports: int) -> None:
    """Write a topology of `ports` VM ports on 100 bridges straight into the store (bulk load:
    the repository's per-object checks are not what this measures)."""
    await store.put(topology_key("host", "hn-bench-h"), encode(Host(id="hn-bench-h")))
    bridges = [Bridge(name=f"b{i}") for i in range(100)]
    for bridge in bridges:
        await store.put(topology_key("bridge", bridge.id), encode(bridge))
    for i in range(ports):
        port = Port(
            device_kind=DeviceKind.BRIDGE,
            device_id=bridges[i % 100].id,
            host_id="hn-bench-h" if i % 100 == 0 else None,
            interface_name=f"hnp{i}" if i % 100 == 0 else None,
            tunnel_key=i + 1,
        )
        await store.put(topology_key("port", port.id), encode(port))


async def agent_cost(store_url: str, ports: int, idle_seconds: float) -> dict[str, float]:
    store = open_store(store_url)
    await fill_ports(store, ports)
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    agent = HostAgent(
        store, MemoryDatapath("hn-bench-a", "192.0.2.1"), host_id="hn-bench-a", lease_ttl=30
    )
    started = time.perf_counter()
    await agent.start(load_timeout=300)
    load_seconds = time.perf_counter() - started
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    cpu_before = time.process_time()
    wall_before = time.perf_counter()
    await asyncio.sleep(idle_seconds)
    idle_cpu = (time.process_time() - cpu_before) / (time.perf_counter() - wall_before)
    loaded = len(agent.topology.all("port"))
    await agent.stop(graceful=False)
    await store.close()
    if loaded != ports:
        raise RuntimeError(f"agent loaded {loaded} ports, expected {ports}")
    return {"load_s": load_seconds, "memory_mib": (after - before) / 2**20, "idle_cpu": idle_cpu}


def child(tree: Path, call: str) -> dict[str, float]:
    """`bench.<call>` in a child process on `tree`'s code (`bench/baseline.py`), where
    `time.perf_counter` is the process's CPU time."""
    result = baseline.run(
        tree, "propagation", f"print(json.dumps(bench.asyncio.run(bench.{call})))\n"
    )
    return {k: float(v) for k, v in result.items() if isinstance(v, int | float)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=30)
    parser.add_argument("--agents", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--ports", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument(
        "--etcd", action="store_true", help="also measure on a 3-member etcd cluster"
    )
    parser.add_argument(
        "--base",
        nargs="*",
        default=[],
        metavar="REV",
        help="also measure the in-process agents with the code of these git revisions",
    )
    parser.add_argument(
        "--gc-threshold",
        type=int,
        default=0,
        metavar="N",
        help="also measure this tree's in-process agents with the GC's generation-0 threshold"
        " at N during the writes (see `in_process`)",
    )
    args = parser.parse_args()
    here = baseline.current_tree()
    bases: dict[str, Path] = {}
    for base in args.base:
        tree = bases[baseline.describe(base)] = baseline.checkout(base)
        shutil.copy(Path(__file__), tree / "bench" / "propagation.py")
        if not (tree / "bench" / "baseline.py").exists():  # older than the harness
            shutil.copy(Path(baseline.__file__), tree / "bench" / "baseline.py")
    rows: list[tuple[str, str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="hn-bench-") as tmp:
        file_url = f"sqlite:///{tmp}/state.db"
        rows.append(
            (
                "3 agent processes",
                "sqlite file",
                asyncio.run(real_processes(file_url, 3, args.writes)),
            )
        )
        os.unlink(f"{tmp}/state.db")
        ratios: dict[str, float] = {}
        for count in args.agents:
            agents_row = child(here, f"in_process('memory://', {count}, {args.writes})")
            peer_row = child(here, f"bare_watches('memory://', {count}, {args.writes})")
            rows.append((f"{count} in-process agents", "sqlite memory", agents_row))
            rows.append((f"{count} bare watches (peer)", "sqlite memory", peer_row))
            ratios[f"{count}_agents_all_p99_vs_bare_watches"] = (
                agents_row["all_p99_ms"] / peer_row["all_p99_ms"]
            )
            if args.gc_threshold:
                call = f"in_process('memory://', {count}, {args.writes}, {args.gc_threshold})"
                rows.append(
                    (f"{count} agents, gc0 {args.gc_threshold}", "sqlite memory", child(here, call))
                )
            for name, tree in bases.items():
                base_row = child(tree, f"in_process('memory://', {count}, {args.writes})")
                rows.append((f"{count} agents @{name}", "sqlite memory", base_row))
                ratios[f"{count}_agents_all_p99_vs_{name}"] = (
                    agents_row["all_p99_ms"] / base_row["all_p99_ms"]
                )
        for store_name, url in (
            ("sqlite memory", "memory://"),
            ("sqlite file", f"sqlite:///{tmp}/cost.db"),
        ):
            rows.append(
                (
                    f"1 agent, {args.ports} ports",
                    store_name,
                    asyncio.run(agent_cost(url, args.ports, args.idle_seconds)),
                )
            )
        if args.etcd:
            from hivenet.lab import etcd as lab_etcd

            cluster = lab_etcd.start_cluster(Path(tmp) / "etcd")
            try:
                url = cluster.url
                rows.append(
                    (
                        "3 agent processes",
                        "etcd x3",
                        asyncio.run(real_processes(url, 3, args.writes)),
                    )
                )
                rows.append(
                    (
                        f"{args.agents[0]} in-process agents",
                        "etcd x3",
                        asyncio.run(in_process(url, args.agents[0], args.writes)),
                    )
                )
            finally:
                cluster.stop()
    print(
        f"{'setup':<28} {'store':<14} {'p50 ms':>8} {'p99 ms':>8} {'all p50':>8} {'all p99':>8}"
        f" {'load s':>7} {'MiB':>7} {'idle CPU':>8}"
    )
    for setup, store_name, r in rows:

        def cell(key: str, fmt: str = "{:8.2f}", r: dict[str, float] = r) -> str:
            return fmt.format(r[key]) if key in r else f"{'-':>8}"

        print(
            f"{setup:<28} {store_name:<14} {cell('p50_ms')} {cell('p99_ms')} {cell('all_p50_ms')}"
            f" {cell('all_p99_ms')} {cell('load_s', '{:7.2f}')} {cell('memory_mib', '{:7.1f}')}"
            f" {cell('idle_cpu', '{:8.3f}')}"
        )
    for name, ratio in ratios.items():
        print(f"{name.replace('_', ' ')}: {ratio:.2f}x")
    print(
        "In-process agents share one core: 'all p99' is the time for every agent in turn to\n"
        "apply the change, i.e. about N x one agent's work; an agent in its own process pays\n"
        "one share of it (the per-agent figure below), plus the store's delivery."
    )
    for setup, _store_name, r in rows:
        count = setup.split(" ", 1)[0]
        if "in-process agents" in setup and count.isdigit():
            print(f"{setup}: all p99 / N = {r['all_p99_ms'] * 1000 / int(count):.0f} us per agent")
    print(
        json.dumps(
            {
                "bench": "propagation",
                "ratios": {k: round(v, 3) for k, v in ratios.items()},
                "results": [
                    {"setup": s, "store": st, **{k: round(v, 4) for k, v in r.items()}}
                    for s, st, r in rows
                ],
            }
        )
    )


if __name__ == "__main__":
    main()
