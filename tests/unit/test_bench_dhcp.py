"""bench/dhcp.py: its load generator's DHCP frames, checked against scapy as the oracle (what
scapy builds, bench/dhcp.py builds byte for byte; what bench/dhcp.py parses, scapy agrees
with), and smoke runs of the bench itself with a tiny N (in process always; the lab against
dnsmasq only as root with dnsmasq installed)."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

BENCH = Path(__file__).resolve().parents[2] / "bench" / "dhcp.py"
MAC = 0x02_AB_CD_00_00_17
MAC_TEXT = "02:ab:cd:00:00:17"
ADDRESS = ipaddress.IPv4Address("10.0.1.23")
SERVER = ipaddress.IPv4Address("10.0.1.1")


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_dhcp", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_dhcp"] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def scapy_request(xid: int, message_type: str, extra: list[tuple[str, object]]) -> bytes:
    options = [("message-type", message_type), *extra]
    options.append(("param_req_list", list(bench.PARAMETERS)))

    def build(padding: int) -> Ether:
        return (
            Ether(src=MAC_TEXT, dst="ff:ff:ff:ff:ff:ff")
            / IP(src="0.0.0.0", dst="255.255.255.255", id=0, ttl=64, flags=0)
            / UDP(sport=68, dport=67, chksum=0)
            / BOOTP(op=1, xid=xid, flags=0, chaddr=MAC.to_bytes(6, "big") + bytes(10))
            / DHCP(options=[*options, "end", *["pad"] * padding])  # pad: zero bytes
        )

    short = bench.BOOTP_MIN - len(bytes(build(0)[BOOTP]))
    return bytes(build(max(0, short)))


@pytest.mark.parametrize(
    ("message_type", "name", "requested", "server"),
    [
        (bench.DISCOVER, "discover", None, None),
        (bench.REQUEST, "request", ADDRESS, SERVER),
        (bench.REQUEST, "request", ADDRESS, None),
    ],
)
def test_request_frames_are_what_scapy_builds(
    message_type: int,
    name: str,
    requested: ipaddress.IPv4Address | None,
    server: ipaddress.IPv4Address | None,
) -> None:
    extra: list[tuple[str, object]] = []
    if requested is not None:
        extra.append(("requested_addr", str(requested)))
    if server is not None:
        extra.append(("server_id", str(server)))
    ours = bench.request_frame(MAC, 0x1234_5678, message_type, requested=requested, server=server)
    assert ours == scapy_request(0x1234_5678, name, extra)
    parsed = Ether(ours)
    assert parsed[IP].chksum == IP(bytes(parsed[IP])).chksum  # scapy recomputes the same
    assert len(bytes(parsed[BOOTP])) >= bench.BOOTP_MIN


def test_with_xid_changes_only_the_transaction_id() -> None:
    frame = bench.request_frame(MAC, 1, bench.DISCOVER)
    changed = bench.with_xid(frame, 0xDEAD_BEEF)
    assert Ether(changed)[BOOTP].xid == 0xDEAD_BEEF
    assert changed == bench.request_frame(MAC, 0xDEAD_BEEF, bench.DISCOVER)


def scapy_reply(
    message_type: str, *, server: str | None = SERVER.exploded, padding: int = 0
) -> bytes:
    options: list[object] = [("message-type", message_type)]
    if server is not None:
        options.append(("server_id", server))
    options += [("subnet_mask", "255.255.255.0"), ("router", "10.0.1.1"), "end"]
    options += ["pad"] * padding
    return bytes(
        Ether(src="02:00:00:00:00:01", dst=MAC_TEXT)
        / IP(src=SERVER.exploded, dst=ADDRESS.exploded)
        / UDP(sport=67, dport=68)
        / BOOTP(op=2, xid=77, yiaddr=ADDRESS.exploded, chaddr=MAC.to_bytes(6, "big"))
        / DHCP(options=options)
    )


@pytest.mark.parametrize(
    ("name", "code"), [("offer", bench.OFFER), ("ack", bench.ACK), ("nak", bench.NAK)]
)
def test_replies_parse_as_scapy_reads_them(name: str, code: int) -> None:
    frame = scapy_reply(name, padding=3)
    reply = bench.parse_reply(frame)
    assert reply is not None
    oracle = Ether(frame)[BOOTP]
    assert reply.xid == oracle.xid == 77
    assert reply.client_mac == int.from_bytes(oracle.chaddr[:6], "big") == MAC
    assert reply.your_ip == ipaddress.IPv4Address(oracle.yiaddr) == ADDRESS
    assert reply.message_type == code
    assert reply.server_id == SERVER


def test_a_reply_without_server_id_parses_without_one() -> None:
    reply = bench.parse_reply(scapy_reply("offer", server=None))
    assert reply is not None and reply.server_id is None


def test_what_is_not_a_dhcp_answer_parses_as_none() -> None:
    request = bench.request_frame(MAC, 5, bench.DISCOVER)
    offer = scapy_reply("offer")
    not_bootreply = Ether(offer)
    not_bootreply[BOOTP].op = 1
    other_port = Ether(offer)
    other_port[UDP].dport = 69
    no_cookie = bytearray(offer)
    no_cookie[14 + 20 + 8 + 236] ^= 0xFF
    truncated_option = offer[: 14 + 20 + 8 + 240] + bytes((53,))
    for frame in (
        request,  # a client's message (UDP 68 -> 67)
        bytes(not_bootreply),
        bytes(other_port),
        bytes(no_cookie),
        truncated_option,
        offer[:100],
        bytes(Ether(offer)[IP].payload),  # not an Ethernet frame
    ):
        assert bench.parse_reply(frame) is None
    no_type = scapy_reply("offer")
    start = no_type.index(bytes((53, 1, 2)))
    assert bench.parse_reply(no_type[:start] + bytes((0, 0, 0)) + no_type[start + 3 :]) is None


def run_bench(*args: str, timeout: float) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, str(BENCH), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    result = json.loads(last)
    assert isinstance(result, dict) and result["bench"] == "dhcp"
    return result


def test_bench_smoke_in_process() -> None:
    result = run_bench(
        "--in-process-only", "--ports", "2", "--in-process-messages", "50", timeout=60
    )
    assert result["in_process"]["answers_per_second"] > 0  # type: ignore[index]
    assert result["lab"] is None


@pytest.mark.e2e
def test_bench_smoke_lab_against_dnsmasq() -> None:
    if os.geteuid() != 0:
        pytest.skip("e2e: needs root (network namespaces, veth)")
    if shutil.which("dnsmasq") is None:
        pytest.skip("needs dnsmasq (Debian dnsmasq-base, `make apt`)")
    result = run_bench(
        "--ports", "2", "--rounds", "1", "--udhcpc-runs", "1", "--flood-seconds", "0.2",
        "--in-process-messages", "50", timeout=120,
    )  # fmt: skip
    lab = result["lab"]
    assert isinstance(lab, dict)
    for side in ("hivenet", "dnsmasq"):
        assert lab[side]["answers"] > 0 and lab[side]["naks"] == 0
        assert lab[f"udhcpc_{side}_ms"] > 0
    # The agent's flood guard binds a single flooding port; dnsmasq has none.
    assert lab["flood_hivenet"]["offers"] < lab["flood_hivenet"]["sent"]
    assert lab["agent_over_budget_drops"] > 0
