"""Benchmark of the embedded Network State DB (`hivenet.store.sqlite.SqliteStore`).

Owns nothing but measurements; must not be imported by the package or run as a timed test.
Measures, for memory and WAL-file stores (file mode in each `execution`: "auto", the
default, "thread" and "loop"): sequential puts/s, compare-and-swap txn/s, write-to-watch latency
in-process and across processes (p50/p99), and the time to load 50k objects with one range
and with pages of 1000. Peer in the same run: raw sqlite3 single-row upsert transactions on
the same kind of database, reported as a ratio.

Usage: .venv/bin/python bench/store.py [--quick]
Prints a table, then exactly one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.queues
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from hivenet.store import Compare, Put, SqliteStore, Store


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def open_store(kind: str, directory: Path, name: str) -> SqliteStore:
    if kind == "memory":
        return SqliteStore(":memory:")
    executions: dict[str, Literal["auto", "thread", "loop"]] = {
        "file-auto": "auto",
        "file-thread": "thread",
        "file-loop": "loop",
    }
    return SqliteStore(directory / f"hn-bench-{name}.db", execution=executions[kind])


async def bench_puts(store: Store, count: int) -> float:
    started = time.perf_counter()
    for index in range(count):
        await store.put(f"/bench/puts/{index % 1000:04d}", b"x" * 200)
    return count / (time.perf_counter() - started)


async def bench_txns(store: Store, count: int) -> float:
    key = "/bench/txn/counter"
    await store.put(key, b"0")
    started = time.perf_counter()
    for index in range(count):
        current = await store.get(key)
        assert current is not None
        result = await store.txn(
            [Compare(key, "mod_revision", "==", current.mod_revision)],
            [Put(key, str(index).encode())],
        )
        assert result.succeeded
    return count / (time.perf_counter() - started)


async def bench_watch_latency(store: Store, count: int) -> list[float]:
    """Seconds from calling put() to the watcher holding the event, one write at a time."""
    start = await store.current_revision() + 1
    events = store.watch("/bench/watch/", start_revision=start)
    latencies: list[float] = []
    for index in range(count):
        started = time.perf_counter()
        await store.put(f"/bench/watch/{index}", b"")
        await anext(events)
        latencies.append(time.perf_counter() - started)
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()
    return latencies


async def bench_load(store: SqliteStore, objects: int) -> tuple[float, float]:
    """Fill `objects` keys (1000 per txn), then time one full range and a paged range."""
    payload = b'{"id": "00000000-0000-0000-0000-000000000000", "name": "port", "up": true}' * 3
    for batch in range(0, objects, 1000):
        await store.txn(
            [],
            [
                Put(f"/hivenet/v1/topology/port/{n:08d}", payload)
                for n in range(batch, batch + 1000)
            ],
        )
    started = time.perf_counter()
    everything = await store.range("/hivenet/v1/topology/port/")
    one_range = time.perf_counter() - started
    assert len(everything.kvs) == objects
    started = time.perf_counter()
    seen, start_after = 0, None
    while True:
        page = await store.range("/hivenet/v1/topology/port/", limit=1000, start_after=start_after)
        seen += len(page.kvs)
        if not page.more:
            break
        start_after = page.kvs[-1].key
    paged = time.perf_counter() - started
    assert seen == objects
    return one_range, paged


def raw_sqlite_upserts(path: str, count: int) -> float:
    """The peer: one-row upsert transactions with plain sqlite3, same journal settings."""
    connection = sqlite3.connect(path, isolation_level=None)
    if path != ":memory:":
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB) WITHOUT ROWID")
    started = time.perf_counter()
    for index in range(count):
        connection.execute("BEGIN IMMEDIATE")
        connection.execute(
            "INSERT OR REPLACE INTO kv VALUES (?, ?)", (f"/bench/{index % 1000:04d}", b"x" * 200)
        )
        connection.execute("COMMIT")
    rate = count / (time.perf_counter() - started)
    connection.close()
    return rate


def _cross_process_watcher(
    path: str, start: int, count: int, ready: Any, results: multiprocessing.queues.Queue[Any]
) -> None:
    async def watch() -> list[float]:
        store = SqliteStore(path)
        events = store.watch("/bench/cross/", start_revision=start)
        ready.set()
        latencies = []
        for _ in range(count):
            event = await anext(events)
            latencies.append(time.time() - float(event.kv.value))
        await store.close()
        return latencies

    results.put(asyncio.run(watch()))


def bench_cross_process(directory: Path, count: int) -> list[float]:
    """Wall-clock seconds from a put in this process to the event in another process."""
    path = str(directory / "hn-bench-cross.db")

    async def current() -> int:
        store = SqliteStore(path)
        revision = await store.current_revision()
        await store.close()
        return revision

    start = asyncio.run(current()) + 1
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    results: multiprocessing.queues.Queue[Any] = context.Queue()
    watcher = context.Process(
        target=_cross_process_watcher,
        args=(path, start, count, ready, results),
        name="hn-bench-watcher",
    )
    watcher.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("cross-process watcher did not start")

        async def write() -> None:
            store = SqliteStore(path)
            await asyncio.sleep(0.2)  # let the watcher reach its first poll
            for index in range(count):
                await store.put(f"/bench/cross/{index}", repr(time.time()).encode())
                await asyncio.sleep(0.005)  # one write at a time, not a burst
            await store.close()

        asyncio.run(write())
        latencies: list[float] = results.get(timeout=60)
    finally:
        watcher.join(timeout=10)
        if watcher.is_alive():
            watcher.kill()
            watcher.join()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts (smoke run)")
    arguments = parser.parse_args()
    scale = 0.1 if arguments.quick else 1.0
    puts = int(10_000 * scale)
    txns = int(3_000 * scale)
    watches = int(2_000 * scale)
    objects = 50_000 if not arguments.quick else 5_000
    cross = int(300 * scale)

    rows: list[tuple[str, str, str]] = []
    results: dict[str, Any] = {"bench": "store", "python": sys.version.split()[0]}
    results["sqlite"] = sqlite3.sqlite_version

    def record(name: str, value: float, unit: str, shown: Callable[[float], str]) -> None:
        results[name] = round(value, 6)
        rows.append((name, shown(value), unit))

    with tempfile.TemporaryDirectory(prefix="hn-bench-store-") as temporary:
        directory = Path(temporary)
        raw = {
            "memory": raw_sqlite_upserts(":memory:", puts),
            "file": raw_sqlite_upserts(str(directory / "hn-bench-raw.db"), puts),
        }
        for kind in ("memory", "file-auto", "file-thread", "file-loop"):

            async def run_kind(kind: str = kind) -> None:
                store = open_store(kind, directory, kind)
                try:
                    put_rate = await bench_puts(store, puts)
                    record(f"{kind}.puts_per_s", put_rate, "puts/s", lambda v: f"{v:,.0f}")
                    peer = raw["memory" if kind == "memory" else "file"]
                    record(
                        f"{kind}.puts_vs_raw_sqlite",
                        put_rate / peer,
                        "ratio (raw sqlite3 upserts = 1)",
                        lambda v: f"{v:.2f}",
                    )
                    record(
                        f"{kind}.txns_per_s",
                        await bench_txns(store, txns),
                        "get+CAS txn/s",
                        lambda v: f"{v:,.0f}",
                    )
                    latencies = await bench_watch_latency(store, watches)
                    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
                        record(
                            f"{kind}.watch_latency_{label}_ms",
                            percentile(latencies, fraction) * 1000,
                            "ms put() call -> event, same process",
                            lambda v: f"{v:.3f}",
                        )
                    one_range, paged = await bench_load(store, objects)
                    record(
                        f"{kind}.load_{objects // 1000}k_one_range_s",
                        one_range,
                        "s",
                        lambda v: f"{v:.3f}",
                    )
                    record(
                        f"{kind}.load_{objects // 1000}k_pages_of_1000_s",
                        paged,
                        "s",
                        lambda v: f"{v:.3f}",
                    )
                finally:
                    await store.close()

            asyncio.run(run_kind())
        record("raw_sqlite.memory_upserts_per_s", raw["memory"], "peer", lambda v: f"{v:,.0f}")
        record("raw_sqlite.file_upserts_per_s", raw["file"], "peer", lambda v: f"{v:,.0f}")
        cross_latencies = bench_cross_process(directory, cross)
        for label, fraction in (("p50", 0.5), ("p99", 0.99)):
            record(
                f"file.cross_process_watch_latency_{label}_ms",
                percentile(cross_latencies, fraction) * 1000,
                "ms put() -> event in another process",
                lambda v: f"{v:.2f}",
            )
        results["cross_process_mean_ms"] = round(statistics.fmean(cross_latencies) * 1000, 3)

    width = max(len(name) for name, _, _ in rows)
    print(f"{'measure':<{width}}  {'value':>12}  unit")
    for name, value, unit in rows:
        print(f"{name:<{width}}  {value:>12}  {unit}")
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
