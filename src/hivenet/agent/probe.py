"""Fast gateway liveness: the per-peer probe state machine (BFD-like, echo mode) and the probe
message a gateway's answer carries its down uplink ports in.

Owns `ProbeSession` (one probed host: Up/Down with a detect multiplier and recovery
hysteresis) and the probe message layout (`encode_probe`/`decode_probe`). Pure: no I/O, no
clock; the caller ticks a session once per probe interval and reports answers.

`GatewayProber` is the agent's side (which hosts to probe, answering, reporting changes,
its counters in `snapshot()`: the `probe` section of the agent's counters file); the agent
carries its messages sealed on the flow-state channel. `LinkWatcher`: a gateway's
own uplink interfaces (operstate), whose down ports go into its replies.

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

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger(__name__)

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

    def answered(self, sequence: int) -> bool:
        """A reply (authenticated by the caller) to request `sequence`; a late one to an
        older request than the previous is ignored (returns whether it counted)."""
        if self.sequence and self.sequence - 1 <= sequence <= self.sequence:
            self._answered = True
            return True
        return False

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


class GatewayProber:
    """The agent's side: probe every other host that owns an exterior router port (the only
    ECMP next hops), answer probes with this host's down uplink ports, and report changes.

    `send(host_id, message)` carries a probe (sealed, on the flow-state channel);
    `on_host(host_id)` is called when a probed host's state changed (read `is_down`);
    `on_port(port_id, alive)` when a remote gateway's port changed liveness.
    `tick()` once per interval (`run()` loops it on the injected sleep)."""

    def __init__(
        self,
        host_id: str,
        gateway_hosts: Callable[[], Iterable[tuple[str, str]]],
        send: Callable[[str, bytes], None],
        on_host: Callable[[str], None],
        on_port: Callable[[str, bool], None],
        local_down_ports: Callable[[], Iterable[str]] = tuple,
        *,
        interval: float = DEFAULT_INTERVAL,
        multiplier: int = DEFAULT_MULTIPLIER,
        recover: int = DEFAULT_RECOVER,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval: {interval} must be positive")
        ProbeSession(multiplier=multiplier, recover=recover)  # checks them
        self.host_id = host_id
        self.interval = interval
        self.multiplier = multiplier
        self.recover = recover
        self._gateway_hosts = gateway_hosts  # (host id, port id) of remote exterior router ports
        self._send = send
        self._on_host = on_host
        self._on_port = on_port
        self._local_down_ports = local_down_ports
        self.sessions: dict[str, ProbeSession] = {}
        self._ports: dict[str, set[str]] = {}  # probed host -> its exterior router ports
        self._down_ports: dict[str, frozenset[str]] = {}  # probed host -> what it reported
        self.sent = 0  # requests sent
        self.answers = 0  # replies to a session's current or previous request
        self.host_changes = 0  # Up/Down transitions of probed hosts
        self.port_changes = 0  # liveness changes of their reported uplink ports
        self._wakeup: asyncio.Event | None = None  # set by `wake()` while `run` is idle

    def is_down(self, host_id: str) -> bool:
        session = self.sessions.get(host_id)
        return session is not None and not session.up

    def snapshot(self) -> dict[str, object]:
        """What the agent's counters file shows: each probed host's state, the remote
        uplink ports reported down, and the totals."""
        return {
            "hosts": {host: "up" if s.up else "down" for host, s in sorted(self.sessions.items())},
            "down_ports": sorted(p for ports in self._down_ports.values() for p in ports),
            "sent": self.sent,
            "answers": self.answers,
            "host_changes": self.host_changes,
            "port_changes": self.port_changes,
        }

    def wake(self) -> None:
        """What `tick` reads may have changed (the topology's ports, this host's bindings):
        an idle `run` ticks again at once."""
        if self._wakeup is not None:
            self._wakeup.set()

    def tick(self) -> bool:
        """One interval: returns whether any gateway host is probed."""
        wanted: dict[str, set[str]] = {}
        for host_id, port_id in self._gateway_hosts():
            if host_id != self.host_id:
                wanted.setdefault(host_id, set()).add(port_id)
        for host_id in list(self.sessions):
            if host_id not in wanted:  # no longer a gateway: lease-only liveness again
                gone = self.sessions.pop(host_id)
                for port_id in self._down_ports.pop(host_id, frozenset()):
                    self._on_port(port_id, True)
                self._ports.pop(host_id, None)
                if not gone.up:
                    self._on_host(host_id)
        self._ports = wanted
        for host_id in sorted(wanted):
            session = self.sessions.get(host_id)
            if session is None:
                session = self.sessions[host_id] = ProbeSession(
                    multiplier=self.multiplier, recover=self.recover
                )
            if session.tick() is not None:
                self.host_changes += 1
                log.info(
                    "host %s: gateway %s is %s (probe)",
                    self.host_id,
                    host_id,
                    "up" if session.up else "down",
                )
                self._on_host(host_id)
            self._send(host_id, encode_probe(ProbeMessage(REQUEST, session.sequence)))
            self.sent += 1
        return bool(wanted)

    def receive(self, sender: str, payload: bytes) -> None:
        """A sealed probe from `sender` (authenticated by the flow-state envelope)."""
        message = decode_probe(payload)
        if message.type == REQUEST:
            down = tuple(sorted(self._local_down_ports()))
            self._send(sender, encode_probe(ProbeMessage(REPLY, message.sequence, down)))
            return
        session = self.sessions.get(sender)
        if session is None:
            return
        if session.answered(message.sequence):
            self.answers += 1
        # Only the sender's own exterior ports: a gateway speaks for its uplinks, no others.
        reported = frozenset(message.down_ports) & self._ports.get(sender, set())
        before = self._down_ports.get(sender, frozenset())
        if reported != before:
            self._down_ports[sender] = reported
            self.port_changes += len(reported ^ before)
            for port_id in before - reported:
                self._on_port(port_id, True)
            for port_id in reported - before:
                self._on_port(port_id, False)

    async def run(
        self,
        sleep: Callable[[float], Awaitable[None]],
        before_tick: Callable[[], bool] | None = None,
    ) -> None:
        """Tick every interval while there is a gateway to probe or an uplink of this host
        to poll (`before_tick` returns whether it polled one); else wait for `wake()`: a host
        with neither (most hosts) runs no timer for it."""
        self._wakeup = asyncio.Event()
        while True:
            busy = True
            try:
                self._wakeup.clear()
                # The agent polls its own uplinks here.
                polled = before_tick() if before_tick is not None else False
                busy = self.tick() or polled
            except Exception:  # the prober must survive one bad tick
                log.exception("host %s: gateway probe tick failed", self.host_id)
            if busy:
                await sleep(self.interval)
            else:
                await self._wakeup.wait()


def sysfs_link_up(interface: str) -> bool | None:
    """An interface's operational state from /sys/class/net (None: no such interface here)."""
    try:
        with open(f"/sys/class/net/{interface}/operstate") as file:
            state = file.read().strip()
    except OSError:
        return None
    return state in ("up", "unknown")  # "unknown": drivers that report no state (tun, dummy)


class LinkWatcher:
    """A gateway's uplink interfaces: polled once per probe interval. Down at once when the
    link goes down (or a seen interface vanishes), up again only after `recover` consecutive
    polls found it up (a bouncing link does not flap its peers' ECMP). An interface never
    seen (not in this namespace, a test's fake) is not judged."""

    def __init__(
        self,
        read: Callable[[str], bool | None] = sysfs_link_up,
        *,
        recover: int = DEFAULT_RECOVER,
    ) -> None:
        self._read = read
        self.recover = recover
        self._seen: set[str] = set()
        self._up_polls: dict[str, int] = {}  # down port -> consecutive up polls
        self.down: set[str] = set()  # port ids

    def poll(self, ports: dict[str, str]) -> dict[str, bool]:
        """Poll `ports` (port id -> interface); returns the ports whose liveness changed."""
        changed: dict[str, bool] = {}
        for port_id in list(self.down):
            if port_id not in ports:  # unbound: no longer ours to judge
                self.down.discard(port_id)
                self._up_polls.pop(port_id, None)
                changed[port_id] = True
        for port_id, interface in ports.items():
            state = self._read(interface)
            if state is not None:
                self._seen.add(interface)
            up = state is not False and (state is not None or interface not in self._seen)
            if not up:
                self._up_polls[port_id] = 0
                if port_id not in self.down:
                    self.down.add(port_id)
                    changed[port_id] = False
            elif port_id in self.down:
                self._up_polls[port_id] = self._up_polls.get(port_id, 0) + 1
                if self._up_polls[port_id] >= self.recover:
                    self.down.discard(port_id)
                    del self._up_polls[port_id]
                    changed[port_id] = True
        return changed
