"""Stateful megaflow soundness: with security-group chains (conntrack per port) and a router
doing SNAT/rev_snat, every packet that hits a cached flow gets what a fresh simulation would
give it -- while connections open, are used from both sides and expire. Flows are installed
and invalidated as the agent does (`FlowStateSync.finish`: commit, then invalidate the tags
of opened connections and new bindings; expiry, eviction and a binding's replacement by a
newer one with its translated key invalidate theirs). The tables are drawn unbounded or
bounded to a few entries, so a full table's evictions are exercised: an evicted entry's
flows must go exactly as an expired entry's do."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivenet.agent import flowstate_sync
from hivenet.agent.flowstate_sync import FlowStateSync
from hivenet.datapath.memory import MemoryDatapath
from hivenet.flows.actions import SetField
from hivenet.flows.table import FlowTable
from hivenet.flowstate import (
    ConntrackRecord,
    ConntrackTable,
    FlowKey,
    FlowStateTransaction,
    NatBinding,
    NatKind,
    NatRange,
    NatRecord,
    NatTable,
    PortBlockAllocator,
    encode,
    nat_reply_tag,
    nat_tag,
)
from hivenet.flowstate.schedule import USE_SLACK
from hivenet.flowstate.transaction import split_tag
from hivenet.model import (
    Direction,
    NatTarget,
    RuleAction,
    SecurityGroup,
    SecurityGroupRule,
)
from hivenet.packets import extract_flow_match
from hivenet.sim import MemoryTables, SimContext, SimulationResult, simulate
from hivenet.sim.stateful import HookRecord, TransactionHook, connection_tags
from tests.unit.sim.topo import Topo, mac, tcp, udp

SNAT_IP = "203.0.113.2"
VMS = {"vm1": ("10.0.1.10", 1), "vm2": ("10.0.1.11", 2), "out": ("203.0.113.9", 3)}
ROUTER_MACS = {"r-in": mac(101), "r-out": mac(102)}


def topology() -> Topo:
    topo = Topo()
    topo.bridge("net")
    topo.bridge("ext")
    topo.chain("r-pre")
    topo.chain("r-post")
    topo.router("r", inbound_chain_id="r-pre", outbound_chain_id="r-post")
    topo.rule("r-pre", RuleAction.REV_SNAT, 1)
    topo.rule(
        "r-post",
        RuleAction.SNAT,
        1,
        nw_src=ipaddress.ip_network("10.0.1.0/24"),
        nat_targets=(
            NatTarget(
                address_from=ipaddress.ip_address(SNAT_IP),
                address_to=ipaddress.ip_address(SNAT_IP),
                port_from=1024,
                port_to=1100,
            ),
        ),
    )
    topo.add(SecurityGroup(id="sg"))
    topo.add(
        SecurityGroupRule(
            id="sg-ssh",
            security_group_id="sg",
            direction=Direction.INGRESS,
            protocol=6,
            port_range_min=22,
            port_range_max=22,
        )
    )
    topo.add(
        SecurityGroupRule(
            id="sg-udp-out", security_group_id="sg", direction=Direction.EGRESS, protocol=17
        )
    )
    for name, (address, n) in VMS.items():
        topo.vm_port(
            "net" if name != "out" else "ext",
            name,
            "h1",
            mac_n=n,
            addresses=(f"{address}/24",),
            **(
                {"port_security_enabled": True, "security_group_ids": ("sg",)}
                if name == "vm1"
                else {}
            ),
        )
    for bridge, router_port, cidr in (
        ("net", "r-in", "10.0.1.1/24"),
        ("ext", "r-out", "203.0.113.1/24"),
    ):
        # The link's own port ids (its bridge port peers them, its routes name them), with
        # the MACs `build` uses: a port renamed here left the router unreachable.
        _, link = topo.link(bridge, "r", cidr)
        topo.objects.remove(link)
        topo.add(link.model_copy(update={"mac": ROUTER_MACS[router_port]}))
    topo.zone({"h1": "192.0.2.1"})
    return topo


@st.composite
def specs(draw: st.DrawFn) -> tuple[str, str, int, int, bool, int]:
    """(sender, peer, sport, dport, is_tcp, tcp flags); peer "snat" is the SNAT address."""
    sender = draw(st.sampled_from(["vm1", "vm2", "out"]))
    peer = draw(st.sampled_from(["vm1", "vm2", "out", "snat"]))
    ports = st.sampled_from([22, 1000, 1024, 1025])
    return (
        sender,
        peer,
        draw(ports),
        draw(ports),
        draw(st.booleans()),
        draw(st.sampled_from([0x02, 0x12, 0x10, 0x04, 0x11])),
    )


def reverse(spec: tuple[str, str, int, int, bool, int]) -> tuple[str, str, int, int, bool, int]:
    """The answer to `spec` (from the SNAT address's side, the outside host answers)."""
    sender, peer, sport, dport, is_tcp, flags = spec
    if peer == "snat" or (sender == "out" and peer not in VMS):
        return spec
    answering = "out" if peer == "out" else peer
    target = "snat" if peer == "out" and sender != "out" else sender
    return (answering, target, dport, sport, is_tcp, 0x12 if flags == 0x02 else 0x10)


def build(spec: tuple[str, str, int, int, bool, int]) -> tuple[str, bytes]:
    sender, peer, sport, dport, is_tcp, flags = spec
    src = VMS[sender][0]
    dst = SNAT_IP if peer == "snat" else VMS[peer][0]
    local = sender != "out" and peer in ("vm1", "vm2")
    eth_dst = mac(VMS[peer][1]) if local else ROUTER_MACS["r-out" if sender == "out" else "r-in"]
    if is_tcp:
        return sender, tcp(
            mac(VMS[sender][1]), eth_dst, src, dst, sport=sport, dport=dport, flags=flags
        )
    return sender, udp(mac(VMS[sender][1]), eth_dst, src, dst, sport=sport, dport=dport)


def neighbour_tables() -> MemoryTables:
    """The router's neighbour entries of every VM (no ARP in these walks)."""
    tables = MemoryTables()
    for address, n in VMS.values():
        tables.neighbours[("r", 4, int(ipaddress.ip_address(address)))] = int(
            mac(n).replace(":", ""), 16
        )
    return tables


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_stateful_cached_flows_give_what_a_fresh_simulation_gives(data: Any) -> None:
    topo = topology()
    view = topo.view()
    tables = neighbour_tables()
    allocator = PortBlockAllocator()
    allocator.claim_all(NatRange.parse(SNAT_IP, SNAT_IP, 1024, 1100))
    bound = data.draw(st.sampled_from([None, 1, 2, 3]))
    conntrack = ConntrackTable(max_entries=bound)
    nat = NatTable(allocator, max_entries=bound)
    flows = FlowTable()

    def forget(connections: list[ConntrackRecord], bindings: list[NatRecord]) -> None:
        tags: set[str] = set()
        for record in connections:
            tags |= connection_tags(record.zone, record.key)
        for nat_record in bindings:
            binding = nat_record.binding
            tags |= {
                nat_tag(binding),
                nat_reply_tag(binding.zone, binding.kind, binding.translated),
            }
        flows.invalidate(tags)

    # As a stateful agent walks (precise chain reads, narrower masks) or not.
    record_questions = data.draw(st.booleans())
    now = 0.0
    hits = 0
    drawn = data.draw(st.lists(specs(), min_size=1, max_size=4))
    # Each connection's packets both ways, and a SYN of the same 5-tuple (the packet a flow
    # cached for other flags must not swallow).
    bases = [build(spec) for spec in drawn] + [build(reverse(spec)) for spec in drawn]
    bases += [build((*spec[:5], 0x02)) for spec in drawn]
    for _ in range(60):
        if data.draw(st.integers(0, 9)) == 0:
            now += data.draw(st.sampled_from([1.0, 40.0, 400.0]))
            flows.expire(now)
            forget(conntrack.expire(now), nat.expire(now))
            continue
        sender, frame = data.draw(st.sampled_from(bases))
        port = view.ports[sender]
        match = extract_flow_match(frame, port.tunnel_key)
        cached = flows.lookup(match, now)
        hook = TransactionHook(FlowStateTransaction(conntrack, nat))
        ctx = SimContext(
            topology=view,
            tables=tables,
            local_host_id="h1",
            flow_state=hook,
            record_questions=record_questions,
        )
        bindings_before = len(nat)
        evicted_before = conntrack.evicted + nat.evicted
        fresh = simulate(frame, sender, ctx, now)
        if cached is not None:
            hits += 1
            created_bindings = len(nat) - bindings_before
            hook.transaction.rollback()  # the datapath would not have asked the agent
            assert fresh.actions == cached.actions, fresh.format_trace()
            assert fresh.install, fresh.format_trace()
            # Nor may a hit skip state the packet would have created (a SYN served by the
            # flow of a lone mid-stream segment would never open its connection).
            assert not (hook.record.opened and not fresh.is_drop), fresh.format_trace()
            # (A walk that ends in a drop may have made a binding, evicting another to make
            # room for it, before the drop: the rollback removes the binding only.)
            if not fresh.is_drop:
                assert created_bindings == 0, fresh.format_trace()
                assert conntrack.evicted + nat.evicted == evicted_before, fresh.format_trace()
            # What this walk evicted is gone from the tables: its flows go as the agent's
            # would (the state of an agent that simulated the drop: its flow had idled out).
            forget(conntrack.take_evicted(), nat.take_evicted() + nat.take_replaced())
            continue
        if fresh.is_drop:
            hook.transaction.rollback()
        else:
            committed = hook.transaction.commit(now)
            tags = set()
            for zone, key, _ in hook.record.opened:
                tags |= connection_tags(zone, key)
            for binding in committed.nat_bindings:
                tags |= {
                    nat_tag(binding),
                    nat_reply_tag(binding.zone, binding.kind, binding.translated),
                }
            # What the agent invalidates (the simulation's own tag strings) is exactly this.
            reused, opened = hook.record.commit_tags(committed.nat_bindings)
            assert (reused, opened) == (tags, len(hook.record.opened))
            opened_tags = {tag for _, _, tag in hook.record.opened}
            # A new binding's reply tag is for flows that cached a reply lookup's miss: the
            # forward flow does not carry it (its `nat_tag` is enough, see sim/stateful.py).
            reply_tags = {reply_tag for _, _, reply_tag in hook.record.binding_tags}
            assert reused <= fresh.tags | hook.transaction.tags | opened_tags | reply_tags
            flows.invalidate(tags)
        forget(conntrack.take_evicted(), nat.take_evicted() + nat.take_replaced())
        if fresh.install:
            flows.install(
                fresh.masked_match,
                fresh.mask,
                fresh.actions,
                fresh.tags,
                now,
                idle_timeout=fresh.idle_timeout,
            )


def test_commit_tags_are_the_strings_the_hook_kept() -> None:
    """`commit_tags` spells nothing: each opened connection contributes the tag it was
    recorded with, each binding the strings kept for it (matched by identity); a binding
    the hook never saw is refused rather than spelled a second way. (That these are the tag
    functions' spellings is the property test above.)"""
    key = FlowKey(4, 0x0A000001, 0xC0000201, 6, 40000, 443)
    translated = FlowKey(4, 0xCB007102, 0xC0000201, 6, 1025, 443)
    binding = NatBinding("r", NatKind.SNAT, key, translated)
    equal_copy = NatBinding("r", NatKind.SNAT, key, translated)
    kept = HookRecord(
        opened=[("vm", key, "conntrack-kept")],
        binding_tags=[(binding, "nat-kept", "natr-kept")],
    )
    assert kept.commit_tags([binding]) == ({"conntrack-kept", "nat-kept", "natr-kept"}, 1)
    assert kept.commit_tags([]) == ({"conntrack-kept"}, 1)
    with pytest.raises(ValueError, match="not made through this hook"):
        kept.commit_tags([equal_copy])


def test_a_snat_flow_carries_one_nat_tag_for_its_key() -> None:
    """The forward packet asks the router's rev_snat (a reply lookup: a miss) and then its
    snat (a new binding) about the same key: both answers carry the one tag of that key's NAT
    state, so the flow keeps one tag for both (it carried a second, `natr:`, before).
    That tag still goes when a binding appears whose translated key answers the key (what
    the reply lookup missed), which the stateful property above checks end to end."""
    topo = topology()
    view = topo.view()
    tables = MemoryTables()
    tables.neighbours[("r", 4, int(ipaddress.ip_address(VMS["out"][0])))] = int(
        mac(VMS["out"][1]).replace(":", ""), 16
    )
    allocator = PortBlockAllocator()
    allocator.claim_all(NatRange.parse(SNAT_IP, SNAT_IP, 1024, 1100))
    conntrack, nat = ConntrackTable(), NatTable(allocator)
    sender, frame = build(("vm2", "out", 1000, 22, True, 0x02))
    hook = TransactionHook(FlowStateTransaction(conntrack, nat))
    ctx = SimContext(topology=view, tables=tables, local_host_id="h1", flow_state=hook)
    fresh = simulate(frame, sender, ctx, 0.0)
    committed = hook.transaction.commit(0.0)
    assert len(committed.nat_bindings) == 1, fresh.format_trace()
    (binding,) = committed.nat_bindings
    key = binding.original
    assert nat_tag(binding) == nat_reply_tag("r", NatKind.SNAT, key.reversed())
    # Its key's alone (the reply tag of its translated key is not the flow's, see below; vm2
    # has no security group, so no conntrack tag either).
    assert {tag for tag in fresh.tags if isinstance(tag, int)} == {nat_tag(binding)}


def snat_range() -> NatRange:
    return NatRange.parse(SNAT_IP, SNAT_IP, 1024, 1100)


def reply_to(translated: FlowKey) -> tuple[str, bytes]:
    """The outside host's answer to a connection SNATed to `translated`."""
    return "out", tcp(
        mac(VMS["out"][1]),
        ROUTER_MACS["r-out"],
        VMS["out"][0],
        SNAT_IP,
        sport=translated.tp_dst,
        dport=translated.tp_src,
        flags=0x12,
    )


def test_forward_snat_flow_carries_no_reply_tag_but_its_commit_removes_a_cached_miss() -> None:
    """A forward SNAT flow depends on its binding through the binding's `nat_tag` alone; the
    `nat_reply_tag` of its translated key is still invalidated by the commit, which removes a
    flow cached while no binding had that translated key (the reply's lookup missed)."""
    view = topology().view()
    tables = neighbour_tables()
    now = 1.0

    def snat_table() -> NatTable:
        allocator = PortBlockAllocator()
        allocator.claim_all(snat_range())
        return NatTable(allocator)

    conntrack, nat, flows = ConntrackTable(), snat_table(), FlowTable()

    def walk(sender: str, frame: bytes, nat: NatTable = nat) -> tuple[Any, TransactionHook]:
        hook = TransactionHook(FlowStateTransaction(conntrack, nat))
        context = SimContext(topology=view, tables=tables, local_host_id="h1", flow_state=hook)
        return simulate(frame, sender, context, now), hook

    forward = build(("vm2", "out", 1000, 22, True, 0x02))
    # Where the SNAT will put this connection: an allocator in the same state picks the same.
    _, probe = walk(*forward, nat=snat_table())
    ((binding, _, _),) = probe.record.binding_tags
    probe.transaction.rollback()
    reply_tag = nat_reply_tag("r", NatKind.SNAT, binding.translated)

    miss, miss_hook = walk(*reply_to(binding.translated))
    miss_hook.transaction.rollback()
    assert miss.install and reply_tag in miss.tags, miss.format_trace()
    flows.install(miss.masked_match, miss.mask, miss.actions, miss.tags, now)
    reply_match = extract_flow_match(reply_to(binding.translated)[1], view.ports["out"].tunnel_key)
    assert flows.lookup(reply_match, now) is not None

    result, hook = walk(*forward)
    committed = hook.transaction.commit(now)
    assert committed.nat_bindings == (binding,)
    assert nat_tag(binding) in result.tags
    assert reply_tag not in result.tags
    tags, _ = hook.record.commit_tags(committed.nat_bindings)
    assert reply_tag in tags
    flows.invalidate(tags)
    assert flows.lookup(reply_match, now) is None
    answer, _ = walk(*reply_to(binding.translated))
    assert answer.tags >= {nat_tag(binding), reply_tag}  # translated back now
    rewrites = {
        action.field: action.value for action in answer.actions if isinstance(action, SetField)
    }
    assert rewrites.get("ip_dst") == int(ipaddress.ip_address(VMS["vm2"][0]))


def _snat_agent(
    clock: list[float], tick_interval: float = 0.5
) -> tuple[MemoryDatapath, FlowStateSync]:
    """Host h1's datapath and agent on the topology, port "out" bound, the SNAT range
    claimed, both reading the time from `clock[0]`."""
    view = topology().view()
    datapath = MemoryDatapath("h1", "192.0.2.1", clock=lambda: clock[0])
    datapath.bind_port(view.ports["out"].tunnel_key, "out")
    sync = FlowStateSync("h1", datapath, view, clock=lambda: clock[0], tick_interval=tick_interval)
    sync.allocator.claim_all(snat_range())
    return datapath, sync


def _open(
    sync: FlowStateSync, spec: tuple[str, str, int, int, bool, int], now: float, tables: Any
) -> SimulationResult:
    """Simulate the first packet of `spec` through `sync`'s hook and commit it (as the
    pipeline does); the result must install a flow."""
    sender, frame = build(spec)
    hook = sync.begin(frame)
    context = SimContext(topology=sync.topology, tables=tables, local_host_id="h1", flow_state=hook)
    result = simulate(frame, sender, context, now)
    sync.finish(hook, result, sender, now)
    assert result.install, result.format_trace()
    return result


def test_an_agents_two_tables_pack_keys_into_one_set_of_objects() -> None:
    """The agent's conntrack and NAT tables share one `PackedKeys` (what that gives: see
    `test_one_transactions_conntrack_entry_and_binding_hold_one_key`)."""
    _, sync = _snat_agent([10.0])
    assert sync.conntrack._packed is sync.nat._packed


def test_a_binding_replaced_by_a_peers_with_its_translated_key_loses_its_flow_and_refresh() -> None:
    """A peer's binding with the translated key of one of ours replaces it in the table (a
    translated key is unique): our binding's forward flow, which carries only its `nat_tag`,
    is removed."""
    now = 10.0
    datapath, sync = _snat_agent([now])
    result = _open(sync, ("vm2", "out", 1000, 22, True, 0x02), now, neighbour_tables())
    datapath.install_flow(result.masked_match, result.mask, result.actions, result.tags)
    (record,) = sync.nat.snapshot(now)
    ours = record.binding
    assert nat_tag(ours) in result.tags
    assert [set(flow.tags) for flow in datapath.flows()] == [set(result.tags)]

    theirs = NatBinding(
        "r",
        NatKind.SNAT,
        FlowKey(4, int(ipaddress.ip_address(VMS["vm1"][0])), ours.original.ip_dst, 6, 4000, 22),
        ours.translated,
    )
    sync.receive(encode([], [NatRecord(theirs, now + 300)], now=now))
    assert sync.nat.lookup_translated("r", NatKind.SNAT, ours.translated, now) == theirs
    assert sync.nat.lookup_original("r", NatKind.SNAT, ours.original, now) is None
    assert datapath.flows() == []


def test_a_used_connection_outlives_its_timeouts_and_an_idle_one_expires() -> None:
    """The agent's scan of used flows keeps a connection's entries alive while its flow is
    used (each tick: the entries its connection tags name, read back from the tags) and
    lets them expire once idle, within their timeout and the scan's slack of the last use."""
    clock = [10.0]
    datapath, sync = _snat_agent(clock)
    # UDP: 30 s unreplied
    result = _open(sync, ("vm1", "out", 1000, 53, False, 0), clock[0], neighbour_tables())
    datapath.install_flow(result.masked_match, result.mask, result.actions, result.tags)
    (flow,) = datapath.flows()
    assert len(sync.conntrack) == 1 and len(sync.nat) == 1
    for _ in range(200):  # 100 s of use, every 0.5 s tick: past the 30 s conntrack timeout
        clock[0] += 0.5
        flow.last_used = clock[0]
        sync.tick(clock[0])
    assert len(sync.conntrack) == 1 and len(sync.nat) == 1
    assert datapath.flows() == [flow]
    assert sync.counters.refreshed_entries >= 2
    last_use = clock[0]
    conntrack_timeout = 30.0
    while len(sync.conntrack):
        clock[0] += 0.5
        sync.tick(clock[0])
    assert last_use + conntrack_timeout * (1 - USE_SLACK) <= clock[0]
    assert clock[0] <= last_use + conntrack_timeout + 0.5
    assert datapath.flows() == []


def test_a_binding_over_an_expired_one_of_its_key_keeps_its_refresh() -> None:
    """A new connection on the 5-tuple of an expired, not yet swept binding: the new
    binding replaces it (handed out as replaced, so the old one's flows go), and the old
    one's forgetting does not stop the new one's flow (the same tag) from keeping it alive."""
    clock = [10.0]
    datapath, sync = _snat_agent(clock)
    tables = neighbour_tables()

    def send() -> NatBinding:
        result = _open(sync, ("vm1", "out", 1000, 53, False, 0), clock[0], tables)
        datapath.install_flow(result.masked_match, result.mask, result.actions, result.tags)
        (record,) = sync.nat.snapshot(clock[0])
        return record.binding

    first = send()
    clock[0] += 400.0  # past UDP's 300 s NAT timeout, no tick: expired, not swept
    second = send()
    assert second is not first and second.original == first.original
    (flow,) = datapath.flows()
    for _ in range(800):  # 400 s of use: past UDP's 300 s NAT timeout
        clock[0] += 0.5
        flow.last_used = clock[0]
        sync.tick(clock[0])
    assert sync.nat.lookup_original(second.zone, second.kind, second.original, clock[0]) == second
    assert datapath.flows() == [flow]


def test_a_zone_first_seen_after_a_scan_is_refreshed_too() -> None:
    """The scan reads a tag's zone from a map of the tables' zones by hash, rebuilt when a
    tag names a zone it lacks: vm1's connection (conntrack in its port's zone, vm1 alone has
    a security group), opened after a scan that saw only vm2's (SNAT in the router's zone),
    is kept alive by its flow's use as the first one is."""
    clock = [10.0]
    datapath, sync = _snat_agent(clock)
    tables = neighbour_tables()
    for spec in (("vm2", "out", 1000, 53, False, 0), ("vm1", "out", 1000, 53, False, 0)):
        result = _open(sync, spec, clock[0], tables)
        datapath.install_flow(result.masked_match, result.mask, result.actions, result.tags)
        for _ in range(4):
            clock[0] += 0.5
            for flow in datapath.flows():
                flow.last_used = clock[0]
            sync.tick(clock[0])
    assert len(datapath.flows()) == 2 and len(sync.conntrack) == 1
    for _ in range(200):  # 100 s of use: past the 30 s conntrack timeout
        clock[0] += 0.5
        for flow in datapath.flows():
            flow.last_used = clock[0]
        sync.tick(clock[0])
    assert len(sync.conntrack) == 1 and len(sync.nat) == 2
    assert len(datapath.flows()) == 2


def _spy_on_uses(monkeypatch: pytest.MonkeyPatch, sync: FlowStateSync) -> list[int]:
    """The keys the refresh scan notes a use of (`note_use`), in order."""
    noted: list[int] = []
    for table in (sync.conntrack, sync.nat):
        original = table.note_use

        def spy(*args: Any, _original: Any = original) -> bool:
            noted.append(int(args[-2]))  # the key (conntrack: zone, key, now; NAT: + kind)
            return bool(_original(*args))

        monkeypatch.setattr(table, "note_use", spy)
    return noted


def _keys_of(flow: Any) -> set[int]:
    """The keys of the entries `flow`'s connection tags name."""
    return {int(split_tag(tag)[2]) for tag in flow.own_tags if type(tag) is int}


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    events=st.lists(
        st.one_of(
            st.tuples(st.just("use"), st.integers(0, 15)),
            st.tuples(st.just("open"), st.integers(1, 6)),
            st.tuples(st.just("drop"), st.integers(0, 15)),
            st.tuples(st.just("tick"), st.just(0)),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_many_flows_are_scanned_in_slices_and_no_use_is_missed(
    monkeypatch: pytest.MonkeyPatch, events: list[tuple[str, int]]
) -> None:
    """Over `SCAN_FLOWS_PER_SLICE` flows, a tick scans a share of the slices: a flow used
    between ticks is noted (its entries' `note_use`) within one pass of the slices, however
    the number of flows, and so each tick's share, goes up and down meanwhile; and with
    many flows no tick notes every used flow."""
    monkeypatch.setattr(flowstate_sync, "SCAN_FLOWS_PER_SLICE", 2)
    clock = [10.0]
    datapath, sync = _snat_agent(clock, tick_interval=0.1)
    slices = int(10.0 / 8 / 0.1)  # a pass: an eighth of the shortest timeout (TCP CLOSE)
    assert len(sync._scan_since) == slices
    tables = neighbour_tables()
    noted = _spy_on_uses(monkeypatch, sync)
    sport_next = [1000]

    def open_connections(count: int) -> None:
        for _ in range(count):
            sport_next[0] += 1
            result = _open(sync, ("vm2", "out", sport_next[0], 53, False, 0), clock[0], tables)
            datapath.install_flow(result.masked_match, result.mask, result.actions, result.tags)

    def tick() -> set[int]:
        clock[0] += 0.1
        noted.clear()
        sync.tick(clock[0])
        return set(noted)

    open_connections(6)
    tick()  # the opening itself is a use: scanned
    pending: dict[Any, int] = {}  # flow -> ticks since its use
    for kind, number in [*events, *[("tick", 0)] * slices]:
        flows = datapath.flows()
        if kind == "open":  # (the SNAT range holds 77 ports: 72 at most in all)
            open_connections(min(number, 1042 - sport_next[0]))
        elif kind == "use" and number < len(flows):
            flows[number].last_used = clock[0] + 0.05  # between this tick and the next
            pending.setdefault(flows[number], 0)
        elif kind == "drop" and number < len(flows):
            pending.pop(flows[number], None)
            datapath.invalidate(flows[number].own_tags)
        elif kind == "tick":
            seen = tick()
            for flow in list(pending):
                if _keys_of(flow) <= seen:
                    del pending[flow]
                else:
                    pending[flow] += 1
                    assert pending[flow] < slices, "a use not noted within a pass"
    assert not pending
    # Every flow used before each tick: a tick scans a share, a pass scans them all.
    open_connections(30)
    flows = datapath.flows()
    per_tick = []
    for _ in range(slices):
        for flow in flows:
            flow.last_used = clock[0] + 0.05
        per_tick.append(tick())
    assert all(_keys_of(flow) <= set().union(*per_tick) for flow in flows)
    assert not any(all(_keys_of(flow) <= seen for flow in flows) for seen in per_tick)


def test_a_use_waiting_for_its_slice_is_noted_when_the_share_grows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flow used while its slice waits for its turn, when fewer flows then make the tick
    scan every slice (some scanned since that use): its slice's own time is what counts."""
    monkeypatch.setattr(flowstate_sync, "SCAN_FLOWS_PER_SLICE", 2)
    clock = [10.0]
    datapath, sync = _snat_agent(clock, tick_interval=0.1)
    slices = len(sync._scan_since)
    tables = neighbour_tables()
    for sport in range(1000, 1024):  # 24 flows: one slice of 12 a tick
        result = _open(sync, ("vm2", "out", sport, 53, False, 0), clock[0], tables)
        datapath.install_flow(result.masked_match, result.mask, result.actions, result.tags)
    noted = _spy_on_uses(monkeypatch, sync)
    for _ in range(slices):  # a pass: every opening noted
        clock[0] += 0.1
        sync.tick(clock[0])

    def slice_of(flow: Any) -> int:
        return (id(flow) * flowstate_sync._SLICE_MIX >> 64) % slices

    waiting = next(f for f in datapath.flows() if slice_of(f) != sync._scan_next)
    waiting.last_used = clock[0] + 0.05
    clock[0] += 0.1
    noted.clear()
    sync.tick(clock[0])  # another slice's turn
    assert not _keys_of(waiting) & set(noted)
    for flow in datapath.flows():  # down to one flow: the next tick scans every slice
        if flow is not waiting:
            datapath.invalidate(flow.own_tags)
    clock[0] += 0.1
    noted.clear()
    sync.tick(clock[0])
    assert _keys_of(waiting) <= set(noted)


def test_a_use_just_before_the_deadline_is_noted_in_time_when_sliced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pass of the slices lasts at most an eighth of the shortest timeout: a flow used
    once 1.5 s before its connection's 30 s deadline keeps it alive, however many flows."""
    monkeypatch.setattr(flowstate_sync, "SCAN_FLOWS_PER_SLICE", 2)
    clock = [10.0]
    datapath, sync = _snat_agent(clock, tick_interval=0.1)
    tables = neighbour_tables()
    for sport in range(1000, 1060):  # UDP: 30 s unreplied (vm1's security group)
        result = _open(sync, ("vm1", "out", sport, 53, False, 0), clock[0], tables)
        datapath.install_flow(result.masked_match, result.mask, result.actions, result.tags)
    opened = clock[0]
    while clock[0] < opened + 28.5:
        clock[0] += 0.1
        sync.tick(clock[0])
    for flow in datapath.flows():
        flow.last_used = clock[0] + 0.05
    while clock[0] < opened + 31.0:
        clock[0] += 0.1
        sync.tick(clock[0])
    assert len(sync.conntrack) == 60 and len(datapath.flows()) == 60
    while len(sync.conntrack):  # then idle: they expire
        clock[0] += 0.1
        sync.tick(clock[0])
    assert datapath.flows() == []


def test_connections_scanned_in_slices_outlive_their_timeouts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sliced, a used connection's entries still outlive their timeouts and an idle one's
    still expire."""
    monkeypatch.setattr(flowstate_sync, "SCAN_FLOWS_PER_SLICE", 2)
    clock = [10.0]
    datapath, sync = _snat_agent(clock)
    tables = neighbour_tables()
    for sport in range(1000, 1010):  # UDP: 30 s unreplied (vm1's security group)
        result = _open(sync, ("vm1", "out", sport, 53, False, 0), clock[0], tables)
        datapath.install_flow(result.masked_match, result.mask, result.actions, result.tags)
    flows = datapath.flows()
    used, idle = flows[:5], flows[5:]
    for _ in range(200):  # 100 s: past the 30 s conntrack timeout
        clock[0] += 0.5
        for flow in used:
            flow.last_used = clock[0]
        sync.tick(clock[0])
    assert len(sync.conntrack) == 5 and len(sync.nat) == 10  # UDP NAT: 300 s
    assert not any(flow.removed for flow in used)
    assert all(flow.removed for flow in idle)
    assert sync.counters.refreshed_entries >= 5


def test_ticks_are_an_interval_apart_start_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tick that takes most of the interval does not push the next one an interval
    after its end (the refresh scan's pass is counted in ticks): 6 ticks of 0.15 s, 0.2 s
    apart, take ~1.2 s, not ~2.1 s."""
    _, sync = _snat_agent([10.0], tick_interval=0.2)
    starts: list[float] = []

    def slow_tick(now: float) -> None:
        starts.append(time.monotonic())
        time.sleep(0.15)

    monkeypatch.setattr(sync, "tick", slow_tick)

    async def run() -> None:
        task = asyncio.create_task(sync._tick_loop())
        while len(starts) < 7:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(run())
    assert starts[6] - starts[0] < 1.8
    assert all(later - earlier >= 0.15 for earlier, later in itertools.pairwise(starts))


@pytest.mark.parametrize("bad", [0, -0.5, float("nan"), float("inf"), True, "0.5"])
def test_a_tick_interval_that_is_no_positive_number_is_refused(bad: Any) -> None:
    view = topology().view()
    with pytest.raises(ValueError, match=r"tick_interval: expected seconds > 0, got"):
        FlowStateSync("h1", MemoryDatapath("h1", "192.0.2.1"), view, tick_interval=bad)
