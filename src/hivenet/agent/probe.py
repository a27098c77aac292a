"""Fast gateway liveness: the per-peer probe state machine (BFD-like, echo mode) and the probe
message a gateway's answer carries its down uplink ports in.

Owns `ProbeSession` (one probed host: Up/Down with a detect multiplier and recovery
hysteresis) and the probe message layout (`encode_probe`/`decode_probe`). Pure: no I/O, no
clock; the caller ticks a session once per probe interval and reports answers.

NOT YET WIRED INTO THE AGENT (see docs/architecture.md): the sending loop, the transport (a
sealed message on the flow-state channel) and the uplink link watcher are still to do.

Detection counts probe intervals, not elapsed time, so a stalled event loop or a jump of the
clock costs at most one missed interval: a session goes Down after `multiplier` consecutive
intervals without an answer (between multiplier and multiplier + 1 intervals after the last
answer), and comes back Up only after `recover` consecutive answered intervals; one lost
probe changes nothing.

Layout (network byte order):

    probe   = magic "HNPB" | version u8 (1) | type u8 (1 request, 2 reply) | sequence u32
              | down port count u16 | (length u8 (1..255) | UTF-8 port id)*
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"HNPB"
VERSION = 1
REQUEST = 1
REPLY = 2
DEFAULT_INTERVAL = 0.1  # seconds between probes
DEFAULT_MULTIPLIER = 3  # missed intervals before Down
DEFAULT_RECOVER = 3  # answered intervals before Up again

_HEADER = struct.Struct("!4sBBIH")


@dataclass(frozen=True, slots=True)
class ProbeMessage:
    type: int
    sequence: int
    down_ports: tuple[str, ...] = ()


def encode_probe(message: ProbeMessage) -> bytes:
    if message.type not in (REQUEST, REPLY):
        raise ValueError(f"type: {message.type} is not {REQUEST} (request) or {REPLY} (reply)")
    if not 0 <= message.sequence <= 0xFFFFFFFF:
        raise ValueError(f"sequence: {message.sequence} is outside 0..2**32-1")
    body = b""
    for port_id in message.down_ports:
        raw = port_id.encode("utf-8")
        if not 1 <= len(raw) <= 255:
            raise ValueError(f"down_ports: {port_id!r} must be 1..255 bytes of UTF-8")
        body += bytes((len(raw),)) + raw
    header = _HEADER.pack(MAGIC, VERSION, message.type, message.sequence, len(message.down_ports))
    return header + body


def decode_probe(data: bytes) -> ProbeMessage:
    """The probe in `data`; ValueError saying what is wrong with it."""
    if len(data) < _HEADER.size:
        raise ValueError(f"probe: {len(data)} bytes, at least {_HEADER.size} needed")
    magic, version, kind, sequence, count = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise ValueError(f"probe: bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise ValueError(f"probe: unsupported version {version}")
    if kind not in (REQUEST, REPLY):
        raise ValueError(f"probe: unknown type {kind}")
    offset = _HEADER.size
    ports: list[str] = []
    for index in range(count):
        if offset >= len(data):
            raise ValueError(f"probe: truncated at down port {index} of {count}")
        length = data[offset]
        raw = data[offset + 1 : offset + 1 + length]
        if length == 0 or len(raw) != length:
            raise ValueError(f"probe: down port {index} has a bad length {length}")
        try:
            ports.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"probe: down port {index} is not UTF-8") from None
        offset += 1 + length
    if offset != len(data):
        raise ValueError(f"probe: {len(data) - offset} trailing bytes")
    return ProbeMessage(kind, sequence, tuple(ports))


class ProbeSession:
    """One probed host, as the prober sees it. Per interval: `tick()` (accounts the interval
    that ended, may change the state) then send the request numbered `sequence`; an answer
    to the current or the previous request is `answered(sequence)`. Starts Up: the store
    lease is the authority until probes say otherwise."""

    __slots__ = ("_answered", "misses", "multiplier", "recover", "sequence", "successes", "up")

    def __init__(self, *, multiplier: int = DEFAULT_MULTIPLIER, recover: int = DEFAULT_RECOVER):
        if multiplier < 1:
            raise ValueError(f"multiplier: {multiplier} must be at least 1")
        if recover < 1:
            raise ValueError(f"recover: {recover} must be at least 1")
        self.multiplier = multiplier
        self.recover = recover
        self.up = True
        self.misses = 0
        self.successes = 0
        self.sequence = 0  # of the last request sent (0: none yet)
        self._answered = False

    def answered(self, sequence: int) -> None:
        """A reply (authenticated by the caller) to request `sequence`; a late one to an
        older request than the previous is ignored."""
        if self.sequence and self.sequence - 1 <= sequence <= self.sequence:
            self._answered = True

    def tick(self) -> bool | None:
        """The interval ended: account it and number the next request (`sequence`). Returns
        the new state (True: Up, False: Down) when it changed, else None."""
        change: bool | None = None
        if self.sequence:  # the first tick ends no interval with a request in it
            if self._answered:
                self.misses = 0
                self.successes += 1
            else:
                self.misses += 1
                self.successes = 0
            if self.up and self.misses >= self.multiplier:
                self.up = change = False
            elif not self.up and self.successes >= self.recover:
                self.up = change = True
        self._answered = False
        self.sequence = self.sequence % 0xFFFFFFFF + 1
        return change
