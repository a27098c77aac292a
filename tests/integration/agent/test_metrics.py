"""Traffic counters of real agents (agent/metrics.py): counted on upcalls and from flow hits,
published per host, summed by the API's stats functions, and exposed to Prometheus (parsed by
the Prometheus client's own parser, also over the agent's HTTP endpoint)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hivenet.agent.metrics import MAX_DROP_REASONS, OTHER_REASON, agent_registry, serve_metrics
from hivenet.api.hoststats import live_host_reports, sum_port, sum_rule, sum_traffic
from hivenet.model import Chain, Port, Router, Rule, RuleAction
from hivenet.packets import build_arp_reply, build_echo_request
from hivenet.store.keys import host_stats_key
from tests.integration.agent.test_agents import (
    Cloud,
    _router_mac_for,
    cloud,
    received,
    routed_cloud,
)
from tests.integration.common import eventually, run


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Sample name -> {sorted label pairs: value} of one metric in an exposition."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def routed_traffic(c: Cloud) -> tuple[Port, Port, str]:
    """vm1 (h1) pings vm2 (h2) across the router once the router knows vm2: returns the
    ports and the gateway MAC."""
    vm1, vm2, _router, router_port_b = await routed_cloud(c)
    for host in ("h1", "h2"):
        await c.start_agent(host)
    await c.synced()
    gw_mac = _router_mac_for(c, vm1, "10.0.1.1", "h1")
    reply = build_arp_reply(
        sender_mac=vm2.mac,
        sender_ip="10.0.2.20",
        target_mac=router_port_b.mac,
        target_ip="10.0.2.1",
    )
    c.datapaths["h2"].receive(vm2.tunnel_key, reply)
    await c.synced()
    return vm1, vm2, gw_mac


def ping(vm1: Port, gw_mac: str, ip_dst: str, seq: int) -> bytes:
    return build_echo_request(
        eth_src=vm1.mac,
        eth_dst=gw_mac,
        ip_src="10.0.1.10",
        ip_dst=ip_dst,
        identifier=9,
        sequence=seq,
    )


def test_port_device_and_drop_counters_from_upcalls_and_flow_hits() -> None:
    async def scenario() -> None:
        async with cloud("memory://") as c:
            vm1, vm2, gw_mac = await routed_traffic(c)
            agent = c.agents["h1"]
            agent.host_stats_reporter.tick()
            before = agent.host_stats.report()["ports"].get(vm1.id, {})
            upcalls = agent.pipeline.stats.upcalls
            frames = [ping(vm1, gw_mac, "10.0.2.20", seq) for seq in range(5)]
            for frame in frames:
                c.datapaths["h1"].receive(vm1.tunnel_key, frame)
            assert len(received(c, "h2", vm2)) == 5
            assert agent.pipeline.stats.upcalls == upcalls + 1  # 4 hit the flow
            # A destination no route leads to: dropped by the router, twice.
            for seq in range(2):
                c.datapaths["h1"].receive(vm1.tunnel_key, ping(vm1, gw_mac, "192.0.2.99", seq))
            agent.host_stats_reporter.tick()
            report = agent.host_stats.report()
            port = report["ports"][vm1.id]
            assert port["rx_packets"] - before.get("rx_packets", 0) == 7
            assert port["rx_bytes"] - before.get("rx_bytes", 0) == sum(map(len, frames)) + 2 * len(
                frames[0]
            )
            assert port["drops"] - before.get("drops", 0) == 2
            assert report["ports"][vm2.id]["tx_packets"] == 5
            assert sum(report["drops"].values()) >= 2
            router_id = next(
                object_id for object_id, d in report["devices"].items() if d["kind"] == "router"
            )
            assert report["devices"][router_id]["packets"] >= 7

            # Published on each host's lease; the API sums the live hosts' reports.
            c.agents["h2"].host_stats_reporter.tick()
            await eventually(
                lambda: (
                    agent._published.get(host_stats_key("h1")) is not None
                    and json.loads(agent._published[host_stats_key("h1")]) == report
                    and host_stats_key("h2") in c.agents["h2"]._published
                )
            )
            reports = await live_host_reports(c.repo)
            assert set(reports) == {"h1", "h2"}
            summed = sum_port(vm1.id, reports)
            assert summed.rx_packets == port["rx_packets"] and summed.hosts == ["h1"]
            assert sum_traffic("router", router_id, reports).packets >= 7

            # A stopped host's report drops out with its lease.
            await c.agents.pop("h1").stop()
            assert set(await live_host_reports(c.repo)) == {"h2"}

    run(scenario())


def test_prometheus_exposition_parses_and_is_served() -> None:
    async def scenario() -> None:
        async with cloud("memory://") as c:
            vm1, _vm2, gw_mac = await routed_traffic(c)
            agent = c.agents["h1"]
            for seq in range(3):
                c.datapaths["h1"].receive(vm1.tunnel_key, ping(vm1, gw_mac, "10.0.2.20", seq))
            agent.host_stats_reporter.tick()
            text = generate_latest(agent_registry(agent)).decode()
            rx = samples(text, "hivenet_port_rx_packets_total")
            mine = [value for labels, value in rx.items() if ("port", vm1.id) in labels]
            assert mine == [agent.host_stats.ports[vm1.id].rx.packets]
            labels = dict(next(labels for labels in rx if ("port", vm1.id) in labels))
            assert labels["host"] == "h1" and labels["tenant"] == vm1.tenant_id
            assert labels["device"] == vm1.device_id
            assert samples(text, "hivenet_upcalls_total")[(("host", "h1"),)] >= 1
            assert (("host", "h1"), ("table", "conntrack")) in samples(
                text, "hivenet_flowstate_entries"
            )

            server = await serve_metrics(agent_registry(agent), "127.0.0.1", 0)
            try:
                port = server.sockets[0].getsockname()[1]
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                response = (await reader.read()).decode()
                writer.close()
                head, _, body = response.partition("\r\n\r\n")
                assert head.startswith("HTTP/1.1 200")
                assert samples(body, "hivenet_port_rx_packets_total") == rx
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /other HTTP/1.1\r\n\r\n")
                assert (await reader.read()).startswith(b"HTTP/1.1 404")
                writer.close()
            finally:
                server.close()
                await server.wait_closed()

    run(scenario())


def test_counters_forget_deleted_ports_and_cap_drop_reasons() -> None:
    async def scenario() -> None:
        async with cloud("memory://") as c:
            vm1, _vm2, gw_mac = await routed_traffic(c)
            agent = c.agents["h1"]
            c.datapaths["h1"].receive(vm1.tunnel_key, ping(vm1, gw_mac, "10.0.2.20", 1))
            agent.host_stats_reporter.tick()
            assert vm1.id in agent.host_stats.ports
            stats = agent.host_stats
            result = agent.pipeline.last_result
            assert result is not None
            for index in range(MAX_DROP_REASONS + 10):
                dropped = dataclasses.replace(
                    result, drop_reason=f"reason{index}: detail {index}", install=False
                )
                stats.on_simulated(vm1.id, dropped, 60, None)
            stats.scan()  # the upcall path only queues; the scan counts
            assert len(stats.drops) == MAX_DROP_REASONS + 1  # the named ones and "other"
            assert stats.drops[OTHER_REASON] >= 10
            assert "reason0" in stats.drops  # the reason's first word, not its detail
            await c.repo.delete(Port, vm1.id)
            await c.synced()
            agent.host_stats_reporter.tick()
            assert vm1.id not in agent.host_stats.ports

    run(scenario())


def test_rule_hits_from_upcalls_and_flow_hits() -> None:
    async def scenario() -> None:
        async with cloud("memory://") as c:
            vm1, vm2, gw_mac = await routed_traffic(c)
            chain = (await c.repo.create(Chain(name="router-in"))).obj
            icmp = (
                await c.repo.create(
                    Rule(chain_id=chain.id, position=1, action=RuleAction.ACCEPT, nw_proto=1)
                )
            ).obj
            other = (
                await c.repo.create(
                    Rule(chain_id=chain.id, position=2, action=RuleAction.ACCEPT, nw_proto=17)
                )
            ).obj
            router = next(r for r in c.agents["h1"].topology.all("router"))
            await c.repo.modify(
                Router, router.id, lambda r: r.model_copy(update={"inbound_chain_id": chain.id})
            )
            await c.synced()
            agent = c.agents["h1"]
            for seq in range(5):
                c.datapaths["h1"].receive(vm1.tunnel_key, ping(vm1, gw_mac, "10.0.2.20", seq))
            assert len(received(c, "h2", vm2)) == 5
            agent.host_stats_reporter.tick()
            rules = agent.host_stats.report()["rules"]
            assert rules[icmp.id] == {"chain": chain.id, "hits": 5}
            assert other.id not in rules
            await eventually(
                lambda: (
                    json.loads(agent._published.get(host_stats_key("h1"), b"{}")).get("rules")
                    == rules
                )
            )
            assert sum_rule(icmp.id, await live_host_reports(c.repo)).hits == 5
            text = generate_latest(agent_registry(agent)).decode()
            hits = samples(text, "hivenet_rule_hits_total")
            assert [v for labels, v in hits.items() if ("rule", icmp.id) in labels] == [5.0]

    run(scenario())


def test_upcall_budget_and_kernel_drops_are_exposed_per_bound_port() -> None:
    """The datapath's `port.<key>.upcall_budget_drops` becomes a per-port counter labelled
    with the port id (the memory datapath has no budget: its counters are stood in for)."""

    async def scenario() -> None:
        async with cloud("memory://") as c:
            vm1, _vm2, _gw_mac = await routed_traffic(c)
            agent = c.agents["h1"]
            datapath = c.datapaths["h1"]
            plain = datapath.counters
            key = agent.bound_ports[vm1.id][0]
            datapath.counters = lambda: {  # type: ignore[method-assign]
                **plain(),
                f"port.{key}.upcall_budget_drops": 41,
                f"port.{key}.rx_kernel_drops": 7,
            }
            text = generate_latest(agent_registry(agent)).decode()
            drops = samples(text, "hivenet_port_upcall_budget_drops_total")
            assert list(drops.values()) == [41]
            labels = dict(next(iter(drops)))
            assert labels["port"] == vm1.id and labels["device"] == vm1.device_id
            kernel = samples(text, "hivenet_port_rx_kernel_drops_total")
            assert kernel == {next(iter(drops)): 7}

    run(scenario())


def test_datapath_drop_reasons_are_exposed_by_label() -> None:
    """The datapath's own `drop.<reason>` counters become `hivenet_datapath_drops{reason}`:
    every packet an installed drop flow dropped is counted there by the flow's reason (its
    first word); free-text reasons share one label and the labels are capped."""

    async def scenario() -> None:
        async with cloud("memory://") as c:
            vm1, _vm2, gw_mac = await routed_traffic(c)
            agent = c.agents["h1"]
            datapath = c.datapaths["h1"]
            before = datapath.counters().get("drop.flow_no_route", 0)
            for seq in range(3):  # no route: simulated once, its drop flow executes all three
                datapath.receive(vm1.tunnel_key, ping(vm1, gw_mac, "192.0.2.99", seq))
            assert datapath.counters()["drop.flow_no_route"] - before == 3
            text = generate_latest(agent_registry(agent)).decode()
            exposed = samples(text, "hivenet_datapath_drops_total")
            assert {dict(labels)["host"] for labels in exposed} == {"h1"}
            by_reason = {dict(labels)["reason"]: value for labels, value in exposed.items()}
            assert by_reason["flow_no_route"] == datapath.counters()["drop.flow_no_route"]
            assert by_reason["flow_no_route"] >= 3, by_reason

            plain = datapath.counters
            datapath.counters = lambda: {  # type: ignore[method-assign]
                **plain(),
                **{f"drop.flow_rule:chain-{n} matched": 1 for n in range(MAX_DROP_REASONS + 5)},
            }
            text = generate_latest(agent_registry(agent)).decode()
            capped = {
                dict(labels)["reason"]: value
                for labels, value in samples(text, "hivenet_datapath_drops_total").items()
            }
            # One label for all the rule texts (their first word), so nothing reaches the cap.
            assert capped["flow_rule"] == MAX_DROP_REASONS + 5
            assert len(capped) <= MAX_DROP_REASONS + 1

    run(scenario())
