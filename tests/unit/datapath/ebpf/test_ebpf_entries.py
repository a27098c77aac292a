"""Kernel entries computed from megaflows (`hivenet.datapath.ebpf.entries`), without a kernel:
which packets get a key and what it holds, which megaflows an exact entry may stand for, and
which action lists become a kernel record (tests/e2e/test_ebpf_programs.py runs the records in
the kernel against `execute_actions`)."""

from __future__ import annotations

import pytest

from hivenet.datapath.ebpf import entries
from hivenet.flows.actions import Action, DecTtl, Drop, Output, PopVlan, PushVlan, SetField, Tunnel
from hivenet.flows.table import flow_match_values
from hivenet.packets import build_arp_request, extract_flow_match
from hivenet.packets.builders import build_echo_request, build_tcp_segment
from hivenet.packets.flowmatch import FIELD_NAMES, FULL_MASKS, mask_from
from tests.unit.datapath.ebpf.kernel_fake import TUNNEL_IFINDEX, decode_entry
from tests.unit.datapath.fakes import MAC_A, MAC_B, udp_frame

IFINDEX = 7


def values_of(frame: bytes) -> tuple[int, ...]:
    return flow_match_values(extract_flow_match(frame, 1))


def tcp(flags: int) -> bytes:
    return build_tcp_segment(
        eth_src=MAC_A, eth_dst=MAC_B, ip_src="10.0.0.1", ip_dst="10.0.0.2",
        src_port=40000, dst_port=80, flags=flags,
    )  # fmt: skip


def test_a_udp_key_holds_the_fields_the_program_reads_in_network_order() -> None:
    key = entries.kernel_key(values_of(udp_frame(src_port=1000)), IFINDEX)
    assert key is not None
    (ifindex, ip_src, ip_dst, tp_src, tp_dst, eth_src, eth_dst, proto, tos, ttl, icmp_type,
     icmp_code, icmp_id) = entries.FLOW_KEY.unpack(key)  # fmt: skip
    assert ifindex == IFINDEX
    assert (ip_src, ip_dst) == (bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    assert (tp_src, tp_dst) == ((1000).to_bytes(2, "big"), (9).to_bytes(2, "big"))
    assert (eth_src.hex(), eth_dst.hex()) == ("020000000001", "020000000002")
    assert (proto, tos, ttl, icmp_type, icmp_code, icmp_id) == (17, 0, 64, 0, 0, b"\0\0")


def test_keys_differ_by_port_and_by_five_tuple() -> None:
    keys = {
        entries.kernel_key(values_of(udp_frame(src_port=1000)), IFINDEX),
        entries.kernel_key(values_of(udp_frame(src_port=1001)), IFINDEX),
        entries.kernel_key(values_of(udp_frame(src_port=1000)), IFINDEX + 1),
    }
    assert len(keys) == 3 and None not in keys


@pytest.mark.parametrize(
    ("name", "frame"),
    [
        ("arp", build_arp_request(sender_mac=MAC_A, sender_ip="10.0.0.1", target_ip="10.0.0.2")),
        ("vlan", udp_frame()[:12] + b"\x81\x00\x00\x05" + udp_frame()[12:]),
        ("tcp_syn", tcp(0x02)),
        ("tcp_fin", tcp(0x11)),
        ("tcp_rst", tcp(0x14)),
    ],
)
def test_packets_the_program_never_keys_get_no_key(name: str, frame: bytes) -> None:
    assert entries.kernel_key(values_of(frame), IFINDEX) is None, name


def test_established_tcp_and_icmp_echo_get_keys() -> None:
    assert entries.kernel_key(values_of(tcp(0x10)), IFINDEX) is not None
    assert entries.kernel_key(values_of(tcp(0x18)), IFINDEX) is not None
    echo = build_echo_request(
        eth_src=MAC_A, eth_dst=MAC_B, ip_src="10.0.0.1", ip_dst="10.0.0.2",
        identifier=77, sequence=1,
    )  # fmt: skip
    key = entries.kernel_key(values_of(echo), IFINDEX)
    assert key is not None and entries.FLOW_KEY.unpack(key)[-1] == (77).to_bytes(2, "big")


def test_an_exact_entry_stands_for_a_megaflow_only_if_it_ignores_tcp_flags_but_syn_fin_rst() -> (
    None
):
    assert entries.mask_allows_exact_entry(mask_from({"ip_dst": FULL_MASKS["ip_dst"]}))
    assert entries.mask_allows_exact_entry(mask_from({"tcp_flags": 0x07}))
    assert not entries.mask_allows_exact_entry(mask_from({"tcp_flags": 0x10}))
    assert not entries.mask_allows_exact_entry(tuple(FULL_MASKS[n] for n in FIELD_NAMES))


PORTS = {2: 20, 3: 30}


@pytest.mark.parametrize(
    "actions",
    [
        [Output(2)],
        [SetField("eth_dst", 0x0200000000FF), SetField("ip_dst", 0xC0A80001), DecTtl(), Output(3)],
        [SetField("ip_src", 0xC0A80002), SetField("tp_src", 4000), Tunnel("172.31.250.9", 70)],
    ],
)
def test_rewrites_and_one_output_become_a_record_that_decodes_to_the_same_actions(
    actions: list[Action],
) -> None:
    entry = entries.kernel_entry(values_of(udp_frame()), actions, PORTS, TUNNEL_IFINDEX)
    assert entry is not None
    assert decode_entry(entry.value, {index: key for key, index in PORTS.items()}) == actions
    last = actions[-1]
    assert entry.output_port == (last.port_key if isinstance(last, Output) else None)


@pytest.mark.parametrize(
    ("name", "actions"),
    [
        ("flood", [Output(2), Output(3)]),
        ("drop", [Drop("rule")]),
        ("no_actions", []),
        ("push_vlan", [PushVlan(5), Output(2)]),
        ("pop_vlan", [PopVlan(), Output(2)]),
        ("tos", [SetField("ip_tos", 4), Output(2)]),
        ("unbound_port", [Output(9)]),
        ("ipv6_tunnel", [Tunnel("fd00::1", 70)]),
        ("rewrite_after_output", [Output(2), SetField("eth_dst", 1)]),
        ("two_ttl_decrements", [DecTtl(), DecTtl(), Output(2)]),
    ],
)
def test_what_the_kernel_cannot_do_stays_in_userspace(name: str, actions: list[Action]) -> None:
    assert entries.kernel_entry(values_of(udp_frame()), actions, PORTS, 99) is None, name


def test_a_tunnel_needs_the_vxlan_device_and_a_ttl_decrement_a_ttl_above_one() -> None:
    assert (
        entries.kernel_entry(values_of(udp_frame()), [Tunnel("10.1.1.1", 5)], PORTS, None) is None
    )
    last_hop = bytearray(udp_frame())
    last_hop[14 + 8] = 1
    assert entries.kernel_entry(values_of(bytes(last_hop)), [DecTtl(), Output(2)], PORTS, 9) is None
