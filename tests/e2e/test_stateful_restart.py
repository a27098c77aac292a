"""End-to-end: a long-lived TCP connection through SNAT survives `kill -9` and restart of the
agent on the VM's host and of the gateway host's agent (the built-in `nat` lab scenario:
vm1 on h1 is SNATed to 192.0.2.1 by router r1, whose uplink is bound on h3).

A slow checksummed echo stream (one 1 KiB chunk every 40 ms, each echoed back before the
next goes out) runs from vm1 to the outside namespace while the test kills h1's agent, starts
it again as `hivenet lab` does, waits for the stream to move on, then does the same to h3.
Surviving means: one connection from start to end (the outside accepts exactly one), every
echo intact, the same translated source port throughout, the stream progressing after each
restart. Its own lab (unique tag and state dir), removed afterwards whatever happened.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from hivenet.lab.lab import Lab
from hivenet.lab.scenario import builtin_scenario
from tests.e2e.common import running_lab

pytestmark = pytest.mark.e2e

OUTSIDE_IP = "192.0.2.2"
SNAT_IP = "192.0.2.1"
CHUNKS = 500  # x (40 ms + RTT): about 20-25 s of stream
INTERVAL = 0.04


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(builtin_scenario("nat"), tmp_path_factory.mktemp("natrestart")) as lab:
        yield lab


def restart_agent(lab: Lab, host: str) -> float:
    """kill -9 the agent of `host`, start it again; the wall-clock time it is ready."""
    lab.kill_agent(host)
    time.sleep(0.5)
    lab.start_agent(host)
    lab.wait_agents_ready(timeout=20, hosts=[host])
    return time.time()


def test_long_lived_snat_stream_survives_kill_9_of_the_vm_host_and_gateway_agents(
    lab: Lab,
) -> None:
    for _ in range(5):  # h1's port block lease and the router's ARP for the outside
        if lab.ping("vm1", OUTSIDE_IP, count=1, wait=0.5).ok:
            break
    server = lab.echo_server("ext", OUTSIDE_IP, 7300, connections=1, label="longsrv")
    try:
        client = lab.echo_client(
            "vm1",
            OUTSIDE_IP,
            7300,
            chunk_size=1024,
            chunks=CHUNKS,
            interval=INTERVAL,
            timeout=60,
            label="longcli",
        )
        client.wait_progress(25, timeout=10)
        marks = {}
        for host in ("h1", "h3"):  # the VM's host, then the gateway host
            ready_at = restart_agent(lab, host)
            done = len(client.progress())
            # The stream moves on after the restart: more echoes, arriving after it.
            last = client.wait_progress(done + 25, timeout=30)
            assert last > ready_at
            marks[host] = done
        result = client.result(timeout=60)
        (session,) = server.sessions(1, timeout=10)
    finally:
        server.stop()
    assert marks["h1"] < marks["h3"] < CHUNKS, marks
    assert result.echoes_match
    assert result.bytes_sent == session.bytes_received == CHUNKS * 1024
    assert result.sha256 == session.sha256
    assert session.peer_ip == SNAT_IP and session.peer_port != 0
    for host in ("h1", "h3"):
        restored = lab.fresh_agent_counters(host).get("flowstate", {}).get("restored_entries", 0)
        assert restored >= 1, f"{host}'s agent restored no flow state from its journal"
