"""Benchmark of L4 backend selection: Maglev (`hivenet.sim.maglev`) against round robin per
agent and hash-mod-N, measured in the same run over the same synthetic flows.

For each selector, over `--flows` flows (default 1M) and 10 weighted members:
  load      max over members of (flows it got / flows its weight entitles it to); goal <= 1.05
  moved     fraction of flows whose member changes when one member of N leaves
            (equal weights, goal close to 1/N) and when the heaviest of the weighted
            members leaves (goal close to its share)
  agree     fraction of flows two agents send to the same member without sharing state
  select/s  selections per second of the bare selector (flow hashes precomputed)
Also the flow hash rate, the Maglev table build time (goal < 50 ms for M=65537, 10
members) and the rate of the whole `PoolBalancer.select` path (hash, table, binding).

Round robin "per agent": flows arrive at `--agents` agents (by a hash of the flow) and each
agent runs its own weighted round robin over the flows it sees; a member change
restarts every agent's cycle. Owns nothing but this measurement; touches no network and
writes no files. Prints a human table, then exactly one JSON line.
Usage: `python bench/loadbalancer.py [--flows N] [--agents A] [--table-size M]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from hivenet.model import Member, Pool
from hivenet.sim.loadbalancer import FlowTuple, HashModN, PoolBalancer, WeightedRoundRobin
from hivenet.sim.maglev import (
    DEFAULT_TABLE_SIZE,
    MaglevTable,
    WeightedMember,
    check_table_size,
    five_tuple_hash,
)

SEED = 20260611
MEMBER_WEIGHTS = (25, 50, 75, 100, 125, 150, 175, 200, 225, 250)
LOAD_GOAL = 1.05
BUILD_GOAL_MS = 50.0
FULL_PATH_FLOWS = 100_000  # the PoolBalancer.select path is measured on a prefix


@dataclass(frozen=True, slots=True)
class Flows:
    tuples: list[tuple[int, int, int, int, int]]
    hashes: list[int]
    hash_seconds: float


def synthetic_flows(count: int, seed: int) -> Flows:
    """`count` distinct TCP/UDP flows from a /12 of clients to one VIP, and their hashes."""
    rng = random.Random(seed)
    vip = 0xCB00710A  # 203.0.113.10
    seen: set[tuple[int, int, int, int, int]] = set()
    while len(seen) < count:
        source = 0x0A000000 | rng.getrandbits(20)
        seen.add((source, vip, 6 if rng.random() < 0.9 else 17, rng.randint(1024, 65535), 443))
    tuples = sorted(seen)
    rng.shuffle(tuples)
    started = time.perf_counter()
    hashes = [five_tuple_hash(*flow) for flow in tuples]
    return Flows(tuples, hashes, time.perf_counter() - started)


def members_of(weights: Sequence[int]) -> list[WeightedMember]:
    return [WeightedMember(f"backend-{index:02d}", weight) for index, weight in enumerate(weights)]


# -- the selectors: each factory prepares, for some members, the function that maps a flow
# hash to a member id. `agent_shift` sends every flow to another agent than with shift 0 (as
# after an upstream ECMP change); only round robin, whose choice is agent state, cares.

Select = Callable[[int], str]
SelectorFactory = Callable[[Sequence[WeightedMember], int, int], Select]


def maglev_selector(members: Sequence[WeightedMember], table_size: int, agent_shift: int) -> Select:
    return MaglevTable.build(members, table_size).select


def hash_mod_n_selector(
    members: Sequence[WeightedMember], table_size: int, agent_shift: int
) -> Select:
    return HashModN(members).select


def round_robin_selector(agents: int) -> SelectorFactory:
    def prepare(members: Sequence[WeightedMember], table_size: int, agent_shift: int) -> Select:
        # Agents start their cycles at different points (each has its own history).
        cursors = [WeightedRoundRobin(members, start=agent * 7) for agent in range(agents)]

        def select(flow_hash: int) -> str:
            return cursors[((flow_hash >> 40) + agent_shift) % agents].next()

        return select

    return prepare


def assign(
    prepare: SelectorFactory,
    hashes: Sequence[int],
    members: Sequence[WeightedMember],
    table_size: int,
    agent_shift: int = 0,
) -> list[str]:
    return list(map(prepare(members, table_size, agent_shift), hashes))


def load_ratio(assignment: Sequence[str], members: Sequence[WeightedMember]) -> float:
    counts = Counter(assignment)
    total_weight = sum(member.weight for member in members if member.weight > 0)
    return max(
        counts[member.member_id] / (len(assignment) * member.weight / total_weight)
        for member in members
        if member.weight > 0
    )


def moved_fraction(before: Sequence[str], after: Sequence[str]) -> float:
    return sum(1 for left, right in zip(before, after, strict=True) if left != right) / len(before)


def time_rate(run: Callable[[], object], items: int, repeats: int = 3) -> float:
    best = min(_elapsed(run) for _ in range(repeats))
    return items / best


def _elapsed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


@dataclass(frozen=True, slots=True)
class SelectorResult:
    selector: str
    load_max_over_fair: float
    moved_one_of_n_equal: float
    ideal_one_of_n: float
    moved_heaviest_leaves: float
    heaviest_share: float
    agents_agree: float
    select_per_s: int


def measure_selector(
    name: str, prepare: SelectorFactory, flows: Flows, table_size: int
) -> SelectorResult:
    hashes = flows.hashes
    weighted = members_of(MEMBER_WEIGHTS)
    equal = members_of([100] * len(MEMBER_WEIGHTS))

    assignment = assign(prepare, hashes, weighted, table_size)
    load = load_ratio(assignment, weighted)

    heaviest = max(weighted, key=lambda member: member.weight)
    without_heaviest = [member for member in weighted if member is not heaviest]
    moved_weighted = moved_fraction(
        assignment, assign(prepare, hashes, without_heaviest, table_size)
    )
    heaviest_share = Counter(assignment)[heaviest.member_id] / len(assignment)

    equal_before = assign(prepare, hashes, equal, table_size)
    moved_equal = moved_fraction(equal_before, assign(prepare, hashes, equal[1:], table_size))

    # Agreement: the same flows arriving at other agents, which have their own state.
    agree = 1 - moved_fraction(assignment, assign(prepare, hashes, weighted, table_size, 1))

    select = prepare(weighted, table_size, 0)
    rate = time_rate(lambda: list(map(select, hashes)), len(hashes), repeats=1)
    return SelectorResult(
        selector=name,
        load_max_over_fair=round(load, 4),
        moved_one_of_n_equal=round(moved_equal, 4),
        ideal_one_of_n=round(1 / len(equal), 4),
        moved_heaviest_leaves=round(moved_weighted, 4),
        heaviest_share=round(heaviest_share, 4),
        agents_agree=round(agree, 4),
        select_per_s=round(rate),
    )


def maglev_build_ms(table_size: int, repeats: int = 7) -> float:
    members = members_of(MEMBER_WEIGHTS)
    return 1000 * statistics.median(
        _elapsed(lambda: MaglevTable.build(members, table_size)) for _ in range(repeats)
    )


def full_path_rate(flows: Flows, table_size: int) -> float:
    pool = Pool(id="bench-pool", load_balancer_id="bench-lb")
    members = [
        Member.model_validate(
            {
                "id": member.member_id,
                "pool_id": pool.id,
                "address": f"10.1.0.{index + 1}",
                "protocol_port": 8443,
                "weight": member.weight,
            }
        )
        for index, member in enumerate(members_of(MEMBER_WEIGHTS))
    ]
    balancer = PoolBalancer(pool, members, table_size=table_size)
    sample = [FlowTuple(*flow) for flow in flows.tuples[:FULL_PATH_FLOWS]]

    def run() -> None:
        for flow in sample:
            balancer.select(flow, now=0.0)

    return time_rate(run, len(sample), repeats=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=1_000_000, help="synthetic flows (1M)")
    parser.add_argument("--agents", type=int, default=4, help="agents doing round robin (4)")
    parser.add_argument(
        "--table-size", type=int, default=DEFAULT_TABLE_SIZE, help="Maglev table size (prime)"
    )
    arguments = parser.parse_args()
    if arguments.flows < 1000:
        parser.error(f"--flows={arguments.flows}: give at least 1000")
    if arguments.agents < 2:
        parser.error(f"--agents={arguments.agents}: give at least 2")
    table_size = check_table_size(arguments.table_size)

    started = time.perf_counter()
    flows = synthetic_flows(arguments.flows, SEED)
    selectors = [
        ("maglev", maglev_selector),
        ("round_robin", round_robin_selector(arguments.agents)),
        ("hash_mod_n", hash_mod_n_selector),
    ]
    results = [measure_selector(name, assign, flows, table_size) for name, assign in selectors]
    build_ms = maglev_build_ms(table_size)
    full_rate = full_path_rate(flows, table_size)
    hash_rate = len(flows.hashes) / flows.hash_seconds

    print(
        f"{arguments.flows:,} flows, {len(MEMBER_WEIGHTS)} members weighted "
        f"{'/'.join(map(str, MEMBER_WEIGHTS))}, Maglev M={table_size}, "
        f"{arguments.agents} round-robin agents"
    )
    header = (
        f"{'selector':<12} {'load max/fair':>13} {'moved 1 of N':>12} {'(1/N)':>7} "
        f"{'moved heavy':>11} {'(share)':>7} {'agree':>6} {'select/s':>11}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        print(
            f"{row.selector:<12} {row.load_max_over_fair:>13.4f} "
            f"{row.moved_one_of_n_equal:>12.4f} {row.ideal_one_of_n:>7.4f} "
            f"{row.moved_heaviest_leaves:>11.4f} {row.heaviest_share:>7.4f} "
            f"{row.agents_agree:>6.3f} {row.select_per_s:>11,}"
        )
    print(
        f"Maglev table build (M={table_size}, 10 members): {build_ms:.1f} ms "
        f"(goal < {BUILD_GOAL_MS:.0f} ms); flow hash: {hash_rate:,.0f}/s; "
        f"PoolBalancer.select: {full_rate:,.0f}/s; load goal <= {LOAD_GOAL}"
    )
    maglev = results[0]
    print(
        json.dumps(
            {
                "bench": "loadbalancer",
                "python": platform.python_version(),
                "machine": platform.machine(),
                "flows": arguments.flows,
                "members": len(MEMBER_WEIGHTS),
                "weights": list(MEMBER_WEIGHTS),
                "table_size": table_size,
                "agents": arguments.agents,
                "maglev_build_ms": round(build_ms, 2),
                "flow_hash_per_s": round(hash_rate),
                "pool_balancer_select_per_s": round(full_rate),
                "maglev_load_goal_met": maglev.load_max_over_fair <= LOAD_GOAL,
                "maglev_build_goal_met": build_ms < BUILD_GOAL_MS,
                "results": [asdict(row) for row in results],
                "seconds": round(time.perf_counter() - started, 1),
            },
            separators=(",", ":"),
        )
    )


if __name__ == "__main__":
    main()
