"""End-to-end: gateway failover at the edge (`edge` scenario: r1's two uplinks on gw1 and gw2,
BGP with hn-ext's BIRD), on real sockets, with traffic running.

Every agent probes the hosts that own uplinks every 100 ms, sealed on the flow-state channel
(agent/probe.py); a gateway that misses 3 probes leaves every ingress host's ECMP set, and a
gateway whose uplink link is down says so in its replies. The tests run in order on one lab:

- the probes run between the agents' real sockets (every agent sees every gateway up);
- a gateway dies (agent killed -9, uplink link down) under a 20 pkt/s ping from vm1 to the
  outside through SNAT and one from the outside to vm2's floating IP, an iperf3 TCP run and
  checksummed echo connections through SNAT: the longest ping gap is bounded, every
  connection survives (those through the other gateway and, thanks to the shared NAT state,
  those through the dead one), hn-ext's BIRD withdraws the dead gateway's routes;
- it comes back: routes advertised again, ECMP uses it again, nothing flaps for seconds;
- only an uplink cable is cut (its agent lives): the same, and back.

The victim is always the gateway vm1's ping leaves through (nftables counters in hn-ext say
which), so the gap measured is the failover's, not a flow that never moved.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hivenet.lab.edge import (
    INTERNET_IP,
    Arrivals,
    PingLog,
    add_internet,
    bgp_sessions,
    kill_gateway,
    next_hops,
    peer_has_route,
    probe_view,
    probed_states,
    revive_gateway,
    session_of,
    set_uplink_cable,
    uplink_of,
    wait_until,
)
from hivenet.lab.lab import Lab
from hivenet.lab.probes import EchoClient, EchoServer
from hivenet.lab.scenario import builtin_scenario
from hivenet.model import Route
from tests.e2e.common import running_lab

pytestmark = pytest.mark.e2e

FLOATING_RANGE = "198.51.100.0/24"
VM2_FLOATING = "198.51.100.20"
GATEWAYS = ("gw1", "gw2")
INGRESS = ("h1", "h2")  # the VMs' hosts: where r1's ECMP choice is made
LEASE_TTL = 10  # the agents' default: a gap under MAX_GAP can only be the probe's doing
SETTLE = 60.0  # seconds for a session or a withdrawal on a loaded machine
MAX_GAP = 3.0  # the goal is < 1 s; slack for a loaded 2-core machine
ECHO_PORT = 7100  # + n: one echo server per connection, so nftables can tell them apart
IPERF_PORT = 5203
VICTIM: dict[str, str] = {}  # the gateway the death test killed, for the return test


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("failoverlab")
    with running_lab(builtin_scenario("edge"), root, timeout=90, agent_lease_ttl=LEASE_TTL) as lab:
        add_internet(lab)
        yield lab


def wait_for(what: str, check: Callable[[], bool], timeout: float = SETTLE) -> float:
    return wait_until(what, check, timeout, poll=0.2)


def established(lab: Lab) -> set[str]:
    sessions = bgp_sessions(lab)
    return {g for g in GATEWAYS if (s := sessions.get(session_of(lab, g))) and s.established}


def floating_gateways(lab: Lab) -> set[str]:
    """The gateways hn-ext's kernel route to the floating range goes through."""
    by_address = {uplink_of(lab, g).router_address: g for g in GATEWAYS}
    return {by_address.get(hop, hop) for hop in next_hops(lab, FLOATING_RANGE)}


def learned_default_gateways(lab: Lab) -> set[str]:
    """The gateways whose uplink r1's learned default routes leave through (from the API)."""
    with lab.client() as client:
        items = client.list_all("route", {"router_id": "r1"})
    by_port = {uplink_of(lab, g).port_id: g for g in GATEWAYS}
    return {
        by_port.get(route.next_hop_port_id or "", "?")
        for route in (Route.model_validate(item) for item in items)
        if route.learned_from is not None and str(route.dst_prefix) == "0.0.0.0/0"
    }


def all_up(lab: Lab) -> None:
    """Both sessions, both next hops at hn-ext, both defaults in r1, every probe up."""
    wait_for("hn-ext's sessions with both gateways", lambda: established(lab) == set(GATEWAYS))
    wait_for(
        "hn-ext's route to the floating range via both",
        lambda: floating_gateways(lab) == set(GATEWAYS),
    )
    wait_for("r1's defaults learned via both", lambda: learned_default_gateways(lab) == {*GATEWAYS})
    wait_for(
        "every ingress host's probes of both gateways up",
        lambda: all(
            probed_states(lab, h) == dict.fromkeys(GATEWAYS, "up")
            and probe_view(lab, h).get("down_ports") == []
            for h in INGRESS
        ),
    )


WATCHED = ("drop", "upcall", "host_changes", "invalidated")  # counters a failure shows


def watched_counters(lab: Lab) -> dict[str, dict[str, object]]:
    """The agents' nonzero WATCHED counters, for a failure message (the victim's are its
    last)."""
    seen: dict[str, dict[str, object]] = {}
    for host in (*INGRESS, *GATEWAYS):
        counters = lab.agent_counters(host) or {}
        seen[host] = {
            key: value
            for section in counters.values()
            if isinstance(section, dict)
            for key, value in section.items()
            if isinstance(value, int) and value and any(word in key for word in WATCHED)
        }
    return seen


def other(gateway: str) -> str:
    return next(g for g in GATEWAYS if g != gateway)


class Traffic:
    """vm1 -> outside (SNAT) and outside -> vm2's floating IP pings at 20 pkt/s, an iperf3
    run and echo connections from vm1 to the outside; which gateway each entered hn-ext by."""

    def __init__(self, lab: Lab, seconds: float) -> None:
        self.lab = lab
        self.arrivals = Arrivals(
            lab,
            {"ping": ["icmp", "type", "echo-request"]}
            | {f"echo{n}": ["tcp", "dport", str(ECHO_PORT + n)] for n in range(16)},
        )
        self.out = PingLog(lab, "vm1", INTERNET_IP, label="failover-out")
        self.into = PingLog(lab, "ext", VM2_FLOATING, label="failover-in", bind=INTERNET_IP)
        self.servers: list[EchoServer] = []
        self.echoes: dict[int, tuple[EchoClient, str]] = {}  # n -> client, first gateway
        self.iperf_server = lab.start_in(
            "ext", ["iperf3", "-s", "-1", "-B", INTERNET_IP, "-p", str(IPERF_PORT)], label="ips"
        )
        self.seconds = seconds

    def ping_gateway(self) -> str:
        """The gateway vm1's ping leaves through (its requests' arrivals at hn-ext)."""
        wait_for("vm1's ping answered", lambda: len(self.out.reply_times()) >= 5)
        wait_for("the ping to the floating IP answered", lambda: len(self.into.reply_times()) >= 5)
        before = self.arrivals.counts()
        time.sleep(1.0)
        after = self.arrivals.counts()
        used = [g for g in GATEWAYS if after[(g, "ping")] - before[(g, "ping")] >= 10]
        assert len(used) == 1, (before, after)
        return used[0]

    def start_echoes(self) -> None:
        """Echo connections (one server each) until one entered through each gateway."""
        for n in range(16):
            server = self.lab.echo_server("ext", INTERNET_IP, ECHO_PORT + n, label=f"echosrv{n}")
            self.servers.append(server)
            chunks = int(self.seconds / 0.05)
            client = self.lab.echo_client(
                "vm1",
                INTERNET_IP,
                ECHO_PORT + n,
                chunk_size=512,
                chunks=chunks,
                interval=0.05,
                timeout=20,
                label=f"echocli{n}",
            )
            client.wait_progress(1, timeout=20)
            counts = self.arrivals.counts()
            (gateway,) = [g for g in GATEWAYS if counts[(g, f"echo{n}")]]
            self.echoes[n] = (client, gateway)
            if {g for _, g in self.echoes.values()} == set(GATEWAYS):
                return
        pytest.fail("16 echo connections all entered hn-ext through one gateway")

    def start_iperf(self) -> None:
        argv = ["iperf3", "-c", INTERNET_IP, "-p", str(IPERF_PORT), "-b", "20M"]
        argv += ["-t", f"{self.seconds:g}", "-i", "0.5", "-J"]
        for _ in range(20):  # until the server listens
            self.iperf = self.lab.start_in("vm1", argv, label="ipc")
            time.sleep(0.5)
            if self.iperf.poll() in (None, 0):
                return
        pytest.fail(f"iperf3 did not start: {self.iperf_log().read_text()[-500:]}")

    def iperf_log(self) -> Path:
        return self.lab.log_of("vm1", "ipc")

    def iperf_result(self) -> tuple[float, float]:
        """(megabits received, longest run of empty 0.5 s intervals in seconds); the run
        must have ended well and still carried data in its last interval."""
        code = self.iperf.popen.wait(self.seconds + 30)
        report = json.loads(self.iperf_log().read_text())
        assert code == 0 and "error" not in report, report.get("error")
        stalled = longest = 0.0
        for interval in report["intervals"]:
            total = interval["sum"]
            stalled = stalled + total["seconds"] if total["bytes"] == 0 else 0.0
            longest = max(longest, stalled)
        assert report["intervals"][-1]["sum"]["bytes"] > 0, report["intervals"][-1]
        return report["end"]["sum_received"]["bytes"] * 8 / 1e6, longest

    def close(self) -> None:
        for process in (self.out, self.into, self.iperf_server):
            process.stop()
        for client, _ in self.echoes.values():
            client.process.stop()
        for server in self.servers:
            server.stop()
        if hasattr(self, "iperf"):
            self.iperf.stop()
        self.arrivals.close()


def test_probes_run_between_the_agents(lab: Lab) -> None:
    """Every agent probes every other gateway over its real socket and gets answers."""
    all_up(lab)
    wait_for(
        "each gateway's probe of the other up",
        lambda: all(probed_states(lab, g) == {other(g): "up"} for g in GATEWAYS),
    )
    before = {host: probe_view(lab, host) for host in (*INGRESS, *GATEWAYS)}
    time.sleep(2.5)
    for host, seen in before.items():
        now = lab.fresh_agent_counters(host)["probe"]
        assert now["answers"] - seen["answers"] >= 5 * len(now["hosts"]), (host, seen, now)
        assert now["down_ports"] == [] and now["local_down_ports"] == [], now


def test_gateway_death_under_traffic(lab: Lab) -> None:
    all_up(lab)
    traffic = Traffic(lab, seconds=14)
    try:
        victim = VICTIM["gateway"] = traffic.ping_gateway()
        survivor = other(victim)
        traffic.start_echoes()
        traffic.start_iperf()
        time.sleep(1.5)
        killed = time.time()
        kill_gateway(lab, victim)
        withdrawn = wait_for(
            f"hn-ext's route to the floating range via {survivor} only",
            lambda: floating_gateways(lab) == {survivor},
        )
        assert victim not in established(lab)
        assert not peer_has_route(lab, FLOATING_RANGE, victim)  # birdc: withdrawn
        assert peer_has_route(lab, FLOATING_RANGE, survivor)
        probed_down = wait_for(
            f"every ingress host's probe: {victim} down",
            lambda: all(probed_states(lab, h).get(victim) == "down" for h in INGRESS),
        )
        unlearned = wait_for(
            f"r1's default via {survivor} only", lambda: learned_default_gateways(lab) == {survivor}
        )
        time.sleep(2.0)
        out_gap = traffic.out.longest_gap(since=killed)
        in_gap = traffic.into.longest_gap(since=killed)
        before = traffic.arrivals.counts()
        time.sleep(1.0)
        after = traffic.arrivals.counts()
        megabits, stall = traffic.iperf_result()
        echo_waits = {}
        for n, (client, gateway) in traffic.echoes.items():
            result = client.result(timeout=30)
            assert result.echoes_match, (n, gateway)
            assert result.longest_wait < MAX_GAP, (n, gateway, result)
            echo_waits[f"echo{n} via {gateway}"] = round(result.longest_wait, 3)
        print(
            f"\ngateway death ({victim} killed, {lab.record.datapath} datapath): longest ping gap"
            f" vm1->outside {out_gap:.3f} s, outside->floating IP {in_gap:.3f} s; hn-ext"
            f" withdrew {victim}'s route after {withdrawn - killed:.2f} s; iperf3"
            f" {megabits:.0f} Mbit, longest stall {stall:.1f} s; echo waits {echo_waits}"
        )
        if max(out_gap, in_gap) >= MAX_GAP:  # a failure's diagnosis: the gaps against events
            print(
                f"after the kill: probes down +{probed_down - killed:.2f} s, learned default"
                f" gone +{unlearned - killed:.2f} s; out gap {traffic.out.gap_where(killed)};"
                f" in gap {traffic.into.gap_where(killed)}; counters {watched_counters(lab)}"
            )
        assert out_gap < MAX_GAP, out_gap
        assert in_gap < MAX_GAP, in_gap
        assert stall < MAX_GAP, stall
        # The ping left through the victim; now it enters hn-ext through the survivor only.
        assert after[(victim, "ping")] == before[(victim, "ping")]
        assert after[(survivor, "ping")] - before[(survivor, "ping")] >= 10
    finally:
        traffic.close()


def test_dead_gateway_comes_back_without_flapping(lab: Lab) -> None:
    victim = VICTIM.get("gateway", "gw1")
    revive_gateway(lab, victim)
    all_up(lab)
    assert peer_has_route(lab, FLOATING_RANGE, victim)  # birdc: advertised again
    # ECMP includes it again: of a few new flows (each ping its own ICMP id) some leave by it.
    arrivals = Arrivals(lab, {"ping": ["icmp", "type", "echo-request"]})
    try:
        for _ in range(30):
            lab.ping("vm1", INTERNET_IP, count=1, wait=1.0)
            if arrivals.counts()[(victim, "ping")]:
                break
        assert arrivals.counts()[(victim, "ping")], arrivals.counts()
    finally:
        arrivals.close()
    # Nothing flaps: sessions, hn-ext's route and every probe hold still for a few seconds.
    sessions = bgp_sessions(lab)
    changes = {host: probe_view(lab, host)["host_changes"] for host in INGRESS}
    for _ in range(10):
        time.sleep(0.5)
        now_sessions = bgp_sessions(lab)
        assert now_sessions.keys() == sessions.keys(), (now_sessions, sessions)
        assert all(now_sessions[name].held_since(sessions[name]) for name in sessions), (
            now_sessions,
            sessions,
        )
        assert floating_gateways(lab) == set(GATEWAYS)
    for host in INGRESS:
        now = lab.fresh_agent_counters(host)["probe"]
        assert now["host_changes"] == changes[host], (host, now)
        assert now["hosts"] == dict.fromkeys(GATEWAYS, "up"), (host, now)


def test_uplink_cable_cut_with_the_agent_alive(lab: Lab) -> None:
    all_up(lab)
    traffic = Traffic(lab, seconds=8)
    cut_cable: list[str] = []
    try:
        victim = traffic.ping_gateway()
        survivor = other(victim)
        port = uplink_of(lab, victim).port_id
        cut = time.time()
        set_uplink_cable(lab, victim, up=False)
        cut_cable.append(victim)
        wait_for(
            f"{victim} reports its uplink down",
            lambda: probe_view(lab, victim).get("local_down_ports") == [port],
        )
        wait_for(
            f"every ingress host learns {victim}'s uplink is down",
            lambda: all(probe_view(lab, h).get("down_ports") == [port] for h in INGRESS),
        )
        for host in INGRESS:  # the gateway host itself still answers
            assert probed_states(lab, host)[victim] == "up", probe_view(lab, host)
        wait_for(
            f"hn-ext's route to the floating range via {survivor} only",
            lambda: floating_gateways(lab) == {survivor},
        )
        time.sleep(2.0)
        before = traffic.arrivals.counts()
        time.sleep(1.0)
        after = traffic.arrivals.counts()
        gap = traffic.out.longest_gap(since=cut)
        in_gap = traffic.into.longest_gap(since=cut)
        print(
            f"\nuplink cut ({victim}, {lab.record.datapath} datapath): longest ping gap"
            f" vm1->outside {gap:.3f} s, outside->floating IP {in_gap:.3f} s"
        )
        assert gap < MAX_GAP, gap
        assert in_gap < MAX_GAP, in_gap
        assert after[(victim, "ping")] == before[(victim, "ping")]
        assert after[(survivor, "ping")] - before[(survivor, "ping")] >= 10
    finally:
        traffic.close()
        for gateway in cut_cable:
            set_uplink_cable(lab, gateway, up=True)
    wait_for(
        "every ingress host learns the uplink is up again",
        lambda: all(probe_view(lab, h).get("down_ports") == [] for h in INGRESS),
    )
    all_up(lab)
