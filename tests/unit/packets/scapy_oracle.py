"""scapy as a checksum oracle: recompute every checksum of a frame and compare."""

from __future__ import annotations

import scapy.layers.inet
import scapy.layers.inet6
from scapy.layers.l2 import Ether
from scapy.packet import Packet

assert scapy.layers.inet  # the IPv4 dissectors, likewise

CHECKSUM_FIELDS = ("chksum", "cksum")


def _own_fields(layer: Packet) -> set[str]:
    return {field.name for field in layer.fields_desc}


def recomputed_by_scapy(frame: bytes) -> bytes:
    """`frame` with every checksum scapy knows (IP, TCP, UDP, ICMP, ICMPv6) recomputed.

    A UDP checksum of 0 over IPv4 means "none" and is kept, as RFC 768 allows.
    """
    packet = Ether(frame)
    layer: Packet = packet
    while layer and layer.name != "NoPayload":
        # Quoted headers inside ICMP errors (IPerror, UDPerror6, ...) keep their values.
        quoted = "error" in type(layer).__name__
        for name in CHECKSUM_FIELDS:
            if name not in _own_fields(layer) or quoted:
                continue
            if layer.name == "UDP" and layer.getfieldval(name) == 0:
                continue
            # delattr (not fields.pop) also drops scapy's cache of the dissected bytes
            delattr(layer, name)
        layer = layer.payload
    return bytes(packet)


def checksums_valid(frame: bytes) -> bool:
    return recomputed_by_scapy(frame) == frame
