"""Unit tests for `hivenet.flowstate.auth`: the sealed envelope's layout and round trip, that
any change to a sealed message (every single bit flip, hypothesis), a wrong key, an unknown
key id or truncation is refused, the replay window, and the keyring (JSON, rotation)."""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivenet.flowstate.auth import (
    MAGIC,
    TAG_BYTES,
    AuthError,
    ClusterKey,
    Keyring,
    ReplayWindow,
    Sealer,
    TagKey,
    Unsealed,
    is_fresh,
    next_sequence,
    open_sealed,
    overhead,
    seal,
    tag_keys,
    unseal,
)
from hivenet.flowstate.conntrack import ConnState, ConntrackRecord
from hivenet.flowstate.keys import FlowKey
from hivenet.flowstate.wire import decode, encode

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1000.0


def message() -> bytes:
    key = FlowKey(4, 0x0A000001, 0xC0000201, 6, 40000, 443)
    return encode([ConntrackRecord("r1", key, ConnState.ESTABLISHED, NOW + 60)], now=NOW)


def test_exact_layout() -> None:
    sealed = seal(b"HNFS...", key_id=3, key=KEY, sender="h1", sequence=7)
    body = MAGIC + bytes([1, 3, 2]) + b"h1" + struct.pack("!Q", 7) + b"HNFS..."
    assert sealed == body + hmac.new(KEY, body, hashlib.sha256).digest()[:TAG_BYTES]
    assert len(sealed) == len(b"HNFS...") + overhead("h1")


def test_round_trip_gives_sender_sequence_and_the_wire_message() -> None:
    sealed = seal(message(), key_id=1, key=KEY, sender="host-é", sequence=2**64 - 1)
    opened = unseal(sealed, {1: KEY})
    assert (opened.sender, opened.sequence, opened.key_id) == ("host-é", 2**64 - 1, 1)
    assert decode(opened.message, NOW) == decode(message(), NOW)


def test_the_previous_key_of_a_keyring_still_opens_what_it_sealed() -> None:
    keyring = Keyring.new(KEY, NOW).rotated(OTHER_KEY, NOW + 1)
    old = seal(b"m", key_id=0, key=KEY, sender="h1", sequence=1)
    new = seal(b"m", key_id=1, key=OTHER_KEY, sender="h1", sequence=2)
    assert unseal(old, keyring.receive_keys()).sequence == 1
    assert unseal(new, keyring.receive_keys()).sequence == 2
    dropped = keyring.rotated(bytes(32), NOW + 2)  # key 0 is gone after a second rotation
    with pytest.raises(AuthError) as refused:
        unseal(old, dropped.receive_keys())
    assert refused.value.reason == "unknown_key"


@pytest.mark.parametrize(
    ("data", "keys", "reason"),
    [
        (message(), {0: KEY}, "malformed"),  # a plain, unsealed wire message
        (b"", {0: KEY}, "malformed"),
        (seal(b"m", key_id=0, key=KEY, sender="h1", sequence=1), {0: OTHER_KEY}, "bad_tag"),
        (seal(b"m", key_id=5, key=KEY, sender="h1", sequence=1), {0: KEY}, "unknown_key"),
        (seal(b"m", key_id=0, key=KEY, sender="h1", sequence=1)[:-1], {0: KEY}, "bad_tag"),
        (seal(b"", key_id=0, key=KEY, sender="h1", sequence=1)[:-2], {0: KEY}, "malformed"),
    ],
)
def test_what_is_refused_and_why(data: bytes, keys: dict[int, bytes], reason: str) -> None:
    with pytest.raises(AuthError) as refused:
        unseal(data, keys)
    assert refused.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(
    payload=st.binary(max_size=200),
    sender=st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) <= 255),
    sequence=st.integers(0, 2**64 - 1),
    data=st.data(),
)
def test_any_single_bit_flip_is_refused(
    payload: bytes, sender: str, sequence: int, data: st.DataObject
) -> None:
    sealed = seal(payload, key_id=0, key=KEY, sender=sender, sequence=sequence)
    bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
    flipped = bytearray(sealed)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(AuthError):
        unseal(bytes(flipped), {0: KEY, 1: OTHER_KEY})
    with pytest.raises(AuthError):  # the receive path's keys: the same refusal
        unseal(bytes(flipped), tag_keys({0: KEY, 1: OTHER_KEY}))
    assert open_sealed(sealed, tag_keys({0: KEY})) == open_sealed(sealed, {0: KEY})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_auth_error(data: bytes) -> None:
    with pytest.raises(AuthError):
        unseal(data, {0: KEY})


def test_seal_refuses_what_it_cannot_encode() -> None:
    with pytest.raises(ValueError, match="sender"):
        seal(b"m", key_id=0, key=KEY, sender="", sequence=1)
    with pytest.raises(ValueError, match="key_id"):
        seal(b"m", key_id=256, key=KEY, sender="h", sequence=1)
    with pytest.raises(ValueError, match="sequence"):
        seal(b"m", key_id=0, key=KEY, sender="h", sequence=-1)
    with pytest.raises(ValueError, match="too short"):
        seal(b"m", key_id=0, key=b"short", sender="h", sequence=1)


def test_replay_window_accepts_each_sequence_once_in_any_order_within_the_window() -> None:
    window = ReplayWindow(size=4)
    assert window.accept("h1", 10)
    assert not window.accept("h1", 10)  # replayed
    assert window.accept("h1", 12)
    assert window.accept("h1", 11)  # late, inside the window
    assert not window.accept("h1", 11)
    assert not window.accept("h1", 8)  # older than the window: refused even if never seen
    assert window.accept("h2", 1)  # windows are per sender
    assert window.accept("h1", 1000)  # a jump clears the bitmap
    assert not window.accept("h1", 999 - 3)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=80), st.integers(1, 70))
def test_replay_window_never_accepts_a_sequence_twice(sequences: list[int], size: int) -> None:
    window = ReplayWindow(size=size)
    accepted = [s for s in sequences if window.accept("h", s)]
    assert len(accepted) == len(set(accepted))
    if sequences:  # the highest one seen is always accepted the first time
        assert max(sequences) in accepted


def test_keyring_json_round_trip_and_rotation() -> None:
    keyring = Keyring.new(KEY, NOW)
    assert Keyring.from_json(keyring.to_json()) == keyring
    rotated = keyring.rotated(OTHER_KEY, NOW + 5)
    assert rotated.current == ClusterKey(1, OTHER_KEY, NOW + 5)
    assert rotated.previous == keyring.current
    assert Keyring.from_json(rotated.to_json()) == rotated
    last = Keyring(ClusterKey(255, KEY, NOW))
    assert last.rotated(OTHER_KEY, NOW).current.key_id == 0  # ids wrap at one byte


@pytest.mark.parametrize(
    "raw",
    [b"", b"{}", b'{"keys": []}', b'{"keys": [{"id": 1, "secret": "00", "created": 1}]}', b"[1]"],
)
def test_a_bad_stored_keyring_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError, match="keyring"):
        Keyring.from_json(raw)


def test_sequences_follow_the_wall_clock_and_never_go_back() -> None:
    first = next_sequence(0, NOW)
    assert first == int(NOW * 1e9)
    assert next_sequence(first, NOW) == first + 1  # same clock reading: still increasing
    assert next_sequence(first, NOW - 60) == first + 1  # the clock stepped back
    assert next_sequence(first, NOW + 1) == int((NOW + 1) * 1e9)


def test_a_message_older_than_the_maximum_age_is_stale() -> None:
    sequence = next_sequence(0, NOW)
    assert is_fresh(sequence, NOW + 299.0, max_age=300.0)
    assert not is_fresh(sequence, NOW + 301.0, max_age=300.0)


@settings(max_examples=100, deadline=None)
@given(
    st.binary(max_size=300),
    st.integers(0, 255),
    st.text(min_size=1, max_size=40).filter(lambda text: len(text.encode()) <= 255),
    st.integers(0, 2**64 - 1),
)
def test_a_sealer_seals_what_seal_seals(
    payload: bytes, key_id: int, sender: str, sequence: int
) -> None:
    sealer = Sealer(key_id=key_id, key=KEY, sender=sender)
    sealed = sealer.seal(payload, sequence)
    assert sealed == seal(payload, key_id=key_id, key=KEY, sender=sender, sequence=sequence)
    assert open_sealed(sealed, {key_id: KEY}) == (sender, sequence, key_id, payload)
    assert unseal(sealed, {key_id: KEY}) == Unsealed(sender, sequence, key_id, payload)
    assert unseal(bytearray(sealed), {key_id: KEY}) == unseal(sealed, {key_id: KEY})  # type: ignore[arg-type]


def test_a_sealer_refuses_what_seal_refuses() -> None:
    for bad in ({"sender": ""}, {"key_id": 256}, {"key": b"short"}):
        arguments: dict[str, Any] = {"key_id": 0, "key": KEY, "sender": "h", **bad}
        with pytest.raises(ValueError):
            Sealer(**arguments)
    with pytest.raises(ValueError, match="sequence"):
        Sealer(key_id=0, key=KEY, sender="h").seal(b"m", -1)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=300))
def test_a_tag_key_tags_as_hmac_sha256(key: bytes, data: bytes) -> None:
    """`TagKey` (pads hashed once) is HMAC-SHA256 cut to the tag size, for keys shorter and
    longer than the hash block."""
    assert TagKey(key).tag(data) == hmac.digest(key, data, "sha256")[:TAG_BYTES]
    prepared = TagKey(key)
    assert prepared.tag(data) == prepared.tag(data)  # tagging leaves the key as it was


def test_wrong_prepared_key_is_a_bad_tag() -> None:
    sealed = seal(b"m", key_id=0, key=KEY, sender="h", sequence=1)
    with pytest.raises(AuthError) as refused:
        open_sealed(sealed, tag_keys({0: OTHER_KEY}))
    assert refused.value.reason == "bad_tag"
