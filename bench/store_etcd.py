"""Benchmark of the etcd backend (`hivenet.store.etcd.EtcdStore`) on a local 3-member cluster,
against the SQLite WAL file store measured in the same run (the peer; reported as a ratio).

Owns nothing but measurements; must not be imported by the package or run as a timed test.
Measures, for both stores: sequential puts/s, puts/s with 32 in flight, compare-and-swap
txn/s (get + txn guarded by mod_revision), and write-to-watch latency p50/p99 (one write at a
time, put() called until the watcher holds the event). Both stores keep their data on the same
file system (a fresh directory under the system temp dir), so both pay real fsyncs. The
cluster is started with `hivenet.lab.etcd` on free 127.0.0.1 ports and stopped by PID.

Usage: .venv/bin/python bench/store_etcd.py [--quick]
Prints a table, then exactly one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hivenet.lab.etcd import start_cluster, stop_all
from hivenet.store import SqliteStore, Store

# The shared measurements live in bench/store.py (this script's directory is on sys.path).
from store import bench_puts, bench_txns, bench_watch_latency, percentile

CONCURRENCY = 32


async def bench_concurrent_puts(store: Store, count: int) -> float:
    queue = iter(range(count))

    async def worker() -> None:
        for index in queue:
            await store.put(f"/bench/cputs/{index % 1000:04d}", b"x" * 200)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return count / (time.perf_counter() - started)


async def measure(store: Store, counts: dict[str, int]) -> dict[str, float]:
    try:
        await store.put("/bench/warmup", b"")
        latencies = await bench_watch_latency(store, counts["watch"])
        return {
            "puts_per_s": await bench_puts(store, counts["puts"]),
            "concurrent_puts_per_s": await bench_concurrent_puts(store, counts["puts"]),
            "txn_per_s": await bench_txns(store, counts["txns"]),
            "watch_p50_ms": percentile(latencies, 0.50) * 1000,
            "watch_p99_ms": percentile(latencies, 0.99) * 1000,
            "watch_mean_ms": statistics.fmean(latencies) * 1000,
        }
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (smoke run)")
    arguments = parser.parse_args()
    scale = 0.1 if arguments.quick else 1.0
    counts = {"puts": int(3_000 * scale), "txns": int(1_000 * scale), "watch": int(1_000 * scale)}

    directory = Path(tempfile.mkdtemp(prefix="hn-bench-etcd-"))
    try:
        with start_cluster(directory) as cluster:
            etcd = asyncio.run(measure(cluster.store(), counts))
        sqlite = asyncio.run(measure(SqliteStore(directory / "hn-bench.db"), counts))
    finally:
        stop_all(directory)
        shutil.rmtree(directory, ignore_errors=True)

    rows = [
        ("puts/s (sequential)", "puts_per_s"),
        (f"puts/s ({CONCURRENCY} in flight)", "concurrent_puts_per_s"),
        ("CAS txn/s (get + txn)", "txn_per_s"),
        ("watch latency p50 (ms)", "watch_p50_ms"),
        ("watch latency p99 (ms)", "watch_p99_ms"),
    ]
    print(f"etcd: 3 members on 127.0.0.1, data in {tempfile.gettempdir()}; counts {counts}")
    print(f"{'metric':<28}{'etcd (3 members)':>18}{'sqlite file':>14}{'etcd/sqlite':>13}")
    ratios: dict[str, float] = {}
    for label, name in rows:
        ratio = etcd[name] / sqlite[name] if sqlite[name] else float("inf")
        ratios[name] = ratio
        print(f"{label:<28}{etcd[name]:>18.2f}{sqlite[name]:>14.2f}{ratio:>13.3f}")
    summary: dict[str, Any] = {
        "bench": "store_etcd",
        "quick": arguments.quick,
        "counts": counts,
        "etcd": {name: round(value, 3) for name, value in etcd.items()},
        "sqlite_file": {name: round(value, 3) for name, value in sqlite.items()},
        "ratio_etcd_over_sqlite": {name: round(value, 4) for name, value in ratios.items()},
    }
    sys.stdout.flush()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
