"""Conversions between the address forms HiveNet passes around: MACs and IPs as ints (as in
`FlowMatch` and the header types), as strings ("02:00:00:00:00:01", "10.0.0.1") and as
`ipaddress` objects (as in `hivenet.model`). Owns nothing else."""

from __future__ import annotations

import ipaddress

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MacLike = int | str
IpLike = IpAddress | str

BROADCAST_MAC = 0xFFFF_FFFF_FFFF


def mac_to_int(mac: MacLike) -> int:
    """A MAC as a 48-bit int; accepts an int or "aa:bb:cc:dd:ee:ff" / "aa-bb-..." text."""
    if isinstance(mac, int) and not isinstance(mac, bool):
        if not 0 <= mac <= BROADCAST_MAC:
            raise ValueError(f"mac: {mac!r} does not fit in 48 bits")
        return mac
    if isinstance(mac, str):
        digits = mac.replace(":", "").replace("-", "")
        if len(digits) == 12:
            try:
                return int(digits, 16)
            except ValueError:
                pass
    raise ValueError(f"mac: {mac!r} is not a MAC address")


def mac_to_str(mac: int) -> str:
    return ":".join(f"{byte:02x}" for byte in mac_to_int(mac).to_bytes(6, "big"))


def ip_address(value: IpLike) -> IpAddress:
    """An `ipaddress` object from text or an address object (ints are ambiguous: v4 or v6)."""
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    if isinstance(value, str):
        try:
            return ipaddress.ip_address(value)
        except ValueError:
            pass
    raise ValueError(f"ip: {value!r} is not an IPv4 or IPv6 address")


def solicited_node_multicast(address: IpLike) -> ipaddress.IPv6Address:
    """ff02::1:ffXX:XXXX for the low 24 bits of `address` (RFC 4291 2.7.1)."""
    low = int(ip_address(address)) & 0xFFFFFF
    return ipaddress.IPv6Address((0xFF02 << 112) | (0x1FF << 24) | low)


def multicast_mac(address: IpLike) -> int:
    """The Ethernet group address of an IPv6 multicast address: 33:33 + its low 32 bits."""
    return (0x3333 << 32) | (int(ip_address(address)) & 0xFFFFFFFF)
