"""End-to-end: a rogue namespace on the lab underlay attacks the `nat` lab (vm1 on h1 is
SNATed by router r1, whose uplink is bound on h3; see test_stateful_nat.py).

The rogue host (`hn<tag>-rogue`, its own veth on the lab's underlay bridge, in no tunnel zone)
sends VXLAN for vm1's tunnel key to h1 and forged flow state (a NAT binding and a conntrack
entry nobody opened) to h3, from its own address. Then, spoofing h1's underlay address (a
raw socket: source filtering cannot stop that on a shared L2 underlay), it sends the forged
state unsealed and sealed with a guessed key: the HMAC refuses it. Nothing reaches vm1,
nothing changes in h3's tables, the drop counters say why; SNAT keeps working afterwards,
its state still pushed from h1 to h3. The rogue namespace and veth are removed in a finally.

The blaster (the second test): from the same rogue namespace, for a bounded time, scapy-built
VXLAN to h2 (vm3's host), at once from the rogue's own address and spoofing h1's (a live
member): truncated VXLAN headers and inner frames, no I flag, an unknown and a reserved VNI,
vm3's VNI with garbage inner frames (bad IPv4 length, bad header checksum, fragments) and
oversized (larger than vm3's MTU, IP-fragmented on the underlay), the flow-state VNI with
random bytes, forged unsealed state, state sealed with a guessed key, and genuine messages
(sealed with the cluster key, as a host that holds it would) each sent twice (a replay).
Meanwhile vm4 and vm1 (h1) ping vm3 (h2). Checked: no agent restarts, no ping lost, nothing
of the rogue's own address reaches vm3, and h2's drop reasons account for every datagram
the blaster sent that must be dropped (each reason grew by exactly what was sent for it; the
socket-overflow reason may take some of them under load, but none is lost uncounted).
Garbage inner frames under vm3's VNI from a spoofed member are delivered (the egress host
trusts the ingress simulation; docs/security.md), so they are no drops here.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from hivenet.agent.underlay import FLOWSTATE_KEYRING_KEY
from hivenet.flowstate import ConntrackRecord, FlowKey, NatBinding, NatKind, NatRecord, encode
from hivenet.flowstate.auth import Keyring, seal
from hivenet.flowstate.conntrack import ConnState
from hivenet.lab import netns
from hivenet.lab.lab import Lab
from hivenet.lab.scenario import builtin_scenario
from hivenet.model import Port
from hivenet.model.types import FLOOD_KEY_BASE, FLOWSTATE_TUNNEL_KEY
from hivenet.packets import build_udp_datagram
from hivenet.packets.vxlan import vxlan_encapsulate
from hivenet.store import open_store
from hivenet.store.topology import TopologyRepository
from tests.e2e.common import running_lab

pytestmark = pytest.mark.e2e

OUTSIDE_IP = "192.0.2.2"
SNAT_IP = "192.0.2.1"
ROGUE_INDEX = 200  # underlay address 172.31.250.200, in no tunnel zone
MARKER_PORT = 31337
VXLAN_PORT = 4789

# Sends hex-encoded UDP payloads to (dst, 4789): from the namespace's own address, or with a
# spoofed IPv4 source through a raw socket (the kernel fills in the IP checksum and length).
SENDER = r"""
import socket, struct, sys
source, destination, *payloads = sys.argv[1:]
for hexed in payloads:
    data = bytes.fromhex(hexed)
    if source == "own":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(data, (destination, 4789))
        continue
    udp = struct.pack("!HHHH", 40000, 4789, 8 + len(data), 0) + data
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton(source), socket.inet_aton(destination))
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sock:
        sock.sendto(ip + udp, (destination, 0))
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(builtin_scenario("nat"), tmp_path_factory.mktemp("trustlab")) as lab:
        yield lab


@pytest.fixture
def rogue(lab: Lab) -> Iterator[str]:
    """The rogue host's namespace on the lab's underlay bridge; removed whatever happens."""
    namespace = lab.scope.namespace("rogue")
    root_end = lab.scope.link("roguer")
    try:
        netns.add_host(lab.scope, "rogue", ROGUE_INDEX, lab.plan.bridge)
        yield namespace
    finally:
        netns.delete_namespace(namespace)  # takes its end of the veth, and so the pair
        netns.delete_link(root_end)


def send(namespace: str, source: str, destination: str, *payloads: bytes) -> None:
    argv = [sys.executable, "-c", SENDER, source, destination, *(p.hex() for p in payloads)]
    netns.run_in_namespace(namespace, argv)


def tunnel_key_of(lab: Lab, vm: str) -> int:
    async def read() -> int:
        store = open_store(lab.store_url)
        try:
            port = (await TopologyRepository(store).get(Port, lab.plan.vm(vm).port_id)).obj
        finally:
            await store.close()
        return port.tunnel_key

    return asyncio.run(read())


def forged_state() -> bytes:
    """A NAT binding that would send the outside's replies to port 31337 on vm1."""
    vm1 = int.from_bytes(bytes([10, 0, 1, 10]), "big")
    outside = int.from_bytes(bytes([192, 0, 2, 2]), "big")
    snat = int.from_bytes(bytes([192, 0, 2, 1]), "big")
    original = FlowKey(4, vm1, outside, 17, MARKER_PORT, 7)
    translated = FlowKey(4, snat, outside, 17, 60999, 7)
    binding = NatBinding("forged", NatKind.SNAT, original, translated)
    conntrack = ConntrackRecord("forged", original, ConnState.REPLIED, 600.0)
    return encode([conntrack], [NatRecord(binding, 600.0)], now=0.0)


def unknown_source_drops(counters: dict[str, Any]) -> int:
    datapath = counters["datapath"]
    return sum(v for name, v in datapath.items() if name.endswith("tunnel_unknown_source"))


def ping_until_ok(lab: Lab, source: str, target: str) -> None:
    for _ in range(5):
        if lab.ping(source, target, count=1, wait=0.5).ok:
            break
    result = lab.ping(source, target, count=5, interval=0.05, wait=1.0)
    assert result.ok, result.output


def test_a_rogue_on_the_underlay_reaches_no_vm_and_forges_no_state(lab: Lab, rogue: str) -> None:
    h1_ip, h3_ip = lab.plan.host("h1").underlay_ip, lab.plan.host("h3").underlay_ip
    ping_until_ok(lab, "vm1", OUTSIDE_IP)  # NAT works, state was pushed h1 -> h3
    before = {host: lab.fresh_agent_counters(host) for host in ("h1", "h3")}
    vm1 = lab.plan.vm("vm1")
    inner = build_udp_datagram(
        eth_src="02:00:00:66:66:66",
        eth_dst=lab.mac_of("vm1"),
        ip_src=OUTSIDE_IP,
        ip_dst=vm1.ip.split("/")[0],
        src_port=7,
        dst_port=MARKER_PORT,
        payload=b"rogue" * 8,
    )
    frame = vxlan_encapsulate(inner, tunnel_key_of(lab, "vm1"))
    state = vxlan_encapsulate(forged_state(), FLOWSTATE_TUNNEL_KEY)
    guessed = vxlan_encapsulate(
        seal(forged_state(), key_id=0, key=secrets.token_bytes(32), sender="h1", sequence=2**63),
        FLOWSTATE_TUNNEL_KEY,
    )
    capture = lab.capture("vm1", 3.0, label="roguecap")
    send(rogue, "own", h1_ip, *[frame] * 5)  # frames for vm1, from a non-member
    send(rogue, "own", h3_ip, state, guessed)  # forged state, from a non-member
    send(rogue, h1_ip, h3_ip, state, guessed)  # forged state, spoofing h1's address
    frames = capture.frames()
    marked = [f for f in frames if MARKER_PORT.to_bytes(2, "big") in f and b"rogue" in f]
    assert marked == [], f"{len(marked)} rogue frames reached vm1"
    after = {host: lab.fresh_agent_counters(host) for host in ("h1", "h3")}

    # h1 dropped the five frames for their source; h3 the two messages from the rogue's own
    # address (the eBPF datapath counts frames in the kernel, messages in userspace).
    assert unknown_source_drops(after["h1"]) - unknown_source_drops(before["h1"]) >= 5
    assert unknown_source_drops(after["h3"]) - unknown_source_drops(before["h3"]) >= 2
    # The spoofed ones passed the source check and were refused by the HMAC, before decoding.
    flowstate = {host: (before[host]["flowstate"], after[host]["flowstate"]) for host in before}
    old, new = flowstate["h3"]
    assert new["rejected_unauthenticated"] - old["rejected_unauthenticated"] == 2
    assert new["received_messages"] == old["received_messages"]  # nothing authentic arrived
    assert (new["connections"], new["nat_bindings"]) == (old["connections"], old["nat_bindings"])

    # Legitimate traffic and NAT go on: a new SNATed connection's state reaches h3, sealed.
    server = lab.echo_server("ext", OUTSIDE_IP, 7300, label="trustsrv")
    try:
        client = lab.echo_client("vm1", OUTSIDE_IP, 7300, chunks=8, label="trustcli")
        assert client.result(timeout=30).echoes_match
    finally:
        server.stop()
    final = lab.fresh_agent_counters("h3")["flowstate"]
    assert final["received_messages"] > new["received_messages"]
    assert final["rejected_unauthenticated"] == new["rejected_unauthenticated"]


# ---- the underlay blaster --------------------------------------------------------------------

BLAST_SECONDS = 6.0
BLAST_INTERVAL = 0.02  # one round of every kind from both sources per interval
VM3_IP = "10.0.2.20"
VM1_TARGET = VM3_IP  # vm1 (net1) reaches vm3 (net2) through r1: another path into h2

# Reads a JSON plan: destination, seconds, interval, kinds [{name, source, payloads, rotate}].
# Each round sends one payload of every kind from its source through a raw socket (spoofing
# is the point), fragmenting datagrams over 1400 bytes itself (a raw IP_HDRINCL socket does
# not); `rotate` kinds take the next payload each round (fresh genuine messages), others
# resend theirs. IP_RECVERR: a packet the local veth could not queue is an error (ENOBUFS),
# not silently "sent"; a datagram counts as sent when all its packets went. Prints
# {kind: datagrams sent}.
UNDERLAY_BLASTER = r"""
import json, socket, struct, sys, time
plan = json.load(open(sys.argv[1]))
destination = socket.inet_aton(plan["destination"])
def ip_packets(source, payload, ident):
    udp = struct.pack("!HHHH", 40000, 4789, 8 + len(payload), 0) + payload
    chunks = [udp[at : at + 1400] for at in range(0, len(udp), 1400)] if len(udp) > 1400 else [udp]
    packets = []
    for index, chunk in enumerate(chunks):
        more = 0x2000 if index < len(chunks) - 1 else 0
        frag = more | (index * 1400 // 8) if len(chunks) > 1 else 0
        packets.append(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(chunk), ident, frag, 64,
                                   17, 0, socket.inet_aton(source), destination) + chunk)
    return packets
kinds = [dict(kind, payloads=[bytes.fromhex(p) for p in kind["payloads"]]) for kind in plan["kinds"]]
sent = {kind["name"]: 0 for kind in kinds}
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
sock.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR
ident, rounds, start = 1, 0, time.monotonic()
while time.monotonic() - start < plan["seconds"]:
    for kind in kinds:
        payloads = kind["payloads"]
        if kind["rotate"] and rounds >= len(payloads):
            continue
        payload = payloads[rounds % len(payloads)]
        ident = ident % 65535 + 1
        try:
            for packet in ip_packets(kind["source"], payload, ident):
                sock.sendto(packet, (plan["destination"], 0))
        except OSError:
            continue
        sent[kind["name"]] += 1
    rounds += 1
    time.sleep(plan["interval"])
print(json.dumps(sent), flush=True)
"""


def cluster_keyring(lab: Lab) -> Keyring:
    async def read() -> Keyring:
        store = open_store(lab.store_url)
        try:
            stored = await store.get(FLOWSTATE_KEYRING_KEY)
        finally:
            await store.close()
        assert stored is not None, "no flow-state keyring in the store"
        return Keyring.from_json(stored.value)

    return asyncio.run(read())


def vxlan(vni: int, inner: bytes = b"", flags: int = 0x08) -> bytes:
    return bytes(VXLAN(flags=flags, vni=vni) / Raw(inner))


def blast_kinds(lab: Lab, marker: bytes) -> dict[str, tuple[bytes, str | None]]:
    """Every kind of garbage VXLAN, by name: (payload, the reason a peer's copy is dropped
    for, None when a peer's copy is delivered: vm3's VNI, garbage inside)."""
    vm3_key, vm1_key = tunnel_key_of(lab, "vm3"), tunnel_key_of(lab, "vm1")
    ether = Ether(src="02:00:00:66:66:66", dst=lab.mac_of("vm3"))
    udp = UDP(sport=7, dport=MARKER_PORT) / Raw(marker)
    good_inner = bytes(ether / IP(src="10.0.2.99", dst=VM3_IP) / udp)
    bad_length = bytearray(good_inner)
    bad_length[16:18] = (2000).to_bytes(2, "big")
    bad_checksum = bytearray(good_inner)
    bad_checksum[24] ^= 0x5A
    fragment = bytes(ether / IP(src="10.0.2.99", dst=VM3_IP, frag=8191, proto=17) / Raw(marker))
    oversized = bytes(ether / IP(src="10.0.2.99", dst=VM3_IP) / udp / Raw(b"o" * 3000))
    guessed = seal(forged_state(), key_id=0, key=secrets.token_bytes(32), sender="h1", sequence=1)
    return {
        "truncated_vxlan": (bytes(VXLAN(vni=vm3_key))[:5], "vxlan_truncated"),
        "truncated_inner": (vxlan(vm3_key, good_inner[:10]), "vxlan_truncated"),
        "no_i_flag": (vxlan(vm3_key, good_inner, flags=0x00), "vxlan_bad_flags"),
        "unknown_vni": (vxlan(vm1_key, good_inner), "tunnel_unknown_key"),
        "reserved_vni": (vxlan(FLOOD_KEY_BASE + 5, good_inner), "tunnel_reserved_key"),
        "inner_bad_ip_length": (vxlan(vm3_key, bytes(bad_length)), None),
        "inner_bad_ip_checksum": (vxlan(vm3_key, bytes(bad_checksum)), None),
        "inner_fragment": (vxlan(vm3_key, fragment), None),
        "oversized": (vxlan(vm3_key, oversized), "port_tx_too_big"),
        "flowstate_garbage": (
            vxlan(FLOWSTATE_TUNNEL_KEY, os.urandom(80)),
            "rejected_unauthenticated",
        ),
        "flowstate_forged": (
            vxlan(FLOWSTATE_TUNNEL_KEY, forged_state()),
            "rejected_unauthenticated",
        ),
        "flowstate_guessed_key": (vxlan(FLOWSTATE_TUNNEL_KEY, guessed), "rejected_unauthenticated"),
    }


def genuine_messages(lab: Lab, rounds: int) -> list[bytes]:
    """Empty flow-state messages sealed with the cluster's current key under a sender of their
    own, fresh sequences: what a host holding the key sends. Each is sent twice."""
    current = cluster_keyring(lab).current
    base = time.time_ns()
    return [
        vxlan(
            FLOWSTATE_TUNNEL_KEY,
            seal(
                encode([], [], now=0.0),
                key_id=current.key_id,
                key=current.secret,
                sender="hnblaster",
                sequence=base + number,
            ),
        )
        for number in range(rounds)
        for _ in range(2)  # the same datagram again: a replay
    ]


# Drop reasons of the underlay (datapath `drop.<reason>`, the eBPF kernel's `drop.kernel_<reason>`
# folded into it) and the flow-state refusals; nothing but a blast makes any of them grow.
UNDERLAY_REASONS = (
    "tunnel_unknown_source",
    "vxlan_truncated",
    "vxlan_bad_flags",
    "tunnel_unknown_key",
    "tunnel_reserved_key",
    "port_tx_too_big",
    "tunnel_socket_overflow",
    "underlay_malformed",
    "tunnel_fragmented_flowstate",
    "vxlan_rx_errors",
    "vxlan_rx_dropped",
    "rejected_unauthenticated",
    "rejected_replayed",
    "rejected_no_key",
)


def underlay_drops(counters: dict[str, Any]) -> dict[str, int]:
    out = dict.fromkeys(UNDERLAY_REASONS, 0)
    for name, value in counters["datapath"].items():
        reason = name.removeprefix("drop.").removeprefix("kernel_")
        if name.startswith("drop.") and reason in out:
            out[reason] += int(value)
    for name in ("rejected_unauthenticated", "rejected_replayed", "rejected_no_key"):
        out[name] += int(counters["flowstate"].get(name, 0))
    return out


def root_link_counter(link: str, name: str) -> int:
    """A statistics counter of a link of the root namespace (the underlay bridge's ports)."""
    return int(Path(f"/sys/class/net/{link}/statistics/{name}").read_text())


def test_an_underlay_blaster_harms_no_one_and_every_drop_is_counted(
    lab: Lab, rogue: str, tmp_path: Path
) -> None:
    h1_ip, h2_ip = lab.plan.host("h1").underlay_ip, lab.plan.host("h2").underlay_ip
    rogue_ip = str(netns.underlay_address(ROGUE_INDEX).ip)
    for vm in ("vm4", "vm1"):
        ping_until_ok(lab, vm, VM3_IP)
    rounds = int(BLAST_SECONDS / BLAST_INTERVAL) + 1
    own_marker, spoofed_marker = b"hn-rogue-own", b"hn-rogue-spoofed"
    kinds = []
    reason_of: dict[str, str | None] = {}
    for source, marker in ((rogue_ip, own_marker), (h1_ip, spoofed_marker)):
        for name, (payload, reason) in blast_kinds(lab, marker).items():
            reason_of[name] = reason
            kinds.append({"name": f"{name}@{source}", "source": source,
                          "payloads": [payload.hex()], "rotate": False})  # fmt: skip
        genuine = [message.hex() for message in genuine_messages(lab, rounds)]
        kinds.append({"name": f"genuine_and_replay@{source}", "source": source,
                      "payloads": genuine, "rotate": True})  # fmt: skip
    plan_path = tmp_path / "underlay-blast.json"
    plan_path.write_text(json.dumps({"destination": h2_ip, "seconds": BLAST_SECONDS,
                                     "interval": BLAST_INTERVAL, "kinds": kinds}))  # fmt: skip
    agents_before = {host: lab.agent_record(host) for host in ("h1", "h2", "h3")}
    # What the underlay bridge's port could not hand to h2 is lost before h2 (the underlay's
    # loss, counted there); the blaster knows what its own veth refused.
    bridge_port = lab.scope.link("h2r")
    lost_before = root_link_counter(bridge_port, "tx_dropped")
    before = underlay_drops(lab.fresh_agent_counters("h2"))
    capture = lab.capture("vm3", BLAST_SECONDS + 4, label="hnublastcap")
    log_path = tmp_path / "underlay-blaster.log"
    with log_path.open("wb") as log:
        blaster = netns.start_in_namespace(
            rogue,
            [sys.executable, "-c", UNDERLAY_BLASTER, str(plan_path)],
            label="hnublaster",
            output=log,
            directory=lab.state_dir,
        )
    try:
        count = int(BLAST_SECONDS / 0.2)
        with ThreadPoolExecutor(2) as pool:
            pings = [
                pool.submit(lab.ping, vm, VM3_IP, count=count, interval=0.2, wait=2)
                for vm in ("vm4", "vm1")
            ]
            results = [ping.result() for ping in pings]
        blaster.popen.wait(BLAST_SECONDS + 30)
    finally:
        blaster.stop()
    sent: dict[str, int] = json.loads(log_path.read_text().strip().splitlines()[-1])
    frames = capture.frames()
    for result in results:
        assert result.ok, result.output
    for host, record in agents_before.items():
        assert record is not None and lab.agent_record(host) == record, f"{host}'s agent restarted"
        os.kill(record.pid, 0)  # still running (raises if it died)
    assert not [f for f in frames if own_marker in f], "the rogue's own frames reached vm3"

    expected = dict.fromkeys(UNDERLAY_REASONS, 0)
    for name, number in sent.items():
        kind, source = name.split("@")
        if source == rogue_ip:
            expected["tunnel_unknown_source"] += number
        elif kind == "genuine_and_replay":
            expected["rejected_replayed"] += number // 2  # the second of each pair
        else:
            reason = reason_of[kind]
            if reason is not None:
                expected[reason] += number
    deadline = time.monotonic() + 15
    while True:  # counters settle once the agent has read what is queued
        after = underlay_drops(lab.fresh_agent_counters("h2"))
        grew = {reason: after[reason] - before[reason] for reason in UNDERLAY_REASONS}
        if sum(grew.values()) >= sum(expected.values()) or time.monotonic() > deadline:
            break
    lost_on_the_way = root_link_counter(bridge_port, "tx_dropped") - lost_before
    # Nothing counted twice, nothing lost uncounted on h2: the socket's overflow (if the
    # agent fell behind) stands in for the reason the datagrams it lost would have had; what
    # the bridge could not deliver to h2 (any frame, pings included) never reached it.
    overflow = grew.pop("tunnel_socket_overflow")
    expected.pop("tunnel_socket_overflow")
    counted, wanted = sum(grew.values()) + overflow, sum(expected.values())
    context = (grew, expected, sent, overflow, lost_on_the_way)
    assert all(grew[reason] <= expected[reason] for reason in grew), context
    assert wanted - lost_on_the_way <= counted <= wanted, context
    assert overflow + lost_on_the_way <= wanted // 10, context
