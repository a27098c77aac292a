"""The flow-state wire format: conntrack and NAT entries as compact binary messages, pushed
to peers over the tunnel (VXLAN with the reserved VNI 0xFFFFFF) and written to the agent's
local persistence file (messages back to back).

Owns the byte layout, `encode`/`encode_batches`/`decode`/`decode_stream` and
`WireFormatError`. Does not decide what to push or to whom (`conntrack.py`, `nat.py`,
`peers.py`) nor send anything. Pure: no I/O, no clock (`now` converts between the absolute
expiry the tables keep and the relative one on the wire, so hosts need no synchronised
clocks). Decoding untrusted bytes raises `WireFormatError` and nothing else.

Layout (network byte order):

    message  = magic "HNFS" | version u8 (1) | flags u8 (0) | entry count u16 | entry*
    entry    = kind u8 | body length u16 | body          (unknown kinds are skipped)
    kind 1   = zone | key | conn state u8 | expiry u32
    kind 2   = zone | nat kind u8 | original key | translated key | expiry u32
    zone     = length u8 (1..255) | UTF-8 device id
    key      = ip version u8 (4|6) | ip proto u8 | port src u16 | port dst u16
               | ip src (4|16 bytes) | ip dst (4|16 bytes)
    expiry   = milliseconds from `now` until the entry expires; 0 = already gone (delete)
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from sys import intern

from hivenet.flowstate.conntrack import TCP_STATES, ConnState, ConntrackRecord
from hivenet.flowstate.keys import ICMP_PROTOCOLS, FlowKey
from hivenet.flowstate.nat import NatBinding, NatKind, NatRecord, unchecked_binding
from hivenet.packets.flowmatch import IP_PROTO_TCP
from hivenet.packets.slots import slot_builder

MAGIC = b"HNFS"
VERSION = 1
KIND_CONNTRACK = 1
KIND_NAT = 2
MAX_ENTRIES = 0xFFFF
MAX_EXPIRY_MS = 0xFFFFFFFF
DEFAULT_MAX_MESSAGE_BYTES = 1400  # fits a VXLAN-encapsulated frame on a 1500-byte underlay

_HEADER = struct.Struct("!4sBBH")
_ENTRY = struct.Struct("!BH")
_KEY_FIXED = struct.Struct("!BBHH")
_U8 = struct.Struct("!B")
_U32 = struct.Struct("!I")
_ADDRESS_BYTES = {4: 4, 6: 16}


class WireFormatError(ValueError):
    """Bytes that are not a valid flow-state message; says what and at which offset."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"flow-state message at byte {offset}: {message}")
        self.offset = offset


@dataclass(slots=True)
class DecodedBatch:
    conntrack: list[ConntrackRecord] = field(default_factory=list)
    nat: list[NatRecord] = field(default_factory=list)
    skipped_entries: int = 0  # entries of kinds this version does not know

    def __len__(self) -> int:
        return len(self.conntrack) + len(self.nat)


# --- encoding -------------------------------------------------------------------------------


def _expiry_ms(expires_at: float, now: float) -> int:
    remaining = (expires_at - now) * 1000.0
    if not remaining > 0:
        return 0
    return min(MAX_EXPIRY_MS, max(1, math.ceil(remaining)))


def _zone_bytes(zone: str) -> bytes:
    raw = zone.encode("utf-8")
    if not 1 <= len(raw) <= 255:
        raise ValueError(f"zone {zone!r} must be 1..255 bytes of UTF-8, is {len(raw)}")
    return _U8.pack(len(raw)) + raw


def _key_bytes(key: FlowKey) -> bytes:
    width = _ADDRESS_BYTES[key.ip_version]
    return (
        _KEY_FIXED.pack(key.ip_version, key.ip_proto, key.tp_src, key.tp_dst)
        + key.ip_src.to_bytes(width, "big")
        + key.ip_dst.to_bytes(width, "big")
    )


# IPv4 entries (the common case) are encoded in one `struct` call after a prefix that only
# depends on the entry's kind and zone (kind u8 | body length u16 | zone [| nat kind u8]),
# kept by (kind, zone[, nat kind]): bytes of values only, so nothing here can go stale;
# emptied when full. Anything else (IPv6, a value out of range) takes the general path,
# which also raises what it always raised.
_CONNTRACK_V4 = struct.Struct("!BBHHIIBI")  # key, state, expiry
_NAT_V4 = struct.Struct("!BBHHIIBBHHIII")  # original key, translated key, expiry
_prefixes: dict[tuple[int, str, int], bytes] = {}
_PREFIXES_MAX = 4096


def _prefix(kind: int, zone: str, nat_kind: int, tail: int) -> bytes:
    """kind | body length | zone [| nat kind] of an IPv4 entry whose body ends with `tail`
    bytes after them."""
    cache_key = (kind, zone, nat_kind)
    prefix = _prefixes.get(cache_key)
    if prefix is None:
        zone_bytes = _zone_bytes(zone)
        if kind == KIND_NAT:
            zone_bytes += _U8.pack(nat_kind)
        prefix = _ENTRY.pack(kind, len(zone_bytes) + tail) + zone_bytes
        if len(_prefixes) >= _PREFIXES_MAX:
            _prefixes.clear()
        _prefixes[cache_key] = prefix
    return prefix


def encode_conntrack(record: ConntrackRecord, now: float) -> bytes:
    """One conntrack entry (kind, length and body)."""
    key = record.key
    if key.ip_version == 4:
        try:
            tail = _CONNTRACK_V4.pack(
                4,
                key.ip_proto,
                key.tp_src,
                key.tp_dst,
                key.ip_src,
                key.ip_dst,
                record.state,
                _expiry_ms(record.expires_at, now),
            )
        except struct.error:
            pass  # out of range: the general path says so as it always did
        else:
            return _prefix(KIND_CONNTRACK, record.zone, 0, _CONNTRACK_V4.size) + tail
    body = (
        _zone_bytes(record.zone)
        + _key_bytes(key)
        + _U8.pack(record.state)
        + _U32.pack(_expiry_ms(record.expires_at, now))
    )
    return _ENTRY.pack(KIND_CONNTRACK, len(body)) + body


def encode_nat(record: NatRecord, now: float) -> bytes:
    """One NAT entry (kind, length and body)."""
    binding = record.binding
    original, translated = binding.original, binding.translated
    if original.ip_version == 4 and translated.ip_version == 4:
        try:
            tail = _NAT_V4.pack(
                4,
                original.ip_proto,
                original.tp_src,
                original.tp_dst,
                original.ip_src,
                original.ip_dst,
                4,
                translated.ip_proto,
                translated.tp_src,
                translated.tp_dst,
                translated.ip_src,
                translated.ip_dst,
                _expiry_ms(record.expires_at, now),
            )
            prefix = _prefix(KIND_NAT, binding.zone, binding.kind, _NAT_V4.size)
        except struct.error:
            pass  # out of range: the general path says so as it always did
        else:
            return prefix + tail
    body = (
        _zone_bytes(binding.zone)
        + _U8.pack(binding.kind)
        + _key_bytes(original)
        + _key_bytes(translated)
        + _U32.pack(_expiry_ms(record.expires_at, now))
    )
    return _ENTRY.pack(KIND_NAT, len(body)) + body


def _encoded_entries(
    conntrack: Iterable[ConntrackRecord], nat: Iterable[NatRecord], now: float
) -> list[bytes]:
    return [encode_conntrack(record, now) for record in conntrack] + [
        encode_nat(record, now) for record in nat
    ]


def _message(entries: list[bytes]) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, 0, len(entries)) + b"".join(entries)


def encode(
    conntrack: Iterable[ConntrackRecord] = (), nat: Iterable[NatRecord] = (), *, now: float
) -> bytes:
    """One message holding every entry given (at most MAX_ENTRIES)."""
    entries = _encoded_entries(conntrack, nat, now)
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"{len(entries)} entries exceed one message's {MAX_ENTRIES}")
    return _message(entries)


def encode_batches(
    conntrack: Iterable[ConntrackRecord] = (),
    nat: Iterable[NatRecord] = (),
    *,
    now: float,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> list[bytes]:
    """The entries split into messages of at most `max_message_bytes` each (for the tunnel;
    the persistence file holds them back to back)."""
    if max_message_bytes < _HEADER.size + 600:
        raise ValueError(f"max_message_bytes {max_message_bytes} cannot hold the largest entry")
    messages: list[bytes] = []
    batch: list[bytes] = []
    size = _HEADER.size
    for entry in _encoded_entries(conntrack, nat, now):
        if batch and (size + len(entry) > max_message_bytes or len(batch) == MAX_ENTRIES):
            messages.append(_message(batch))
            batch, size = [], _HEADER.size
        batch.append(entry)
        size += len(entry)
    if batch:
        messages.append(_message(batch))
    return messages


# --- decoding -------------------------------------------------------------------------------


class _Reader:
    __slots__ = ("data", "end", "offset")

    def __init__(self, data: bytes | bytearray | memoryview, offset: int, end: int) -> None:
        self.data = data
        self.offset = offset
        self.end = end

    def take(self, size: int, what: str) -> bytes:
        if self.offset + size > self.end:
            raise WireFormatError(
                f"truncated {what}: needs {size} bytes, {self.end - self.offset} left", self.offset
            )
        chunk = bytes(self.data[self.offset : self.offset + size])
        self.offset += size
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        value: int = _U32.unpack(self.take(4, what))[0]
        return value

    def zone(self) -> str:
        start = self.offset
        length = self.u8("zone length")
        if length == 0:
            raise WireFormatError("zone length 0", start)
        raw = self.take(length, "zone")
        try:
            # Zones are device ids, repeated in every entry: one string each, not one per entry.
            return intern(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise WireFormatError(f"zone is not UTF-8 ({error.reason})", start) from None

    def key(self, what: str) -> FlowKey:
        start = self.offset
        fixed = self.take(_KEY_FIXED.size, what)
        version, proto, tp_src, tp_dst = _KEY_FIXED.unpack(fixed)
        width = _ADDRESS_BYTES.get(version)
        if width is None:
            raise WireFormatError(f"{what}: ip version {version} is not 4 or 6", start)
        addresses = self.take(2 * width, f"{what} ip src and dst")
        ip_src = int.from_bytes(addresses[:width], "big")
        ip_dst = int.from_bytes(addresses[width:], "big")
        return FlowKey.unchecked(version, ip_src, ip_dst, proto, tp_src, tp_dst)


def _decode_conntrack(reader: _Reader, now: float, start: int) -> ConntrackRecord:
    zone = reader.zone()
    key = reader.key("conntrack key")
    state_value = reader.u8("conntrack state")
    expiry = reader.u32("conntrack expiry")
    try:
        state = ConnState(state_value)
        return ConntrackRecord(zone, key, state, now + expiry / 1000.0)
    except ValueError as error:
        raise WireFormatError(f"conntrack entry: {error}", start) from None


def _decode_nat(reader: _Reader, now: float, start: int) -> NatRecord:
    zone = reader.zone()
    kind_value = reader.u8("nat kind")
    original = reader.key("nat original key")
    translated = reader.key("nat translated key")
    expiry = reader.u32("nat expiry")
    try:
        binding = NatBinding(zone, NatKind(kind_value), original, translated)
    except ValueError as error:
        raise WireFormatError(f"nat entry: {error}", start) from None
    return NatRecord(binding, now + expiry / 1000.0)


# The IPv4 entries a host pushes, decoded without a `_Reader`: one `unpack_from` per entry
# body, no intermediate copies. Any entry that is not exactly a well-formed IPv4 one (length,
# zone, version, state, kind, binding) returns None and is decoded by the general path,
# which raises the `WireFormatError` it always raised.
_NAT_V4_BODY = struct.Struct("!BBBHHIIBBHHIII")  # nat kind, original, translated, expiry
_CONN_STATES = {state.value: state for state in ConnState}
_TCP_STATE_VALUES = frozenset(state.value for state in TCP_STATES)
_NAT_KINDS = {kind.value: kind for kind in NatKind}
_SNAT = NatKind.SNAT.value
# Zone names by their UTF-8 bytes (interned, as `_Reader.zone` returns them): values only,
# so nothing here can go stale; emptied when full.
_zone_names: dict[bytes, str] = {}
_ZONE_NAMES_MAX = 4096


# The fast path's records without their constructors' checks (a dataclass's `__post_init__`,
# `NatBinding`'s `__init__`): it has checked on the unpacked integers what those would check
# on the keys' properties (~2 us of a NAT binding's ~2.6). If a record no longer has exactly
# these fields, in this order, and these slots (a slot its checks might fill): its constructor.
_checked_conntrack_record = slot_builder(
    ConntrackRecord, "positional", ("zone", "key", "state", "expires_at"), checked=False
)
_checked_nat_binding = unchecked_binding


def _fast_zone(data: bytes, start: int, end: int) -> str | None:
    raw = data[start:end]
    zone = _zone_names.get(raw)
    if zone is None:
        try:
            zone = intern(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return None
        if len(_zone_names) >= _ZONE_NAMES_MAX:
            _zone_names.clear()
        _zone_names[raw] = zone
    return zone


def _fast_conntrack(data: bytes, start: int, end: int, now: float) -> ConntrackRecord | None:
    zone_end = start + 1 + data[start]
    if zone_end == start + 1 or zone_end + _CONNTRACK_V4.size != end:
        return None
    version, proto, tp_src, tp_dst, ip_src, ip_dst, state_value, expiry = _CONNTRACK_V4.unpack_from(
        data, zone_end
    )
    state = _CONN_STATES.get(state_value)
    # ConntrackRecord's checks: a TCP state exactly for a TCP key.
    if (
        version != 4
        or state is None
        or (state_value in _TCP_STATE_VALUES) != (proto == IP_PROTO_TCP)
    ):
        return None
    zone = _fast_zone(data, start + 1, zone_end)
    if zone is None:
        return None
    key = FlowKey.unchecked(4, ip_src, ip_dst, proto, tp_src, tp_dst)
    return _checked_conntrack_record(zone, key, state, now + expiry / 1000.0)


def _fast_nat(data: bytes, start: int, end: int, now: float) -> NatRecord | None:
    zone_end = start + 1 + data[start]
    if zone_end == start + 1 or zone_end + _NAT_V4_BODY.size != end:
        return None
    (
        kind_value,
        version,
        proto,
        tp_src,
        tp_dst,
        ip_src,
        ip_dst,
        translated_version,
        translated_proto,
        translated_tp_src,
        translated_tp_dst,
        translated_ip_src,
        translated_ip_dst,
        expiry,
    ) = _NAT_V4_BODY.unpack_from(data, zone_end)
    kind = _NAT_KINDS.get(kind_value)
    if kind is None or version != 4 or translated_version != 4 or proto != translated_proto:
        return None
    # NatBinding's checks: SNAT keeps the destination (an echo id is no port), DNAT the
    # source; an echo key carries its id in both port slots.
    echo = proto in ICMP_PROTOCOLS
    if kind_value == _SNAT:
        if ip_dst != translated_ip_dst or (not echo and tp_dst != translated_tp_dst):
            return None
    elif ip_src != translated_ip_src or tp_src != translated_tp_src:
        return None
    if echo and translated_tp_src != translated_tp_dst:
        return None
    zone = _fast_zone(data, start + 1, zone_end)
    if zone is None:
        return None
    original = FlowKey.unchecked(4, ip_src, ip_dst, proto, tp_src, tp_dst)
    translated = FlowKey.unchecked(
        4, translated_ip_src, translated_ip_dst, proto, translated_tp_src, translated_tp_dst
    )
    binding = _checked_nat_binding(zone, kind, original, translated)
    return NatRecord(binding, now + expiry / 1000.0)


def _decode_message(data: bytes, offset: int, now: float, batch: DecodedBatch) -> int:
    """Decode the message at `offset` into `batch`; returns the offset after it."""
    total = len(data)
    if total - offset < _HEADER.size:
        raise WireFormatError(f"truncated header: {total - offset} of {_HEADER.size} bytes", offset)
    magic, version, flags, count = _HEADER.unpack_from(data, offset)
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}", offset)
    if version != VERSION:
        raise WireFormatError(
            f"unsupported version {version} (this decoder reads {VERSION})", offset + 4
        )
    if flags != 0:
        raise WireFormatError(f"reserved flags {flags:#x} are not 0", offset + 5)
    offset += _HEADER.size
    for index in range(count):
        if total - offset < _ENTRY.size:
            raise WireFormatError(f"truncated entry {index} of {count}", offset)
        kind, length = _ENTRY.unpack_from(data, offset)
        start = offset
        body_start = offset + _ENTRY.size
        body_end = body_start + length
        if body_end > total:
            raise WireFormatError(
                f"entry {index} claims {length} bytes, {total - body_start} left", start
            )
        if kind == KIND_CONNTRACK and length:
            record = _fast_conntrack(data, body_start, body_end, now)
            if record is not None:
                batch.conntrack.append(record)
                offset = body_end
                continue
        elif kind == KIND_NAT and length:
            nat_record = _fast_nat(data, body_start, body_end, now)
            if nat_record is not None:
                batch.nat.append(nat_record)
                offset = body_end
                continue
        reader = _Reader(data, body_start, body_end)
        if kind == KIND_CONNTRACK:
            batch.conntrack.append(_decode_conntrack(reader, now, start))
        elif kind == KIND_NAT:
            batch.nat.append(_decode_nat(reader, now, start))
        else:
            batch.skipped_entries += 1
            reader.offset = body_end
        if reader.offset != body_end:
            raise WireFormatError(
                f"entry {index}: {body_end - reader.offset} bytes left over in its body",
                reader.offset,
            )
        offset = body_end
    return offset


def decode(data: bytes | bytearray | memoryview, now: float) -> DecodedBatch:
    """Exactly one message (a tunnel datagram). Raises WireFormatError on anything else."""
    if not isinstance(data, bytes):
        data = bytes(data)
    batch = DecodedBatch()
    end = _decode_message(data, 0, now, batch)
    if end != len(data):
        raise WireFormatError(f"{len(data) - end} bytes after the message", end)
    return batch


def decode_stream(data: bytes | bytearray | memoryview, now: float) -> DecodedBatch:
    """Messages back to back (the persistence file). Raises WireFormatError on anything else."""
    if not isinstance(data, bytes):
        data = bytes(data)
    batch = DecodedBatch()
    offset = 0
    while offset < len(data):
        offset = _decode_message(data, offset, now, batch)
    return batch
