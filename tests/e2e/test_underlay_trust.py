"""End-to-end: a rogue namespace on the lab underlay attacks the `nat` lab (vm1 on h1 is
SNATed by router r1, whose uplink is bound on h3; see test_stateful_nat.py).

The rogue host (`hn<tag>-rogue`, its own veth on the lab's underlay bridge, in no tunnel zone)
sends VXLAN for vm1's tunnel key to h1 and forged flow state (a NAT binding and a conntrack
entry nobody opened) to h3, from its own address. Then, spoofing h1's underlay address (a
raw socket: source filtering cannot stop that on a shared L2 underlay), it sends the forged
state unsealed and sealed with a guessed key: the HMAC refuses it. Nothing reaches vm1,
nothing changes in h3's tables, the drop counters say why; SNAT keeps working afterwards,
its state still pushed from h1 to h3. The rogue namespace and veth are removed in a finally.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from hivenet.flowstate import ConntrackRecord, FlowKey, NatBinding, NatKind, NatRecord, encode
from hivenet.flowstate.auth import seal
from hivenet.flowstate.conntrack import ConnState
from hivenet.lab import netns
from hivenet.lab.lab import Lab
from hivenet.lab.scenario import builtin_scenario
from hivenet.model import Port
from hivenet.model.types import FLOWSTATE_TUNNEL_KEY
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
