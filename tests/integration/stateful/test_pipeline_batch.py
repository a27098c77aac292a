"""`FlowPipeline.batch()`: upcalls of a batch are committed at once, their flow state pushed
together (one message per peer) before any of their flows is installed or packet sent, and a
flow that a later upcall of the same batch made stale is never installed.

Two agents' pipelines over memory datapaths, no store (the SNAT range claimed locally):
vm (h1, security group allowing egress only) and vm2 (h1, no security group) on net, routed
by r (SNAT to 203.0.113.2) to out (h2)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Any

import pytest

from hivenet.agent import pipeline as pipeline_module
from hivenet.agent.flowstate_sync import FlowStateSync
from hivenet.agent.pipeline import FlowPipeline
from hivenet.datapath.memory import MemoryDatapath, MemoryUnderlay
from hivenet.flowstate import NatRange
from hivenet.flowstate.auth import AuthError, Keyring, open_sealed
from hivenet.model import (
    Bridge,
    Chain,
    DeviceKind,
    Direction,
    NatTarget,
    Port,
    PortGroup,
    Router,
    Rule,
    RuleAction,
    SecurityGroup,
    SecurityGroupRule,
    TopologyObject,
    TunnelZone,
    TunnelZoneMember,
)
from hivenet.packets import build_tcp_segment, extract_flow_match
from hivenet.sim import (
    NO_FLOW_STATE,
    FlowStateHook,
    MemoryTables,
    SimContext,
    SimulationResult,
    TopologyView,
)
from hivenet.sim.stateful import TransactionHook

SNAT_IP = "203.0.113.2"
OUT_IP = "203.0.113.100"
MACS = {"vm": "02:00:00:00:00:01", "vm2": "02:00:00:00:00:02", "out": "02:00:00:00:00:03"}
R_IN_MAC, R_OUT_MAC = "02:00:00:00:ff:01", "02:00:00:00:ff:02"
KEYS = {"vm": 1, "vm2": 2, "out": 3}


def topology() -> list[TopologyObject]:
    def router_port(port_id: str, mac: str, address: str, peer: str) -> Port:
        return Port(
            id=port_id,
            device_kind=DeviceKind.ROUTER,
            device_id="r",
            mac=mac,
            addresses=(ipaddress.ip_interface(address),),
            peer_id=peer,
        )

    def vm(port_id: str, bridge: str, host: str, address: str, **extra: object) -> Port:
        return Port(
            id=port_id,
            device_kind=DeviceKind.BRIDGE,
            device_id=bridge,
            host_id=host,
            interface_name=f"hn{port_id}",
            mac=MACS[port_id],
            tunnel_key=KEYS[port_id],
            addresses=(ipaddress.ip_interface(address),),
            **extra,  # type: ignore[arg-type]
        )

    snat = NatTarget(
        address_from=ipaddress.ip_address(SNAT_IP),
        address_to=ipaddress.ip_address(SNAT_IP),
        port_from=1024,
        port_to=65535,
    )
    return [
        Bridge(id="net"),
        Bridge(id="ext"),
        Chain(id="pre"),
        Chain(id="post"),
        Router(id="r", inbound_chain_id="pre", outbound_chain_id="post"),
        Rule(chain_id="pre", action=RuleAction.REV_SNAT),
        Rule(
            chain_id="post",
            action=RuleAction.SNAT,
            nw_src=ipaddress.ip_network("10.0.0.0/24"),
            out_port_ids=("r-ext",),
            nat_targets=(snat,),
        ),
        SecurityGroup(id="sg"),
        SecurityGroupRule(id="egress", security_group_id="sg", direction=Direction.EGRESS),
        router_port("r-net", R_IN_MAC, "10.0.0.1/24", "b-net"),
        Port(id="b-net", device_kind=DeviceKind.BRIDGE, device_id="net", peer_id="r-net"),
        router_port("r-ext", R_OUT_MAC, "203.0.113.1/24", "b-ext"),
        Port(id="b-ext", device_kind=DeviceKind.BRIDGE, device_id="ext", peer_id="r-ext"),
        vm(
            "vm",
            "net",
            "h1",
            "10.0.0.11/24",
            port_security_enabled=True,
            security_group_ids=("sg",),
        ),
        vm("vm2", "net", "h1", "10.0.0.12/24"),
        vm("out", "ext", "h2", f"{OUT_IP}/24"),
        TunnelZone(
            id="tz",
            members=tuple(
                TunnelZoneMember(host_id=h, underlay_ip=ipaddress.ip_address(f"192.0.2.{i}"))
                for i, h in ((1, "h1"), (2, "h2"))
            ),
        ),
    ]


class Hosts:
    """`templates`: the pipelines' connection templates (`agent/pipeline.py`); `clock`: the
    datapaths', agents' and pipelines' clock (default: the monotonic clock)."""

    def __init__(
        self, *, templates: bool = True, clock: Callable[[], float] = time.monotonic
    ) -> None:
        underlay = MemoryUnderlay()
        objects = topology()
        self.datapaths: dict[str, MemoryDatapath] = {}
        self.syncs: dict[str, FlowStateSync] = {}
        self.pipelines: dict[str, FlowPipeline] = {}
        self.views: dict[str, TopologyView] = {}
        # Flow-state messages h2 received, with how many packets `out` had got by then.
        self.state_arrivals: list[int] = []
        for index, host in enumerate(("h1", "h2"), 1):
            view = TopologyView.from_objects(objects)
            tables = MemoryTables()
            tables.neighbours[("r", 4, int(ipaddress.ip_address(OUT_IP)))] = int(
                MACS["out"].replace(":", ""), 16
            )
            for port_id in ("vm", "vm2"):
                tables.macs[("net", 0, int(MACS[port_id].replace(":", ""), 16))] = port_id
            datapath = MemoryDatapath(host, f"192.0.2.{index}", underlay, clock=clock)
            sync = FlowStateSync(host, datapath, view, clock=clock)
            sync.allocator.claim_all(NatRange.parse(SNAT_IP, SNAT_IP, 1024, 65535))
            self.pipelines[host] = FlowPipeline(
                host, datapath, view, tables, stateful=sync, clock=clock, templates=templates
            )
            self.views[host] = view
            for port_id, key in KEYS.items():
                if (port_id == "out") == (host == "h2"):
                    datapath.bind_port(key, f"hn{port_id}")
            self.datapaths[host], self.syncs[host] = datapath, sync
        h2_receive = self.syncs["h2"].receive

        def receive(payload: bytes) -> None:
            self.state_arrivals.append(len(self.datapaths["h2"].deliveries))
            h2_receive(payload)

        self.datapaths["h2"].set_flow_state_handler(receive)


def syn(sport: int) -> bytes:
    return build_tcp_segment(
        eth_src=MACS["vm"],
        eth_dst=R_IN_MAC,
        ip_src="10.0.0.11",
        ip_dst=OUT_IP,
        src_port=sport,
        dst_port=80,
        flags=0x02,
    )


def test_a_batch_pushes_once_per_peer_before_any_flow_or_packet() -> None:
    hosts = Hosts()
    h1, h2 = hosts.datapaths["h1"], hosts.datapaths["h2"]
    sync1 = hosts.syncs["h1"]
    with hosts.pipelines["h1"].batch():
        for sport in range(40000, 40005):
            h1.receive(KEYS["vm"], syn(sport))
        # Simulated and committed, but nothing installed, sent or pushed yet.
        assert len(sync1.conntrack) == 5 and len(sync1.nat) == 5
        assert len(h1.flow_table) == 0
        assert h2.deliveries == [] and hosts.state_arrivals == []
    assert sync1.counters.pushed_messages == 1  # 10 entries, one message to h2
    assert hosts.state_arrivals == [0]  # the state arrived before the first packet
    assert len(hosts.syncs["h2"].nat) == 5
    assert len(h1.flow_table) == 5
    sent = [extract_flow_match(frame, 0) for frame in h2.take(KEYS["out"])]
    assert sorted(m.tp_src for m in sent) == sorted({m.tp_src for m in sent})  # 5 ports
    assert {m.ip_src for m in sent} == {int(ipaddress.ip_address(SNAT_IP))}
    # The same connections again: the installed flows take them, no upcall.
    misses = h1.counters()["misses"]
    for sport in range(40000, 40005):
        h1.receive(KEYS["vm"], syn(sport))
    assert h1.counters()["misses"] == misses
    assert len(h2.take(KEYS["out"])) == 5


def test_one_upcall_at_a_time_is_unchanged_outside_a_batch() -> None:
    hosts = Hosts()
    h1 = hosts.datapaths["h1"]
    for sport in range(40000, 40003):
        h1.receive(KEYS["vm"], syn(sport))
    assert hosts.syncs["h1"].counters.pushed_messages == 3
    assert hosts.state_arrivals == [0, 1, 2]  # each connection's state before its packet
    assert len(h1.flow_table) == 3


def test_a_flow_a_later_upcall_of_the_batch_made_stale_is_not_installed() -> None:
    hosts = Hosts()
    h1 = hosts.datapaths["h1"]
    # vm2 -> vm unsolicited: vm's security group drops it (a cacheable drop that depends on
    # there being no connection); then vm opens that very connection (vm -> vm2).
    unsolicited = build_tcp_segment(
        eth_src=MACS["vm2"],
        eth_dst=MACS["vm"],
        ip_src="10.0.0.12",
        ip_dst="10.0.0.11",
        src_port=80,
        dst_port=40000,
        flags=0x10,
    )
    opening = build_tcp_segment(
        eth_src=MACS["vm"],
        eth_dst=MACS["vm2"],
        ip_src="10.0.0.11",
        ip_dst="10.0.0.12",
        src_port=40000,
        dst_port=80,
        flags=0x02,
    )
    pipeline = hosts.pipelines["h1"]
    with pipeline.batch():
        h1.receive(KEYS["vm2"], unsolicited)
        dropped = pipeline.last_result
        h1.receive(KEYS["vm"], opening)
    assert dropped is not None and dropped.is_drop and dropped.install
    assert len(h1.flow_table) == 1  # vm's SYN only; the stale drop was never installed
    assert h1.take(KEYS["vm2"]) == [opening]
    # vm2's answer now reaches vm (per-upcall order would have removed the drop flow too).
    h1.receive(KEYS["vm2"], unsolicited)
    assert h1.take(KEYS["vm"]) == [unsolicited]


def test_the_upcall_context_is_made_once_and_holds_no_hook_between_upcalls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The simulation context with the flow-state hook is built once per `context` (not
    copied per upcall), rebuilt when `context` is replaced, and carries the upcall's own
    hook only while it is simulated, even when the simulation raises. (Without connection
    templates: the second SYN would be replayed, not simulated.)"""
    hosts = Hosts(templates=False)
    h1, pipeline = hosts.datapaths["h1"], hosts.pipelines["h1"]
    seen: list[tuple[SimContext, FlowStateHook]] = []
    real_simulate = pipeline_module.simulate

    def recording_simulate(
        frame: bytes, port_id: str, context: SimContext, now: float, **kwargs: Any
    ) -> SimulationResult:
        assert isinstance(context.flow_state, pipeline_module._UpcallFlowState)
        seen.append((context, context.flow_state.hook))
        return real_simulate(frame, port_id, context, now, **kwargs)

    monkeypatch.setattr(pipeline_module, "simulate", recording_simulate)
    h1.receive(KEYS["vm"], syn(40000))
    h1.receive(KEYS["vm"], syn(40001))
    (first, hook1), (second, hook2) = seen
    assert first is second and hook1 is not hook2
    assert isinstance(hook1, TransactionHook) and isinstance(hook2, TransactionHook)
    assert pipeline._upcall_flow_state.hook is NO_FLOW_STATE
    assert len(hosts.syncs["h1"].conntrack) == 2  # both committed through the one context
    # A replaced context (a host service set) is the one the next upcall sees.
    pipeline.set_handoff(lambda service, port, frame: None)
    h1.receive(KEYS["vm"], syn(40002))
    third = seen[-1][0]
    assert third is not first and third.metadata and not first.metadata
    # A simulation that raises: rolled back, and the hook is let go all the same.

    def failing_simulate(*args: Any, **kwargs: Any) -> SimulationResult:
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline_module, "simulate", failing_simulate)
    bindings = len(hosts.syncs["h1"].nat)
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.handle_upcall(KEYS["vm"], syn(40003))
    assert pipeline._upcall_flow_state.hook is NO_FLOW_STATE
    assert len(hosts.syncs["h1"].nat) == bindings


def test_push_targets_kept_per_revision_follow_a_topology_change() -> None:
    """`push_targets` answers are kept with the topology revision's maps: the same flow asks
    again after a change (here: vm joins a stateful port group with a port on h3) and gets
    the new answer, never the kept one."""
    hosts = Hosts()
    h1, sync = hosts.datapaths["h1"], hosts.syncs["h1"]
    h1.receive(KEYS["vm"], syn(40000))
    result = hosts.pipelines["h1"].last_result
    assert result is not None
    assert sync.push_targets(result, "vm") == {"h2"}
    assert list(sync._push_maps.targets.values()) == [frozenset({"h2"})]
    view = sync.topology
    vm = next(o for o in topology() if isinstance(o, Port) and o.id == "vm")
    view.apply(PortGroup(id="pg", stateful=True))
    far = Port(
        id="far",
        device_kind=DeviceKind.BRIDGE,
        device_id="net",
        host_id="h3",
        interface_name="hnfar",
        tunnel_key=9,
    )
    view.apply(far)
    view.apply(vm.model_copy(update={"port_group_ids": ("pg",)}))
    assert sync.push_targets(result, "vm") == {"h2"}  # far is not in the group yet
    view.apply(far.model_copy(update={"port_group_ids": ("pg",)}))
    assert sync.push_targets(result, "vm") == {"h2", "h3"}
    view.remove("port_group", "pg")
    view.apply(vm)
    assert sync.push_targets(result, "vm") == {"h2"}


def test_the_kept_sealer_follows_a_key_rotation() -> None:
    """The agent seals with a `Sealer` kept for the keyring's current key: a rotated keyring
    seals with the new key at once, never the kept one."""
    keyring = Keyring.new(bytes(range(32)), 0.0)
    view = TopologyView.from_objects(topology())
    sync = FlowStateSync(
        "h1",
        MemoryDatapath("h1", "192.0.2.1", MemoryUnderlay()),
        view,
        authenticate=True,
        keyring=keyring,
    )
    first, second = sync._seal(keyring, b"one"), sync._seal(keyring, b"two")
    sender, sequence, key_id, message = open_sealed(first, keyring.receive_keys())
    assert (sender, key_id, message) == ("h1", 0, b"one")
    _, later, key_id, message = open_sealed(second, keyring.receive_keys())
    assert later > sequence and (key_id, message) == (0, b"two")
    rotated = keyring.rotated(bytes(range(1, 33)), 1.0)
    sync.set_keyring(rotated)
    third = sync._seal(rotated, b"three")
    assert open_sealed(third, {1: rotated.current.secret})[2:] == (1, b"three")
    with pytest.raises(AuthError):
        open_sealed(third, {1: keyring.current.secret})
