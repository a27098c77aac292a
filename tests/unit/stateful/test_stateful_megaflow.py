"""Stateful megaflow soundness: with security-group chains (conntrack per port) and a router
doing SNAT/rev_snat, every packet that hits a cached flow gets what a fresh simulation would
give it -- while connections open, are used from both sides and expire. Flows are installed
and invalidated as the agent does (`FlowStateSync.finish`: commit, then invalidate the tags
of opened connections and new bindings; expiry and eviction invalidate theirs). The tables
are drawn unbounded or bounded to a few entries, so a full table's evictions are exercised:
an evicted entry's flows must go exactly as an expired entry's do."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    nat_reply_tag,
    nat_tag,
)
from hivenet.model import (
    Direction,
    NatTarget,
    RuleAction,
    SecurityGroup,
    SecurityGroupRule,
)
from hivenet.packets import extract_flow_match
from hivenet.sim import MemoryTables, SimContext, simulate
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


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_stateful_cached_flows_give_what_a_fresh_simulation_gives(data: Any) -> None:
    topo = topology()
    view = topo.view()
    tables = MemoryTables()
    for ip, n in [(VMS[v][0], VMS[v][1]) for v in VMS]:
        router = "r"
        tables.neighbours[(router, 4, int(ipaddress.ip_address(ip)))] = int(
            mac(n).replace(":", ""), 16
        )
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
        ctx = SimContext(topology=view, tables=tables, local_host_id="h1", flow_state=hook)
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
            assert reused <= fresh.tags | hook.transaction.tags | opened_tags
            flows.invalidate(tags)
        forget(conntrack.take_evicted(), nat.take_evicted())
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
