"""Load-balancer status write-back and per-host statistics: `LbStatusWriter` and
`LbStatsReporter`, one of each per agent.

Status write-back (`LbStatusWriter`):
- What is written. `operating_status` of members, pools and load balancers, from what every
  agent already knows the same way (`desired_statuses`, a pure function of the topology view
  and the members' observed status that `MemberHealth` derives from the probers' reports):
  - member: admin down -> OFFLINE; monitored (`VipIndex.monitored_members`) -> its observed
    status (ONLINE / OFFLINE), nothing while no live prober has concluded (the stored status
    stays, "last known"); not monitored -> NO_MONITOR, but only in place of a status the
    agents write (ONLINE, DEGRADED, OFFLINE): a member without a health monitor keeps its
    default, and a status a client set on it (DRAINING, ERROR) stays.
  - pool: admin down -> OFFLINE; without an admin-up health monitor -> NO_MONITOR (same
    proviso); else from its admin-up members (`aggregate_status`): ONLINE when none is down,
    OFFLINE when all are down (or there are none), DEGRADED otherwise. Down is OFFLINE or
    ERROR; a member not yet concluded counts with its stored status.
  - load balancer: admin down -> OFFLINE; no pool with an agent-written status ->
    NO_MONITOR (same proviso); else `aggregate_status` over its pools (a DEGRADED pool
    degrades it).
- Who writes. For each object, exactly one agent: the live host ranking first for the
  object's id by the probers' rendezvous hashing (`choose_probers(id, live, 1)`), which for a
  monitored member is its first-ranked prober. Every agent computes the same writer from the
  same live hosts, so writers do not fight; while liveness changes two may briefly both write
  the same value, which the repository turns into a no-op.
- Only what differs is written (`TopologyRepository.modify` with the field replaced; the
  repository writes nothing for an unchanged object).
- No loop. A status write changes no input of `desired_statuses` that decides it: observed
  member status comes only from probe reports; a stored member status feeds its pool only
  while no probe has concluded, a pool's feeds only its load balancer. In the view a member's
  or pool's status change invalidates only the flows tagged `lb-pool:<pool>` (the pool's
  balancer is rebuilt with the same members), a load balancer's none (its router's VIP chains
  keep their signature).

Statistics (`LbStatsReporter`): every `interval` seconds it reads this host's NAT table and
datapath flow table and publishes, for every load balancer with anything to report,
`/hivenet/v1/state/<host>/lb_stats/<lb id>` (on the host's lease, only when the value
changed) = `{"load_balancer": LoadBalancerStats, "members": {member id: LoadBalancerStats}}`
(`LoadBalancerStats` of model/loadbalancer.py, `request_errors` always 0: an L4 balancer
parses no request). What is counted, exactly:
- An LB binding is a live DNAT binding in this host's NAT table whose zone is a load
  balancer's router and whose original destination (address, protocol, port) is one of its
  listeners' VIPs; the listener's default pool and the translated destination (member address
  and port) name the member.
- Every host that a connection's packets enter holds its binding (the ingress host pushes it
  to the member's host), so a host counts only the bindings it originated: those whose
  `nat:` tag it has seen on a flow of its own that carries `lb-pool:<pool>` (only the VIP
  simulation at the ingress host adds that tag). `active_connections` = such bindings alive
  now (a TCP binding lives until its NAT idle timeout, not until FIN);
  `total_connections` = such bindings first seen since this agent started.
- `bytes_in` = bytes (whole Ethernet frames as received) of packets that hit an installed flow
  of this host carrying `lb-pool:<pool>` and an LB binding's `nat:` tag (client -> member);
  `bytes_out` = the same for flows carrying an LB binding's `nat:` tag without `lb-pool`
  (member -> client replies, counted at the member's host). Not counted: the first packet of
  each flow (it goes through the upcall, not a flow), and packets that hit a flow in the last
  `interval` before the flow was removed. Counters are cumulative since the agent started.

Must not touch flows (it only reads the flow table), flow state (it only reads the NAT table),
the datapath or topology objects other than the `operating_status` of load-balancer objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hivenet.flows.table import Flow
from hivenet.flowstate import NatBinding, NatKind, NatTable, nat_tag
from hivenet.model.loadbalancer import (
    HealthMonitor,
    Listener,
    LoadBalancer,
    LoadBalancerStats,
    Member,
    OperatingStatus,
    Pool,
)
from hivenet.sim import TopologyView
from hivenet.sim.loadbalancer import IP_PROTO_OF, choose_probers
from hivenet.sim.vips import LB_KINDS, pool_tag
from hivenet.store.base import StoreError
from hivenet.store.keys import lb_stats_key
from hivenet.store.topology import NotFoundError, TopologyError, TopologyRepository

log = logging.getLogger(__name__)

# Statuses the agents write; only these are reset when their reason goes away.
AGENT_WRITTEN_STATUSES = frozenset(
    {OperatingStatus.ONLINE, OperatingStatus.DEGRADED, OperatingStatus.OFFLINE}
)
DOWN_STATUSES = frozenset({OperatingStatus.OFFLINE, OperatingStatus.ERROR})
_STATUS_CLASSES: dict[str, type[Member] | type[Pool] | type[LoadBalancer]] = {
    "member": Member,
    "pool": Pool,
    "load_balancer": LoadBalancer,
}
_POOL_TAG_PREFIX = pool_tag("")
# Kinds whose change may change some object's desired status (wake the writer).
LB_STATUS_KINDS = frozenset(LB_KINDS)

# ---------------------------------------------------------------------------- status


def aggregate_status(statuses: Sequence[OperatingStatus]) -> OperatingStatus:
    """A pool's status from its members' (or a load balancer's from its pools'): OFFLINE when
    every one is down (or there is none), ONLINE when none is down nor DEGRADED, else
    DEGRADED."""
    down = sum(status in DOWN_STATUSES for status in statuses)
    if down == len(statuses):
        return OperatingStatus.OFFLINE
    if down == 0 and OperatingStatus.DEGRADED not in statuses:
        return OperatingStatus.ONLINE
    return OperatingStatus.DEGRADED


def _reset(current: OperatingStatus) -> OperatingStatus | None:
    """NO_MONITOR in place of a status the agents wrote; None (keep) for anything else."""
    return OperatingStatus.NO_MONITOR if current in AGENT_WRITTEN_STATUSES else None


def desired_statuses(
    topology: TopologyView, observed: Mapping[str, OperatingStatus]
) -> dict[tuple[str, str], OperatingStatus]:
    """(kind, id) -> the operating status the agents should store for each member, pool and
    load balancer of `topology` (rules in the module docstring). An object missing from the
    result keeps what it has. `observed`: member id -> status derived from probe reports."""
    desired: dict[tuple[str, str], OperatingStatus] = {}
    monitored = {entry.member.id for entry in topology.vips.monitored_members()}
    monitored_pools = {
        monitor.pool_id
        for monitor in topology.all("health_monitor")
        if isinstance(monitor, HealthMonitor) and monitor.admin_state_up
    }
    members_of: dict[str, list[OperatingStatus]] = {}
    for member in topology.all("member"):
        if not isinstance(member, Member):
            continue
        want: OperatingStatus | None
        if not member.admin_state_up:
            want = OperatingStatus.OFFLINE
        elif member.id in monitored:
            want = observed.get(member.id)
        else:
            want = _reset(member.operating_status)
        if want is not None:
            desired[("member", member.id)] = want
        if member.admin_state_up:
            members_of.setdefault(member.pool_id, []).append(
                want if want is not None else member.operating_status
            )
    pools_of: dict[str, list[OperatingStatus]] = {}
    for pool in topology.all("pool"):
        if not isinstance(pool, Pool):
            continue
        if not pool.admin_state_up:
            want = OperatingStatus.OFFLINE
        elif pool.id not in monitored_pools:
            want = _reset(pool.operating_status)
        else:
            want = aggregate_status(members_of.get(pool.id, []))
        if want is not None:
            desired[("pool", pool.id)] = want
        pools_of.setdefault(pool.load_balancer_id, []).append(
            want if want is not None else pool.operating_status
        )
    for lb in topology.all("load_balancer"):
        if not isinstance(lb, LoadBalancer):
            continue
        pool_statuses = pools_of.get(lb.id, [])
        if not lb.admin_state_up:
            want = OperatingStatus.OFFLINE
        elif not any(status in AGENT_WRITTEN_STATUSES for status in pool_statuses):
            want = _reset(lb.operating_status)
        else:
            want = aggregate_status(pool_statuses)
        if want is not None:
            desired[("load_balancer", lb.id)] = want
    return desired


def status_writer(object_id: str, live_hosts: Iterable[str]) -> str | None:
    """The one host that writes an object's status: the live host ranking first for its id
    (for a monitored member, its first-ranked prober). None without live hosts."""
    ranked = choose_probers(object_id, live_hosts, 1)
    return ranked[0] if ranked else None


@dataclass(frozen=True, slots=True)
class StatusWrite:
    kind: str
    object_id: str
    status: OperatingStatus


@dataclass(slots=True)
class StatusCounters:
    passes: int = 0
    writes: int = 0
    write_errors: int = 0


class LbStatusWriter:
    """Writes back the operating status of the load-balancer objects this host is the writer
    of. `wake()` after anything that may change a status (an observed member status, a
    load-balancer object, the live hosts); `run()` follows, and resyncs every
    `resync_interval` seconds anyway (a failed write is retried then)."""

    def __init__(
        self,
        host_id: str,
        topology: TopologyView,
        repository: TopologyRepository,
        *,
        live_hosts: Callable[[], set[str]],
        settle_delay: float = 0.05,
        resync_interval: float = 5.0,
    ) -> None:
        self.host_id = host_id
        self.topology = topology
        self.repository = repository
        self.live_hosts = live_hosts
        self.settle_delay = settle_delay
        self.resync_interval = resync_interval
        self.counters = StatusCounters()
        self._wakeup = asyncio.Event()
        self._writers: dict[str, str | None] = {}
        self._writers_for: frozenset[str] = frozenset()

    def wake(self) -> None:
        self._wakeup.set()

    def _writer_of(self, object_id: str, live: frozenset[str]) -> str | None:
        if live != self._writers_for:
            self._writers.clear()
            self._writers_for = live
        if object_id not in self._writers:
            self._writers[object_id] = status_writer(object_id, live)
        return self._writers[object_id]

    def plan(self) -> list[StatusWrite]:
        """The writes this host owes now: its objects whose stored status differs."""
        live = frozenset(self.live_hosts() | {self.host_id})
        writes = []
        desired = desired_statuses(self.topology, self.topology.vips.observed)
        for (kind, object_id), status in sorted(desired.items()):
            current = self.topology.get(kind, object_id)
            if getattr(current, "operating_status", status) == status:
                continue
            if self._writer_of(object_id, live) == self.host_id:
                writes.append(StatusWrite(kind, object_id, status))
        return writes

    async def sync(self) -> int:
        """Write what `plan()` says; returns how many writes were attempted."""
        self.counters.passes += 1
        planned = self.plan()
        for write in planned:
            await self._write(write)
        return len(planned)

    async def _write(self, write: StatusWrite) -> None:
        cls = _STATUS_CLASSES[write.kind]

        def set_status(current: Any) -> Any:
            if current.operating_status == write.status:
                return current
            return current.model_copy(update={"operating_status": write.status})

        try:
            await self.repository.modify(cls, write.object_id, set_status)
        except NotFoundError:
            return  # deleted meanwhile: nothing to report on
        self.counters.writes += 1
        log.info(
            "host %s: %s %s operating_status -> %s",
            self.host_id,
            write.kind,
            write.object_id,
            write.status.value,
        )

    async def run(self) -> None:
        self._wakeup.set()  # a first pass once the topology is loaded
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.resync_interval):
                    await self._wakeup.wait()
            # Let a burst of changes (reports of several members, a cascade) settle first.
            await asyncio.sleep(self.settle_delay)
            self._wakeup.clear()
            try:
                await self.sync()
            except (StoreError, TopologyError, OSError) as exc:
                self.counters.write_errors += 1
                log.warning("host %s: status write-back failed (%s); retried", self.host_id, exc)
            except Exception:  # the loop must survive a bug in one pass
                self.counters.write_errors += 1
                log.exception("host %s: status write-back pass failed", self.host_id)


# ---------------------------------------------------------------------------- statistics


@dataclass(frozen=True, slots=True)
class _LbBinding:
    load_balancer_id: str
    member_id: str | None  # None: the translated destination is no current member


@dataclass(slots=True)
class _Counts:
    total_connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


def _vip_targets(topology: TopologyView) -> dict[tuple[str, int, int, int, int], tuple[str, str]]:
    """(router, ip version, VIP, ip proto, port) -> (load balancer, pool) for every listener
    with a default pool (admin state aside: existing connections still count)."""
    lbs = {lb.id: lb for lb in topology.all("load_balancer") if isinstance(lb, LoadBalancer)}
    targets: dict[tuple[str, int, int, int, int], tuple[str, str]] = {}
    for listener in topology.all("listener"):
        if not isinstance(listener, Listener) or listener.default_pool_id is None:
            continue
        lb = lbs.get(listener.load_balancer_id)
        if lb is None:
            continue
        vip = listener.vip_address
        key = (
            lb.router_id,
            vip.version,
            int(vip),
            IP_PROTO_OF[listener.protocol],
            listener.protocol_port,
        )
        targets[key] = (lb.id, listener.default_pool_id)
    return targets


def _member_index(topology: TopologyView) -> dict[tuple[str, int, int], str]:
    """(pool, member address, member port) -> member id."""
    return {
        (member.pool_id, int(member.address), member.protocol_port): member.id
        for member in topology.all("member")
        if isinstance(member, Member)
    }


class LbStatsReporter:
    """This host's load-balancer counters (definitions in the module docstring), published
    under its state keys by `run()` every `interval` seconds (or `tick(now)` in tests)."""

    def __init__(
        self,
        host_id: str,
        topology: TopologyView,
        nat: NatTable,
        flows: Callable[[], list[Flow]],
        *,
        publish: Callable[[str, bytes], None],
        unpublish: Callable[[str], None],
        clock: Callable[[], float],
        interval: float = 2.0,
    ) -> None:
        self.host_id = host_id
        self.topology = topology
        self.nat = nat
        self.flows = flows  # the datapath's installed flows (`Datapath.flows`)
        self.publish = publish
        self.unpublish = unpublish
        self.clock = clock
        self.interval = interval
        self._tags: dict[NatBinding, int] = {}  # nat tag per live LB binding (cached)
        self._originated: set[int] = set()  # nat tags of LB bindings this host originated
        self._flow_bytes: dict[Flow, int] = {}  # bytes of each flow at the last scan
        self._lb_counts: dict[str, _Counts] = {}
        self._member_counts: dict[tuple[str, str], _Counts] = {}
        self._published: dict[str, bytes] = {}  # lb id -> value last published
        self.scans = 0

    @property
    def published(self) -> Mapping[str, bytes]:
        """lb id -> the report last published (JSON), for the metrics exposition."""
        return self._published

    def _live_bindings(self, now: float) -> dict[int, _LbBinding]:
        """nat tag -> load balancer and member of every live LB binding in the NAT table."""
        targets = _vip_targets(self.topology)
        members = _member_index(self.topology)
        live: dict[int, _LbBinding] = {}
        tags: dict[NatBinding, int] = {}
        for record in self.nat.snapshot(now):
            binding = record.binding
            if binding.kind is not NatKind.DNAT:
                continue
            original, translated = binding.original, binding.translated
            target = targets.get(
                (
                    binding.zone,
                    original.ip_version,
                    original.ip_dst,
                    original.ip_proto,
                    original.tp_dst,
                )
            )
            if target is None:
                continue
            lb_id, pool_id = target
            tag = self._tags.get(binding) or nat_tag(binding)
            tags[binding] = tag
            live[tag] = _LbBinding(
                lb_id, members.get((pool_id, translated.ip_dst, translated.tp_dst))
            )
        self._tags = tags
        return live

    def _count_flows(self, live: Mapping[int, _LbBinding]) -> None:
        seen: dict[Flow, int] = {}
        for flow in self.flows():
            previous = self._flow_bytes.get(flow, 0)
            seen[flow] = flow.bytes
            binding_tag: int | None = None
            forward = False
            for tag in flow.tags:
                if isinstance(tag, str):
                    if tag.startswith(_POOL_TAG_PREFIX):
                        forward = True
                elif tag in live:
                    binding_tag = tag if binding_tag is None else min(binding_tag, tag)
            if binding_tag is None:
                continue
            binding = live[binding_tag]
            counts = [self._lb_counts.setdefault(binding.load_balancer_id, _Counts())]
            if binding.member_id is not None:
                counts.append(
                    self._member_counts.setdefault(
                        (binding.load_balancer_id, binding.member_id), _Counts()
                    )
                )
            if forward and binding_tag not in self._originated:
                self._originated.add(binding_tag)
                for count in counts:
                    count.total_connections += 1
            delta = max(flow.bytes - previous, 0)
            for count in counts:
                if forward:
                    count.bytes_in += delta
                else:
                    count.bytes_out += delta
        self._flow_bytes = seen

    def collect(self, now: float) -> dict[str, dict[str, Any]]:
        """Scan the NAT and flow tables; lb id -> the report to publish (only load balancers
        with a non-zero counter)."""
        self.scans += 1
        live = self._live_bindings(now)
        self._count_flows(live)
        self._originated &= live.keys()
        active: dict[str, dict[str | None, int]] = {}
        for tag in self._originated:
            binding = live[tag]
            per_member = active.setdefault(binding.load_balancer_id, {})
            per_member[binding.member_id] = per_member.get(binding.member_id, 0) + 1
        existing_lbs = {lb.id for lb in self.topology.all("load_balancer")}
        lb_of_pool = {
            pool.id: pool.load_balancer_id
            for pool in self.topology.all("pool")
            if isinstance(pool, Pool)
        }
        existing_members = {
            (lb_of_pool[member.pool_id], member.id)
            for member in self.topology.all("member")
            if isinstance(member, Member) and member.pool_id in lb_of_pool
        }
        self._lb_counts = {k: v for k, v in self._lb_counts.items() if k in existing_lbs}
        self._member_counts = {
            k: v for k, v in self._member_counts.items() if k in existing_members
        }
        reports: dict[str, dict[str, Any]] = {}
        for lb_id in sorted(existing_lbs):
            counts = self._lb_counts.get(lb_id, _Counts())
            per_member = active.get(lb_id, {})
            lb_stats = LoadBalancerStats(
                active_connections=sum(per_member.values()),
                total_connections=counts.total_connections,
                bytes_in=counts.bytes_in,
                bytes_out=counts.bytes_out,
            )
            members: dict[str, dict[str, int]] = {}
            for (member_lb, member_id), member_counts in sorted(self._member_counts.items()):
                if member_lb != lb_id:
                    continue
                members[member_id] = LoadBalancerStats(
                    active_connections=per_member.get(member_id, 0),
                    total_connections=member_counts.total_connections,
                    bytes_in=member_counts.bytes_in,
                    bytes_out=member_counts.bytes_out,
                ).model_dump()
            if lb_stats == LoadBalancerStats() and not members:
                continue
            reports[lb_id] = {"load_balancer": lb_stats.model_dump(), "members": members}
        return reports

    def tick(self, now: float) -> None:
        """Collect and publish what changed; withdraw reports of load balancers that went."""
        reports = self.collect(now)
        for lb_id, report in reports.items():
            value = json.dumps(report, sort_keys=True, separators=(",", ":")).encode()
            if self._published.get(lb_id) != value:
                self._published[lb_id] = value
                self.publish(lb_stats_key(self.host_id, lb_id), value)
        for lb_id in sorted(set(self._published) - set(reports)):
            del self._published[lb_id]
            self.unpublish(lb_stats_key(self.host_id, lb_id))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.tick(self.clock())
            except Exception:  # the loop must survive a bug in one scan
                log.exception("host %s: load-balancer stats scan failed", self.host_id)
