"""IPv4 fragments on every datapath backend (`hivenet.datapath._fragments`): later fragments
follow their first fragment's verdict and address rewrites (no megaflow, no upcall of their
own); tiny, overlapping, duplicate and orphan fragments are dropped with their own reasons.
The NAT case checks the reassembled datagram: its UDP checksum, updated incrementally in the
first fragment only, must be right for the whole translated datagram."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from hivenet.datapath._fragments import FragmentTracker, ipv4_fragment, later_fragment_actions
from hivenet.datapath.base import Datapath
from hivenet.flows.actions import Output, SetField
from hivenet.packets.builders import ethernet_frame, ipv4_packet, tcp_segment, udp_segment
from hivenet.packets.checksum import transport_checksum
from hivenet.packets.flowmatch import FIELD_NAMES, FULL_MASKS, mask_from
from tests.unit.datapath.fakes import MAC_A, MAC_B
from tests.unit.datapath.rigs import MemoryRig, ReplayRig, Rig

SRC, DST, NAT_SRC = "10.0.0.1", "10.0.0.2", "192.0.2.7"
MF = 0b001
UDP = 17


@pytest.fixture(params=["memory", "userspace-replay"])
def rig(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    made: Rig = MemoryRig() if request.param == "memory" else ReplayRig(monkeypatch.setattr)
    try:
        yield made
    finally:
        made.close()


def fragment(payload: bytes, offset: int, more: bool, ident: int = 7, proto: int = UDP) -> bytes:
    """One fragment: `payload` at byte `offset` (a multiple of 8) of datagram `ident`."""
    packet = ipv4_packet(
        SRC,
        DST,
        proto,
        payload,
        identification=ident,
        flags=MF if more else 0,
        fragment_offset=offset // 8,
    )
    return ethernet_frame(MAC_B, MAC_A, 0x0800, packet)


def fragments(datagram: bytes, size: int = 1480, ident: int = 7) -> list[bytes]:
    """`datagram` (an L4 segment) cut into fragments of `size` bytes (a multiple of 8)."""
    pieces = [datagram[at : at + size] for at in range(0, len(datagram), size)]
    return [
        fragment(piece, index * size, index < len(pieces) - 1, ident)
        for index, piece in enumerate(pieces)
    ]


def big_udp(sport: int = 5000) -> bytes:
    return udp_segment(SRC, DST, sport, 9, bytes(range(256)) * 16)  # 4104 bytes: 3 fragments


def nat_agent(rig: Rig) -> list[tuple[int, bytes]]:
    """An upcall handler acting as the agent: SNAT (address and port) of UDP from port 1 to
    port 2, one megaflow for the 5-tuple, the missed frame executed."""
    upcalls: list[tuple[int, bytes]] = []
    datapath: Datapath = rig.datapath
    actions = [SetField("ip_src", int(ipaddress.IPv4Address(NAT_SRC))), SetField("tp_src", 40000)]
    actions.append(Output(2))

    def handle(port: int, frame: bytes) -> None:
        upcalls.append((port, frame))
        fields = {"in_port": 1, "eth_type": 0x0800, "ip_proto": UDP, "tp_src": 5000}
        match = tuple(fields.get(name, 0) for name in FIELD_NAMES)
        mask = mask_from({name: FULL_MASKS[name] for name in fields})
        datapath.install_flow(match, mask, actions, ["nat"])
        datapath.execute(frame, actions)

    datapath.set_upcall_handler(handle)
    rig.bind(1)
    rig.bind(2)
    return upcalls


def reassemble(frames: list[bytes]) -> tuple[bytes, bytes]:
    """(source address, L4 datagram) of IPv4 fragments (Ethernet frames, any order)."""
    parts = []
    source = b""
    for frame in frames:
        ip = frame[14:]
        header = (ip[0] & 0x0F) * 4
        total = int.from_bytes(ip[2:4], "big")
        offset = (int.from_bytes(ip[6:8], "big") & 0x1FFF) * 8
        parts.append((offset, ip[header:total]))
        source = ip[12:16]
    data = b"".join(piece for _, piece in sorted(parts))
    return source, data


def test_fragments_of_a_nat_datagram_follow_the_first_and_reassemble_right(rig: Rig) -> None:
    upcalls = nat_agent(rig)
    first_datagram = fragments(big_udp(), ident=7)
    second_datagram = fragments(big_udp(), ident=8)
    rig.send_from_vm(1, *first_datagram, *second_datagram)
    # One upcall (the first fragment of the first datagram); the second's hits the megaflow.
    assert upcalls == [(1, first_datagram[0])]
    out = rig.delivered(2)
    assert len(out) == 6
    for datagram in (out[:3], out[3:]):
        source, l4 = reassemble(datagram)
        assert source == ipaddress.IPv4Address(NAT_SRC).packed
        assert int.from_bytes(l4[0:2], "big") == 40000  # rewritten in the first fragment only
        # The UDP checksum covers the whole datagram and the new pseudo-header: still right.
        assert transport_checksum(source, ipaddress.IPv4Address(DST).packed, UDP, l4) == 0
        assert l4[8:] == bytes(range(256)) * 16
    counters = rig.datapath.counters()
    assert not any(name.startswith("drop.") for name in counters), counters


def test_a_later_fragment_without_its_first_is_dropped_not_upcalled(rig: Rig) -> None:
    upcalls = nat_agent(rig)
    _first, *later = fragments(big_udp(), ident=9)
    rig.send_from_vm(1, *later)
    assert upcalls == [] and rig.delivered(2) == []
    assert rig.datapath.counters()["drop.fragment_no_first"] == 2


def test_tiny_fragments_are_dropped_with_their_reason(rig: Rig) -> None:
    upcalls = nat_agent(rig)
    tcp = tcp_segment(SRC, DST, 5000, 22, payload=b"y" * 64)
    tiny_first_tcp = fragment(tcp[:16], 0, True, ident=10, proto=6)  # half a TCP header
    short_middle = fragment(b"z" * 12, 8, True, ident=11)  # MF set, not a multiple of 8
    empty_first = fragment(b"", 0, True, ident=12)
    rig.send_from_vm(1, tiny_first_tcp, short_middle, empty_first)
    assert upcalls == [] and rig.delivered(2) == []
    assert rig.datapath.counters()["drop.fragment_tiny"] == 3


def test_overlapping_fragments_drop_the_rest_of_their_datagram(rig: Rig) -> None:
    upcalls = nat_agent(rig)
    first, second, last = fragments(big_udp(), ident=13)
    ip_payload = big_udp()
    overlapping = fragment(ip_payload[1472 : 1472 + 16], 1472, True, ident=13)
    rig.send_from_vm(1, first, overlapping, second, last)
    assert len(upcalls) == 1
    assert len(rig.delivered(2)) == 1  # only the first fragment left
    assert rig.datapath.counters()["drop.fragment_overlap"] == 3


def test_a_duplicate_fragment_is_dropped_once_and_the_datagram_goes_on(rig: Rig) -> None:
    nat_agent(rig)
    first, second, last = fragments(big_udp(), ident=14)
    rig.send_from_vm(1, first, second, second, last)
    assert len(rig.delivered(2)) == 3
    assert rig.datapath.counters()["drop.fragment_duplicate"] == 1


def test_later_fragments_of_a_dropped_first_fragment_are_dropped(rig: Rig) -> None:
    datapath = rig.datapath
    datapath.set_upcall_handler(lambda port, frame: datapath.execute(frame, []))
    rig.bind(1)
    rig.bind(2)
    rig.send_from_vm(1, *fragments(big_udp(), ident=15))
    assert rig.delivered(2) == []
    assert datapath.counters()["drop.flow_no_actions"] == 3


def test_the_tracker_is_bounded_and_expires() -> None:
    tracker = FragmentTracker(capacity=2, timeout=5.0)
    parsed = [ipv4_fragment(fragments(big_udp(), ident=ident)[0], 1)[0] for ident in (1, 2, 3)]
    later = [ipv4_fragment(fragments(big_udp(), ident=ident)[1], 1)[0] for ident in (1, 2, 3)]
    for first in parsed:
        assert first is not None and tracker.first(first, 0.0) is None
        tracker.record(first.key, (Output(2),))
    assert len(tracker) == 2 and tracker.evictions == 1
    assert later[0] is not None and tracker.later(later[0], 1.0)[2] == "fragment_no_first"
    assert later[1] is not None and tracker.later(later[1], 1.0)[0] == (Output(2),)
    assert later[2] is not None and tracker.later(later[2], 6.0)[2] == "fragment_no_first"
    assert len(tracker) == 0
    with pytest.raises(ValueError, match="capacity"):
        FragmentTracker(capacity=0)


def test_later_fragments_keep_address_rewrites_only() -> None:
    actions = (SetField("ip_src", 1), SetField("tp_src", 2), SetField("icmp_id", 3), Output(4))
    assert later_fragment_actions(actions) == (SetField("ip_src", 1), Output(4))


def test_non_fragments_and_broken_frames_are_not_the_trackers() -> None:
    whole = ethernet_frame(MAC_B, MAC_A, 0x0800, ipv4_packet(SRC, DST, UDP, big_udp()[:100]))
    assert ipv4_fragment(whole, 1) == (None, None)
    assert ipv4_fragment(fragments(big_udp())[1][:30], 1) == (None, None)  # truncated
