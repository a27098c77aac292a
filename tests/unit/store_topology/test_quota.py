"""Quotas: each counted kind refused at its project's limit inside the create's own txn,
deletes (cascades too) free it, a limit lowered below usage refuses creates and deletes
nothing, the cluster admin's own tenant is not counted, a race for the last unit has one
winner, and a store from before quotas is counted from its objects."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from hivenet.api.tenancy import INFRASTRUCTURE_KINDS
from hivenet.model import (
    KINDS,
    Bridge,
    Chain,
    HealthMonitor,
    HealthMonitorType,
    IpAddrGroup,
    Listener,
    LoadBalancer,
    Member,
    Pool,
    PortGroup,
    Route,
    Router,
    RouteType,
    Rule,
    RuleAction,
    TopologyObject,
)
from hivenet.model.security import FloatingIp, SecurityGroup, SecurityGroupRule
from hivenet.model.subnet import Subnet
from hivenet.store.quota import (
    DEFAULT_QUOTAS,
    QuotaValueError,
    read_quotas,
    read_usage,
    reset_quotas,
    set_quotas,
    usage_key,
)
from hivenet.store.topology import OverQuotaError, ProjectScope, TopologyRepository
from tests.unit.store_topology.conftest import Runner
from tests.unit.store_topology.invariants import assert_consistent, dump
from tests.unit.store_topology.test_concurrency import RivalStore, bridge_port

ACME = ProjectScope("acme")


async def _parents(repo: TopologyRepository, tenant: str = "acme") -> None:
    await repo.create(Bridge(id="net", tenant_id=tenant))
    await repo.create(Router(id="gw", tenant_id=tenant))
    await repo.create(SecurityGroup(id="sg", tenant_id=tenant))
    await repo.create(Chain(id="ch", tenant_id=tenant))
    await repo.create(LoadBalancer(id="lb", router_id="gw", tenant_id=tenant))
    await repo.create(Pool(id="pl", load_balancer_id="lb", tenant_id=tenant))


def _factories(tenant: str = "acme") -> dict[str, Callable[[int], TopologyObject]]:
    """kind -> the n-th new object of that kind in `tenant` (parents from `_parents`)."""
    return {
        "bridge": lambda n: Bridge(tenant_id=tenant),
        "subnet": lambda n: Subnet(
            bridge_id="net", cidr=ipaddress.ip_network(f"10.{n}.0.0/24"), tenant_id=tenant
        ),
        "port": lambda n: bridge_port("net", tenant_id=tenant),
        "router": lambda n: Router(tenant_id=tenant),
        "floating_ip": lambda n: FloatingIp(
            floating_ip_address=ipaddress.ip_address(f"192.0.2.{n + 1}"),
            router_id="gw",
            tenant_id=tenant,
        ),
        "security_group": lambda n: SecurityGroup(tenant_id=tenant),
        "security_group_rule": lambda n: SecurityGroupRule(
            security_group_id="sg", direction="ingress", protocol=6, tenant_id=tenant
        ),
        "chain": lambda n: Chain(tenant_id=tenant),
        "rule": lambda n: Rule(chain_id="ch", action=RuleAction.DROP, tenant_id=tenant),
        "route": lambda n: Route(
            router_id="gw",
            dst_prefix=ipaddress.ip_network(f"10.{n}.0.0/16"),
            type=RouteType.BLACKHOLE,
            tenant_id=tenant,
        ),
        "ip_addr_group": lambda n: IpAddrGroup(tenant_id=tenant),
        "port_group": lambda n: PortGroup(tenant_id=tenant),
        "load_balancer": lambda n: LoadBalancer(router_id="gw", tenant_id=tenant),
        "listener": lambda n: Listener(
            load_balancer_id="lb",
            vip_address=ipaddress.ip_address("10.0.0.9"),
            protocol_port=80 + n,
            tenant_id=tenant,
        ),
        "pool": lambda n: Pool(load_balancer_id="lb", tenant_id=tenant),
        "member": lambda n: Member(
            pool_id="pl",
            address=ipaddress.ip_address(f"10.0.1.{n + 1}"),
            protocol_port=80,
            tenant_id=tenant,
        ),
        "health_monitor": lambda n: HealthMonitor(
            pool_id="pl", type=HealthMonitorType.TCP, tenant_id=tenant
        ),
    }


def test_every_kind_a_tenant_creates_has_a_quota_with_openstacks_defaults() -> None:
    tenant_kinds = set(KINDS) - INFRASTRUCTURE_KINDS
    assert set(DEFAULT_QUOTAS) == tenant_kinds
    neutron = ("bridge", 100), ("subnet", 100), ("port", 500), ("router", 10)
    more = ("floating_ip", 50), ("security_group", 10), ("security_group_rule", 100)
    lbaas = ("load_balancer", 10), ("pool", 10)  # neutron-lbaas's
    assert {kind: DEFAULT_QUOTAS[kind] for kind, _ in (*neutron, *more, *lbaas)} == dict(
        (*neutron, *more, *lbaas)
    )


@pytest.mark.parametrize("kind", sorted(DEFAULT_QUOTAS))
def test_each_kind_is_refused_at_its_limit_and_nothing_is_written(run: Runner, kind: str) -> None:
    async def body(repo: TopologyRepository) -> None:
        await _parents(repo)
        make = _factories()[kind]
        held = (await read_usage(repo.store, "acme"))[kind]  # the parents count too
        await set_quotas(repo.store, "acme", {kind: held + 2})
        await repo.create(make(1), scope=ACME)
        await repo.create(make(2))  # the cluster admin, in acme's name: counted and limited
        before = await dump(repo.store)
        for scope in (ACME, None):
            with pytest.raises(OverQuotaError) as caught:
                await repo.create(make(3), scope=scope)
            error = caught.value
            assert (error.kind, error.project, error.limit, error.usage) == (
                kind,
                "acme",
                held + 2,
                held + 2,
            )
            assert f"project acme may hold {held + 2} {kind} objects and holds {held + 2}" in str(
                error
            )
        assert await dump(repo.store) == before
        assert (await read_usage(repo.store, "acme"))[kind] == held + 2
        await assert_consistent(repo.store)

    run(body)


def test_a_delete_frees_quota_and_a_cascade_frees_every_child(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await set_quotas(repo.store, "acme", {"bridge": 1, "port": 3})
        await repo.create(Bridge(id="b1", tenant_id="acme"), scope=ACME)
        ports = [await repo.create(bridge_port("b1", tenant_id="acme")) for _ in range(3)]
        with pytest.raises(OverQuotaError):
            await repo.create(bridge_port("b1", tenant_id="acme"), scope=ACME)
        await repo.delete(type(ports[0].obj), ports[0].obj.id, scope=ACME)
        await repo.create(bridge_port("b1", tenant_id="acme"), scope=ACME)
        with pytest.raises(OverQuotaError):
            await repo.create(Bridge(tenant_id="acme"), scope=ACME)
        await repo.delete(Bridge, "b1", cascade=True, scope=ACME)
        assert await read_usage(repo.store, "acme") == dict.fromkeys(DEFAULT_QUOTAS, 0)
        await repo.create(Bridge(id="b2", tenant_id="acme"), scope=ACME)
        for _ in range(3):
            await repo.create(bridge_port("b2", tenant_id="acme"), scope=ACME)
        await assert_consistent(repo.store)

    run(body)


def test_a_quota_lowered_below_usage_refuses_creates_and_deletes_nothing(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        for _ in range(5):
            await repo.create(Router(tenant_id="acme"), scope=ACME)
        await set_quotas(repo.store, "acme", {"router": 2})
        assert (await read_usage(repo.store, "acme"))["router"] == 5
        assert len((await repo.list(Router, tenant_id="acme")).items) == 5
        with pytest.raises(OverQuotaError) as caught:
            await repo.create(Router(tenant_id="acme"), scope=ACME)
        assert (caught.value.limit, caught.value.usage) == (2, 5)
        # Deleting down to the limit is not enough; below it, creates work again.
        routers = (await repo.list(Router, tenant_id="acme")).items
        for stored in routers[:3]:
            await repo.delete(Router, stored.obj.id, scope=ACME)
        with pytest.raises(OverQuotaError):
            await repo.create(Router(tenant_id="acme"), scope=ACME)
        await repo.delete(Router, routers[3].obj.id, scope=ACME)
        await repo.create(Router(tenant_id="acme"), scope=ACME)
        await assert_consistent(repo.store)

    run(body)


def test_unlimited_zero_and_reset(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        assert await set_quotas(repo.store, "acme", {"router": 0}) == {
            **DEFAULT_QUOTAS,
            "router": 0,
        }
        with pytest.raises(OverQuotaError):
            await repo.create(Router(tenant_id="acme"), scope=ACME)
        await repo.create(Router(tenant_id="globex"))  # another project's quota is its own
        await set_quotas(repo.store, "acme", {"router": -1})
        for _ in range(DEFAULT_QUOTAS["router"] + 1):
            await repo.create(Router(tenant_id="acme"), scope=ACME)
        await reset_quotas(repo.store, "acme")
        assert await read_quotas(repo.store, "acme") == dict(DEFAULT_QUOTAS)
        with pytest.raises(OverQuotaError):
            await repo.create(Router(tenant_id="acme"), scope=ACME)
        # Setting a kind back to its default stores nothing for it.
        await set_quotas(repo.store, "acme", {"router": 10})
        assert await repo.store.get("/hivenet/v1/quotas/acme") is None

    run(body)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"host": 5}, "host"),
        ({"router": -2}, "router"),
        ({"router": True}, "router"),
        ({"router": "5"}, "router"),
        ({"port": 10**9}, "port"),
    ],
)
def test_a_bad_quota_names_the_kind(run: Runner, changes: dict[str, object], field: str) -> None:
    async def body(repo: TopologyRepository) -> None:
        with pytest.raises(QuotaValueError) as caught:
            await set_quotas(repo.store, "acme", changes)
        assert caught.value.field == field
        assert await read_quotas(repo.store, "acme") == dict(DEFAULT_QUOTAS)

    run(body)


def test_the_admin_tenant_is_not_counted_and_an_owner_change_moves_usage(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        for _ in range(DEFAULT_QUOTAS["router"] + 2):
            await repo.create(Router())  # tenant "admin": infrastructure, no quota
        assert (await repo.store.range("/hivenet/v1/usage/")).kvs == []
        await repo.create(Router(id="r1", tenant_id="acme"))
        await repo.update(Router(id="r1", tenant_id="globex"))
        assert (await read_usage(repo.store, "acme"))["router"] == 0
        assert (await read_usage(repo.store, "globex"))["router"] == 1
        await set_quotas(repo.store, "initech", {"router": 0})
        with pytest.raises(OverQuotaError):
            await repo.update(Router(id="r1", tenant_id="initech"))
        await assert_consistent(repo.store)

    run(body)


def test_a_store_from_before_quotas_is_counted_from_its_objects(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        for _ in range(4):
            await repo.create(Router(tenant_id="acme"))
        await repo.store.delete("/hivenet/v1/usage/", prefix=True)
        assert (await read_usage(repo.store, "acme"))["router"] == 4
        await set_quotas(repo.store, "acme", {"router": 5})
        await repo.create(Router(tenant_id="acme"), scope=ACME)
        assert (await repo.store.get(usage_key("acme", "router"))) is not None
        with pytest.raises(OverQuotaError) as caught:
            await repo.create(Router(tenant_id="acme"), scope=ACME)
        assert caught.value.usage == 5
        await assert_consistent(repo.store)

    run(body)


def test_a_rival_taking_the_last_unit_before_the_commit_refuses_the_create(run: Runner) -> None:
    """Both writers saw one unit left; the rival commits first, so this create's guarded
    counter read fails the commit, the retry re-reads it and is refused."""

    async def body(repo: TopologyRepository) -> None:
        await set_quotas(repo.store, "acme", {"router": 2})
        await repo.create(Router(tenant_id="acme"), scope=ACME)

        async def rival() -> None:
            await repo.create(Router(id="rival", tenant_id="acme"), scope=ACME)

        racing = TopologyRepository(RivalStore(repo.store, rival))
        with pytest.raises(OverQuotaError) as caught:
            await racing.create(Router(id="late", tenant_id="acme"), scope=ACME)
        assert (caught.value.limit, caught.value.usage) == (2, 2)
        ids = {stored.obj.id for stored in (await repo.list(Router, tenant_id="acme")).items}
        assert "rival" in ids and "late" not in ids
        await assert_consistent(repo.store)

    run(body)


@pytest.mark.parametrize("kind", sorted(DEFAULT_QUOTAS))
def test_a_race_for_the_last_unit_of_each_kind_has_one_winner(run: Runner, kind: str) -> None:
    """The same race as above for every counted kind (LB kinds, chains, rules, routes and
    address groups included): the rival's create commits, this one is refused, the counter
    matches the objects."""

    async def body(repo: TopologyRepository) -> None:
        await _parents(repo)
        make = _factories()[kind]
        held = (await read_usage(repo.store, "acme"))[kind]
        await set_quotas(repo.store, "acme", {kind: held + 1})
        rival_obj = make(1)

        async def rival() -> None:
            await repo.create(rival_obj, scope=ACME)

        racing = TopologyRepository(RivalStore(repo.store, rival))
        late = make(2)
        with pytest.raises(OverQuotaError) as caught:
            await racing.create(late, scope=ACME)
        assert (caught.value.kind, caught.value.limit, caught.value.usage) == (
            kind,
            held + 1,
            held + 1,
        )
        ids = {stored.obj.id for stored in (await repo.list(type(late), tenant_id="acme")).items}
        assert rival_obj.id in ids and late.id not in ids
        assert len(ids) == held + 1 == (await read_usage(repo.store, "acme"))[kind]
        await assert_consistent(repo.store)

    run(body)


def test_a_rival_lowering_the_quota_before_the_commit_refuses_the_create(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        async def rival() -> None:
            await set_quotas(repo.store, "acme", {"router": 0})

        racing = TopologyRepository(RivalStore(repo.store, rival))
        with pytest.raises(OverQuotaError):
            await racing.create(Router(tenant_id="acme"), scope=ACME)
        assert (await repo.list(Router, tenant_id="acme")).items == []

    run(body)
