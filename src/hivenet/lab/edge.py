"""Failures at the edge of a lab with BGP uplinks (the `edge` scenario): take a gateway down
(its agent killed -9 and its uplink link down) or only its uplink link, bring it back, and
read what the outside router and the agents make of it. Used by tests/e2e/test_lab_failover.py
and bench/failover.py.

What is read: hn-ext's BIRD (`birdc show protocols`: each session's state and since when),
hn-ext's kernel route to a prefix (its next hops), each agent's gateway probe (the `probe`
section of its counters file: every probed gateway up or down, the uplink ports reported down)
and background pings (`ping -D`: the time of every reply, so the longest gap between two
replies is the outage that flow saw).
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hivenet.lab.lab import Lab
from hivenet.lab.netns import NamespaceProcess
from hivenet.lab.outside import OUTSIDE_BIRD_CONFIG, session_name
from hivenet.lab.plan import UplinkPlan

INTERNET_IP = "203.0.113.1"  # `add_internet` puts it on hn-ext's loopback

_PROTOCOL = re.compile(r"^(\S+)\s+BGP\s+\S+\s+(\w+)\s+(\S+(?: \S+)?)\s+(\w+)", re.MULTILINE)
_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from", re.MULTILINE)


def wait_until(what: str, check: Callable[[], bool], timeout: float, poll: float = 0.05) -> float:
    """Poll `check` until true; the wall-clock time it was first seen true. TimeoutError
    naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:.0f} s: {what}")
        time.sleep(poll)
    return time.time()


def add_internet(lab: Lab) -> str:
    """An address on hn-ext's loopback, on no uplink's segment: the cloud reaches it only by
    the default route r1 learned from hn-ext, and hn-ext's pings from it are answered only
    through r1's ECMP choice of an uplink. Returns it."""
    lab.run("ext", ["ip", "addr", "add", f"{INTERNET_IP}/32", "dev", "lo"])
    return INTERNET_IP


def uplink_of(lab: Lab, gateway: str) -> UplinkPlan:
    """The uplink whose port is bound on `gateway` (hn-ext's end: `.interface`)."""
    external = lab.plan.external
    if external is None:
        raise ValueError(f"gateway: {gateway!r}, but the lab has no outside network")
    for uplink in external.all_uplinks():
        if uplink.host == gateway:
            return uplink
    hosts = ", ".join(uplink.host for uplink in external.all_uplinks())
    raise ValueError(f"gateway: {gateway!r} owns no uplink (gateways: {hosts})")


def session_of(lab: Lab, gateway: str) -> str:
    """hn-ext's BIRD protocol name for the session with `gateway`."""
    external = lab.plan.external
    assert external is not None
    hosts = [uplink.host for uplink in external.all_uplinks()]
    uplink_of(lab, gateway)  # ValueError for a host that is no gateway
    return session_name(hosts.index(gateway) + 1)


def birdc(lab: Lab, *command: str) -> str:
    return lab.run("ext", ["birdc", "-s", str(lab.outside_bird_socket), *command]).stdout


@dataclass(frozen=True, slots=True)
class Session:
    state: str  # BIRD's protocol state: up, start, down, ...
    since: str  # when it entered that state (BIRD's clock)
    info: str  # Established, Active, Connect, ...

    @property
    def established(self) -> bool:
        return self.state == "up" and self.info == "Established"

    def held_since(self, earlier: Session) -> bool:
        """The same session state as `earlier` without a change in between. BIRD prints
        `since` as wall time converted from its monotonic clock at each read, so two reads of
        one unchanged time may differ by a millisecond: a change moves it by far more (a
        session re-established takes at least an OPEN exchange)."""
        moved = abs(_seconds_of_day(self.since) - _seconds_of_day(earlier.since))
        held = min(moved, 86400 - moved) < 0.5  # midnight may fall between the reads
        return held and (self.state, self.info) == (earlier.state, earlier.info)


def _seconds_of_day(since: str) -> float:
    """BIRD's `since` ("HH:MM:SS.mmm", maybe after a date) as seconds after midnight."""
    hours, minutes, seconds = since.split()[-1].split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def bgp_sessions(lab: Lab) -> dict[str, Session]:
    """hn-ext's BGP sessions by protocol name (gw1, gw2, ...)."""
    return {
        name: Session(state, since, info)
        for name, state, since, info in _PROTOCOL.findall(birdc(lab, "show", "protocols"))
    }


ANNOUNCED = "hn_announced"  # hn-ext's BIRD protocol holding the prefixes of `announce`


def announce(lab: Lab, prefixes: list[str]) -> None:
    """hn-ext's BIRD announces `prefixes` (besides its default route) to every gateway, or
    stops announcing them ([]): a static protocol appended to its configuration, applied by
    `birdc configure` (the sessions are not restarted: their configuration is unchanged)."""
    config = lab.state_dir / OUTSIDE_BIRD_CONFIG
    base = config.read_text().split(f"protocol static {ANNOUNCED}")[0]
    routes = "".join(f" route {prefix} blackhole;" for prefix in prefixes)
    extra = f"protocol static {ANNOUNCED} {{ ipv4;{routes} }}\n" if prefixes else ""
    config.write_text(base + extra)
    answer = birdc(lab, "configure")
    if "Reconfigured" not in answer and "Reconfiguration in progress" not in answer:
        raise RuntimeError(f"hn-ext's BIRD refused its new configuration: {answer.strip()}")


def peer_has_route(lab: Lab, prefix: str, gateway: str) -> bool:
    """Whether hn-ext's BIRD holds a route to `prefix` learned from `gateway`'s session."""
    answer = birdc(lab, "show", "route", prefix, "protocol", session_of(lab, gateway))
    return prefix in answer


def next_hops(lab: Lab, prefix: str) -> set[str]:
    """The next hops of hn-ext's kernel route to `prefix` (BGP-learned, ECMP merged)."""
    text = lab.run("ext", ["ip", "route", "show", prefix]).stdout
    return set(re.findall(r"via (\d+\.\d+\.\d+\.\d+)", text))


def probe_view(lab: Lab, host: str) -> dict[str, object]:
    """The `probe` section of `host`'s agent counters (written each second): `hosts` (probed
    gateway -> "up"/"down"), `down_ports`, `host_changes`, ...; {} before the first write."""
    counters = lab.agent_counters(host) or {}
    probe = counters.get("probe")
    return probe if isinstance(probe, dict) else {}


def probed_states(lab: Lab, host: str) -> dict[str, str]:
    hosts = probe_view(lab, host).get("hosts")
    return dict(hosts) if isinstance(hosts, dict) else {}


def kill_gateway(lab: Lab, gateway: str) -> None:
    """A gateway host dies: its agent killed -9 (its BIRD with it), then its uplink link
    down on the host's side (what a powered-off machine's NIC looks like to its switch)."""
    lab.kill_agent(gateway)
    lab.run(gateway, ["ip", "link", "set", uplink_of(lab, gateway).port_link, "down"])


def revive_gateway(lab: Lab, gateway: str, *, timeout: float = 60.0) -> None:
    """The gateway host is back: link up, agent started, until it bound its ports."""
    lab.run(gateway, ["ip", "link", "set", uplink_of(lab, gateway).port_link, "up"])
    record = lab.agent_record(gateway)
    if record is None or not record.is_running():
        lab.start_agent(gateway)
    lab.wait_agents_ready(timeout=timeout, hosts=[gateway])


def set_uplink_cable(lab: Lab, gateway: str, *, up: bool) -> None:
    """The uplink's cable (hn-ext's end of it) cut or mended; the gateway's agent lives on
    and sees its link lose carrier."""
    state = "up" if up else "down"
    lab.run("ext", ["ip", "link", "set", uplink_of(lab, gateway).interface, state])


class PingLog:
    """A background `ping -D` at `interval` seconds; `reply_times()` the time of each reply."""

    def __init__(
        self,
        lab: Lab,
        source: str,
        target: str,
        *,
        label: str,
        interval: float = 0.05,
        bind: str | None = None,
    ) -> None:
        argv = ["ping", "-n", "-D", "-i", f"{interval:g}", "-W", "1", target]
        if bind is not None:
            argv[-1:-1] = ["-I", bind]
        self.process: NamespaceProcess = lab.start_in(source, argv, label=label)
        self.log: Path = lab.log_of(source, label)
        self.started = time.time()

    def reply_times(self) -> list[float]:
        try:
            text = self.log.read_text()
        except OSError:
            return []
        return [float(stamp) for stamp in _REPLY.findall(text)]

    def replies_after(self, moment: float) -> int:
        return sum(1 for stamp in self.reply_times() if stamp > moment)

    def _replies_around(self, since: float | None) -> list[float]:
        """Reply times from the start, or from the last reply before `since` on."""
        times = self.reply_times()
        if since is None:
            return times
        before = [stamp for stamp in times if stamp <= since]
        return before[-1:] + [stamp for stamp in times if stamp > since]

    def longest_gap(self, since: float | None = None) -> float:
        """The longest time between two replies (from the start, or around `since`: the
        last reply before it counts), up to the last reply seen."""
        times = self._replies_around(since)
        if len(times) < 2:
            raise ValueError(f"ping {self.log.name}: {len(times)} replies, no gap to measure")
        return max(later - earlier for earlier, later in itertools.pairwise(times))

    def gap_where(self, since: float) -> str:
        """Where the longest gap around `since` lies, for a failure message: its start and end
        in seconds after `since`, and how many replies came after it."""
        times = self._replies_around(since)
        if len(times) < 2:
            return f"{len(times)} replies"
        earlier, later = max(itertools.pairwise(times), key=lambda pair: pair[1] - pair[0])
        after = sum(1 for stamp in times if stamp > later)
        return f"{earlier - since:+.2f} s..{later - since:+.2f} s, {after} replies after it"

    def stop(self) -> None:
        self.process.stop()


class Arrivals:
    """nftables counters in hn-ext: packets that entered it through each uplink, per match
    (`matches`: label -> nft match words, e.g. {"ping": ["icmp", "type", "echo-request"]}).
    BGP keepalives make plain interface counters useless for this."""

    TABLE = "hnfailover"

    def __init__(self, lab: Lab, matches: dict[str, list[str]]) -> None:
        self.lab = lab
        self.labels = list(matches)
        external = lab.plan.external
        assert external is not None
        self.links = {uplink.interface: uplink.host for uplink in external.all_uplinks()}
        self._nft("add", "table", "ip", self.TABLE)
        hook = "{ type filter hook prerouting priority 0; }"
        self._nft("add", "chain", "ip", self.TABLE, "pre", hook)
        for link in self.links:
            for label, words in matches.items():
                comment = ["comment", f'"{link} {label}"']
                rule = ["iifname", link, *words, "counter", *comment]
                self._nft("add", "rule", "ip", self.TABLE, "pre", *rule)

    def _nft(self, *argv: str) -> str:
        return self.lab.run("ext", ["nft", *argv]).stdout

    def counts(self) -> dict[tuple[str, str], int]:
        """(gateway, label) -> packets so far."""
        text = self._nft("list", "table", "ip", self.TABLE)
        found = re.findall(r'counter packets (\d+) bytes \d+ comment "(\S+) (\S+)"', text)
        return {(self.links[link], label): int(count) for count, link, label in found}

    def close(self) -> None:
        self.lab.run("ext", ["nft", "delete", "table", "ip", self.TABLE], check=False)
