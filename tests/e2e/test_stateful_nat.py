"""End-to-end: SNAT, floating IPs and security groups over real sockets, on the built-in `nat`
lab scenario (3 hosts; net1 with vm1 on h1 and vm2 on h2 is SNATed to the uplink address
192.0.2.1; vm3 on h2 and vm4 on h1 have floating IPs from 198.51.100.0/24; the uplink port of
router r1 is bound on h3 and wired to `hn<tag>-ext`, the outside world at 192.0.2.2).

The outside namespace has routes only to 192.0.2.0/24 (on link) and 198.51.100.0/24 (via the
router): any reply it manages to send to a VM went to an address the router translated.
One lab for the module (unique tag and state dir), removed afterwards whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from hivenet.lab.lab import Lab
from hivenet.lab.probes import PingResult
from hivenet.lab.scenario import builtin_scenario
from hivenet.model import Direction, SecurityGroup, SecurityGroupRule
from hivenet.packets import extract_flow_match
from hivenet.store import open_store
from tests.e2e.common import running_lab, wait_applied

pytestmark = pytest.mark.e2e

OUTSIDE_IP = "192.0.2.2"
SNAT_IP = "192.0.2.1"
SNAT_PORTS = range(1024, 65536)
NAT_BLOCK_SIZE = 64  # flowstate.portblocks: SNAT ports are leased per host in blocks of 64
FLOATING = {"vm3": "198.51.100.20", "vm4": "198.51.100.10"}
FIXED = {"vm1": "10.0.1.10", "vm2": "10.0.1.20", "vm3": "10.0.2.20", "vm4": "10.0.2.10"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(builtin_scenario("nat"), tmp_path_factory.mktemp("natlab")) as lab:
        yield lab


def ping_until_ok(lab: Lab, source: str, target: str) -> PingResult:
    """The first packets of a new path may be lost on purpose (the router drops the packet
    that finds its next hop unresolved; the first SNATed packet of a host waits for its port
    block lease): up to 5 single pings to warm up, then 5 that must all come back."""
    for _ in range(5):
        if lab.ping(source, target, count=1, wait=0.5).ok:
            break
    result = lab.ping(source, target, count=5, interval=0.05, wait=1.0)
    assert result.ok, result.output
    return result


def nat_blocks(lab: Lab) -> dict[int, str]:
    """SNAT port block number -> the host that leased it, from the store."""

    async def read() -> dict[int, str]:
        store = open_store(lab.store_url)
        try:
            kvs = (await store.range(f"/hivenet/v1/tables/nat/{SNAT_IP}/")).kvs
        finally:
            await store.close()
        return {int(kv.key.rsplit("/", 1)[1]): kv.value.decode() for kv in kvs}

    return asyncio.run(read())


def test_outside_has_no_route_to_the_tenant_networks(lab: Lab) -> None:
    """The premise of every reply check below."""
    for address in FIXED.values():
        result = lab.run("ext", ["ip", "route", "get", address], check=False)
        assert result.returncode != 0 and "unreachable" in result.stderr, result.stdout
    routes = lab.run("ext", ["ip", "route", "show"]).stdout
    assert "198.51.100.0/24 via 192.0.2.1" in routes, routes


def test_snat_from_two_hosts_at_once_no_port_collision_and_replies_arrive(lab: Lab) -> None:
    ping_until_ok(lab, "vm1", OUTSIDE_IP)  # leases h1's port block, resolves the outside
    ping_until_ok(lab, "vm2", OUTSIDE_IP)  # and h2's
    before = {host: lab.fresh_agent_counters(host) for host in ("h1", "h2", "h3")}
    server = lab.echo_server("ext", OUTSIDE_IP, 7000, connections=2, label="snatsrv")
    capture = lab.capture("ext", 5.0, label="snatcap")
    try:
        # Both VMs use the same source port on purpose: only SNAT can tell them apart.
        clients = {
            vm: lab.echo_client(
                vm, OUTSIDE_IP, 7000, chunk_size=16384, chunks=64, source_port=40000, label="snat"
            )
            for vm in ("vm1", "vm2")
        }
        results = {vm: client.result(timeout=30) for vm, client in clients.items()}
        sessions = server.sessions(2)
    finally:
        server.stop()
    frames = capture.frames()
    for vm, result in results.items():
        assert result.echoes_match, vm  # every reply came back intact
        assert (result.local_ip, result.local_port) == (FIXED[vm], 40000)
    # The outside saw two connections from the SNAT address, on two different ports, each
    # carrying exactly what one of the VMs sent.
    assert {session.peer_ip for session in sessions} == {SNAT_IP}
    ports = [session.peer_port for session in sessions]
    assert len(set(ports)) == 2, ports
    assert all(port in SNAT_PORTS for port in ports), ports
    assert sorted(s.sha256 for s in sessions) == sorted(r.sha256 for r in results.values())
    assert all(s.bytes_received == 64 * 16384 for s in sessions)
    # Each translated port lies in a block its VM's host leased through the store.
    owners = nat_blocks(lab)
    by_digest = {result.sha256: vm for vm, result in results.items()}
    for session in sessions:
        vm_host = {"vm1": "h1", "vm2": "h2"}[by_digest[session.sha256]]
        assert owners.get(session.peer_port // NAT_BLOCK_SIZE) == vm_host, (session, owners)
    # The replies entered at the gateway h3, which never saw the forward simulation: the
    # bindings reached it as flow-state messages over the underlay (VXLAN VNI 0xFFFFFF).
    after = {host: lab.fresh_agent_counters(host) for host in ("h1", "h2", "h3")}

    def grew(host: str, section: str, name: str) -> int:
        return int(after[host][section][name]) - int(before[host][section][name])

    for vm_host in ("h1", "h2"):
        assert grew(vm_host, "flowstate", "pushed_messages") >= 1, vm_host
    assert grew("h3", "datapath", "flowstate_rx") >= 2
    assert grew("h3", "flowstate", "received_entries") >= 2
    assert after["h3"]["flowstate"]["bad_messages"] == 0
    # On the outside wire: the connections' SYNs carry the translated ports, and nothing of
    # the lab leaks a tenant address.
    matches = [extract_flow_match(frame, 0) for frame in frames]
    syns = {m.tp_src for m in matches if m.ip_proto == 6 and m.tp_dst == 7000 and m.tcp_flags == 2}
    assert syns == set(ports), (syns, ports)
    tenant = [m for m in matches if m.eth_type == 0x0800 and (m.ip_src >> 16) == 0x0A00]
    assert tenant == [], "a tenant address reached the outside untranslated"


def test_ping_through_snat(lab: Lab) -> None:
    for vm in ("vm1", "vm2"):
        result = ping_until_ok(lab, vm, OUTSIDE_IP)
        assert result.steady_p50_ms is not None
    # Not everything goes out: the router's own uplink address answers, untranslated.
    ping_until_ok(lab, "vm1", SNAT_IP)


def test_outside_reaches_vms_through_their_floating_ips(lab: Lab) -> None:
    for vm, floating in FLOATING.items():
        ping_until_ok(lab, "ext", floating)
        server = lab.echo_server(vm, "0.0.0.0", 7100, label="fipsrv")
        try:
            result = lab.echo_client(
                "ext", floating, 7100, chunk_size=16384, chunks=64, label="fipcli"
            ).result(timeout=30)
            (session,) = server.sessions(1)
        finally:
            server.stop()
        assert result.echoes_match and result.sha256 == session.sha256, vm
        # DNAT only: the VM sees the outside's real address.
        assert session.peer_ip == OUTSIDE_IP, session


def test_a_vm_with_a_floating_ip_goes_out_as_that_address_port_kept(lab: Lab) -> None:
    server = lab.echo_server("ext", OUTSIDE_IP, 7200, label="fipout")
    try:
        result = lab.echo_client(
            "vm3", OUTSIDE_IP, 7200, chunks=16, source_port=41000, label="fipout"
        ).result(timeout=30)
        (session,) = server.sessions(1)
    finally:
        server.stop()
    assert result.echoes_match
    assert (session.peer_ip, session.peer_port) == (FLOATING["vm3"], 41000)


def test_security_group_allows_its_port_drops_another_and_passes_replies(lab: Lab) -> None:
    """vm4 (h1) behind its floating IP, reached from the outside (ingress at h3). The group
    allows TCP 8080 in and has no egress rule at all: the replies pass as part of a tracked
    connection."""
    floating = FLOATING["vm4"]
    listeners = [
        lab.echo_server("vm4", "0.0.0.0", port, label=f"sg{port}") for port in (8080, 8081)
    ]
    try:
        # Control: without the group both ports answer.
        assert lab.tcp_probe("ext", floating, 8081) == "connected"
        listeners[1].stop()
        listeners[1] = lab.echo_server("vm4", "0.0.0.0", 8081, label="sg8081")
        before = lab.fresh_agent_counters("h3")["pipeline"].get("drop.security_group", 0)
        with lab.client() as client:
            client.create_object(SecurityGroup(id="hn-web", tenant_id="demo"))
            client.create_object(
                SecurityGroupRule(
                    id="hn-web-8080",
                    tenant_id="demo",
                    security_group_id="hn-web",
                    direction=Direction.INGRESS,
                    protocol=6,
                    port_range_min=8080,
                    port_range_max=8080,
                )
            )
            written = client.update(
                "port",
                "vm.vm4",
                {"port_security_enabled": True, "security_group_ids": ["hn-web"]},
            )
            # The outside's packets are simulated on h3 (ingress); vm4's port is on h1.
            wait_applied(lab, written, ("h3", "h1"))
            try:
                assert lab.tcp_probe("ext", floating, 8081, timeout=1.5) == "timeout"
                assert not lab.ping("ext", floating, count=2, interval=0.1, wait=0.5).received
                result = lab.echo_client(
                    "ext", floating, 8080, chunk_size=8192, chunks=32, label="sgcli"
                ).result(timeout=30)
                (session,) = listeners[0].sessions(1)
                assert result.echoes_match and result.sha256 == session.sha256
                after = lab.fresh_agent_counters("h3")["pipeline"].get("drop.security_group", 0)
                assert after > before, (before, after)
            finally:
                # Back to the VM port's default: anti-spoofing, no group.
                client.update(
                    "port", "vm.vm4", {"port_security_enabled": True, "security_group_ids": []}
                )
                for kind, object_id in (
                    ("security_group_rule", "hn-web-8080"),
                    ("security_group", "hn-web"),
                ):
                    with contextlib.suppress(Exception):
                        client.delete(kind, object_id)
        # Without the group the other port is reachable again.
        assert lab.tcp_probe("ext", floating, 8081) == "connected"
    finally:
        for listener in listeners:
            listener.stop()
