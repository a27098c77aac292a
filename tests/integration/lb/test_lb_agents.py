"""The load balancer in the running system: five real agents over the memory datapath (see
harness.py). Clients on two hosts, members on three: spread by weight, replies as the VIP,
connections keeping their member through member changes, UDP with source-IP persistence,
hairpin, and health monitoring by the agents (probers chosen per member, removal and
recovery timing, a dead prober replaced)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from hivenet.agent.health import member_health_key
from hivenet.model import Member, OperatingStatus
from hivenet.sim.loadbalancer import choose_probers
from tests.integration.lb.harness import (
    ACK,
    HOSTS,
    VIP,
    VM_HOSTS,
    VM_IPS,
    WEB_PORT,
    LbCloud,
    build,
    eventually,
    ip,
    lb_cloud,
    run,
)


def open_connections(
    c: LbCloud, count: int, start: int, clients: tuple[str, ...] = ("c1", "c2")
) -> dict[tuple[str, int], str]:
    """`count` SYNs from `clients` in turn; (client, sport) -> the member that got it."""
    chosen: dict[tuple[str, int], str] = {}
    for n in range(count):
        client = clients[n % len(clients)]
        c.send(client, c.client_tcp(client, start + n))
        arrived = [(vm, m) for vm, matches in c.arrivals().items() for m in matches]
        assert len(arrived) == 1, (client, start + n, arrived, c.drops("h4"), c.drops("h5"))
        vm, match = arrived[0]
        assert (match.ip_src, match.tp_src) == (ip(VM_IPS[client]), start + n)
        assert (match.ip_dst, match.tp_dst) == (ip(VM_IPS[vm]), WEB_PORT)
        chosen[(client, start + n)] = vm
    return chosen


def test_vip_spreads_by_weight_replies_come_from_the_vip_and_connections_stick(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with lb_cloud(tmp_path) as c:
            await build(c, weights={"m1": 1, "m2": 2, "m3": 3})
            connections = open_connections(c, 600, 20000)
            counts = Counter(connections.values())
            for vm, weight in (("m1", 1), ("m2", 2), ("m3", 3)):
                assert abs(counts[vm] / 600 - weight / 6) < 0.06, counts
            # The member's reply, simulated on the member's host, leaves as the VIP (the
            # ingress host pushed the DNAT binding there before the SYN).
            (client, sport), vm = next(iter(connections.items()))
            c.send(vm, c.member_tcp(vm, client, sport))
            (reply,) = c.received(client)
            assert (reply.ip_src, reply.tp_src) == (ip(VIP), 80)
            assert (reply.ip_dst, reply.tp_dst) == (ip(VM_IPS[client]), sport)

            # Remove m3 and add weight to m1: live connections keep their member (their
            # flows are invalidated by the pool tag and re-simulated into the same binding).
            await c.repo.delete(Member, "web-m3")
            await c.repo.modify(Member, "web-m1", lambda m: m.model_copy(update={"weight": 4}))
            await c.synced()
            for (client, sport), vm in list(connections.items())[:60]:
                if vm == "m3":
                    continue
                c.send(client, c.client_tcp(client, sport, ACK))
                arrived = {v: m for v, m in c.arrivals().items() if m}
                assert list(arrived) == [vm], (client, sport, vm, arrived)
                c.send(vm, c.member_tcp(vm, client, sport, ACK))
                (back,) = c.received(client)
                assert back.ip_src == ip(VIP)
            # New flows see the new table only: no m3, m1 takes most.
            after = Counter(open_connections(c, 200, 30000).values())
            assert after["m3"] == 0 and after["m1"] > after["m2"]
            # Re-added, m3 takes new flows again.
            await c.repo.create(
                Member(
                    id="web-m3",
                    pool_id="web",
                    address=VM_IPS["m3"],  # type: ignore[arg-type]
                    protocol_port=WEB_PORT,
                    weight=3,
                )
            )
            await c.synced()
            assert Counter(open_connections(c, 200, 31000).values())["m3"] > 0

    run(scenario())


def test_udp_vip_with_source_ip_persistence_and_hairpin(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with lb_cloud(tmp_path) as c:
            await build(c)
            for client in ("c1", "c2"):
                reached = set()
                for sport in range(5000, 5030):
                    c.send(client, c.client_udp(client, sport))
                    arrived = [(vm, m) for vm, matches in c.arrivals().items() for m in matches]
                    assert len(arrived) == 1
                    vm, match = arrived[0]
                    assert (match.ip_dst, match.tp_dst) == (ip(VM_IPS[vm]), 5353)
                    reached.add(vm)
                assert len(reached) == 1, (client, reached)  # one member per source address

            # A member calling its own VIP: SNATed to the router on the way in, so the reply
            # comes back through the router and leaves as the VIP. (The first SYN waits for
            # the member's host to lease a port block of 10.0.2.1.)
            c.send("m1", c.member_vip_tcp("m1", 7000))
            await eventually(lambda: bool(c.agents["h1"].flowstate.allocator.blocks))
            hits: dict[str, int] = {}
            for sport in range(7000, 7040):
                c.send("m1", c.member_vip_tcp("m1", sport))
                arrived = [(vm, m) for vm, matches in c.arrivals().items() for m in matches]
                assert len(arrived) == 1, (sport, arrived, c.drops("h1"))
                vm, match = arrived[0]
                assert match.ip_src == ip("10.0.2.1")
                hits[vm] = hits.get(vm, 0) + 1
                c.send(vm, c.member_reply_to_router(vm, match.tp_src))
                (answer,) = c.received("m1")
                assert (answer.ip_src, answer.tp_src) == (ip(VIP), 80)
                assert (answer.ip_dst, answer.tp_dst) == (ip(VM_IPS["m1"]), sport)
            assert "m1" in hits  # it reached itself too

    run(scenario())


def test_health_monitors_remove_and_restore_members_and_survive_a_prober_death(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with lb_cloud(tmp_path) as c:
            monitor = {"delay": 2, "timeout": 1, "max_retries": 2, "max_retries_down": 3}
            await build(c, monitor=monitor)
            # (While agents were still starting, the earlier ones saw fewer live hosts and
            # probed more members: right then, stopped once the others were seen.)
            await eventually(
                lambda: all(a.live_hosts | {h} == set(HOSTS) for h, a in c.agents.items())
            )
            await c.advance(2.0)
            c.probe_log.clear()
            await c.advance(2.0)
            # Each member is probed by exactly its two rendezvous-chosen hosts.
            await eventually(lambda: {m for _, m in c.probe_log} == {"web-m1", "web-m2", "web-m3"})
            for member_id in ("web-m1", "web-m2", "web-m3"):
                probers = {h for h, m in c.probe_log if m == member_id}
                assert probers == set(choose_probers(member_id, HOSTS, 2)), member_id
            for agent in c.agents.values():
                await eventually(
                    lambda a=agent: a.health.observed("web-m2") is OperatingStatus.ONLINE
                )
            # Stop m2's service: down everywhere within delay x retries_down (+1 s).
            c.down.add("m2")
            await c.advance(2 * 3 + 1.0)
            for agent in c.agents.values():
                await eventually(
                    lambda a=agent: a.health.observed("web-m2") is OperatingStatus.OFFLINE,
                    timeout=2.0,
                )
            counts = Counter(open_connections(c, 100, 40000).values())
            assert counts["m2"] == 0 and counts["m1"] and counts["m3"]

            # Kill one of m2's probers: its report vanishes with its lease, the next-ranked
            # live host takes over, and m2 stays down.
            probers = choose_probers("web-m2", HOSTS, 2)
            victim = next(h for h in probers if h != "h2")
            await c.kill_agent(victim)
            # Whatever ran on the dead host is gone too: its member's probes now fail.
            dead_vms = {vm for vm, host in VM_HOSTS.items() if host == victim}
            c.down.update(vm for vm in dead_vms if vm.startswith("m"))
            clients = tuple(client for client in ("c1", "c2") if client not in dead_vms)
            watcher = c.agents[f"h{5 if victim != 'h5' else 4}"]
            survivors = set(HOSTS) - {victim}
            successor = (set(choose_probers("web-m2", survivors, 2)) - set(probers)).pop()
            await c.advance(3.0)  # past the 2 s lease on the shared clock: the victim's expires
            await eventually(
                lambda: (
                    all(victim not in a.live_hosts for a in c.agents.values())
                    and victim not in watcher.health.reports.get("web-m2", {})
                ),
            )
            c.probe_log.clear()
            await c.advance(2 * 3 + 1.0)
            await eventually(lambda: (successor, "web-m2") in c.probe_log)
            await eventually(
                lambda: (
                    c.agents[successor].health.probing["web-m2"].published
                    is OperatingStatus.OFFLINE
                )
            )
            assert (await c.store.get(member_health_key(successor, "web-m2"))) is not None
            assert watcher.health.observed("web-m2") is OperatingStatus.OFFLINE

            # Restart m2's service: back after max_retries successes, and takes new flows.
            c.down.discard("m2")
            await c.advance(2 * 2 + 1.0)
            for agent in c.agents.values():
                await eventually(
                    lambda a=agent: a.health.observed("web-m2") is OperatingStatus.ONLINE,
                    timeout=2.0,
                )
            # (A flow sent to the dead host's member would be dropped at ingress and fail
            # open_connections: health removed that member too.)
            counts = Counter(open_connections(c, 100, 41000, clients).values())
            assert counts["m2"] > 0

    run(scenario())
