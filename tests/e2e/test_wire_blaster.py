"""End-to-end: a VM blasts malformed frames at a routed neighbour (issue 15, "trust nobody").

On the `nat` lab vm1 (h1, net1) sends, for a bounded time, scapy-built frames through router
r1 towards vm3 (h2, net2): IPv4 with a bad header checksum, with a total length longer than
the frame and shorter than its header, fragments ending past 65535 bytes, TCP fragments at
offset 8, first fragments too short for their TCP header, truncated 802.1Q frames, QinQ and
double-tagged frames, TCP flag soup (valid IP, all flags set), IPv4 options (a loose source
route, a record route, an option whose length runs past the header). Meanwhile vm4 (h1, net2)
pings vm3. Checked: no agent dies, vm4 loses no ping, vm3's capture holds no blaster frame
that is malformed (bad header checksum, bad length, fragment attack, tagged, source-routed,
bad option), and h1's drop counters grew for every reason the frames should be dropped by.
Timing changes the counts, so only growth is asserted. Runs on the lab's datapath (eBPF default; HN_LAB_DATAPATH).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from hivenet.lab.lab import Lab
from hivenet.lab.scenario import builtin_scenario
from tests.e2e.common import running_lab

pytestmark = pytest.mark.e2e

BLAST_SECONDS = 8.0
TARGET_IP = "10.0.2.20"  # vm3, on h2, behind r1
GATEWAY_IP = "10.0.1.1"
MARKER = b"HNBLAST-MARKER"

# Each kind of frame once per round, rounds for SECONDS; scapy builds them (the test oracle).
BLASTER = r"""
import socket, sys, time
from scapy.all import Ether, Dot1Q, Dot1AD, IP, IPOption_LSRR, IPOption_RR, TCP, UDP, Raw, get_if_hwaddr
seconds, target, gateway, marker = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4].encode()
mac = get_if_hwaddr("eth0")
gw = next(line.split()[3] for line in open("/proc/net/arp").read().splitlines()[1:]
          if line.split()[0] == gateway)  # learned by the warm-up ping
head = Ether(src=mac, dst=gw)
udp = IP(dst=target, ttl=64) / UDP(sport=40000, dport=9) / Raw(marker)
def raw(packet):
    return bytes(packet)
bad_checksum = bytearray(raw(head / udp)); bad_checksum[24] ^= 0x5A
too_long = bytearray(raw(head / udp)); too_long[16:18] = (2000).to_bytes(2, "big")
too_short = bytearray(raw(head / udp)); too_short[16:18] = (12).to_bytes(2, "big")
def with_header_checksum(frame):
    frame = bytearray(frame); frame[24:26] = b"\0\0"
    header = frame[14 : 14 + (frame[14] & 15) * 4]
    total = sum(int.from_bytes(header[i : i + 2], "big") for i in range(0, len(header), 2))
    while total >> 16: total = (total & 0xFFFF) + (total >> 16)
    frame[24:26] = (~total & 0xFFFF).to_bytes(2, "big")
    return bytes(frame)
bad_option = bytearray(raw(head / IP(dst=target, options=[IPOption_RR()]) / UDP(sport=40004, dport=9) / Raw(marker)))
bad_option[35] = 60  # the record-route option's length runs past the options area
bad_option = with_header_checksum(bad_option)
frames = {
    "bad_checksum": bytes(bad_checksum),
    "too_long": bytes(too_long),
    "too_short": bytes(too_short),
    "frag_8191": raw(head / IP(dst=target, frag=8191, proto=17) / Raw(marker + b"x" * 10)),
    "tcp_frag_at_8": raw(head / IP(dst=target, frag=1, proto=6) / Raw(marker + b"x" * 10)),
    "tiny_first_tcp": raw(head / IP(dst=target, flags="MF", proto=6) / Raw(b"x" * 8)),
    "truncated_8021q": raw(head)[:12] + b"\x81\x00\x00\x05",
    "qinq": raw(Ether(src=mac, dst=gw) / Dot1AD(vlan=7) / Dot1Q(vlan=5) / udp),
    "double_8021q": raw(Ether(src=mac, dst=gw) / Dot1Q(vlan=7) / Dot1Q(vlan=5) / udp),
    "flag_soup": raw(head / IP(dst=target) / TCP(sport=40001, dport=22, flags="FSRPAUEC") / Raw(marker)),
    "source_route": raw(head / IP(dst=target, options=[IPOption_LSRR(routers=[target])]) / UDP(sport=40002, dport=9) / Raw(marker)),
    "record_route": raw(head / IP(dst=target, options=[IPOption_RR()]) / UDP(sport=40003, dport=9) / Raw(marker)),
    "bad_option_length": bad_option,
}
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind(("eth0", 0))
sent = 0
start = time.monotonic()
while time.monotonic() - start < seconds:
    for frame in frames.values():
        try:
            sock.send(frame)
            sent += 1
        except OSError:
            pass
    time.sleep(0.002)
print(f"sent {sent}", flush=True)
"""

# Drop reasons on h1 (pipeline and datapath summed) that must grow: each stands for kinds above.
EXPECTED_REASONS = (
    "drop.bad_ip_checksum",  # bad_checksum, routed
    "drop.malformed_frame",  # too_long, too_short, fragment attacks, bad_option_length
    "drop.fragment_tiny",  # tiny_first_tcp
    "drop.ip_source_route",  # source_route, routed
    "drop.port_stack",  # truncated_8021q, freed by the host kernel before any program
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(builtin_scenario("nat"), tmp_path_factory.mktemp("blastlab")) as lab:
        yield lab


def drops(lab: Lab, host: str) -> dict[str, int]:
    counters = lab.fresh_agent_counters(host)
    out: dict[str, int] = {}
    for section in ("pipeline", "datapath"):
        for name, value in counters[section].items():
            if name.startswith("drop."):
                out[name] = out.get(name, 0) + int(value)
    return out


def malformed(frame: bytes) -> str | None:
    """Why a frame captured at the target is one the wire must not have delivered, or None."""
    ether = Ether(frame)
    if ether.type != 0x0800:
        return f"ethertype {ether.type:#06x}"
    ip = ether[IP]
    header = bytes(ip)[: ip.ihl * 4]
    if sum(int.from_bytes(header[i : i + 2], "big") for i in range(0, len(header), 2)) % 0xFFFF:
        return "bad header checksum"
    if ip.len > len(bytes(ip)) or ip.len < ip.ihl * 4:
        return f"total length {ip.len}"
    if ip.frag * 8 + ip.len > 65535 or (ip.frag == 1 and ip.proto == 6):
        return f"fragment attack (offset {ip.frag})"
    if ip.flags.MF and ip.frag == 0 and ip.proto == 6 and TCP not in ip:
        return "tiny first fragment"
    options = header[20:]
    if options[:1] in (b"\x83", b"\x89"):  # LSRR, SSRR (the only option the blaster puts first)
        return "source route"
    if options[:2] == b"\x07\x3c":
        return "bad option length"
    return None


def test_a_blasting_vm_harms_no_one_and_every_drop_is_counted(lab: Lab) -> None:
    # Warm up ARP (the first echo may wait for a next hop), flows, the gateway MAC.
    assert lab.ping("vm1", TARGET_IP, count=3).received > 0
    assert lab.ping("vm4", TARGET_IP, count=3).received > 0
    assert lab.ping("vm4", TARGET_IP, count=2).ok
    agents_before = {host: lab.agent_record(host) for host in ("h1", "h2", "h3")}
    before = drops(lab, "h1")
    capture = lab.capture("vm3", BLAST_SECONDS + 3, label="hnblastcap")
    blaster = lab.start_in(
        "vm1",
        [sys.executable, "-c", BLASTER, str(BLAST_SECONDS), TARGET_IP, GATEWAY_IP, MARKER.decode()],
        label="hnblaster",
    )
    try:
        pings = lab.ping("vm4", TARGET_IP, count=int(BLAST_SECONDS / 0.2), interval=0.2, wait=2)
        blaster.popen.wait(BLAST_SECONDS + 20)
    finally:
        blaster.stop()
    frames = capture.frames()
    log = lab.log_of("vm1", "hnblaster").read_text()
    assert "sent " in log, log
    assert pings.ok, pings.output
    after = drops(lab, "h1")
    for host, record in agents_before.items():
        assert record is not None and lab.agent_record(host) == record, f"{host}'s agent restarted"
        os.kill(record.pid, 0)  # still running (raises if it died)
    bad = [
        (why, frame.hex())
        for frame in frames
        if MARKER in frame and (why := malformed(frame)) is not None
    ]
    assert bad == [], bad
    grew = {reason: after.get(reason, 0) - before.get(reason, 0) for reason in EXPECTED_REASONS}
    assert all(delta > 0 for delta in grew.values()), grew
    # Valid packets of the blast (TCP flag soup) still reach the target: the capture works.
    assert any(MARKER in frame and malformed(frame) is None for frame in frames)
