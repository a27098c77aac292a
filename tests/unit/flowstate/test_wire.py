"""Unit tests for `hivenet.flowstate.wire`: exact layout, round trips (hypothesis), batching,
and robust decoding (truncation, garbage and bit flips raise only WireFormatError)."""

from __future__ import annotations

import contextlib
import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hivenet.flowstate import wire
from hivenet.flowstate.conntrack import TCP_STATES, ConnState, ConntrackRecord, ConntrackTable
from hivenet.flowstate.keys import FlowKey, PackedKeys
from hivenet.flowstate.nat import NatBinding, NatKind, NatRecord, NatTable
from hivenet.flowstate.wire import (
    MAGIC,
    WireFormatError,
    decode,
    decode_stream,
    encode,
    encode_batches,
)
from hivenet.packets.slots import slot_builder

NOW = 1_000_000.0


def v4_key(proto: int = 6) -> FlowKey:
    return FlowKey(4, 0x0A000001, 0xC0000201, proto, 40000, 443)


def test_exact_layout_of_a_conntrack_entry() -> None:
    record = ConntrackRecord("r1", v4_key(), ConnState.ESTABLISHED, NOW + 1.5)
    message = encode([record], now=NOW)
    body = (
        b"\x02r1"
        + struct.pack("!BBHH", 4, 6, 40000, 443)
        + bytes([10, 0, 0, 1, 192, 0, 2, 1])
        + bytes([ConnState.ESTABLISHED])
        + struct.pack("!I", 1500)
    )
    assert message == MAGIC + bytes([1, 0, 0, 1]) + struct.pack("!BH", 1, len(body)) + body


def test_round_trip_keeps_relative_expiry() -> None:
    key = v4_key()
    conntrack = [ConntrackRecord("r1", key, ConnState.SYN_SENT, NOW + 120.0)]
    binding = NatBinding("r1", NatKind.SNAT, key, FlowKey(4, 0xCB007107, 0xC0000201, 6, 1025, 443))
    nat = [NatRecord(binding, NOW + 7440.0)]
    decoded = decode(encode(conntrack, nat, now=NOW), now=5.0)  # the peer's clock differs
    assert decoded.conntrack == [ConntrackRecord("r1", key, ConnState.SYN_SENT, 125.0)]
    assert decoded.nat == [NatRecord(binding, 7445.0)]
    assert decoded.skipped_entries == 0


def test_a_connections_entries_from_two_messages_hold_one_key_in_the_peers_tables() -> None:
    """A connection's conntrack entry and NAT binding arrive in different messages of one
    push: the peer's tables (one `PackedKeys` between them) then hold one plain int for the
    key, not two equal ones, and no FlowKey (an int subclass the cyclic GC tracks)."""
    key = v4_key()
    translated = FlowKey(4, 0xCB007107, 0xC0000201, 6, 1025, 443)
    first = decode(encode([ConntrackRecord("p", key, ConnState.SYN_SENT, NOW + 9)], now=NOW), NOW)
    binding = NatBinding("r1", NatKind.SNAT, key, translated)
    second = decode(encode([], [NatRecord(binding, NOW + 9)], now=NOW), NOW)
    packed = PackedKeys()
    conntrack, nat = ConntrackTable(packed_keys=packed), NatTable(packed_keys=packed)
    assert conntrack.merge(first.conntrack[0], NOW) is not None
    assert nat.merge(second.nat[0], NOW) is not None
    (entry,) = [entry for zone in conntrack._zones.values() for entry in zone.values()]
    (held,) = [entry for index in nat._by_original.values() for entry in index.values()]
    assert held == binding and entry.key == key
    assert type(entry.packed) is int and type(held.translated_packed) is int
    assert held.original_packed is entry.packed
    assert type(held.original) is FlowKey and held.original == key


def test_expired_entries_encode_as_deletions() -> None:
    record = ConntrackRecord("r1", v4_key(), ConnState.CLOSED, NOW - 3.0)
    decoded = decode(encode([record], now=NOW), now=NOW)
    assert decoded.conntrack[0].expires_at == NOW


def test_unknown_entry_kinds_are_skipped() -> None:
    message = bytearray(
        encode([ConntrackRecord("r1", v4_key(), ConnState.SYN_SENT, NOW + 1)], now=NOW)
    )
    unknown = struct.pack("!BH", 99, 3) + b"xyz"
    message[6:8] = struct.pack("!H", 2)
    decoded = decode(bytes(message) + unknown, now=NOW)
    assert len(decoded.conntrack) == 1 and decoded.skipped_entries == 1


def test_batches_respect_the_size_limit_and_stream_decodes() -> None:
    records = [
        ConntrackRecord(f"zone-{n}", FlowKey(6, n, n + 1, 17, n, 53), ConnState.UNREPLIED, NOW + 30)
        for n in range(200)
    ]
    messages = encode_batches(records, now=NOW, max_message_bytes=1400)
    assert len(messages) > 1
    assert all(len(message) <= 1400 for message in messages)
    assert sum(len(decode(message, NOW)) for message in messages) == 200
    assert decode_stream(b"".join(messages), NOW).conntrack == records


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated header"),
        (b"XXXX\x01\x00\x00\x00", "bad magic"),
        (MAGIC + b"\x02\x00\x00\x00", "unsupported version 2"),
        (MAGIC + b"\x01\x80\x00\x00", "reserved flags"),
        (MAGIC + b"\x01\x00\x00\x01", "truncated entry 0"),
        (MAGIC + b"\x01\x00\x00\x01\x01\x00\x10", "claims 16 bytes"),
        (MAGIC + b"\x01\x00\x00\x01\x01\x00\x01\x00", "zone length 0"),
        (MAGIC + b"\x01\x00\x00\x01\x01\x00\x02\x01\xff", "not UTF-8"),
        (MAGIC + b"\x01\x00\x00\x00trailing", "bytes after the message"),
    ],
)
def test_bad_messages(data: bytes, message: str) -> None:
    with pytest.raises(WireFormatError, match=message):
        decode(data, NOW)


def test_bad_field_values_name_the_problem() -> None:
    good = encode([ConntrackRecord("r1", v4_key(), ConnState.SYN_SENT, NOW + 1)], now=NOW)
    state_offset = len(good) - 5
    bad_state = good[:state_offset] + b"\x63" + good[state_offset + 1 :]
    with pytest.raises(WireFormatError, match="99 is not a valid ConnState"):
        decode(bad_state, NOW)
    udp_state = good[:state_offset] + bytes([ConnState.UNREPLIED]) + good[state_offset + 1 :]
    with pytest.raises(WireFormatError, match="does not fit protocol 6"):
        decode(udp_state, NOW)
    version_offset = 8 + 3 + 3
    bad_version = good[:version_offset] + b"\x05" + good[version_offset + 1 :]
    with pytest.raises(WireFormatError, match="ip version 5"):
        decode(bad_version, NOW)


# --- hypothesis -----------------------------------------------------------------------------

zones = st.text(min_size=1, max_size=40).filter(lambda text: len(text.encode()) <= 255)


@st.composite
def flow_keys(draw: st.DrawFn, proto: int | None = None) -> FlowKey:
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    protocol = draw(st.integers(0, 255)) if proto is None else proto
    if protocol in (1, 58):
        echo_id = draw(st.integers(0, 0xFFFF))
        ports = (echo_id, echo_id)
    else:
        ports = (draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF)))
    return FlowKey(
        version,
        draw(st.integers(0, (1 << bits) - 1)),
        draw(st.integers(0, (1 << bits) - 1)),
        protocol,
        *ports,
    )


@st.composite
def conntrack_records(draw: st.DrawFn) -> ConntrackRecord:
    key = draw(flow_keys())
    states = sorted(TCP_STATES) if key.ip_proto == 6 else [ConnState.UNREPLIED, ConnState.REPLIED]
    expiry_ms = draw(st.integers(1, 0xFFFFFFFF))
    return ConntrackRecord(draw(zones), key, draw(st.sampled_from(states)), NOW + expiry_ms / 1000)


@st.composite
def nat_records(draw: st.DrawFn) -> NatRecord:
    original = draw(flow_keys())
    kind = draw(st.sampled_from(list(NatKind)))
    bits = 32 if original.ip_version == 4 else 128
    address = draw(st.integers(0, (1 << bits) - 1))
    port = draw(st.integers(0, 0xFFFF))
    echo = original.ip_proto in (1, 58)
    if kind is NatKind.SNAT:
        translated = FlowKey(
            original.ip_version,
            address,
            original.ip_dst,
            original.ip_proto,
            port,
            port if echo else original.tp_dst,
        )
    else:
        translated = FlowKey(
            original.ip_version,
            original.ip_src,
            address,
            original.ip_proto,
            original.tp_src,
            original.tp_dst if echo else port,
        )
    expiry_ms = draw(st.integers(1, 0xFFFFFFFF))
    return NatRecord(NatBinding(draw(zones), kind, original, translated), NOW + expiry_ms / 1000)


@settings(max_examples=200, deadline=None)
@given(st.lists(conntrack_records(), max_size=20), st.lists(nat_records(), max_size=20))
def test_round_trip(conntrack: list[ConntrackRecord], nat: list[NatRecord]) -> None:
    decoded = decode(encode(conntrack, nat, now=NOW), now=NOW)
    assert [(r.zone, r.key, r.state) for r in decoded.conntrack] == [
        (r.zone, r.key, r.state) for r in conntrack
    ]
    assert [r.binding for r in decoded.nat] == [r.binding for r in nat]
    got = [r.expires_at for r in decoded.conntrack] + [r.expires_at for r in decoded.nat]
    sent = [r.expires_at for r in conntrack] + [r.expires_at for r in nat]
    for received, original in zip(got, sent, strict=True):
        assert abs(received - original) <= 0.001 + 1e-6


@settings(max_examples=150, deadline=None)
@given(
    st.lists(conntrack_records(), min_size=1, max_size=5),
    st.lists(nat_records(), max_size=5),
    st.data(),
)
def test_every_truncation_raises_the_typed_error(
    conntrack: list[ConntrackRecord], nat: list[NatRecord], data: st.DataObject
) -> None:
    message = encode(conntrack, nat, now=NOW)
    cut = data.draw(st.integers(0, len(message) - 1))
    with pytest.raises(WireFormatError):
        decode(message[:cut], NOW)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(conntrack_records(), min_size=1, max_size=4),
    st.lists(nat_records(), max_size=4),
    st.data(),
)
def test_corrupted_messages_decode_or_raise_the_typed_error(
    conntrack: list[ConntrackRecord], nat: list[NatRecord], data: st.DataObject
) -> None:
    message = bytearray(encode(conntrack, nat, now=NOW))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(message) - 1))
        message[position] = data.draw(st.integers(0, 255))
    try:
        decoded = decode(bytes(message), NOW)
    except WireFormatError:
        return
    for record in decoded.conntrack:
        assert isinstance(record, ConntrackRecord)
    for nat_record in decoded.nat:
        assert isinstance(nat_record, NatRecord)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_the_typed_error(data: bytes) -> None:
    for candidate in (data, MAGIC + b"\x01\x00" + data):
        for decoder in (decode, decode_stream):
            with contextlib.suppress(WireFormatError):
                decoder(candidate, NOW)


# --- the IPv4 fast paths ----------------------------------------------------------------------


def _general_entry(record: ConntrackRecord | NatRecord, now: float) -> bytes:
    """The entry as the general (any version) path lays it out, field by field."""

    def key_bytes(key: FlowKey) -> bytes:
        width = 4 if key.ip_version == 4 else 16
        return (
            struct.pack("!BBHH", key.ip_version, key.ip_proto, key.tp_src, key.tp_dst)
            + key.ip_src.to_bytes(width, "big")
            + key.ip_dst.to_bytes(width, "big")
        )

    if isinstance(record, ConntrackRecord):
        zone, kind = record.zone.encode(), 1
        body = bytes([len(zone)]) + zone + key_bytes(record.key) + bytes([record.state])
    else:
        binding = record.binding
        zone, kind = binding.zone.encode(), 2
        body = bytes([len(zone)]) + zone + bytes([binding.kind])
        body += key_bytes(binding.original) + key_bytes(binding.translated)
    body += struct.pack("!I", wire._expiry_ms(record.expires_at, now))
    return struct.pack("!BH", kind, len(body)) + body


@settings(max_examples=200, deadline=None)
@given(st.lists(conntrack_records(), max_size=6), st.lists(nat_records(), max_size=6))
def test_fast_encoding_is_the_general_layout(
    conntrack: list[ConntrackRecord], nat: list[NatRecord]
) -> None:
    expected = [_general_entry(record, NOW) for record in [*conntrack, *nat]]
    assert [wire.encode_conntrack(record, NOW) for record in conntrack] + [
        wire.encode_nat(record, NOW) for record in nat
    ] == expected
    wire._prefixes.clear()  # the prefixes are values of (kind, zone): the same when rebuilt
    assert encode(conntrack, nat, now=NOW) == MAGIC + struct.pack(
        "!BBH", 1, 0, len(expected)
    ) + b"".join(expected)


def _decoded_or_error(message: bytes, monkeypatch: pytest.MonkeyPatch, fast: bool) -> object:
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(wire, "_fast_conntrack", lambda *args: None)
            patch.setattr(wire, "_fast_nat", lambda *args: None)
        try:
            batch = decode(message, NOW)
        except WireFormatError as error:
            return ("error", str(error))
    return (
        [(r.zone, r.key, r.state, r.expires_at) for r in batch.conntrack],
        [(r.binding, r.expires_at) for r in batch.nat],
        batch.skipped_entries,
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(conntrack_records(), min_size=1, max_size=3),
    st.lists(nat_records(), max_size=3),
    st.data(),
)
def test_fast_decoding_equals_the_general_path_even_on_corrupt_bytes(
    conntrack: list[ConntrackRecord], nat: list[NatRecord], data: st.DataObject
) -> None:
    """The IPv4 fast path decodes exactly what the general path decodes, and leaves every
    entry it does not fully accept to it: the same records, or the same error message."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        message = bytearray(encode(conntrack, nat, now=NOW))
        assert _decoded_or_error(bytes(message), monkeypatch, True) == _decoded_or_error(
            bytes(message), monkeypatch, False
        )
        for _ in range(data.draw(st.integers(1, 3))):
            position = data.draw(st.integers(0, len(message) - 1))
            message[position] = data.draw(st.integers(0, 255))
        fast = _decoded_or_error(bytes(message), monkeypatch, True)
        assert fast == _decoded_or_error(bytes(message), monkeypatch, False)


def test_fast_decoding_of_every_single_byte_change_equals_the_general_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = v4_key()
    binding = NatBinding("r1", NatKind.SNAT, key, FlowKey(4, 0xCB007107, 0xC0000201, 6, 1025, 443))
    message = encode(
        [ConntrackRecord("vm-port", key, ConnState.SYN_SENT, NOW + 30)],
        [NatRecord(binding, NOW + 30)],
        now=NOW,
    )
    for position in range(len(message)):
        for value in (0, 1, 2, 4, 5, 6, 0x80, 0xFF):
            changed = message[:position] + bytes([value]) + message[position + 1 :]
            assert _decoded_or_error(changed, monkeypatch, True) == _decoded_or_error(
                changed, monkeypatch, False
            ), (position, value)


def test_wire_caches_are_bounded_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefix and zone-name caches hold values of their keys only (no topology, nothing
    that can change under them) and are emptied when full."""
    monkeypatch.setattr(wire, "_PREFIXES_MAX", 4)
    monkeypatch.setattr(wire, "_ZONE_NAMES_MAX", 4)
    records = [
        ConntrackRecord(f"zone-{n}", v4_key(), ConnState.SYN_SENT, NOW + 1) for n in range(10)
    ]
    for record in records:
        message = encode([record], now=NOW)
        assert message[8:] == _general_entry(record, NOW)
        assert decode(message, NOW).conntrack[0].zone == record.zone
        assert len(wire._prefixes) <= 4 and len(wire._zone_names) <= 4


def test_memoryview_and_bytearray_messages_decode_alike() -> None:
    message = encode([ConntrackRecord("r1", v4_key(), ConnState.SYN_SENT, NOW + 1)], now=NOW)
    expected = decode(message, NOW)
    assert decode(bytearray(message), NOW) == expected
    assert decode(memoryview(message), NOW) == expected
    assert decode_stream(memoryview(message + message), NOW).conntrack == expected.conntrack * 2


@st.composite
def raw_v4_entries(draw: st.DrawFn) -> bytes:
    """An IPv4 conntrack or NAT entry laid out by hand from arbitrary field values (often
    equal where a valid record needs them equal), so many are entries no record encodes:
    a TCP state on a UDP key, a SNAT that moves the destination, an echo key whose ids
    differ, a translation that changes the protocol."""
    small = st.sampled_from([0, 1, 2, 443])
    proto = draw(st.sampled_from([1, 6, 17, 58, 47]))

    def key(like: tuple[int, ...] | None = None) -> tuple[int, ...]:
        fields = [
            draw(st.sampled_from([4, 4, 4, 6])),
            proto if draw(st.booleans()) else draw(st.sampled_from([1, 6, 17])),
        ]
        for index in range(2, 6):  # tp_src, tp_dst, ip_src, ip_dst
            if like is not None and draw(st.booleans()):
                fields.append(like[index])
            else:
                fields.append(draw(small))
        return tuple(fields)

    zone = b"r1"
    if draw(st.booleans()):
        body = struct.pack("!BBHHII", *key()) + struct.pack("!BI", draw(st.integers(0, 12)), 5000)
        kind = 1
    else:
        original = key()
        body = bytes([draw(st.integers(0, 3))]) + struct.pack("!BBHHII", *original)
        body += struct.pack("!BBHHII", *key(original)) + struct.pack("!I", 5000)
        kind = 2
    body = bytes([len(zone)]) + zone + body
    return struct.pack("!BH", kind, len(body)) + body


@settings(max_examples=400, deadline=None)
@given(st.lists(raw_v4_entries(), min_size=1, max_size=4))
def test_fast_decoding_refuses_what_the_record_constructors_refuse(entries: list[bytes]) -> None:
    """The fast path checks the records' invariants on the unpacked fields instead of
    running their constructors' checks: it accepts exactly what they accept."""
    message = MAGIC + struct.pack("!BBH", 1, 0, len(entries)) + b"".join(entries)
    with pytest.MonkeyPatch.context() as monkeypatch:
        fast = _decoded_or_error(message, monkeypatch, True)
        assert fast == _decoded_or_error(message, monkeypatch, False)


def test_fast_records_are_the_constructors_records() -> None:
    """The fast path's record builders set the same fields the constructors set: every slot
    of a binding (an unset slot would raise on reading), and the conntrack builder falls back
    to the constructor if the record gained or lost a field."""
    assert wire._checked_conntrack_record is not ConntrackRecord
    assert wire._checked_nat_binding is not NatBinding
    key = v4_key()
    translated = FlowKey(4, 0xCB007107, 0xC0000201, 6, 1025, 443)
    built = wire._checked_nat_binding("r1", NatKind.SNAT, key, translated)
    assert type(built) is NatBinding
    assert built == NatBinding("r1", NatKind.SNAT, key, translated)
    assert hash(built) == hash(NatBinding("r1", NatKind.SNAT, key, translated))
    made = NatBinding("r1", NatKind.SNAT, key, translated)
    for name in NatBinding.__slots__:
        assert getattr(built, name) == getattr(made, name)
        assert type(getattr(built, name)) is type(getattr(made, name))
    record = wire._checked_conntrack_record("vm", key, ConnState.SYN_SENT, NOW)
    assert record == ConntrackRecord("vm", key, ConnState.SYN_SENT, NOW)
    with pytest.raises(AttributeError, match="immutable"):
        built.zone = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.zone = "other"  # type: ignore[misc]
    fields = ("zone", "kind", "original", "translated")

    @dataclasses.dataclass(frozen=True)
    class Unslotted:
        zone: str
        kind: int
        original: int
        translated: int

    assert slot_builder(Unslotted, "positional", fields, checked=False) is Unslotted
