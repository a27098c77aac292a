"""Benchmark of the flow-state tables (`hivenet.flowstate`): conntrack inserts (classify +
commit of an opening packet) and return-flow lookups per second, memory per tracked
connection (tracemalloc) and per 100k connections, SNAT allocations per second, and wire
encoding/decoding rate; each against a plain dict of tuples doing the nearest equivalent in
the same run (the ratio is what the real table's bookkeeping costs: key derivation, TCP
state, the expiry wheel and the push queue).

Owns nothing but this measurement; touches no network, writes no files. Prints a human
table, then exactly one JSON line. Usage: `python bench/flowstate_tables.py [--quick]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import time
import tracemalloc
from collections.abc import Callable

from hivenet.flowstate import (
    ConntrackTable,
    FlowKey,
    NatRange,
    NatTable,
    PortBlockAllocator,
    decode,
    encode_batches,
)
from hivenet.flowstate.keys import key_of_match
from hivenet.packets.flowmatch import ETH_TYPE_IPV4, FlowMatch

SEED = 20240611
TCP_SYN, TCP_SYN_ACK = 0x02, 0x12
ZONE = "router-0001"


def make_packets(count: int, rng: random.Random) -> tuple[list[FlowMatch], list[FlowMatch]]:
    """`count` distinct opening SYNs (client -> server) and their SYN-ACKs."""
    seen: set[tuple[int, int, int, int]] = set()
    forward: list[FlowMatch] = []
    replies: list[FlowMatch] = []
    while len(forward) < count:
        src = 0x0A000000 | rng.getrandbits(16)
        dst = rng.getrandbits(32) | 0x01000000
        sport, dport = rng.randrange(1024, 65536), rng.choice((80, 443, 8080, 22))
        if (src, dst, sport, dport) in seen:
            continue
        seen.add((src, dst, sport, dport))
        forward.append(
            FlowMatch(
                eth_type=ETH_TYPE_IPV4,
                ip_src=src,
                ip_dst=dst,
                ip_proto=6,
                tp_src=sport,
                tp_dst=dport,
                tcp_flags=TCP_SYN,
            )
        )
        replies.append(
            FlowMatch(
                eth_type=ETH_TYPE_IPV4,
                ip_src=dst,
                ip_dst=src,
                ip_proto=6,
                tp_src=dport,
                tp_dst=sport,
                tcp_flags=TCP_SYN_ACK,
            )
        )
    return forward, replies


def best_rate(function: Callable[[], int], repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        operations = function()
        elapsed = time.perf_counter() - start
        best = max(best, operations / elapsed)
    return best


def measured_bytes(build: Callable[[], object]) -> tuple[int, object]:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    built = build()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before, built


def conntrack_case(count: int, repeats: int, rng: random.Random) -> dict[str, float]:
    forward, replies = make_packets(count, rng)

    def table_inserts() -> int:
        table = ConntrackTable()
        track = table.track
        for match in forward:
            track(ZONE, match, 1.0)
        assert len(table) == count
        return count

    def dict_inserts() -> int:
        # Baseline: key from the match fields, stored with a (state, expiry) tuple.
        states: dict[tuple[str, tuple[int, ...]], tuple[int, float]] = {}
        for match in forward:
            key = (4, match.ip_src, match.ip_dst, match.ip_proto, match.tp_src, match.tp_dst)
            if (ZONE, key) not in states:
                states[(ZONE, key)] = (1, 121.0)
        return len(states)

    table = ConntrackTable()
    for match in forward:
        table.track(ZONE, match, 1.0)
    baseline = {
        (ZONE, (4, m.ip_src, m.ip_dst, m.ip_proto, m.tp_src, m.tp_dst)): (1, 121.0) for m in forward
    }

    def table_lookups() -> int:
        is_return = table.is_return_flow
        found = 0
        for match in replies:
            found += is_return(ZONE, match, 2.0)
        assert found == count
        return count

    def dict_lookups() -> int:
        found = 0
        for match in replies:
            key = (4, match.ip_dst, match.ip_src, match.ip_proto, match.tp_dst, match.tp_src)
            found += (ZONE, key) in baseline
        return found

    insert_rate = best_rate(table_inserts, repeats)
    dict_insert_rate = best_rate(dict_inserts, repeats)
    lookup_rate = best_rate(table_lookups, repeats)
    dict_lookup_rate = best_rate(dict_lookups, repeats)

    def build_table() -> ConntrackTable:
        built = ConntrackTable()
        for match in forward:
            built.track(ZONE, match, 1.0)
        return built

    def build_dict() -> dict[tuple[str, tuple[int, ...]], tuple[int, float]]:
        return {
            (ZONE, (4, m.ip_src, m.ip_dst, m.ip_proto, m.tp_src, m.tp_dst)): (1, 121.0 + i)
            for i, m in enumerate(forward)
        }

    table_bytes, _ = measured_bytes(build_table)
    dict_bytes, _ = measured_bytes(build_dict)
    return {
        "connections": count,
        "insert_per_s": round(insert_rate),
        "dict_insert_per_s": round(dict_insert_rate),
        "insert_ratio_vs_dict": round(insert_rate / dict_insert_rate, 4),
        "lookup_per_s": round(lookup_rate),
        "dict_lookup_per_s": round(dict_lookup_rate),
        "lookup_ratio_vs_dict": round(lookup_rate / dict_lookup_rate, 4),
        "bytes_per_connection": round(table_bytes / count, 1),
        "dict_bytes_per_connection": round(dict_bytes / count, 1),
        "mib_per_100k": round(table_bytes / count * 100_000 / 2**20, 2),
        "dict_mib_per_100k": round(dict_bytes / count * 100_000 / 2**20, 2),
        "memory_ratio_vs_dict": round(table_bytes / dict_bytes, 3),
    }


def nat_case(count: int, repeats: int, rng: random.Random) -> dict[str, float]:
    forward, _ = make_packets(count, rng)
    keys = [key_of_match(match) for match in forward]
    target = NatRange.parse("203.0.113.1", "203.0.113.4", 1024, 65535)

    def table_allocations() -> int:
        allocator = PortBlockAllocator()
        allocator.claim_all(target)
        table = NatTable(allocator)
        snat = table.snat
        for key in keys:
            assert key is not None
            snat(ZONE, key, [target], 1.0)
        assert len(table) == count
        return count

    def dict_allocations() -> int:
        # Baseline: a counter picks the port, a dict holds original -> translated and a
        # second one the reverse mapping.
        forward_map: dict[tuple[int, ...], tuple[int, ...]] = {}
        reverse_map: dict[tuple[int, ...], tuple[int, ...]] = {}
        next_port = 1024
        for key in keys:
            assert key is not None
            translated = (4, 0xCB007101, key[2], key[3], next_port, key[5])
            next_port = next_port + 1 if next_port < 65535 else 1024
            forward_map[tuple(key)] = translated
            reverse_map[translated] = tuple(key)
        return len(forward_map)

    rate = best_rate(table_allocations, repeats)
    dict_rate = best_rate(dict_allocations, repeats)
    return {
        "bindings": count,
        "snat_alloc_per_s": round(rate),
        "dict_alloc_per_s": round(dict_rate),
        "alloc_ratio_vs_dict": round(rate / dict_rate, 4),
    }


def wire_case(count: int, repeats: int, rng: random.Random) -> dict[str, float]:
    forward, _ = make_packets(count, rng)
    table = ConntrackTable()
    for match in forward:
        table.track(ZONE, match, 1.0)
    records = table.snapshot(1.0)
    messages = encode_batches(records, now=1.0)

    def encode_all() -> int:
        return sum(1 for _ in encode_batches(records, now=1.0)) and count

    def decode_all() -> int:
        return sum(len(decode(message, 2.0)) for message in messages)

    encoded_bytes = sum(len(message) for message in messages)
    return {
        "entries": count,
        "encode_per_s": round(best_rate(encode_all, repeats)),
        "decode_per_s": round(best_rate(decode_all, repeats)),
        "wire_bytes_per_entry": round(encoded_bytes / count, 1),
        "messages": len(messages),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k connections, one repeat")
    arguments = parser.parse_args()
    count = 10_000 if arguments.quick else 100_000
    repeats = 1 if arguments.quick else 3
    rng = random.Random(SEED)
    FlowKey(4, 1, 2, 6, 3, 4)  # import check: the package loads

    conntrack = conntrack_case(count, repeats, rng)
    nat = nat_case(min(count, 50_000), repeats, rng)
    wire = wire_case(min(count, 20_000), repeats, rng)

    rows = [
        (
            "conntrack insert (classify+commit)",
            conntrack["insert_per_s"],
            conntrack["dict_insert_per_s"],
            "/s",
        ),
        (
            "conntrack return lookup",
            conntrack["lookup_per_s"],
            conntrack["dict_lookup_per_s"],
            "/s",
        ),
        (
            "bytes per connection",
            conntrack["bytes_per_connection"],
            conntrack["dict_bytes_per_connection"],
            "B",
        ),
        (
            "MiB per 100k connections",
            conntrack["mib_per_100k"],
            conntrack["dict_mib_per_100k"],
            "MiB",
        ),
        ("SNAT allocations", nat["snat_alloc_per_s"], nat["dict_alloc_per_s"], "/s"),
    ]
    header = f"{'measure':<36} {'flowstate':>12} {'plain dict':>12} {'ratio':>7}"
    print(f"{count:,} connections (NAT: {nat['bindings']:,} bindings)")
    print(header)
    print("-" * len(header))
    for name, value, baseline, unit in rows:
        print(f"{name:<36} {value:>12,.1f} {baseline:>12,.1f} {value / baseline:>7.3f}  {unit}")
    print(
        f"wire: {wire['encode_per_s']:,} entries/s encoded, {wire['decode_per_s']:,} decoded, "
        f"{wire['wire_bytes_per_entry']} bytes/entry"
    )
    print(
        json.dumps(
            {
                "bench": "flowstate_tables",
                "python": platform.python_version(),
                "machine": platform.machine(),
                "conntrack": conntrack,
                "nat": nat,
                "wire": wire,
            },
            separators=(",", ":"),
        )
    )


if __name__ == "__main__":
    main()
