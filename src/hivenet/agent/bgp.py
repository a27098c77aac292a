"""BGP speakers of a gateway host: one BIRD 2 daemon per `bgp_peer` whose uplink port is bound
here, configured and fed by the agent; what each learns becomes routes of the uplink's router.

Where the session lives. The uplink port's address (say 192.0.2.1) belongs to the virtual
router, not to any kernel: the peer reaches it through the port's interface, which the
datapath owns (eBPF at tc or AF_PACKET). So, as MidoNet did, the speaker runs in a namespace of
its own (`hn-bgp<9 hex>`) holding that very address on a TUN device `hnbgp0`; the simulation
hands every TCP packet to or from port 179 for the port's own address to the agent
(`SimulationResult.handoff == "bgp"`, sim/router.py, never cached), which writes its IP
packet into the TUN; what BIRD sends comes out of the TUN and leaves through the uplink port
(`Datapath.execute`) with the port's MAC and the peer's (learned by the router's ARP, or from
the peer's own packets; an ARP request goes out while it is unknown). The peer sees a plain
directly connected eBGP neighbour at the uplink address, and the routes it learns have that
address as next hop. Nothing of this depends on the datapath's kind: handed-off packets are
upcalls on both, and `execute` is in the `Datapath` protocol.

What BIRD learns (`birdc show route protocol hn_peer`, polled each second) is written through
the repository as `Route(learned_from=<peer id>, next_hop_port_id=<uplink>)`; withdrawn
prefixes are deleted. A route learned through a host that is down is out of every router's
ECMP set at once (sim/topology.py), and the first live host (by id) deletes it from the store.
Deleting the bgp_peer or the port deletes its learned routes in the same txn (store/topology.py).
BIRD runs under `setpriv --pdeathsig KILL`: it dies with the agent, so the peer's hold timer
withdraws a dead gateway's announcements.

`sessions` holds each session's state and prefix counts as last read (`show protocols all`),
published by agent/uplinks.py.

Pure helpers (`bird_config`, `parse_learned_routes`, `parse_session_status`, `route_id_for`,
`learned_routes_for`) are tested without root; the I/O (`Speaker`, `BgpSpeakers`) in the lab
(tests/e2e/test_lab_edge.py).
Must not touch namespaces, links or processes it did not make (all named `hn...`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from hivenet.clock import SYSTEM_CLOCK, Clock
from hivenet.datapath.base import Datapath
from hivenet.flows.actions import Output
from hivenet.model import BgpPeer, Port, Route
from hivenet.packets.builders import build_arp_request, ethernet_frame
from hivenet.sim.tables import MemoryTables
from hivenet.sim.topology import PortInfo, TopologyView
from hivenet.store.base import StoreError
from hivenet.store.topology import (
    AlreadyExistsError,
    DanglingReferenceError,
    NotFoundError,
    TopologyError,
    TopologyRepository,
)

log = logging.getLogger(__name__)

BGP_PROTOCOL = "hn_peer"
ANNOUNCE_PROTOCOL = "hn_public"
TUN_DEVICE = "hnbgp0"
NAMESPACE_PREFIX = "hn-bgp"
POLL_INTERVAL = 1.0
_ETH_TYPE_IPV4 = 0x0800
_READ_BATCH = 64


# ------------------------------------------------------------------------------ pure part


@dataclass(frozen=True, slots=True)
class LearnedRoute:
    prefix: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None


def bird_config(peer: BgpPeer, local: ipaddress.IPv4Address) -> str:
    """BIRD 2 configuration of the speaker of `peer`, speaking from the uplink address
    `local`: the advertised prefixes as unreachable statics (the peer gets them with next hop
    `local`), every learned route imported into BIRD's own table only (no kernel protocol:
    the agent takes them from there)."""
    keepalive = max(1, peer.hold_time // 3)
    statics = "".join(f"  route {prefix} unreachable;\n" for prefix in peer.advertise)
    return (
        "# Written by the HiveNet agent (agent/bgp.py); rewritten when the bgp_peer changes.\n"
        "log stderr all;\n"
        f"router id {local};\n"
        "protocol device { scan time 10; }\n"
        f"protocol static {ANNOUNCE_PROTOCOL} {{\n  ipv4;\n{statics}}}\n"
        f"protocol bgp {BGP_PROTOCOL} {{\n"
        f"  local {local} as {peer.local_as};\n"
        f"  neighbor {peer.peer_ip} as {peer.peer_as};\n"
        f"  hold time {peer.hold_time};\n"
        f"  keepalive time {keepalive};\n"
        "  connect retry time 2;\n"
        "  error wait time 1, 10;\n"
        f'  ipv4 {{ import all; export where proto = "{ANNOUNCE_PROTOCOL}"; next hop self; }};\n'
        "}\n"
    )


_ROUTE_LINE = re.compile(r"^(\d+\.\d+\.\d+\.\d+/\d+)\s+(\S+)")
_VIA_LINE = re.compile(r"^\s+via (\d+\.\d+\.\d+\.\d+)")


def parse_learned_routes(text: str) -> list[LearnedRoute]:
    """The unicast routes of `birdc show route protocol hn_peer` (BIRD 2 layout: a line per
    route starting with the prefix, then indented `via <gateway> on <device>` lines; only the
    first next hop is kept). Unreachable/blackhole routes a peer sends are skipped."""
    routes: list[LearnedRoute] = []
    current: ipaddress.IPv4Network | None = None
    gateway_seen = True
    for line in text.splitlines():
        match = _ROUTE_LINE.match(line)
        if match is not None:
            if current is not None and not gateway_seen:
                routes.append(LearnedRoute(current, None))
            current = None
            gateway_seen = True
            if match.group(2) == "unicast":
                current = ipaddress.IPv4Network(match.group(1), strict=False)
                gateway_seen = False
            continue
        via = _VIA_LINE.match(line)
        if via is not None and current is not None and not gateway_seen:
            routes.append(LearnedRoute(current, ipaddress.IPv4Address(via.group(1))))
            gateway_seen = True
    if current is not None and not gateway_seen:
        routes.append(LearnedRoute(current, None))
    return routes


@dataclass(frozen=True, slots=True)
class SessionStatus:
    """A session as BIRD tells it: its state word and how many prefixes it took and sent."""

    state: str  # BIRD's BGP state: Established, Active, Connect, Idle, ... ("unknown")
    received: int = 0  # routes imported from the peer
    advertised: int = 0  # routes exported to the peer


_STATE_LINE = re.compile(r"^\s+BGP state:\s+(\S+)")
_ROUTES_LINE = re.compile(r"^\s+Routes:\s+(\d+) imported, (?:\d+ filtered, )?(\d+) exported")


def parse_session_status(text: str) -> SessionStatus:
    """The session of `birdc show protocols all hn_peer` (BIRD 2 layout). No `Routes:` line
    (the channel is down until the session is up): nothing received nor advertised."""
    state = "unknown"
    received = advertised = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == BGP_PROTOCOL:  # the summary line: its Info
            state = fields[5] if len(fields) >= 6 else fields[3]
        if (match := _STATE_LINE.match(line)) is not None:
            state = match.group(1)
        elif (match := _ROUTES_LINE.match(line)) is not None:
            received, advertised = int(match.group(1)), int(match.group(2))
    return SessionStatus(state, received, advertised)


def route_id_for(peer_id: str, prefix: ipaddress.IPv4Network) -> str:
    """A stable route id per (peer, prefix): readable when it fits an object id."""
    text = f"learned.{peer_id}.{prefix.network_address}_{prefix.prefixlen}"
    if len(text) <= 64:
        return text
    digest = hashlib.blake2b(f"{peer_id}|{prefix}".encode(), digest_size=8).hexdigest()
    return f"learned.{digest}"


def learned_routes_for(peer: BgpPeer, port: Port, learned: Iterable[LearnedRoute]) -> list[Route]:
    """The routes of the uplink's router for what `peer`'s session learned."""
    return [
        Route(
            id=route_id_for(peer.id, item.prefix),
            name=f"learned by BGP from {peer.peer_ip}",
            tenant_id=port.tenant_id,
            router_id=port.device_id,
            dst_prefix=item.prefix,
            next_hop_port_id=port.id,
            next_hop_gateway=item.gateway,
            learned_from=peer.id,
        )
        for item in learned
    ]


def namespace_name(host_id: str, peer_id: str, namespace_inode: int) -> str:
    """`hn-bgp<9 hex>`: 15 characters, one per (agent, peer); the agent's own network
    namespace tells apart agents of one host id on one machine (labs side by side) and stays
    the same across its restarts."""
    text = f"{host_id}|{namespace_inode}|{peer_id}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    return f"{NAMESPACE_PREFIX}{digest[:9]}"


def uplink_address(
    port: Port, peer_ip: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> ipaddress.IPv4Interface | None:
    """The port's address on the peer's subnet (the session's source and next hop)."""
    for address in port.addresses:
        if isinstance(address, ipaddress.IPv4Interface) and peer_ip in address.network:
            return address
    return None


# ------------------------------------------------------------------------------ one speaker


def _open_tun_here(device: str) -> int:
    from hivenet.agent.metadata import open_tun

    return open_tun(device)


def _configure_tun(device: str, address: ipaddress.IPv4Interface) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=device)[0]
        ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
        ipr.link("set", index=index, state="up")


class Speaker:
    """The BIRD daemon of one bgp_peer, its namespace and TUN device, and the packets both ways."""

    def __init__(
        self,
        host_id: str,
        peer: BgpPeer,
        port: Port,
        address: ipaddress.IPv4Interface,
        datapath: Datapath,
        tables: MemoryTables,
        workdir: Path,
    ) -> None:
        self.peer = peer
        self.port = port
        self.address = address
        self.datapath = datapath
        self.tables = tables
        self.workdir = workdir
        self.namespace = namespace_name(host_id, peer.id, os.stat("/proc/self/ns/net").st_ino)
        self.socket = workdir / "bird.ctl"
        self.process: asyncio.subprocess.Process | None = None
        self.peer_mac: int | None = None
        self.counters: dict[str, int] = {}
        self._fd: int | None = None
        self._log: int | None = None

    def _build_namespace(self) -> int:
        from hivenet.nsutil import create_namespace, in_namespace, remove_namespace

        with contextlib.suppress(OSError):
            remove_namespace(self.namespace)
        create_namespace(self.namespace, ipv6=False)
        fd = in_namespace(self.namespace, lambda: _open_tun_here(TUN_DEVICE))
        try:
            in_namespace(self.namespace, lambda: _configure_tun(TUN_DEVICE, self.address))
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "bird.conf"
        config.write_text(bird_config(self.peer, self.address.ip))
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self._fd = await asyncio.to_thread(self._build_namespace)
        self._log = os.open(self.workdir / "bird.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        # From the loop's thread: pdeathsig fires when the thread that forked it ends.
        self.process = await asyncio.create_subprocess_exec(
            "setpriv",
            "--pdeathsig",
            "KILL",
            "nsenter",
            f"--net=/run/netns/{self.namespace}",
            "bird",
            "-f",
            "-c",
            str(config),
            "-s",
            str(self.socket),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        asyncio.get_running_loop().add_reader(self._fd, self._on_tun_readable)
        log.info(
            "BGP speaker %s: bird pid %d in %s, %s AS %d -> %s AS %d",
            self.peer.id,
            self.process.pid,
            self.namespace,
            self.address.ip,
            self.peer.local_as,
            self.peer.peer_ip,
            self.peer.peer_as,
        )

    async def stop(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 3.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        self.process = None
        if self._log is not None:
            os.close(self._log)
            self._log = None

        def drop_namespace() -> None:
            from hivenet.nsutil import remove_namespace

            with contextlib.suppress(OSError):
                remove_namespace(self.namespace)

        await asyncio.to_thread(drop_namespace)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def birdc(self, *command: str) -> str:
        process = await asyncio.create_subprocess_exec(
            "birdc",
            "-s",
            str(self.socket),
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise OSError(f"birdc {' '.join(command)}: no answer in 5 s") from None
        if process.returncode != 0:
            raise OSError(f"birdc {' '.join(command)}: {output.decode(errors='replace')[-200:]}")
        return output.decode(errors="replace")

    async def learned(self) -> list[LearnedRoute]:
        return parse_learned_routes(await self.birdc("show", "route", "protocol", BGP_PROTOCOL))

    async def session_status(self) -> SessionStatus:
        """BIRD's word for the session (`Established`, `Active`, `Connect`, ...) and its
        prefix counts."""
        return parse_session_status(await self.birdc("show", "protocols", "all", BGP_PROTOCOL))

    # ------------------------------------------------------------------ packets both ways

    def from_port(self, frame: bytes) -> None:
        """A BGP packet the peer sent to the uplink address (the simulation checked that)."""
        if self._fd is None or len(frame) < 34:
            self._count("dropped_not_running")
            return
        if int.from_bytes(frame[26:30], "big") == int(self.peer.peer_ip):
            self.peer_mac = int.from_bytes(frame[6:12], "big")
        try:
            os.write(self._fd, frame[14:])
        except OSError:
            self._count("tun_write_error")
            return
        self._count("to_speaker")

    def _on_tun_readable(self) -> None:
        for _ in range(_READ_BATCH):
            fd = self._fd
            if fd is None:
                return
            try:
                packet = os.read(fd, 65535)
            except BlockingIOError:
                return
            except OSError:
                self._count("tun_read_error")
                return
            self._to_port(packet)

    def _peer_mac(self) -> int | None:
        learned = self.tables.neighbour_mac(self.port.device_id, 4, int(self.peer.peer_ip))
        return learned if learned is not None else self.peer_mac

    def _to_port(self, packet: bytes) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            self._count("from_speaker_not_ipv4")
            return
        key = self.port.tunnel_key
        mac = self._peer_mac()
        if mac is None:
            # Dropped; BIRD retransmits, and the answer teaches the router the peer's MAC.
            request = build_arp_request(
                sender_mac=self.port.mac, sender_ip=self.address.ip, target_ip=self.peer.peer_ip
            )
            self.datapath.execute(request, (Output(key),))
            self._count("arp_requests")
            return
        self.datapath.execute(
            ethernet_frame(mac, self.port.mac, _ETH_TYPE_IPV4, packet), (Output(key),)
        )
        self._count("from_speaker")

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1


# ------------------------------------------------------------------------------ all speakers


class BgpSpeakers:
    """Every speaker this host must run: `await run()` (reconciles each second), `hand_off`
    for the pipeline, `await close()`."""

    def __init__(
        self,
        host_id: str,
        topology: TopologyView,
        tables: MemoryTables,
        datapath: Datapath,
        repository: TopologyRepository,
        *,
        is_bound: Callable[[str], bool],
        live_hosts: Callable[[], set[str]],
        state_dir: Path | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.host_id = host_id
        self.topology = topology
        self.tables = tables
        self.datapath = datapath
        self.repository = repository
        self.is_bound = is_bound
        self.live_hosts = live_hosts
        self.clock = clock
        self._own_dir = state_dir is None
        self._state_dir = state_dir
        self.speakers: dict[str, Speaker] = {}
        self.sessions: dict[str, SessionStatus] = {}  # peer id -> last status read from BIRD
        self.errors = 0

    @property
    def state_dir(self) -> Path:
        """Where each speaker keeps its BIRD files. Without one given, a private temporary
        directory made on first use (removed by `close`): an agent that never starts a
        speaker leaves nothing behind, whether or not it is closed."""
        if self._state_dir is None:
            self._state_dir = Path(tempfile.mkdtemp(prefix="hn-bgp-"))
        return self._state_dir

    def available(self) -> bool:
        return all(shutil.which(tool) for tool in ("bird", "birdc", "setpriv", "nsenter"))

    def hand_off(self, port: PortInfo, frame: bytes) -> None:
        peer_id = self.topology.bgp_ports.get(port.id)
        speaker = self.speakers.get(peer_id or "")
        if speaker is None:
            return  # not (yet) running here: BIRD's peer retries
        speaker.from_port(frame)

    def wanted(self) -> dict[str, tuple[BgpPeer, Port, ipaddress.IPv4Interface]]:
        """bgp_peer id -> (peer, uplink port, its address towards the peer) for the enabled
        peers whose uplink is bound on this host."""
        wanted: dict[str, tuple[BgpPeer, Port, ipaddress.IPv4Interface]] = {}
        for peer in self.topology.all("bgp_peer"):
            if not isinstance(peer, BgpPeer) or not peer.admin_state_up:
                continue
            info = self.topology.ports.get(peer.port_id)
            if info is None or info.host_id != self.host_id or not self.is_bound(info.id):
                continue
            address = uplink_address(info.port, peer.peer_ip)
            if address is None:
                continue
            wanted[peer.id] = (peer, info.port, address)
        return wanted

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile()
            except (StoreError, TopologyError, OSError) as exc:
                self.errors += 1
                log.warning("host %s: BGP reconcile failed: %s", self.host_id, exc)
            await self.clock.sleep(POLL_INTERVAL)

    async def reconcile(self) -> None:
        wanted = self.wanted()
        for peer_id, running in list(self.speakers.items()):
            entry = wanted.get(peer_id)
            if entry is None or entry != (running.peer, running.port, running.address):
                await self._stop(peer_id, withdraw=entry is None)
        for peer_id, (peer, port, address) in wanted.items():
            speaker: Speaker | None = self.speakers.get(peer_id)
            if speaker is not None and not speaker.running:
                await self._stop(peer_id, withdraw=False)  # BIRD died: start it again
                speaker = None
            if speaker is None:
                speaker = Speaker(
                    self.host_id,
                    peer,
                    port,
                    address,
                    self.datapath,
                    self.tables,
                    self.state_dir / f"bgp-{peer_id}",
                )
                self.speakers[peer_id] = speaker
                await speaker.start()
                continue
            try:
                learned = await speaker.learned()
                self.sessions[peer_id] = await speaker.session_status()
            except OSError as exc:  # BIRD not answering yet
                log.info("host %s: BGP speaker %s: %s", self.host_id, peer_id, exc)
                continue
            await self._sync_routes(peer, learned_routes_for(peer, port, learned))
        await self._sweep_dead_gateways()

    async def _stop(self, peer_id: str, *, withdraw: bool) -> None:
        speaker = self.speakers.pop(peer_id)
        self.sessions.pop(peer_id, None)
        await speaker.stop()
        if withdraw:
            await self._sync_routes(speaker.peer, [])

    def _stored_learned(self, peer_id: str) -> dict[str, Route]:
        return {
            route.id: route
            for route in self.topology.all("route")
            if isinstance(route, Route) and route.learned_from == peer_id
        }

    async def _sync_routes(self, peer: BgpPeer, routes: list[Route]) -> None:
        """Make the router's routes learned from `peer` exactly `routes`."""
        stored = self._stored_learned(peer.id)
        target = {route.id: route for route in routes}
        for route_id, route in target.items():
            have = stored.get(route_id)
            if have is None:
                # Another writer was first, or the peer went meanwhile (its cascade won).
                with contextlib.suppress(AlreadyExistsError, DanglingReferenceError):
                    await self.repository.create(route)
            elif have != route:
                await self.repository.update(route)
        for route_id in stored.keys() - target.keys():
            with contextlib.suppress(NotFoundError):
                await self.repository.delete(Route, route_id)

    async def _sweep_dead_gateways(self) -> None:
        """Delete routes learned through hosts that are down; done by the first live host."""
        live = self.live_hosts() | {self.host_id}
        if min(live) != self.host_id:
            return
        for route in self.topology.all("route"):
            if not isinstance(route, Route) or route.learned_from is None:
                continue
            info = self.topology.ports.get(route.next_hop_port_id or "")
            if info is None or info.host_id is None or info.host_id in live:
                continue
            with contextlib.suppress(NotFoundError):
                await self.repository.delete(Route, route.id)

    async def close(self) -> None:
        for peer_id in list(self.speakers):
            await self._stop(peer_id, withdraw=False)
        if self._own_dir and self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)
            self._state_dir = None

    def counters_snapshot(self) -> dict[str, object]:
        return {
            "errors": self.errors,
            "sessions": {peer_id: status.state for peer_id, status in self.sessions.items()},
            "speakers": {peer_id: dict(s.counters) for peer_id, s in self.speakers.items()},
        }
