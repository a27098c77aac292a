"""Benchmark of the packets hot path: `extract_flow_match` per second on a mix of frames
against scapy dissecting the same frames (the ratio is the point), the generic parser for
reference, and rewrite throughput. Prints a table, then exactly one JSON line."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from hivenet.packets import (
    build_arp_request,
    build_echo_request,
    build_neighbor_solicitation,
    build_tcp_segment,
    build_udp_datagram,
    dec_ttl,
    extract_flow_match,
    parse_frame,
    push_vlan,
    rewrite_frame,
)

MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"


def frame_mix() -> list[bytes]:
    return [
        build_tcp_segment(
            eth_src=MAC_A,
            eth_dst=MAC_B,
            ip_src="10.0.0.1",
            ip_dst="10.0.0.2",
            src_port=40000,
            dst_port=80,
            flags=0x18,
            payload=b"x" * 100,
        ),
        build_udp_datagram(
            eth_src=MAC_A,
            eth_dst=MAC_B,
            ip_src="10.0.0.1",
            ip_dst="10.0.0.2",
            src_port=5000,
            dst_port=53,
            payload=b"q" * 40,
            vlan=10,
        ),
        build_echo_request(
            eth_src=MAC_A,
            eth_dst=MAC_B,
            ip_src="10.0.0.1",
            ip_dst="10.0.0.2",
            identifier=1,
            sequence=1,
            payload=b"p" * 56,
        ),
        build_arp_request(sender_mac=MAC_A, sender_ip="10.0.0.1", target_ip="10.0.0.2"),
        build_tcp_segment(
            eth_src=MAC_A,
            eth_dst=MAC_B,
            ip_src="2001:db8::1",
            ip_dst="2001:db8::2",
            src_port=40000,
            dst_port=443,
            payload=b"y" * 100,
        ),
        build_neighbor_solicitation(src_mac=MAC_A, src_ip="fe80::1", target_ip="fe80::2"),
    ]


def rate(operation: Callable[[bytes], object], frames: list[bytes], seconds: float = 0.5) -> float:
    """Operations per second, running over `frames` round-robin for about `seconds`."""
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for frame in frames:
            operation(frame)
        count += len(frames)
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def main() -> None:
    from scapy.layers.inet import IP  # noqa: F401  (register dissectors before timing)
    from scapy.layers.inet6 import IPv6  # noqa: F401
    from scapy.layers.l2 import Ether

    frames = frame_mix()
    tcp_v4 = [frames[0]]
    results = {
        "extract_flow_match_per_s": rate(lambda frame: extract_flow_match(frame, 1), frames),
        "generic_parse_per_s": rate(parse_frame, frames),
        "scapy_parse_per_s": rate(Ether, frames),
        "rewrite_ip_src_per_s": rate(
            lambda frame: rewrite_frame(frame, "ip_src", 0x0A000063), tcp_v4
        ),
        "rewrite_tp_dst_per_s": rate(lambda frame: rewrite_frame(frame, "tp_dst", 8080), tcp_v4),
        "dec_ttl_per_s": rate(dec_ttl, tcp_v4),
        "push_vlan_per_s": rate(lambda frame: push_vlan(frame, 100), tcp_v4),
    }
    results["ratio_vs_scapy"] = results["extract_flow_match_per_s"] / results["scapy_parse_per_s"]
    print(f"{'measure':32} {'value':>14}")
    print("-" * 47)
    for name, value in results.items():
        print(f"{name:32} {value:14,.1f}")
    print(
        json.dumps(
            {
                "bench": "packets",
                "frames_in_mix": len(frames),
                **{name: round(value, 2) for name, value in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
