"""Connection templates (`sim/replay.py`, `agent/pipeline.py`): a new connection like the last
one is answered by asking the template's flow-state questions again instead of walking the
topology, and gets exactly what the walk would have given it.

Two pairs of agents over memory datapaths on one manual clock, the same topology as the batch
tests (vm with an egress-only security group and vm2 without one on net, r SNATing to
203.0.113.2 towards out on h2): one pair with templates, one without. Both are driven with the
same packets, topology changes and time, and must end every step in the same state: what h2
received, the flows h1 installed (match, mask, actions, tags), the conntrack and NAT entries
on both hosts."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivenet.model import Direction, PortRange, Rule, RuleAction, SecurityGroupRule
from hivenet.packets import build_tcp_segment, build_udp_datagram, extract_flow_match
from hivenet.packets.flowmatch import FIELD_NAMES
from tests.integration.stateful.test_pipeline_batch import (
    KEYS,
    MACS,
    OUT_IP,
    R_IN_MAC,
    R_OUT_MAC,
    SNAT_IP,
    Hosts,
)

VM_IPS = {"vm": "10.0.0.11", "vm2": "10.0.0.12"}
SYN, SYN_ACK, ACK, RST = 0x02, 0x12, 0x10, 0x04


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pair() -> tuple[Hosts, Hosts, Clock]:
    clock = Clock()
    return Hosts(templates=True, clock=clock), Hosts(templates=False, clock=clock), clock


def outbound(vm: str, sport: int, dport: int = 80, flags: int = SYN, *, udp: bool = False) -> bytes:
    common: dict[str, Any] = {
        "eth_src": MACS[vm],
        "eth_dst": R_IN_MAC,
        "ip_src": VM_IPS[vm],
        "ip_dst": OUT_IP,
        "src_port": sport,
        "dst_port": dport,
    }
    if udp:
        return build_udp_datagram(**common, payload=b"x")
    return build_tcp_segment(**common, flags=flags)


def inbound(dport: int, sport: int = 80, flags: int = SYN_ACK) -> bytes:
    """From out to the SNAT address (a reply when `dport` is a connection's SNAT port)."""
    return build_tcp_segment(
        eth_src=MACS["out"],
        eth_dst=R_OUT_MAC,
        ip_src=OUT_IP,
        ip_dst=SNAT_IP,
        src_port=sport,
        dst_port=dport,
        flags=flags,
    )


def send(hosts: Hosts, sender: str, frame: bytes) -> None:
    host = "h2" if sender == "out" else "h1"
    hosts.datapaths[host].receive(KEYS[sender], frame)


def state(hosts: Hosts) -> dict[str, object]:
    h1, h2 = hosts.datapaths["h1"], hosts.datapaths["h2"]
    return {
        "to_out": h2.take(KEYS["out"]),
        "to_vm": h1.take(KEYS["vm"]),
        "to_vm2": h1.take(KEYS["vm2"]),
        "flows": sorted(
            (flow.match, flow.mask, flow.actions, tuple(sorted(map(str, flow.tags))))
            for flow in h1.flow_table.flows()
        ),
        "drops": {k: v for k, v in h1.counters().items() if k.startswith("drop.")},
        **{
            f"{host}_{table}": sorted(str(record) for record in getattr(hosts.syncs[host], table))
            for host in ("h1", "h2")
            for table in ("conntrack", "nat")
        },
    }


def snat_port(hosts: Hosts, sport: int) -> int:
    """The SNAT port of vm's connection from `sport`."""
    (port,) = (
        record.binding.translated.tp_src
        for record in hosts.syncs["h1"].nat
        if record.binding.original.tp_src == sport
    )
    return port


def dropping(rule_id: str, port: int) -> Rule:
    """A rule of r's outbound chain, ahead of its SNAT: drop TCP to `port`."""
    return Rule(
        id=rule_id,
        chain_id="post",
        action=RuleAction.DROP,
        position=1,
        nw_proto=6,
        tp_dst=PortRange(start=port, end=port),
    )


def apply(hosts: Hosts, obj: Any = None, remove: tuple[str, str] | None = None) -> None:
    """A topology change on both hosts, their flows invalidated as the agent does."""
    for host, view in hosts.views.items():
        tags = view.remove(*remove) if remove is not None else view.apply(obj)
        hosts.datapaths[host].invalidate(tags)


def test_new_connections_like_the_first_are_replayed_as_they_would_be_simulated() -> None:
    replaying, simulating, _ = pair()
    for sport in range(40000, 40020):
        for hosts in (replaying, simulating):
            send(hosts, "vm", outbound("vm", sport))
        assert state(replaying) == state(simulating)
    stats = replaying.pipelines["h1"].stats
    assert stats.replayed == 19 and stats.replay_declined == 0
    assert simulating.pipelines["h1"].stats.replayed == 0
    # Each replayed connection opened its entries, pushed them to h2 and left SNATed.
    assert len(replaying.syncs["h1"].conntrack) == 20
    assert len(replaying.syncs["h2"].nat) == 20
    flows = replaying.datapaths["h1"].flow_table.flows()
    assert len({flow.match for flow in flows}) == 20


def test_a_topology_change_ends_the_template() -> None:
    replaying, simulating, _ = pair()
    for sport in (40000, 40001):
        for hosts in (replaying, simulating):
            send(hosts, "vm", outbound("vm", sport))
    replayed = replaying.pipelines["h1"].stats.replayed
    assert replayed == 1
    # r now drops what goes to port 80 before it is SNATed: the template's chain changed.
    drop = dropping("no-http", 80)
    for hosts in (replaying, simulating):
        apply(hosts, drop)
        send(hosts, "vm", outbound("vm", 40002))
    assert state(replaying) == state(simulating)
    assert replaying.pipelines["h1"].stats.replayed == replayed
    assert replaying.pipelines["h1"].stats.drops.get("rule_drop") == 1


def test_a_frame_the_walk_would_drop_is_not_replayed() -> None:
    replaying, simulating, _ = pair()
    frame = bytearray(outbound("vm", 40001))
    frame[24] ^= 0xFF  # the IPv4 header checksum: a router drops it, uncached
    for hosts in (replaying, simulating):
        send(hosts, "vm", outbound("vm", 40000))
        send(hosts, "vm", bytes(frame))
    assert state(replaying) == state(simulating)
    stats = replaying.pipelines["h1"].stats
    assert stats.replayed == 0 and stats.drops.get("bad_ip_checksum") == 1


def _drop_flow_of(hosts: Hosts, sport: int) -> None:
    """Remove h1's flow of the connection from `sport` (the connection stays)."""
    h1 = hosts.datapaths["h1"]
    (flow,) = (f for f in h1.flow_table.flows() if f.match[FIELD_NAMES.index("tp_src")] == sport)
    h1.invalidate([tag for tag in flow.tags if not isinstance(tag, str)])


def test_an_answer_of_another_shape_declines_the_replay() -> None:
    """The template's SYN again on a connection that exists already (its flow went, the
    connection stayed: a retransmission) opens nothing: the replay declines and the walk
    answers it."""
    replaying, simulating, _ = pair()
    for hosts in (replaying, simulating):
        send(hosts, "vm", outbound("vm", 40000))
        send(hosts, "vm", outbound("vm", 40001))
        _drop_flow_of(hosts, 40000)
        send(hosts, "vm", outbound("vm", 40000))
    assert state(replaying) == state(simulating)
    assert replaying.pipelines["h1"].stats.replay_declined == 1
    # The declined replay and the walk after it are one packet's one transaction.
    counted = [hosts.syncs["h1"].counters.transactions for hosts in (replaying, simulating)]
    assert counted[0] == counted[1] == 3


def test_a_segment_of_other_tcp_flags_does_not_try_a_syns_template() -> None:
    """An ACK of a connection whose flow went (idled out, evicted) is no SYN: it does not try
    the SYN's template (conntrack reads the flags, so the template is looked up by them),
    and its own walk becomes the template of such segments."""
    replaying, simulating, _ = pair()
    for hosts in (replaying, simulating):
        for sport in (40000, 40001, 40002):
            send(hosts, "vm", outbound("vm", sport))
            send(hosts, "out", inbound(snat_port(hosts, sport), flags=SYN_ACK))
        for sport in (40000, 40001):
            _drop_flow_of(hosts, sport)
            send(hosts, "vm", outbound("vm", sport, flags=ACK))
    assert state(replaying) == state(simulating)
    stats = replaying.pipelines["h1"].stats
    assert stats.replay_declined == 0
    assert stats.replayed == 3  # the SYNs of 40001 and 40002, the ACK of 40001


SPORTS = (40000, 40001, 40002, 1024, 1025)


@st.composite
def events(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["out", "out", "out", "in", "change", "time", "flush"]))
    if kind == "out":
        vm = draw(st.sampled_from(["vm", "vm2"]))
        udp = draw(st.integers(0, 4)) == 0
        flags = draw(st.sampled_from([SYN, SYN, ACK, RST]))
        return kind, (
            vm,
            draw(st.sampled_from(SPORTS)),
            draw(st.sampled_from([80, 22])),
            flags,
            udp,
        )
    if kind == "in":
        return kind, (draw(st.sampled_from(SPORTS)), draw(st.sampled_from([SYN_ACK, ACK, SYN])))
    if kind == "change":
        return kind, draw(st.integers(0, 3))
    if kind == "time":
        return kind, draw(st.sampled_from([1.0, 50.0, 200.0]))
    return kind, None


def change(hosts: Hosts, which: int) -> None:
    if which == 0:  # r drops ssh before SNAT
        apply(hosts, dropping("no-ssh", 22))
    elif which == 1 and "no-ssh" in hosts.views["h1"].objects.get("rule", {}):
        apply(hosts, remove=("rule", "no-ssh"))
    elif which == 2:  # the security group lets ssh in
        apply(
            hosts,
            SecurityGroupRule(
                id="ssh-in",
                security_group_id="sg",
                direction=Direction.INGRESS,
                protocol=6,
                port_range_min=22,
                port_range_max=22,
            ),
        )
    elif which == 3 and "egress" in hosts.views["h1"].objects.get("security_group_rule", {}):
        apply(hosts, remove=("security_group_rule", "egress"))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps=st.lists(events(), min_size=1, max_size=30))
def test_templates_change_nothing_but_the_work(steps: list[tuple[str, Any]]) -> None:
    """Whatever the packets, topology changes and time: an agent with templates ends every
    step in the state of one without."""
    replaying, simulating, clock = pair()
    for kind, value in steps:
        for hosts in (replaying, simulating):
            if kind == "out":
                vm, sport, dport, flags, udp = value
                send(hosts, vm, outbound(vm, sport, dport, flags, udp=udp))
            elif kind == "in":
                send(hosts, "out", inbound(*value))
            elif kind == "change":
                change(hosts, value)
            elif kind == "flush":  # every flow idles out at once
                for datapath in hosts.datapaths.values():
                    datapath.flow_table.expire(clock.now + 10_000)
        if kind == "time":
            clock.now += value
            for hosts in (replaying, simulating):
                for host in ("h1", "h2"):
                    hosts.datapaths[host].expire_flows()
                    hosts.syncs[host].tick(clock.now)
        replayed, simulated = state(replaying), state(simulating)
        assert replayed == simulated, (
            steps,
            {
                key: (value, simulated[key])
                for key, value in replayed.items()
                if value != simulated[key]
            },
        )


def test_the_snat_address_is_the_replayed_connections_own() -> None:
    """What leaves is SNATed with each connection's own binding (not the template's)."""
    replaying, _, _ = pair()
    for sport in (40000, 40001, 40002):
        send(replaying, "vm", outbound("vm", sport))
    sent = [extract_flow_match(f, 0) for f in replaying.datapaths["h2"].take(KEYS["out"])]
    assert {m.ip_src for m in sent} == {int(ipaddress.ip_address(SNAT_IP))}
    bindings = {
        (record.binding.original.tp_src, record.binding.translated.tp_src)
        for record in replaying.syncs["h1"].nat
    }
    assert sorted(m.tp_src for m in sent) == sorted(translated for _, translated in bindings)


def test_an_agent_told_not_to_use_templates_simulates_every_connection(tmp_path: Any) -> None:
    """`agent run --no-connection-templates` (HIVENET_CONNECTION_TEMPLATES=0) reaches the
    pipeline: no templates, every walk unrecorded."""
    from hivenet.agent.agent import HostAgent
    from hivenet.datapath.memory import MemoryDatapath
    from hivenet.store.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "store.db")
    try:
        for templates in (True, False):
            agent = HostAgent(
                store,
                MemoryDatapath("h1", "192.0.2.1"),
                host_id="h1",
                state_dir=tmp_path / f"state-{templates}",
                connection_templates=templates,
            )
            assert (agent.pipeline.templates is not None) is templates
            assert agent.pipeline.context.record_questions is templates
    finally:
        asyncio.run(store.close())


def test_templates_are_bounded(monkeypatch: Any) -> None:
    """Past MAX_TEMPLATES the pipeline forgets every template (the next connection of each
    kind is simulated and starts a new one); past MAX_TEMPLATE_MASKS masks on one port, a
    result of a new mask starts none."""
    from hivenet.agent import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "MAX_TEMPLATES", 2)
    hosts = Hosts(clock=Clock())
    templates = hosts.pipelines["h1"].templates
    assert templates is not None
    send(hosts, "vm", outbound("vm", 40000))
    send(hosts, "vm2", outbound("vm2", 40000))
    assert len(templates) == 2
    send(hosts, "vm", outbound("vm", 40001, udp=True))  # a third kind: all forgotten first
    assert len(templates) == 1
    send(hosts, "vm", outbound("vm", 40002))
    assert hosts.pipelines["h1"].stats.replayed == 0  # vm's TCP template was forgotten
    assert len(templates) == 2
    monkeypatch.setattr(pipeline_module, "MAX_TEMPLATES", 4096)
    monkeypatch.setattr(pipeline_module, "MAX_TEMPLATE_MASKS", 0)
    send(hosts, "vm2", outbound("vm2", 40003, udp=True))  # no mask may start on vm2's port
    assert len(templates) == 2


def test_a_mac_learned_earlier_in_a_batch_keeps_later_results_of_it_uninstalled(
    monkeypatch: Any,
) -> None:
    """Inside `FlowPipeline.batch()` learned entries reach the tables only at its end: a
    result of the same batch simulated before them (the VM's own SYN, after its MAC was seen
    on another port) must not install a flow, nor carry or make a template, on what they
    replaced. After the batch, the VM's next SYN is simulated and learns its MAC back."""
    from tests.integration.stateful import test_pipeline_batch as batch_module

    plain = batch_module.topology

    def topology() -> list[Any]:  # vm2 may send with vm's MAC (no port security)
        return [
            o.model_copy(update={"port_security_enabled": False}) if o.id == "vm2" else o
            for o in plain()
        ]

    monkeypatch.setattr(batch_module, "topology", topology)
    vm_mac = int(MACS["vm"].replace(":", ""), 16)
    for templates in (True, False):
        hosts = Hosts(templates=templates, clock=Clock())
        h1, pipeline = hosts.datapaths["h1"], hosts.pipelines["h1"]
        tables = pipeline.context.tables

        def on_learned(entries: Any, tables: Any = tables, h1: Any = h1) -> None:
            for entry in entries:  # as the agent: learn, then invalidate what changed
                tag = tables.learn(entry)
                if tag is not None:
                    h1.invalidate([tag])

        pipeline.on_learned = on_learned
        send(hosts, "vm", outbound("vm", 40000))
        moved = build_tcp_segment(
            eth_src=MACS["vm"],
            eth_dst=R_IN_MAC,
            ip_src=VM_IPS["vm2"],
            ip_dst=OUT_IP,
            src_port=5555,
            dst_port=81,
            flags=SYN,
        )
        with pipeline.batch():
            send(hosts, "vm2", moved)  # vm's MAC on port vm2: learned at the batch's end
            send(hosts, "vm", outbound("vm", 40001))
        assert tables.macs[("net", 0, vm_mac)] == "vm2"
        send(hosts, "vm", outbound("vm", 40002))
        assert tables.macs[("net", 0, vm_mac)] == "vm", templates
