"""Megaflow mask helpers shared by the port-ingress services (sim/dhcp.py, sim/metadata.py).
Pure."""

from __future__ import annotations


def differing_mask(value: int, wanted: int, width: int = 16) -> int:
    """The fewest leading bits of a `width`-bit field that already tell `value` from
    `wanted`: every value with those bits differs from `wanted` too (a megaflow that is
    not "tp_dst == value" for all the other ports)."""
    full = (1 << width) - 1
    if value == wanted:
        return full
    lowest = (value ^ wanted).bit_length() - 1
    return full & ~((1 << lowest) - 1)
