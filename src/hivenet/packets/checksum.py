"""Internet checksums (RFC 1071) and their incremental update (RFC 1624).

Owns the one's-complement arithmetic and the IPv4/IPv6 pseudo-headers used by TCP, UDP and
ICMPv6. Pure functions over bytes and ints; knows nothing about frame layout.

The sum is computed with one big-integer conversion: 2**16 is 1 modulo 0xFFFF, so the
one's-complement sum of the 16-bit words of `data` is `int(data) % 0xFFFF` (with 0xFFFF
standing for a non-zero multiple of 0xFFFF). This runs in C and beats a word loop by far.
"""

from __future__ import annotations

_ONES = 0xFFFF


def ones_complement_sum(data: bytes) -> int:
    """The folded 16-bit one's-complement sum of `data` (odd length is zero-padded)."""
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    value = int.from_bytes(data, "big")
    if value == 0:
        return 0
    return value % _ONES or _ONES


def internet_checksum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 checksum of `data`; `initial` is a pre-summed pseudo-header (0..0xFFFF)."""
    total = ones_complement_sum(data) + initial
    if total > _ONES:
        total -= _ONES
    return ~total & _ONES


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """One's-complement sum of the IPv4 (4-byte addresses) or IPv6 (16-byte) pseudo-header."""
    if len(src) == 4:
        header = src + dst + bytes((0, protocol)) + length.to_bytes(2, "big")
    else:
        header = src + dst + length.to_bytes(4, "big") + bytes((0, 0, 0, protocol))
    return ones_complement_sum(header)


def transport_checksum(src: bytes, dst: bytes, protocol: int, segment: bytes) -> int:
    """Checksum of a TCP/UDP/ICMPv6 `segment` (its checksum field zeroed) with pseudo-header.

    Returns the value to store; for UDP the caller maps a result of 0 to 0xFFFF (RFC 768).
    """
    return internet_checksum(segment, pseudo_header_sum(src, dst, protocol, len(segment)))


def checksum_update(checksum: int, old: bytes, new: bytes) -> int:
    """RFC 1624 eqn. 3: the checksum after the even-length field `old` became `new`.

    HC' = ~(~HC + ~m + m'). Working modulo 0xFFFF, ~m is -m, so the words reduce to one
    big-integer difference. The result stays 0 only when the true sum is 0xFFFF, which matches
    what a full recomputation yields for any header that is not all zeros.
    """
    if len(old) != len(new) or len(old) & 1:
        raise ValueError(f"checksum_update: fields must be of equal even length, got {len(old)}")
    folded = ((~checksum & _ONES) - int.from_bytes(old, "big") + int.from_bytes(new, "big")) % _ONES
    return ~folded & _ONES if folded else 0


def checksum_update_word(checksum: int, old_word: int, new_word: int) -> int:
    """`checksum_update` for one aligned 16-bit word given as ints."""
    folded = ((~checksum & _ONES) - old_word + new_word) % _ONES
    return ~folded & _ONES if folded else 0


def ipv4_header_checksum_ok(frame: bytes | bytearray | memoryview, offset: int) -> bool:
    """Whether the IPv4 header at `frame[offset:]` (its IHL already checked by the caller)
    sums to 0xFFFF, as RFC 1812 5.2.2 asks a router to verify before forwarding."""
    header_length = (frame[offset] & 0x0F) * 4
    value = int.from_bytes(frame[offset : offset + header_length], "big")
    return value != 0 and value % _ONES == 0
