"""Authenticated flow-state messages: an HMAC envelope around a `wire` message, the per-cluster
keyring it is keyed with, and the per-sender replay window.

Owns the envelope's byte layout (`seal`/`unseal`), `AuthError` (with a `reason` the receiver
counts by), `Keyring` (current and previous key, JSON as kept in the store, `rotated`) and
`ReplayWindow`. Does not generate secrets, read the store or the clock: the agent passes the
random bytes, the creation time and the sender's first sequence number. Pure.

Layout (network byte order), the UDP payload after the VXLAN header on key 0xFFFFFF:

    sealed   = magic "HNFA" | version u8 (1) | key id u8 | sender length u8 (1..255)
               | sender (UTF-8 host id) | sequence u64 | message | tag (16 bytes)
    message  = a `flowstate.wire` message (its own magic "HNFS" and version)
    tag      = HMAC-SHA256(key[key id], every byte before the tag), first 16 bytes

The receiver checks the tag against the current or the previous key of the keyring (by key
id; rotation leaves both valid), then the sequence against the sender's replay window, and
only then decodes the message. A sender's sequence is its wall clock in nanoseconds when
it seals a message, or its previous sequence + 1 if that is larger: strictly increasing, so
the replay window refuses any message twice, and close to the sender's wall clock, so a
receiver that forgot its windows (a restart) still refuses a message older than
`MAX_MESSAGE_AGE` (`is_fresh`). This asks hosts' wall clocks to agree within that (NTP).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass

MAGIC = b"HNFA"
VERSION = 1
TAG_BYTES = 16
KEY_BYTES = 32
MAX_SEQUENCE = (1 << 64) - 1
DEFAULT_WINDOW = 64
MAX_MESSAGE_AGE = 300.0  # seconds: an older sequence is refused even from an unknown sender

_PREFIX = struct.Struct("!4sBBB")  # magic, version, key id, sender length
_SEQUENCE = struct.Struct("!Q")


class AuthError(ValueError):
    """A sealed message that must not be applied; `reason` is a short counter name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"flow-state envelope: {message}")
        self.reason = reason


def overhead(sender: str) -> int:
    """Bytes `seal` adds to a message from `sender`."""
    return _PREFIX.size + len(sender.encode("utf-8")) + _SEQUENCE.size + TAG_BYTES


def _tag(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")[:TAG_BYTES]


_SHA256_BLOCK = 64
_INNER_PAD = bytes(byte ^ 0x36 for byte in range(256))  # `bytes.translate` tables
_OUTER_PAD = bytes(byte ^ 0x5C for byte in range(256))


class TagKey:
    """One key's HMAC-SHA256 (RFC 2104) with its inner and outer padded keys hashed once:
    each tag then costs two hash copies, not the key schedule `hmac.digest` redoes on every
    call (~0.9 us a message instead of ~2; tested equal to `hmac.digest`). The sender's
    `Sealer` and the receiver's keys (`tag_keys`) hold one per key."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _SHA256_BLOCK:
            key = hashlib.sha256(key).digest()
        padded = bytes(key).ljust(_SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(padded.translate(_INNER_PAD))
        self._outer = hashlib.sha256(padded.translate(_OUTER_PAD))

    def tag(self, data: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:TAG_BYTES]


def tag_keys(keys: Mapping[int, bytes]) -> dict[int, TagKey]:
    """`keys` (key id -> secret, as `Keyring.receive_keys`) ready for `open_sealed`."""
    return {key_id: TagKey(secret) for key_id, secret in keys.items()}


def seal(message: bytes, *, key_id: int, key: bytes, sender: str, sequence: int) -> bytes:
    """`message` in an envelope authenticated with `key` (known to receivers as `key_id`)."""
    raw_sender = sender.encode("utf-8")
    if not 1 <= len(raw_sender) <= 255:
        raise ValueError(f"sender {sender!r} must be 1..255 bytes of UTF-8")
    if not 0 <= key_id <= 255:
        raise ValueError(f"key_id {key_id} is outside 0..255")
    if not 0 <= sequence <= MAX_SEQUENCE:
        raise ValueError(f"sequence {sequence} is outside 0..2**64-1")
    if len(key) < 16:
        raise ValueError(f"key of {len(key)} bytes is too short (at least 16)")
    body = (
        _PREFIX.pack(MAGIC, VERSION, key_id, len(raw_sender))
        + raw_sender
        + _SEQUENCE.pack(sequence)
        + message
    )
    return body + _tag(key, body)


class Sealer:
    """`seal` for one sender and key (the same bytes): checked once, the envelope's prefix
    (magic, version, key id, sender) made once; each message then only needs its sequence
    checked. The agent keeps one per current key."""

    __slots__ = ("_prefix", "_tag_key")

    def __init__(self, *, key_id: int, key: bytes, sender: str) -> None:
        raw_sender = sender.encode("utf-8")
        if not 1 <= len(raw_sender) <= 255:
            raise ValueError(f"sender {sender!r} must be 1..255 bytes of UTF-8")
        if not 0 <= key_id <= 255:
            raise ValueError(f"key_id {key_id} is outside 0..255")
        if len(key) < 16:
            raise ValueError(f"key of {len(key)} bytes is too short (at least 16)")
        self._tag_key = TagKey(key)
        self._prefix = _PREFIX.pack(MAGIC, VERSION, key_id, len(raw_sender)) + raw_sender

    def seal(self, message: bytes, sequence: int) -> bytes:
        if not 0 <= sequence <= MAX_SEQUENCE:
            raise ValueError(f"sequence {sequence} is outside 0..2**64-1")
        body = self._prefix + _SEQUENCE.pack(sequence) + message
        return body + self._tag_key.tag(body)


@dataclass(frozen=True, slots=True)
class Unsealed:
    sender: str
    sequence: int
    key_id: int
    message: bytes


def unseal(data: bytes, keys: Mapping[int, bytes | TagKey]) -> Unsealed:
    """The authenticated contents of `data`; AuthError (reason "malformed", "unknown_key" or
    "bad_tag") for anything else. Never applies the replay window (see `ReplayWindow`)."""
    return Unsealed(*open_sealed(data, keys))


def open_sealed(data: bytes, keys: Mapping[int, bytes | TagKey]) -> tuple[str, int, int, bytes]:
    """`unseal` as a tuple (sender, sequence, key id, message), for the receive path (which
    passes its keys as `tag_keys`)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    minimum = _PREFIX.size + 1 + _SEQUENCE.size + TAG_BYTES
    if len(data) < minimum:
        raise AuthError("malformed", f"{len(data)} bytes, at least {minimum} needed")
    magic, version, key_id, sender_length = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise AuthError("malformed", f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise AuthError("malformed", f"unsupported version {version} (this reads {VERSION})")
    body_end = len(data) - TAG_BYTES
    sequence_at = _PREFIX.size + sender_length
    if sender_length == 0 or sequence_at + _SEQUENCE.size > body_end:
        raise AuthError("malformed", f"sender length {sender_length} does not fit")
    key = keys.get(key_id)
    if key is None:
        raise AuthError("unknown_key", f"key id {key_id} is not the current or previous key")
    body = data[:body_end]
    tag = key.tag(body) if isinstance(key, TagKey) else _tag(key, body)
    if not hmac.compare_digest(tag, data[body_end:]):
        raise AuthError("bad_tag", "the HMAC does not match")
    try:
        sender = data[_PREFIX.size : sequence_at].decode("utf-8")
    except UnicodeDecodeError:  # only a key holder could have sealed this
        raise AuthError("malformed", "sender is not UTF-8") from None
    (sequence,) = _SEQUENCE.unpack_from(data, sequence_at)
    return sender, sequence, key_id, data[sequence_at + _SEQUENCE.size : body_end]


def next_sequence(previous: int, wall_clock: float) -> int:
    """The sequence of a sender's next message (see the module docstring)."""
    return min(MAX_SEQUENCE, max(previous + 1, int(wall_clock * 1e9)))


def is_fresh(sequence: int, wall_clock: float, max_age: float = MAX_MESSAGE_AGE) -> bool:
    """False for a message sealed more than `max_age` seconds before `wall_clock`."""
    return sequence >= (wall_clock - max_age) * 1e9


class ReplayWindow:
    """Per sender: the highest sequence accepted and a bitmap of the `size` below it (as
    IPsec's anti-replay window), so a message is accepted once, in any order within the
    window, and never again; one older than the window is refused."""

    __slots__ = ("_size", "_state")

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if size < 1:
            raise ValueError(f"size {size} must be at least 1")
        self._size = size
        self._state: dict[str, tuple[int, int]] = {}  # sender -> (highest, bitmap)

    def accept(self, sender: str, sequence: int) -> bool:
        """True (and remembered) the first time `sequence` is seen from `sender`."""
        state = self._state.get(sender)
        if state is None:
            self._state[sender] = (sequence, 1)
            return True
        highest, bitmap = state
        if sequence > highest:
            shift = sequence - highest
            bitmap = ((bitmap << shift) | 1) & ((1 << self._size) - 1) if shift < self._size else 1
            self._state[sender] = (sequence, bitmap)
            return True
        offset = highest - sequence
        if offset >= self._size or bitmap >> offset & 1:
            return False
        self._state[sender] = (highest, bitmap | 1 << offset)
        return True

    def forget(self, sender: str) -> None:
        self._state.pop(sender, None)

    def __len__(self) -> int:
        return len(self._state)


@dataclass(frozen=True, slots=True)
class ClusterKey:
    key_id: int  # 0..255, the id in the envelope (a generation counter modulo 256)
    secret: bytes
    created: float  # wall clock seconds (for rotation on a schedule)


@dataclass(frozen=True, slots=True)
class Keyring:
    """The cluster's flow-state keys: senders seal with `current`; receivers accept
    `current` and `previous` (a rotation does not cut messages sealed just before it)."""

    current: ClusterKey
    previous: ClusterKey | None = None

    def receive_keys(self) -> dict[int, bytes]:
        keys = {self.current.key_id: self.current.secret}
        if self.previous is not None and self.previous.key_id != self.current.key_id:
            keys[self.previous.key_id] = self.previous.secret
        return keys

    def rotated(self, secret: bytes, created: float) -> Keyring:
        """A new current key (`secret`, fresh random bytes from the caller); the current one
        becomes the previous, the previous is dropped."""
        return Keyring(ClusterKey((self.current.key_id + 1) % 256, secret, created), self.current)

    def to_json(self) -> bytes:
        return json.dumps(
            {"keys": [_key_json(k) for k in (self.current, self.previous) if k is not None]},
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Keyring:
        """The keyring as stored; ValueError naming what is wrong."""
        try:
            data = json.loads(raw)
            keys = [
                ClusterKey(int(k["id"]), bytes.fromhex(k["secret"]), float(k["created"]))
                for k in data["keys"]
            ]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"flow-state keyring: {error!r}") from None
        if not 1 <= len(keys) <= 2:
            raise ValueError(f"flow-state keyring: {len(keys)} keys, expected 1 or 2")
        for key in keys:
            if not 0 <= key.key_id <= 255 or len(key.secret) < 16:
                raise ValueError(f"flow-state keyring: key {key.key_id} is invalid")
        return cls(keys[0], keys[1] if len(keys) > 1 else None)

    @classmethod
    def new(cls, secret: bytes, created: float) -> Keyring:
        return cls(ClusterKey(0, secret, created))


def _key_json(key: ClusterKey) -> dict[str, object]:
    return {"id": key.key_id, "secret": key.secret.hex(), "created": key.created}
