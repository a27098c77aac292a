"""Megaflow soundness: on random topologies, tables and packets, every packet that hits an
installed wildcard flow gets exactly what a fresh simulation would give it -- also after
random topology and table changes that invalidate flows by tag."""

from __future__ import annotations

import dataclasses
import ipaddress
from operator import and_
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivenet.flows.table import FlowTable, flow_match_values
from hivenet.model import FixedIp, Port, PortRange, RouteType, RuleAction, Subnet
from hivenet.model.types import mac_to_int
from hivenet.packets import build_arp_reply, extract_flow_match
from hivenet.sim import MemoryTables
from hivenet.sim import rules as rules_module
from tests.unit.sim.topo import Sim, Topo, arp_who_has, mac, ping, tcp, udp

VM_PORTS = ("vm1", "vm2", "vm3", "vm4", "vm5")
CHAINS = ("c0", "c1", "c2")
ROUTER_MACS = {"r1-b1": mac(101), "r1-b2": mac(102), "r2-b2": mac(103), "r2-b3": mac(104)}
EXTRA_ROUTES = ("10.9.0.0/16", "10.9.9.0/24", "0.0.0.0/0", "192.168.0.0/16")
IPS = (
    "10.0.1.10",
    "10.0.1.11",
    "10.0.2.10",
    "10.0.2.11",
    "10.0.3.10",
    "10.0.1.1",
    "10.0.2.1",
    "10.9.9.1",
    "10.9.1.1",
    "192.168.1.1",
    "8.8.8.8",
)
NEIGHBOURS = (
    "10.0.1.10",
    "10.0.1.11",
    "10.0.2.10",
    "10.0.2.11",
    "10.0.2.2",
    "10.0.2.100",
    "10.0.2.101",
    "10.0.3.10",
    "10.0.2.1",
)


@st.composite
def rule_kwargs(draw: st.DrawFn, chain_id: str, one_in: int = 6) -> dict[str, Any]:
    """A random rule of `chain_id`; each header condition set with probability 1/`one_in`."""
    action = draw(st.sampled_from(["accept", "drop", "reject", "continue", "return", "jump"]))
    kw: dict[str, Any] = {
        "chain_id": chain_id,
        "action": action,
        "position": draw(st.integers(0, 5)),
    }
    if action == "jump":
        kw["jump_chain_id"] = draw(st.sampled_from([c for c in CHAINS if c != chain_id]))
    options: dict[str, st.SearchStrategy[Any]] = {
        "nw_src": st.sampled_from(
            [ipaddress.ip_network(n) for n in ("10.0.1.0/24", "10.0.0.0/8", "10.0.1.10/32")]
        ),
        "nw_dst": st.sampled_from(
            [ipaddress.ip_network(n) for n in ("10.0.2.0/24", "10.9.0.0/16")]
        ),
        "nw_proto": st.sampled_from([1, 6, 17]),
        "tp_dst": st.sampled_from([PortRange(start=22, end=22), PortRange(start=0, end=79)]),
        "tp_src": st.sampled_from([PortRange(start=1000, end=1000), PortRange(start=0, end=2000)]),
        "dl_src": st.sampled_from([mac(1), mac(2), mac(101)]),
        "dl_dst": st.sampled_from([mac(2), mac(101), "ff:ff:ff:ff:ff:ff"]),
        "dl_type": st.sampled_from([0x0800, 0x0806]),
        "icmp_type": st.sampled_from([8, 0]),
        "in_port_ids": st.sampled_from([("vm1",), ("vm3", "r1-b2")]),
        "port_group_id": st.just("pg"),
        "vlan_id": st.just(10),
    }
    for name, strategy in options.items():
        if draw(st.integers(0, one_in - 1)) == 0:
            kw[name] = draw(strategy)
            if draw(st.integers(0, 3)) == 0:
                flag = {
                    "dl_src": "inv_dl_src",
                    "dl_dst": "inv_dl_dst",
                    "icmp_type": "inv_icmp",
                    "in_port_ids": "inv_in_port",
                    "port_group_id": "inv_port_group",
                    "vlan_id": "inv_vlan",
                }.get(name, f"inv_{name}")
                kw[flag] = True
    if "nw_src" in kw and "nw_dst" in kw and kw["nw_src"].version != kw["nw_dst"].version:
        del kw["nw_dst"]
    return kw


@st.composite
def topologies(draw: st.DrawFn) -> Topo:
    topo = Topo()
    for chain_id in CHAINS:
        topo.chain(chain_id)
        for _ in range(draw(st.integers(0, 2))):
            kw = draw(rule_kwargs(chain_id))
            topo.rule(kw.pop("chain_id"), kw.pop("action"), **kw)
    chain = st.sampled_from([None] * 8 + list(CHAINS))
    for bridge_id in ("b1", "b2", "b3"):
        topo.bridge(
            bridge_id,
            inbound_chain_id=draw(chain),
            outbound_chain_id=draw(chain),
            arp_proxy=draw(st.booleans()),
        )
    for router_id in ("r1", "r2"):
        topo.router(router_id, inbound_chain_id=draw(chain), outbound_chain_id=draw(chain))
    # DHCP at port ingress: subnets with DHCP on or off, VM ports with or without fixed IPs.
    for index, bridge_id in enumerate(("b1", "b2", "b3"), 1):
        topo.add(
            Subnet.model_validate(
                {
                    "id": f"s-{bridge_id}",
                    "bridge_id": bridge_id,
                    "cidr": f"10.0.{index}.0/24",
                    "enable_dhcp": draw(st.booleans()),
                }
            )
        )
    hosts = st.sampled_from(["h1", "h1", "h2", None])
    for n, (port_id, bridge_id) in enumerate(
        zip(VM_PORTS, ("b1", "b1", "b2", "b2", "b3"), strict=True), 1
    ):
        address = f"10.0.{min(n, 5) // 2 + (n == 1)}.{10 + n}"
        fixed = FixedIp(subnet_id=f"s-{bridge_id}", ip_address=ipaddress.ip_address(address))
        topo.vm_port(
            bridge_id,
            port_id,
            draw(hosts) if n > 1 else "h1",
            mac_n=n,
            addresses=(f"{address}/24",),
            fixed_ips=(fixed,) if draw(st.booleans()) else (),
            vlan_id=draw(st.sampled_from([None, None, 10])) if bridge_id == "b1" else None,
            admin_state_up=draw(st.integers(0, 15)) != 15,  # hypothesis favours 0
            inbound_chain_id=draw(chain),
            outbound_chain_id=draw(chain),
            port_group_ids=("pg",) if draw(st.booleans()) else (),
        )
    for bridge_id, router_id, cidr in (
        ("b1", "r1", "10.0.1.1/24"),
        ("b2", "r1", "10.0.2.1/24"),
        ("b2", "r2", "10.0.2.2/24"),
        ("b3", "r2", "10.0.3.1/24"),
    ):
        _link_bridge, link_router = topo.link(bridge_id, router_id, cidr)
        topo.ports[link_router.id] = topo.add(
            link_router.model_copy(
                update={
                    "mac": ROUTER_MACS[link_router.id],
                    "inbound_chain_id": draw(chain),
                    "outbound_chain_id": draw(chain),
                }
            )
        )
        topo.objects.remove(link_router)
    topo.route("r1", "10.0.3.0/24", "r1-b2", gw="10.0.2.2")
    topo.route("r2", "0.0.0.0/0", "r2-b2", gw="10.0.2.1")
    for dst in EXTRA_ROUTES:
        kind = draw(st.sampled_from(["none", "normal", "ecmp", "blackhole", "reject"]))
        weight = draw(st.integers(1, 3))
        if kind in ("normal", "ecmp"):
            topo.route("r1", dst, "r1-b2", gw="10.0.2.100", weight=weight)
            if kind == "ecmp":
                topo.route("r1", dst, "r1-b2", gw="10.0.2.101", weight=weight)
        elif kind != "none":
            topo.special_route("r1", dst, RouteType(kind), weight=weight)
    topo.zone({"h1": "192.0.2.1", "h2": "192.0.2.2"})
    return topo


def packet_fields() -> dict[str, st.SearchStrategy[Any]]:
    """Every knob of a test packet, each from a small universe (hypothesis favours the first
    element of `sampled_from`, so the common case comes first)."""
    return {
        "in_port": st.sampled_from(VM_PORTS),
        "own_mac": st.sampled_from([True, True, True, False]),
        "src_mac": st.integers(1, 5).map(mac),
        "dst_mac": st.sampled_from(
            [
                ROUTER_MACS["r1-b1"],
                mac(2),
                ROUTER_MACS["r1-b2"],
                mac(3),
                mac(1),
                mac(4),
                mac(9),
                ROUTER_MACS["r2-b2"],
                ROUTER_MACS["r2-b3"],
                "ff:ff:ff:ff:ff:ff",
            ]
        ),
        "src": st.sampled_from(IPS[:5]),
        "dst": st.sampled_from(IPS[2:] + IPS[:2]),
        "kind": st.sampled_from(["udp", "udp", "udp", "tcp", "ping", "arp", "arp_reply"]),
        "ttl": st.sampled_from([64, 2, 1, 3, 65]),
        "vlan": st.sampled_from([0, 0, 0, 0, 0, 10]),
        "sport": st.sampled_from([1000, 1001, 2000]),
        "dport": st.sampled_from([22, 80, 81, 67, 68, 3]),
        "flags": st.sampled_from([0x02, 0x10, 0x04]),
    }


@st.composite
def packet_specs(draw: st.DrawFn) -> dict[str, Any]:
    return {name: draw(strategy) for name, strategy in packet_fields().items()}


@st.composite
def variants(draw: st.DrawFn, bases: list[dict[str, Any]]) -> dict[str, Any]:
    """A base packet with 0-2 fields redrawn: the neighbours of cached flows are where an
    unsound wildcard shows."""
    spec = dict(draw(st.sampled_from(bases)))
    if draw(st.integers(0, 3)) == 0:
        return spec  # an exact repeat
    knobs = packet_fields()
    for name in draw(st.lists(st.sampled_from(sorted(knobs)), min_size=1, max_size=2)):
        spec[name] = draw(knobs[name])
    return spec


def build(spec: dict[str, Any]) -> tuple[str, bytes]:
    in_port = spec["in_port"]
    src_mac = mac(VM_PORTS.index(in_port) + 1) if spec["own_mac"] else spec["src_mac"]
    dst_mac, src, dst, kind = spec["dst_mac"], spec["src"], spec["dst"], spec["kind"]
    common: dict[str, Any] = {"ttl": spec["ttl"], "vlan": spec["vlan"]}
    if kind == "udp":
        frame = udp(src_mac, dst_mac, src, dst, sport=spec["sport"], dport=spec["dport"], **common)
    elif kind == "tcp":
        frame = tcp(
            src_mac,
            dst_mac,
            src,
            dst,
            sport=spec["sport"],
            dport=spec["dport"],
            flags=spec["flags"],
            **common,
        )
    elif kind == "ping":
        frame = ping(src_mac, dst_mac, src, dst, **common)
    elif kind == "arp":
        frame = arp_who_has(src_mac, src, dst)
    else:
        frame = build_arp_reply(
            sender_mac=src_mac, sender_ip=src, target_mac=dst_mac, target_ip=dst
        )
    return in_port, frame


@st.composite
def table_states(draw: st.DrawFn) -> MemoryTables:
    tables = MemoryTables()
    for ip in NEIGHBOURS:
        for router_id in ("r1", "r2"):
            if draw(st.integers(0, 4)) != 4:
                tables.neighbours[(router_id, 4, int(ipaddress.IPv4Address(ip)))] = mac_to_int(
                    mac(draw(st.integers(1, 4)))
                    if not ip.endswith((".1", ".2"))
                    else ROUTER_MACS["r2-b2"]
                )
    for n in range(1, 6):
        if draw(st.booleans()):
            tables.macs[("b1", draw(st.sampled_from([0, 10])), mac_to_int(mac(n)))] = draw(
                st.sampled_from(VM_PORTS)
            )
    return tables


def mutate(draw: st.DrawFn, topo: Topo, sim: Sim) -> frozenset[str]:
    """One random change to topology or tables; returns the tags it invalidates."""
    view = sim.view
    choice = draw(st.integers(0, 6))
    if choice == 0:
        routes = [r for r in view.all("route")]
        if routes:
            victim = draw(st.sampled_from(sorted(routes, key=lambda r: r.id)))
            return view.remove("route", victim.id)
    if choice == 1:
        port = view.ports[draw(st.sampled_from(VM_PORTS))].port
        return view.apply(port.model_copy(update={"admin_state_up": not port.admin_state_up}))
    if choice == 2:
        chain_id = draw(st.sampled_from(CHAINS))
        kw = draw(rule_kwargs(chain_id))
        from hivenet.model import Rule

        return view.apply(
            Rule(chain_id=kw.pop("chain_id"), action=RuleAction(kw.pop("action")), **kw)
        )
    if choice == 3:
        rules = sorted(view.all("rule"), key=lambda r: r.id)
        if rules:
            return view.remove("rule", draw(st.sampled_from(rules)).id)
    if choice == 4:
        ip = int(ipaddress.IPv4Address(draw(st.sampled_from(NEIGHBOURS))))
        tag = sim.tables.forget_neighbour("r1", 4, ip)
        return frozenset({tag} if tag else set())
    if choice == 6:
        subnet = view.objects["subnet"][draw(st.sampled_from(["s-b1", "s-b2", "s-b3"]))]
        assert isinstance(subnet, Subnet)
        return view.apply(subnet.model_copy(update={"enable_dhcp": not subnet.enable_dhcp}))
    n = draw(st.integers(1, 5))
    tag = sim.tables.forget_mac("b1", 0, mac_to_int(mac(n)))
    return frozenset({tag} if tag else set())


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(topo=topologies(), tables=table_states(), data=st.data())
def test_cached_flows_give_what_a_fresh_simulation_gives(
    topo: Topo, tables: MemoryTables, data: st.DataObject
) -> None:
    check_cached_flows(topo, tables, data)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(topo=topologies(), tables=table_states(), data=st.data())
def test_cached_flows_are_sound_with_dispatched_chain_matchers(
    topo: Topo, tables: MemoryTables, data: st.DataObject
) -> None:
    """The same property with every chain, however short, compiled to the matcher dispatched
    by protocol and destination port (`sim/rules.py`), as the view compiles them also after
    rule changes."""
    saved = rules_module.DISPATCH_MIN_RULES
    rules_module.DISPATCH_MIN_RULES = 1
    try:
        check_cached_flows(topo, tables, data)
    finally:
        rules_module.DISPATCH_MIN_RULES = saved


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(topo=topologies(), tables=table_states(), data=st.data())
def test_cached_flows_are_sound_with_precise_chain_reads(
    topo: Topo, tables: MemoryTables, data: st.DataObject
) -> None:
    """The same property with the walk recording flow-state questions, as a stateful agent's
    does (`SimContext.record_questions`): chains then record per rule what it read, a rule
    refuted by its ethertype or protocol only those (`sim/chains.py`), and the masks are
    narrower; both matchers."""
    saved = rules_module.DISPATCH_MIN_RULES
    rules_module.DISPATCH_MIN_RULES = data.draw(st.sampled_from([saved, 1]))
    try:
        check_cached_flows(topo, tables, data, record_questions=True)
    finally:
        rules_module.DISPATCH_MIN_RULES = saved


def check_cached_flows(
    topo: Topo, tables: MemoryTables, data: st.DataObject, *, record_questions: bool = False
) -> None:
    sim = Sim(topo.view(), host="h1", tables=tables)
    sim.ctx = dataclasses.replace(sim.ctx, record_questions=record_questions)
    flows = FlowTable()
    bases = data.draw(st.lists(packet_specs(), min_size=1, max_size=5))
    hits = 0
    for _ in range(60):
        if data.draw(st.integers(0, 11)) == 11:
            flows.invalidate(mutate(data.draw, topo, sim))
            continue
        in_port, frame = build(data.draw(variants(bases)))
        port: Port = sim.view.ports[in_port].port
        match = extract_flow_match(frame, port.tunnel_key)
        cached = flows.lookup(match, 0.0)
        fresh = sim.run(frame, in_port, learn=False)
        if cached is not None:
            hits += 1
            assert fresh.actions == cached.actions, fresh.format_trace()
            assert fresh.install, fresh.format_trace()
            assert not fresh.learned, fresh.format_trace()
            assert not fresh.generated or fresh.drop_reason == "neighbour_unresolved"
            continue
        for entry in fresh.learned:
            tag = sim.tables.learn(entry)
            if tag:
                flows.invalidate([tag])
        if fresh.install:
            flows.install(fresh.masked_match, fresh.mask, fresh.actions, fresh.tags, 0.0)


@st.composite
def chained_bridges(draw: st.DrawFn) -> Topo:
    """One bridge between vm1 and vm2 with every chain on the path, each of 1-6 random
    rules: where the rule-by-rule reads of a walk that records flow-state questions show."""
    topo = Topo()
    for chain_id in CHAINS:
        topo.chain(chain_id)
        for _ in range(draw(st.integers(1, 6))):
            kw = draw(rule_kwargs(chain_id, one_in=3))
            topo.rule(kw.pop("chain_id"), kw.pop("action"), **kw)
    topo.bridge("b1", inbound_chain_id="c0")
    for n in (1, 2):
        topo.vm_port(
            "b1",
            f"vm{n}",
            mac_n=n,
            addresses=(f"10.0.1.{9 + n}/24",),
            inbound_chain_id="c1" if n == 1 else None,
            outbound_chain_id="c2" if n == 2 else None,
            port_group_ids=("pg",) if draw(st.booleans()) else (),
        )
    return topo


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(topo=chained_bridges(), data=st.data())
def test_rule_by_rule_chain_reads_are_sound(topo: Topo, data: st.DataObject) -> None:
    """Every packet that agrees with another under the mask of the other's walk (recording
    flow-state questions, so chains record per rule what refuted it) gets the same actions."""
    sim = Sim(topo.view(), host="h1")
    sim.ctx = dataclasses.replace(sim.ctx, record_questions=True)
    fields = packet_fields()
    fields["in_port"] = st.just("vm1")
    fields["dst_mac"] = st.sampled_from([mac(2), "ff:ff:ff:ff:ff:ff", mac(9)])
    fields["src"] = st.sampled_from(["10.0.1.10", "10.0.2.10", "10.9.9.1"])
    fields["dst"] = st.sampled_from(["10.0.1.11", "10.0.2.11", "8.8.8.8"])
    # A few base packets and their neighbours (0-2 fields redrawn): where a mask that is too
    # narrow shows.
    bases = [
        {name: data.draw(strategy) for name, strategy in fields.items()}
        for _ in range(data.draw(st.integers(1, 3)))
    ]
    packets = []
    for _ in range(data.draw(st.integers(2, 16))):
        spec = dict(data.draw(st.sampled_from(bases)))
        for name in data.draw(st.lists(st.sampled_from(sorted(fields)), max_size=2)):
            spec[name] = data.draw(fields[name])
        packets.append(build(spec))
    walked = []
    for in_port, frame in packets:
        result = sim.run(frame, in_port, learn=False)
        walked.append((extract_flow_match(frame, topo.ports[in_port].tunnel_key), result))
    for _, result in walked:
        if not result.install:
            continue
        key = result.masked_match
        for other, other_result in walked:
            if tuple(map(and_, flow_match_values(other), result.mask)) == key:
                assert other_result.actions == result.actions, (
                    result.format_trace() + "\n---\n" + other_result.format_trace()
                )


def test_a_rule_refuted_by_its_protocol_reads_no_ports_and_one_that_is_not_reads_them() -> None:
    """A walk that records flow-state questions: a TCP packet that passes a UDP port rule
    depends on its protocol only; one that passes a TCP port-22 rule on its destination
    port too (the rule's protocol held: only the port refuted it)."""
    for proto, expect_ports in ((17, False), (6, True)):
        topo = Topo()
        topo.chain("c")
        topo.rule("c", "drop", position=1, nw_proto=proto, tp_dst=PortRange(start=22, end=22))
        topo.rule("c", "accept", position=2)
        topo.bridge("b", inbound_chain_id="c")
        topo.vm_port("b", "vm1", mac_n=1)
        topo.vm_port("b", "vm2", mac_n=2)
        sim = Sim(topo.view())
        sim.ctx = dataclasses.replace(sim.ctx, record_questions=True)
        result = sim.run(tcp(mac(1), mac(2), "10.0.0.1", "10.0.0.2", dport=80), "vm1")
        wildcard = result.wildcard()
        assert "ip_proto" in wildcard and "eth_type" in wildcard
        assert ("tp_dst" in wildcard) is expect_ports, result.format_trace()
