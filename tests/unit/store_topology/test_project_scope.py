"""`ProjectScope`: a scoped write references only its project's or shared objects, checked in
the write's own txn (a rival change between the check and the commit makes it retry and
re-check), and changes no object of another project."""

from __future__ import annotations

import pytest

from hivenet.model import Bridge, Chain, DeviceKind, Port, Router
from hivenet.model.subnet import Subnet
from hivenet.model.types import FixedIp
from hivenet.store.topology import (
    ConflictError,
    DanglingReferenceError,
    InvalidFieldError,
    ProjectScope,
    TopologyRepository,
)
from tests.unit.store_topology.conftest import Runner
from tests.unit.store_topology.invariants import assert_consistent, dump
from tests.unit.store_topology.test_concurrency import RivalStore, bridge_port

ACME = ProjectScope("acme")


def test_another_projects_object_is_refused_exactly_like_a_missing_one(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await repo.create(Bridge(id="theirs", tenant_id="globex"))
        errors = []
        for target in ("theirs", "nowhere"):
            with pytest.raises(DanglingReferenceError) as caught:
                await repo.create(bridge_port(target, tenant_id="acme"), scope=ACME)
            errors.append(str(caught.value).replace(target, "X"))
        assert errors[0] == errors[1] == "device_id='X': no bridge with that id"
        # Unscoped (the cluster admin), the same write is allowed.
        await repo.create(bridge_port("theirs", tenant_id="acme"))

    run(body)


def test_a_shared_bridge_may_be_referenced(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await repo.create(Bridge(id="ext", tenant_id="ops", shared=True))
        stored = await repo.create(bridge_port("ext", tenant_id="acme"), scope=ACME)
        assert stored.obj.device_id == "ext"

    run(body)


def test_a_port_takes_an_address_on_a_shared_bridges_subnet_but_not_a_private_ones(
    run: Runner,
) -> None:
    async def body(repo: TopologyRepository) -> None:
        await repo.create(Bridge(id="ext", tenant_id="ops", shared=True))
        await repo.create(Subnet(id="ext-v4", bridge_id="ext", cidr="10.9.0.0/24", tenant_id="ops"))
        port = bridge_port("ext", tenant_id="acme").model_copy(
            update={"fixed_ips": (FixedIp(subnet_id="ext-v4"),)}
        )
        stored = await repo.create(port, scope=ACME)
        assert str(stored.obj.fixed_ips[0].ip_address).startswith("10.9.0.")
        # The same on a bridge that is not shared looks exactly like a missing subnet.
        await repo.create(Bridge(id="priv", tenant_id="ops"))
        await repo.create(
            Subnet(id="priv-v4", bridge_id="priv", cidr="10.8.0.0/24", tenant_id="ops")
        )
        hidden = bridge_port("ext", tenant_id="acme").model_copy(
            update={"fixed_ips": (FixedIp(subnet_id="priv-v4"),)}
        )
        with pytest.raises(DanglingReferenceError) as caught:
            await repo.create(hidden, scope=ACME)
        assert caught.value.field == "fixed_ips" and caught.value.kind == "subnet"
        await assert_consistent(repo.store)

    run(body)


def test_another_project_attaches_ports_to_a_shared_bridge_but_adds_no_subnet(
    run: Runner,
) -> None:
    async def body(repo: TopologyRepository) -> None:
        await repo.create(Bridge(id="ext", tenant_id="ops", shared=True))
        before = await dump(repo.store)
        with pytest.raises(InvalidFieldError) as caught:
            await repo.create(
                Subnet(bridge_id="ext", cidr="10.7.0.0/24", tenant_id="acme"), scope=ACME
            )
        assert caught.value.field == "bridge_id" and "shared by another project" in str(
            caught.value
        )
        assert await dump(repo.store) == before
        # Its own project (and the cluster admin) may.
        await repo.create(
            Subnet(bridge_id="ext", cidr="10.7.0.0/24", tenant_id="ops"), scope=ProjectScope("ops")
        )
        await repo.create(Subnet(bridge_id="ext", cidr="10.6.0.0/24", tenant_id="acme"))
        await assert_consistent(repo.store)

    run(body)


def test_a_bridge_unshared_before_the_commit_refuses_an_address_on_its_subnet(
    run: Runner,
) -> None:
    """The subnet's bridge is read guarded: unsharing it between the check and the commit
    fails the commit, and the retry refuses the reference."""

    async def body(repo: TopologyRepository) -> None:
        await repo.create(Bridge(id="ext", tenant_id="ops", shared=True))
        await repo.create(Bridge(id="mine", tenant_id="acme"))
        await repo.create(Subnet(id="ext-v4", bridge_id="ext", cidr="10.9.0.0/24", tenant_id="ops"))

        async def rival() -> None:
            await repo.update(Bridge(id="ext", tenant_id="ops", shared=False))

        racing = TopologyRepository(RivalStore(repo.store, rival))
        # A router port on acme's own router may hold an address on any visible subnet.
        await repo.create(Router(id="r", tenant_id="acme"))
        port = Port(
            tenant_id="acme",
            device_kind=DeviceKind.ROUTER,
            device_id="r",
            fixed_ips=(FixedIp(subnet_id="ext-v4", ip_address="10.9.0.7"),),
        )
        with pytest.raises(DanglingReferenceError):
            await racing.create(port, scope=ACME)
        assert (await repo.list(Port, tenant_id="acme")).items == []
        await assert_consistent(repo.store)

    run(body)


def test_a_target_moved_to_another_project_before_the_commit_refuses_the_write(
    run: Runner,
) -> None:
    """The check is part of the txn: the reference was read as acme's, a rival moved it to
    globex just before the commit, so the commit fails, the retry re-checks and refuses."""

    async def body(repo: TopologyRepository) -> None:
        await repo.create(Bridge(id="b1", tenant_id="acme"))

        async def rival() -> None:
            await repo.update(Bridge(id="b1", tenant_id="globex"))

        racing = TopologyRepository(RivalStore(repo.store, rival))
        with pytest.raises(DanglingReferenceError) as caught:
            await racing.create(bridge_port("b1", tenant_id="acme"), scope=ACME)
        assert caught.value.field == "device_id"
        assert [p.obj.id for p in (await repo.list(Port)).items] == []
        await assert_consistent(repo.store)

    run(body)


def test_a_shared_flag_cleared_before_the_commit_refuses_the_write(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await repo.create(Bridge(id="ext", tenant_id="ops", shared=True))

        async def rival() -> None:
            await repo.update(Bridge(id="ext", tenant_id="ops", shared=False))

        racing = TopologyRepository(RivalStore(repo.store, rival))
        with pytest.raises(DanglingReferenceError):
            await racing.create(bridge_port("ext", tenant_id="acme"), scope=ACME)
        assert (await repo.list(Port)).items == []

    run(body)


def test_a_kept_reference_to_another_project_is_refused_on_a_scoped_update(
    run: Runner,
) -> None:
    """Scoped, every reference the written object holds is checked, not only new ones (an
    admin-made cross-project reference cannot be carried along by a tenant)."""

    async def body(repo: TopologyRepository) -> None:
        await repo.create(Chain(id="theirs", tenant_id="globex"))
        await repo.create(Bridge(id="b1", tenant_id="acme", inbound_chain_id="theirs"))
        with pytest.raises(DanglingReferenceError) as caught:
            await repo.update(
                Bridge(id="b1", tenant_id="acme", inbound_chain_id="theirs", name="x"),
                scope=ACME,
            )
        assert caught.value.field == "inbound_chain_id"

    run(body)


def test_a_scoped_delete_never_changes_another_projects_objects(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await repo.create(Bridge(id="ext", tenant_id="acme", shared=True))
        await repo.create(bridge_port("ext", id="p1", tenant_id="globex"))
        before = await dump(repo.store)
        for cascade in (False, True):
            with pytest.raises(ConflictError) as caught:
                await repo.delete(Bridge, "ext", cascade=cascade, scope=ACME)
            assert "p1" not in str(caught.value)
        assert await dump(repo.store) == before

    run(body)


def test_a_scoped_link_to_another_projects_port_looks_missing(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        from hivenet.model import Router

        await repo.create(Router(id="r1", tenant_id="acme"))
        await repo.create(Bridge(id="b2", tenant_id="globex"))
        await repo.create(bridge_port("b2", id="their-port", tenant_id="globex"))
        with pytest.raises(DanglingReferenceError) as caught:
            await repo.create(
                Port.model_validate(
                    {
                        "device_kind": "router",
                        "device_id": "r1",
                        "tenant_id": "acme",
                        "peer_id": "their-port",
                    }
                ),
                scope=ACME,
            )
        assert caught.value.field == "peer_id"
        assert (await repo.get(Port, "their-port")).obj.peer_id is None

    run(body)


def test_a_scoped_update_whose_side_effect_reaches_another_project_is_refused(
    run: Runner,
) -> None:
    """An admin linked acme's router port to globex's port; acme unlinking its own port
    would change globex's port: refused."""

    async def body(repo: TopologyRepository) -> None:
        from hivenet.model import Router

        await repo.create(Router(id="r1", tenant_id="acme"))
        await repo.create(Bridge(id="b2", tenant_id="globex"))
        await repo.create(bridge_port("b2", id="theirs", tenant_id="globex"))
        mine = Port.model_validate(
            {"id": "mine", "device_kind": "router", "device_id": "r1", "tenant_id": "acme"}
        )
        await repo.create(mine.model_copy(update={"peer_id": "theirs"}))
        with pytest.raises(ConflictError):
            await repo.update(mine, scope=ACME)
        assert (await repo.get(Port, "theirs")).obj.peer_id == "mine"

    run(body)
