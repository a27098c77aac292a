"""IPAM in the repository: fixed IPs allocated in the port's own txn, unique per subnet even
under concurrent writers, refused by field when impossible, freed with the port; subnets that
hold addresses are not deleted without cascade; subnets of a bridge never overlap."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from hivenet.model import Bridge, DeviceKind, FixedIp, Port, Router, Subnet
from hivenet.store import open_store
from hivenet.store.topology import (
    AddressInUseError,
    DanglingReferenceError,
    InvalidFieldError,
    ReferencedError,
    TopologyRepository,
    ip_index_key,
)
from tests.unit.store_topology.conftest import TEST_TIMEOUT, Runner
from tests.unit.store_topology.invariants import assert_consistent, dump
from tests.unit.store_topology.test_concurrency import InterleavingStore


def on_subnet(subnet_id: str, address: str | None = None, **fields: Any) -> Port:
    return Port.model_validate(
        {
            "device_kind": "bridge",
            "device_id": "b1",
            "fixed_ips": [{"subnet_id": subnet_id, "ip_address": address}],
            **fields,
        }
    )


async def small_net(repo: TopologyRepository, cidr: str = "10.0.0.0/29", **fields: Any) -> Subnet:
    await repo.create(Bridge(id="b1"))
    made = Subnet.model_validate({"id": "s1", "bridge_id": "b1", "cidr": cidr, **fields})
    return (await repo.create(made)).obj


def addresses(port: Port) -> list[str]:
    return [str(f.ip_address) for f in port.fixed_ips]


def test_ports_get_the_next_free_pool_address_mirrored_in_addresses(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await small_net(repo)  # hosts .1-.6, gateway .1, pool .2-.6
        first = (await repo.create(on_subnet("s1"))).obj
        second = (await repo.create(on_subnet("s1"))).obj
        assert addresses(first) == ["10.0.0.2"] and addresses(second) == ["10.0.0.3"]
        assert first.addresses == (ipaddress.ip_interface("10.0.0.2/29"),)
        stored = await repo.store.get(ip_index_key("s1", ipaddress.ip_address("10.0.0.2")))
        assert stored is not None and stored.value == first.id.encode()
        await assert_consistent(repo.store)

    run(body)


def test_a_full_pool_refuses_by_field_and_writes_nothing(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await small_net(repo)
        for _ in range(5):
            await repo.create(on_subnet("s1"))
        before = await dump(repo.store)
        with pytest.raises(AddressInUseError) as raised:
            await repo.create(on_subnet("s1"))
        assert raised.value.field == "fixed_ips" and "no free address" in str(raised.value)
        assert await dump(repo.store) == before

    run(body)


@pytest.mark.parametrize(
    ("address", "error", "words"),
    [
        ("10.0.1.5", InvalidFieldError, "outside subnet"),
        ("10.0.0.0", InvalidFieldError, "network or broadcast"),
        ("10.0.0.7", InvalidFieldError, "network or broadcast"),
        ("10.0.0.1", InvalidFieldError, "gateway_ip"),
        ("10.0.0.4", AddressInUseError, "in use"),
    ],
)
def test_impossible_explicit_addresses_are_refused_by_field(
    run: Runner, address: str, error: type[Exception], words: str
) -> None:
    async def body(repo: TopologyRepository) -> None:
        await small_net(repo)
        holder = (await repo.create(on_subnet("s1", "10.0.0.4"))).obj
        before = await dump(repo.store)
        with pytest.raises(error) as raised:
            await repo.create(on_subnet("s1", address))
        assert isinstance(raised.value, InvalidFieldError)
        assert raised.value.field == "fixed_ips" and raised.value.value == address
        assert words in str(raised.value)
        if error is AddressInUseError:
            assert holder.id in str(raised.value)
        assert await dump(repo.store) == before

    run(body)


def test_explicit_address_outside_the_pools_and_gateway_on_a_router_port(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await small_net(repo, allocation_pools=[{"start": "10.0.0.5", "end": "10.0.0.6"}])
        pinned = (await repo.create(on_subnet("s1", "10.0.0.2"))).obj
        assert addresses(pinned) == ["10.0.0.2"]
        await repo.create(Router(id="r1"))
        router_port = Port(
            device_kind=DeviceKind.ROUTER,
            device_id="r1",
            fixed_ips=(FixedIp(subnet_id="s1", ip_address=ipaddress.ip_address("10.0.0.1")),),
        )
        stored = (await repo.create(router_port)).obj
        assert stored.addresses == (ipaddress.ip_interface("10.0.0.1/29"),)
        await assert_consistent(repo.store)

    run(body)


def test_a_subnet_of_another_bridge_or_a_missing_one_is_refused(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await small_net(repo)
        await repo.create(Bridge(id="b2"))
        with pytest.raises(InvalidFieldError, match="not on this port's bridge b2"):
            await repo.create(on_subnet("s1", device_id="b2"))
        with pytest.raises(DanglingReferenceError) as raised:
            await repo.create(on_subnet("nope"))
        assert raised.value.field == "fixed_ips"

    run(body)


def test_deleting_a_port_frees_its_address(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await small_net(repo)
        ports = [(await repo.create(on_subnet("s1"))).obj for _ in range(5)]
        await repo.delete(Port, ports[1].id)  # frees 10.0.0.3
        await assert_consistent(repo.store)
        again = (await repo.create(on_subnet("s1"))).obj
        assert addresses(again) == ["10.0.0.3"]
        # And an explicit claim of a freed address works too.
        await repo.delete(Port, ports[2].id)
        assert addresses((await repo.create(on_subnet("s1", "10.0.0.4"))).obj) == ["10.0.0.4"]
        await assert_consistent(repo.store)

    run(body)


def test_updates_move_keep_and_free_addresses(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await small_net(repo)
        port = (await repo.create(on_subnet("s1", addresses=["192.0.2.9/24"]))).obj
        assert [str(a) for a in port.addresses] == ["10.0.0.2/29", "192.0.2.9/24"]
        # Naming only the subnet keeps the address the port holds there.
        kept = await repo.modify(
            Port, port.id, lambda p: p.model_copy(update={"fixed_ips": (FixedIp(subnet_id="s1"),)})
        )
        assert kept.obj == port
        moved = (
            await repo.modify(
                Port,
                port.id,
                lambda p: p.model_copy(
                    update={
                        "fixed_ips": (
                            FixedIp(subnet_id="s1", ip_address=ipaddress.ip_address("10.0.0.6")),
                        )
                    }
                ),
            )
        ).obj
        assert [str(a) for a in moved.addresses] == ["10.0.0.6/29", "192.0.2.9/24"]
        await assert_consistent(repo.store)
        other = (await repo.create(on_subnet("s1", "10.0.0.2"))).obj  # the old one is free
        assert addresses(other) == ["10.0.0.2"]
        cleared = (
            await repo.modify(Port, port.id, lambda p: p.model_copy(update={"fixed_ips": ()}))
        ).obj
        assert [str(a) for a in cleared.addresses] == ["192.0.2.9/24"]
        # A rename keeps everything (and writes no IPAM keys).
        renamed = (
            await repo.modify(Port, other.id, lambda p: p.model_copy(update={"name": "vm"}))
        ).obj
        assert renamed.fixed_ips == other.fixed_ips and renamed.addresses == other.addresses
        await assert_consistent(repo.store)

    run(body)


def test_a_subnet_holding_addresses_is_not_deleted_without_cascade(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await small_net(repo)
        port = (await repo.create(on_subnet("s1", addresses=["192.0.2.9/24"]))).obj
        before = await dump(repo.store)
        with pytest.raises(ReferencedError) as raised:
            await repo.delete(Subnet, "s1")
        assert [(r.kind, r.id, r.fields) for r in raised.value.referrers] == [
            ("port", port.id, ("fixed_ips",))
        ]
        assert await dump(repo.store) == before
        await repo.delete(Subnet, "s1", cascade=True)
        left = (await repo.get(Port, port.id)).obj
        assert left.fixed_ips == () and [str(a) for a in left.addresses] == ["192.0.2.9/24"]
        await assert_consistent(repo.store)
        assert (await repo.store.range("/hivenet/v1/index/ip/")).kvs == []
        assert (await repo.store.range("/hivenet/v1/counters/ip/")).kvs == []

    run(body)


def test_subnets_of_one_bridge_never_overlap_and_cidr_is_fixed(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        await small_net(repo, cidr="10.0.0.0/24")
        with pytest.raises(InvalidFieldError) as raised:
            await repo.create(Subnet(bridge_id="b1", cidr=ipaddress.ip_network("10.0.0.128/25")))
        assert raised.value.field == "cidr" and "overlaps subnet s1" in str(raised.value)
        await repo.create(Bridge(id="b2"))
        await repo.create(Subnet(bridge_id="b2", cidr=ipaddress.ip_network("10.0.0.0/24")))
        await repo.create(Subnet(bridge_id="b1", cidr=ipaddress.ip_network("10.0.1.0/24")))
        with pytest.raises(InvalidFieldError) as fixed:
            await repo.modify(
                Subnet,
                "s1",
                lambda s: s.model_copy(update={"cidr": ipaddress.ip_network("10.0.0.0/23")}),
            )
        assert fixed.value.field == "cidr"

    run(body)


def test_concurrent_overlapping_subnets_one_wins(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        repo = TopologyRepository(InterleavingStore(repo.store))
        await repo.create(Bridge(id="b1"))
        results = await asyncio.gather(
            *(
                repo.create(Subnet(bridge_id="b1", cidr=ipaddress.ip_network(f"10.0.{i}.0/24")))
                for i in (0, 0, 0, 0)
            ),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 1
        assert all(isinstance(r, InvalidFieldError) for r in results if isinstance(r, Exception))

    run(body)


def test_many_concurrent_allocations_get_distinct_addresses(run: Runner) -> None:
    async def body(repo: TopologyRepository) -> None:
        repo = TopologyRepository(InterleavingStore(repo.store))
        await small_net(repo, cidr="10.0.0.0/24")
        created = await asyncio.gather(*(repo.create(on_subnet("s1")) for _ in range(60)))
        got = [addresses(c.obj)[0] for c in created]
        assert len(set(got)) == 60
        await assert_consistent(repo.store)

    run(body)


def test_two_repositories_on_one_sqlite_file_never_share_an_address(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/hn-shared.db"

    async def main() -> None:
        first, second = open_store(url), open_store(url)
        try:
            repo_a, repo_b = TopologyRepository(first), TopologyRepository(second)
            await small_net(repo_a, cidr="10.0.0.0/24")
            created = await asyncio.gather(
                *(repo.create(on_subnet("s1")) for _ in range(40) for repo in (repo_a, repo_b))
            )
            got = [addresses(c.obj)[0] for c in created]
            assert len(set(got)) == len(got) == 80
            await assert_consistent(first)
        finally:
            await first.close()
            await second.close()

    asyncio.run(asyncio.wait_for(main(), TEST_TIMEOUT))
