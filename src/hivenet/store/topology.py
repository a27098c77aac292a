"""The topology repository: typed, transactional access to topology objects in a `Store`.

Owns everything a write of a topology object must keep true, each write being ONE store txn
guarded by compares (optimistic concurrency, retried a few times when a concurrent writer
changed something the attempt relied on):

- objects live at `/hivenet/v1/topology/<kind>/<id>` (JSON of the model, see
  `hivenet.model.topology`); their mod_revision is their version for `If-Match`;
- referential integrity: every reference an object holds names an existing object at commit
  time (the txn compares the referenced key's create_revision: the same incarnation still
  exists). A reverse index `/hivenet/v1/refs/<kind>/<id>/<referrer_kind>/<referrer_id>` (value:
  JSON list of the referrer's fields) lists who points at an object, and every NEW referrer
  bumps `/hivenet/v1/refs_version/<kind>/<id>`, which a delete compares, so a referrer that
  appears concurrently makes the delete retry instead of leaving a dangling reference;
- delete semantics: a referenced object is not deleted unless `cascade`; with cascade, owned
  children go too (a device's ports, a router's routes, a chain's rules, a port's routes) and
  optional references are cleared (see `_ON_DELETE`);
- interior port links are symmetric (peer_id on both ends, written in the same txn);
- port tunnel keys are unique (1..0xEFFFFF): a counter key is the allocation hint and a
  uniqueness key `/hivenet/v1/index/tunnel_key/<n>` is created under a create_revision==0
  compare;
- IPAM the same way: each fixed IP of a port holds `/hivenet/v1/index/ip/<subnet>/<address>`
  (value: the port id), created under a create_revision==0 compare in the port's own txn, so
  two API servers allocating at once never hand out one address; `/hivenet/v1/counters/ip/
  <subnet>` is where the next allocation starts looking. A port's fixed IPs are mirrored in
  its `addresses` (with the subnet's prefix), subnets of one bridge never overlap;
- an L2 gateway's VTEP port also holds the tunnel-key index key of its `vtep_vni`, so a VNI
  is never a port's tunnel key and two VTEP ports never share one;
- quotas: every create, delete or owner change of a counted kind rewrites the owner's usage
  counter `/hivenet/v1/usage/<project>/<kind>` under a guard, and a create past the
  project's limit is refused (`OverQuotaError`; keys and defaults in `store/quota.py`).

Must not touch the backend internals (only the `Store` protocol), the network or the clock
beyond the retry back-off. Objects are validated by the model; this module adds only the
rules that need other objects.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import json
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import pydantic

from hivenet.model.loadbalancer import (
    LB_IMMUTABLE_FIELDS,
    Pool,
    pool_fit_problem,
    pool_reference,
)
from hivenet.model.subnet import Subnet
from hivenet.model.topology import (
    KINDS,
    SHARED_FLAGS,
    TOPOLOGY_PREFIX,
    DeviceKind,
    Port,
    Route,
    TopologyObject,
    TunnelZone,
    decode,
    encode,
    is_shared,
    is_shared_data,
    topology_key,
)
from hivenet.model.types import TUNNEL_KEY_MAX, TUNNEL_KEY_MIN, FixedIp, IpAddress, IpInterface
from hivenet.store.base import (
    Compare,
    Delete,
    KeyValue,
    Put,
    Store,
    StoreCorruptError,
    TxnOp,
)
from hivenet.store.quota import (
    DEFAULT_QUOTAS,
    UNLIMITED,
    count_owned,
    decode_overrides,
    decode_usage,
    effective_limits,
    is_counted,
    quota_key,
    usage_key,
)

REFS_PREFIX = "/hivenet/v1/refs/"
REFS_VERSION_PREFIX = "/hivenet/v1/refs_version/"
TUNNEL_KEY_INDEX_PREFIX = "/hivenet/v1/index/tunnel_key/"
TUNNEL_KEY_COUNTER_KEY = "/hivenet/v1/counters/tunnel_key"
IP_INDEX_PREFIX = "/hivenet/v1/index/ip/"
IP_COUNTER_PREFIX = "/hivenet/v1/counters/ip/"

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
DEFAULT_MAX_ATTEMPTS = 16
# How many taken tunnel keys an allocation steps over before it gives up (the counter is only
# a hint; holes left by deleted ports are found again after the counter wraps).
TUNNEL_KEY_MAX_PROBES = 256
_RANGE_BATCH = 500

# Fields `list()` may filter on by equality, per kind (the children of a parent).
FILTERABLE_FIELDS: dict[str, frozenset[str]] = {
    "port": frozenset({"device_id", "device_kind", "host_id", "peer_id"}),
    "route": frozenset({"router_id", "next_hop_port_id", "learned_from"}),
    "bgp_peer": frozenset({"port_id"}),
    "rule": frozenset({"chain_id", "jump_chain_id"}),
    "load_balancer": frozenset({"router_id"}),
    "listener": frozenset({"load_balancer_id", "default_pool_id"}),
    "pool": frozenset({"load_balancer_id"}),
    "member": frozenset({"pool_id"}),
    "health_monitor": frozenset({"pool_id"}),
    "security_group_rule": frozenset({"security_group_id", "remote_group_id"}),
    "floating_ip": frozenset({"router_id", "port_id"}),
    "subnet": frozenset({"bridge_id"}),
}

# Fields that identify an object's owner or are allocated by the store: an update may not
# change them (moving a port to another device would silently re-plumb its links and routes).
IMMUTABLE_FIELDS: dict[str, tuple[str, ...]] = {
    "port": ("device_kind", "device_id", "tunnel_key"),
    "route": ("router_id",),
    "bgp_peer": ("port_id",),
    "rule": ("chain_id",),
    "subnet": ("bridge_id", "cidr"),
    **LB_IMMUTABLE_FIELDS,
}

T = TypeVar("T", bound=TopologyObject)
R = TypeVar("R")


# --------------------------------------------------------------------------------------------
# Errors: each one means nothing was written.


class TopologyError(Exception):
    """Base of every refusal of the repository; the store is unchanged."""


class NotFoundError(TopologyError):
    def __init__(self, kind: str, object_id: str) -> None:
        super().__init__(f"no {kind} with id {object_id!r}")
        self.kind = kind
        self.object_id = object_id


@dataclass(frozen=True, slots=True)
class Referrer:
    """An object that references another one through `fields`."""

    kind: str
    id: str
    fields: tuple[str, ...]


class ReferencedError(TopologyError):
    """A delete without cascade of an object that other objects still reference."""

    def __init__(self, kind: str, object_id: str, referrers: Sequence[Referrer]) -> None:
        listed = ", ".join(f"{r.kind} {r.id} ({'/'.join(r.fields)})" for r in referrers)
        super().__init__(
            f"{kind} {object_id} is still referenced by {listed}; "
            "delete those first or delete with cascade"
        )
        self.kind = kind
        self.object_id = object_id
        self.referrers = tuple(referrers)


class DanglingReferenceError(TopologyError):
    """A field names an object that does not exist."""

    def __init__(self, field: str, value: str, kind: str) -> None:
        super().__init__(f"{field}={value!r}: no {kind} with that id")
        self.field = field
        self.value = value
        self.kind = kind


class ConflictError(TopologyError):
    """The write contradicts the current state (duplicate id, port already linked, or
    concurrent writers that kept winning the race)."""


class AlreadyExistsError(ConflictError):
    """A create of an id that is taken. (The API answers a retried create, one whose request
    matches the stored object, with that object instead.)"""

    def __init__(self, kind: str, object_id: str) -> None:
        super().__init__(f"a {kind} with id {object_id!r} already exists")
        self.kind = kind
        self.object_id = object_id


class OverQuotaError(ConflictError):
    """A create that would take a project past its quota of a kind."""

    def __init__(self, kind: str, project: str, limit: int, usage: int) -> None:
        super().__init__(
            f"quota exceeded: project {project} may hold {limit} {kind} objects and holds "
            f"{usage}; delete some or ask the cluster admin to raise the quota"
        )
        self.kind = kind
        self.project = project
        self.limit = limit
        self.usage = usage


class RevisionMismatchError(TopologyError):
    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"expected revision {expected}, but the object is at revision {actual}")
        self.expected = expected
        self.actual = actual


class InvalidFieldError(TopologyError):
    """A field value that is well-formed but not acceptable given the stored state."""

    def __init__(self, field: str, value: object, message: str) -> None:
        super().__init__(f"{field}={value!r}: {message}")
        self.field = field
        self.value = value
        self.reason = message


class AddressInUseError(InvalidFieldError):
    """A fixed IP another port holds, or a subnet whose pools are all taken."""


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class Versioned(Generic[T]):
    """An object and the store revision of its last change (its ETag)."""

    obj: T
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """Objects sorted by id; pass `next_marker` as `marker` for the next page (None: done)."""

    items: list[Versioned[T]]
    next_marker: str | None


@dataclass(frozen=True, slots=True)
class ProjectScope:
    """The project a write acts for (a tenant's write through the API; None: the cluster
    admin, unscoped). A scoped write may reference only objects of `project` or shared ones
    (`is_shared`), sees any other object as missing, and may change no object of another
    project (a cascade or a peer link that would is refused). References to hosts are not
    checked: host bindings are the cluster admin's, the API refuses tenant changes to them."""

    project: str

    def sees(self, obj: TopologyObject) -> bool:
        return obj.tenant_id == self.project or is_shared(obj)

    def sees_stored(self, kind: str, key: str, raw: bytes) -> bool:
        """`sees` of a stored value, reading only its owner and shared flag (a reference
        check must not pay for validating the whole object)."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise StoreCorruptError(f"stored value of {key} is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise StoreCorruptError(f"stored value of {key} is not a JSON object")
        return data.get("tenant_id") == self.project or is_shared_data(kind, data)


# References a scoped write may keep to objects it cannot see (see ProjectScope).
_UNSCOPED_REFERENCE_KINDS = frozenset({"host"})


# --------------------------------------------------------------------------------------------
# Keys


def refs_prefix(kind: str, object_id: str) -> str:
    return f"{REFS_PREFIX}{kind}/{object_id}/"


def refs_key(kind: str, object_id: str, referrer_kind: str, referrer_id: str) -> str:
    return f"{refs_prefix(kind, object_id)}{referrer_kind}/{referrer_id}"


def refs_version_key(kind: str, object_id: str) -> str:
    return f"{REFS_VERSION_PREFIX}{kind}/{object_id}"


def tunnel_key_index_key(tunnel_key: int) -> str:
    return f"{TUNNEL_KEY_INDEX_PREFIX}{tunnel_key}"


def _vtep_vni(obj: TopologyObject | None) -> int | None:
    return obj.vtep_vni if isinstance(obj, Port) else None


async def _reserve_vtep_vni(
    attempt: _Attempt, old: TopologyObject | None, new: TopologyObject | None
) -> None:
    """A VTEP port's VNI is reserved in the tunnel-key index (value: the port id), guarded, so
    no port is given it as its tunnel key and no two VTEP ports share it: a datapath can then
    tell a VTEP's frames from a peer's by VNI alone. Freed when the port drops it or goes."""
    old_vni, new_vni = _vtep_vni(old), _vtep_vni(new)
    if old_vni == new_vni:
        return
    subject = new if new is not None else old
    assert isinstance(subject, Port)
    mine = subject.id.encode()
    if old_vni is not None and old_vni != subject.tunnel_key:
        index_key = tunnel_key_index_key(old_vni)
        if await attempt.read(index_key) == mine:
            attempt.delete(index_key)
    if new_vni is not None:
        index_key = tunnel_key_index_key(new_vni)
        holder = await attempt.read(index_key)
        if holder is None:
            attempt.put(index_key, mine)
        elif holder != mine:
            by = "" if attempt.scope is not None else f" of port {holder.decode(errors='replace')}"
            raise AddressInUseError(
                "vtep_vni",
                new_vni,
                f"is the tunnel key{by} (VTEP VNIs share the tunnel-key space): choose another",
            )


def ip_index_prefix(subnet_id: str) -> str:
    return f"{IP_INDEX_PREFIX}{subnet_id}/"


def ip_index_key(subnet_id: str, address: IpAddress) -> str:
    return f"{ip_index_prefix(subnet_id)}{address}"


def ip_counter_key(subnet_id: str) -> str:
    return f"{IP_COUNTER_PREFIX}{subnet_id}"


# --------------------------------------------------------------------------------------------
# What happens to a referrer when the object it references is deleted.


class _OnDelete(enum.IntEnum):
    # Ordered by strength: a referrer holding several fields gets the strongest action.
    UNLINK_PEER = 0  # interior link: both ends are cleared, never blocks a delete
    CLEAR = 1  # optional reference: set to None / dropped from the tuple (cascade only)
    SHRINK_OR_DELETE = 2  # rule port list: drop the id; delete the rule if the list empties
    DELETE = 3  # owned child, or a rule whose match would widen without it (cascade only)


# A rule whose condition loses its object must go: an empty condition matches everything, so
# clearing "drop traffic from group G" would turn it into "drop all traffic".
_ON_DELETE: dict[tuple[str, str], _OnDelete] = {
    ("port", "device_id"): _OnDelete.DELETE,
    ("port", "peer_id"): _OnDelete.UNLINK_PEER,
    ("route", "router_id"): _OnDelete.DELETE,
    ("route", "next_hop_port_id"): _OnDelete.DELETE,
    ("route", "learned_from"): _OnDelete.DELETE,
    ("bgp_peer", "port_id"): _OnDelete.DELETE,
    ("rule", "chain_id"): _OnDelete.DELETE,
    ("rule", "jump_chain_id"): _OnDelete.DELETE,
    ("rule", "port_group_id"): _OnDelete.DELETE,
    ("rule", "ip_addr_group_src_id"): _OnDelete.DELETE,
    ("rule", "ip_addr_group_dst_id"): _OnDelete.DELETE,
    ("rule", "in_port_ids"): _OnDelete.SHRINK_OR_DELETE,
    ("rule", "out_port_ids"): _OnDelete.SHRINK_OR_DELETE,
    ("load_balancer", "router_id"): _OnDelete.DELETE,
    ("listener", "load_balancer_id"): _OnDelete.DELETE,
    ("pool", "load_balancer_id"): _OnDelete.DELETE,
    ("member", "pool_id"): _OnDelete.DELETE,
    ("health_monitor", "pool_id"): _OnDelete.DELETE,
    ("security_group_rule", "security_group_id"): _OnDelete.DELETE,
    ("security_group_rule", "remote_group_id"): _OnDelete.DELETE,
    ("floating_ip", "router_id"): _OnDelete.DELETE,
    ("subnet", "bridge_id"): _OnDelete.DELETE,
}


def _on_delete(referrer_kind: str, fields: Sequence[str]) -> _OnDelete:
    return max(_ON_DELETE.get((referrer_kind, field), _OnDelete.CLEAR) for field in fields)


def _reference_map(obj: TopologyObject | None) -> dict[tuple[str, str], list[str]]:
    """(kind, id) -> the fields of `obj` naming it, in declaration order."""
    targets: dict[tuple[str, str], list[str]] = {}
    if obj is None:
        return targets
    for field, kind, target_id in obj.references():
        fields = targets.setdefault((kind, target_id), [])
        if field not in fields:
            fields.append(field)
    return targets


def _without_reference(
    referrer: TopologyObject, fields: Sequence[str], target_id: str
) -> TopologyObject | None:
    """`referrer` with its references to `target_id` in `fields` removed; None if the
    referrer cannot exist without them (see `_ON_DELETE`)."""
    action = _on_delete(referrer.KIND, fields)
    if action is _OnDelete.DELETE:
        return None
    data = referrer.model_dump()
    for field in fields:
        if isinstance(referrer, TunnelZone) and field == "members":
            data["members"] = [m for m in data["members"] if m["host_id"] != target_id]
            continue
        if isinstance(referrer, Port) and field == "fixed_ips":
            # The subnet goes: so do the port's addresses on it (its index keys go with it).
            dropped = {f.ip_address for f in referrer.fixed_ips if f.subnet_id == target_id}
            data["fixed_ips"] = [f for f in data["fixed_ips"] if f["subnet_id"] != target_id]
            data["addresses"] = [a for a in referrer.addresses if a.ip not in dropped]
            continue
        value = getattr(referrer, field)
        if isinstance(value, tuple):
            remaining = tuple(item for item in value if item != target_id)
            if not remaining and action is _OnDelete.SHRINK_OR_DELETE:
                return None
            data[field] = remaining
        else:
            data[field] = None
            if isinstance(referrer, Port) and field == "host_id":
                data["interface_name"] = None  # a binding is host + interface together
                data["interface_vlan"] = None
    return type(referrer).model_validate(data)


async def _read_referenced(attempt: _Attempt, cls: type[T], object_id: str, field: str) -> T:
    """The object `field` names, guarded only for existence (callers rely on fields that
    cannot change); DanglingReferenceError naming `field` if there is none."""
    raw = await _read_visible(attempt, field, cls.KIND, object_id)
    obj = _decode_stored(cls.KIND, topology_key(cls.KIND, object_id), raw)
    assert isinstance(obj, cls)
    return obj


async def _read_visible(attempt: _Attempt, field: str, kind: str, object_id: str) -> bytes:
    """The stored value of the object `field` names; DanglingReferenceError naming `field`
    when there is none, or when the attempt's project may not reference it (exactly the
    same error: another project's ids must look missing). Unscoped, only the object's
    existence is guarded; scoped, its value is (its tenant_id or shared flag may change)."""
    key = topology_key(kind, object_id)
    if attempt.scope is None:
        raw = await attempt.read_existing(key)
    else:
        raw = await attempt.read(key)
        if raw is not None and not await _scope_sees(attempt, attempt.scope, kind, key, raw):
            raw = None
    if raw is None:
        raise DanglingReferenceError(field, object_id, kind)
    return raw


# What sharing grants another project: attaching its own ports (a port on a shared bridge,
# its addresses on the bridge's subnets). Any other reference by another project to a shared
# object (a subnet added to a shared bridge) would change the owner's network: refused.
_SHARED_ATTACH: frozenset[tuple[str, str]] = frozenset(
    {("port", "device_id"), ("port", "fixed_ips")}
)


def _check_shared_use(
    scope: ProjectScope,
    kind: str,
    fields: Sequence[str],
    target_kind: str,
    target_id: str,
    raw: bytes,
) -> None:
    """A scoped reference to another project's shared object is only an attachment
    (`_SHARED_ATTACH`); InvalidFieldError naming the field otherwise."""
    if target_kind not in SHARED_FLAGS and target_kind not in _SHARED_WITH_PARENT:
        return
    if any((kind, field) in _SHARED_ATTACH for field in fields):
        return
    if json.loads(raw).get("tenant_id") == scope.project:
        return
    raise InvalidFieldError(
        fields[0],
        target_id,
        f"{target_kind} {target_id} is shared by another project: other projects attach "
        f"ports to it, only its own project adds a {kind} to it",
    )


# Kinds shared with their parent: a subnet of a shared bridge is shared (ports of every
# project take addresses on it). kind -> (the parent field, the parent's kind).
_SHARED_WITH_PARENT: dict[str, tuple[str, str]] = {"subnet": ("bridge_id", "bridge")}


async def _scope_sees(
    attempt: _Attempt, scope: ProjectScope, kind: str, key: str, raw: bytes
) -> bool:
    """`scope.sees_stored`, and for a kind shared with its parent, whether the parent (read
    guarded: a concurrent unsharing fails the commit) is shared."""
    if scope.sees_stored(kind, key, raw):
        return True
    parent = _SHARED_WITH_PARENT.get(kind)
    if parent is None:
        return False
    field, parent_kind = parent
    parent_id = json.loads(raw).get(field)
    if not isinstance(parent_id, str):
        return False
    parent_key = topology_key(parent_kind, parent_id)
    parent_raw = await attempt.read(parent_key)
    return parent_raw is not None and is_shared_data(parent_kind, json.loads(parent_raw))


def _revalidated(obj: T) -> T:
    """`obj` checked again by its model: `model_copy(update=...)` skips validation, and an
    invalid object must never reach the store (raises pydantic.ValidationError)."""
    return type(obj).model_validate(obj.model_dump())


def _decode_stored(kind: str, key: str, raw: bytes) -> TopologyObject:
    try:
        return decode(kind, raw)
    except (pydantic.ValidationError, ValueError) as exc:
        raise StoreCorruptError(f"stored value of {key} is not a valid {kind}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# One optimistic attempt


class _Attempt:
    """Reads recorded, writes buffered; `commit()` writes everything in one txn whose
    compares fail if anything a decision rested on changed since it was read.

    Reads see this attempt's own pending writes first."""

    def __init__(self, store: Store, number: int, scope: ProjectScope | None = None) -> None:
        self.store = store
        self.number = number  # 0 for the first attempt
        self.scope = scope
        self._seen: dict[str, KeyValue | None] = {}
        self._compares: dict[str, Compare] = {}
        self._writes: dict[str, bytes | None] = {}  # None = delete

    async def _fetch(self, key: str) -> KeyValue | None:
        if key not in self._seen:
            self._seen[key] = await self.store.get(key)
        return self._seen[key]

    async def read(self, key: str) -> bytes | None:
        """The value (None if absent); the commit requires the key unchanged."""
        if key in self._writes:
            return self._writes[key]
        kv = await self._fetch(key)
        if kv is None:
            self._compares[key] = Compare(key, "create_revision", "==", 0)
        else:
            self._compares[key] = Compare(key, "mod_revision", "==", kv.mod_revision)
        return None if kv is None else kv.value

    async def read_existing(self, key: str) -> bytes | None:
        """The value (None if absent); the commit requires only that the same incarnation of
        the key still exists (concurrent updates of its value are fine)."""
        if key in self._writes:
            return self._writes[key]
        kv = await self._fetch(key)
        if key not in self._compares:
            created = 0 if kv is None else kv.create_revision
            self._compares[key] = Compare(key, "create_revision", "==", created)
        return None if kv is None else kv.value

    async def read_hint(self, key: str) -> bytes | None:
        """The value, with no guard at commit (counters, probes)."""
        if key in self._writes:
            return self._writes[key]
        kv = await self._fetch(key)
        return None if kv is None else kv.value

    def require_absent(self, key: str) -> None:
        self._compares[key] = Compare(key, "create_revision", "==", 0)

    def mod_revision(self, key: str) -> int:
        kv = self._seen.get(key)
        return 0 if kv is None else kv.mod_revision

    async def range_values(self, prefix: str) -> dict[str, bytes]:
        """key -> value under `prefix` as this attempt sees it (unguarded: callers guard with
        a version key)."""
        found: dict[str, bytes] = {}
        start_after: str | None = None
        revision: int | None = None
        while True:
            result = await self.store.range(
                prefix, revision=revision, limit=_RANGE_BATCH, start_after=start_after
            )
            revision = result.revision
            found.update((kv.key, kv.value) for kv in result.kvs)
            if not result.more or not result.kvs:
                break
            start_after = result.kvs[-1].key
        for key, value in self._writes.items():
            if not key.startswith(prefix):
                continue
            if value is None:
                found.pop(key, None)
            else:
                found[key] = value
        return dict(sorted(found.items()))

    def put(self, key: str, value: bytes) -> None:
        self._writes[key] = value

    def delete(self, key: str) -> None:
        self._writes[key] = None

    @property
    def has_writes(self) -> bool:
        return bool(self._writes)

    async def commit(self) -> int | None:
        """The new store revision, or None when a compare failed (nothing was written)."""
        ops: list[TxnOp] = [
            Put(key, value) if value is not None else Delete(key)
            for key, value in self._writes.items()
        ]
        result = await self.store.txn(list(self._compares.values()), ops)
        return result.revision if result.succeeded else None


def _refuse_client_tunnel_key(obj: TopologyObject) -> None:
    if isinstance(obj, Port) and obj.tunnel_key != 0:
        raise InvalidFieldError(
            "tunnel_key", obj.tunnel_key, "tunnel_key is allocated by the server"
        )


class TopologyTransaction:
    """Several object writes that commit together in one store txn, with every rule of a
    single write (references, peer links, tunnel keys, immutable fields) applied to each.

    Reads see this transaction's own writes. Obtained from `TopologyRepository.transaction`;
    the body may run more than once (retries), so it must not have other side effects.
    """

    def __init__(self, repository: TopologyRepository, attempt: _Attempt) -> None:
        self._repository = repository
        self._attempt = attempt

    async def get(self, cls: type[T], object_id: str) -> T | None:
        """The object (None if absent); the commit requires it unchanged."""
        key = topology_key(cls.KIND, object_id)
        raw = await self._attempt.read(key)
        if raw is None:
            return None
        obj = _decode_stored(cls.KIND, key, raw)
        assert isinstance(obj, cls)
        return obj

    async def require(self, cls: type[T], object_id: str) -> T:
        obj = await self.get(cls, object_id)
        if obj is None:
            raise NotFoundError(cls.KIND, object_id)
        return obj

    def revision_of(self, cls: type[TopologyObject], object_id: str) -> int:
        """The mod_revision at which `get` read the object (0 if not read or absent)."""
        return self._attempt.mod_revision(topology_key(cls.KIND, object_id))

    async def referrers(
        self, kind: str, object_id: str, referrer_kind: str | None = None
    ) -> list[tuple[str, str]]:
        """(kind, id) of every object (of `referrer_kind`, when given) referencing
        `kind`/`object_id`, from the reverse index (unguarded: guard the objects that matter
        by reading them with `get`)."""
        prefix = refs_prefix(kind, object_id)
        wanted = prefix if referrer_kind is None else f"{prefix}{referrer_kind}/"
        found: list[tuple[str, str]] = []
        for ref_key in await self._attempt.range_values(wanted):
            referrer_kind, _, referrer_id = ref_key[len(prefix) :].partition("/")
            found.append((referrer_kind, referrer_id))
        return found

    async def create(self, obj: T) -> T:
        """Store a new object (a port gets its tunnel key); returns it as stored."""
        kind = obj.KIND
        obj = _revalidated(obj)
        _refuse_client_tunnel_key(obj)
        attempt, repository = self._attempt, self._repository
        key = topology_key(kind, obj.id)
        if await attempt.read(key) is not None:
            raise AlreadyExistsError(kind, obj.id)
        stored: TopologyObject = obj
        if isinstance(obj, Port):
            tunnel_key = await repository._allocate_tunnel_key(attempt, obj.id)
            stored = obj.model_copy(update={"tunnel_key": tunnel_key})
            stored = await repository._assign_fixed_ips(attempt, None, stored)
        if isinstance(obj, Subnet):
            await repository._check_subnet_overlap(attempt, obj)
        await repository._check_cross_object_rules(attempt, stored)
        await repository._write(attempt, None, stored)
        if isinstance(stored, Port) and stored.peer_id is not None:
            await repository._link_peer(attempt, stored)
        return stored  # type: ignore[return-value]  # same class as obj

    async def modify(
        self,
        cls: type[T],
        object_id: str,
        change: Callable[[T], T],
        *,
        expected_revision: int | None = None,
        precondition: Callable[[T], None] | None = None,
    ) -> tuple[T, int]:
        """(the object after `change`, the revision it was read at); see
        `TopologyRepository.modify`."""
        kind = cls.KIND
        attempt, repository = self._attempt, self._repository
        key = topology_key(kind, object_id)
        raw = await attempt.read(key)
        if raw is None:
            raise NotFoundError(kind, object_id)
        current = _decode_stored(kind, key, raw)
        assert isinstance(current, cls)
        if precondition is not None:
            precondition(current)
        current_revision = attempt.mod_revision(key)
        if expected_revision is not None and expected_revision != current_revision:
            raise RevisionMismatchError(expected_revision, current_revision)
        replacement = change(current)
        if type(replacement) is not cls:
            raise InvalidFieldError("kind", replacement.KIND, f"expected a {kind}")
        if replacement.id != object_id:
            raise InvalidFieldError("id", replacement.id, f"does not match {object_id!r}")
        replacement = _revalidated(replacement)
        replacement = repository._keep_immutable_fields(current, replacement)
        if kind == Port.KIND:  # T is Port here (casts: isinstance would narrow `current`)
            assigned = await repository._assign_fixed_ips(
                attempt, cast(Port, current), cast(Port, replacement)
            )
            replacement = cast(T, assigned)
        if encode(replacement) == raw:
            return current, current_revision  # nothing changes: no write, no event
        await repository._check_cross_object_rules(attempt, replacement)
        await repository._write(attempt, current, replacement)
        if (
            isinstance(current, Port)
            and isinstance(replacement, Port)
            and current.peer_id != replacement.peer_id
        ):
            if current.peer_id is not None:
                await repository._unlink_peer(attempt, current.peer_id, current.id)
            if replacement.peer_id is not None:
                await repository._link_peer(attempt, replacement)
        return replacement, current_revision

    async def update(self, obj: T) -> T:
        """Replace the stored object of the same kind and id by `obj`."""
        stored, _ = await self.modify(type(obj), obj.id, lambda _current: obj)
        return stored

    async def delete(
        self,
        cls: type[T],
        object_id: str,
        *,
        cascade: bool = False,
        expected_revision: int | None = None,
        precondition: Callable[[T], None] | None = None,
    ) -> None:
        """Delete an object; see `TopologyRepository.delete`."""
        kind = cls.KIND
        attempt = self._attempt
        key = topology_key(kind, object_id)
        raw = await attempt.read(key)
        if raw is None:
            raise NotFoundError(kind, object_id)
        if precondition is not None:
            current = _decode_stored(kind, key, raw)
            assert isinstance(current, cls)
            precondition(current)
        current_revision = attempt.mod_revision(key)
        if expected_revision is not None and expected_revision != current_revision:
            raise RevisionMismatchError(expected_revision, current_revision)
        blockers: list[Referrer] = []
        await self._repository._delete_object(attempt, kind, object_id, cascade, blockers, set())
        if blockers:
            raise ReferencedError(kind, object_id, blockers)


# --------------------------------------------------------------------------------------------


class TopologyRepository:
    """Typed create/get/list/update/delete of topology objects over any `Store`.

    Safe for concurrent use from many tasks and from many processes sharing a store: every
    write is one guarded txn, retried up to `max_attempts` times when a concurrent writer
    invalidated what it read, then refused with `ConflictError`.
    """

    def __init__(self, store: Store, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        self.store = store
        self.max_attempts = max_attempts

    # ---- the retry loop

    async def _transact(
        self,
        attempt_body: Callable[[_Attempt], Awaitable[R]],
        what: str,
        scope: ProjectScope | None = None,
    ) -> tuple[R, int | None]:
        """Run `attempt_body` and commit; (its result, commit revision or None if it wrote
        nothing). Typed errors raised by the body end the loop at once."""
        for number in range(self.max_attempts):
            attempt = _Attempt(self.store, number, scope)
            result = await attempt_body(attempt)
            if not attempt.has_writes:
                return result, None
            revision = await attempt.commit()
            if revision is not None:
                return result, revision
            # Full jitter: contenders that collided spread out instead of colliding again.
            await asyncio.sleep(random.uniform(0, min(0.002 * 2**number, 0.05)))
        raise ConflictError(
            f"{what}: gave up after {self.max_attempts} attempts, concurrent writers kept "
            "changing the objects involved; retry later"
        )

    # ---- public API

    async def transaction(
        self,
        body: Callable[[TopologyTransaction], Awaitable[R]],
        what: str = "transaction",
        *,
        scope: ProjectScope | None = None,
    ) -> tuple[R, int | None]:
        """Run `body` over a `TopologyTransaction` and commit everything it wrote in ONE
        store txn (retried as a whole when a concurrent writer invalidated a read);
        (body's result, commit revision or None when it wrote nothing). With `scope`, every
        write in it follows the project rules of `ProjectScope`, checked in the same txn."""
        return await self._transact(
            lambda attempt: body(TopologyTransaction(self, attempt)), what, scope
        )

    async def create(self, obj: T, *, scope: ProjectScope | None = None) -> Versioned[T]:
        """Store a new object; ports get their tunnel key here (a client-chosen one is refused)."""
        obj = _revalidated(obj)
        _refuse_client_tunnel_key(obj)
        stored, revision = await self.transaction(
            lambda txn: txn.create(obj), f"create {obj.KIND} {obj.id}", scope=scope
        )
        assert revision is not None
        return Versioned(stored, revision)

    async def get(self, cls: type[T], object_id: str) -> Versioned[T]:
        key = topology_key(cls.KIND, object_id)
        kv = await self.store.get(key)
        if kv is None:
            raise NotFoundError(cls.KIND, object_id)
        obj = _decode_stored(cls.KIND, key, kv.value)
        assert isinstance(obj, cls)
        return Versioned(obj, kv.mod_revision)

    async def update(
        self,
        obj: T,
        *,
        expected_revision: int | None = None,
        scope: ProjectScope | None = None,
    ) -> Versioned[T]:
        """Replace the stored object with the same kind and id by `obj`.

        A port's tunnel_key may be given as 0 (keep) or as its current value."""
        return await self.modify(
            type(obj),
            obj.id,
            lambda _current: obj,
            expected_revision=expected_revision,
            scope=scope,
        )

    async def modify(
        self,
        cls: type[T],
        object_id: str,
        change: Callable[[T], T],
        *,
        expected_revision: int | None = None,
        precondition: Callable[[T], None] | None = None,
        scope: ProjectScope | None = None,
    ) -> Versioned[T]:
        """Read-modify-write in one txn: `change` gets the current object (re-read on every
        retry) and returns the replacement; it may raise (pydantic or typed errors).
        `precondition` sees the current object first and may raise to refuse (a tenant check
        that must come before the revision check)."""
        (stored, unchanged_revision), revision = await self.transaction(
            lambda txn: txn.modify(
                cls,
                object_id,
                change,
                expected_revision=expected_revision,
                precondition=precondition,
            ),
            f"update {cls.KIND} {object_id}",
            scope=scope,
        )
        return Versioned(stored, revision if revision is not None else unchanged_revision)

    async def delete(
        self,
        cls: type[TopologyObject],
        object_id: str,
        *,
        cascade: bool = False,
        expected_revision: int | None = None,
        precondition: Callable[[TopologyObject], None] | None = None,
        scope: ProjectScope | None = None,
    ) -> int:
        """Delete an object; returns the store revision of the delete.

        Without cascade, any referrer other than an interior peer (whose link is cleared)
        refuses the delete with `ReferencedError`. `precondition` sees the object as read in
        the txn and may raise to refuse (e.g. a tenant check)."""
        _, revision = await self.transaction(
            lambda txn: txn.delete(
                cls,
                object_id,
                cascade=cascade,
                expected_revision=expected_revision,
                precondition=precondition,
            ),
            f"delete {cls.KIND} {object_id}",
            scope=scope,
        )
        assert revision is not None
        return revision

    # ---- the rules

    @staticmethod
    def _keep_immutable_fields(current: T, replacement: T) -> T:
        for field in IMMUTABLE_FIELDS.get(current.KIND, ()):
            old, new = getattr(current, field), getattr(replacement, field)
            if field == "tunnel_key" and new == 0:
                replacement = replacement.model_copy(update={"tunnel_key": old})
            elif new != old:
                raise InvalidFieldError(
                    field, _plain(new), f"cannot be changed (it is {_plain(old)!r})"
                )
        return replacement

    async def _check_cross_object_rules(self, attempt: _Attempt, obj: TopologyObject) -> None:
        """Rules between an object and what it references, beyond existence."""
        if isinstance(obj, Route) and obj.next_hop_port_id is not None:
            # device_kind/device_id of a port are immutable, so an existence guard suffices.
            port = await _read_referenced(attempt, Port, obj.next_hop_port_id, "next_hop_port_id")
            if port.device_kind is not DeviceKind.ROUTER or port.device_id != obj.router_id:
                raise InvalidFieldError(
                    "next_hop_port_id",
                    obj.next_hop_port_id,
                    f"port is on {port.device_kind.value} {port.device_id}, "
                    f"not on router {obj.router_id}",
                )
        checked_pool = pool_reference(obj)
        if checked_pool is not None:
            pool_field, pool_id = checked_pool
            # The pool fields checked here are immutable (LB_IMMUTABLE_FIELDS), so an
            # existence guard suffices.
            pool = await _read_referenced(attempt, Pool, pool_id, pool_field)
            problem = pool_fit_problem(obj, pool)
            if problem is not None:
                raise InvalidFieldError(*problem)

    async def _write(
        self, attempt: _Attempt, old: TopologyObject | None, new: TopologyObject | None
    ) -> None:
        """Buffer the write of one object (new=None: delete) and of its reverse references;
        check that every newly referenced object exists."""
        subject = new if new is not None else old
        assert subject is not None
        kind, object_id = subject.KIND, subject.id
        scope = attempt.scope
        if scope is not None and any(
            obj is not None and obj.tenant_id != scope.project for obj in (old, new)
        ):
            # The API refuses a tenant's write of another project's object before this; what
            # reaches here is a side effect (a cascade, a peer link) into another project.
            raise ConflictError(
                f"{kind} {object_id}: this change would also change objects of other "
                "projects; only the cluster admin can make it"
            )
        await self._count_usage(attempt, old, new)
        await _reserve_vtep_vni(attempt, old, new)
        old_targets, new_targets = _reference_map(old), _reference_map(new)
        for (target_kind, target_id), fields in new_targets.items():
            previous_fields = old_targets.get((target_kind, target_id))
            if previous_fields is None or (
                # Scoped: every reference the object keeps is checked, not only new ones.
                scope is not None and target_kind not in _UNSCOPED_REFERENCE_KINDS
            ):
                raw = await _read_visible(attempt, fields[0], target_kind, target_id)
                if scope is not None:
                    _check_shared_use(scope, kind, fields, target_kind, target_id, raw)
            if previous_fields is None:
                # A new referrer: a concurrent delete of the target must notice it.
                attempt.put(refs_version_key(target_kind, target_id), b"")
            if previous_fields != fields:
                attempt.put(
                    refs_key(target_kind, target_id, kind, object_id), json.dumps(fields).encode()
                )
        for target_kind, target_id in old_targets.keys() - new_targets.keys():
            attempt.delete(refs_key(target_kind, target_id, kind, object_id))
        key = topology_key(kind, object_id)
        if new is None:
            attempt.delete(key)
        else:
            attempt.put(key, encode(new))

    async def _count_usage(
        self, attempt: _Attempt, old: TopologyObject | None, new: TopologyObject | None
    ) -> None:
        """Keep the owners' usage counters of a counted kind (see `store.quota`) and refuse a
        new object past its project's quota. The counter and the limits are read guarded, so
        of two writers racing for the last unit, one retries and is refused."""
        kind = (new if new is not None else old).KIND  # type: ignore[union-attr]
        if kind not in DEFAULT_QUOTAS:
            return
        before = None if old is None else old.tenant_id
        after = None if new is None else new.tenant_id
        if before == after:
            return
        if before is not None and is_counted(kind, before):
            await self._add_usage(attempt, kind, before, -1)
        if after is not None and is_counted(kind, after):
            await self._add_usage(attempt, kind, after, +1)

    async def _add_usage(self, attempt: _Attempt, kind: str, project: str, delta: int) -> None:
        key = usage_key(project, kind)
        raw = await attempt.read(key)
        if raw is not None:
            usage = decode_usage(key, raw)
        else:
            # A store from before quotas: count once from the committed objects (this
            # attempt's own writes all pass here, so none of them is counted yet). The
            # counter's absence is guarded: a concurrent first count makes this one retry.
            usage = await count_owned(self.store, kind, project)
        if delta > 0:
            limits_key = quota_key(project)
            limit = effective_limits(decode_overrides(limits_key, await attempt.read(limits_key)))[
                kind
            ]
            if limit != UNLIMITED and usage + delta > limit:
                raise OverQuotaError(kind, project, limit, usage)
        attempt.put(key, str(max(usage + delta, 0)).encode())

    async def _allocate_tunnel_key(self, attempt: _Attempt, port_id: str) -> int:
        raw = await attempt.read_hint(TUNNEL_KEY_COUNTER_KEY)
        try:
            last = int(raw) if raw else 0
        except ValueError as exc:
            raise StoreCorruptError(
                f"tunnel key counter {TUNNEL_KEY_COUNTER_KEY} holds {raw!r}, not a number"
            ) from exc
        # Writers that collided on the same candidate spread out on their next attempt.
        spread = random.randrange(1 << min(attempt.number, 12)) if attempt.number else 0
        candidate = last + 1 + spread
        for _ in range(TUNNEL_KEY_MAX_PROBES):
            if not TUNNEL_KEY_MIN <= candidate <= TUNNEL_KEY_MAX:
                candidate = TUNNEL_KEY_MIN
            index_key = tunnel_key_index_key(candidate)
            if await attempt.read_hint(index_key) is None:
                attempt.require_absent(index_key)
                attempt.put(index_key, port_id.encode())
                attempt.put(TUNNEL_KEY_COUNTER_KEY, str(candidate).encode())
                return candidate
            candidate += 1
        raise ConflictError(
            f"no free tunnel key among {TUNNEL_KEY_MAX_PROBES} after {last}: "
            "the tunnel key space is (nearly) exhausted"
        )

    async def _subnet_for(self, attempt: _Attempt, port: Port, fixed: FixedIp) -> Subnet:
        """The subnet of one fixed IP, checked to be on the port's bridge."""
        # cidr and bridge_id are immutable: an existence guard suffices.
        subnet = await _read_referenced(attempt, Subnet, fixed.subnet_id, "fixed_ips")
        if port.device_kind is DeviceKind.BRIDGE and subnet.bridge_id != port.device_id:
            raise InvalidFieldError(
                "fixed_ips",
                fixed.subnet_id,
                f"subnet {subnet.id} ({subnet.cidr}) is on bridge {subnet.bridge_id}, "
                f"not on this port's bridge {port.device_id}",
            )
        return subnet

    async def _assign_fixed_ips(self, attempt: _Attempt, current: Port | None, port: Port) -> Port:
        """`port` with every fixed IP holding an address (allocated when not given), each
        address's index key taken for the port, addresses no longer held freed, and the fixed
        IPs mirrored in `addresses`."""
        held = (
            {} if current is None else {(f.subnet_id, f.ip_address): f for f in current.fixed_ips}
        )
        # An entry naming only a subnet keeps an address the port already holds there.
        pinned = {(f.subnet_id, f.ip_address) for f in port.fixed_ips if f.ip_address is not None}
        reusable = [key for key in held if key not in pinned]
        subnets: dict[str, Subnet] = {}
        assigned: list[FixedIp] = []
        for fixed in port.fixed_ips:
            subnet = subnets.get(fixed.subnet_id) or await self._subnet_for(attempt, port, fixed)
            subnets[subnet.id] = subnet
            if fixed.ip_address is None:
                kept = next((key for key in reusable if key[0] == subnet.id), None)
                if kept is not None:
                    reusable.remove(kept)
                    assigned.append(held[kept])
                    continue
                address = await self._allocate_address(attempt, subnet, port.id)
            else:
                address = fixed.ip_address
                await self._claim_address(attempt, subnet, port, address)
            assigned.append(FixedIp(subnet_id=subnet.id, ip_address=address))
        kept_keys = {(f.subnet_id, f.ip_address) for f in assigned}
        released = [f for key, f in held.items() if key not in kept_keys]
        await self._free_fixed_ips(attempt, port, released)
        updated = port.model_copy(update={"fixed_ips": tuple(assigned)})
        return _with_fixed_addresses(updated, current, subnets)

    async def _claim_address(
        self, attempt: _Attempt, subnet: Subnet, port: Port, address: IpAddress
    ) -> None:
        problem = subnet.address_problem(address)
        if problem is not None:
            raise InvalidFieldError("fixed_ips", str(address), problem)
        if port.device_kind is DeviceKind.BRIDGE and address == subnet.gateway_ip:
            raise InvalidFieldError(
                "fixed_ips",
                str(address),
                f"is the gateway_ip of subnet {subnet.id}: only a router port may hold it",
            )
        index_key = ip_index_key(subnet.id, address)
        holder = await attempt.read(index_key)
        if holder is None:
            attempt.put(index_key, port.id.encode())
        elif holder != port.id.encode():
            # A scoped caller is not told which port (it may be another project's).
            by = "" if attempt.scope is not None else f" by port {holder.decode(errors='replace')}"
            raise AddressInUseError(
                "fixed_ips", str(address), f"is in use on subnet {subnet.id}{by}"
            )

    async def _allocate_address(self, attempt: _Attempt, subnet: Subnet, port_id: str) -> IpAddress:
        """The next free pool address after the subnet's counter, taken for `port_id`."""
        counter_key = ip_counter_key(subnet.id)
        raw = await attempt.read_hint(counter_key)
        try:
            last = int(raw) if raw else None
        except ValueError as exc:
            raise StoreCorruptError(
                f"IP counter {counter_key} holds {raw!r}, not a number"
            ) from exc
        if attempt.number and last is not None:
            # Writers that collided on the same address spread out on their next attempt.
            last += random.randrange(1 << min(attempt.number, 12))
        prefix = ip_index_prefix(subnet.id)
        used = set()
        for index_key in await attempt.range_values(prefix):
            try:
                used.add(int(ipaddress.ip_address(index_key[len(prefix) :])))
            except ValueError as exc:
                raise StoreCorruptError(f"{index_key} does not end in an IP address") from exc
        address = subnet.first_free(used, last)
        if address is None:
            raise AddressInUseError(
                "fixed_ips",
                subnet.id,
                f"no free address left in the allocation pools of subnet {subnet.id} "
                f"({', '.join(str(p) for p in subnet.allocation_pools) or 'none'})",
            )
        index_key = ip_index_key(subnet.id, address)
        attempt.require_absent(index_key)
        attempt.put(index_key, port_id.encode())
        attempt.put(counter_key, str(int(address)).encode())
        return address

    async def _free_fixed_ips(
        self, attempt: _Attempt, port: Port, fixed_ips: Sequence[FixedIp]
    ) -> None:
        for fixed in fixed_ips:
            if fixed.ip_address is None:
                continue
            index_key = ip_index_key(fixed.subnet_id, fixed.ip_address)
            if await attempt.read(index_key) == port.id.encode():
                attempt.delete(index_key)

    async def _check_subnet_overlap(self, attempt: _Attempt, subnet: Subnet) -> None:
        """Subnets of one bridge never overlap. The bridge's refs version is read guarded
        (and bumped by this new referrer), so two overlapping creates cannot both commit."""
        await attempt.read(refs_version_key("bridge", subnet.bridge_id))
        prefix = refs_prefix("bridge", subnet.bridge_id) + "subnet/"
        for ref_key in await attempt.range_values(prefix):
            other_id = ref_key[len(prefix) :]
            key = topology_key("subnet", other_id)
            raw = await attempt.read_existing(key)
            if raw is None or other_id == subnet.id:
                continue
            other = _decode_stored("subnet", key, raw)
            assert isinstance(other, Subnet)
            if other.cidr.version == subnet.cidr.version and other.cidr.overlaps(subnet.cidr):
                hidden = attempt.scope is not None and not attempt.scope.sees(other)
                named = "another project's subnet" if hidden else f"subnet {other.id}"
                raise InvalidFieldError(
                    "cidr",
                    str(subnet.cidr),
                    f"overlaps {named} ({other.cidr}) on bridge {subnet.bridge_id}",
                )

    async def _link_peer(self, attempt: _Attempt, port: Port) -> None:
        """Make `port.peer_id` point back at `port` (same txn)."""
        assert port.peer_id is not None
        key = topology_key("port", port.peer_id)
        raw = await attempt.read(key)
        if raw is None:
            raise DanglingReferenceError("peer_id", port.peer_id, "port")
        peer = _decode_stored("port", key, raw)
        assert isinstance(peer, Port)
        if peer.device_kind == port.device_kind and peer.device_id == port.device_id:
            raise InvalidFieldError(
                "peer_id",
                port.peer_id,
                f"both ports are on {port.device_kind.value} {port.device_id}; "
                "an interior link joins two different devices",
            )
        if peer.device_kind is DeviceKind.BRIDGE and port.device_kind is DeviceKind.BRIDGE:
            raise InvalidFieldError(
                "peer_id",
                port.peer_id,
                "bridge-to-bridge links are not supported: one end must be a router port",
            )
        if peer.peer_id == port.id:
            return
        if peer.peer_id is not None:
            raise ConflictError(
                f"peer_id={port.peer_id!r}: port {peer.id} is already linked to port {peer.peer_id}"
            )
        if peer.host_id is not None:
            raise ConflictError(
                f"peer_id={port.peer_id!r}: port {peer.id} is bound to interface "
                f"{peer.interface_name} on host {peer.host_id}; unbind it before linking"
            )
        linked = Port.model_validate({**peer.model_dump(), "peer_id": port.id})
        await self._write(attempt, peer, linked)

    async def _unlink_peer(self, attempt: _Attempt, peer_id: str, port_id: str) -> None:
        """Clear `peer_id`'s link if it still points at `port_id`."""
        key = topology_key("port", peer_id)
        raw = await attempt.read(key)
        if raw is None:
            return
        peer = _decode_stored("port", key, raw)
        assert isinstance(peer, Port)
        if peer.peer_id == port_id:
            await self._write(attempt, peer, peer.model_copy(update={"peer_id": None}))

    async def _delete_object(
        self,
        attempt: _Attempt,
        kind: str,
        object_id: str,
        cascade: bool,
        blockers: list[Referrer],
        deleting: set[str],
    ) -> None:
        key = topology_key(kind, object_id)
        deleting.add(key)
        raw = await attempt.read(key)
        assert raw is not None
        obj = _decode_stored(kind, key, raw)
        # Guard: a referrer that appears after this read bumps the version -> retry.
        await attempt.read(refs_version_key(kind, object_id))
        prefix = refs_prefix(kind, object_id)
        # The index read is unguarded and may be a moment old: each referrer is re-read
        # (guarded) and its own fields decide; one that no longer points here is skipped.
        for ref_key in await attempt.range_values(prefix):
            referrer_kind, _, referrer_id = ref_key[len(prefix) :].partition("/")
            referrer_key = topology_key(referrer_kind, referrer_id)
            if referrer_key in deleting or referrer_kind not in KINDS:
                continue
            referrer_raw = await attempt.read(referrer_key)
            if referrer_raw is None:
                continue
            referrer = _decode_stored(referrer_kind, referrer_key, referrer_raw)
            fields = tuple(_reference_map(referrer).get((kind, object_id), ()))
            if not fields:
                continue
            if attempt.scope is not None and referrer.tenant_id != attempt.scope.project:
                # Neither blocked by nor cascading into what the caller cannot see; no ids.
                raise ConflictError(
                    f"{kind} {object_id} is used by objects of other projects; "
                    "only the cluster admin can delete it"
                )
            action = _on_delete(referrer_kind, fields)
            if action is _OnDelete.UNLINK_PEER:
                await self._unlink_peer(attempt, referrer_id, object_id)
                continue
            if not cascade:
                blockers.append(Referrer(referrer_kind, referrer_id, fields))
                continue
            reduced = _without_reference(referrer, fields, object_id)
            if reduced is None:
                await self._delete_object(
                    attempt, referrer_kind, referrer_id, cascade, blockers, deleting
                )
            else:
                await self._write(attempt, referrer, reduced)
        if blockers:
            return
        if isinstance(obj, Port) and obj.tunnel_key:
            index_key = tunnel_key_index_key(obj.tunnel_key)
            if await attempt.read(index_key) == obj.id.encode():
                attempt.delete(index_key)
        if isinstance(obj, Port):
            await self._free_fixed_ips(attempt, obj, obj.fixed_ips)
        if isinstance(obj, Subnet):
            for index_key in await attempt.range_values(ip_index_prefix(obj.id)):
                attempt.delete(index_key)
            attempt.delete(ip_counter_key(obj.id))
        await self._write(attempt, obj, None)
        attempt.delete(refs_version_key(kind, object_id))

    async def _shared_parent_ids(self, kind: str, revision: int) -> frozenset[str]:
        """The ids of the shared parents of `kind` (bridges, for subnets) at `revision`."""
        parent = _SHARED_WITH_PARENT.get(kind)
        if parent is None:
            return frozenset()
        parent_kind = parent[1]
        prefix = f"{TOPOLOGY_PREFIX}{parent_kind}/"
        found: set[str] = set()
        start_after: str | None = None
        while True:
            result = await self.store.range(
                prefix, revision=revision, limit=_RANGE_BATCH, start_after=start_after
            )
            for kv in result.kvs:
                data = json.loads(kv.value)
                if is_shared_data(parent_kind, data):
                    found.add(kv.key[len(prefix) :])
            if not result.more or not result.kvs:
                return frozenset(found)
            start_after = result.kvs[-1].key

    async def shared_via_parent(self, obj: TopologyObject) -> bool:
        """True when `obj` is shared because its parent is (a subnet of a shared bridge)."""
        parent = _SHARED_WITH_PARENT.get(obj.KIND)
        if parent is None:
            return False
        kv = await self.store.get(topology_key(parent[1], getattr(obj, parent[0])))
        return kv is not None and is_shared_data(parent[1], json.loads(kv.value))

    # Last in the class: from here on `list` names this method in the class namespace.
    async def list(
        self,
        cls: type[T],
        *,
        name: str | None = None,
        tenant_id: str | None = None,
        field_filters: Mapping[str, str] | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        marker: str | None = None,
        scope: ProjectScope | None = None,
    ) -> Page[T]:
        """One page of objects of `cls`, sorted by id, with id > `marker`, matching every
        filter (all equality) and, with `scope`, only what that project may see (its own
        objects, shared ones, and subnets of shared bridges). Read at one store revision."""
        kind = cls.KIND
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidFieldError("limit", limit, f"must be between 1 and {MAX_PAGE_SIZE}")
        filters = dict(field_filters or {})
        allowed = FILTERABLE_FIELDS.get(kind, frozenset())
        for field in filters:
            if field not in allowed:
                raise InvalidFieldError(
                    field,
                    filters[field],
                    f"{kind} objects can be filtered by {sorted(allowed) or 'name and tenant_id only'}",
                )
        if name is not None:
            filters["name"] = name
        if tenant_id is not None:
            filters["tenant_id"] = tenant_id

        prefix = f"{TOPOLOGY_PREFIX}{kind}/"
        start_after = prefix + marker if marker else None
        revision: int | None = None
        items: list[Versioned[T]] = []
        shared_parents: frozenset[str] | None = None  # read once, when first needed
        batch = min(max(limit + 1, 64), _RANGE_BATCH)
        while True:
            result = await self.store.range(
                prefix, revision=revision, limit=batch, start_after=start_after
            )
            revision = result.revision
            for kv in result.kvs:
                obj = _decode_stored(kind, kv.key, kv.value)
                assert isinstance(obj, cls)
                if not all(_field_text(obj, f) == want for f, want in filters.items()):
                    continue
                if scope is not None and not scope.sees(obj):
                    if shared_parents is None:
                        shared_parents = await self._shared_parent_ids(kind, revision)
                    if not _shared_via_parent(obj, shared_parents):
                        continue
                if len(items) == limit:
                    return Page(items, next_marker=items[-1].obj.id)
                items.append(Versioned(obj, kv.mod_revision))
            if not result.more or not result.kvs:
                return Page(items, next_marker=None)
            start_after = result.kvs[-1].key


def _shared_via_parent(obj: TopologyObject, shared_parents: frozenset[str]) -> bool:
    parent = _SHARED_WITH_PARENT.get(obj.KIND)
    return parent is not None and getattr(obj, parent[0]) in shared_parents


def _with_fixed_addresses(port: Port, current: Port | None, subnets: Mapping[str, Subnet]) -> Port:
    """`port` whose `addresses` hold each fixed IP with its subnet's prefix (first, in
    fixed_ips order), and no longer the fixed IPs `current` had and `port` dropped."""
    wanted = [
        ipaddress.ip_interface(f"{f.ip_address}/{subnets[f.subnet_id].cidr.prefixlen}")
        for f in port.fixed_ips
    ]
    fixed_now = {a.ip for a in wanted}
    fixed_before = set() if current is None else {f.ip_address for f in current.fixed_ips}
    others = [a for a in port.addresses if a.ip not in fixed_now and a.ip not in fixed_before]
    addresses: tuple[IpInterface, ...] = (*wanted, *others)
    if addresses == port.addresses:
        return port
    return port.model_copy(update={"addresses": addresses})


def _plain(value: object) -> object:
    return value.value if isinstance(value, enum.Enum) else value


def _field_text(obj: TopologyObject, field: str) -> object:
    return _plain(getattr(obj, field))
