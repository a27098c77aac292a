"""What a project token may write besides its project's own objects: the infrastructure rule.

Owns the list of what only the cluster admin may write: whole kinds (hosts, tunnel zones) and
fields of tenant objects that bind them to the physical world or to other projects (a port's
host binding `host_id`/`interface_name`/`interface_vlan`, its external VTEP
`vtep_ip`/`vtep_vni`, a bridge's `shared` flag). `check_infrastructure`
refuses a tenant write that sets or changes one with a 403 naming the kind or field;
`scope_of` gives the repository the project rules of a caller's writes (references checked
in the write's own store txn, `store.topology.ProjectScope`). Must not touch the store.
"""

from __future__ import annotations

from hivenet.api.auth import Principal
from hivenet.api.errors import ApiError, detail
from hivenet.model import TopologyObject
from hivenet.store.topology import ProjectScope

INFRASTRUCTURE_KINDS: frozenset[str] = frozenset({"host", "tunnel_zone", "bgp_peer"})
# Per kind: fields a tenant may keep as they are but neither set nor change.
INFRASTRUCTURE_FIELDS: dict[str, tuple[str, ...]] = {
    "port": ("host_id", "interface_name", "interface_vlan", "vtep_ip", "vtep_vni"),
    "bridge": ("shared",),
    "route": ("learned_from",),  # learned routes are the BGP speakers' (agent/bgp.py)
}


def scope_of(principal: Principal) -> ProjectScope | None:
    """The repository scope of the caller's writes (None: the cluster admin, unscoped)."""
    return None if principal.tenant_id is None else ProjectScope(principal.tenant_id)


def check_infrastructure(
    principal: Principal,
    cls: type[TopologyObject],
    current: TopologyObject | None,
    new: TopologyObject | None,
) -> None:
    """403 when a non-admin writes an infrastructure kind, or sets/changes an infrastructure
    field (`current` None: a create, compared with the field's default)."""
    if principal.is_admin:
        return
    kind = cls.KIND
    if kind in INFRASTRUCTURE_KINDS:
        raise ApiError(
            403,
            f"{kind} objects are infrastructure: only the cluster admin may write them "
            f"(this token: {principal.describe()})",
            [detail("kind", kind, "cluster admin only")],
        )
    if new is None:
        return
    for field in INFRASTRUCTURE_FIELDS.get(kind, ()):
        before = cls.model_fields[field].default if current is None else getattr(current, field)
        after = getattr(new, field)
        if after != before:
            raise ApiError(
                403,
                f"{field}={after!r}: only the cluster admin may set or change a {kind}'s "
                f"{field} (this token: {principal.describe()})",
                [detail(field, after, "cluster admin only")],
            )
