"""End-to-end: fragmented traffic through SNAT and a security group, and bad fragments dropped
(issue 15, "secure defaults on the wire"), on the built-in `nat` lab: net1 (vm1 on h1) is
SNATed to 192.0.2.1 towards the outside namespace (192.0.2.2, behind r1's uplink on h3); vm3
(h2, net2) is reached from vm1 through r1.

`ping -s 4000` sends each echo as three IPv4 fragments (the VM's MTU is the overlay's), and
the reply comes back as three. Only the first fragment of each carries the ICMP header: the
later ones pass SNAT, reverse SNAT and the security group by following their first fragment
(`hivenet.datapath._fragments`), which the agents' `fragment_forwarded` counters show. Bad
fragments (tiny, overlapping) sent by scapy from vm1 are dropped with their own reasons.
Runs on the lab's datapath (eBPF default; HN_LAB_DATAPATH=userspace for the other).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import pytest

from hivenet.lab.lab import Lab
from hivenet.lab.probes import PingResult, parse_ping
from hivenet.lab.scenario import builtin_scenario
from hivenet.model import Direction, SecurityGroup, SecurityGroupRule
from tests.e2e.common import running_lab, wait_applied

pytestmark = pytest.mark.e2e

OUTSIDE_IP = "192.0.2.2"
VM3_IP = "10.0.2.20"
GATEWAY_IP = "10.0.1.1"
SIZE = 4000  # ICMP payload: 3 fragments at the overlay MTU
PATH_HOSTS = ("h1", "h2")  # vm1's host simulates the path to vm3, h2 binds vm3's port


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(builtin_scenario("nat"), tmp_path_factory.mktemp("fraglab")) as lab:
        yield lab


def big_ping(lab: Lab, vm: str, target: str, count: int = 5, wait: float = 2.0) -> PingResult:
    argv = ["ping", "-n", "-s", str(SIZE), "-c", str(count), "-i", "0.2", "-W", f"{wait:g}"]
    result = lab.run(vm, [*argv, target], timeout=count * (0.2 + wait) + 15, check=False)
    return parse_ping(result.stdout + result.stderr, count)


def warm_up(lab: Lab, vm: str, target: str) -> None:
    """The first packets of a path may be lost on purpose (unresolved next hop, the SNAT port
    block lease): small pings until one answers."""
    for _ in range(8):
        if lab.ping(vm, target, count=1, wait=1.0).ok:
            return
    raise AssertionError(f"{vm} cannot reach {target} even with small pings")


def counter(lab: Lab, host: str, name: str) -> int:
    counters = lab.fresh_agent_counters(host)
    return sum(int(counters[section].get(name, 0)) for section in ("pipeline", "datapath"))


def fragment_counters(lab: Lab, *hosts: str) -> dict[str, dict[str, int]]:
    """What a failed assertion shows: each host's fragment counters and drops."""
    out: dict[str, dict[str, int]] = {}
    for host in hosts:
        counters = lab.fresh_agent_counters(host)
        out[host] = {
            f"{section}:{name}": int(value)
            for section in ("pipeline", "datapath")
            for name, value in counters[section].items()
            if name.startswith(("drop.", "fragment_"))
        }
    return out


def test_big_pings_pass_snat_both_ways(lab: Lab) -> None:
    warm_up(lab, "vm1", OUTSIDE_IP)
    before = {host: counter(lab, host, "fragment_forwarded") for host in ("h1", "h3")}
    result = big_ping(lab, "vm1", OUTSIDE_IP)
    assert result.ok, (result.output, fragment_counters(lab, "h1", "h3"))
    # vm1's later fragments were forwarded on h1 (SNAT), the replies' on h3 (reverse SNAT).
    for host, count in before.items():
        assert counter(lab, host, "fragment_forwarded") >= count + 2 * 5, host
    # The outside saw only the SNAT address: it has no route back to 10.0.1.0/24 anyway, so
    # the replies above prove the translation of every fragment's source.


def test_big_pings_pass_a_security_group_only_with_its_rule(lab: Lab) -> None:
    warm_up(lab, "vm1", VM3_IP)
    with lab.client() as client:
        client.create_object(SecurityGroup(id="hn-frag", tenant_id="demo"))
        client.create_object(
            SecurityGroupRule(
                id="hn-frag-ssh",
                tenant_id="demo",
                security_group_id="hn-frag",
                direction=Direction.INGRESS,
                protocol=6,
                port_range_min=22,
                port_range_max=22,
            )
        )
        try:
            written = client.update("port", "vm.vm3", {"security_group_ids": ["hn-frag"]})
            wait_applied(lab, written, PATH_HOSTS)
            # Control: the group is in the path and drops ICMP.
            assert not big_ping(lab, "vm1", VM3_IP, count=2, wait=1.0).received
            icmp_rule = SecurityGroupRule(
                id="hn-frag-icmp",
                tenant_id="demo",
                security_group_id="hn-frag",
                direction=Direction.INGRESS,
                protocol=1,
            )
            wait_applied(lab, client.create_object(icmp_rule), PATH_HOSTS)
            before = counter(lab, "h1", "fragment_forwarded")
            result = big_ping(lab, "vm1", VM3_IP)
            assert result.ok, result.output
            assert counter(lab, "h1", "fragment_forwarded") >= before + 2 * 5
        finally:
            client.update("port", "vm.vm3", {"security_group_ids": []})
            for kind, object_id in (
                ("security_group_rule", "hn-frag-icmp"),
                ("security_group_rule", "hn-frag-ssh"),
                ("security_group", "hn-frag"),
            ):
                with contextlib.suppress(Exception):
                    client.delete(kind, object_id)


# Overlapping fragments of one UDP datagram (the second rewrites bytes of the first), a tiny
# first TCP fragment and a later fragment without a first, each a few times.
SENDER = r"""
import socket, sys
from scapy.all import Ether, IP, UDP, Raw, get_if_hwaddr
target, gateway = sys.argv[1], sys.argv[2]
mac = get_if_hwaddr("eth0")
gw = next(line.split()[3] for line in open("/proc/net/arp").read().splitlines()[1:]
          if line.split()[0] == gateway)
head = Ether(src=mac, dst=gw)
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind(("eth0", 0))
for ident in range(100, 105):
    datagram = bytes(UDP(sport=40000, dport=9) / Raw(b"A" * 64))
    first = IP(dst=target, id=ident, flags="MF", proto=17) / Raw(datagram[:32])
    overlap = IP(dst=target, id=ident, frag=2, proto=17) / Raw(b"B" * 48)
    tiny = IP(dst=target, id=ident + 1000, flags="MF", proto=6) / Raw(b"x" * 8)
    orphan = IP(dst=target, id=ident + 2000, frag=100, proto=17) / Raw(b"C" * 16)
    for packet in (first, overlap, tiny, orphan):
        sock.send(bytes(head / packet))
print("sent", flush=True)
"""


def test_bad_fragments_are_dropped_with_their_reasons(lab: Lab) -> None:
    warm_up(lab, "vm1", VM3_IP)  # also fills vm1's ARP entry for the gateway
    reasons = ("drop.fragment_overlap", "drop.fragment_tiny", "drop.fragment_no_first")
    before = {reason: counter(lab, "h1", reason) for reason in reasons}
    sent = lab.run("vm1", [sys.executable, "-c", SENDER, VM3_IP, GATEWAY_IP], timeout=60)
    assert "sent" in sent.stdout, sent.stderr
    after = {reason: counter(lab, "h1", reason) for reason in reasons}
    grew = {reason: after[reason] - before[reason] for reason in reasons}
    assert all(delta >= 5 for delta in grew.values()), grew
    # Legitimate traffic on the same path is unharmed.
    assert big_ping(lab, "vm1", VM3_IP, count=3).ok
