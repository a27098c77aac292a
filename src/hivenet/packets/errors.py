"""Typed errors for every codec in `hivenet.packets`.

Owns the `PacketError` hierarchy only. A truncated or lying header must surface as one of these
(never as IndexError or struct.error), with a message naming the layer, the field and the value,
so the datapath can count and drop bad frames without guessing what went wrong.
"""

from __future__ import annotations


class PacketError(ValueError):
    """A frame or header could not be decoded, encoded or rewritten.

    `layer` names the protocol layer ("IPv4", "TCP", ...) and `field` the header field at
    fault, so callers can count errors per cause.
    """

    def __init__(self, layer: str, field: str, message: str) -> None:
        super().__init__(f"{layer}.{field}: {message}")
        self.layer = layer
        self.field = field


class TruncatedPacket(PacketError):
    """The buffer ends before the header (or the length a header claims) does."""


class MalformedPacket(PacketError):
    """A header field holds a value that cannot be right (bad IHL, bad option length, ...)."""


class UnsupportedPacket(PacketError):
    """A well-formed header this codec deliberately does not handle (e.g. non-Ethernet ARP)."""


class RewriteError(PacketError):
    """A rewrite does not apply to this frame (no L4 header for tp_src, TTL already 0, ...)."""


def need(layer: str, field: str, available: int, required: int) -> None:
    """Raise TruncatedPacket unless `available` bytes cover the `required` ones."""
    if available < required:
        raise TruncatedPacket(layer, field, f"needs {required} bytes, only {available} present")
