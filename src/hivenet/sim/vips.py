"""Load-balancer VIPs compiled for the simulation: `VipIndex`, kept by the `TopologyView` and
updated one object at a time, and the per-flow member choice the engine asks it for.

Owns, per router that has load balancers:
- `lb-pre.<router>`, a virtual chain the engine runs when a packet enters the router (after
  the floating-IP pre chain): reverse SNAT of hairpinned replies (to the router's own
  addresses), reverse DNAT of members' replies (source = a member address: the reply leaves
  as the VIP), one `lb_vip` DNAT rule per enabled listener (VIP address, protocol, port) and
  one `lb_no_listener` REJECT per VIP address for everything else sent to it;
- `lb-post.<router>`, run after the route lookup (after the floating-IP post chain): hairpin
  SNAT to the router port's address for a flow to a member that leaves the router port it
  came in by (a client on the member's subnet, or a member calling its own VIP), so the
  member's reply comes back through the router and is translated;
- the VIP addresses (IPv4) the router answers ARP for on each of its ports (the port whose
  subnet holds the VIP), so a client on the VIP's subnet reaches it.
All translations live in the router's conntrack/NAT zone (the router id), like the floating IPs'.

An `lb_vip` rule carries no NAT target of its own: for a packet that matches it, the engine asks
`choose()`, which picks the member (`PoolBalancer`: Maglev over healthy weighted members,
source-IP persistence from this agent's `PersistenceTable`) and returns a DNAT rule to exactly
that member. The flow-state hook then finds the connection's existing binding (the member it
was given when it started: it keeps it, whatever the table says now) or records a new one, so
only new flows see a changed table. A flow through a VIP carries `lb-pool:<pool>`; a change of
the pool, a member or a member's observed health (`set_observed`, fed by the agents' health
monitors) invalidates exactly those flows, and their next packet is re-simulated into the same
binding.

Recompiles a router's chains only when what they are built from changes (listeners, member
addresses, router ports); a weight or health change only drops the pool's compiled balancer.
Pure: no I/O, no clock; the view passes objects in, the engine passes `now`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hivenet.model import (
    DeviceKind,
    IpAddrGroup,
    NatTarget,
    Port,
    PortRange,
    Rule,
    RuleAction,
    TopologyObject,
)
from hivenet.model.loadbalancer import (
    HealthMonitor,
    Listener,
    LoadBalancer,
    Member,
    OperatingStatus,
    Pool,
)
from hivenet.packets.flowmatch import ETH_TYPE_IPV4, ETH_TYPE_IPV6, FlowMatch
from hivenet.sim.loadbalancer import (
    IP_PROTO_OF,
    FlowTuple,
    NoBackend,
    PersistenceTable,
    PoolBalancer,
    Selection,
    listener_takes,
)
from hivenet.sim.maglev import DEFAULT_TABLE_SIZE, check_table_size
from hivenet.sim.rules import CompiledChain, CompiledRule, compile_chain

LB_PRE_PREFIX = "lb-pre."
LB_POST_PREFIX = "lb-post."
# Address sets of a router's virtual chains: its members, its own addresses, and the sources
# a hairpin SNAT must leave alone (VIPs: a reply already reverse-DNATed; router addresses: a
# packet already hairpin-SNATed by the floating-IP chain).
MEMBERS_SET_PREFIX = "lbm."
ROUTER_ADDRESSES_SET_PREFIX = "lbr."
NOT_HAIRPIN_SOURCES_SET_PREFIX = "lbx."
# Rule names; those of drops double as drop reasons.
VIP_RULE = "lb_vip"
NO_LISTENER_RULE = "lb_no_listener"
HAIRPIN_RULE = "lb_hairpin"
REVERSE_HAIRPIN_RULE = "lb_hairpin_reverse"
REVERSE_VIP_RULE = "lb_reverse"
HAIRPIN_PORTS = (1024, 65535)
LB_KINDS = ("load_balancer", "listener", "pool", "member", "health_monitor")
_ETH_TYPES = {4: ETH_TYPE_IPV4, 6: ETH_TYPE_IPV6}


def pool_tag(pool_id: str) -> str:
    """The flow tag of every flow a pool's selection decided."""
    return f"lb-pool:{pool_id}"


@dataclass(frozen=True, slots=True)
class RouterVips:
    """A router's VIPs compiled: its two virtual chains and, per router port, the VIP
    addresses (IPv4, as ints) it answers ARP for there."""

    router_id: str
    pre_chain_id: str
    post_chain_id: str
    arp_answers: Mapping[str, frozenset[int]]


@dataclass(frozen=True, slots=True)
class VipChoice:
    """The member for a new flow: `rule` is a DNAT to exactly it, for the flow-state hook."""

    rule: CompiledRule
    selection: Selection
    tags: frozenset[str]

    @property
    def description(self) -> str:
        binding = self.selection.binding
        return (
            f"pool {binding.pool_id}: member {binding.member_id} "
            f"({binding.backend_address}:{binding.backend_port}, {self.selection.reason.value})"
        )


@dataclass(frozen=True, slots=True)
class VipRefusal:
    """No member for the flow: the VIP rejects it. `reason` is the drop reason."""

    reason: str
    detail: str
    tags: frozenset[str]


@dataclass(frozen=True, slots=True)
class MonitoredMember:
    """A member some agents must probe: with its pool, the pool's monitor and the router the
    probes go through."""

    member: Member
    pool: Pool
    monitor: HealthMonitor
    router_id: str


def _virtual_rule(chain_id: str, position: int, action: RuleAction, **fields: Any) -> Rule:
    """A rule of a virtual chain, built without re-validation (ids derive from the chain's
    and may exceed a stored id's 64 characters; every value is a validated model value)."""
    return Rule.model_construct(
        id=f"{chain_id}#{position}", chain_id=chain_id, position=position, action=action, **fields
    )


def _address_order(address: Any) -> tuple[int, int]:
    return (address.version, int(address))


def _host_network(address: Any) -> Any:
    return ipaddress.ip_network(f"{address}/{address.max_prefixlen}")


class VipIndex:
    """The VIP chains, ARP answers and pool balancers of one `TopologyView`.

    `objects` and `chains` are the view's own dicts (raw objects by kind; compiled chains by
    id): the virtual chains are written into `chains`. `table_size` is the Maglev table size
    of every pool (a prime; smaller tables build faster, e.g. in tests)."""

    def __init__(
        self,
        objects: dict[str, dict[str, TopologyObject]],
        chains: dict[str, CompiledChain],
        *,
        table_size: int = DEFAULT_TABLE_SIZE,
    ) -> None:
        self._objects = objects
        self._chains = chains
        self.table_size = check_table_size(table_size)
        self.routers: dict[str, RouterVips] = {}
        self.persistence = PersistenceTable()
        # Member id -> status its health monitors observe (absent: none observed yet).
        self.observed: dict[str, OperatingStatus] = {}
        self._balancers: dict[str, PoolBalancer] = {}
        self._vip_rules: dict[str, tuple[str, CompiledRule]] = {}  # rule id -> listener, rule
        self._signatures: dict[str, tuple[Any, ...]] = {}  # router -> what its chains came from

    # ----------------------------------------------------------------- reading helpers

    def _get(self, kind: str, object_id: str | None) -> Any:
        return self._objects.get(kind, {}).get(object_id) if object_id is not None else None

    def _all(self, kind: str) -> Iterable[Any]:
        return self._objects.get(kind, {}).values()

    def router_of_pool(self, pool_id: str) -> str | None:
        pool = self._get("pool", pool_id)
        if not isinstance(pool, Pool):
            return None
        lb = self._get("load_balancer", pool.load_balancer_id)
        return lb.router_id if isinstance(lb, LoadBalancer) else None

    def _routers_of(self, obj: TopologyObject | None) -> set[str]:
        if isinstance(obj, LoadBalancer):
            return {obj.router_id}
        lb_id = None
        if isinstance(obj, Listener | Pool):
            lb_id = obj.load_balancer_id
        elif isinstance(obj, Member | HealthMonitor):
            router = self.router_of_pool(obj.pool_id)
            return {router} if router is not None else set()
        elif isinstance(obj, Port) and obj.device_kind is DeviceKind.ROUTER:
            return {obj.device_id}
        lb = self._get("load_balancer", lb_id)
        return {lb.router_id} if isinstance(lb, LoadBalancer) else set()

    @staticmethod
    def _pools_of(obj: TopologyObject | None) -> set[str]:
        if isinstance(obj, Pool):
            return {obj.id}
        if isinstance(obj, Member | HealthMonitor):
            return {obj.pool_id}
        if isinstance(obj, Listener) and obj.default_pool_id is not None:
            return {obj.default_pool_id}
        return set()

    # ----------------------------------------------------------------- updates

    def changed(
        self, kind: str, object_id: str, old: TopologyObject | None, new: TopologyObject | None
    ) -> set[str]:
        """Follow one object change; returns the flow tags to invalidate."""
        tags: set[str] = set()
        if kind == "port" and not self.routers:
            return tags  # only routers that have VIPs care about their ports (10k at start-up)
        routers = self._routers_of(old) | self._routers_of(new)
        if kind == "port":
            routers &= set(self.routers)  # only routers that have VIPs care about their ports
        for pool_id in self._pools_of(old) | self._pools_of(new):
            self._balancers.pop(pool_id, None)
            tags.add(pool_tag(pool_id))
        if kind == "pool" and new is None:
            self.persistence.forget_pool(object_id)
        if kind == "member" and new is None:
            self.observed.pop(object_id, None)
        for router_id in sorted(routers):
            self._compile_router(router_id, tags)
        return tags

    def set_observed(self, member_id: str, status: OperatingStatus | None) -> set[str]:
        """Record what the health monitors say of a member (None: nothing); returns the tags
        of the flows to re-simulate (its pool's), empty when nothing changed."""
        if self.observed.get(member_id) == status:
            return set()
        if status is None:
            del self.observed[member_id]
        else:
            self.observed[member_id] = status
        member = self._get("member", member_id)
        if not isinstance(member, Member):
            return set()
        self._balancers.pop(member.pool_id, None)
        return {pool_tag(member.pool_id)}

    # ----------------------------------------------------------------- selection

    def is_vip_rule(self, rule_id: str) -> bool:
        return rule_id in self._vip_rules

    def balancer(self, pool_id: str) -> PoolBalancer | None:
        """The pool's compiled selection (built on first use after a change)."""
        balancer = self._balancers.get(pool_id)
        if balancer is not None:
            return balancer
        pool = self._get("pool", pool_id)
        if not isinstance(pool, Pool):
            return None
        members = sorted(
            (m for m in self._all("member") if isinstance(m, Member) and m.pool_id == pool_id),
            key=lambda m: m.id,
        )
        balancer = PoolBalancer(
            pool, members, observed_status=self.observed, table_size=self.table_size
        )
        self._balancers[pool_id] = balancer
        return balancer

    def choose(
        self, rule_id: str, match: FlowMatch, ip_version: int, now: float
    ) -> VipChoice | VipRefusal:
        """The member for a flow that matched the `lb_vip` rule `rule_id` (KeyError for any
        other rule: ask `is_vip_rule` first)."""
        listener_id, base = self._vip_rules[rule_id]
        listener = self._get("listener", listener_id)
        if not isinstance(listener, Listener) or listener.default_pool_id is None:
            return VipRefusal("lb_no_pool", f"listener {listener_id} has no pool", frozenset())
        pool_id = listener.default_pool_id
        tags = frozenset({pool_tag(pool_id)})
        flow = FlowTuple.from_match(match)
        if not listener_takes(listener, flow, ip_version):
            return VipRefusal(
                "lb_client_not_allowed", f"listener {listener_id}: allowed_cidrs", tags
            )
        balancer = self.balancer(pool_id)
        if balancer is None:
            return VipRefusal("lb_no_pool", f"pool {pool_id} not in topology", tags)
        persisted = self.persistence.get(pool_id, flow.ip_src, now)
        outcome = balancer.select(flow, now=now, persisted=persisted)
        if isinstance(outcome, NoBackend):
            return VipRefusal("lb_no_backend", outcome.reason, tags)
        binding = outcome.binding
        address = binding.backend_address
        target = NatTarget(
            address_from=address,
            address_to=address,
            port_from=binding.backend_port,
            port_to=binding.backend_port,
        )
        rule = dataclasses.replace(
            base,
            id=f"{base.id}>{binding.member_id}",
            rule=base.rule.model_copy(update={"nat_targets": (target,)}),
        )
        return VipChoice(rule, outcome, tags)

    def remember(self, choice: VipChoice) -> None:
        """The flow went to the chosen member: keep its persistence record (if the pool
        persists). Not called when the connection kept an older binding."""
        if choice.selection.persist is not None:
            self.persistence.remember(choice.selection.persist)

    # ----------------------------------------------------------------- health inputs

    def monitored_members(self) -> list[MonitoredMember]:
        """Every admin-up member of an admin-up pool with an admin-up health monitor, on a
        load balancer whose router is known (sorted by member id)."""
        monitors: dict[str, HealthMonitor] = {}
        for monitor in self._all("health_monitor"):
            if isinstance(monitor, HealthMonitor) and monitor.admin_state_up:
                current = monitors.get(monitor.pool_id)
                if current is None or monitor.id < current.id:
                    monitors[monitor.pool_id] = monitor
        out: list[MonitoredMember] = []
        for member in self._all("member"):
            if not isinstance(member, Member) or not member.admin_state_up:
                continue
            monitor = monitors.get(member.pool_id)
            pool = self._get("pool", member.pool_id)
            router_id = self.router_of_pool(member.pool_id)
            if monitor is None or not isinstance(pool, Pool) or router_id is None:
                continue
            if pool.admin_state_up:
                out.append(MonitoredMember(member, pool, monitor, router_id))
        return sorted(out, key=lambda entry: entry.member.id)

    # ----------------------------------------------------------------- routers

    def _compile_router(self, router_id: str, tags: set[str]) -> None:
        pre, post = LB_PRE_PREFIX + router_id, LB_POST_PREFIX + router_id
        lbs = {
            lb.id: lb
            for lb in self._all("load_balancer")
            if isinstance(lb, LoadBalancer) and lb.router_id == router_id
        }
        if not lbs:
            if self.routers.pop(router_id, None) is not None:
                self._drop_chains(router_id, pre, post)
                tags.update({f"router:{router_id}", f"chain:{pre}", f"chain:{post}"})
            return
        listeners = sorted(
            (
                listener
                for listener in self._all("listener")
                if isinstance(listener, Listener) and listener.load_balancer_id in lbs
            ),
            key=lambda listener: listener.id,
        )
        pool_ids = {
            pool.id
            for pool in self._all("pool")
            if isinstance(pool, Pool) and pool.load_balancer_id in lbs
        }
        member_addresses = sorted(
            {
                member.address
                for member in self._all("member")
                if isinstance(member, Member) and member.pool_id in pool_ids
            },
            key=_address_order,
        )
        router_ports = sorted(
            (
                port
                for port in self._all("port")
                if isinstance(port, Port)
                and port.device_kind is DeviceKind.ROUTER
                and port.device_id == router_id
            ),
            key=lambda port: port.id,
        )
        enabled = [
            listener
            for listener in listeners
            if listener.admin_state_up and lbs[listener.load_balancer_id].admin_state_up
        ]
        own_addresses = {a.ip for port in router_ports for a in port.addresses}
        vips = sorted(
            {listener.vip_address for listener in listeners} - own_addresses,
            key=_address_order,
        )
        signature = (
            tuple(
                (listener.id, listener.vip_address, listener.protocol, listener.protocol_port)
                for listener in enabled
            ),
            tuple(vips),
            tuple(member_addresses),
            tuple((port.id, port.addresses) for port in router_ports),
        )
        if router_id in self.routers and self._signatures.get(router_id) == signature:
            return
        tags.update({f"router:{router_id}", f"chain:{pre}", f"chain:{post}"})
        self._signatures[router_id] = signature
        members_set = MEMBERS_SET_PREFIX + router_id
        router_set = ROUTER_ADDRESSES_SET_PREFIX + router_id
        not_hairpin_set = NOT_HAIRPIN_SOURCES_SET_PREFIX + router_id
        address_sets = {
            members_set: IpAddrGroup.model_construct(
                id=members_set, addresses=tuple(member_addresses)
            ),
            router_set: IpAddrGroup.model_construct(
                id=router_set, addresses=tuple(sorted(own_addresses, key=_address_order))
            ),
            not_hairpin_set: IpAddrGroup.model_construct(
                id=not_hairpin_set,
                addresses=(*vips, *sorted(own_addresses, key=_address_order)),
            ),
        }
        pre_rules = [
            _virtual_rule(
                pre,
                0,
                RuleAction.REV_SNAT,
                name=REVERSE_HAIRPIN_RULE,
                ip_addr_group_dst_id=router_set,
            ),
            _virtual_rule(
                pre, 1, RuleAction.REV_DNAT, name=REVERSE_VIP_RULE, ip_addr_group_src_id=members_set
            ),
        ]
        self._forget_vip_rules(pre)
        vip_rule_listeners: dict[str, str] = {}
        for listener in enabled:
            vip = listener.vip_address
            rule = _virtual_rule(
                pre,
                len(pre_rules),
                RuleAction.DNAT,
                name=VIP_RULE,
                dl_type=_ETH_TYPES[vip.version],
                nw_dst=_host_network(vip),
                nw_proto=IP_PROTO_OF[listener.protocol],
                tp_dst=PortRange(start=listener.protocol_port, end=listener.protocol_port),
            )
            pre_rules.append(rule)
            vip_rule_listeners[rule.id] = listener.id
        for vip in vips:
            pre_rules.append(
                _virtual_rule(
                    pre,
                    len(pre_rules),
                    RuleAction.REJECT,
                    name=NO_LISTENER_RULE,
                    dl_type=_ETH_TYPES[vip.version],
                    nw_dst=_host_network(vip),
                )
            )
        post_rules: list[Rule] = []
        arp_answers: dict[str, set[int]] = {}
        for port in router_ports:
            for interface in port.addresses:
                for vip in vips:
                    if vip.version == 4 and vip in interface.network and vip != interface.ip:
                        arp_answers.setdefault(port.id, set()).add(int(vip))
                if not member_addresses:
                    continue
                post_rules.append(
                    _virtual_rule(
                        post,
                        len(post_rules),
                        RuleAction.SNAT,
                        name=HAIRPIN_RULE,
                        dl_type=_ETH_TYPES[interface.version],
                        in_port_ids=(port.id,),
                        out_port_ids=(port.id,),
                        nw_src=interface.network,
                        ip_addr_group_src_id=not_hairpin_set,
                        inv_ip_addr_group_src=True,
                        ip_addr_group_dst_id=members_set,
                        nat_targets=(
                            NatTarget(
                                address_from=interface.ip,
                                address_to=interface.ip,
                                port_from=HAIRPIN_PORTS[0],
                                port_to=HAIRPIN_PORTS[1],
                            ),
                        ),
                    )
                )
        name = f"load balancers of router {router_id}"
        compiled_pre = compile_chain(pre, name, pre_rules, address_sets)
        self._chains[pre] = compiled_pre
        self._chains[post] = compile_chain(post, name, post_rules, address_sets)
        for compiled in compiled_pre.rules:
            listener_id = vip_rule_listeners.get(compiled.id)
            if listener_id is not None:
                self._vip_rules[compiled.id] = (listener_id, compiled)
        self.routers[router_id] = RouterVips(
            router_id,
            pre,
            post,
            {port_id: frozenset(ips) for port_id, ips in arp_answers.items()},
        )

    def _drop_chains(self, router_id: str, pre: str, post: str) -> None:
        self._chains.pop(pre, None)
        self._chains.pop(post, None)
        self._signatures.pop(router_id, None)
        self._forget_vip_rules(pre)

    def _forget_vip_rules(self, chain_id: str) -> None:
        stale = [
            rule_id
            for rule_id, (_, rule) in self._vip_rules.items()
            if rule.rule.chain_id == chain_id
        ]
        for rule_id in stale:
            del self._vip_rules[rule_id]
