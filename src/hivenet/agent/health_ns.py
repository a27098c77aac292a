"""Health-check namespaces: the kernel side of probing load-balancer members through the
overlay (see `hivenet.agent.health` for the design).

Owns, for one (router, host) pair, a network namespace `hn-hm<tag>` and a veth pair: the host
end `hnhm<tag>h` stays in the agent's network namespace, where the agent binds it as the
router's health port (an exterior router port, like a VM's interface); the inner end
`hnhm<tag>n` sits in the namespace with the health address and a default route via the router
port's address. `ensure_health_namespace` builds that, idempotently (what exists and matches
is kept; anything else is rebuilt from scratch), `remove_health_namespace` takes it away, and
`health_namespaces` lists this agent's namespaces so a restarted agent can drop the ones it
no longer needs. Every name carries the `hn` prefix and is at most 15 characters.

Where the namespace is visible: the bind mount under /run/netns is made in the agent's own
mount namespace. An agent on a real host runs in the machine's mount namespace, so `ip netns`
sees it. The lab starts agents with `ip netns exec`, which gives each a private mount
namespace: there only the agent (and its children) can enter it; the machine sees an empty
placeholder file of the same name, which this module replaces on the next ensure and
`hivenet lab clean` deletes; and the namespace dies with the agent, so a killed agent leaves
no namespace behind.

Namespace primitives (create without forking, enter from a thread, remove) are
`hivenet.nsutil`, shared with the lab. Blocking (netlink round trips; work inside a namespace
runs in a short-lived thread that enters it, never in a forked child): call it from a worker
thread. Must not touch any namespace or link not named here, the topology or
the datapath.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hivenet.nsutil import (
    create_namespace,
    in_namespace,
    link_index,
    list_namespaces,
    namespace_is_live,
    remove_namespace,
)

HEALTH_NAMESPACE_PREFIX = "hn-hm"
HEALTH_LINK_PREFIX = "hnhm"
# Same room for the VXLAN headers as a VM's interface; probes are small anyway.
HEALTH_LINK_MTU = 1450
HOST_TAG_LEN = 4
ROUTER_TAG_LEN = 6


class HealthNamespaceError(RuntimeError):
    """A health namespace operation failed; the message names the object and the cause."""


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def own_network_namespace_inode() -> int:
    """The inode of the network namespace this process runs in: with the host id it tells
    apart agents that share one machine (the lab), and it stays the same across an agent's
    restarts in the same namespace."""
    return os.stat("/proc/self/ns/net").st_ino


def host_tag(host_id: str, namespace_inode: int) -> str:
    """4 hex digits naming this agent's health namespaces (`hn-hm<host tag><router tag>`)."""
    return _digest("host", host_id, str(namespace_inode))[:HOST_TAG_LEN]


def router_tag(router_id: str) -> str:
    return _digest("router", router_id)[:ROUTER_TAG_LEN]


def health_namespace_name(router_id: str, host_tag_text: str) -> str:
    """`hn-hm<host tag><router tag>`: 15 characters."""
    return f"{HEALTH_NAMESPACE_PREFIX}{host_tag_text}{router_tag(router_id)}"


@dataclass(frozen=True, slots=True)
class HealthNamespace:
    """One health-check namespace as it must be: names, the inner end's address (with the
    prefix of the point-to-point block) and the router port's address (its gateway)."""

    namespace: str
    host_link: str
    inner_link: str
    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address

    def __post_init__(self) -> None:
        for field, name in (
            ("namespace", self.namespace),
            ("host_link", self.host_link),
            ("inner_link", self.inner_link),
        ):
            if not name.startswith("hn") or not 2 < len(name) <= 15:
                raise ValueError(f"{field}: {name!r} must start with 'hn', at most 15 characters")
        if self.gateway not in self.address.network or self.gateway == self.address.ip:
            raise ValueError(
                f"gateway: {self.gateway} must be another address of {self.address.network}"
            )

    @classmethod
    def for_router(
        cls,
        router_id: str,
        host_tag_text: str,
        address: ipaddress.IPv4Interface,
        gateway: ipaddress.IPv4Address,
    ) -> HealthNamespace:
        tag = router_tag(router_id)
        return cls(
            namespace=health_namespace_name(router_id, host_tag_text),
            host_link=f"{HEALTH_LINK_PREFIX}{tag}h",
            inner_link=f"{HEALTH_LINK_PREFIX}{tag}n",
            address=address,
            gateway=gateway,
        )


# ---------------------------------------------------------------------------- namespaces


def health_namespaces(host_tag_text: str) -> list[str]:
    """This agent's health namespaces (live ones and placeholders), by name."""
    return list_namespaces(f"{HEALTH_NAMESPACE_PREFIX}{host_tag_text}")


def _drop_namespace(namespace: str) -> bool:
    """Unmount and unlink /run/netns/<namespace>; False when there was nothing."""
    try:
        return remove_namespace(namespace)
    except OSError as error:
        raise HealthNamespaceError(str(error)) from error


def _create_namespace(namespace: str) -> None:
    """A new network namespace, loopback up, IPv6 off (no RS, DAD or MLD into the router
    port); made by a thread, never a forked child (this process runs threads)."""
    try:
        create_namespace(namespace, ipv6=False)
    except OSError as error:
        raise HealthNamespaceError(str(error)) from error


# ---------------------------------------------------------------------------- links


def _netlink(action: str, call: object, *args: object, **kwargs: object) -> object:
    try:
        return call(*args, **kwargs)  # type: ignore[operator]
    except NetlinkError as error:
        raise HealthNamespaceError(f"{action}: {os.strerror(error.code)}") from error


def _inner_state_matches(spec: HealthNamespace) -> bool:
    """The inner end exists in the namespace, is up, holds exactly the address and has the
    default route via the gateway (run inside the namespace)."""
    with IPRoute() as ipr:
        index = link_index(ipr, spec.inner_link)
        if index is None:
            return False
        link = ipr.get_links(index)[0]
        if link.get("state") != "up":
            return False
        addresses = {
            (str(a.get("address")), int(a["prefixlen"])) for a in ipr.get_addr(index=index)
        }
        if addresses != {(str(spec.address.ip), spec.address.network.prefixlen)}:
            return False
        defaults = ipr.get_default_routes(family=2)
        return any(str(route.get("gateway")) == str(spec.gateway) for route in defaults)


def health_namespace_matches(spec: HealthNamespace) -> bool:
    """True when `spec` is fully in place: live namespace, both veth ends, address, route."""
    if not namespace_is_live(spec.namespace):
        return False
    with IPRoute() as ipr:
        host_index = link_index(ipr, spec.host_link)
        if host_index is None or ipr.get_links(host_index)[0].get("state") != "up":
            return False
    try:
        return in_namespace(spec.namespace, lambda: _inner_state_matches(spec))
    except (OSError, NetlinkError):
        return False


def ensure_health_namespace(spec: HealthNamespace) -> bool:
    """Make `spec` true; False when it already was (nothing touched), True when (re)built."""
    if health_namespace_matches(spec):
        return False
    remove_health_namespace(spec.namespace, spec.host_link)
    _create_namespace(spec.namespace)
    try:
        _build_links(spec)
    except BaseException:
        remove_health_namespace(spec.namespace, spec.host_link)
        raise
    return True


def _build_links(spec: HealthNamespace) -> None:
    with IPRoute() as ipr:
        _netlink(
            f"create veth {spec.host_link!r}/{spec.inner_link!r}",
            ipr.link,
            "add",
            ifname=spec.host_link,
            kind="veth",
            peer={"ifname": spec.inner_link},
        )
        host_index = link_index(ipr, spec.host_link)
        inner_index = link_index(ipr, spec.inner_link)
        if host_index is None or inner_index is None:
            raise HealthNamespaceError(f"veth {spec.host_link!r} vanished after its creation")
        _netlink(
            f"set MTU of {spec.inner_link!r}",
            ipr.link,
            "set",
            index=inner_index,
            mtu=HEALTH_LINK_MTU,
        )
        _netlink(
            f"move {spec.inner_link!r} to namespace {spec.namespace!r}",
            ipr.link,
            "set",
            index=inner_index,
            net_ns_fd=spec.namespace,
        )
        _netlink(
            f"set {spec.host_link!r} up",
            ipr.link,
            "set",
            index=host_index,
            mtu=HEALTH_LINK_MTU,
            state="up",
        )
    in_namespace(spec.namespace, lambda: _configure_inner_link(spec))


def _configure_inner_link(spec: HealthNamespace) -> None:
    """Inside the namespace: the inner end up, with its address and the default route."""
    with IPRoute() as ipr:
        inner_index = link_index(ipr, spec.inner_link)
        if inner_index is None:
            raise HealthNamespaceError(f"{spec.inner_link!r} not found in {spec.namespace!r}")
        _netlink(f"set {spec.inner_link!r} up", ipr.link, "set", index=inner_index, state="up")
        _netlink(
            f"add {spec.address} to {spec.inner_link!r}",
            ipr.addr,
            "add",
            index=inner_index,
            address=str(spec.address.ip),
            prefixlen=spec.address.network.prefixlen,
        )
        _netlink(
            f"add default route via {spec.gateway} in {spec.namespace!r}",
            ipr.route,
            "add",
            dst="0.0.0.0/0",
            gateway=str(spec.gateway),
            oif=inner_index,
        )


def host_link_of(namespace: str) -> str | None:
    """The host end of the veth of health namespace `namespace` (None: not one of ours)."""
    if not namespace.startswith(HEALTH_NAMESPACE_PREFIX):
        return None
    tag = namespace[len(HEALTH_NAMESPACE_PREFIX) + HOST_TAG_LEN :]
    if len(tag) != ROUTER_TAG_LEN:
        return None
    return f"{HEALTH_LINK_PREFIX}{tag}h"


def remove_health_namespace(namespace: str, host_link: str | None = None) -> bool:
    """Delete the host end of the veth (its peer goes with it) and the namespace; True when
    anything was there. Idempotent. `host_link` defaults to the one the name implies."""
    removed = False
    host_link = host_link or host_link_of(namespace)
    if host_link is not None:
        with IPRoute() as ipr:
            index = link_index(ipr, host_link)
            if index is not None:
                try:
                    ipr.link("del", index=index)
                    removed = True
                except NetlinkError as error:
                    if error.code != errno.ENODEV:  # gone meanwhile
                        raise HealthNamespaceError(
                            f"delete link {host_link!r}: {os.strerror(error.code)}"
                        ) from error
    return _drop_namespace(namespace) or removed
