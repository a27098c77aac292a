"""Child-process side of the multi-process store test (imported by `spawn` children).

Each worker opens the shared SQLite file, watches everything under `/mp/` from a given
revision, writes its own keys meanwhile, and reports every event it saw, in order.
"""

from __future__ import annotations

import asyncio
import multiprocessing.queues

from hivenet.store import Compare, Put, SqliteStore

Report = tuple[int, list[tuple[str, str, bytes, int]] | str]


async def _work(path: str, worker: int, writes: int, start: int, total: int) -> Report:
    store = SqliteStore(path)
    try:
        seen: list[tuple[str, str, bytes, int]] = []

        async def watch() -> None:
            async for event in store.watch("/mp/", start_revision=start):
                seen.append((event.type.value, event.kv.key, event.kv.value, event.revision))
                if len(seen) == total:
                    return

        watching = asyncio.create_task(watch())
        for index in range(writes):
            key = f"/mp/{worker}/{index % 5}"
            if index % 3 == 0:
                # A compare-and-swap on the worker's own counter: contended file, no conflicts.
                await store.txn([Compare(key, "version", ">", -1)], [Put(key, b"%d" % index)])
            else:
                await store.put(key, b"%d" % index)
            if index % 10 == 0:
                await asyncio.sleep(0.001)
        await store.delete(f"/mp/{worker}/", prefix=True)
        await asyncio.wait_for(watching, 30)
        return worker, seen
    finally:
        await store.close()


def run_worker(
    path: str,
    worker: int,
    writes: int,
    start: int,
    total: int,
    results: multiprocessing.queues.Queue[Report],
) -> None:
    try:
        results.put(asyncio.run(_work(path, worker, writes, start, total)))
    except BaseException as error:  # the parent must hear about any failure
        results.put((worker, f"{type(error).__name__}: {error}"))
        raise
