"""The agent's flow-state sync, with real agents over the memory datapath
(see harness.py for the topology): NAT port blocks survive a lost lease unless another host
took them first, a failing journal never keeps flow state from peers, `push_targets` does
its topology-wide work once per topology revision (and sees every change), and `begin`
uses the match the pipeline already extracted."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from hivenet.agent.flowstate_sync import JOURNAL_NAME
from hivenet.flowstate.portblocks import AllocatedPort, Destination
from hivenet.model import DeviceKind, Port
from hivenet.packets import extract_flow_match
from hivenet.sim import TopologyView
from hivenet.sim.topology import TopologyObject
from hivenet.store.base import Compare, Put
from tests.integration.stateful.harness import (
    OUT_A_IP,
    SNAT_IP,
    StatefulCloud,
    build_provider,
    eventually,
    run,
    stateful_cloud,
)

SERVER = Destination(4, 6, int(ipaddress.ip_address(OUT_A_IP)), 80)


async def start(c: StatefulCloud) -> None:
    await build_provider(c)
    await c.start_all()


def snat_port(seen: list[bytes]) -> AllocatedPort:
    (frame,) = seen
    match = extract_flow_match(frame, 0)
    assert match.ip_src == int(ipaddress.ip_address(SNAT_IP))
    return AllocatedPort(4, match.ip_src, match.tp_src)


# ---------------------------------------------------------------------- 1. lost lease


def test_blocks_in_use_are_retaken_on_the_new_lease_after_a_lost_lease(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await start(c)
            h1 = c.agents["h1"]
            (block,) = h1.flowstate.allocator.blocks
            c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 40000))
            used = snat_port(c.received_frames("out-a"))
            old_lease = h1.lease_id

            await c.store.lease_revoke(old_lease)  # as if it expired while the store was away
            assert await c.store.get(block.store_key()) is None
            await eventually(lambda: h1.lease_id != old_lease)
            new_lease = h1.lease_id

            async def retaken() -> bool:
                kv = await c.store.get(block.store_key())
                return kv is not None and kv.value == b"h1" and kv.lease == new_lease

            for _ in range(300):
                if await retaken():
                    break
                await asyncio.sleep(0.01)
            assert await retaken()
            # Held throughout: the live binding's port is still ours and never handed out.
            allocator = h1.flowstate.allocator
            assert block in allocator.blocks
            assert allocator.is_allocated(used, SERVER)
            assert h1.flowstate.counters.blocks_lost == 0
            c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 40001))
            assert snat_port(c.received_frames("out-a")) != used

    run(scenario())


def test_a_block_another_host_took_while_the_lease_was_gone_is_dropped(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await start(c)
            h1 = c.agents["h1"]
            (block,) = h1.flowstate.allocator.blocks
            c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 40000))
            c.received_frames("out-a")
            old_lease = h1.lease_id
            await c.store.lease_revoke(old_lease)
            # Another host leases the vanished block before h1 has a lease again.
            other = await c.store.lease_grant(30)
            key = block.store_key()
            taken = await c.store.txn(
                [Compare(key, "create_revision", "==", 0)], [Put(key, b"h9", lease=other.id)]
            )
            assert taken.succeeded
            await eventually(lambda: block not in h1.flowstate.allocator.blocks)
            assert h1.flowstate.counters.blocks_lost == 1
            kv = await c.store.get(key)
            assert kv is not None and kv.value == b"h9"
            # The range is leased ahead again: a new connection still finds a port, elsewhere.
            await eventually(lambda: h1.lease_id != old_lease)
            await c.tick()
            await eventually(lambda: bool(h1.flowstate.allocator.blocks))
            c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 40001))
            port = snat_port(c.received_frames("out-a")).port
            assert port not in block.ports()

    run(scenario())


# ---------------------------------------------------------------------- 2. journal errors


def test_a_failing_journal_never_keeps_flow_state_from_peers(tmp_path: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full to fail writes with ENOSPC")

    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await start(c)
            journal = tmp_path / "state" / "h1" / JOURNAL_NAME
            assert not journal.exists()  # a fresh agent with nothing to journal yet
            journal.parent.mkdir(parents=True, exist_ok=True)
            os.symlink("/dev/full", journal)  # every write: ENOSPC, as on a full disk

            c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 40000))
            assert len(c.received_frames("out-a")) == 1
            h1 = c.agents["h1"].flowstate
            assert h1.counters.journal_errors >= 1
            assert h1.counters.pushed_entries >= 1
            h3 = c.agents["h3"].flowstate  # the egress host has the SNAT binding
            assert h3.counters.received_entries >= 1
            assert len(h3.nat) == 1

            # Space again: the next tick rewrites the torn journal as a snapshot.
            journal.unlink()
            await c.tick()
            assert journal.is_file() and journal.stat().st_size > 0
            restored = type(h1)(
                "h1", c.datapaths["h1"], TopologyView(), state_dir=journal.parent, clock=c.clock
            )
            assert restored.restore() == len(h1.conntrack) + len(h1.nat) > 0

    run(scenario())


# ---------------------------------------------------------------------- 3. push_targets


def test_push_targets_scans_the_topology_once_per_revision_and_sees_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await start(c)
            view = c.agents["h1"].flowstate.topology
            scans: list[str] = []
            real_all: Callable[[str], list[TopologyObject]] = view.all

            def counting_all(kind: str) -> list[TopologyObject]:
                scans.append(kind)
                return real_all(kind)

            monkeypatch.setattr(view, "all", counting_all)
            for n in range(5):
                c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 40000 + n))
                assert len(c.received_frames("out-a")) == 1
            # Five new connections to a stateful group's port, one topology revision.
            assert scans.count("port_group") == 1
            assert scans.count("port") <= 1
            h2 = c.agents["h2"].flowstate
            assert h2.counters.received_entries == 0 and len(h2.nat) == 0  # no uplink port

            # h2 gets a port in the stateful uplinks group: the next connection reaches it.
            await c.repo.create(
                Port(
                    device_kind=DeviceKind.BRIDGE,
                    device_id="ext-b",
                    host_id="h2",
                    interface_name="hnextra",
                    port_group_ids=("uplinks",),
                )
            )
            await c.synced()
            c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 41000))
            assert len(c.received_frames("out-a")) == 1
            assert len(h2.nat) == 1

    run(scenario())


# ---------------------------------------------------------------------- 4. one parse


def test_begin_uses_the_match_the_pipeline_extracted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hivenet.agent.flowstate_sync as flowstate_sync

    def no_second_parse(frame: bytes, in_port: int) -> object:
        raise AssertionError("begin parsed the frame again")

    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await start(c)
            monkeypatch.setattr(flowstate_sync, "extract_flow_match", no_second_parse)
            c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 40000))
            assert len(c.received_frames("out-a")) == 1
            assert c.agents["h1"].flowstate.counters.committed == 1

    run(scenario())
