"""TopologyRepository: create/get/list/update/delete, referential integrity, cascade, peering
and tunnel keys, each on the in-memory store and on a SQLite file."""

from __future__ import annotations

import ipaddress
from typing import Any

import pydantic
import pytest

from hivenet.model import (
    KINDS,
    Bridge,
    Chain,
    DeviceKind,
    Host,
    Port,
    PortGroup,
    Route,
    Router,
    RouteType,
    Rule,
    RuleAction,
    TopologyObject,
    TunnelZone,
    TunnelZoneMember,
    topology_key,
)
from hivenet.store.base import StoreCorruptError
from hivenet.store.topology import (
    TUNNEL_KEY_COUNTER_KEY,
    ConflictError,
    DanglingReferenceError,
    InvalidFieldError,
    NotFoundError,
    ReferencedError,
    Referrer,
    RevisionMismatchError,
    TopologyRepository,
    tunnel_key_index_key,
)
from tests.unit.store_topology.conftest import Runner
from tests.unit.store_topology.invariants import assert_consistent, dump, objects
from tests.unit.store_topology.topologies import build


def bridge_port(bridge: Bridge, **fields: Any) -> Port:
    return Port(device_kind=DeviceKind.BRIDGE, device_id=bridge.id, **fields)


def router_port(router: Router, **fields: Any) -> Port:
    return Port(device_kind=DeviceKind.ROUTER, device_id=router.id, **fields)


# ---- create / get


def test_every_kind_round_trips_with_its_revision(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        net = await build(repo)
        built: list[TopologyObject] = [
            value for value in vars(net).values() if isinstance(value, TopologyObject)
        ]
        assert {obj.KIND for obj in built} == set(KINDS)
        for obj in built:
            stored = await repo.get(type(obj), obj.id)
            assert stored.obj == obj
            kv = await repo.store.get(topology_key(obj.KIND, obj.id))
            assert kv is not None and stored.mod_revision == kv.mod_revision
        await assert_consistent(repo.store)

    run(body)


def test_create_returns_the_commit_revision(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        before = await repo.store.current_revision()
        created = await repo.create(Chain(name="c"))
        assert created.mod_revision == before + 1 == await repo.store.current_revision()

    run(body)


def test_duplicate_id_is_a_conflict_and_changes_nothing(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await repo.create(Chain(id="c1", name="first"))
        before = await dump(repo.store)
        with pytest.raises(ConflictError, match="already exists"):
            await repo.create(Chain(id="c1", name="second"))
        assert await dump(repo.store) == before

    run(body)


def test_get_missing_is_not_found(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        with pytest.raises(NotFoundError) as caught:
            await repo.get(Bridge, "nope")
        assert (caught.value.kind, caught.value.object_id) == ("bridge", "nope")

    run(body)


def test_corrupt_stored_object_is_reported_as_corrupt(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await repo.store.put(topology_key("bridge", "b1"), b"{not json")
        with pytest.raises(StoreCorruptError, match="bridge/b1"):
            await repo.get(Bridge, "b1")
        with pytest.raises(StoreCorruptError):
            await repo.list(Bridge)

    run(body)


# ---- referential integrity


DANGLING_CASES: list[tuple[str, str, str]] = [
    # (what to create, field named in the error, kind named in the error)
    ("bridge_inbound_chain", "inbound_chain_id", "chain"),
    ("port_on_missing_bridge", "device_id", "bridge"),
    ("router_port_on_a_bridge_id", "device_id", "router"),
    ("port_missing_host", "host_id", "host"),
    ("port_missing_group", "port_group_ids", "port_group"),
    ("port_missing_peer", "peer_id", "port"),
    ("route_missing_router", "router_id", "router"),
    ("route_missing_next_hop", "next_hop_port_id", "port"),
    ("rule_missing_chain", "chain_id", "chain"),
    ("rule_missing_jump_chain", "jump_chain_id", "chain"),
    ("rule_missing_in_port", "in_port_ids", "port"),
    ("rule_missing_ip_group", "ip_addr_group_dst_id", "ip_addr_group"),
    ("tunnel_zone_missing_host", "members", "host"),
]


def _dangling_object(case: str, bridge: Bridge, router: Router, chain: Chain) -> TopologyObject:
    missing = "missing-1"
    net4 = ipaddress.ip_network("10.9.0.0/16")
    objects_by_case: dict[str, TopologyObject] = {
        "bridge_inbound_chain": Bridge(inbound_chain_id=missing),
        "port_on_missing_bridge": Port(device_kind=DeviceKind.BRIDGE, device_id=missing),
        "router_port_on_a_bridge_id": Port(device_kind=DeviceKind.ROUTER, device_id=bridge.id),
        "port_missing_host": bridge_port(bridge, host_id=missing, interface_name="hn-x"),
        "port_missing_group": bridge_port(bridge, port_group_ids=(missing,)),
        "port_missing_peer": router_port(router, peer_id=missing),
        "route_missing_router": Route(router_id=missing, dst_prefix=net4, type=RouteType.BLACKHOLE),
        "route_missing_next_hop": Route(
            router_id=router.id, dst_prefix=net4, next_hop_port_id=missing
        ),
        "rule_missing_chain": Rule(chain_id=missing, action=RuleAction.ACCEPT),
        "rule_missing_jump_chain": Rule(
            chain_id=chain.id, action=RuleAction.JUMP, jump_chain_id=missing
        ),
        "rule_missing_in_port": Rule(
            chain_id=chain.id, action=RuleAction.DROP, in_port_ids=(missing,)
        ),
        "rule_missing_ip_group": Rule(
            chain_id=chain.id, action=RuleAction.DROP, ip_addr_group_dst_id=missing
        ),
        "tunnel_zone_missing_host": TunnelZone(
            members=(
                TunnelZoneMember(host_id=missing, underlay_ip=ipaddress.ip_address("10.0.0.1")),
            )
        ),
    }
    return objects_by_case[case]


@pytest.mark.parametrize(("case", "field", "kind"), DANGLING_CASES)
def test_reference_to_missing_object_is_refused(
    run: Runner, case: str, field: str, kind: str
) -> None:
    async def body(repo: TopologyRepository) -> None:
        bridge = (await repo.create(Bridge(id="b1"))).obj
        router = (await repo.create(Router(id="r1"))).obj
        chain = (await repo.create(Chain(id="c1"))).obj
        obj = _dangling_object(case, bridge, router, chain)
        before = await dump(repo.store)
        with pytest.raises(DanglingReferenceError) as caught:
            await repo.create(obj)
        assert (caught.value.field, caught.value.kind) == (field, kind)
        assert caught.value.value in ("missing-1", bridge.id)
        assert await dump(repo.store) == before

    run(body)


def test_update_adding_a_missing_reference_is_refused(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        bridge = (await repo.create(Bridge(name="b"))).obj
        before = await dump(repo.store)
        with pytest.raises(DanglingReferenceError) as caught:
            await repo.update(bridge.model_copy(update={"outbound_chain_id": "gone"}))
        assert (caught.value.field, caught.value.value) == ("outbound_chain_id", "gone")
        assert await dump(repo.store) == before

    run(body)


def test_route_next_hop_must_be_a_port_of_its_router(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        r1 = (await repo.create(Router())).obj
        r2 = (await repo.create(Router())).obj
        port_of_r2 = (await repo.create(router_port(r2))).obj
        with pytest.raises(InvalidFieldError) as caught:
            await repo.create(
                Route(
                    router_id=r1.id,
                    dst_prefix=ipaddress.ip_network("10.0.0.0/8"),
                    next_hop_port_id=port_of_r2.id,
                )
            )
        assert caught.value.field == "next_hop_port_id"
        assert r2.id in str(caught.value)

    run(body)


def test_update_keeps_the_reverse_index_exact(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        c1 = (await repo.create(Chain())).obj
        c2 = (await repo.create(Chain())).obj
        bridge = (await repo.create(Bridge(inbound_chain_id=c1.id))).obj
        await repo.update(bridge.model_copy(update={"inbound_chain_id": c2.id}))
        await assert_consistent(repo.store)
        # c1 is free again, c2 is not.
        await repo.delete(Chain, c1.id)
        with pytest.raises(ReferencedError):
            await repo.delete(Chain, c2.id)
        await repo.update(
            bridge.model_copy(update={"inbound_chain_id": c2.id, "outbound_chain_id": c2.id})
        )
        await assert_consistent(repo.store)

    run(body)


# ---- update


def test_update_with_stale_revision_is_refused(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        created = await repo.create(Chain(name="a"))
        updated = await repo.update(
            created.obj.model_copy(update={"name": "b"}), expected_revision=created.mod_revision
        )
        assert updated.mod_revision > created.mod_revision
        before = await dump(repo.store)
        with pytest.raises(RevisionMismatchError) as caught:
            await repo.update(
                created.obj.model_copy(update={"name": "c"}),
                expected_revision=created.mod_revision,
            )
        assert (caught.value.expected, caught.value.actual) == (
            created.mod_revision,
            updated.mod_revision,
        )
        assert await dump(repo.store) == before

    run(body)


def test_update_that_changes_nothing_writes_nothing(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        created = await repo.create(Chain(name="a"))
        revision = await repo.store.current_revision()
        again = await repo.update(created.obj)
        assert again.mod_revision == created.mod_revision
        assert await repo.store.current_revision() == revision

    run(body)


def test_update_of_missing_object_is_not_found(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        with pytest.raises(NotFoundError):
            await repo.update(Chain(id="nope"))

    run(body)


def test_owner_fields_cannot_change(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        b1 = (await repo.create(Bridge())).obj
        b2 = (await repo.create(Bridge())).obj
        port = (await repo.create(bridge_port(b1))).obj
        with pytest.raises(InvalidFieldError) as caught:
            await repo.update(port.model_copy(update={"device_id": b2.id}))
        assert (caught.value.field, caught.value.value) == ("device_id", b2.id)

    run(body)


def test_modify_rereads_and_propagates_validation_errors(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        bridge = (await repo.create(Bridge())).obj
        port = (await repo.create(bridge_port(bridge))).obj
        before = await dump(repo.store)
        with pytest.raises(pydantic.ValidationError):
            await repo.modify(
                Port, port.id, lambda p: Port.model_validate({**p.model_dump(), "mac": "zz"})
            )
        assert await dump(repo.store) == before
        renamed = await repo.modify(Port, port.id, lambda p: p.model_copy(update={"name": "x"}))
        assert renamed.obj.name == "x" and renamed.obj.tunnel_key == port.tunnel_key

    run(body)


# ---- delete and cascade


def test_delete_of_referenced_object_lists_referrers_and_changes_nothing(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        net = await build(repo)
        before = await dump(repo.store)
        with pytest.raises(ReferencedError) as caught:
            await repo.delete(Chain, net.chain.id)
        assert set(caught.value.referrers) == {
            Referrer("bridge", net.bridge.id, ("inbound_chain_id",)),
            Referrer("router", net.router.id, ("outbound_chain_id",)),
            Referrer("port", net.vm_port.id, ("outbound_chain_id",)),
            Referrer("rule", net.rule.id, ("chain_id",)),
            Referrer("rule", net.jump_rule.id, ("jump_chain_id",)),
        }
        assert await dump(repo.store) == before

    run(body)


def test_delete_unreferenced_with_expected_revision(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        created = await repo.create(Chain())
        with pytest.raises(RevisionMismatchError):
            await repo.delete(Chain, created.obj.id, expected_revision=created.mod_revision + 7)
        await repo.delete(Chain, created.obj.id, expected_revision=created.mod_revision)
        with pytest.raises(NotFoundError):
            await repo.get(Chain, created.obj.id)
        with pytest.raises(NotFoundError):
            await repo.delete(Chain, created.obj.id)
        await assert_consistent(repo.store)

    run(body)


def test_cascade_delete_of_router_takes_ports_routes_and_unlinks_peers(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        net = await build(repo)
        await repo.delete(Router, net.router.id, cascade=True)
        remaining = await objects(repo.store)
        gone = {net.router.id, net.router_downlink.id, net.router_uplink.id, net.route.id}
        assert not gone & {obj.id for obj in remaining.values()}
        uplink = (await repo.get(Port, net.bridge_uplink.id)).obj
        assert uplink.peer_id is None
        assert (await repo.get(Bridge, net.bridge.id)).obj == net.bridge
        await assert_consistent(repo.store)

    run(body)


def test_cascade_delete_of_chain_clears_and_deletes_dependents(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        net = await build(repo)
        await repo.delete(Chain, net.chain.id, cascade=True)
        assert (await repo.get(Bridge, net.bridge.id)).obj.inbound_chain_id is None
        assert (await repo.get(Router, net.router.id)).obj.outbound_chain_id is None
        assert (await repo.get(Port, net.vm_port.id)).obj.outbound_chain_id is None
        # Its own rule and the jump into it go; the chain that jumped stays.
        for rule in (net.rule, net.jump_rule):
            with pytest.raises(NotFoundError):
                await repo.get(Rule, rule.id)
        assert (await repo.get(Chain, net.jump_chain.id)).obj == net.jump_chain
        await assert_consistent(repo.store)

    run(body)


def test_cascade_delete_of_bridge_takes_ports_and_their_dependents(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        net = await build(repo)
        await repo.delete(Bridge, net.bridge.id, cascade=True)
        for port in (net.vm_port, net.bridge_uplink):
            with pytest.raises(NotFoundError):
                await repo.get(Port, port.id)
        # The rule matched only vm_port: without it, it would match every port, so it goes.
        with pytest.raises(NotFoundError):
            await repo.get(Rule, net.rule.id)
        assert (await repo.get(Port, net.router_downlink.id)).obj.peer_id is None
        await assert_consistent(repo.store)

    run(body)


def test_cascade_delete_of_port_takes_routes_and_shrinks_rule_port_lists(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        net = await build(repo)
        other = (await repo.create(bridge_port(net.bridge))).obj
        two_ports = (
            await repo.create(
                Rule(
                    chain_id=net.chain.id,
                    action=RuleAction.ACCEPT,
                    in_port_ids=(net.vm_port.id, other.id),
                    out_port_ids=(net.vm_port.id,),
                )
            )
        ).obj
        with pytest.raises(ReferencedError):
            await repo.delete(Port, net.router_uplink.id)
        await repo.delete(Port, net.router_uplink.id, cascade=True)
        with pytest.raises(NotFoundError):
            await repo.get(Route, net.route.id)
        await repo.delete(Port, net.vm_port.id, cascade=True)
        with pytest.raises(NotFoundError):  # out_port_ids emptied: the rule goes
            await repo.get(Rule, two_ports.id)
        await repo.delete(Port, other.id)
        await assert_consistent(repo.store)

    run(body)


def test_cascade_shrinks_a_port_list_that_keeps_members(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        bridge = (await repo.create(Bridge())).obj
        chain = (await repo.create(Chain())).obj
        p1 = (await repo.create(bridge_port(bridge))).obj
        p2 = (await repo.create(bridge_port(bridge))).obj
        rule = (
            await repo.create(
                Rule(chain_id=chain.id, action=RuleAction.DROP, in_port_ids=(p1.id, p2.id))
            )
        ).obj
        await repo.delete(Port, p1.id, cascade=True)
        assert (await repo.get(Rule, rule.id)).obj.in_port_ids == (p2.id,)
        await assert_consistent(repo.store)

    run(body)


def test_cascade_delete_of_host_unbinds_ports_and_leaves_tunnel_zones(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        net = await build(repo)
        with pytest.raises(ReferencedError) as caught:
            await repo.delete(Host, net.host.id)
        assert {r.kind for r in caught.value.referrers} == {"port", "tunnel_zone"}
        await repo.delete(Host, net.host.id, cascade=True)
        port = (await repo.get(Port, net.vm_port.id)).obj
        assert (port.host_id, port.interface_name) == (None, None)
        assert (await repo.get(TunnelZone, net.tunnel_zone.id)).obj.members == ()
        await assert_consistent(repo.store)

    run(body)


def test_cascade_delete_of_port_group_drops_membership_and_group_rules(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        net = await build(repo)
        group_rule = (
            await repo.create(
                Rule(chain_id=net.chain.id, action=RuleAction.DROP, port_group_id=net.port_group.id)
            )
        ).obj
        await repo.delete(PortGroup, net.port_group.id, cascade=True)
        assert (await repo.get(Port, net.vm_port.id)).obj.port_group_ids == ()
        with pytest.raises(NotFoundError):
            await repo.get(Rule, group_rule.id)
        await assert_consistent(repo.store)

    run(body)


def test_cascade_of_everything_leaves_an_empty_consistent_store(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        net = await build(repo)
        for cls, obj in (
            (Host, net.host),
            (Chain, net.chain),
            (Router, net.router),
            (Bridge, net.bridge),
        ):
            await repo.delete(cls, obj.id, cascade=True)
        remaining = {obj.KIND for obj in (await objects(repo.store)).values()}
        # Independent roots stay: chains, groups (security groups with their rules).
        assert remaining == {
            "chain",
            "port_group",
            "ip_addr_group",
            "tunnel_zone",
            "security_group",
            "security_group_rule",
        }
        await assert_consistent(repo.store)

    run(body)


# ---- interior links


def test_link_is_symmetric_and_follows_updates_and_deletes(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        bridge = (await repo.create(Bridge())).obj
        router = (await repo.create(Router())).obj
        b_port = (await repo.create(bridge_port(bridge))).obj
        b_port2 = (await repo.create(bridge_port(bridge))).obj
        r_port = (await repo.create(router_port(router, peer_id=b_port.id))).obj
        assert (await repo.get(Port, b_port.id)).obj.peer_id == r_port.id
        await assert_consistent(repo.store)
        # Re-point the router port: the old peer is released, the new one linked.
        await repo.update(r_port.model_copy(update={"peer_id": b_port2.id}))
        assert (await repo.get(Port, b_port.id)).obj.peer_id is None
        assert (await repo.get(Port, b_port2.id)).obj.peer_id == r_port.id
        await assert_consistent(repo.store)
        # Clearing from the other end unlinks both.
        current = (await repo.get(Port, b_port2.id)).obj
        await repo.update(current.model_copy(update={"peer_id": None}))
        assert (await repo.get(Port, r_port.id)).obj.peer_id is None
        await assert_consistent(repo.store)
        # Deleting one end (no cascade needed) clears the other.
        await repo.update(
            (await repo.get(Port, r_port.id)).obj.model_copy(update={"peer_id": b_port.id})
        )
        await repo.delete(Port, b_port.id)
        assert (await repo.get(Port, r_port.id)).obj.peer_id is None
        await assert_consistent(repo.store)

    run(body)


def test_router_to_router_link_is_allowed(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        r1 = (await repo.create(Router())).obj
        r2 = (await repo.create(Router())).obj
        a = (await repo.create(router_port(r1))).obj
        b = (await repo.create(router_port(r2, peer_id=a.id))).obj
        assert (await repo.get(Port, a.id)).obj.peer_id == b.id

    run(body)


def test_link_refusals_change_nothing(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        host = (await repo.create(Host())).obj
        b1 = (await repo.create(Bridge())).obj
        b2 = (await repo.create(Bridge())).obj
        router = (await repo.create(Router())).obj
        linked_bridge_port = (await repo.create(bridge_port(b1))).obj
        await repo.create(router_port(router, peer_id=linked_bridge_port.id))
        free_bridge_port = (await repo.create(bridge_port(b2))).obj
        bound_port = (
            await repo.create(bridge_port(b2, host_id=host.id, interface_name="hn-tap1"))
        ).obj
        same_router_port = (await repo.create(router_port(router))).obj
        before = await dump(repo.store)

        with pytest.raises(ConflictError, match="already linked"):
            await repo.create(router_port(router, peer_id=linked_bridge_port.id))
        with pytest.raises(InvalidFieldError, match="bridge-to-bridge") as bridge_bridge:
            await repo.create(bridge_port(b1, peer_id=free_bridge_port.id))
        assert bridge_bridge.value.field == "peer_id"
        with pytest.raises(InvalidFieldError, match="two different devices"):
            await repo.create(router_port(router, peer_id=same_router_port.id))
        with pytest.raises(ConflictError, match="bound to interface"):
            await repo.create(router_port(router, peer_id=bound_port.id))
        assert await dump(repo.store) == before

    run(body)


# ---- tunnel keys


def test_tunnel_keys_are_allocated_unique_and_immutable(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        bridge = (await repo.create(Bridge())).obj
        ports = [(await repo.create(bridge_port(bridge))).obj for _ in range(5)]
        assert [p.tunnel_key for p in ports] == [1, 2, 3, 4, 5]
        with pytest.raises(InvalidFieldError) as caught:
            await repo.create(bridge_port(bridge, tunnel_key=99))
        assert caught.value.field == "tunnel_key"
        with pytest.raises(InvalidFieldError):
            await repo.update(ports[0].model_copy(update={"tunnel_key": 7}))
        # 0 (not given) keeps the allocated key.
        kept = await repo.update(ports[0].model_copy(update={"tunnel_key": 0, "name": "n"}))
        assert kept.obj.tunnel_key == 1
        await repo.delete(Port, ports[1].id)
        assert await repo.store.get(tunnel_key_index_key(2)) is None
        await assert_consistent(repo.store)

    run(body)


def test_allocation_skips_taken_keys_and_wraps(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        bridge = (await repo.create(Bridge())).obj
        first = (await repo.create(bridge_port(bridge))).obj
        # The counter is only a hint: point it back at a taken key, then at the top.
        await repo.store.put(TUNNEL_KEY_COUNTER_KEY, b"0")
        second = (await repo.create(bridge_port(bridge))).obj
        assert (first.tunnel_key, second.tunnel_key) == (1, 2)
        await repo.store.put(TUNNEL_KEY_COUNTER_KEY, str(0xEFFFFF).encode())
        wrapped = (await repo.create(bridge_port(bridge))).obj
        assert wrapped.tunnel_key == 3
        await assert_consistent(repo.store)

    run(body)


def vtep_port(bridge: Bridge, vni: int, **fields: Any) -> Port:
    return bridge_port(bridge, vtep_ip=ipaddress.ip_address("192.0.2.200"), vtep_vni=vni, **fields)


def test_a_vtep_vni_is_reserved_in_the_tunnel_key_space(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        bridge = (await repo.create(Bridge())).obj
        first = (await repo.create(bridge_port(bridge))).obj  # key 1
        vtep = (await repo.create(vtep_port(bridge, 10))).obj  # takes key 10 as its VNI
        assert vtep.tunnel_key == 2  # and has its own key
        await repo.store.put(TUNNEL_KEY_COUNTER_KEY, b"9")  # the allocator comes to 10 next
        assert (await repo.create(bridge_port(bridge))).obj.tunnel_key == 11  # 10 is skipped
        for vni in (first.tunnel_key, 10):  # a port's key, another VTEP port's VNI
            with pytest.raises(InvalidFieldError) as caught:
                await repo.create(vtep_port(bridge, vni))
            assert (caught.value.field, caught.value.value) == ("vtep_vni", vni)
            assert "tunnel key" in str(caught.value)
        await assert_consistent(repo.store)
        # Changing the VNI frees the old one; deleting the port frees the new one.
        moved = await repo.update(vtep.model_copy(update={"vtep_vni": 4000, "tunnel_key": 0}))
        assert moved.obj.vtep_vni == 4000
        assert await repo.store.get(tunnel_key_index_key(10)) is None
        await assert_consistent(repo.store)
        await repo.delete(Port, vtep.id)
        assert await repo.store.get(tunnel_key_index_key(4000)) is None
        assert await repo.store.get(tunnel_key_index_key(vtep.tunnel_key)) is None
        await assert_consistent(repo.store)

    run(body)


def test_a_vtep_port_is_a_bridge_port_of_no_host() -> None:
    bridge = Bridge()
    for alone in ({"vtep_vni": 5}, {"vtep_ip": ipaddress.ip_address("192.0.2.9")}):
        with pytest.raises(pydantic.ValidationError, match="vtep_ip and vtep_vni go together"):
            bridge_port(bridge, **alone)
    for fields, named in (
        ({"host_id": "h1", "interface_name": "eth1"}, "bound to no host"),
        ({"vtep_ip": ipaddress.ip_address("2001:db8::1")}, "must be IPv4"),
        ({"port_security_enabled": True}, "port_security_enabled"),
    ):
        base = {"vtep_ip": ipaddress.ip_address("192.0.2.200"), "vtep_vni": 7}
        with pytest.raises(pydantic.ValidationError, match=named):
            bridge_port(bridge, **(base | fields))
    with pytest.raises(pydantic.ValidationError, match="only for bridge ports"):
        router_port(Router(), vtep_ip=ipaddress.ip_address("192.0.2.200"), vtep_vni=7)
    with pytest.raises(pydantic.ValidationError, match="vtep_vni"):
        bridge_port(bridge, vtep_ip=ipaddress.ip_address("192.0.2.200"), vtep_vni=0xF00000)
    with pytest.raises(pydantic.ValidationError, match="interface_vlan=100 needs a host"):
        bridge_port(bridge, interface_vlan=100)
    with pytest.raises(pydantic.ValidationError, match="interface_vlan"):
        bridge_port(bridge, host_id="h1", interface_name="eth1", interface_vlan=4095)


def test_deleting_a_host_unbinds_its_vlan_ports(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        bridge = (await repo.create(Bridge())).obj
        host = (await repo.create(Host(id="h1"))).obj
        port = (
            await repo.create(
                bridge_port(bridge, host_id=host.id, interface_name="eth1", interface_vlan=100)
            )
        ).obj
        await repo.delete(Host, host.id, cascade=True)
        unbound = (await repo.get(Port, port.id)).obj
        assert (unbound.host_id, unbound.interface_name, unbound.interface_vlan) == (None,) * 3

    run(body)


# ---- list


def test_list_filters_and_paginates_by_id(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        b1 = (await repo.create(Bridge(id="b1"))).obj
        b2 = (await repo.create(Bridge(id="b2"))).obj
        for index in range(7):
            await repo.create(
                bridge_port(b1, id=f"p{index:02d}", name="odd" if index % 2 else "even")
            )
        await repo.create(bridge_port(b2, id="q00", tenant_id="t2"))
        seen: list[str] = []
        marker = None
        while True:
            page = await repo.list(Port, limit=3, marker=marker)
            seen.extend(item.obj.id for item in page.items)
            assert len(page.items) <= 3
            if page.next_marker is None:
                break
            marker = page.next_marker
        assert seen == sorted(seen) == [f"p{i:02d}" for i in range(7)] + ["q00"]
        full = await repo.list(Port, limit=8)
        assert full.next_marker is None and len(full.items) == 8
        on_b1 = await repo.list(Port, field_filters={"device_id": "b1"}, name="odd")
        assert [item.obj.id for item in on_b1.items] == ["p01", "p03", "p05"]
        assert [i.obj.id for i in (await repo.list(Port, tenant_id="t2")).items] == ["q00"]
        exact = await repo.list(Port, field_filters={"device_id": "b1"}, limit=7)
        assert exact.next_marker is None
        with pytest.raises(InvalidFieldError):
            await repo.list(Port, field_filters={"mac": "02:00:00:00:00:01"})
        with pytest.raises(InvalidFieldError):
            await repo.list(Port, limit=0)
        with pytest.raises(InvalidFieldError):
            await repo.list(Port, limit=1001)

    run(body)
