"""Per-project quotas: how many objects of each limited kind a project may hold.

Owns the quota and usage keys, the defaults (Neutron's), and reading, setting and resetting a
project's limits. The check itself runs inside every topology write's own store txn
(`TopologyRepository._count_usage`): a per-project, per-kind usage counter
`/hivenet/v1/usage/<project>/<kind>` is read guarded and rewritten by each create, delete or
owner change of a counted object, so two creates racing for the last unit cannot both commit
(one of them retries, re-reads the counter and is refused). The limits live at
`/hivenet/v1/quotas/<project>` (JSON: only the kinds set away from the default).

Counted: the kinds in `DEFAULT_QUOTAS`, owned by any project but the cluster admin's own
tenant (`DEFAULT_TENANT`, infrastructure such as external networks: neither counted nor
limited; no project token is issued for it). A counter that does not exist yet (a store that
predates quotas) is computed once by counting the stored objects.

Must not touch the network or the clock; the API decides who may set quotas.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from types import MappingProxyType

from hivenet.model.topology import DEFAULT_TENANT, TOPOLOGY_PREFIX
from hivenet.store.base import Compare, Delete, Put, Store, StoreCorruptError

QUOTA_PREFIX = "/hivenet/v1/quotas/"
USAGE_PREFIX = "/hivenet/v1/usage/"
UNLIMITED = -1
# The most a quota can be set to (beyond it, say UNLIMITED).
QUOTA_MAX = 1_000_000
_SET_ATTEMPTS = 16
_RANGE_BATCH = 500

# Neutron's defaults on HiveNet's kinds (a Neutron network is a bridge); neutron-lbaas's for
# load balancers and pools (Octavia's own default is unlimited: a tenant could fill the store),
# and, for what has no OpenStack quota, limits far above what the OpenStack APIs make per
# project at their own defaults (a Neutron router with a gateway holds 2 chains and a rule
# per interface subnet; a router interface adds a route).
DEFAULT_QUOTAS: Mapping[str, int] = MappingProxyType(
    {
        "bridge": 100,
        "subnet": 100,
        "port": 500,
        "router": 10,
        "floating_ip": 50,
        "security_group": 10,
        "security_group_rule": 100,
        "chain": 100,
        "rule": 1000,
        "route": 1000,
        "ip_addr_group": 100,
        "port_group": 100,
        "load_balancer": 10,
        "listener": 50,
        "pool": 10,
        "member": 500,
        "health_monitor": 50,
    }
)
# Neutron resource name -> HiveNet kind.
NEUTRON_RESOURCES: Mapping[str, str] = MappingProxyType(
    {
        "network": "bridge",
        "subnet": "subnet",
        "port": "port",
        "router": "router",
        "floatingip": "floating_ip",
        "security_group": "security_group",
        "security_group_rule": "security_group_rule",
    }
)


class QuotaConflictError(Exception):
    """Concurrent quota changes of one project kept invalidating this one."""


class QuotaValueError(ValueError):
    """A quota change that names an unknown kind or an impossible limit."""

    def __init__(self, field: str, value: object, message: str) -> None:
        super().__init__(f"{field}={value!r}: {message}")
        self.field = field
        self.value = value
        self.reason = message


def quota_key(project: str) -> str:
    return f"{QUOTA_PREFIX}{project}"


def usage_key(project: str, kind: str) -> str:
    return f"{USAGE_PREFIX}{project}/{kind}"


def is_counted(kind: str, tenant_id: str) -> bool:
    return kind in DEFAULT_QUOTAS and tenant_id != DEFAULT_TENANT


def check_limits(changes: Mapping[str, object]) -> dict[str, int]:
    """`changes` as kind -> limit, each kind limited and each limit UNLIMITED..QUOTA_MAX."""
    checked: dict[str, int] = {}
    for kind, limit in changes.items():
        if kind not in DEFAULT_QUOTAS:
            raise QuotaValueError(
                kind, limit, f"not a kind with a quota ({sorted(DEFAULT_QUOTAS)})"
            )
        if (
            not isinstance(limit, int)
            or isinstance(limit, bool)
            or not UNLIMITED <= limit <= QUOTA_MAX
        ):
            raise QuotaValueError(
                kind, limit, f"a quota is an integer from 0 to {QUOTA_MAX}, or -1 (unlimited)"
            )
        checked[kind] = limit
    return checked


def decode_overrides(key: str, raw: bytes | None) -> dict[str, int]:
    """The limits stored at `key` (None: none set)."""
    if raw is None:
        return {}
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return check_limits(data)
    except ValueError as exc:
        raise StoreCorruptError(f"stored quotas {key} are not valid: {exc}") from exc


def effective_limits(overrides: Mapping[str, int]) -> dict[str, int]:
    return {kind: overrides.get(kind, default) for kind, default in DEFAULT_QUOTAS.items()}


def decode_usage(key: str, raw: bytes) -> int:
    try:
        count = int(raw)
    except ValueError as exc:
        raise StoreCorruptError(f"usage counter {key} holds {raw!r}, not a number") from exc
    if count < 0:
        raise StoreCorruptError(f"usage counter {key} holds {count}, below zero")
    return count


async def count_owned(store: Store, kind: str, project: str) -> int:
    """How many stored objects of `kind` belong to `project`, counted from the objects (only
    to start a counter that does not exist yet: it reads every object of the kind)."""
    prefix = f"{TOPOLOGY_PREFIX}{kind}/"
    count = 0
    start_after: str | None = None
    revision: int | None = None
    while True:
        result = await store.range(
            prefix, revision=revision, limit=_RANGE_BATCH, start_after=start_after
        )
        revision = result.revision
        for kv in result.kvs:
            try:
                owner = json.loads(kv.value).get("tenant_id")
            except (ValueError, AttributeError) as exc:
                raise StoreCorruptError(f"stored value of {kv.key} is not a JSON object") from exc
            count += owner == project
        if not result.more or not result.kvs:
            return count
        start_after = result.kvs[-1].key


async def read_quotas(store: Store, project: str) -> dict[str, int]:
    """The project's limit per kind (its own where set, else the default)."""
    key = quota_key(project)
    kv = await store.get(key)
    return effective_limits(decode_overrides(key, None if kv is None else kv.value))


async def read_usage(store: Store, project: str) -> dict[str, int]:
    """How many objects of each limited kind the project holds now."""
    usage: dict[str, int] = {}
    for kind in DEFAULT_QUOTAS:
        if not is_counted(kind, project):
            usage[kind] = 0
            continue
        key = usage_key(project, kind)
        kv = await store.get(key)
        usage[kind] = (
            decode_usage(key, kv.value)
            if kv is not None
            else await count_owned(store, kind, project)
        )
    return usage


async def set_quotas(store: Store, project: str, changes: Mapping[str, object]) -> dict[str, int]:
    """Change some of the project's limits (the others stay); its limits after. A limit below
    the current usage only refuses further creates: nothing is deleted."""
    checked = check_limits(changes)
    key = quota_key(project)
    for _ in range(_SET_ATTEMPTS):
        kv = await store.get(key)
        overrides = decode_overrides(key, None if kv is None else kv.value)
        overrides.update(checked)
        # A limit set back to its default is dropped: a later change of the defaults applies.
        overrides = {k: v for k, v in overrides.items() if v != DEFAULT_QUOTAS[k]}
        guard = (
            Compare(key, "create_revision", "==", 0)
            if kv is None
            else Compare(key, "mod_revision", "==", kv.mod_revision)
        )
        operation = (
            Put(key, json.dumps(overrides, sort_keys=True).encode()) if overrides else Delete(key)
        )
        if (await store.txn([guard], [operation])).succeeded:
            return effective_limits(overrides)
    raise QuotaConflictError(f"quotas of {project}: concurrent changes kept winning; retry")


async def reset_quotas(store: Store, project: str) -> None:
    """Back to the defaults for every kind."""
    await store.txn([], [Delete(quota_key(project))])
