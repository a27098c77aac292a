"""Benchmark: how long writes stop when the etcd leader is killed, next to how long etcd itself
takes to elect a new leader, both measured in the same run (the window as a ratio of it).

Owns nothing but measurements; must not be imported by the package or run as a timed test.
A local 3-member cluster (`hivenet.lab.etcd`, heartbeat 50 ms, election timeout 500 ms, data
on /dev/shm when there is one) takes a stream of sequential topology creates (one bridge per
`TopologyRepository.create`, as `POST /v1/bridges` does, over `EtcdStore` with its defaults).
Each round kills the leader (SIGKILL, by PID) while the writer runs, then restarts it.

- window: the longest gap between consecutive acknowledged creates from half a second before
  the kill on (creates complete every few ms otherwise; the write in flight at the kill may
  still be acknowledged just after it, so the gap is not simply "kill to next write");
- election: from the kill until `etcdctl endpoint status` on the survivors first names a new
  leader (polled back to back; each poll is one etcdctl process, so this is an upper bound by
  about one poll, which the table shows).

Every create must succeed (none may fail with an error), and after the run the store must hold
exactly the acknowledged bridges: the script says so and exits 1 otherwise.

Usage: .venv/bin/python bench/store_failover.py [--kills 10]
Prints a table, then exactly one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivenet.lab.etcd import EtcdCluster, start_cluster, stop_all
from hivenet.model import Bridge
from hivenet.store import StoreError
from hivenet.store.topology import TopologyRepository

ETCDCTL = "etcdctl"
WRITES_BEFORE_KILL_SECONDS = 0.5
WRITES_AFTER_ELECTION_SECONDS = 0.5


@dataclass
class Writer:
    """Sequential creates; when each was acknowledged (perf_counter), and what failed."""

    acknowledged_at: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: bool = False

    async def run(self, repository: TopologyRepository) -> None:
        index = 0
        while not self.stop:
            bridge = Bridge(name=f"hn-failover-{index}")
            index += 1
            try:
                await repository.create(bridge)
            except StoreError as error:
                self.failures.append(f"{type(error).__name__}: {error}")
                continue
            self.acknowledged_at.append(time.perf_counter())
            self.ids.append(bridge.id)


def longest_gap(times: list[float], since: float) -> float:
    """The longest time between consecutive `times` from `since` on."""
    around = [t for t in times if t >= since]
    return max((later - earlier for earlier, later in itertools.pairwise(around)), default=0.0)


def endpoint_statuses(endpoints: list[str]) -> list[dict[str, Any]]:
    """`etcdctl endpoint status -w json` on `endpoints` (members that do not answer left out)."""
    completed = subprocess.run(
        [
            ETCDCTL,
            f"--endpoints={','.join(endpoints)}",
            "--command-timeout=300ms",
            "--dial-timeout=200ms",
            "endpoint",
            "status",
            "-w",
            "json",
        ],
        capture_output=True,
        text=True,
        env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    try:
        answers = json.loads(completed.stdout or "[]")
    except ValueError:
        return []
    return [answer["Status"] for answer in answers if "Status" in answer]


def leader_id(endpoints: list[str]) -> int:
    for status in endpoint_statuses(endpoints):
        if status.get("leader"):
            return int(status["leader"])
    return 0


def kill_and_time_election(cluster: EtcdCluster) -> tuple[float, float, float]:
    """Kill the leader; (kill time, time a new leader was first seen, seconds per poll)."""
    leader = cluster.leader()
    survivors = [m.endpoint for m in cluster.members if m is not leader]
    old_leader = leader_id([leader.endpoint])
    killed_at = time.perf_counter()
    cluster.kill(leader.name)
    polls = 0
    while True:
        polls += 1
        new_leader = leader_id(survivors)
        now = time.perf_counter()
        if new_leader and new_leader != old_leader:
            return killed_at, now, (now - killed_at) / polls
        if now - killed_at > 30:
            raise RuntimeError("no new leader within 30 s")


async def one_round(cluster: EtcdCluster, repository: TopologyRepository) -> dict[str, float]:
    writer = Writer()
    writing = asyncio.create_task(writer.run(repository))
    await asyncio.sleep(WRITES_BEFORE_KILL_SECONDS)
    killed_at, elected_at, poll_seconds = await asyncio.to_thread(kill_and_time_election, cluster)
    await asyncio.sleep(WRITES_AFTER_ELECTION_SECONDS)
    while not any(t > killed_at for t in writer.acknowledged_at) and not writing.done():
        await asyncio.sleep(0.05)
    writer.stop = True
    await writing
    return {
        "window_s": longest_gap(writer.acknowledged_at, killed_at - 0.5),
        "election_s": elected_at - killed_at,
        "poll_s": poll_seconds,
        "writes": len(writer.ids),
        "failures": len(writer.failures),
        "ids": writer.ids,  # type: ignore[dict-item]
        "failure_texts": writer.failures,  # type: ignore[dict-item]
    }


async def run(cluster: EtcdCluster, kills: int) -> tuple[list[dict[str, Any]], int]:
    store = cluster.store()
    repository = TopologyRepository(store)
    rounds: list[dict[str, Any]] = []
    try:
        for _ in range(kills):
            rounds.append(await one_round(cluster, repository))
            for name in cluster.names():
                if not cluster.is_running(name):
                    await asyncio.to_thread(cluster.start_member, name)
            await asyncio.to_thread(cluster.wait_healthy)
        stored = len((await repository.list(Bridge, limit=1000)).items)
        page = await repository.list(Bridge, limit=1000)
        stored = len(page.items)
        while page.next_marker is not None:
            page = await repository.list(Bridge, limit=1000, marker=page.next_marker)
            stored += len(page.items)
    finally:
        await store.close()
    return rounds, stored


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="leader kills (default 10)")
    arguments = parser.parse_args()
    if shutil.which(ETCDCTL) is None:
        print("etcdctl not found: install Debian's etcd-client (make apt)", file=sys.stderr)
        return 2
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    directory = Path(tempfile.mkdtemp(prefix="hn-etcd-bench-", dir=base))
    try:
        with start_cluster(directory, die_with_owner=True) as cluster:
            rounds, stored = asyncio.run(run(cluster, arguments.kills))
    finally:
        stop_all(directory)
        shutil.rmtree(directory, ignore_errors=True)

    print(
        f"{'kill':>4} {'window ms':>10} {'election ms':>12} {'ratio':>6} {'writes':>7} {'fail':>5}"
    )
    for number, result in enumerate(rounds, 1):
        print(
            f"{number:>4} {result['window_s'] * 1000:>10.0f} {result['election_s'] * 1000:>12.0f} "
            f"{result['window_s'] / result['election_s']:>6.2f} {result['writes']:>7} "
            f"{result['failures']:>5}"
        )
    windows = [r["window_s"] for r in rounds]
    elections = [r["election_s"] for r in rounds]
    acknowledged = sum(len(r["ids"]) for r in rounds)
    failures = [text for r in rounds for text in r["failure_texts"]]
    summary = {
        "benchmark": "store_failover",
        "kills": len(rounds),
        "window_median_ms": round(statistics.median(windows) * 1000, 1),
        "window_max_ms": round(max(windows) * 1000, 1),
        "election_median_ms": round(statistics.median(elections) * 1000, 1),
        "election_max_ms": round(max(elections) * 1000, 1),
        "window_to_election_median_ratio": round(
            statistics.median(windows) / statistics.median(elections), 2
        ),
        "election_poll_ms": round(statistics.fmean(r["poll_s"] for r in rounds) * 1000, 1),
        "writes_acknowledged": acknowledged,
        "writes_failed": len(failures),
        "bridges_stored": stored,
    }
    print(
        f"window median {summary['window_median_ms']} ms, max {summary['window_max_ms']} ms; "
        f"etcd election median {summary['election_median_ms']} ms, max "
        f"{summary['election_max_ms']} ms (polled every ~{summary['election_poll_ms']} ms); "
        f"ratio {summary['window_to_election_median_ratio']}"
    )
    for text in failures[:5]:
        print(f"failed: {text}")
    print(json.dumps(summary))
    return 0 if not failures and stored == acknowledged else 1


if __name__ == "__main__":
    sys.exit(main())
