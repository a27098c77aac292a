"""The load-balancer kinds in the topology repository: the pool fit rules run inside the
write, the fields they rely on cannot change, children can be listed by parent, and a
cascade delete takes a load balancer's whole tree (and nothing is half-written on refusal)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from hivenet.model import (
    HealthMonitor,
    HealthMonitorType,
    LbProtocol,
    Listener,
    LoadBalancer,
    Member,
    Pool,
    Router,
    TopologyObject,
)
from hivenet.store.topology import (
    DanglingReferenceError,
    InvalidFieldError,
    NotFoundError,
    ReferencedError,
    TopologyRepository,
)
from tests.unit.store_topology.conftest import RepoBody, run_on
from tests.unit.store_topology.invariants import assert_consistent, dump


def run(body: RepoBody) -> None:
    run_on("memory://", body)


@dataclass
class Tree:
    router: Router
    load_balancer: LoadBalancer
    pool: Pool
    listener: Listener
    member: Member
    monitor: HealthMonitor


async def build_tree(repo: TopologyRepository) -> Tree:
    router = (await repo.create(Router(name="edge"))).obj
    load_balancer = (await repo.create(LoadBalancer(router_id=router.id))).obj
    pool = (await repo.create(Pool(load_balancer_id=load_balancer.id))).obj
    listener = (
        await repo.create(
            Listener(
                load_balancer_id=load_balancer.id,
                vip_address=ipaddress.ip_address("203.0.113.10"),
                protocol_port=80,
                default_pool_id=pool.id,
            )
        )
    ).obj
    member = (
        await repo.create(
            Member(pool_id=pool.id, address=ipaddress.ip_address("10.0.0.5"), protocol_port=80)
        )
    ).obj
    monitor = (await repo.create(HealthMonitor(pool_id=pool.id, type=HealthMonitorType.TCP))).obj
    return Tree(router, load_balancer, pool, listener, member, monitor)


def test_pool_fit_is_checked_inside_the_write() -> None:
    async def body(repo: TopologyRepository) -> None:
        tree = await build_tree(repo)
        other_lb = (await repo.create(LoadBalancer(router_id=tree.router.id))).obj
        before = await dump(repo.store)
        refusals = [
            (
                Member(
                    pool_id=tree.pool.id,
                    address=ipaddress.ip_address("2001:db8::5"),
                    protocol_port=80,
                ),
                "address",
            ),
            (HealthMonitor(pool_id=tree.pool.id, type=HealthMonitorType.UDP), "type"),
            (
                Listener(
                    load_balancer_id=other_lb.id,
                    vip_address=ipaddress.ip_address("203.0.113.11"),
                    protocol_port=80,
                    default_pool_id=tree.pool.id,
                ),
                "default_pool_id",
            ),
            (
                Listener(
                    load_balancer_id=tree.load_balancer.id,
                    vip_address=ipaddress.ip_address("203.0.113.11"),
                    protocol=LbProtocol.UDP,
                    protocol_port=53,
                    default_pool_id=tree.pool.id,
                ),
                "default_pool_id",
            ),
        ]
        for obj, field in refusals:
            with pytest.raises(InvalidFieldError) as caught:
                await repo.create(obj)
            assert caught.value.field == field
        # An update is checked too: moving the VIP to IPv6 no longer fits the IPv4 pool.
        with pytest.raises(InvalidFieldError) as caught:
            await repo.update(
                tree.listener.model_copy(
                    update={"vip_address": ipaddress.ip_address("2001:db8::10")}
                )
            )
        assert caught.value.field == "vip_address"
        with pytest.raises(DanglingReferenceError) as dangling:
            await repo.create(
                Member(pool_id="nope", address=ipaddress.ip_address("10.0.0.6"), protocol_port=80)
            )
        assert dangling.value.field == "pool_id"
        assert await dump(repo.store) == before

    run(body)


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("pool", "protocol", LbProtocol.UDP),
        ("pool", "ip_version", 6),
        ("pool", "load_balancer_id", "other"),
        ("member", "pool_id", "other"),
        ("health_monitor", "pool_id", "other"),
        ("listener", "load_balancer_id", "other"),
    ],
)
def test_fields_other_objects_were_checked_against_are_immutable(
    kind: str, field: str, value: object
) -> None:
    async def body(repo: TopologyRepository) -> None:
        tree = await build_tree(repo)
        await repo.create(LoadBalancer(id="other", router_id=tree.router.id))
        await repo.create(Pool(id="other", load_balancer_id="other"))
        obj = {
            "pool": tree.pool,
            "member": tree.member,
            "health_monitor": tree.monitor,
            "listener": tree.listener,
        }[kind]
        with pytest.raises(InvalidFieldError) as caught:
            await repo.update(obj.model_copy(update={field: value}))
        assert caught.value.field == field

    run(body)


def test_children_are_listed_by_parent() -> None:
    async def body(repo: TopologyRepository) -> None:
        tree = await build_tree(repo)
        second_pool = (await repo.create(Pool(load_balancer_id=tree.load_balancer.id))).obj
        await repo.create(
            Member(
                pool_id=second_pool.id, address=ipaddress.ip_address("10.0.0.7"), protocol_port=1
            )
        )
        page = await repo.list(Member, field_filters={"pool_id": tree.pool.id})
        assert [item.obj for item in page.items] == [tree.member]
        pools = await repo.list(Pool, field_filters={"load_balancer_id": tree.load_balancer.id})
        assert {item.obj.id for item in pools.items} == {tree.pool.id, second_pool.id}

    run(body)


async def assert_gone(repo: TopologyRepository, *objects: tuple[type[TopologyObject], str]) -> None:
    for cls, object_id in objects:
        with pytest.raises(NotFoundError):
            await repo.get(cls, object_id)


def test_delete_needs_cascade_and_cascade_takes_the_whole_tree() -> None:
    async def body(repo: TopologyRepository) -> None:
        tree = await build_tree(repo)
        with pytest.raises(ReferencedError):
            await repo.delete(LoadBalancer, tree.load_balancer.id)
        # Deleting only the pool clears the listener's default pool and takes its children.
        await repo.delete(Pool, tree.pool.id, cascade=True)
        listener = (await repo.get(Listener, tree.listener.id)).obj
        assert listener.default_pool_id is None
        await assert_gone(repo, (Member, tree.member.id), (HealthMonitor, tree.monitor.id))
        await assert_consistent(repo.store)
        # Deleting the router takes the load balancer and its listener with it.
        await repo.delete(Router, tree.router.id, cascade=True)
        await assert_gone(repo, (LoadBalancer, tree.load_balancer.id), (Listener, tree.listener.id))
        await assert_consistent(repo.store)

    run(body)
