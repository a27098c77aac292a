"""Agent start-up at scale: how long from `HostAgent.start()` until the agent is ready (its
topology loaded, decoded and compiled: every port, chain and bridge of the view built), and
the agent process's memory when it is.

The store: a SQLite file holding `--ports` VM ports (default 10k) on 100 bridges, each port
with an inbound and an outbound chain of `--rules / (2 * ports)` rules (default 100k rules:
5 per chain, matching on protocol, addresses, ports, as security-group chains do), written
once per run in 1000-key transactions. One port in 100 is bound to the measured host. The
file has the store's page size (8192), or `--page-size`'s: 4096 is what stores created
before 2026-12-07 have, and SQLite keeps a database's page size for life.

Each measurement runs in a child process of its own (`bench/baseline.py`), whose clock is the
process's CPU time (the machine is shared), alternating, `--rounds` times each; the table
shows the median:
- `store read` (the floor, peer in the same run): the same child reads the whole topology
  prefix the way the agent's mirror does (1000-key pages at one revision) and nothing else;
- `agent` (this tree): `HostAgent.start()` on a memory datapath, to ready;
- `agent @REV` (`--base REV ...`, default `landing`; `--base` alone: none): the same with the
  code of other git revisions, this benchmark module copied into each tree.
RSS is the child's resident set after ready (`/proc/self/statm`), and `+RSS` what start-up
added to the RSS the child had with its modules imported and the store opened.
Ready: the mirror loaded and the view built, and the first local port's inbound chain looked
up; the agent's time includes the full collection `hivenet agent run` makes right after start
(`agent/cli.py`), so time the cyclic GC skipped during the load is not left out. Since start-up decodes a stored chain and its rules on the chain's first lookup (most
chains belong to ports of other hosts), `chains s` is the CPU, after ready, of looking up
every stored chain once (what a lazy load defers; ~0 for a tree that compiles all at load),
and `RSS all` the resident set then.

Prints a table, then one JSON line. Usage:
`python bench/startup.py [--ports N] [--rules N] [--rounds N] [--page-size B] [--base REV ...]`
Files only in a temporary directory it removes; no network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import baseline
from hivenet.model import (
    Bridge,
    Chain,
    DeviceKind,
    Host,
    Port,
    PortRange,
    Rule,
    RuleAction,
    topology_key,
)
from hivenet.model import encode as encode_model
from hivenet.store import Put, open_store

BRIDGES = 100
HOST_ID = "hn-startup-h"
CHUNK = 1000


def _port_chains(index: int, per_chain: int, port_id: str) -> list[Chain | Rule]:
    """An inbound and an outbound chain for port `index`, `per_chain` rules each."""
    objects: list[Chain | Rule] = []
    for direction in ("in", "out"):
        chain = Chain(name=f"p{index}-{direction}")
        objects.append(chain)
        for position in range(per_chain):
            last = position == per_chain - 1
            objects.append(
                Rule(
                    chain_id=chain.id,
                    position=position,
                    action=RuleAction.DROP if last else RuleAction.ACCEPT,
                    nw_proto=None if last else 6 if position % 2 else 17,
                    nw_src=None
                    if last
                    else ipaddress.ip_network(f"10.{position}.{index % 256}.0/24"),
                    tp_dst=None if last else PortRange(start=1000 + position, end=2000),
                    in_port_ids=(port_id,) if direction == "in" and position == 0 else (),
                )
            )
    return objects


def page_size(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return int(connection.execute("PRAGMA page_size").fetchone()[0])


def create_with_page_size(path: Path, size: int) -> None:
    """An empty SQLite file with pages of `size` bytes, in WAL mode as the store keeps it
    (so its header is written): the store then creates its schema in it, keeping that size
    (SQLite fixes the page size when a database is created)."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute(f"PRAGMA page_size = {int(size)}")
        connection.execute("PRAGMA journal_mode = WAL").fetchone()


async def fill(url: str, ports: int, rules: int, compact: bool = False) -> int:
    """Write the topology; returns the number of keys written. `compact`: values without
    the fields at their defaults (older revisions' models refuse fields added since)."""
    per_chain = max(1, rules // (2 * ports))
    store = open_store(url)

    def encode(obj: Host | Bridge | Port | Chain | Rule) -> bytes:
        if compact:
            return obj.model_dump_json(exclude_defaults=True).encode()
        return encode_model(obj)

    keys: list[tuple[str, bytes]] = [(topology_key("host", HOST_ID), encode(Host(id=HOST_ID)))]
    bridges = [Bridge(name=f"b{i}") for i in range(BRIDGES)]
    keys.extend((topology_key("bridge", b.id), encode(b)) for b in bridges)
    for index in range(ports):
        port = Port(device_kind=DeviceKind.BRIDGE, device_id=bridges[index % BRIDGES].id)
        chains = _port_chains(index, per_chain, port.id)
        port = port.model_copy(
            update={
                "inbound_chain_id": chains[0].id,
                "outbound_chain_id": chains[per_chain + 1].id,
                "tunnel_key": index + 1,
                "host_id": HOST_ID if index % 100 == 0 else None,
                "interface_name": f"hnp{index}" if index % 100 == 0 else None,
            }
        )
        keys.append((topology_key("port", port.id), encode(port)))
        keys.extend((topology_key(obj.KIND, obj.id), encode(obj)) for obj in chains)
    try:
        for start in range(0, len(keys), CHUNK):
            await store.txn([], [Put(k, v) for k, v in keys[start : start + CHUNK]])
    finally:
        await store.close()
    return len(keys)


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def measure(url: str, what: str) -> dict[str, float]:
    """In a child (`bench/baseline.py`: `time.perf_counter` is CPU time): `what` is "read"
    (the store read alone) or "agent" (an agent started to ready)."""
    from hivenet.agent.agent import HostAgent
    from hivenet.agent.mirror import PAGE_SIZE
    from hivenet.datapath.memory import MemoryDatapath
    from hivenet.model.topology import TOPOLOGY_PREFIX

    store = open_store(url)
    await store.current_revision()
    rss_before = _rss()
    started = time.perf_counter()
    wall = time.monotonic()
    if what == "read":
        page = await store.range(TOPOLOGY_PREFIX, limit=PAGE_SIZE)
        values = {kv.key: kv.value for kv in page.kvs}
        while page.more and page.kvs:
            page = await store.range(
                TOPOLOGY_PREFIX,
                revision=page.revision,
                limit=PAGE_SIZE,
                start_after=page.kvs[-1].key,
            )
            values.update((kv.key, kv.value) for kv in page.kvs)
        loaded = len(values)
    else:
        agent = HostAgent(
            store, MemoryDatapath(HOST_ID, "192.0.2.1"), host_id=HOST_ID, lease_ttl=600
        )
        await agent.start(load_timeout=600)
        # `hivenet agent run` collects (then freezes the heap) right after start (agent/cli.py):
        # that first full collection is part of start-up, whenever the GC ran during it.
        gc.collect()
        loaded = len(agent.topology_mirror.values)
        local = [p for p in agent.topology.ports.values() if p.host_id == HOST_ID]
        if not local or agent.topology.chains.get(local[0].inbound_chain_id or "") is None:
            raise RuntimeError("agent ready without a compiled topology")
    cpu = time.perf_counter() - started
    wall = time.monotonic() - wall
    rss = _rss()
    chains_s = 0.0
    if what != "read":
        # What a lazy load defers: every chain looked up once (compiled where not yet).
        chain_ids = [k.rsplit("/", 1)[1] for k in agent.topology_mirror.values if "/chain/" in k]
        chains_started = time.perf_counter()
        compiled = sum(agent.topology.chains.get(c) is not None for c in chain_ids)
        chains_s = time.perf_counter() - chains_started
        if compiled != len(chain_ids):
            raise RuntimeError(f"{len(chain_ids) - compiled} stored chains did not compile")
        rss_all = _rss()
    if what != "read":
        await agent.stop(graceful=False)
    await store.close()
    return {
        "cpu_s": cpu,
        "wall_s": wall,
        "keys": loaded,
        "rss_mib": rss / 2**20,
        "rss_added_mib": (rss - rss_before) / 2**20,
        "all_chains_s": chains_s,
        "rss_all_chains_mib": (rss_all if what != "read" else rss) / 2**20,
    }


def run_child(tree: Path, url: str, what: str) -> dict[str, float]:
    snippet = f"print(json.dumps(bench.asyncio.run(bench.measure({url!r}, {what!r}))))\n"
    result = baseline.run(tree, "startup", snippet)
    return {k: float(v) for k, v in result.items() if isinstance(v, int | float)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=10_000)
    parser.add_argument("--rules", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base", nargs="*", default=["landing"], metavar="REV")
    parser.add_argument(
        "--db", metavar="PATH", help="SQLite file to use (filled if missing, kept): re-runs"
    )
    parser.add_argument(
        "--compact",
        action="store_true",
        help="write values without fields at their defaults (for --base revisions whose"
        " models refuse fields added since)",
    )
    parser.add_argument(
        "--page-size",
        type=int,
        metavar="BYTES",
        help="create the store with this SQLite page size (default: the store's own, 8192"
        " since 2026-12-07; 4096 is what stores created before have)",
    )
    args = parser.parse_args()
    if args.page_size is not None and (
        args.page_size < 512 or args.page_size > 65536 or args.page_size & (args.page_size - 1)
    ):
        parser.error(f"--page-size must be a power of two in 512..65536, got {args.page_size}")
    if args.ports < 1 or args.rules < 2 * args.ports:
        parser.error(f"--rules must be at least 2 x --ports, got {args.rules} for {args.ports}")
    sides: dict[str, Path] = {
        "store read": baseline.current_tree(),
        "agent": baseline.current_tree(),
    }
    for base in args.base:
        tree = baseline.checkout(base)
        shutil.copy(Path(__file__), tree / "bench" / "startup.py")
        if not (tree / "bench" / "baseline.py").exists():  # older than the harness
            shutil.copy(Path(baseline.__file__), tree / "bench" / "baseline.py")
        sides[f"agent @{baseline.describe(base)}"] = tree
    with tempfile.TemporaryDirectory(prefix="hn-bench-") as tmp:
        path = Path(args.db) if args.db else Path(tmp) / "startup.db"
        url = f"sqlite:///{path}"
        written = time.perf_counter()
        if path.exists():
            keys = 1 + BRIDGES + args.ports + 2 * args.ports * (1 + args.rules // (2 * args.ports))
            filled = f"reused {path}"
        else:
            if args.page_size is not None:
                create_with_page_size(path, args.page_size)
            keys = asyncio.run(fill(url, args.ports, args.rules, args.compact))
            filled = f"written in {time.perf_counter() - written:.1f} s"
        pages = page_size(path)
        filled += f", {pages}-byte pages, {path.stat().st_size / 2**20:.0f} MiB"
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, tree in sides.items():
                what = "read" if name == "store read" else "agent"
                runs[name].append(run_child(tree, url, what))
    rows = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in runs.items()
    }
    for name, row in rows.items():
        if row["keys"] != keys:
            raise SystemExit(f"{name}: loaded {row['keys']:.0f} keys, wrote {keys}")
    print(
        f"{args.ports} ports, {args.rules} rules: {keys} keys ({filled});"
        f" median of {args.rounds} runs, CPU seconds of the child"
    )
    print(
        f"{'side':<22} {'CPU s':>8} {'wall s':>8} {'RSS MiB':>8} {'+RSS MiB':>9} {'x floor':>8}"
        f" {'chains s':>9} {'RSS all':>8}"
    )
    floor = rows["store read"]["cpu_s"]
    for name, row in rows.items():
        print(
            f"{name:<22} {row['cpu_s']:8.2f} {row['wall_s']:8.2f} {row['rss_mib']:8.1f}"
            f" {row['rss_added_mib']:9.1f} {row['cpu_s'] / floor:8.2f}"
            f" {row['all_chains_s']:9.2f} {row['rss_all_chains_mib']:8.1f}"
        )
    ratios = {f"{name} vs store read": rows[name]["cpu_s"] / floor for name in rows}
    for base_name in (name for name in rows if name.startswith("agent @")):
        ratio = ratios[f"agent vs {base_name[6:]}"] = (
            rows["agent"]["cpu_s"] / rows[base_name]["cpu_s"]
        )
        print(f"agent / {base_name}: {ratio:.2f}x CPU")
    print(
        json.dumps(
            {
                "bench": "startup",
                "ports": args.ports,
                "rules": args.rules,
                "keys": keys,
                "rounds": args.rounds,
                "base": args.base,
                "compact": args.compact,
                "page_size": pages,
                "results": {n: {k: round(v, 4) for k, v in r.items()} for n, r in rows.items()},
                "ratios": {k: round(v, 3) for k, v in ratios.items()},
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
