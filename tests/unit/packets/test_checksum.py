"""Checksums agree with scapy's, and RFC 1624 incremental updates with full recomputation."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.utils import checksum as scapy_checksum

from hivenet.packets.checksum import (
    checksum_update,
    checksum_update_word,
    internet_checksum,
    ones_complement_sum,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_internet_checksum_matches_scapy(data: bytes) -> None:
    assert internet_checksum(data) == scapy_checksum(data)


def test_known_values() -> None:
    # RFC 1071 section 3 example words 0001 f203 f4f5 f6f7 sum to ddf2.
    assert ones_complement_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D
    assert internet_checksum(b"") == 0xFFFF
    assert internet_checksum(b"\xff\xff") == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=2, max_size=80), st.data())
def test_incremental_update_equals_recomputation(data: bytes, draw: st.DataObject) -> None:
    words = len(data) // 2
    even = data[: words * 2]
    # A header with its first word non-zero (as every IP/L4 header) so "-0" cannot arise.
    even = b"\x45\x00" + even[2:]
    checksum = internet_checksum(even)
    start = draw.draw(st.integers(0, words - 1)) * 2
    width = draw.draw(st.integers(1, words - start // 2)) * 2
    new_field = draw.draw(st.binary(min_size=width, max_size=width))
    changed = even[:start] + new_field + even[start + width :]
    if changed == bytes(len(changed)):
        return
    assert checksum_update(checksum, even[start : start + width], new_field) == internet_checksum(
        changed
    )
    if width == 2:
        old_word = int.from_bytes(even[start : start + 2], "big")
        new_word = int.from_bytes(new_field, "big")
        assert checksum_update_word(checksum, old_word, new_word) == internet_checksum(changed)
