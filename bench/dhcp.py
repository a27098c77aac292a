"""DHCP benchmark: how fast a HiveNet agent answers DHCP, against dnsmasq in the same run.

HiveNet answers DHCP inside the ingress simulation (`sim/dhcp.py`, driven by the agent's
`FlowPipeline`): no server process. The peer is dnsmasq (Debian's dnsmasq-base), the usual
DHCP server of a cloud network node, serving the same subnet, the same MACs and the same fixed
addresses, measured by the same client code in the same run (the machine is shared and noisy,
so the ratio is the figure that means something).

1. Answers per second. One lab host (a real `hivenet agent` process, userspace datapath) with
   PORTS VM ports; the load generator opens a raw AF_PACKET socket on every VM's eth0 and each
   port runs DORA handshakes back to back (DISCOVER -> OFFER, REQUEST -> ACK, one message
   outstanding per port, a resend after RESEND_SECONDS), MESSAGES_PER_PORT messages per port
   and round; rate = OFFERs+ACKs / (last answer - first request). The peer: dnsmasq on a bridge
   in a namespace of the bench, a veth per client (same MACs as the lab's VMs, isolated bridge
   ports, as the agent consumes a client's broadcast at its port) and dnsmasq's dhcp-host
   entries giving each MAC the lab VM's fixed IP.
   The agent's flood guard (`sim.dhcp.DhcpBudget`: DHCP_BURST messages per port, then
   DHCP_RATE_PER_SECOND) is honoured, not disabled: a round spends exactly one burst per port
   (MESSAGES_PER_PORT = DHCP_BURST) and the agent's rounds are DHCP_BURST/DHCP_RATE_PER_SECOND
   seconds apart (the buckets are full again). So the agent's rate is its capacity on bursts
   spread over many ports; one port alone is capped at DHCP_RATE_PER_SECOND a second by
   design, which the "one port flooding" row shows (open-loop DISCOVERs from one MAC for
   FLOOD_SECONDS, answers counted on both sides; dnsmasq has no such guard).
   The generator is one Python process; its CPU share is printed, and when it is near 100%
   the peer's rate is a lower bound (the generator, not dnsmasq, was the limit).
2. Time to an address: `busybox udhcpc -q` (the lab's own event script, which sets address,
   MTU and routes) from its start to its exit after configuring the address, median of
   UDHCPC_RUNS, in a lab VM against the agent, and in the bench's client namespace against
   dnsmasq (same script, the same bridge as in 1). Both include `ip netns exec` and the
   process start, identical on both sides. Runs rotate over the VMs so no port's budget binds.
3. In process (no I/O, no peer): DHCP answers per second through `FlowPipeline.handle_upcall`
   over the memory datapath, on the lab's own topology, with the flood guard given a burst no
   run reaches (what the simulation costs per answer).

Without root or dnsmasq only 3 runs. Everything the bench makes is named `hn<tag>...` (one unique lab
scope) and removed at the end, also on failure. Prints a table, then exactly one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import ipaddress
import json
import os
import random
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hivenet.sim.dhcp import DHCP_BURST, DHCP_RATE_PER_SECOND

PORTS = 64
MESSAGES_PER_PORT = DHCP_BURST
ROUNDS = 5
UDHCPC_RUNS = 7
FLOOD_SECONDS = 1.0
FLOOD_RATE = 2000  # DISCOVERs per second from the one flooding port
RESEND_SECONDS = 0.5
ROUND_SECONDS = 10.0  # a round that has not finished by then stops (unanswered stay counted)
IN_PROCESS_MESSAGES = 10_000
REFILL_SECONDS = DHCP_BURST / DHCP_RATE_PER_SECOND + 0.5

SUBNET = ipaddress.IPv4Network("10.0.1.0/24")
GATEWAY = ipaddress.IPv4Address("10.0.1.1")
FIRST_HOST = 10

# --- the load generator's packets (pure; tests/unit/test_bench_dhcp.py checks them with scapy)

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK = 1, 2, 3, 4, 5, 6
ETH_P_IP = 0x0800
BOOTP_MIN = 300  # RFC 951 BOOTP message size (some servers ignore shorter ones)
MAGIC_COOKIE = b"\x63\x82\x53\x63"
PARAMETERS = bytes([1, 3, 6, 15, 26, 28, 51, 54, 58, 59, 121])
XID_OFFSET = 14 + 20 + 8 + 4  # Ethernet, IPv4 without options, UDP, op/htype/hlen/hops
_BOOTP_FIXED = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")


def _ip_checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def request_frame(
    mac: int,
    xid: int,
    message_type: int,
    *,
    requested: ipaddress.IPv4Address | None = None,
    server: ipaddress.IPv4Address | None = None,
) -> bytes:
    """A client's broadcast DHCP message (RFC 2131) from `mac`, as a booting client sends it:
    0.0.0.0:68 -> 255.255.255.255:67, no broadcast flag (answers come unicast to `mac`), UDP
    checksum 0 (none, allowed over IPv4), options 53, 50, 54 and 55. The xid sits at
    XID_OFFSET, so `with_xid` can reuse the frame."""
    chaddr = mac.to_bytes(6, "big")
    options = bytearray((53, 1, message_type))
    if requested is not None:
        options += bytes((50, 4)) + requested.packed
    if server is not None:
        options += bytes((54, 4)) + server.packed
    options += bytes((55, len(PARAMETERS))) + PARAMETERS + b"\xff"
    # op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname, file
    fixed = (1, 1, 6, 0, xid, 0, 0, bytes(4), bytes(4), bytes(4), bytes(4), chaddr + bytes(10))
    bootp = _BOOTP_FIXED.pack(*fixed, bytes(64), bytes(128)) + MAGIC_COOKIE + bytes(options)
    bootp += bytes(max(0, BOOTP_MIN - len(bootp)))
    udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes(4), b"\xff" * 4
    )
    header = header[:10] + struct.pack("!H", _ip_checksum(header)) + header[12:]
    return b"\xff" * 6 + chaddr + struct.pack("!H", ETH_P_IP) + header + udp


def with_xid(frame: bytes, xid: int) -> bytes:
    """`frame` (from `request_frame`) with transaction id `xid` (no checksum covers it)."""
    return frame[:XID_OFFSET] + xid.to_bytes(4, "big") + frame[XID_OFFSET + 4 :]


@dataclass(frozen=True, slots=True)
class Reply:
    xid: int
    client_mac: int
    message_type: int
    your_ip: ipaddress.IPv4Address
    server_id: ipaddress.IPv4Address | None


def parse_reply(frame: bytes) -> Reply | None:
    """The DHCP server message in an Ethernet frame (IPv4, UDP 67 -> 68, BOOTREPLY with the
    magic cookie and option 53), else None: anything else on the wire is not an answer."""
    if len(frame) < 14 + 20 + 8 + 240 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[14] >> 4 != 4 or ihl < 20 or frame[23] != 17:
        return None
    udp = 14 + ihl
    bootp = udp + 8
    if len(frame) < bootp + 240 or frame[udp : udp + 4] != b"\x00\x43\x00\x44":
        return None
    if frame[bootp] != 2 or frame[bootp + 236 : bootp + 240] != MAGIC_COOKIE:
        return None
    message_type = None
    server_id = None
    index, end = bootp + 240, len(frame)
    while index < end:
        code = frame[index]
        if code == 255:
            break
        if code == 0:
            index += 1
            continue
        if index + 1 >= end:
            return None
        length = frame[index + 1]
        value = frame[index + 2 : index + 2 + length]
        if len(value) != length:
            return None
        if code == 53 and length == 1:
            message_type = value[0]
        elif code == 54 and length == 4:
            server_id = ipaddress.IPv4Address(value)
        index += 2 + length
    if message_type is None:
        return None
    return Reply(
        xid=int.from_bytes(frame[bootp + 4 : bootp + 8], "big"),
        client_mac=int.from_bytes(frame[bootp + 28 : bootp + 34], "big"),
        message_type=message_type,
        your_ip=ipaddress.IPv4Address(frame[bootp + 16 : bootp + 20]),
        server_id=server_id,
    )


def mac_int(mac: str) -> int:
    return int(mac.replace(":", ""), 16)


def mac_str(mac: int) -> str:
    return ":".join(f"{b:02x}" for b in mac.to_bytes(6, "big"))


# --- the load generator (I/O) ----------------------------------------------------------------

CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_namespace(name: str) -> Iterator[None]:
    """This thread inside network namespace `name` (sockets opened there stay there)."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/ns/net", "rb") as home, open(f"/run/netns/{name}", "rb") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")


@dataclass(frozen=True, slots=True)
class Client:
    """One client interface: the namespace it is in, its name, MAC and expected address."""

    namespace: str
    interface: str
    mac: int
    address: ipaddress.IPv4Address


def open_socket(client: Client) -> socket.socket:
    with in_namespace(client.namespace):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    sock.bind((client.interface, ETH_P_IP))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.setblocking(False)
    return sock


@dataclass
class _Port:
    client: Client
    sock: socket.socket
    discover: bytes
    request: bytes = b""  # the REQUEST for the last offer (address, server)
    offered: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = None
    xid: int = 0
    waiting: int = OFFER  # the reply expected next
    sent: int = 0
    last_sent: float = 0.0
    done: bool = False
    message: bytes = b""


@dataclass
class BlastResult:
    sent: int = 0
    offers: int = 0
    acks: int = 0
    naks: int = 0
    stale: int = 0  # answers to an earlier message of the port (after a resend)
    seconds: float = 0.0  # first request to last answer
    cpu: float = 0.0  # the generator's CPU time / wall time of the round

    @property
    def answers(self) -> int:
        return self.offers + self.acks

    @property
    def rate(self) -> float:
        return self.answers / self.seconds if self.seconds > 0 else 0.0


def _drain(sock: socket.socket) -> Iterator[bytes]:
    while True:
        try:
            yield sock.recv(2048)
        except BlockingIOError:
            return


def blast(
    sockets: Sequence[tuple[Client, socket.socket]],
    messages_per_port: int,
    *,
    deadline_seconds: float = ROUND_SECONDS,
) -> BlastResult:
    """Every port runs DORA handshakes back to back, one message outstanding, until it has
    sent `messages_per_port` messages (resends included) and has its last answer, or the
    round's deadline passes. Counts the OFFERs and ACKs that answer the port's current
    message."""
    result = BlastResult()
    xid_base = random.getrandbits(20) << 12
    ports: dict[int, _Port] = {}
    for index, (client, sock) in enumerate(sockets):
        for _ in _drain(sock):  # leftovers of an earlier round
            pass
        ports[sock.fileno()] = _Port(
            client,
            sock,
            discover=request_frame(client.mac, 0, DISCOVER),
            xid=(xid_base + index * 64) & 0xFFFFFFFF,
        )
    poller = select.epoll()
    for fd in ports:
        poller.register(fd, select.EPOLLIN)

    def send(port: _Port, message: bytes, now: float) -> None:
        port.message = message
        port.sock.send(message)
        port.sent += 1
        port.last_sent = now
        result.sent += 1

    def next_message(port: _Port, now: float) -> None:
        if port.sent >= messages_per_port:
            port.done = True
            return
        port.xid = (port.xid + 1) & 0xFFFFFFFF
        port.waiting = OFFER
        send(port, with_xid(port.discover, port.xid), now)

    cpu_started = time.process_time()
    started = time.perf_counter()
    last_answer = started
    for port in ports.values():
        next_message(port, time.perf_counter())
    pending = len(ports)
    next_check = started + RESEND_SECONDS / 4
    try:
        while pending and time.perf_counter() - started < deadline_seconds:
            for fd, _events in poller.poll(RESEND_SECONDS / 4):
                port = ports[fd]
                for frame in _drain(port.sock):
                    reply = parse_reply(frame)
                    if reply is None or reply.client_mac != port.client.mac:
                        continue
                    if port.done or reply.xid != port.xid or reply.message_type != port.waiting:
                        result.stale += 1
                        continue
                    now = time.perf_counter()
                    last_answer = now
                    if reply.message_type == OFFER:
                        result.offers += 1
                        if port.sent >= messages_per_port:
                            port.done = True
                        else:
                            port.waiting = ACK
                            offered = (reply.your_ip, reply.server_id or GATEWAY)
                            if offered != port.offered:
                                port.offered = offered
                                port.request = request_frame(
                                    port.client.mac, 0, REQUEST, requested=offered[0],
                                    server=offered[1],
                                )  # fmt: skip
                            send(port, with_xid(port.request, port.xid), now)
                    elif reply.message_type == ACK:
                        result.acks += 1
                        next_message(port, now)
                    elif reply.message_type == NAK:
                        result.naks += 1
                        next_message(port, now)
                    if port.done:
                        pending -= 1
            now = time.perf_counter()
            if now >= next_check:
                next_check = now + RESEND_SECONDS / 4
                for port in ports.values():
                    if not port.done and now - port.last_sent > RESEND_SECONDS:
                        if port.sent >= messages_per_port:
                            port.done = True  # its last message went unanswered
                            pending -= 1
                        else:
                            send(port, port.message, now)
    finally:
        poller.close()
    result.seconds = last_answer - started
    wall = time.perf_counter() - started
    result.cpu = (time.process_time() - cpu_started) / wall if wall > 0 else 0.0
    return result


def flood(client: Client, sock: socket.socket, seconds: float, rate: int) -> tuple[int, int]:
    """Open-loop DISCOVERs from one port at `rate`/s for `seconds`: (sent, OFFERs)."""
    for _ in _drain(sock):
        pass
    template = request_frame(client.mac, 0, DISCOVER)
    base = random.getrandbits(20) << 12
    sent = offers = 0
    started = time.perf_counter()
    end = started + seconds
    while (now := time.perf_counter()) < end + 0.5:
        while now < end and sent < (now - started) * rate:
            sock.send(with_xid(template, (base + sent) & 0xFFFFFFFF))
            sent += 1
        for frame in _drain(sock):
            reply = parse_reply(frame)
            if reply is not None and reply.client_mac == client.mac and reply.message_type == OFFER:
                offers += 1
        time.sleep(0.001)
    return sent, offers


# --- udhcpc ------------------------------------------------------------------------------


def udhcpc_seconds(client: Client, script: Path, lease_file: Path) -> float:
    """Seconds from starting `busybox udhcpc -q` on `client` to its exit with the address
    configured (checked); the interface starts without an address and ends without one."""
    flush = ["ip", "-n", client.namespace, "addr", "flush", "dev", client.interface]
    subprocess.run(flush, check=True)
    argv = [
        "ip", "netns", "exec", client.namespace, "busybox", "udhcpc", "-f", "-q", "-n",
        "-i", client.interface, "-s", str(script), "-t", "5", "-T", "1", "-A", "1",
    ]  # fmt: skip
    env = {**os.environ, "HN_LEASE_FILE": str(lease_file)}
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20, check=False)
    elapsed = time.perf_counter() - started
    shown = subprocess.run(
        ["ip", "-n", client.namespace, "-4", "-o", "addr", "show", "dev", client.interface],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    subprocess.run(flush, check=True)
    if done.returncode != 0 or f"inet {client.address}/" not in shown:
        raise SystemExit(
            f"udhcpc on {client.namespace}/{client.interface} got no {client.address} "
            f"(rc {done.returncode}): {done.stdout[-400:]}{done.stderr[-400:]}"
        )
    return elapsed


# --- in process --------------------------------------------------------------------------

SCENARIO = """
name: benchdhcp
hosts: [h1]
networks:
  - {{name: net1, subnet: {subnet}, tenant: bench}}
routers:
  - name: r1
    tenant: bench
    interfaces: [{{network: net1, ip: {gateway}/{prefix}}}]
vms:
{vms}
"""


def scenario_text(ports: int) -> str:
    vms = "\n".join(
        f"  - {{name: vm{i}, host: h1, network: net1, ip: {SUBNET[FIRST_HOST + i]}/"
        f"{SUBNET.prefixlen}, dhcp: false}}"
        for i in range(ports)
    )
    return SCENARIO.format(subnet=SUBNET, gateway=GATEWAY, prefix=SUBNET.prefixlen, vms=vms)


def measure_in_process(ports: int, messages: int) -> dict[str, float]:
    """DHCP answers/s through FlowPipeline.handle_upcall on the lab's topology (memory
    datapath, no I/O), half DISCOVERs, half REQUESTs, round robin over the ports."""
    from hivenet.agent.pipeline import FlowPipeline
    from hivenet.datapath.memory import MemoryDatapath
    from hivenet.lab.netns import LabScope
    from hivenet.lab.plan import assign_macs, plan_lab, topology_objects
    from hivenet.lab.scenario import parse_scenario
    from hivenet.model import Port
    from hivenet.sim import MemoryTables, TopologyView
    from hivenet.sim.dhcp import DhcpBudget

    scenario = parse_scenario(scenario_text(ports))
    scope = LabScope("bnch")
    plan = plan_lab(scenario, scope)
    macs = assign_macs(scenario, scope)
    objects = topology_objects(scenario, plan, macs)
    keyed = []
    for key, obj in enumerate(objects, 1):  # the API assigns tunnel keys; here by hand
        keyed.append(obj.model_copy(update={"tunnel_key": key}) if isinstance(obj, Port) else obj)
    view = TopologyView.from_objects(keyed)
    datapath = MemoryDatapath("h1", "192.0.2.1")
    work: list[tuple[int, bytes]] = []
    for vm in plan.vms:
        port = view.ports[vm.port_id]
        datapath.bind_port(port.tunnel_key, vm.port_link)
        mac = mac_int(macs[vm.name])
        address = ipaddress.IPv4Address(vm.address)
        work.append((port.tunnel_key, request_frame(mac, 1, DISCOVER)))
        work.append(
            (port.tunnel_key, request_frame(mac, 1, REQUEST, requested=address, server=GATEWAY))
        )
    pipeline = FlowPipeline("h1", datapath, view, MemoryTables())
    # The flood guard stays in the path, with a burst this run cannot reach.
    pipeline.context = dataclasses.replace(
        pipeline.context, dhcp_budget=DhcpBudget(burst=10 * messages)
    )
    frames = [work[i % len(work)] for i in range(messages)]
    for key, frame in frames[:500]:  # warm up
        pipeline.handle_upcall(key, frame)
    generated = pipeline.stats.generated
    started = time.perf_counter()
    for key, frame in frames:
        pipeline.handle_upcall(key, frame)
    elapsed = time.perf_counter() - started
    answered = pipeline.stats.generated - generated
    if answered != len(frames):
        raise SystemExit(f"in process: {answered} answers to {len(frames)} messages")
    return {"answers_per_second": len(frames) / elapsed, "messages": len(frames)}


# --- the lab and the dnsmasq peer --------------------------------------------------------


@dataclass
class Peer:
    """dnsmasq on a bridge in namespace `server`, a veth per client into namespace `client`."""

    server: str
    client: str
    clients: list[Client]
    process: subprocess.Popen[bytes] | None = None


def start_dnsmasq(scope: object, clients: Sequence[Client], workdir: Path) -> Peer:
    """The peer's namespaces, bridge, veths and dnsmasq; on failure, nothing of them is left."""
    from hivenet.lab import netns

    assert isinstance(scope, netns.LabScope)
    peer = Peer(scope.namespace("dqs"), scope.namespace("dqc"), [])
    try:
        _build_peer(peer, scope, clients, workdir)
    except BaseException:
        stop_dnsmasq(peer)
        raise
    return peer


def _build_peer(peer: Peer, scope: object, clients: Sequence[Client], workdir: Path) -> None:
    from hivenet.lab import netns

    assert isinstance(scope, netns.LabScope)
    netns.create_namespace(peer.server, ipv6=False)
    netns.create_namespace(peer.client, ipv6=False)
    bridge = scope.link("dqbr")
    netns.create_bridge(bridge, namespace=peer.server)
    netns.add_address(bridge, f"{GATEWAY}/{SUBNET.prefixlen}", namespace=peer.server)
    for index, client in enumerate(clients):
        near, far = scope.link(f"dqc{index}"), scope.link(f"dqs{index}")
        netns.create_veth(near, far, namespace=peer.client, peer_namespace=peer.server)
        netns.set_mac(near, mac_str(client.mac), namespace=peer.client)
        netns.attach_to_bridge(far, bridge, namespace=peer.server)
        # Clients do not hear each other's broadcasts (the agent consumes them at the port).
        netns.run_in_namespace(
            peer.server, ["ip", "link", "set", "dev", far, "type", "bridge_slave", "isolated", "on"]
        )
        peer.clients.append(dataclasses.replace(client, namespace=peer.client, interface=near))
    argv = [
        "ip", "netns", "exec", peer.server, "dnsmasq", "--keep-in-foreground",
        "--conf-file=/dev/null", "--port=0", f"--interface={bridge}", "--bind-interfaces",
        f"--dhcp-range={SUBNET.network_address},static,{SUBNET.netmask},24h",
        "--dhcp-option=option:mtu,1450", "--dhcp-authoritative", "--no-ping",
        "--leasefile-ro", "--quiet-dhcp", f"--log-facility={workdir / 'dnsmasq.log'}",
        "--pid-file=", "--user=root", "--group=root",
        *(f"--dhcp-host={mac_str(c.mac)},{c.address}" for c in clients),
    ]  # fmt: skip
    peer.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.3)
    if peer.process.poll() is not None:
        stderr = peer.process.stderr.read().decode() if peer.process.stderr else ""
        raise SystemExit(f"dnsmasq did not start: {stderr}")


def stop_dnsmasq(peer: Peer) -> None:
    from hivenet.lab import netns

    if peer.process is not None and peer.process.poll() is None:
        peer.process.terminate()  # the PID this script started (ip netns exec execs dnsmasq)
        try:
            peer.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            peer.process.kill()
            peer.process.wait(timeout=5)
    for namespace in (peer.client, peer.server):
        netns.delete_namespace(namespace)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


def run_lab(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    from hivenet.lab import dhcpclient
    from hivenet.lab.cleanup import clean
    from hivenet.lab.lab import Lab
    from hivenet.lab.netns import LabScope
    from hivenet.lab.plan import VM_INTERFACE
    from hivenet.lab.scenario import parse_scenario

    scope = LabScope.unique()
    lab = Lab(parse_scenario(scenario_text(args.ports)), state_dir=workdir / "lab", scope=scope)
    peer: Peer | None = None
    sockets: list[tuple[Client, socket.socket]] = []
    try:
        started = time.perf_counter()
        lab.up(timeout=90)
        lab_seconds = time.perf_counter() - started
        vms = [
            Client(
                vm.namespace,
                VM_INTERFACE,
                mac_int(lab.record.macs[vm.name]),
                ipaddress.IPv4Address(vm.address),
            )
            for vm in lab.plan.vms
        ]
        for vm in vms:  # booting clients: no address (and no ICMP back for unicast answers)
            subprocess.run(["ip", "-n", vm.namespace, "addr", "flush", "dev", vm.interface])
        peer = start_dnsmasq(scope, vms, workdir)
        dhcpclient.write_scripts(workdir)
        script = workdir / f"{dhcpclient.UDHCPC}.script"

        # 2. udhcpc to a configured address, interleaved, each lab run on another VM.
        udhcpc: dict[str, list[float]] = {"hivenet": [], "dnsmasq": []}
        for run in range(args.udhcpc_runs):
            udhcpc["hivenet"].append(
                udhcpc_seconds(vms[run % len(vms)], script, workdir / "agent.lease")
            )
            udhcpc["dnsmasq"].append(
                udhcpc_seconds(peer.clients[0], script, workdir / "dnsmasq.lease")
            )
        agent_idle_since = time.monotonic()

        # 1. Answers per second, rounds interleaved; the agent's are a bucket refill apart.
        for client in vms:
            sockets.append((client, open_socket(client)))
        peer_sockets = [(client, open_socket(client)) for client in peer.clients]
        sockets.extend(peer_sockets)
        agent_sockets = sockets[: len(vms)]
        rounds: dict[str, list[BlastResult]] = {"hivenet": [], "dnsmasq": []}
        for _round in range(args.rounds):
            time.sleep(max(0.0, agent_idle_since + REFILL_SECONDS - time.monotonic()))
            rounds["hivenet"].append(blast(agent_sockets, MESSAGES_PER_PORT))
            agent_idle_since = time.monotonic()
            rounds["dnsmasq"].append(blast(peer_sockets, MESSAGES_PER_PORT))

        # The flood guard: one port floods (last: it leaves that port's bucket empty).
        time.sleep(max(0.0, agent_idle_since + REFILL_SECONDS - time.monotonic()))
        flood_agent = flood(*agent_sockets[0], args.flood_seconds, FLOOD_RATE)
        flood_peer = flood(*peer_sockets[0], args.flood_seconds, FLOOD_RATE)
        counters = lab.fresh_agent_counters("h1")["pipeline"]
    finally:
        for _client, sock in sockets:
            sock.close()
        failures: list[str] = []
        if peer is not None:
            stop_dnsmasq(peer)
        failures += lab.down()
        leftovers = clean(scope.tag, directory=workdir / "lab")
        if failures or not leftovers.is_empty():
            print(f"cleanup: {failures} {leftovers}", file=sys.stderr)

    def summary(results: list[BlastResult]) -> dict[str, Any]:
        return {
            "answers_per_second": _median([r.rate for r in results]),
            "answers_per_second_rounds": [round(r.rate) for r in results],
            "answers": sum(r.answers for r in results),
            "sent": sum(r.sent for r in results),
            "naks": sum(r.naks for r in results),
            "stale": sum(r.stale for r in results),
            "round_seconds": _median([r.seconds for r in results]),
            "generator_cpu": _median([r.cpu for r in results]),
        }

    agent, dnsmasq = summary(rounds["hivenet"]), summary(rounds["dnsmasq"])
    return {
        "lab_up_seconds": lab_seconds,
        "hivenet": agent,
        "dnsmasq": dnsmasq,
        # Per pair of adjacent rounds (a slow phase of the shared machine hits both), median.
        "rate_ratio": _median(
            [
                ours.rate / theirs.rate
                for ours, theirs in zip(rounds["hivenet"], rounds["dnsmasq"], strict=True)
                if theirs.rate
            ]
        ),
        "udhcpc_hivenet_ms": _median(udhcpc["hivenet"]) * 1000,
        "udhcpc_dnsmasq_ms": _median(udhcpc["dnsmasq"]) * 1000,
        "udhcpc_ratio": _median(udhcpc["hivenet"]) / _median(udhcpc["dnsmasq"])
        if udhcpc["dnsmasq"]
        else 0.0,
        "udhcpc_hivenet_all_ms": [round(s * 1000, 1) for s in udhcpc["hivenet"]],
        "udhcpc_dnsmasq_all_ms": [round(s * 1000, 1) for s in udhcpc["dnsmasq"]],
        "flood_hivenet": {"sent": flood_agent[0], "offers": flood_agent[1]},
        "flood_dnsmasq": {"sent": flood_peer[0], "offers": flood_peer[1]},
        "agent_over_budget_drops": counters.get("drop.dhcp_over_budget", 0),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=PORTS, help="client ports (lab VMs)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--udhcpc-runs", type=int, default=UDHCPC_RUNS)
    parser.add_argument("--flood-seconds", type=float, default=FLOOD_SECONDS)
    parser.add_argument("--in-process-messages", type=int, default=IN_PROCESS_MESSAGES)
    parser.add_argument("--in-process-only", action="store_true", help="no root needed")
    args = parser.parse_args(argv)

    in_process = measure_in_process(args.ports, args.in_process_messages)
    print("HiveNet DHCP benchmark: the agent's in-simulation responder vs dnsmasq")
    print(
        f"  in process (FlowPipeline, memory datapath, {args.ports} ports): "
        f"{in_process['answers_per_second']:,.0f} answers/s"
    )
    missing = (
        "root (network namespaces)"
        if os.geteuid() != 0
        else "dnsmasq (Debian: dnsmasq-base, `make apt`)"
        if shutil.which("dnsmasq") is None
        else None
    )
    if args.in_process_only or missing:
        if not args.in_process_only:
            print(f"bench/dhcp.py needs {missing} for the lab part against dnsmasq; skipped")
        print(json.dumps({"bench": "dhcp", "in_process": in_process, "lab": None}))
        return 0
    with tempfile.TemporaryDirectory(prefix="hn-bench-dhcp-") as directory:
        lab = run_lab(args, Path(directory))
    agent, peer = lab["hivenet"], lab["dnsmasq"]
    assert isinstance(agent, dict) and isinstance(peer, dict)
    flood_agent, flood_peer = lab["flood_hivenet"], lab["flood_dnsmasq"]
    assert isinstance(flood_agent, dict) and isinstance(flood_peer, dict)
    handshakes = args.ports * MESSAGES_PER_PORT // 2
    print(
        f"  lab: 1 host, {args.ports} VM ports; per round every port sends its flood-guard burst "
        f"({MESSAGES_PER_PORT} messages = {MESSAGES_PER_PORT // 2} DORA handshakes, "
        f"{handshakes} in all); medians of {args.rounds} rounds"
    )
    rows = [
        ("", "hivenet agent", "dnsmasq", "ratio"),
        (
            "answers/s (OFFER+ACK), ports in parallel (1)",
            f"{agent['answers_per_second']:,.0f}",
            f"{peer['answers_per_second']:,.0f}",
            f"{lab['rate_ratio']:.2f}x",
        ),
        (
            "answered / sent (all rounds)",
            f"{agent['answers']}/{agent['sent']}",
            f"{peer['answers']}/{peer['sent']}",
            "",
        ),
        (
            "round: first request to last answer",
            f"{agent['round_seconds'] * 1000:.0f} ms",
            f"{peer['round_seconds'] * 1000:.0f} ms",
            "",
        ),
        (
            "load generator CPU share",
            f"{agent['generator_cpu']:.0%}",
            f"{peer['generator_cpu']:.0%}",
            "",
        ),
        (
            f"one port flooding {args.flood_seconds:.0f}s: OFFERs",
            f"{flood_agent['offers']}/{flood_agent['sent']}",
            f"{flood_peer['offers']}/{flood_peer['sent']}",
            "guard",
        ),
        (
            f"udhcpc to a configured address (median of {args.udhcpc_runs})",
            f"{lab['udhcpc_hivenet_ms']:.1f} ms",
            f"{lab['udhcpc_dnsmasq_ms']:.1f} ms",
            f"{lab['udhcpc_ratio']:.2f}x",
        ),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(
            f"  {row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}"
            f"  {row[3]:>{widths[3]}}"
        )
    print(
        f"  flood guard (sim/dhcp.py DhcpBudget): {DHCP_BURST} messages per port, then "
        f"{DHCP_RATE_PER_SECOND:g}/s; honoured here (rounds {REFILL_SECONDS:.1f} s apart), "
        f"dnsmasq has none; agent over-budget drops: {lab['agent_over_budget_drops']}"
    )
    print(
        "  (1) medians; the ratio is the median of per-round ratios (each agent round next to a "
        f"dnsmasq round): {agent['answers_per_second_rounds']} vs "
        f"{peer['answers_per_second_rounds']}"
    )
    if peer["generator_cpu"] > 0.9:
        print("  note: the generator was CPU-bound against dnsmasq: its rate is a lower bound")
    print(
        json.dumps(
            {
                "bench": "dhcp",
                "ports": args.ports,
                "messages_per_port": MESSAGES_PER_PORT,
                "rounds": args.rounds,
                "in_process": in_process,
                "lab": lab,
            },
            default=float,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
