"""Load-balancer status write-back and statistics with five real agents over one real store
(see harness.py): operating status follows the probes (written once per change, by one agent,
and nothing is written while nothing changes), per-host counters count connections per member
and bytes exactly, and the API's sum drops a dead host's report."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

from hivenet.api.lbstats import load_balancer_stats
from hivenet.model import OperatingStatus, Pool
from hivenet.model.loadbalancer import HealthMonitor, LoadBalancer, Member
from hivenet.model.topology import TOPOLOGY_PREFIX
from hivenet.store.keys import lb_stats_key
from tests.integration.lb.harness import ACK, HOSTS, LbCloud, build, eventually, lb_cloud, run

MONITOR = {"delay": 2, "timeout": 1, "max_retries": 2, "max_retries_down": 3}
WEB_MEMBERS = ("web-m1", "web-m2", "web-m3")


async def statuses(c: LbCloud) -> dict[str, OperatingStatus]:
    out: dict[str, OperatingStatus] = {}
    for member_id in WEB_MEMBERS:
        out[member_id] = (await c.repo.get(Member, member_id)).obj.operating_status
    out["web"] = (await c.repo.get(Pool, "web")).obj.operating_status
    out["lb1"] = (await c.repo.get(LoadBalancer, "lb1")).obj.operating_status
    return out


async def converge(c: LbCloud, want: dict[str, OperatingStatus], seconds: float) -> None:
    """Advance the probes' clock until the stored statuses are `want`."""
    loop_deadline = seconds
    while (await statuses(c)) != want:
        if loop_deadline <= 0:
            raise AssertionError(f"statuses {await statuses(c)} never became {want}")
        await c.advance(0.5)
        loop_deadline -= 0.5


def expected(
    m1: OperatingStatus,
    m2: OperatingStatus,
    m3: OperatingStatus,
    pool: OperatingStatus,
    lb: OperatingStatus,
) -> dict[str, OperatingStatus]:
    return {"web-m1": m1, "web-m2": m2, "web-m3": m3, "web": pool, "lb1": lb}


ON, OFF, DEG, NOMON = (
    OperatingStatus.ONLINE,
    OperatingStatus.OFFLINE,
    OperatingStatus.DEGRADED,
    OperatingStatus.NO_MONITOR,
)


def test_status_follows_probes_written_once_without_write_loop(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with lb_cloud(tmp_path) as c:
            await build(c, monitor=MONITOR)
            # The dns pool has no monitor: only the web pool decides the load balancer.
            await c.repo.delete(Pool, "dns", cascade=True)
            await eventually(
                lambda: all(a.live_hosts | {h} == set(HOSTS) for h, a in c.agents.items())
            )
            await converge(c, expected(ON, ON, ON, ON, ON), 10)

            # Every write to a member, pool or load balancer from here on, in order.
            history: dict[str, list[str]] = {}
            start_revision = await c.store.current_revision() + 1
            writes_before = sum(a.lb_status.counters.writes for a in c.agents.values())

            async def follow() -> None:
                async for event in c.store.watch(TOPOLOGY_PREFIX, start_revision=start_revision):
                    kind, object_id = event.kv.key.rsplit("/", 2)[1:]
                    if kind in ("member", "pool", "load_balancer") and event.kv.value:
                        status = json.loads(event.kv.value)["operating_status"]
                        history.setdefault(object_id, []).append(status)

            watcher = asyncio.create_task(follow())
            # One member down: it goes OFFLINE, pool and load balancer DEGRADED.
            c.down.add("m2")
            await converge(c, expected(ON, OFF, ON, DEG, DEG), 10)
            # Everyone down: all OFFLINE.
            c.down.update({"m1", "m3"})
            await converge(c, expected(OFF, OFF, OFF, OFF, OFF), 10)
            # Recovery: all back.
            c.down.clear()
            await converge(c, expected(ON, ON, ON, ON, ON), 10)
            await asyncio.sleep(0.2)
            watcher.cancel()
            # Written once per change: every write changed the status (no write repeated a
            # value, whoever made it), and members changed exactly twice.
            assert set(history) == {*WEB_MEMBERS, "web", "lb1"}, history
            for values in history.values():
                assert all(a != b for a, b in itertools.pairwise(values)), history
            assert history["web-m2"] == ["offline", "online"]
            assert history["web-m1"] == history["web-m3"] == ["offline", "online"]
            assert history["web"][:2] == ["degraded", "offline"] and history["web"][-1] == "online"
            writes = sum(a.lb_status.counters.writes for a in c.agents.values()) - writes_before
            # One writer per object: no agent made a write another had made already.
            assert writes == sum(len(v) for v in history.values()), (writes, history)

            # Quiet period: probes keep running and succeeding, nothing is written at all.
            revision = await c.store.current_revision()
            passes = sum(a.lb_status.counters.passes for a in c.agents.values())
            await c.advance(8.0)
            for agent in c.agents.values():
                agent.lb_status.wake()
            await c.advance(1.0)
            assert sum(a.lb_status.counters.passes for a in c.agents.values()) > passes
            assert await c.store.current_revision() == revision

            # A status-only change invalidates the pool's flows and nothing else.
            agent = c.agents["h4"]
            member = agent.topology.get("member", "web-m1")
            assert isinstance(member, Member)
            tags = agent.topology.apply(member.model_copy(update={"operating_status": OFF}))
            assert tags == {"member:web-m1", "lb-pool:web"}
            agent.topology.apply(member)

            # No health monitor any more: the agents' statuses are reset to NO_MONITOR.
            await c.repo.delete(HealthMonitor, "web-hm")
            await converge(c, expected(NOMON, NOMON, NOMON, NOMON, NOMON), 5)

    run(scenario())


def test_a_member_without_monitor_keeps_its_default_status(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with lb_cloud(tmp_path) as c:
            await build(c)
            await c.advance(3.0)
            for agent in c.agents.values():
                agent.lb_status.wake()
            await c.advance(1.0)
            assert await statuses(c) == expected(NOMON, NOMON, NOMON, NOMON, NOMON)
            assert sum(a.lb_status.counters.writes for a in c.agents.values()) == 0
            # Admin down is OFFLINE, whatever monitors say; back up, the default again.
            await c.repo.modify(
                Member, "web-m1", lambda m: m.model_copy(update={"admin_state_up": False})
            )
            await eventually(
                lambda: c.agents["h1"].topology.get("member", "web-m1").operating_status is OFF  # type: ignore[union-attr]
            )
            await c.repo.modify(
                Member, "web-m1", lambda m: m.model_copy(update={"admin_state_up": True})
            )
            await eventually(
                lambda: c.agents["h1"].topology.get("member", "web-m1").operating_status is NOMON  # type: ignore[union-attr]
            )

    run(scenario())


def test_stats_count_connections_per_member_and_bytes_and_drop_dead_hosts(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with lb_cloud(tmp_path) as c:
            await build(c)
            for agent in c.agents.values():
                agent.lb_stats.interval = 3600.0  # the test scans by hand
            chosen: dict[tuple[str, int], str] = {}
            bytes_in = {"c1": 0, "c2": 0}
            bytes_out = {"m1": 0, "m2": 0, "m3": 0}
            for n in range(12):
                client = ("c1", "c2")[n % 2]
                sport = 30000 + n
                c.send(client, c.client_tcp(client, sport))  # upcall: not counted
                arrived = [vm for vm, matches in c.arrivals().items() if matches]
                assert len(arrived) == 1
                member = arrived[0]
                chosen[(client, sport)] = member
                c.send(member, c.member_tcp(member, client, sport))  # upcall on its host
                for _ in range(3):  # these hit installed flows and count
                    frame = c.client_tcp(client, sport, ACK)
                    c.send(client, frame)
                    bytes_in[client] += len(frame)
                    reply = c.member_tcp(member, client, sport, ACK)
                    c.send(member, reply)
                    bytes_out[member] += len(reply)
                assert len(c.arrivals()[member]) == 3  # the ACKs reached the member
                assert len(c.received(client)) == 4  # SYN-ACK and ACKs, from the VIP
            c.arrivals()
            for vm in ("c1", "c2"):
                c.received(vm)
            for agent in c.agents.values():
                agent.lb_stats.tick(c.clock.now)
            await c.synced()

            stats = await load_balancer_stats(c.repo, "lb1")
            per_member = {f"web-{vm}": 0 for vm in ("m1", "m2", "m3")}
            for vm in chosen.values():
                per_member[f"web-{vm}"] += 1
            assert stats.active_connections == 12
            assert stats.total_connections == 12
            assert stats.bytes_in == sum(bytes_in.values())
            assert stats.bytes_out == sum(bytes_out.values())
            for member_id, count in per_member.items():
                assert stats.members[member_id].active_connections == count, member_id
                vm = member_id.removeprefix("web-")
                assert stats.members[member_id].bytes_out == bytes_out[vm]
            assert {
                m: s.active_connections for m, s in stats.members.items() if m.startswith("dns")
            } == {
                "dns-m1": 0,
                "dns-m2": 0,
                "dns-m3": 0,
            }
            members_used = {f"h{vm[1]}" for vm in chosen.values()}
            assert set(stats.hosts) == {"h4", "h5"} | members_used
            # Each host counts only what it originated: the member hosts hold the pushed
            # bindings too, but report no connection.
            for host in members_used:
                report = await c.store.get(lb_stats_key(host, "lb1"))
                assert report is not None and b'"active_connections":0' in report.value

            # Unchanged counters are not published again.
            revision = await c.store.current_revision()
            for agent in c.agents.values():
                agent.lb_stats.tick(c.clock.now)
            await c.synced()
            assert await c.store.current_revision() == revision

            # h5 dies: its report goes with its lease, and the sum with it.
            await c.kill_agent("h5")
            await c.advance(3.0)  # past the 2 s lease on the shared clock: h5's expires
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5.0
            while "h5" in (stats := await load_balancer_stats(c.repo, "lb1")).hosts:
                assert loop.time() < deadline, "h5's report outlived its lease"
                await asyncio.sleep(0.1)
            from_c1 = sum(1 for (client, _), _vm in chosen.items() if client == "c1")
            assert stats.active_connections == from_c1 == 6
            assert stats.bytes_in == bytes_in["c1"]

    run(scenario())
