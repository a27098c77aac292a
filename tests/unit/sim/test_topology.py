"""TopologyView: incremental updates equal a full build, touch only what changed, and return
the right invalidation tags; the compiled LPM agrees with a naive route choice."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from hivenet.model import IpAddrGroup, Route, RouteType
from hivenet.sim import TopologyView
from hivenet.sim.routing import RouteTable
from tests.unit.sim.topo import Topo


def sample_topology() -> Topo:
    topo = Topo()
    topo.chain("c")
    topo.rule("c", "drop", ip_addr_group_src_id="g")
    topo.add(IpAddrGroup(id="g", addresses=(ipaddress.ip_address("10.0.0.1"),)))
    topo.bridge("b1", inbound_chain_id="c")
    topo.bridge("b2")
    topo.router("r1")
    topo.router("r2")
    topo.vm_port("b1", "vm1", "h1", mac_n=1, addresses=("10.0.1.10/24",))
    topo.vm_port("b2", "vm2", "h2", mac_n=2)
    topo.link("b1", "r1", "10.0.1.1/24")
    topo.link("b2", "r1", "10.0.2.1/24")
    topo.link("b2", "r2", "10.0.2.2/24")
    topo.route("r1", "10.9.0.0/16", "r1-b2", gw="10.0.2.2")
    topo.zone({"h1": "192.0.2.1", "h2": "192.0.2.2"})
    return topo


def snapshot(view: TopologyView) -> dict[str, object]:
    return {
        "ports": {k: (v.port, v.addresses) for k, v in view.ports.items()},
        "bridges": {
            k: (v.port_ids, dict(v.static_macs), dict(v.arp_proxy_entries))
            for k, v in view.bridges.items()
        },
        "routers": {
            k: (
                v.port_ids,
                dict(v.own_addresses),
                len(v.routes_v4),
                v.routes_v4.lookup(0x0A090101, 0),
            )
            for k, v in view.routers.items()
        },
        "chains": {k: v.source for k, v in view.chains.items()},
        "underlay": dict(view.host_underlay_ip),
        "keys": dict(view.port_by_tunnel_key),
    }


@settings(max_examples=50, deadline=None)
@given(order=st.permutations(list(range(len(sample_topology().objects)))))
def test_any_arrival_order_gives_the_same_view(order: list[int]) -> None:
    objects = sample_topology().objects
    reference = snapshot(TopologyView.from_objects(objects))
    shuffled = [objects[i] for i in order]
    assert snapshot(TopologyView.from_objects(shuffled)) == reference
    one_at_a_time = TopologyView()
    for obj in shuffled:
        one_at_a_time.apply(obj)
    assert snapshot(one_at_a_time) == reference


def test_removing_and_re_adding_restores_the_view() -> None:
    objects = sample_topology().objects
    view = TopologyView.from_objects(objects)
    reference = snapshot(view)
    for obj in objects:
        view.remove(obj.KIND, obj.id)
    assert not view.ports and not view.routers and not view.chains
    for obj in reversed(objects):
        view.apply(obj)
    assert snapshot(view) == reference


def test_route_change_recompiles_only_its_router_and_tags_it() -> None:
    topo = sample_topology()
    view = topo.view()
    r2_before, b1_before, chain_before = view.routers["r2"], view.bridges["b1"], view.chains["c"]
    route = Route(
        router_id="r1", dst_prefix=ipaddress.ip_network("10.8.0.0/16"), type=RouteType.BLACKHOLE
    )
    tags = view.apply(route)
    assert "router:r1" in tags and "router:r2" not in tags
    assert view.routers["r2"] is r2_before and view.bridges["b1"] is b1_before
    assert view.chains["c"] is chain_before
    assert view.routers["r1"].routes_v4.lookup(0x0A080001, 0) is not None


def test_rule_and_ip_group_changes_tag_their_chain() -> None:
    topo = sample_topology()
    view = topo.view()
    rule = next(o for o in topo.objects if o.KIND == "rule")
    assert "chain:c" in view.apply(rule.model_copy(update={"position": 5}))
    assert "chain:c" in view.apply(IpAddrGroup(id="g", addresses=()))
    assert "chain:c" in view.remove("rule", rule.id)
    assert view.chains["c"].rules == ()


def test_port_change_tags_the_port_its_device_and_the_peer_device() -> None:
    topo = sample_topology()
    view = topo.view()
    router_port = topo.ports["r1-b1"]
    tags = view.apply(router_port.model_copy(update={"mac": "02:aa:00:00:00:01"}))
    assert {"port:r1-b1", "router:r1", "bridge:b1"} <= tags
    # The bridge's static entry follows the router port's new MAC.
    assert (0, 0x02AA00000001) in view.bridges["b1"].static_macs


def test_tunnel_zone_change_tags_hosts_whose_underlay_changed() -> None:
    topo = sample_topology()
    view = topo.view()
    zone = next(o for o in topo.objects if o.KIND == "tunnel_zone")
    members = (
        *zone.members[:1],
        zone.members[1].model_copy(update={"underlay_ip": ipaddress.ip_address("192.0.2.9")}),
    )
    tags = view.apply(zone.model_copy(update={"members": members}))
    assert "host:h2" in tags and "host:h1" not in tags
    assert view.host_underlay_ip["h2"] == "192.0.2.9"


def test_down_port_removes_its_routes_and_connected_subnet() -> None:
    topo = sample_topology()
    view = topo.view()
    view.apply(topo.ports["r1-b2"].model_copy(update={"admin_state_up": False}))
    assert view.routers["r1"].routes_v4.lookup(0x0A090101, 0) is None
    assert view.routers["r1"].routes_v4.lookup(0x0A000205, 0) is None


# --- LPM against a naive choice ---------------------------------------------------------------

prefixes = st.builds(
    lambda net, length: ipaddress.ip_network((net, length), strict=False),
    st.integers(0, 2**32 - 1).map(lambda v: v & 0xFF0F00F0),
    st.sampled_from([0, 8, 12, 16, 24, 28, 32]),
)


@settings(max_examples=200, deadline=None)
@given(
    routes=st.lists(
        st.tuples(prefixes, st.one_of(st.none(), prefixes), st.integers(0, 3), st.integers(1, 3)),
        max_size=12,
    ),
    dst=st.integers(0, 2**32 - 1).map(lambda v: v & 0xFF0F00FF),
    src=st.integers(0, 2**32 - 1).map(lambda v: v & 0xFF0F00FF),
)
def test_lpm_agrees_with_naive_choice(
    routes: list[tuple[ipaddress.IPv4Network, ipaddress.IPv4Network | None, int, int]],
    dst: int,
    src: int,
) -> None:
    objects = [
        Route(
            id=f"r{i}",
            router_id="r",
            dst_prefix=d,
            src_prefix=s,
            weight=w,
            next_hop_port_id=f"p{port}",
        )
        for i, (d, s, w, port) in enumerate(routes)
    ]
    group = RouteTable(32, objects).lookup(dst, src)
    dst_ip, src_ip = ipaddress.IPv4Address(dst), ipaddress.IPv4Address(src)
    candidates = [
        r
        for r in objects
        if dst_ip in r.dst_prefix and (r.src_prefix is None or src_ip in r.src_prefix)
    ]
    if not candidates:
        assert group is None
        return
    assert group is not None
    best = max(
        (r.dst_prefix.prefixlen, r.src_prefix.prefixlen if r.src_prefix else 0) for r in candidates
    )
    tied = [
        r
        for r in candidates
        if (r.dst_prefix.prefixlen, r.src_prefix.prefixlen if r.src_prefix else 0) == best
    ]
    best_weight = min(r.weight for r in tied)
    expected_ports = {r.next_hop_port_id for r in tied if r.weight == best_weight}
    assert {hop.port_id for hop in group.next_hops} == expected_ports
