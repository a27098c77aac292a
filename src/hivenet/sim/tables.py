"""Shared forwarding tables as the simulation sees them: learned MAC entries
(bridge, vlan, mac) -> port and ARP/ND entries (router, ip) -> mac, plus their flow tags.

Owns the `TablesView` protocol the engine reads, the learned-entry value types the engine
returns (`LearnedMac`, `LearnedNeighbour`), the tag spelling of table entries, and
`MemoryTables`, a plain in-memory implementation (tests, the multi-host harness, and the
agent's local replica of the shared tables). Publishing entries to the store is the agent's
job, not this module's. Pure: no I/O, no clock.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Protocol

from hivenet.model.types import int_to_mac


def mac_text(mac: int) -> str:
    # Same text as int_to_mac (lowercase, colons) in one C call: tags are spelled per flow.
    if 0 <= mac < 1 << 48:
        return mac.to_bytes(6, "big").hex(":")
    return int_to_mac(mac)


def ip_text(version: int, ip: int) -> str:
    if version == 4 and 0 <= ip <= 0xFFFFFFFF:  # ipaddress's dotted quad, ~10x cheaper
        return f"{ip >> 24}.{ip >> 16 & 255}.{ip >> 8 & 255}.{ip & 255}"
    return str(ipaddress.IPv4Address(ip) if version == 4 else ipaddress.IPv6Address(ip))


def mac_entry_tag(bridge_id: str, vlan: int, mac: int) -> str:
    """Tag of a MAC table entry, hit or miss: "mac:<bridge_id>:<vlan>:<aa:bb:cc:dd:ee:ff>"."""
    return f"mac:{bridge_id}:{vlan}:{mac_text(mac)}"


def neighbour_entry_tag(router_id: str, version: int, ip: int) -> str:
    """Tag of an ARP/ND entry, hit or miss: "arp:<router_id>:<ip>"."""
    return f"arp:{router_id}:{ip_text(version, ip)}"


class TablesView(Protocol):
    """What the simulation reads from the shared tables."""

    def mac_port(self, bridge_id: str, vlan: int, mac: int) -> str | None:
        """The port learned for `mac` on `bridge_id` in VLAN context `vlan`, if any."""
        ...

    def neighbour_mac(self, router_id: str, version: int, ip: int) -> int | None:
        """The MAC resolved for IP `ip` (IPv4 if version == 4 else IPv6) on `router_id`."""
        ...


@dataclass(frozen=True, slots=True)
class LearnedMac:
    bridge_id: str
    vlan: int
    mac: int
    port_id: str

    @property
    def tag(self) -> str:
        return mac_entry_tag(self.bridge_id, self.vlan, self.mac)

    def __str__(self) -> str:
        return f"mac {mac_text(self.mac)} vlan {self.vlan} on bridge {self.bridge_id} -> port {self.port_id}"


@dataclass(frozen=True, slots=True)
class LearnedNeighbour:
    router_id: str
    version: int
    ip: int
    mac: int

    @property
    def tag(self) -> str:
        return neighbour_entry_tag(self.router_id, self.version, self.ip)

    def __str__(self) -> str:
        return f"neighbour {ip_text(self.version, self.ip)} on router {self.router_id} -> {mac_text(self.mac)}"


LearnedEntry = LearnedMac | LearnedNeighbour


class MemoryTables:
    """In-memory shared tables. `learn()` returns the tag to invalidate when the entry is new
    or changed, None when it was already there (so re-learning invalidates nothing)."""

    def __init__(self) -> None:
        self.macs: dict[tuple[str, int, int], str] = {}
        self.neighbours: dict[tuple[str, int, int], int] = {}

    def mac_port(self, bridge_id: str, vlan: int, mac: int) -> str | None:
        return self.macs.get((bridge_id, vlan, mac))

    def neighbour_mac(self, router_id: str, version: int, ip: int) -> int | None:
        return self.neighbours.get((router_id, version, ip))

    def learn(self, entry: LearnedEntry) -> str | None:
        if isinstance(entry, LearnedMac):
            mac_key = (entry.bridge_id, entry.vlan, entry.mac)
            if self.macs.get(mac_key) == entry.port_id:
                return None
            self.macs[mac_key] = entry.port_id
            return entry.tag
        if isinstance(entry, LearnedNeighbour):
            neighbour_key = (entry.router_id, entry.version, entry.ip)
            if self.neighbours.get(neighbour_key) == entry.mac:
                return None
            self.neighbours[neighbour_key] = entry.mac
            return entry.tag
        raise TypeError(f"MemoryTables.learn: not a learned entry: {entry!r}")

    def forget_mac(self, bridge_id: str, vlan: int, mac: int) -> str | None:
        if self.macs.pop((bridge_id, vlan, mac), None) is None:
            return None
        return mac_entry_tag(bridge_id, vlan, mac)

    def forget_neighbour(self, router_id: str, version: int, ip: int) -> str | None:
        if self.neighbours.pop((router_id, version, ip), None) is None:
            return None
        return neighbour_entry_tag(router_id, version, ip)
