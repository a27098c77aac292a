"""Property: any sequence of creates, links, updates and (cascading) deletes keeps every
invariant of the store, and every refused operation leaves the store byte-for-byte as it was."""

from __future__ import annotations

import asyncio
import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from hivenet.model import (
    Bridge,
    Chain,
    DeviceKind,
    Host,
    Port,
    Route,
    Router,
    Rule,
    RuleAction,
    TopologyObject,
    TunnelZone,
    TunnelZoneMember,
)
from hivenet.store import open_store
from hivenet.store.topology import TopologyError, TopologyRepository
from tests.unit.store_topology.invariants import assert_consistent, dump

OPERATIONS = [
    "bridge",
    "router",
    "chain",
    "host",
    "bridge_port",
    "router_port",
    "route",
    "rule",
    "jump_rule",
    "tunnel_zone",
    "link",
    "bind",
    "delete",
]
DELETABLE: list[type[TopologyObject]] = [Bridge, Router, Chain, Host, Port, Route, Rule, TunnelZone]

ID_PREFIX = {
    "bridge": "b",
    "router": "r",
    "chain": "c",
    "host": "h",
    "port": "p",
    "route": "rt",
    "rule": "ru",
    "tunnel_zone": "tz",
}

# Every example starts from a small network, so operations mostly hit existing objects.
BASE: list[tuple[str, int, int, int, bool]] = [
    ("chain", 0, 0, 0, False),
    ("chain", 1, 0, 0, False),
    ("host", 0, 0, 0, False),
    ("host", 1, 0, 0, False),
    ("bridge", 0, 0, 0, True),
    ("bridge", 1, 0, 0, False),
    ("router", 0, 1, 0, True),
    ("router", 1, 0, 0, False),
    ("bridge_port", 0, 0, 0, False),
    ("bridge_port", 1, 1, 0, True),
    ("router_port", 2, 0, 0, True),
    ("router_port", 3, 1, 0, False),
    ("route", 0, 0, 2, False),
    ("rule", 0, 0, 0, True),
    ("jump_rule", 1, 1, 0, False),
    ("tunnel_zone", 0, 0, 1, False),
    ("bind", 1, 0, 0, False),
]

operation = st.tuples(
    st.sampled_from(OPERATIONS),
    st.integers(0, 6),  # the id of a new object (0-3 mostly exist already)
    st.integers(0, 3),
    st.integers(0, 3),
    st.booleans(),
)


async def apply(repo: TopologyRepository, op: tuple[str, int, int, int, bool]) -> None:
    name, i, j, k, flag = op
    chain_ref = f"c{j}" if flag else None
    if name == "bridge":
        await repo.create(Bridge(id=f"b{i}", inbound_chain_id=chain_ref))
    elif name == "router":
        await repo.create(Router(id=f"r{i}", outbound_chain_id=chain_ref))
    elif name == "chain":
        await repo.create(Chain(id=f"c{i}"))
    elif name == "host":
        await repo.create(Host(id=f"h{i}"))
    elif name == "bridge_port":
        await repo.create(
            Port(
                id=f"p{i}",
                device_kind=DeviceKind.BRIDGE,
                device_id=f"b{j}",
                inbound_chain_id=chain_ref,
            )
        )
    elif name == "router_port":
        await repo.create(
            Port(
                id=f"p{i}",
                device_kind=DeviceKind.ROUTER,
                device_id=f"r{j}",
                peer_id=f"p{k}" if flag else None,
            )
        )
    elif name == "route":
        await repo.create(
            Route(
                id=f"rt{i}",
                router_id=f"r{j}",
                dst_prefix=ipaddress.ip_network("10.0.0.0/8"),
                next_hop_port_id=f"p{k}",
            )
        )
    elif name == "rule":
        await repo.create(
            Rule(
                id=f"ru{i}",
                chain_id=f"c{j}",
                action=RuleAction.DROP,
                in_port_ids=(f"p{k}", f"p{(k + 1) % 4}") if flag else (f"p{k}",),
            )
        )
    elif name == "jump_rule":
        await repo.create(
            Rule(id=f"ru{i}", chain_id=f"c{j}", action=RuleAction.JUMP, jump_chain_id=f"c{k}")
        )
    elif name == "tunnel_zone":
        members = tuple(
            TunnelZoneMember(host_id=f"h{h}", underlay_ip=ipaddress.ip_address(f"10.1.0.{h + 1}"))
            for h in sorted({j, k})
        )
        await repo.create(TunnelZone(id=f"tz{i}", members=members))
    elif name == "link":
        port = (await repo.get(Port, f"p{i}")).obj
        await repo.update(port.model_copy(update={"peer_id": None if flag else f"p{j}"}))
    elif name == "bind":
        port = (await repo.get(Port, f"p{i}")).obj
        binding = {"host_id": f"h{j}", "interface_name": f"hn-tap{k}"}
        await repo.update(Port.model_validate({**port.model_dump(), **binding}))
    else:
        cls = DELETABLE[(i + 4 * j) % len(DELETABLE)]
        object_id = f"{ID_PREFIX[cls.KIND]}{k}"
        await repo.delete(cls, object_id, cascade=flag)


@settings(max_examples=150, deadline=None)
@given(st.lists(operation, max_size=30))
def test_any_operation_sequence_keeps_the_invariants(
    ops: list[tuple[str, int, int, int, bool]],
) -> None:
    async def main() -> None:
        store = open_store("memory://")
        try:
            repo = TopologyRepository(store)
            for base in BASE:
                await apply(repo, base)
            for op in ops:
                before = await dump(store)
                try:
                    await apply(repo, op)
                except (TopologyError, ValueError):
                    # Refused (by the repository or by model validation): nothing written.
                    assert await dump(store) == before, op
                await assert_consistent(store)
        finally:
            await store.close()

    asyncio.run(main())
