"""SNAT port blocks leased ahead of need, with real agents over the memory datapath (see
harness.py for the topology): the first packet of a fresh agent finds a port, a SNAT range
added later is leased before its first packet, and blocks are added as usage rises, never
the same block (or translated port) on two hosts."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest

from hivenet.flowstate import NatRange
from hivenet.flowstate.portblocks import Destination
from hivenet.model import NatTarget, Rule, RuleAction
from hivenet.packets.flowmatch import FlowMatch
from tests.integration.stateful.harness import (
    OUT_A_IP,
    OUT_B_IP,
    SNAT_IP,
    StatefulCloud,
    build_provider,
    eventually,
    run,
    stateful_cloud,
)

SECOND_SNAT_IP = "198.51.100.2"
TARGET = NatRange.parse(SNAT_IP, SNAT_IP, 1024, 65535)
SERVER = Destination(4, 6, int(ipaddress.ip_address(OUT_A_IP)), 80)


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


@pytest.fixture(params=["memory", "sqlite-file"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/state.db"


async def start(c: StatefulCloud) -> None:
    await build_provider(c)
    await c.start_all()


async def block_owners(c: StatefulCloud) -> dict[str, str]:
    kvs = (await c.store.range("/hivenet/v1/tables/nat/")).kvs
    return {kv.key: kv.value.decode() for kv in kvs}


def test_first_snat_packet_from_a_fresh_agent_goes_through(store_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stateful_cloud(store_url, tmp_path / "state") as c:
            await start(c)
            h1 = c.agents["h1"]
            # Leased while the agent started, before any packet: on h1's lease.
            assert h1.flowstate.counters.blocks_leased_ahead == 1
            (block,) = h1.flowstate.allocator.blocks
            kv = await c.store.get(block.store_key())
            assert kv is not None and kv.value == b"h1" and kv.lease == h1.lease_id

            c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 40000))
            (seen,) = c.received("out-a")
            assert seen.ip_src == ip(SNAT_IP) and seen.tp_src in block.ports()
            assert c.drops("h1") == {}

    run(scenario())


def test_snat_range_added_later_is_leased_before_its_first_packet(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await start(c)
            await c.repo.create(
                Rule(
                    chain_id="r1-out",
                    action=RuleAction.SNAT,
                    position=20,
                    nw_src=ipaddress.ip_network("10.0.0.0/24"),
                    out_port_ids=("r1-ext-b",),
                    nat_targets=(
                        NatTarget(
                            address_from=ipaddress.ip_address(SECOND_SNAT_IP),
                            address_to=ipaddress.ip_address(SECOND_SNAT_IP),
                            port_from=1024,
                            port_to=65535,
                        ),
                    ),
                )
            )
            await c.synced()
            await c.tick()  # the flow-state timer notices the new range
            h1 = c.agents["h1"].flowstate
            await eventually(lambda: any(b.ip == ip(SECOND_SNAT_IP) for b in h1.allocator.blocks))
            assert h1.counters.blocks_leased_ahead == 2

            c.send("vm1", c.vm_tcp("vm1", OUT_B_IP, 41000))
            (seen,) = c.received("out-b")
            assert seen.ip_src == ip(SECOND_SNAT_IP)
            assert c.drops("h1") == {}

    run(scenario())


def test_blocks_are_leased_ahead_as_usage_rises_without_collisions(tmp_path: Path) -> None:
    """vm1 (h1) and vm2 (h2) each open 200 connections to the same server port: far more
    than one 64-port block. Each agent leases more blocks in the background as its free
    ports fall under the low-water mark; no SYN is dropped, every lease was ahead of need,
    and no block or translated (address, port) is on both hosts."""

    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await start(c)
            seen: dict[str, list[FlowMatch]] = {"vm1": [], "vm2": []}
            for n in range(200):
                for vm in ("vm1", "vm2"):
                    c.send(vm, c.vm_tcp(vm, OUT_A_IP, 20000 + n))
                    (arrived,) = c.received("out-a")
                    seen[vm].append(arrived)
                    # Packets arrive over time; the store answers the leaser in between.
                    await asyncio.sleep(0.001)
                if n == 50:
                    # 51 of the first block's 64 ports in use (past 75%): a second block is
                    # already held, before the first ran out.
                    for host in ("h1", "h2"):
                        assert len(c.agents[host].flowstate.allocator.blocks) == 2
            for host in ("h1", "h2"):
                flowstate = c.agents[host].flowstate
                assert "nat_ports_exhausted" not in c.drops(host)
                assert len(flowstate.allocator.blocks) >= 4
                assert flowstate.counters.blocks_leased == flowstate.counters.blocks_leased_ahead
                # Settled: the held blocks leave at least the low-water share free.
                await eventually(lambda f=flowstate: not f.allocator.is_running_low(TARGET, SERVER))
            translated = [(m.ip_src, m.tp_src) for vm in seen for m in seen[vm]]
            assert len(set(translated)) == len(translated) == 400
            h1_blocks = c.agents["h1"].flowstate.allocator.blocks
            h2_blocks = c.agents["h2"].flowstate.allocator.blocks
            assert not h1_blocks & h2_blocks
            owners = await block_owners(c)
            for host, blocks in (("h1", h1_blocks), ("h2", h2_blocks)):
                assert {owners[b.store_key()] for b in blocks} == {host}
            for vm, host_blocks in (("vm1", h1_blocks), ("vm2", h2_blocks)):
                ports = {port for block in host_blocks for port in block.ports()}
                assert all(m.tp_src in ports for m in seen[vm])

    run(scenario())
