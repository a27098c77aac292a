"""`python -m hivenet.demo` (what `make demo` runs): HiveNet carrying real traffic, as a tour.

Owns the demo script only. As root it brings up the default lab (`hivenet lab up`: three hosts
as network namespaces, the embedded store, the REST API, the topology written through the
API, four VMs, one agent per host on the userspace datapath), then measures ping and TCP
between VM pairs on every kind of path (same host, across hosts on one network, across the
virtual router): the first ping's RTT (ARP plus the simulation upcalls on the way) against the
steady-state median once flows are installed, and TCP throughput (iperf3 if installed, else a
SHA-256-checked Python transfer). It shows the agents' counters and how to explore, and leaves
the lab running (`hivenet lab down` or `make lab-clean` stops it; the next `make demo` replaces
it); `--teardown` removes it at the end instead.

Without root (no namespaces) it runs the same scenario in one process: one `HostAgent` per
host over the in-memory datapath and underlay, VMs emulated by a few lines that answer ARP and
echo requests, and shows that pings get through, the first with upcalls and the rest without.

Must not: build anything itself (the lab and the agents do), touch a lab other than the
default one in the default state dir, or leave a half-built lab behind on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from rich.console import Console
from rich.table import Table

from hivenet.lab import dhcpclient
from hivenet.lab.cli import print_explore_hints
from hivenet.lab.lab import Lab
from hivenet.lab.netns import LabError, LabScope
from hivenet.lab.plan import assign_macs, plan_lab, topology_objects, vm_port_id
from hivenet.lab.probes import PingResult, TransferResult
from hivenet.lab.record import default_state_dir
from hivenet.lab.scenario import Scenario, ScenarioError, builtin_scenario

STEADY_PINGS = 20
PING_INTERVAL_SECONDS = 0.02
IPERF_SECONDS = 2.0
PYTHON_TRANSFER_BYTES = 16 << 20
CLI = (sys.executable, "-m", "hivenet.cli")
METADATA_URL = "http://169.254.169.254/latest/meta-data"


class Stopped(Exception):
    """SIGTERM arrived: unwind so the lab gets removed."""


_DEMO_PID = os.getpid()


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    # pyroute2 forks short-lived helpers (to open netlink sockets inside a namespace) and ends
    # them with SIGTERM; they inherit this handler and must die, not unwind the demo's stack.
    if os.getpid() != _DEMO_PID:
        os._exit(128 + signum)
    raise Stopped(signal.Signals(signum).name)


# ---- which pairs to show ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pair:
    source: str
    target: str
    target_ip: str
    path: str


def demo_pairs(scenario: Scenario) -> list[Pair]:
    """From the first VM: one peer on the same host and network, one on another host of the
    same network, one on another network (through a router); those that exist."""
    source = scenario.vms[0]
    wanted = {
        "same host": lambda vm: vm.host == source.host and vm.network == source.network,
        "cross-host": lambda vm: vm.host != source.host and vm.network == source.network,
        "via router": lambda vm: vm.network != source.network,
    }
    pairs = []
    for kind, matches in wanted.items():
        peer = next((vm for vm in scenario.vms[1:] if matches(vm)), None)
        if peer is None:
            continue
        if kind == "same host":
            path = f"same host {source.host}, {source.network}"
        elif kind == "cross-host":
            path = f"{source.host} -> {peer.host} (VXLAN), {source.network}"
        else:
            path = f"{source.network} -> {peer.network} via router, {source.host} -> {peer.host}"
        pairs.append(Pair(source.name, peer.name, str(peer.ip.ip), path))
    return pairs


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


# ---- as root: the real lab ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PairMeasurement:
    pair: Pair
    ping: PingResult
    transfer: TransferResult | None
    transfer_error: str | None


def measure_pair(lab: Lab, pair: Pair, *, use_iperf3: bool) -> PairMeasurement:
    ping = lab.ping(
        pair.source,
        pair.target_ip,
        count=STEADY_PINGS + 1,
        interval=PING_INTERVAL_SECONDS,
        wait=1.0,
    )
    transfer: TransferResult | None = None
    error: str | None = None
    try:
        if use_iperf3:
            transfer = lab.iperf3(pair.source, pair.target, pair.target_ip, seconds=IPERF_SECONDS)
        else:
            transfer = lab.tcp_transfer(
                pair.source, pair.target, pair.target_ip, size=PYTHON_TRANSFER_BYTES
            )
    except LabError as exc:
        error = str(exc).splitlines()[0]
    return PairMeasurement(pair, ping, transfer, error)


def traffic_table(measurements: Sequence[PairMeasurement]) -> Table:
    table = Table(title="VM to VM traffic", title_justify="left")
    for column in ("pair", "path", "first ping", f"steady p50 ({STEADY_PINGS})", "lost", "TCP"):
        table.add_column(column, justify="right" if column in ("lost",) else "left")
    for item in measurements:
        ping = item.ping
        lost = ping.sent - ping.received
        if item.transfer is None:
            tcp = f"failed: {item.transfer_error}"
        else:
            check = (
                ""
                if item.transfer.tool == "iperf3"
                else ", sha256 ok"
                if item.transfer.checksum_ok
                else ", SHA-256 MISMATCH"
            )
            tcp = f"{item.transfer.megabits_per_second:.0f} Mbit/s ({item.transfer.tool}{check})"
        table.add_row(
            f"{item.pair.source} -> {item.pair.target} {item.pair.target_ip}",
            item.pair.path,
            _ms(ping.first_ms),
            _ms(ping.steady_p50_ms),
            f"{lost}/{ping.sent}",
            tcp,
        )
    return table


def run_lab_demo(
    console: Console, *, teardown: bool, state_dir: Path | None = None, tag: str = ""
) -> int:
    from hivenet.lab.cli import print_status, print_summary

    started = time.monotonic()
    say = console.print
    scenario = builtin_scenario()
    state_dir = state_dir or default_state_dir()
    say("[bold]HiveNet demo[/bold]: a 3-host cloud on this machine. Hosts and VMs are network")
    say("namespaces, each host runs `hivenet agent` on the userspace datapath (AF_PACKET + VXLAN).")
    say(f"$ hivenet lab up --state-dir {state_dir}")
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_stopped)
    lab_is_up = False
    try:
        lab = Lab(
            scenario,
            state_dir=state_dir,
            scope=LabScope(tag),
            progress=lambda message: say(f"  - {message}"),
        )
        lab.up()
        lab_is_up = True
        say(f"lab up in {time.monotonic() - started:.1f} s")
        print_summary(lab, console)
        _show_dhcp(lab, console)
        _show_metadata(lab, console)

        use_iperf3 = _has_iperf3()
        say()
        say(
            f"[bold]Traffic[/bold]: {STEADY_PINGS + 1} pings per pair ({PING_INTERVAL_SECONDS * 1000:.0f} ms apart); "
            "the first includes ARP and the agents' simulation upcalls, the rest hit installed flows. "
            + (
                "TCP: iperf3, 2 s."
                if use_iperf3
                else "TCP: 16 MiB Python transfer, SHA-256 checked (iperf3 not installed)."
            )
        )
        measurements = []
        for pair in demo_pairs(scenario):
            say(
                f"$ hivenet lab exec {lab.plan.vm(pair.source).namespace} ping {pair.target_ip}  # {pair.path}"
            )
            measurements.append(measure_pair(lab, pair, use_iperf3=use_iperf3))
        console.print(traffic_table(measurements))
        say("A lost first ping across the router is the router resolving the next hop (it drops")
        say("that packet and sends an ARP request, as a hardware router does).")

        say()
        say(
            "[bold]The agents' counters[/bold] (upcalls = packets simulated; flows = installed megaflows)"
        )
        print_status(lab, lab.status(), console)
        _show_api(lab, console)
        _explain(lab, console, teardown=teardown)
        _show_trace(lab, console)
        ok = all(m.ping.received > 0 and m.transfer is not None for m in measurements)
        return_code = 0 if ok else 1
        if not ok:
            say("[red]some pairs did not get traffic through; see the logs in the state dir[/red]")
    except (LabError, ScenarioError) as error:
        say(f"[red]demo failed:[/red] {error}")
        return_code = 1
    except (KeyboardInterrupt, Stopped):
        say("\ndemo interrupted")
        return_code = 130
        teardown = True
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    if lab_is_up and teardown:
        failures = lab.down()
        say("lab removed" if not failures else f"lab removal incomplete: {failures}")
    say(f"demo {'done' if return_code == 0 else 'ended'} in {time.monotonic() - started:.1f} s")
    return return_code


def _show_dhcp(lab: Lab, console: Console) -> None:
    """What each VM's DHCP client was told (no DHCP server runs: each agent answers)."""
    leases = [
        (vm, dhcpclient.read_lease(lab.dhcp_files(vm)))
        for vm in lab.plan.vms
        if vm.dhcp_client is not None
    ]
    if not leases:
        return
    console.print(
        "[bold]DHCP[/bold]: the VMs booted with no address and asked for one; the agent on "
        "their own host answered from the subnet and the port's fixed IP (no DHCP server)."
    )
    for vm, lease in leases:
        if lease is None:
            console.print(f"  {vm.name}: no lease recorded")
            continue
        routers = ", ".join(str(r) for r in lease.routers) or "none"
        console.print(
            f"  {vm.name} ({vm.dhcp_client} on {vm.host}): {lease.address}, router {routers}, "
            f"MTU {lease.mtu}, lease {lease.lease_time} s from {lease.server}"
        )


def _show_metadata(lab: Lab, console: Console) -> None:
    """What each VM reads from http://169.254.169.254/ (answered by its own host's agent)."""
    console.print(
        "[bold]Metadata[/bold]: each VM asks http://169.254.169.254/ for its identity, as "
        "cloud-init does; its own host's agent answers from the stored port."
    )
    for vm in lab.plan.vms:
        answers = []
        for leaf in ("instance-id", "hostname"):
            result = lab.run(
                vm.name,
                ["curl", "-sS", "--max-time", "5", f"{METADATA_URL}/{leaf}"],
                check=False,
                timeout=15,
            )
            answers.append(result.stdout.strip() if result.returncode == 0 else "no answer")
        console.print(f"  {vm.name} on {vm.host}: instance-id {answers[0]}, hostname {answers[1]}")


def _has_iperf3() -> bool:
    from shutil import which

    return which("iperf3") is not None


def _show_api(lab: Lab, console: Console) -> None:
    console.print()
    console.print("[bold]The same network through the REST API[/bold]")
    env = {**os.environ, **lab.env()}
    env.pop("HIVENET_TOKEN", None)
    for key, value in lab.env().items():
        console.print(f"$ export {key}={value}")
    console.print("$ hivenet bridge list")
    result = subprocess.run(
        [*CLI, "bridge", "list"], env=env, capture_output=True, text=True, check=False
    )
    console.print(result.stdout.rstrip() or result.stderr.rstrip(), markup=False, highlight=False)


def _show_trace(lab: Lab, console: Console) -> None:
    """One `hivenet trace` between the first and the last VM, and the topology page's URL."""
    first, last = lab.plan.vms[0], lab.plan.vms[-1]
    argv = ["trace", "--from-port", vm_port_id(first.name), "--ip-dst", last.address]
    argv += ["--proto", "icmp"]
    console.print()
    console.print(f"[bold]A trace[/bold] ({first.name} -> {last.name}, simulated, no side effect)")
    console.print(f"$ hivenet {' '.join(argv)}")
    env = {**os.environ, **lab.env(), "COLUMNS": "150"}
    result = subprocess.run([*CLI, *argv], env=env, capture_output=True, text=True, check=False)
    console.print(result.stdout.rstrip() or result.stderr.rstrip(), markup=False, highlight=False)
    console.print(f"[bold]Topology page[/bold]: {lab.api_url}/ui  (token: {lab.token_path})")


def _explain(lab: Lab, console: Console, *, teardown: bool) -> None:
    say = console.print
    if teardown:
        return  # the lab goes away now: nothing left to explore
    say()
    print_explore_hints(lab, console)
    say(f"  API {lab.api_url}/docs, admin token in {lab.token_path}", markup=False, highlight=False)
    say(
        "[bold]The lab keeps running[/bold] for you to explore; `make demo` again replaces it "
        "(`make lab-clean` removes every hn* object)."
    )


# ---- without root: the same scenario in one process ---------------------------------------


class EmulatedVm:
    """The least a VM must do to be pinged: answer ARP for its address, answer echo requests,
    remember ARP replies and echo replies."""

    def __init__(self, name: str, mac: str, interface: str, gateway: str | None) -> None:
        self.name = name
        self.mac = mac
        self.interface = ipaddress.IPv4Interface(interface)
        self.gateway = None if gateway is None else ipaddress.IPv4Address(gateway)
        self.neighbours: dict[ipaddress.IPv4Address, str] = {}
        self.echo_replies: set[tuple[ipaddress.IPv4Address, int]] = set()  # (from, seq)

    def next_hop(self, target: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
        if target in self.interface.network or self.gateway is None:
            return target
        return self.gateway

    def handle(self, frame: bytes) -> list[bytes]:
        from hivenet.model.types import int_to_mac
        from hivenet.packets import arp_reply_to, build_icmp_echo_reply, extract_flow_match
        from hivenet.packets.flowmatch import ETH_TYPE_ARP, ETH_TYPE_IPV4, IP_PROTO_ICMP
        from hivenet.packets.parse import parse_frame

        match = extract_flow_match(frame, 0)
        own_ip = int(self.interface.ip)
        if match.eth_type == ETH_TYPE_ARP:
            if match.arp_op == 1 and match.arp_tpa == own_ip:
                return [arp_reply_to(frame, self.mac)]
            if match.arp_op == 2:
                self.neighbours[ipaddress.IPv4Address(match.arp_spa)] = int_to_mac(match.arp_sha)
            return []
        if match.eth_type == ETH_TYPE_IPV4 and match.ip_proto == IP_PROTO_ICMP:
            if match.icmp_type == 8 and match.ip_dst == own_ip:
                return [build_icmp_echo_reply(frame)]
            if match.icmp_type == 0 and match.ip_dst == own_ip:
                icmp = parse_frame(frame).icmp
                if icmp is not None:
                    sender = ipaddress.IPv4Address(match.ip_src)
                    self.echo_replies.add((sender, icmp.rest & 0xFFFF))
        return []


@dataclass(frozen=True, slots=True)
class MemoryPing:
    delivered: bool
    seconds: float
    upcalls: int  # simulations this ping caused, on every host


async def run_memory_demo(console: Console, scenario: Scenario) -> int:
    from hivenet.agent.agent import HostAgent
    from hivenet.datapath.memory import MemoryDatapath, MemoryUnderlay
    from hivenet.lab.plan import TUNNEL_ZONE_ID
    from hivenet.model import Port
    from hivenet.packets import build_arp_request, build_echo_request
    from hivenet.store import open_store
    from hivenet.store.topology import TopologyRepository

    say = console.print
    started = time.monotonic()
    say("[bold]HiveNet demo[/bold] (not root: no network namespaces).")
    say("The lab needs root; this runs the same scenario in one process instead: one HostAgent")
    say("per host over the in-memory datapath and underlay, the VMs emulated (ARP + echo).")
    say("Run `make demo` as root for real namespaces, ping, TCP and the REST API.")
    plan = plan_lab(scenario, LabScope())
    macs = assign_macs(scenario, LabScope())
    store = open_store("memory://")
    repository = TopologyRepository(store)
    port_keys: dict[str, int] = {}
    for obj in topology_objects(scenario, plan, macs):
        stored = (await repository.create(obj)).obj
        if isinstance(stored, Port) and stored.name in macs:
            port_keys[stored.name] = stored.tunnel_key
    underlay = MemoryUnderlay()
    datapaths = {
        host.name: MemoryDatapath(host.name, host.underlay_ip, underlay) for host in plan.hosts
    }
    agents = {
        host.name: HostAgent(
            store,
            datapaths[host.name],
            host_id=host.name,
            underlay_ip=host.underlay_ip,
            tunnel_zone_id=TUNNEL_ZONE_ID,
            reconcile_interval=0.05,
        )
        for host in plan.hosts
    }
    vms = {vm.name: EmulatedVm(vm.name, macs[vm.name], vm.ip, vm.gateway) for vm in plan.vms}
    host_of = {vm.name: vm.host for vm in plan.vms}
    try:
        for agent in agents.values():
            await agent.start()
        expected = plan.expected_ports()
        deadline = time.monotonic() + 10
        while any(set(expected[h]) - set(a.bound_ports) for h, a in agents.items()):
            if time.monotonic() > deadline:
                say("[red]agents did not bind their ports[/red]")
                return 1
            await asyncio.sleep(0.02)
        say(f"{len(agents)} agents up, {len(vms)} VM ports bound")

        def pump() -> None:
            """Hand every delivered frame to its VM and send what it answers, until quiet."""
            busy = True
            while busy:
                busy = False
                for name, vm in vms.items():
                    datapath = datapaths[host_of[name]]
                    for frame in datapath.take(port_keys[name]):
                        busy = True
                        for answer in vm.handle(frame):
                            datapath.receive(port_keys[name], answer)

        def upcalls() -> int:
            return sum(agent.pipeline.stats.upcalls for agent in agents.values())

        async def ping(source: str, target_ip: str, sequence: int) -> MemoryPing:
            vm = vms[source]
            datapath = datapaths[host_of[source]]
            target = ipaddress.IPv4Address(target_ip)
            next_hop = vm.next_hop(target)
            before = upcalls()
            begin = time.perf_counter()
            last_try, last_sent = -1.0, ""
            while time.perf_counter() - begin < 2.0:
                now = time.perf_counter()
                resolved = next_hop in vm.neighbours
                # Send the echo as soon as ARP is answered; else (re)transmit 200 ms apart,
                # like ping and the kernel's ARP do.
                if (resolved and last_sent != "echo") or now - last_try >= 0.2:
                    last_try = now
                    if resolved:
                        last_sent = "echo"
                        frame = build_echo_request(
                            eth_src=vm.mac,
                            eth_dst=vm.neighbours[next_hop],
                            ip_src=vm.interface.ip,
                            ip_dst=target,
                            identifier=0x4E54,
                            sequence=sequence,
                        )
                    else:
                        last_sent = "arp"
                        frame = build_arp_request(
                            sender_mac=vm.mac, sender_ip=vm.interface.ip, target_ip=next_hop
                        )
                    datapath.receive(port_keys[source], frame)
                pump()
                if (target, sequence) in vm.echo_replies:
                    return MemoryPing(True, time.perf_counter() - begin, upcalls() - before)
                # Learned MAC/ARP entries travel between agents through the store.
                await asyncio.sleep(0.002)
            return MemoryPing(False, time.perf_counter() - begin, upcalls() - before)

        table = Table(title="in-process pings (memory datapath)", title_justify="left")
        for column in (
            "pair",
            "path",
            "first ping",
            "its upcalls",
            f"steady ({STEADY_PINGS})",
            "steady upcalls",
            "steady p50",
        ):
            table.add_column(column)
        all_delivered = True
        for pair in demo_pairs(scenario):
            first = await ping(pair.source, pair.target_ip, 1)
            steady = [await ping(pair.source, pair.target_ip, 2 + i) for i in range(STEADY_PINGS)]
            delivered = sum(p.delivered for p in steady)
            all_delivered = all_delivered and first.delivered and delivered == STEADY_PINGS
            table.add_row(
                f"{pair.source} -> {pair.target} {pair.target_ip}",
                pair.path,
                f"{'ok' if first.delivered else 'LOST'} {first.seconds * 1000:.2f} ms",
                str(first.upcalls),
                f"{delivered}/{STEADY_PINGS}",
                str(sum(p.upcalls for p in steady)),
                f"{statistics.median(p.seconds for p in steady) * 1e6:.0f} us",
            )
        console.print(table)
        say("The first ping of a pair is simulated by the agents (upcalls: ARP, MAC learning,")
        say("routing); the flows they install carry the rest without any simulation.")
        say(f"demo {'done' if all_delivered else 'ended'} in {time.monotonic() - started:.1f} s")
        return 0 if all_delivered else 1
    finally:
        for agent in agents.values():
            with contextlib.suppress(Exception):  # one failing stop must not keep the others
                await agent.stop()
        await store.close()


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hivenet.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--teardown",
        action="store_true",
        help="remove the lab at the end instead of leaving it running for exploration",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="run the in-process memory-datapath version even as root",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the lab's state dir (default: $HIVENET_LAB_STATE_DIR or /run/hivenet-lab)",
    )
    parser.add_argument(
        "--tag",
        default="",
        help="4 lowercase letters/digits in every name, to run beside another lab",
    )
    args = parser.parse_args(argv)
    console = Console(file=out, width=None if (out or sys.stdout).isatty() else 160)
    if os.geteuid() == 0 and not args.memory:
        return run_lab_demo(console, teardown=args.teardown, state_dir=args.state_dir, tag=args.tag)
    return asyncio.run(run_memory_demo(console, builtin_scenario()))


if __name__ == "__main__":
    sys.exit(main())
