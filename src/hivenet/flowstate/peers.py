"""Which hosts need a flow-state entry: the push set of a connection.

MidoNet's rule: the ingress host creates the state and pushes it, before the packet, to every
host where a packet of the connection may enter next: the egress host(s) (the reply enters
there) and the hosts binding a port of a stateful port group the ingress or egress port
belongs to (a reply may come back through any member, e.g. another uplink of an ECMP group).
A host refreshing an entry that a return flow uses pushes by the same rule, seen from its
side (the original ingress host is then one of its targets).

Owns the pure functions that compute those sets and group records by peer. Does not know the
topology (the agent passes host ids it resolved) and sends nothing.
Pure: no I/O, no clock; imports only the standard library.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import TypeVar

Record = TypeVar("Record")


def _check_host(host: object, what: str) -> str:
    if not isinstance(host, str) or not host:
        raise ValueError(f"{what} must be a non-empty host id, got {host!r}")
    return host


def push_targets(
    *,
    local_host: str,
    ingress_host: str | None,
    egress_hosts: Iterable[str | None] = (),
    stateful_group_hosts: Iterable[str | None] = (),
) -> frozenset[str]:
    """The hosts to push a connection's entries to, never `local_host` itself.

    `ingress_host`/`egress_hosts`: the hosts binding the flow's ingress and egress ports
    (None for an unbound port, skipped; several egress hosts for a flooded packet).
    `stateful_group_hosts`: the hosts binding any port of a stateful port group that the
    ingress or egress port is a member of (`hosts_of_stateful_groups`).
    """
    local = _check_host(local_host, "local_host")
    targets: set[str] = set()
    if ingress_host is not None:
        targets.add(_check_host(ingress_host, "ingress_host"))
    for host in egress_hosts:
        if host is not None:
            targets.add(_check_host(host, "egress_hosts entry"))
    for host in stateful_group_hosts:
        if host is not None:
            targets.add(_check_host(host, "stateful_group_hosts entry"))
    targets.discard(local)
    return _shared_peer_set(targets)


# Every entry holds its push set; the distinct sets are few (hosts of one flow's path), so
# equal sets share one object instead of one per connection. Bounded: past the limit a new
# set is returned unshared.
_PEER_SETS: dict[frozenset[str], frozenset[str]] = {}
_MAX_SHARED_PEER_SETS = 4096


def _shared_peer_set(hosts: set[str]) -> frozenset[str]:
    candidate = frozenset(hosts)
    shared = _PEER_SETS.get(candidate)
    if shared is not None:
        return shared
    if len(_PEER_SETS) < _MAX_SHARED_PEER_SETS:
        _PEER_SETS[candidate] = candidate
    return candidate


def hosts_of_stateful_groups(
    port_ids: Iterable[str],
    groups_of_port: Mapping[str, Iterable[str]],
    stateful_groups: Collection[str],
    hosts_of_group: Mapping[str, Iterable[str]],
) -> frozenset[str]:
    """Hosts binding a member of any stateful group one of `port_ids` belongs to.

    `groups_of_port`: port id -> its port group ids; `stateful_groups`: ids of the groups
    marked stateful; `hosts_of_group`: group id -> hosts binding one of its members."""
    hosts: set[str] = set()
    for port_id in port_ids:
        for group_id in groups_of_port.get(port_id, ()):
            if group_id in stateful_groups:
                hosts.update(hosts_of_group.get(group_id, ()))
    return frozenset(hosts)


def group_by_peer(
    due: Iterable[tuple[Record, frozenset[str]]], default_peers: frozenset[str] = frozenset()
) -> dict[str, list[Record]]:
    """{host: records to push to it} from the tables' `due_for_push` output; a record with no
    peers of its own goes to `default_peers`. Order within each list follows `due`."""
    out: dict[str, list[Record]] = {}
    for record, peers in due:
        for host in sorted(peers or default_peers):
            out.setdefault(host, []).append(record)
    return out
