"""`hivenet.packets.mtu`: the size check every datapath and the simulation share."""

from __future__ import annotations

import pytest

from hivenet.flows.table import FlowTable
from hivenet.packets import build_arp_request
from hivenet.packets.builders import ethernet_frame, ipv4_packet, ipv6_packet, udp_segment
from hivenet.packets.flowmatch import EMPTY_MASK
from hivenet.packets.mtu import FITS, TOO_BIG, TOO_BIG_NO_DF, ip_size, mtu_verdict

MAC_A, MAC_B = "02:00:00:00:00:01", "02:00:00:00:00:02"


def v4(size: int, *, df: bool, vlan: int = 0) -> bytes:
    segment = udp_segment("10.0.0.1", "10.0.0.2", 1, 2, bytes(size - 28))
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", 17, segment, flags=0b010 if df else 0)
    return ethernet_frame(MAC_B, MAC_A, 0x0800, packet, vlan)


def v6(size: int) -> bytes:
    segment = udp_segment("2001:db8::1", "2001:db8::2", 1, 2, bytes(size - 48))
    return ethernet_frame(
        MAC_B, MAC_A, 0x86DD, ipv6_packet("2001:db8::1", "2001:db8::2", 17, segment)
    )


@pytest.mark.parametrize("vlan", [0, 7])
def test_ipv4_by_its_total_length_and_df(vlan: int) -> None:
    assert ip_size(v4(600, df=True, vlan=vlan)) == (4, 600, False)
    assert mtu_verdict(v4(600, df=True, vlan=vlan), 600) == FITS
    assert mtu_verdict(v4(601, df=True, vlan=vlan), 600) == TOO_BIG
    assert mtu_verdict(v4(601, df=False, vlan=vlan), 600) == TOO_BIG_NO_DF
    assert mtu_verdict(v4(601, df=True, vlan=vlan), 0) == FITS  # no limit


def test_ipv6_is_never_fragmented_on_the_way() -> None:
    assert ip_size(v6(1300)) == (6, 1300, False)
    assert mtu_verdict(v6(1300), 1299) == TOO_BIG
    assert mtu_verdict(v6(1300), 1300) == FITS


def test_gso_segments_and_offsets_and_non_ip() -> None:
    frame = v4(3000, df=True)
    assert mtu_verdict(frame, 1500, segment_length=1500) == FITS
    assert mtu_verdict(frame, 1500, segment_length=1501) == TOO_BIG
    assert mtu_verdict(bytes(10) + v4(601, df=True), 600, start=10) == TOO_BIG
    arp = build_arp_request(sender_mac=MAC_A, sender_ip="10.0.0.1", target_ip="10.0.0.2")
    assert ip_size(arp) is None and mtu_verdict(arp, 1) == FITS
    assert ip_size(v4(600, df=True)[:16]) is None


def test_a_flow_mtu_must_fit_16_bits() -> None:
    table = FlowTable()
    assert table.install(EMPTY_MASK, EMPTY_MASK, [], [], 0.0, mtu=1450).mtu == 1450
    for bad in (-1, 65536, 1.5, True):
        with pytest.raises(ValueError, match="mtu"):
            table.install(EMPTY_MASK, EMPTY_MASK, [], [], 0.0, mtu=bad)  # type: ignore[arg-type]
