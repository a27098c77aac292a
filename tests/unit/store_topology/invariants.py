"""Whole-store checks shared by the repository and API tests: a full dump (to prove a failed
write changed nothing) and the repository's index invariants recomputed from scratch."""

from __future__ import annotations

import json

from hivenet.api.tokens import TOKENS_PREFIX
from hivenet.model import KINDS, TOPOLOGY_PREFIX, Port, TopologyObject, parse_topology_key
from hivenet.store.base import KeyValue, Store
from hivenet.store.quota import QUOTA_PREFIX, USAGE_PREFIX, is_counted, usage_key
from hivenet.store.topology import (
    IP_COUNTER_PREFIX,
    IP_INDEX_PREFIX,
    REFS_PREFIX,
    REFS_VERSION_PREFIX,
    TUNNEL_KEY_COUNTER_KEY,
    TUNNEL_KEY_INDEX_PREFIX,
    refs_key,
)


async def dump(store: Store) -> tuple[int, list[KeyValue]]:
    """(store revision, every key with its value and revisions)."""
    result = await store.range("")
    return result.revision, result.kvs


async def objects(store: Store) -> dict[str, TopologyObject]:
    out: dict[str, TopologyObject] = {}
    for kv in (await store.range(TOPOLOGY_PREFIX)).kvs:
        kind, _ = parse_topology_key(kv.key)
        out[kv.key] = KINDS[kind].model_validate_json(kv.value)
    return out


async def assert_consistent(store: Store) -> None:
    """Every reference resolves, the reverse index is exactly what the objects imply, links
    are symmetric, tunnel keys and fixed IPs are unique and indexed."""
    stored = await objects(store)
    expected_refs: dict[str, list[str]] = {}
    for obj in stored.values():
        for field, kind, target in obj.references():
            assert f"{TOPOLOGY_PREFIX}{kind}/{target}" in stored, (
                f"{obj.KIND} {obj.id}: {field}={target} dangles"
            )
            fields = expected_refs.setdefault(refs_key(kind, target, obj.KIND, obj.id), [])
            if field not in fields:
                fields.append(field)
    actual_refs = {kv.key: json.loads(kv.value) for kv in (await store.range(REFS_PREFIX)).kvs}
    assert actual_refs == expected_refs

    ports = [obj for obj in stored.values() if isinstance(obj, Port)]
    by_id = {port.id: port for port in ports}
    for port in ports:
        if port.peer_id is not None:
            assert by_id[port.peer_id].peer_id == port.id, f"link {port.id} is one-sided"
    keys = [port.tunnel_key for port in ports]
    assert len(set(keys)) == len(keys), "duplicate tunnel keys"
    assert all(1 <= key <= 0xEFFFFF for key in keys)
    index = {
        int(kv.key[len(TUNNEL_KEY_INDEX_PREFIX) :]): kv.value.decode()
        for kv in (await store.range(TUNNEL_KEY_INDEX_PREFIX)).kvs
    }
    held_keys = {port.tunnel_key: port.id for port in ports}
    for port in ports:  # an L2 gateway's VTEP port also holds its VNI
        if port.vtep_vni is not None:
            assert held_keys.get(port.vtep_vni, port.id) == port.id, "a VNI is a port's key"
            held_keys[port.vtep_vni] = port.id
    assert index == held_keys

    ip_index = {
        kv.key[len(IP_INDEX_PREFIX) :]: kv.value.decode()
        for kv in (await store.range(IP_INDEX_PREFIX)).kvs
    }
    held = {f"{f.subnet_id}/{f.ip_address}": port.id for port in ports for f in port.fixed_ips}
    assert sum(len(port.fixed_ips) for port in ports) == len(held), "an address is held twice"
    assert ip_index == held
    for port in ports:
        assert {f.ip_address for f in port.fixed_ips} <= {a.ip for a in port.addresses}

    # Every usage counter that exists is exact (one that does not is counted when needed).
    owned: dict[str, int] = {}
    for obj in stored.values():
        if is_counted(obj.KIND, obj.tenant_id):
            key = usage_key(obj.tenant_id, obj.KIND)
            owned[key] = owned.get(key, 0) + 1
    for kv in (await store.range(USAGE_PREFIX)).kvs:
        assert int(kv.value) == owned.get(kv.key, 0), f"{kv.key}: {kv.value!r} != {owned}"

    # Version keys only for live objects; nothing else lives under /hivenet/v1/ but these.
    for kv in (await store.range(REFS_VERSION_PREFIX)).kvs:
        kind, _, object_id = kv.key[len(REFS_VERSION_PREFIX) :].partition("/")
        assert f"{TOPOLOGY_PREFIX}{kind}/{object_id}" in stored, f"stale {kv.key}"
    known = (
        TOPOLOGY_PREFIX,
        REFS_PREFIX,
        REFS_VERSION_PREFIX,
        TUNNEL_KEY_INDEX_PREFIX,
        IP_INDEX_PREFIX,
        IP_COUNTER_PREFIX,
        TOKENS_PREFIX,  # the API's project tokens (api/tokens.py), not the repository's
        QUOTA_PREFIX,
        USAGE_PREFIX,
    )
    for kv in (await store.range("/hivenet/v1/")).kvs:
        assert kv.key.startswith(known) or kv.key == TUNNEL_KEY_COUNTER_KEY, kv.key
        if kv.key.startswith(IP_COUNTER_PREFIX):
            subnet_id = kv.key[len(IP_COUNTER_PREFIX) :]
            assert f"{TOPOLOGY_PREFIX}subnet/{subnet_id}" in stored, f"stale {kv.key}"
