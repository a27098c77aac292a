"""`packets.icmp_quote.rewrite_icmp_quote`, checked against scapy: after rewriting the quoted
datagram of an ICMP/ICMPv6 error, every checksum scapy recomputes matches the frame's."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import ICMPv6TimeExceeded, IPerror6, IPv6
from scapy.layers.inet6 import UDPerror as UDPerror6
from scapy.layers.l2 import Ether

from hivenet.packets.errors import RewriteError
from hivenet.packets.icmp_quote import rewrite_icmp_quote


def _checksums_ok(frame: bytes) -> None:
    """Rebuild with scapy (checksums recomputed) and compare byte for byte."""
    packet = Ether(frame)
    for layer in (IP, ICMP, IPerror, TCPerror, UDPerror):
        if packet.haslayer(layer) and hasattr(packet[layer], "chksum"):
            del packet[layer].chksum
    if packet.haslayer(IPv6):
        for layer in (ICMPv6TimeExceeded,):
            if packet.haslayer(layer):
                del packet[layer].cksum
    assert bytes(packet) == frame


def v4_error(inner_proto: str, quote_bytes: int = 8) -> bytes:
    if inner_proto == "tcp":
        inner = IP(src="203.0.113.2", dst="198.51.100.7") / TCP(sport=20000, dport=80, flags="S")
    elif inner_proto == "udp":
        inner = IP(src="203.0.113.2", dst="198.51.100.7") / UDP(sport=20000, dport=53)
    else:
        inner = IP(src="203.0.113.2", dst="198.51.100.7") / ICMP(type=8, id=20000, seq=1)
    raw = bytes(inner)[: 20 + quote_bytes]
    error = (
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="198.51.100.254", dst="203.0.113.2")
        / ICMP(type=11, code=0)
        / raw
    )
    return bytes(error)


@pytest.mark.parametrize("inner_proto", ["tcp", "udp", "icmp"])
@pytest.mark.parametrize("quote_bytes", [8, 20])
def test_quote_rewritten_and_checksums_consistent(inner_proto: str, quote_bytes: int) -> None:
    frame = v4_error(inner_proto, quote_bytes)
    rewrites = {"ip_src": 0x0A00000B}
    if inner_proto == "icmp":
        rewrites["icmp_id"] = 7
    else:
        rewrites["tp_src"] = 40000
    out = rewrite_icmp_quote(frame, rewrites)
    quoted = Ether(out)[IPerror]
    assert quoted.src == "10.0.0.11" and quoted.dst == "198.51.100.7"
    if inner_proto == "tcp":
        assert quoted[TCPerror].sport == 40000
    elif inner_proto == "udp":
        assert quoted[UDPerror].sport == 40000
    else:
        assert Ether(out)[IPerror].payload.id == 7
    _checksums_ok(out)
    # The outer headers are untouched (the datapath's SetField actions do those).
    assert Ether(out)[IP].dst == "203.0.113.2"


def test_a_wrong_checksum_stays_wrong_by_the_same_amount() -> None:
    frame = bytearray(v4_error("udp"))
    frame[36] ^= 0x01  # corrupt the ICMP checksum
    out = rewrite_icmp_quote(bytes(frame), {"ip_src": 0x0A00000B})
    fixed = bytearray(out)
    fixed[36] ^= 0x01
    _checksums_ok(bytes(fixed))


def test_icmpv6_error_quote() -> None:
    inner = IPv6(src="2001:db8::2", dst="2001:db8:1::7") / UDP(sport=20000, dport=53)
    frame = bytes(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IPv6(src="2001:db8:1::fe", dst="2001:db8::2")
        / ICMPv6TimeExceeded()
        / bytes(inner)
    )
    out = rewrite_icmp_quote(
        frame,
        {
            "ip_src": int.from_bytes(bytes.fromhex("20010db8" + "0" * 22 + "0b"), "big"),
            "tp_src": 5353,
        },
    )
    quoted = Ether(out)[IPerror6]
    assert quoted.src == "2001:db8::b" and quoted[UDPerror6].sport == 5353
    # Both the quoted UDP checksum (over the quoted pseudo-header) and ICMPv6's hold.
    rebuilt = Ether(out)
    del rebuilt[ICMPv6TimeExceeded].cksum
    del rebuilt[UDPerror6].chksum
    assert bytes(rebuilt) == out


def test_bad_input_names_the_field() -> None:
    with pytest.raises(RewriteError, match="ip_ttl"):
        rewrite_icmp_quote(v4_error("udp"), {"ip_ttl": 1})
    with pytest.raises(RewriteError, match="icmp_id"):
        rewrite_icmp_quote(v4_error("udp"), {"icmp_id": 1})
    plain = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=8))
    with pytest.raises(RewriteError, match="not an ICMP"):
        rewrite_icmp_quote(plain, {"ip_src": 1})
