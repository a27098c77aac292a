"""SNAT, ping and ICMP errors through NAT, asymmetric return and restarts, with real agents
over the memory datapath (see harness.py for the topology)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from hivenet.flowstate import FlowKey, NatKind
from hivenet.packets import (
    build_echo_request,
    build_icmp_echo_reply,
    build_icmp_time_exceeded,
    build_tcp_segment,
    extract_flow_match,
    parse_frame,
    verify_checksums,
)
from hivenet.packets.flowmatch import FlowMatch
from hivenet.packets.parse import embedded_datagram
from tests.integration.stateful.harness import (
    ACK,
    OUT_A_IP,
    SNAT_IP,
    SYN,
    VM_IPS,
    StatefulCloud,
    build_provider,
    run,
    stateful_cloud,
)


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


@pytest.fixture(params=["memory", "sqlite-file"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/state.db"


def outside_reply(c: StatefulCloud, outside: str, seen: FlowMatch, flags: int) -> bytes:
    """What the outside host answers to a TCP segment it received."""
    port = c.ports[outside]
    return build_tcp_segment(
        eth_src=port.mac,
        eth_dst=c.router_macs[outside],
        ip_src=VM_IPS[outside],
        ip_dst=str(ipaddress.ip_address(seen.ip_src)),
        src_port=seen.tp_dst,
        dst_port=seen.tp_src,
        flags=flags,
    )


async def setup(c: StatefulCloud, **kwargs: object) -> None:
    await build_provider(c, **kwargs)  # type: ignore[arg-type]
    await c.start_all()


async def open_snat(c: StatefulCloud, vm: str, sport: int) -> FlowMatch:
    """`vm` opens TCP to out-a:80; returns the SYN as out-a saw it. The agent leased a port
    block of the SNAT address when it started, so even the first SYN passes."""
    host = {"vm1": "h1", "vm2": "h2"}[vm]
    c.send(vm, c.vm_tcp(vm, OUT_A_IP, sport, 80, SYN))
    seen = c.received("out-a")
    assert len(seen) == 1, c.agents[host].pipeline.last_result.format_trace()  # type: ignore[union-attr]
    assert "nat_ports_exhausted" not in c.drops(host)
    return seen[0]


def test_snat_from_two_hosts_no_port_collision_and_replies_arrive(
    store_url: str, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stateful_cloud(store_url, tmp_path / "state") as c:
            await setup(c)
            seen1 = await open_snat(c, "vm1", 40000)
            seen2 = await open_snat(c, "vm2", 40000)  # same source port on purpose
            for seen in (seen1, seen2):
                assert seen.ip_src == ip(SNAT_IP) and seen.ip_dst == ip(OUT_A_IP)
                assert 1024 <= seen.tp_src <= 65535
            assert seen1.tp_src != seen2.tp_src
            # Each host leased its own 64-port block through the store, on its lease.
            blocks = {
                kv.key: kv.value.decode()
                for kv in (await c.store.range("/hivenet/v1/tables/nat/")).kvs
            }
            owners = {
                f"/hivenet/v1/tables/nat/{SNAT_IP}/{seen.tp_src // 64}": host
                for seen, host in ((seen1, "h1"), (seen2, "h2"))
            }
            assert {k: blocks[k] for k in owners} == owners
            for host in ("h1", "h2"):
                kv = await c.store.get(next(k for k, v in owners.items() if v == host))
                assert kv is not None and kv.lease == c.agents[host].lease_id

            # Replies enter at the gateway host h3, which got the bindings pushed before the
            # SYNs left: each is translated back to its own VM.
            c.send("out-a", outside_reply(c, "out-a", seen1, SYN | ACK))
            c.send("out-a", outside_reply(c, "out-a", seen2, SYN | ACK))
            (back1,) = c.received("vm1")
            (back2,) = c.received("vm2")
            assert (back1.ip_src, back1.tp_src) == (ip(OUT_A_IP), 80)
            assert (back1.ip_dst, back1.tp_dst) == (ip(VM_IPS["vm1"]), 40000)
            assert (back2.ip_dst, back2.tp_dst) == (ip(VM_IPS["vm2"]), 40000)
            h3 = c.agents["h3"].flowstate
            assert h3.counters.received_entries >= 2 and h3.counters.connections_opened == 0
            # Flows are cached on both sides now: the stream goes on without upcalls.
            upcalls = c.agents["h1"].pipeline.stats.upcalls
            for _ in range(3):
                c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 40000, 80, ACK))
            assert [m.tp_src for m in c.received("out-a")] == [seen1.tp_src] * 3
            c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 40000, 80, ACK))
            assert c.agents["h1"].pipeline.stats.upcalls <= upcalls + 1
            c.received("out-a")

    run(scenario())


def test_ping_through_nat_and_ttl_exceeded_translated_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await setup(c)
            await open_snat(c, "vm1", 41000)  # leases the block
            c.received("out-a")
            port = c.ports["vm1"]
            echo = build_echo_request(
                eth_src=port.mac,
                eth_dst=c.router_macs["vm1"],
                ip_src=VM_IPS["vm1"],
                ip_dst=OUT_A_IP,
                identifier=77,
                sequence=1,
            )
            c.send("vm1", echo)
            (request,) = c.received_frames("out-a")
            seen = extract_flow_match(request, 0)
            assert seen.ip_src == ip(SNAT_IP) and seen.icmp_type == 8
            # out-a answers the request it got (to the SNAT address and translated id).
            c.send("out-a", build_icmp_echo_reply(request))
            (back,) = c.received("vm1")
            assert back.icmp_type == 0 and back.icmp_id == 77
            assert back.ip_dst == ip(VM_IPS["vm1"]) and back.ip_src == ip(OUT_A_IP)

            # A UDP datagram whose TTL runs out beyond the gateway: the outside "router"
            # answers time-exceeded about the translated datagram; vm1 gets it translated
            # back, quote included, with every checksum right.
            c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 41000, 80, ACK))
            (frame,) = c.received_frames("out-a")
            error = build_icmp_time_exceeded(frame, src_ip=OUT_A_IP)
            c.send("out-a", error)
            (delivered,) = c.received_frames("vm1")
            parsed = parse_frame(delivered)
            assert parsed.icmp is not None and parsed.icmp.type == 11
            assert parsed.ipv4 is not None and int(parsed.ipv4.dst) == ip(VM_IPS["vm1"])
            quote = embedded_datagram(parsed)
            assert quote.ipv4 is not None and int(quote.ipv4.src) == ip(VM_IPS["vm1"])
            assert (quote.src_port, quote.dst_port) == (41000, 80)
            assert verify_checksums(delivered) == []
            # Errors are never cached: a second one is simulated (and translated) again.
            c.send("out-a", error)
            assert len(c.received_frames("vm1")) == 1

    run(scenario())


def test_asymmetric_return_through_a_stateful_port_group(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await setup(c)
            seen = await open_snat(c, "vm1", 42000)
            # The forward SYN left through ext-a (h3); out-a and out-b are in the stateful
            # group "uplinks", so h4 got the NAT binding too, before the SYN left.
            assert c.agents["h4"].flowstate.counters.received_entries >= 1
            # The answer comes back through the other uplink: out-b on h4.
            port = c.ports["out-b"]
            reply = build_tcp_segment(
                eth_src=port.mac,
                eth_dst=c.router_macs["out-b"],
                ip_src=OUT_A_IP,
                ip_dst=SNAT_IP,
                src_port=80,
                dst_port=seen.tp_src,
                flags=SYN | ACK,
            )
            c.send("out-b", reply)
            (back,) = c.received("vm1")
            assert (back.ip_dst, back.tp_dst) == (ip(VM_IPS["vm1"]), 42000)
            assert c.agents["h4"].pipeline.stats.upcalls >= 1

    run(scenario())


def test_asymmetric_return_fails_without_a_stateful_group(tmp_path: Path) -> None:
    """The control experiment: with a plain port group h4 never hears of the binding."""

    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await setup(c, stateful_uplinks=False)
            seen = await open_snat(c, "vm1", 42000)
            assert c.agents["h4"].flowstate.counters.received_entries == 0
            port = c.ports["out-b"]
            c.send(
                "out-b",
                build_tcp_segment(
                    eth_src=port.mac,
                    eth_dst=c.router_macs["out-b"],
                    ip_src=OUT_A_IP,
                    ip_dst=SNAT_IP,
                    src_port=80,
                    dst_port=seen.tp_src,
                    flags=SYN | ACK,
                ),
            )
            assert c.received("vm1") == []

    run(scenario())


@pytest.mark.parametrize("victim", ["h1", "h3"])
def test_connection_survives_kill_and_restart(victim: str, tmp_path: Path) -> None:
    """kill -9 (no graceful stop, flows gone) of the VM's agent or the gateway's agent: the
    restarted agent reads its journal and the stream goes on with the same translation."""

    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await setup(c)
            seen = await open_snat(c, "vm1", 43000)
            c.send("out-a", outside_reply(c, "out-a", seen, SYN | ACK))
            assert len(c.received("vm1")) == 1
            await c.kill_agent(victim)
            await c.start_agent(victim)
            await c.synced()
            assert c.agents[victim].flowstate.counters.restored_entries >= 1
            c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 43000, 80, ACK))
            (again,) = c.received("out-a")
            assert (again.ip_src, again.tp_src) == (seen.ip_src, seen.tp_src)
            c.send("out-a", outside_reply(c, "out-a", again, ACK))
            (back,) = c.received("vm1")
            assert (back.ip_dst, back.tp_dst) == (ip(VM_IPS["vm1"]), 43000)

    run(scenario())


def test_idle_state_expires_everywhere_and_used_state_is_refreshed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await setup(c)
            seen = await open_snat(c, "vm1", 44000)
            key = FlowKey(4, ip(VM_IPS["vm1"]), ip(OUT_A_IP), 6, 44000, 80)
            h1, h3 = c.agents["h1"].flowstate, c.agents["h3"].flowstate
            # Used every 50 s for 1000 s: NAT's 7440 s and conntrack timers keep being
            # reset and refreshed to the peer.
            for _ in range(20):
                await c.tick(50.0)
                c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 44000, 80, ACK))
                assert len(c.received("out-a")) == 1
            assert h1.nat.lookup_original("r1", NatKind.SNAT, key, c.clock.now) is not None
            assert h1.counters.refreshed_entries > 0
            # Idle: after the NAT timeout it is gone on h1 and on h3, flows invalidated.
            await c.tick(8000.0)
            await c.tick(1.0)
            assert h1.nat.lookup_original("r1", NatKind.SNAT, key, c.clock.now) is None
            assert len(h3.nat) == 0
            c.send("out-a", outside_reply(c, "out-a", seen, ACK))
            assert c.received("vm1") == []

    run(scenario())
