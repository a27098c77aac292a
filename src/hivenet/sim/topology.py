"""`TopologyView`: the simulation's read-only, precompiled picture of the virtual topology.

Owns the indexes the hot path needs (ports by device, compiled route tables per router,
compiled chains, port by tunnel key, host underlay IPs from tunnel zones, bridge ARP-proxy
and static MAC entries) and their incremental maintenance: the agent feeds one topology
object (or deletion) at a time with `apply()` / `remove()`, and only the touched router,
chain or bridge is recompiled. Each change returns the flow tags it invalidates.

The simulation only reads a view; between two simulations the agent (single-threaded) may
apply changes in place. Must not touch the store, the clock or any I/O: objects come in as
`hivenet.model` values.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from hivenet.model import (
    BgpPeer,
    Bridge,
    Chain,
    DeviceKind,
    IpAddrGroup,
    Port,
    Route,
    Router,
    RouteType,
    Rule,
    TopologyObject,
    TunnelZone,
    peek_id,
)
from hivenet.model.types import mac_to_int
from hivenet.sim.routing import RouteTable
from hivenet.sim.rules import CompiledChain, compile_chain
from hivenet.sim.secgroups import SecurityIndex
from hivenet.sim.vips import LB_KINDS, VipIndex

_IPV4_BITS = 32
_IPV6_BITS = 128


@dataclass(frozen=True, slots=True)
class PortAddress:
    """One address of a port, precomputed as ints."""

    version: int
    ip: int
    prefix_len: int
    network: int
    mask: int
    text: str

    def contains(self, ip: int) -> bool:
        return ip & self.mask == self.network


@dataclass(frozen=True, slots=True)
class PortInfo:
    port: Port
    id: str
    name: str
    device_kind: DeviceKind
    device_id: str
    admin_up: bool
    mac: int
    peer_id: str | None
    vlan_id: int | None
    inbound_chain_id: str | None
    outbound_chain_id: str | None
    port_group_ids: frozenset[str]
    host_id: str | None
    bound: bool
    tunnel_key: int
    addresses: tuple[PortAddress, ...]
    tag: str
    # L2 gateway: the external VTEP (its IPv4, the VNI) egress tunnels to from any host, and
    # the 802.1Q tag frames carry on the port's interface (popped at ingress, pushed at egress).
    vtep: tuple[str, int] | None = None
    interface_vlan: int | None = None

    def addresses_of(self, version: int) -> tuple[PortAddress, ...]:
        return tuple(a for a in self.addresses if a.version == version)


@dataclass(frozen=True, slots=True)
class BridgeInfo:
    bridge: Bridge
    id: str
    name: str
    admin_up: bool
    inbound_chain_id: str | None
    outbound_chain_id: str | None
    arp_proxy: bool
    port_ids: tuple[str, ...]
    # (vlan context, mac) -> port id, for MACs the topology itself knows (router ports peered
    # to this bridge). They take precedence over learned entries.
    static_macs: Mapping[tuple[int, int], str]
    # IPv4 address -> MAC, answered by the ARP proxy.
    arp_proxy_entries: Mapping[int, int]
    tag: str


@dataclass(frozen=True, slots=True)
class RouterInfo:
    router: Router
    id: str
    name: str
    admin_up: bool
    inbound_chain_id: str | None
    outbound_chain_id: str | None
    port_ids: tuple[str, ...]
    routes_v4: RouteTable
    routes_v6: RouteTable
    # The router's own addresses: (version, ip) -> port id.
    own_addresses: Mapping[tuple[int, int], str]
    # The bits of ip_dst that decide "is it one of mine" (full width if any address exists).
    own_v4_read_mask: int
    own_v6_read_mask: int
    tag: str


def _port_address(interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> PortAddress:
    network = interface.network
    return PortAddress(
        version=interface.version,
        ip=int(interface.ip),
        prefix_len=network.prefixlen,
        network=int(network.network_address),
        mask=int(network.netmask),
        text=str(interface.ip),
    )


# Port fields that the compiled device (flood set, static MACs, ARP proxy, connected routes,
# own addresses) depends on.
_DEVICE_PORT_FIELDS: tuple[str, ...] = (
    "device_kind",
    "device_id",
    "peer_id",
    "vlan_id",
    "admin_state_up",
    "mac",
    "addresses",
)


# A bridge compiles nothing from its ports' admin state: the engine reads it at the port
# itself, and every flow through a port carries the port's tag. So a bridge port going down
# invalidates the flows through that port only, not every flow of its bridge. (A router's
# connected routes do depend on it.)
_BRIDGE_DEVICE_PORT_FIELDS = tuple(f for f in _DEVICE_PORT_FIELDS if f != "admin_state_up")


def _device_sees_change(old: Port | None, new: Port | None) -> bool:
    if old is None or new is None:
        return True
    fields = _DEVICE_PORT_FIELDS
    if old.device_kind is DeviceKind.BRIDGE and new.device_kind is DeviceKind.BRIDGE:
        fields = _BRIDGE_DEVICE_PORT_FIELDS
    return any(getattr(old, name) != getattr(new, name) for name in fields)


# Decodes a stored value of (kind, id) for `TopologyView.apply_all(raw=...)`: the object, or
# None when the value is bad (the decoder reports it, naming the key and the field).
RawDecoder = Callable[[str, str, bytes], TopologyObject | None]

# Kinds whose stored values a view may keep undecoded until a chain is first looked up: the
# bulk of a large topology (100k rules in 20k chains for 10k ports), most of it never
# evaluated on a given host.
LAZY_KINDS = frozenset({"chain", "rule"})


class CompiledChains(dict[str, CompiledChain]):
    """`TopologyView.chains`: compiled chains by id. A stored chain loaded undecoded (see
    `TopologyView.apply_all`) is decoded and compiled on its first lookup (`[]`, `get`, `in`);
    length and iteration cover the compiled ones only."""

    def __init__(self, build: Callable[[str], None], lazy: set[str]) -> None:
        super().__init__()
        self._build = build
        self._lazy = lazy  # ids of stored chains not compiled yet

    def __missing__(self, chain_id: str) -> CompiledChain:
        if chain_id in self._lazy:
            self._build(chain_id)
            if dict.__contains__(self, chain_id):
                return dict.__getitem__(self, chain_id)
        raise KeyError(chain_id)

    def get(self, chain_id: str, default: CompiledChain | None = None) -> CompiledChain | None:  # type: ignore[override]
        try:
            return self[chain_id]
        except KeyError:
            return default

    def __contains__(self, chain_id: object) -> bool:
        return dict.__contains__(self, chain_id) or (
            isinstance(chain_id, str) and self.get(chain_id) is not None
        )


class TopologyView:
    """The topology as the simulation reads it. Build empty and `apply()` objects, or use
    `TopologyView.from_objects(...)`. Attribute dicts are read-only for callers."""

    def __init__(self, decode: RawDecoder | None = None) -> None:
        # Raw objects by kind and id.
        self.objects: dict[str, dict[str, TopologyObject]] = {}
        # Stored values not decoded yet (`apply_all(raw=...)`, kinds in LAZY_KINDS): chains
        # and rules by id. A rule is filed only when `peek_id` reads the chain id its value
        # names, and read again when needed (no (chain id, value) pair per rule: 100k tuples
        # at a large start-up, each one more object for the cyclic GC to walk). Decoded (and
        # moved to `objects`) by `get`/`all` and when their chain is compiled.
        self._decode = decode
        self._raw_chains: dict[str, bytes] = {}
        self._raw_rules: dict[str, bytes] = {}
        # Stored chains with undecoded parts that are not compiled yet: compiled on lookup.
        self._lazy_chains: set[str] = set()
        # Compiled read side.
        self.ports: dict[str, PortInfo] = {}
        self.bridges: dict[str, BridgeInfo] = {}
        self.routers: dict[str, RouterInfo] = {}
        self.chains: dict[str, CompiledChain] = CompiledChains(self._build_chain, self._lazy_chains)
        self.port_by_tunnel_key: dict[int, str] = {}
        self.host_underlay_ip: dict[str, str] = {}
        # Reverse indexes used for incremental recompilation.
        self._ports_by_device: dict[str, set[str]] = {}
        self._routes_by_router: dict[str, set[str]] = {}
        self._rules_by_chain: dict[str, set[str]] = {}
        self._chains_by_ip_group: dict[str, set[str]] = {}
        self.revision = 0
        # Hosts known to be down (their agent's liveness key is gone). Ports bound to them are
        # treated as down: traffic towards them is dropped at ingress instead of tunnelled into
        # the void. Empty by default: liveness is the agent's knowledge, not the topology's.
        self.down_hosts: set[str] = set()
        # Uplink ports with a BGP session (bgp_peer objects, admin up): port id -> peer id.
        # The router hands their BGP packets to the host's speaker (sim/router.py).
        self.bgp_ports: dict[str, str] = {}
        # Exterior ports known to be down though their host is up (a gateway's uplink
        # interface lost its link, as that gateway's probe replies say): left out of ECMP,
        # traffic out of them dropped. Liveness, like `down_hosts`, is the agent's knowledge.
        self.down_ports: set[str] = set()
        # Inside `apply_all`: what to recompile once at the end, by kind.
        self._deferred: dict[str, set[str]] | None = None
        # Port security, security groups and floating IPs (sim/secgroups.py): its virtual
        # chains live in `chains` next to the stored ones.
        self.security = SecurityIndex(self.objects, self.chains)
        # Load-balancer VIPs (sim/vips.py): virtual chains in `chains`, ARP answers, balancers.
        self.vips = VipIndex(self.objects, self.chains)

    @classmethod
    def from_objects(cls, objects: Iterable[TopologyObject]) -> TopologyView:
        view = cls()
        view.apply_all(objects)
        return view

    def apply_all(
        self,
        objects: Iterable[TopologyObject],
        raw: Iterable[tuple[str, str, bytes]] = (),
    ) -> frozenset[str]:
        """Apply many objects (e.g. the initial snapshot), compiling each touched device and
        chain once at the end instead of after every object. Returns invalidated tags.

        `raw`: stored values as (kind, id, value) of kinds in LAZY_KINDS, kept undecoded: a
        chain they belong to is decoded (with the decoder given to the view) and compiled on
        its first lookup in `chains`, unless it is compiled already (then at once, as for an
        object). The tags of the chains they touch are returned now."""
        if self._deferred is not None:
            raise RuntimeError("TopologyView.apply_all is not reentrant")
        self._deferred = {"bridge": set(), "router": set(), "chain": set()}
        tags: set[str] = set()
        try:
            for obj in objects:
                tags |= self.apply(obj)
            chain_ids: set[str] = set()
            self._apply_raw_all(raw, tags, chain_ids)
            tags.update(f"chain:{chain_id}" for chain_id in chain_ids)
        finally:
            deferred, self._deferred = self._deferred, None
            for chain_id in sorted(deferred["chain"]):
                self._build_chain(chain_id)
            for bridge_id in sorted(deferred["bridge"]):
                self._build_bridge(bridge_id)
            for router_id in sorted(deferred["router"]):
                self._build_router(router_id)
        return frozenset(tags)

    def _compile_bridge(self, bridge_id: str) -> None:
        if self._deferred is not None:
            self._deferred["bridge"].add(bridge_id)
        else:
            self._build_bridge(bridge_id)

    def _compile_router(self, router_id: str) -> None:
        if self._deferred is not None:
            self._deferred["router"].add(router_id)
        else:
            self._build_router(router_id)

    def _compile_chain(self, chain_id: str) -> None:
        if chain_id in self._lazy_chains:
            return  # compiled on its first lookup, from what is stored then
        if self._deferred is not None:
            self._deferred["chain"].add(chain_id)
        else:
            self._build_chain(chain_id)

    # ----------------------------------------------------------------- reading helpers

    def get(self, kind: str, object_id: str) -> TopologyObject | None:
        obj = self.objects.get(kind, {}).get(object_id)
        if obj is None and kind in LAZY_KINDS:
            obj = self._materialize(kind, object_id)
        return obj

    def all(self, kind: str) -> list[TopologyObject]:
        """Every object of `kind`, decoding those loaded undecoded (see `loaded`)."""
        pending = self._raw_rules if kind == "rule" else self._raw_chains if kind == "chain" else {}
        for object_id in list(pending):
            self._materialize(kind, object_id)
        return self.loaded(kind)

    def loaded(self, kind: str) -> list[TopologyObject]:
        """The decoded objects of `kind`: all of them, except stored chains and rules not
        decoded yet (those of chains never looked up since a lazy load)."""
        return list(self.objects.get(kind, {}).values())

    # ----------------------------------------------------------------- undecoded values

    def _apply_raw_all(
        self, raw: Iterable[tuple[str, str, bytes]], tags: set[str], chain_ids: set[str]
    ) -> None:
        """`_apply_raw` of each stored value, the chains they touch compiled (if in use) or
        marked lazy once at the end (also when one fails). A chain or rule not held yet (every one at start-up:
        120k values for 10k ports) takes the short way here: filed, its chain noted."""
        raw_chains, raw_rules, rules_by_chain = (
            self._raw_chains,
            self._raw_rules,
            self._rules_by_chain,
        )
        objects = self.objects
        applied = False
        try:
            for kind, object_id, value in raw:
                if not applied:
                    if self._decode is None:
                        raise TypeError("TopologyView: undecoded values need the view's decoder")
                    applied = True
                if kind == "rule":
                    if object_id not in raw_rules and object_id not in objects.get("rule", ()):
                        parent = peek_id(value, "chain_id")
                        if parent is not None:
                            raw_rules[object_id] = value
                            children = rules_by_chain.get(parent)
                            if children is None:
                                rules_by_chain[parent] = {object_id}
                            else:
                                children.add(object_id)
                            chain_ids.add(parent)
                            continue
                elif kind == "chain" and object_id not in objects.get("chain", ()):
                    raw_chains[object_id] = value
                    chain_ids.add(object_id)
                    continue
                self._apply_raw(kind, object_id, value, tags, chain_ids)
        finally:
            for chain_id in chain_ids:
                if dict.__contains__(self.chains, chain_id):
                    self._compile_chain(chain_id)  # in use: compiled now, as for an object
                else:
                    self._lazy_chains.add(chain_id)
            if applied:
                self.revision += 1

    def _apply_raw(
        self, kind: str, object_id: str, value: bytes, tags: set[str], chain_ids: set[str]
    ) -> None:
        """Insert or replace a stored chain or rule without decoding it (see `apply_all`).
        The chains it touches go in `chain_ids`: the caller tags each once (120k calls at a
        large start-up, where a set of 240k tag strings cost more than the rest) and compiles
        it if in use, else marks it lazy; a rule's own tag is left out (no flow carries one,
        only its chain's). A value decoded at once instead adds its tags to `tags`."""
        parent = peek_id(value, "chain_id") if kind == "rule" else object_id
        if kind not in LAZY_KINDS or parent is None:
            obj = self._decode(kind, object_id, value) if self._decode is not None else None
            if obj is not None:
                tags |= self.apply(obj)
            return
        if kind == "rule":
            old = self._rule_parent(object_id)
            if old is not None:
                self._rules_by_chain[old].discard(object_id)
                if "rule" in self.objects:
                    self.objects["rule"].pop(object_id, None)
                if old != parent:
                    chain_ids.add(old)
            self._raw_rules[object_id] = value
            self._rules_by_chain.setdefault(parent, set()).add(object_id)
        else:
            if "chain" in self.objects:
                self.objects["chain"].pop(object_id, None)
            self._raw_chains[object_id] = value
        chain_ids.add(parent)

    def _rule_parent(self, rule_id: str) -> str | None:
        raw = self._raw_rules.get(rule_id)
        if raw is not None:
            return _raw_rule_parent(raw)
        rule = self.objects["rule"].get(rule_id) if "rule" in self.objects else None
        return rule.chain_id if isinstance(rule, Rule) else None

    def _materialize(self, kind: str, object_id: str) -> TopologyObject | None:
        """Decode an undecoded stored chain or rule into `objects` (None: none, or bad)."""
        if kind == "rule" and object_id in self._raw_rules:
            value = self._raw_rules.pop(object_id)
            parent = _raw_rule_parent(value)
            self._rules_by_chain.get(parent, set()).discard(object_id)
        elif kind == "chain" and object_id in self._raw_chains:
            value = self._raw_chains.pop(object_id)
        else:
            return None
        obj = self._decode(kind, object_id, value) if self._decode is not None else None
        if obj is None or kind != obj.KIND or obj.id != object_id:
            return None  # a bad value: the decoder reported it; as if never stored
        self.objects.setdefault(kind, {})[object_id] = obj
        # What `loaded()` returns changed: caches keyed on the revision (the agent's rule index
        # for its traffic counters) are rebuilt.
        self.revision += 1
        if isinstance(obj, Rule):
            # `peek_id` read the chain id the value holds, so it is `parent`.
            self._rules_by_chain.setdefault(obj.chain_id, set()).add(object_id)
        return obj

    def port_by_key(self, tunnel_key: int) -> PortInfo | None:
        port_id = self.port_by_tunnel_key.get(tunnel_key)
        return self.ports.get(port_id) if port_id is not None else None

    def device_name(self, kind: str, device_id: str) -> str:
        obj = self.get(kind, device_id)
        return obj.name if obj is not None and obj.name else device_id

    # ----------------------------------------------------------------- updates

    def apply(self, obj: TopologyObject) -> frozenset[str]:
        """Insert or replace `obj`; recompile what depends on it. Returns invalidated tags."""
        if not isinstance(obj, TopologyObject) or not obj.KIND:
            raise TypeError(f"TopologyView.apply: not a topology object: {obj!r}")
        kind = obj.KIND
        old = self.get(kind, obj.id)
        self.objects.setdefault(kind, {})[obj.id] = obj
        self.revision += 1
        return self._changed(kind, obj.id, old, obj)

    def set_host_alive(self, host_id: str, alive: bool) -> frozenset[str]:
        """Record a host's liveness; returns the tags to invalidate when it changed."""
        if alive == (host_id not in self.down_hosts):
            return frozenset()
        if alive:
            self.down_hosts.discard(host_id)
        else:
            self.down_hosts.add(host_id)
        self.revision += 1
        tags = {f"host:{host_id}"}
        # Routes learned by the host's BGP speakers leave (or rejoin) their routers' ECMP sets.
        for router_id in self._routers_learning_on(host_id):
            self._compile_router(router_id)
            tags.add(f"router:{router_id}")
        return frozenset(tags)

    def _routers_learning_on(self, host_id: str) -> set[str]:
        routers: set[str] = set()
        for route in self.objects.get("route", {}).values():
            if isinstance(route, Route) and route.learned_from is not None:
                port = self.ports.get(route.next_hop_port_id or "")
                if port is not None and port.host_id == host_id:
                    routers.add(route.router_id)
        return routers

    def set_port_alive(self, port_id: str, alive: bool) -> frozenset[str]:
        """Record an exterior port's liveness; returns the tags to invalidate when it changed
        (`port:<id>`: the flows leaving through it and those whose ECMP choice skipped it)."""
        if alive == (port_id not in self.down_ports):
            return frozenset()
        if alive:
            self.down_ports.discard(port_id)
        else:
            self.down_ports.add(port_id)
        self.revision += 1
        return frozenset({f"port:{port_id}"})

    def remove(self, kind: str, object_id: str) -> frozenset[str]:
        """Delete an object (unknown ids are ignored). Returns invalidated tags."""
        self.get(kind, object_id)  # decoded first if it was loaded undecoded
        old = self.objects.get(kind, {}).pop(object_id, None)
        if old is None:
            return frozenset()
        self.revision += 1
        return self._changed(kind, object_id, old, None)

    def _changed(
        self,
        kind: str,
        object_id: str,
        old: TopologyObject | None,
        new: TopologyObject | None,
    ) -> frozenset[str]:
        tags: set[str] = {f"{kind}:{object_id}"}
        if kind == "port":
            self._port_changed(object_id, old, new, tags)  # type: ignore[arg-type]
        elif kind == "bridge":
            self._compile_bridge(object_id)
        elif kind == "router":
            self._compile_router(object_id)
        elif kind == "route":
            for router_id in _move_child(self._routes_by_router, Route, "router_id", old, new):
                self._compile_router(router_id)
                tags.add(f"router:{router_id}")
        elif kind == "chain":
            self._compile_chain(object_id)
        elif kind == "rule":
            for chain_id in _move_child(self._rules_by_chain, Rule, "chain_id", old, new):
                self._compile_chain(chain_id)
                tags.add(f"chain:{chain_id}")
        elif kind == "ip_addr_group":
            for chain_id in sorted(self._chains_by_ip_group.get(object_id, ())):
                self._compile_chain(chain_id)
                tags.add(f"chain:{chain_id}")
        elif kind == "tunnel_zone":
            for host_id in self._recompute_underlay(old, new):
                tags.add(f"host:{host_id}")
        elif kind == "bgp_peer":
            self._bgp_peer_changed(object_id, old, new, tags)
        elif kind in ("port_group", "host", "subnet"):
            pass  # tagged by kind:id above; nothing compiled depends on their fields yet
        elif kind in ("security_group", "security_group_rule", "floating_ip"):
            pass  # compiled by the security index below
        elif kind in LB_KINDS:
            pass  # compiled by the VIP index below
        else:
            raise ValueError(f"TopologyView: unknown kind {kind!r} (object {object_id})")
        if kind in ("port", "security_group", "security_group_rule", "floating_ip"):
            tags |= self.security.changed(kind, object_id, old, new)
        if kind == "port" or kind in LB_KINDS:
            tags |= self.vips.changed(kind, object_id, old, new)
        return frozenset(tags)

    def _bgp_peer_changed(
        self,
        peer_id: str,
        old: TopologyObject | None,
        new: TopologyObject | None,
        tags: set[str],
    ) -> None:
        for peer in (old, new):
            if isinstance(peer, BgpPeer):
                tags.add(f"port:{peer.port_id}")  # its flows did not tell BGP packets apart
                if self.bgp_ports.get(peer.port_id) == peer_id:
                    del self.bgp_ports[peer.port_id]
        if isinstance(new, BgpPeer) and new.admin_state_up:
            self.bgp_ports[new.port_id] = peer_id

    def _port_changed(
        self, port_id: str, old: Port | None, new: Port | None, tags: set[str]
    ) -> None:
        devices: set[tuple[str, str]] = set()
        if not _device_sees_change(old, new):
            # Name, chains, binding, port groups: flows that used the port carry its tag, and
            # no device index depends on these fields.
            self._store_port(port_id, old, new)
            return
        for port in (old, new):
            if port is not None:
                devices.add((port.device_kind.value, port.device_id))
                if port.peer_id is not None:
                    # The peer device's ARP-proxy/static entries include this port's MAC/IPs.
                    peer = self.objects.get("port", {}).get(port.peer_id)
                    if isinstance(peer, Port):
                        devices.add((peer.device_kind.value, peer.device_id))
        self._store_port(port_id, old, new)
        for kind, device_id in devices:
            tags.add(f"{kind}:{device_id}")
            if kind == "bridge":
                self._compile_bridge(device_id)
            else:
                self._compile_router(device_id)

    def _store_port(self, port_id: str, old: Port | None, new: Port | None) -> None:
        if old is not None:
            self._ports_by_device.get(old.device_id, set()).discard(port_id)
            for key in (old.tunnel_key, old.vtep_vni):
                if key and self.port_by_tunnel_key.get(key) == port_id:
                    del self.port_by_tunnel_key[key]
            self.ports.pop(port_id, None)
        if new is not None:
            self._ports_by_device.setdefault(new.device_id, set()).add(port_id)
            if new.tunnel_key:
                self.port_by_tunnel_key[new.tunnel_key] = port_id
            if new.vtep_vni:  # reserved in the key space: traces and counters name the port
                self.port_by_tunnel_key[new.vtep_vni] = port_id
            self.ports[port_id] = PortInfo(
                port=new,
                id=new.id,
                name=new.name or new.id,
                device_kind=new.device_kind,
                device_id=new.device_id,
                admin_up=new.admin_state_up,
                mac=mac_to_int(new.mac),
                peer_id=new.peer_id,
                vlan_id=new.vlan_id,
                inbound_chain_id=new.inbound_chain_id,
                outbound_chain_id=new.outbound_chain_id,
                port_group_ids=frozenset(new.port_group_ids),
                host_id=new.host_id,
                bound=(new.host_id is not None and new.interface_name is not None)
                or new.vtep_ip is not None,
                tunnel_key=new.tunnel_key,
                addresses=tuple(_port_address(a) for a in new.addresses),
                tag=f"port:{new.id}",
                vtep=None if new.vtep_ip is None else (str(new.vtep_ip), new.vtep_vni or 0),
                interface_vlan=new.interface_vlan,
            )

    def _build_bridge(self, bridge_id: str) -> None:
        bridge = self.objects.get("bridge", {}).get(bridge_id)
        if not isinstance(bridge, Bridge):
            self.bridges.pop(bridge_id, None)
            return
        port_ids = tuple(sorted(self._ports_by_device.get(bridge_id, ())))
        static: dict[tuple[int, int], str] = {}
        proxy: dict[int, int] = {}
        for port_id in port_ids:
            info = self.ports[port_id]
            for address in info.addresses:
                if address.version == 4:
                    proxy[address.ip] = info.mac
            if info.peer_id is None:
                continue
            peer = self.ports.get(info.peer_id)
            if peer is None or peer.device_kind is not DeviceKind.ROUTER:
                continue
            static[(info.vlan_id or 0, peer.mac)] = port_id
            for address in peer.addresses:
                if address.version == 4:
                    proxy[address.ip] = peer.mac
        self.bridges[bridge_id] = BridgeInfo(
            bridge=bridge,
            id=bridge_id,
            name=bridge.name or bridge_id,
            admin_up=bridge.admin_state_up,
            inbound_chain_id=bridge.inbound_chain_id,
            outbound_chain_id=bridge.outbound_chain_id,
            arp_proxy=bridge.arp_proxy,
            port_ids=port_ids,
            static_macs=static,
            arp_proxy_entries=proxy,
            tag=f"bridge:{bridge_id}",
        )

    def _build_router(self, router_id: str) -> None:
        router = self.objects.get("router", {}).get(router_id)
        if not isinstance(router, Router):
            self.routers.pop(router_id, None)
            return
        port_ids = tuple(sorted(self._ports_by_device.get(router_id, ())))
        usable: dict[str, PortInfo] = {
            pid: self.ports[pid] for pid in port_ids if self.ports[pid].admin_up
        }
        routes: list[Route] = []
        own: dict[tuple[int, int], str] = {}
        for port_id in port_ids:
            info = self.ports[port_id]
            for address in info.addresses:
                own.setdefault((address.version, address.ip), port_id)
                if port_id in usable:
                    # Implicit connected route: the port's subnet is on-link.
                    routes.append(
                        Route(
                            id=f"connected.{port_id}.{address.version}.{address.prefix_len}"[:64],
                            router_id=router_id,
                            dst_prefix=ipaddress.ip_network(
                                f"{address.text}/{address.prefix_len}", strict=False
                            ),
                            next_hop_port_id=port_id,
                            weight=0,
                        )
                    )
        route_objects = self.objects.get("route", {})
        for route_id in sorted(self._routes_by_router.get(router_id, ())):
            route = route_objects.get(route_id)
            if not isinstance(route, Route):
                continue
            # A normal route through a missing or down port is not usable (ECMP moves on).
            if route.type is RouteType.NORMAL and route.next_hop_port_id not in usable:
                continue
            if route.learned_from is not None:
                # A learned route lives as long as its speaker's host: a dead gateway's routes
                # leave the ECMP set as soon as its liveness key is gone.
                via = usable.get(route.next_hop_port_id or "")
                if via is None or via.host_id is None or via.host_id in self.down_hosts:
                    continue
            routes.append(route)
        has_v4 = any(version == 4 for version, _ in own)
        has_v6 = any(version == 6 for version, _ in own)
        self.routers[router_id] = RouterInfo(
            router=router,
            id=router_id,
            name=router.name or router_id,
            admin_up=router.admin_state_up,
            inbound_chain_id=router.inbound_chain_id,
            outbound_chain_id=router.outbound_chain_id,
            port_ids=port_ids,
            routes_v4=RouteTable(_IPV4_BITS, (r for r in routes if r.dst_prefix.version == 4)),
            routes_v6=RouteTable(_IPV6_BITS, (r for r in routes if r.dst_prefix.version == 6)),
            own_addresses=own,
            own_v4_read_mask=(1 << _IPV4_BITS) - 1 if has_v4 else 0,
            own_v6_read_mask=(1 << _IPV6_BITS) - 1 if has_v6 else 0,
            tag=f"router:{router_id}",
        )

    def _build_chain(self, chain_id: str) -> None:
        self._lazy_chains.discard(chain_id)
        previous = dict.get(self.chains, chain_id)
        if previous is not None:
            for group_id in previous.ip_addr_group_ids:
                self._chains_by_ip_group.get(group_id, set()).discard(chain_id)
        chain = self.get("chain", chain_id)
        if not isinstance(chain, Chain):
            self.chains.pop(chain_id, None)
            return
        for rule_id in [r for r in self._rules_by_chain.get(chain_id, ()) if r in self._raw_rules]:
            self._materialize("rule", rule_id)
        rule_objects = self.objects.get("rule", {})
        rules = [
            rule
            for rule_id in self._rules_by_chain.get(chain_id, ())
            if isinstance(rule := rule_objects.get(rule_id), Rule)
        ]
        groups = {
            group_id: group
            for group_id, group in self.objects.get("ip_addr_group", {}).items()
            if isinstance(group, IpAddrGroup)
        }
        compiled = compile_chain(chain_id, chain.name or chain_id, rules, groups)
        self.chains[chain_id] = compiled
        for group_id in compiled.ip_addr_group_ids:
            self._chains_by_ip_group.setdefault(group_id, set()).add(chain_id)

    def _recompute_underlay(
        self, old: TopologyObject | None, new: TopologyObject | None
    ) -> set[str]:
        hosts: set[str] = set()
        for zone in (old, new):
            if isinstance(zone, TunnelZone):
                hosts.update(m.host_id for m in zone.members)
        changed: set[str] = set()
        zones = sorted(
            (z for z in self.objects.get("tunnel_zone", {}).values() if isinstance(z, TunnelZone)),
            key=lambda z: z.id,
        )
        for host_id in hosts:
            ip: str | None = None
            for zone in zones:
                member = next((m for m in zone.members if m.host_id == host_id), None)
                if member is not None:
                    ip = str(member.underlay_ip)
                    break
            before = self.host_underlay_ip.get(host_id)
            if ip is None:
                self.host_underlay_ip.pop(host_id, None)
            else:
                self.host_underlay_ip[host_id] = ip
            if before != ip:
                changed.add(host_id)
        return changed


def _raw_rule_parent(value: bytes) -> str:
    """The chain id of a rule filed undecoded: `peek_id` read it when the rule was filed, and
    reads the same bytes the same way now."""
    parent = peek_id(value, "chain_id")
    if parent is None:  # pragma: no cover - filed only when it was read
        raise RuntimeError("TopologyView: an undecoded rule without a chain id")
    return parent


def _move_child(
    index: dict[str, set[str]],
    child_type: type[Route] | type[Rule],
    parent_field: str,
    old: TopologyObject | None,
    new: TopologyObject | None,
) -> set[str]:
    """Keep `index` (parent id -> ids of its children) right after a child (a route of a
    router, a rule of a chain) changed from `old` to `new`; return the parents it had or has,
    which must be compiled again."""
    children = [child for child in (old, new) if isinstance(child, child_type)]
    for child in children:
        index.setdefault(getattr(child, parent_field), set()).discard(child.id)
    if isinstance(new, child_type):
        index.setdefault(getattr(new, parent_field), set()).add(new.id)
    return {getattr(child, parent_field) for child in children}
