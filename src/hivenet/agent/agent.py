"""`HostAgent`: the I/O shell that runs on every host.

Owns the agent's life on one host: its lease and liveness key, its Host object and tunnel-zone
membership, the local topology cache (a `TopologyView` fed one watch event at a time by a
`PrefixMirror`, never reloaded per change), the local replica of the shared MAC/ARP tables,
binding the exterior ports assigned to this host in the datapath and publishing that it owns
them, with `overlay_health_probes` the health ports and namespaces through which it probes
load-balancer members (`OverlayProbing`, agent/health.py), the write-back of load-balancer
status and its per-host LB counters (agent/lbstats.py), its traffic counters and Prometheus
endpoint (agent/metrics.py), the trace requests for its ports (agent/tracing.py), publishing
what the simulation learned, invalidating exactly the flows whose tags a change touches, and writing its counters.
Underlay trust (agent/underlay.py): the datapath's tunnel peers (live members of this host's
tunnel zones, `set_tunnel_peers`), and the cluster's flow-state keyring (created if absent,
watched, rotated on a schedule) that `FlowStateSync` seals and verifies messages with.
Fast gateway liveness (agent/probe.py): probes to the hosts owning uplinks, sealed on the
flow-state channel; a host is down when its lease is gone or its probe is, and this host's
own uplink links are watched and reported in its probe replies. Its uplinks' link and BGP
session states are published for the API (agent/uplinks.py).
The packet work itself is `FlowPipeline` (upcalls) and the datapath (fast path); the
simulation is `hivenet.sim`.

Headless: when the store goes away the mirrors keep their last state and retry, the datapath
and the pipeline go on forwarding with the cached topology, and learned entries queue up until
the store is back. A lost lease (expired while disconnected) is replaced and everything this
host publishes is written again under the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hivenet.agent.bgp import BgpSpeakers
from hivenet.agent.flowstate_sync import FlowStateSync, is_nat_block_key
from hivenet.agent.health import (
    MEMBER_HEALTH_KIND,
    HealthPlumbing,
    MemberHealth,
    OverlayProbing,
    Prober,
)
from hivenet.agent.lbstats import LB_STATUS_KINDS, LbStatsReporter, LbStatusWriter
from hivenet.agent.metadata import MetadataProxy
from hivenet.agent.metrics import HostStats, HostStatsReporter, agent_registry, serve_metrics
from hivenet.agent.mirror import PrefixMirror
from hivenet.agent.pipeline import FlowPipeline
from hivenet.agent.probe import DEFAULT_INTERVAL as DEFAULT_PROBE_INTERVAL
from hivenet.agent.probe import GatewayProber, LinkWatcher, sysfs_link_up
from hivenet.agent.tracing import TraceRequests
from hivenet.agent.underlay import (
    CLUSTER_PREFIX,
    DEFAULT_KEY_ROTATION,
    FLOWSTATE_KEYRING_KEY,
    ensure_keyring,
    rotate_keyring_if_due,
    tunnel_peer_addresses,
)
from hivenet.agent.uplinks import UplinkStatusReporter
from hivenet.clock import SYSTEM_CLOCK, Clock
from hivenet.datapath.base import Datapath
from hivenet.flows.table import Tag
from hivenet.flowstate.auth import Keyring
from hivenet.model import (
    DeviceKind,
    Host,
    Port,
    TopologyObject,
    TunnelZone,
    TunnelZoneMember,
    decode,
    parse_topology_key,
    topology_key,
)
from hivenet.model.subnet import DEFAULT_UNDERLAY_MTU
from hivenet.model.topology import TOPOLOGY_PREFIX
from hivenet.model.types import int_to_mac, mac_to_int
from hivenet.sim import LearnedEntry, SimulationResult, TopologyView
from hivenet.sim.metadata import HANDOFF_METADATA
from hivenet.sim.router import HANDOFF_BGP
from hivenet.sim.tables import LearnedMac, LearnedNeighbour, MemoryTables, ip_text
from hivenet.sim.topology import LAZY_KINDS, PortInfo
from hivenet.store.base import LeaseNotFoundError, Store, StoreError
from hivenet.store.keys import (
    STATE_PREFIX,
    TABLES_PREFIX,
    TRACE_REQUEST_KIND,
    arp_entry_key,
    host_alive_key,
    mac_entry_key,
    parse_state_key,
    parse_table_key,
    port_active_key,
)
from hivenet.store.topology import ConflictError, NotFoundError, TopologyRepository

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AgentCounters:
    topology_events: int = 0
    table_events: int = 0
    bad_store_values: int = 0
    flows_invalidated: int = 0
    lease_renewals: int = 0
    lease_lost: int = 0
    publish_errors: int = 0
    bind_errors: int = 0
    published_entries: int = 0
    bad_probes: int = 0


class HostAgent:
    """One host's agent. `await agent.start()` then `await agent.stop()` (or `run()`)."""

    def __init__(
        self,
        store: Store,
        datapath: Datapath,
        *,
        host_id: str,
        underlay_ip: str | None = None,
        tunnel_zone_id: str | None = None,
        lease_ttl: int = 10,
        counters_path: Path | None = None,
        reconcile_interval: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
        state_dir: Path | None = None,
        health_prober: Prober | None = None,
        overlay_health_probes: bool = False,
        health_plumbing: HealthPlumbing | None = None,
        underlay_mtu: int = DEFAULT_UNDERLAY_MTU,
        metrics_address: tuple[str, int] | None = None,
        metadata: bool = False,
        wall_clock: Callable[[], float] = time.time,
        flowstate_key_rotation: float = DEFAULT_KEY_ROTATION,
        bgp: bool = False,
        bgp_dir: Path | None = None,
        gateway_probe_interval: float = DEFAULT_PROBE_INTERVAL,
        link_state: Callable[[str], bool | None] | None = None,
        flowstate_max_entries: int | None = None,
        connection_templates: bool = True,
    ) -> None:
        if underlay_ip is not None:
            ipaddress.ip_address(underlay_ip)  # ValueError names the value
        if lease_ttl < 2:
            raise ValueError(f"lease_ttl: {lease_ttl} is too short (at least 2 seconds)")
        self.store = store
        self.datapath = datapath
        self.host_id = host_id
        self.underlay_ip = underlay_ip
        self.tunnel_zone_id = tunnel_zone_id
        self.lease_ttl = lease_ttl
        self.counters_path = counters_path
        self.reconcile_interval = reconcile_interval
        # The agent's own loops read and sleep on the injected clock (hivenet/clock.py).
        self.clock = clock
        self._sleep = clock.sleep
        self.wall_clock = wall_clock  # creation times of flow-state keys (shared in the store)
        self.flowstate_key_rotation = flowstate_key_rotation  # seconds; 0: never rotate
        self.repository = TopologyRepository(store)
        self.topology = TopologyView(decode=self._decode_stored)
        self.tables = MemoryTables()
        self.counters = AgentCounters()
        # Traffic counters per port/device/chain/drop reason (agent/metrics.py), published.
        self.host_stats = HostStats(host_id, self.topology, self.datapath.flows)
        self.metrics_address = metrics_address
        self.metrics_server: asyncio.AbstractServer | None = None
        # The metadata service for local VMs (agent/metadata.py), once it runs.
        self.metadata: MetadataProxy | None = (
            MetadataProxy(self.topology, datapath, underlay_mtu=underlay_mtu) if metadata else None
        )
        # Conntrack and NAT state, shared with peers over the tunnel, journaled in state_dir.
        self.flowstate = FlowStateSync(
            host_id,
            datapath,
            self.topology,
            store,
            lease_id=lambda: self.lease_id,
            state_dir=state_dir,
            clock=clock,
            wall_clock=wall_clock,
            authenticate=True,  # sealed with the cluster key (ensure_keyring, at start)
            max_entries=flowstate_max_entries,  # of each table; None: unbounded
        )
        self.pipeline = FlowPipeline(
            host_id,
            datapath,
            self.topology,
            self.tables,
            on_learned=self._on_learned,
            stateful=self.flowstate,
            on_simulated=self._on_simulated,
            clock=clock,
            underlay_mtu=underlay_mtu,
            templates=connection_templates,
        )
        self.topology_mirror = PrefixMirror(
            store,
            TOPOLOGY_PREFIX,
            self._on_topology_change,
            on_snapshot=self._on_topology_snapshot,
        )
        self.tables_mirror = PrefixMirror(store, TABLES_PREFIX, self._on_table_change)
        self.state_mirror = PrefixMirror(store, STATE_PREFIX, self._on_state_change)
        self.cluster_mirror = PrefixMirror(store, CLUSTER_PREFIX, self._on_cluster_change)
        self.live_hosts: set[str] = set()
        # Fast gateway liveness (agent/probe.py): probes to hosts owning uplinks, sealed on
        # the flow-state channel; a host is down when its lease is gone OR its probe is.
        self.gateway_probe_interval = gateway_probe_interval  # 0: no probing
        self.links = LinkWatcher(link_state or sysfs_link_up)  # this host's uplinks
        self.probe = GatewayProber(
            host_id,
            self._gateway_ports,
            self._send_probe,
            on_host=self._refresh_host_liveness,
            on_port=self._on_probe_port,
            local_down_ports=lambda: self.links.down,
            interval=gateway_probe_interval or DEFAULT_PROBE_INTERVAL,
        )
        self.flowstate.control_handler = self._on_probe
        # What the datapath accepts tunnel packets from (None: not told yet).
        self.tunnel_peers: frozenset[str] | None = None
        # Probes through the overlay: health ports and namespaces this agent keeps itself.
        self.overlay_probing: OverlayProbing | None = None
        if overlay_health_probes:
            if health_prober is not None:
                raise ValueError("health_prober: give it or overlay_health_probes, not both")
            self.overlay_probing = OverlayProbing(
                host_id,
                self.topology,
                self.repository,
                routers_wanted=lambda: {t.router_id for t in self.health.assignments().values()},
                is_bound=lambda port_id: port_id in self.bound_ports,
                plumbing=health_plumbing,
            )
            health_prober = self.overlay_probing
        # Load-balancer member health: this host's probes, everyone's reports.
        self.health = MemberHealth(
            host_id,
            self.topology,
            health_prober,  # None: this host does not probe (see agent/health.py)
            publish=self._publish,
            unpublish=self._unpublish,
            live_hosts=lambda: self.live_hosts | {self.host_id},
            invalidate=self._invalidate,
            clock=clock,
            on_status_change=lambda _member_id: self.lb_status.wake(),
        )
        # Load-balancer operating status written back, and this host's LB counters published.
        self.lb_status = LbStatusWriter(
            host_id,
            self.topology,
            self.repository,
            live_hosts=lambda: self.live_hosts | {self.host_id},
        )
        self.lb_stats = LbStatsReporter(
            host_id,
            self.topology,
            self.flowstate.nat,
            self.datapath.flows,
            publish=self._publish,
            unpublish=self._unpublish,
            clock=clock,
        )
        self.host_stats_reporter = HostStatsReporter(
            host_id, self.host_stats, publish=self._publish
        )
        # Synthetic and live trace requests for this host's ports (agent/tracing.py).
        self.traces = TraceRequests(
            host_id,
            self.topology,
            self.tables,
            self.flowstate,
            self.datapath.flows,
            publish=self._publish,
            unpublish=self._unpublish,
            clock=clock,
        )
        # BGP speakers for the uplinks bound here (agent/bgp.py); None: this host runs none.
        self.bgp: BgpSpeakers | None = None
        if bgp:
            self.bgp = BgpSpeakers(
                host_id,
                self.topology,
                self.tables,
                datapath,
                self.repository,
                is_bound=lambda port_id: port_id in self.bound_ports,
                live_hosts=lambda: set(self.live_hosts),
                state_dir=bgp_dir,
                clock=clock,
            )
        # This host's uplinks (link, BGP sessions) published for the API (agent/uplinks.py).
        self.uplink_status = UplinkStatusReporter(
            host_id,
            self.topology,
            bound=lambda: self.bound_ports,
            sessions=lambda: self.bgp.sessions if self.bgp is not None else {},
            link_state=link_state or sysfs_link_up,
            publish=self._publish,
            unpublish=self._unpublish,
            clock=clock,
        )
        self.lease_id = 0
        self.bound_ports: dict[str, tuple[int, str]] = {}  # port id -> (tunnel key, interface)
        # The L2 gateway's external VTEPs the datapath accepts: port id -> (key, IP, VNI).
        self.bound_vteps: dict[str, tuple[int, str, int]] = {}
        # What this host publishes under its lease: key -> value (re-put after a lease loss).
        self._published: dict[str, bytes] = {}
        self._to_publish: dict[str, bytes] = {}
        self._to_unpublish: set[str] = set()
        self._publish_wakeup = asyncio.Event()
        self._ports_dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False

    # ------------------------------------------------------------------------- life cycle

    async def start(self, *, load_timeout: float = 30.0) -> None:
        """Register, load the topology and tables, bind local ports; then follow changes."""
        # Until the topology and liveness are loaded, no underlay source is a known peer.
        self._set_tunnel_peers(frozenset())
        await self._acquire_lease()
        await self._register_host()
        self.flowstate.set_keyring(await ensure_keyring(self.store, self.wall_clock()))
        await self._start_metadata()
        self._tasks = [
            asyncio.create_task(self.topology_mirror.run(), name=f"hn-{self.host_id}-topology"),
            asyncio.create_task(self.tables_mirror.run(), name=f"hn-{self.host_id}-tables"),
            asyncio.create_task(self.state_mirror.run(), name=f"hn-{self.host_id}-state"),
            asyncio.create_task(self.cluster_mirror.run(), name=f"hn-{self.host_id}-cluster"),
            asyncio.create_task(self._lease_loop(), name=f"hn-{self.host_id}-lease"),
            asyncio.create_task(self._publish_loop(), name=f"hn-{self.host_id}-publish"),
            asyncio.create_task(self._reconcile_loop(), name=f"hn-{self.host_id}-ports"),
            asyncio.create_task(self.health.run(), name=f"hn-{self.host_id}-health"),
            asyncio.create_task(self.lb_status.run(), name=f"hn-{self.host_id}-lb-status"),
            asyncio.create_task(self.lb_stats.run(), name=f"hn-{self.host_id}-lb-stats"),
            asyncio.create_task(
                self.host_stats_reporter.run(), name=f"hn-{self.host_id}-host-stats"
            ),
            asyncio.create_task(self.traces.run(), name=f"hn-{self.host_id}-traces"),
            asyncio.create_task(self.uplink_status.run(), name=f"hn-{self.host_id}-uplinks"),
        ]
        if self.metrics_address is not None:
            try:
                self.metrics_server = await serve_metrics(
                    agent_registry(self), *self.metrics_address
                )
            except OSError as exc:  # metrics are no reason to stop forwarding
                log.warning(
                    "host %s: no metrics endpoint on %s:%d: %s",
                    self.host_id,
                    *self.metrics_address,
                    exc,
                )
        if self.bgp is not None:
            self._tasks.append(asyncio.create_task(self.bgp.run(), name=f"hn-{self.host_id}-bgp"))
        if self.flowstate_key_rotation > 0:
            self._tasks.append(
                asyncio.create_task(self._key_rotation_loop(), name=f"hn-{self.host_id}-keys")
            )
        if self.counters_path is not None:
            self._tasks.append(
                asyncio.create_task(self._counters_loop(), name=f"hn-{self.host_id}-counters")
            )
        # The mirrors read the store and load now. The cyclic GC is held off until they are
        # done: what the read and the view build allocate survives, and every collection it
        # triggered walked the growing heap again (see _on_topology_snapshot, which covers
        # a later reload). The load leaves no cyclic garbage (a collection right after it
        # finds none), so the process's first collection after ready (agent/cli.py) is one
        # walk of the heap instead of one per threshold crossed during the load.
        collecting = gc.isenabled()
        gc.disable()
        try:
            await asyncio.wait_for(
                asyncio.gather(
                    self.topology_mirror.loaded.wait(),
                    self.tables_mirror.loaded.wait(),
                    self.state_mirror.loaded.wait(),
                ),
                load_timeout,
            )
        finally:
            if collecting:
                gc.enable()
        self._refresh_liveness()
        self._refresh_tunnel_peers()
        self._reconcile_ports()
        await self.flowstate.start()
        if self.gateway_probe_interval > 0:
            self._tasks.append(
                asyncio.create_task(
                    self.probe.run(self._sleep, self._poll_uplinks), name=f"hn-{self.host_id}-probe"
                )
            )
        if self.overlay_probing is not None:
            # Only now: with the topology loaded it adopts the health ports it left, instead
            # of sweeping them as unwanted.
            self._tasks.append(
                asyncio.create_task(
                    self.overlay_probing.run(), name=f"hn-{self.host_id}-health-ports"
                )
            )
        self._started = True

    async def stop(self, *, graceful: bool = True) -> None:
        """Stop following the store. Graceful: revoke the lease so peers see the host leave now."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _done, stuck = await asyncio.wait(self._tasks, timeout=5.0)
            for task in stuck:
                log.error("host %s: task %s did not stop", self.host_id, task.get_name())
        self._tasks = []
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if self.metadata is not None or self.bgp is not None:
            self.pipeline.set_handoff(None)
        if self.metadata is not None:
            await self.metadata.stop()
        if self.bgp is not None:
            await self.bgp.close()
        await self.flowstate.stop(compact=graceful)
        for port_id in list(self.bound_ports):
            self._unbind(port_id)
        for port_id in list(self.bound_vteps):
            self._unbind_vtep(port_id)
        if self.overlay_probing is not None:
            await self.overlay_probing.close()
        if graceful and self.lease_id:
            with contextlib.suppress(StoreError):
                await asyncio.wait_for(self.store.lease_revoke(self.lease_id), 2.0)
        self._write_counters()

    async def _start_metadata(self) -> None:
        """Before any port is bound (flows simulated without the service do not tell its
        packets apart). A host that cannot run it forwards without it and says so."""
        proxy = self.metadata
        if proxy is not None:
            try:
                await proxy.start()
            except (OSError, IndexError) as exc:
                log.warning("host %s: no metadata service: %s", self.host_id, exc)
                self.metadata = None
        metadata, bgp = self.metadata, self.bgp
        if metadata is None and bgp is None:
            return

        def hand_off(service: str, port: PortInfo, frame: bytes) -> None:
            if service == HANDOFF_METADATA and metadata is not None:
                metadata.from_vm(port, frame)
            elif service == HANDOFF_BGP and bgp is not None:
                bgp.hand_off(port, frame)

        self.pipeline.set_handoff(hand_off, metadata=metadata is not None)

    @property
    def pending_publications(self) -> int:
        """Learned entries and port ownership not yet written to the store."""
        return len(self._to_publish) + len(self._to_unpublish)

    @property
    def revision(self) -> int:
        return self.topology_mirror.revision

    # ------------------------------------------------------------------------- registration

    async def _acquire_lease(self) -> None:
        lease = await self.store.lease_grant(self.lease_ttl)
        self.lease_id = lease.id
        alive = json.dumps(
            {"host_id": self.host_id, "underlay_ip": self.underlay_ip, "pid": os.getpid()}
        ).encode()
        self._published[host_alive_key(self.host_id)] = alive
        for key, value in self._published.items():
            await self.store.put(key, value, lease=self.lease_id)

    async def _register_host(self) -> None:
        try:
            await self.repository.get(Host, self.host_id)
        except NotFoundError:
            with contextlib.suppress(ConflictError):
                await self.repository.create(Host(id=self.host_id, name=self.host_id))
        if self.tunnel_zone_id is None or self.underlay_ip is None:
            return
        member = TunnelZoneMember(host_id=self.host_id, underlay_ip=self.underlay_ip)  # type: ignore[arg-type]

        def join(zone: TunnelZone) -> TunnelZone:
            others = tuple(m for m in zone.members if m.host_id != self.host_id)
            return zone.model_copy(update={"members": (*others, member)})

        for _ in range(5):
            try:
                await self.repository.modify(TunnelZone, self.tunnel_zone_id, join)
                return
            except NotFoundError:
                with contextlib.suppress(ConflictError):
                    await self.repository.create(
                        TunnelZone(
                            id=self.tunnel_zone_id, name=self.tunnel_zone_id, members=(member,)
                        )
                    )
                    return
        raise ConflictError(f"could not join tunnel zone {self.tunnel_zone_id}")

    async def _lease_loop(self) -> None:
        delay = max(self.lease_ttl / 3, 0.5)
        while True:
            await self._sleep(delay)
            try:
                await self.store.lease_keepalive(self.lease_id)
                self.counters.lease_renewals += 1
            except LeaseNotFoundError:
                # Expired while we could not reach the store: take a new lease and publish
                # again everything that vanished with the old one.
                self.counters.lease_lost += 1
                log.warning("host %s: lease %s lost; re-registering", self.host_id, self.lease_id)
                try:
                    await self._acquire_lease()
                    # The store deleted our NAT port-block keys with the old lease while
                    # live SNAT bindings still use their ports: take them again.
                    await self.flowstate.reclaim_blocks()
                except StoreError as exc:
                    log.warning("host %s: re-register failed: %s", self.host_id, exc)
            except (StoreError, OSError) as exc:
                log.warning("host %s: lease keepalive failed: %s", self.host_id, exc)

    # ------------------------------------------------------------------------- watches

    def _decode_topology(self, key: str, value: bytes) -> TopologyObject:
        return self._decode_parsed(*parse_topology_key(key), value)

    @staticmethod
    def _decode_parsed(kind: str, object_id: str, value: bytes) -> TopologyObject:
        """`_decode_topology` of a key already parsed into its kind and id."""
        obj = decode(kind, value)
        if obj.id != object_id:
            # Never file an object under an id no key names (a value without an id would get
            # a fresh random one from the model's default, different on every agent).
            raise ValueError(f"id {obj.id!r} in the value does not match the key")
        return obj

    def _decode_stored(self, kind: str, object_id: str, value: bytes) -> TopologyObject | None:
        """The view's decoder for values it loaded undecoded: a bad one is counted and logged
        (naming its key and the field), as at load."""
        try:
            return self._decode_parsed(kind, object_id, value)
        except ValueError as exc:
            key = topology_key(kind, object_id)
            self.counters.bad_store_values += 1
            log.error("host %s: ignoring bad topology value at %s: %s", self.host_id, key, exc)
            return None

    def _on_topology_change(self, key: str, value: bytes | None, revision: int) -> None:
        self.counters.topology_events += 1
        try:
            if value is None:
                kind, object_id = parse_topology_key(key)
                obj = self.topology.get(kind, object_id)
                tags = self.topology.remove(kind, object_id)
            else:
                obj = self._decode_topology(key, value)
                kind = obj.KIND
                tags = self.topology.apply(obj)
        except ValueError as exc:  # a value no model accepts: count it, never crash
            self.counters.bad_store_values += 1
            log.error("host %s: ignoring bad topology value at %s: %s", self.host_id, key, exc)
            return
        if tags:
            self.counters.flows_invalidated += self.datapath.invalidate(tags)
        if kind in LB_STATUS_KINDS:
            self.lb_status.wake()
        if kind in ("host", "tunnel_zone") and self.state_mirror.loaded.is_set():
            self._refresh_tunnel_peers()
        if kind in ("port", "host", "tunnel_zone"):
            self._ports_dirty.set()
            if obj is not None and self.state_mirror.loaded.is_set():
                host_id = obj.id if kind == "host" else getattr(obj, "host_id", None)
                if host_id:
                    self._refresh_host_liveness(host_id)

    def _on_topology_snapshot(self, changes: list[tuple[str, bytes | None]], revision: int) -> None:
        """A (re)load: compile every touched device once, not once per object. The cyclic GC
        is held off meanwhile: what a load allocates survives it, and the collections it
        triggered walked the growing view again and again (~10% of a 130k-key start-up)."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._load_topology(changes)
        finally:
            if collecting:
                gc.enable()

    def _load_topology(self, changes: list[tuple[str, bytes | None]]) -> None:
        self.counters.topology_events += len(changes)
        objects: list[TopologyObject] = []
        # Chains and rules (most of a large topology) are decoded when a chain is first used.
        raw: list[tuple[str, str, bytes]] = []
        tags: set[str] = set()
        for key, value in changes:
            try:
                kind, object_id = parse_topology_key(key)  # once per key: 130k at a start-up
                if value is None:
                    tags |= self.topology.remove(kind, object_id)
                elif kind in LAZY_KINDS:
                    raw.append((kind, object_id, value))
                else:
                    objects.append(self._decode_parsed(kind, object_id, value))
            except ValueError as exc:
                self.counters.bad_store_values += 1
                log.error("host %s: ignoring bad topology value at %s: %s", self.host_id, key, exc)
        tags |= self.topology.apply_all(objects, raw)
        if tags:
            self.counters.flows_invalidated += self.datapath.invalidate(tags)
        self.lb_status.wake()
        self._ports_dirty.set()
        if self.state_mirror.loaded.is_set():
            self._refresh_liveness()
            self._refresh_tunnel_peers()

    def _on_state_change(self, key: str, value: bytes | None, revision: int) -> None:
        try:
            host_id, kind, object_id = parse_state_key(key)
        except ValueError:
            self.counters.bad_store_values += 1
            return
        if kind == MEMBER_HEALTH_KIND:
            self.health.on_report(host_id, object_id, value)
            return
        if kind == TRACE_REQUEST_KIND:
            if host_id == self.host_id:
                self.traces.on_request(object_id, value)
            return
        if kind != "host" or object_id != host_id:
            return
        if value is None:
            self.live_hosts.discard(host_id)
        else:
            self.live_hosts.add(host_id)
        self.health.on_liveness()
        self.lb_status.wake()  # the writer of some statuses may have moved
        if self.topology_mirror.loaded.is_set():
            self._refresh_host_liveness(host_id)
            self._refresh_tunnel_peers()

    def _refresh_liveness(self) -> None:
        """Hosts whose agent holds no liveness key are down; so are the ports bound to them."""
        hosts = {obj.id for obj in self.topology.all("host")}
        hosts.update(h for p in self.topology.all("port") if (h := getattr(p, "host_id", None)))
        tags: set[str] = set()
        for host_id in hosts:
            tags |= self.topology.set_host_alive(host_id, self._host_alive(host_id))
        if tags:
            self.counters.flows_invalidated += self.datapath.invalidate(tags)

    def _refresh_tunnel_peers(self) -> None:
        """Tell the datapath the underlay addresses of the live members of our tunnel zones
        (when they changed): tunnel packets from any other source are dropped."""
        zones = (z for z in self.topology.all("tunnel_zone") if isinstance(z, TunnelZone))
        self._set_tunnel_peers(tunnel_peer_addresses(zones, self.host_id, self.live_hosts))

    def _set_tunnel_peers(self, peers: frozenset[str]) -> None:
        if peers == self.tunnel_peers:
            return
        self.tunnel_peers = peers
        self.datapath.set_tunnel_peers(peers)

    def _on_cluster_change(self, key: str, value: bytes | None, revision: int) -> None:
        if key != FLOWSTATE_KEYRING_KEY or value is None:
            return  # a deleted keyring: keep the keys we have (ensure_keyring recreates it)
        try:
            self.flowstate.set_keyring(Keyring.from_json(value))
        except ValueError as exc:
            self.counters.bad_store_values += 1
            log.error("host %s: ignoring bad flow-state keyring: %s", self.host_id, exc)

    async def _key_rotation_loop(self) -> None:
        """Rotate the cluster's flow-state key when it is older than the rotation period (one
        agent wins the compare-and-swap; the others see the new key through the watch)."""
        period = self.flowstate_key_rotation
        while True:
            await self._sleep(min(max(period / 10, 1.0), 600.0))
            try:
                if await rotate_keyring_if_due(self.store, self.wall_clock(), period):
                    log.info("host %s: rotated the flow-state key", self.host_id)
            except (StoreError, OSError, ValueError) as exc:
                log.warning("host %s: flow-state key rotation failed: %s", self.host_id, exc)

    def _refresh_host_liveness(self, host_id: str) -> None:
        tags = self.topology.set_host_alive(host_id, self._host_alive(host_id))
        if tags:
            self.counters.flows_invalidated += self.datapath.invalidate(tags)

    def _host_alive(self, host_id: str) -> bool:
        if host_id == self.host_id:
            return True
        return host_id in self.live_hosts and not self.probe.is_down(host_id)

    def _gateway_ports(self) -> list[tuple[str, str]]:
        """(host, port) of every exterior router port bound to a host: what is probed."""
        return [
            (port.host_id, port.id)
            for port in self.topology.ports.values()
            if port.device_kind is DeviceKind.ROUTER and port.peer_id is None and port.host_id
        ]

    def _send_probe(self, host_id: str, message: bytes) -> None:
        remote_ip = self.topology.host_underlay_ip.get(host_id)
        if remote_ip is None:
            return
        try:
            self.flowstate.send_control(remote_ip, message)
        except (OSError, ValueError) as exc:  # the underlay may refuse it: that is a miss
            log.debug("host %s: probe to %s not sent: %s", self.host_id, host_id, exc)

    def _on_probe(self, sender: str, payload: bytes) -> None:
        try:
            self.probe.receive(sender, payload)
        except ValueError as exc:
            self.counters.bad_probes += 1
            log.warning("host %s: bad probe from %s: %s", self.host_id, sender, exc)

    def _poll_uplinks(self) -> bool:
        """This host's bound router ports (uplinks): a link change is applied here at once
        and reaches the other agents in the next probe reply. Returns whether it has any."""
        uplinks = {
            port_id: interface
            for port_id, (_key, interface) in self.bound_ports.items()
            if (port := self.topology.ports.get(port_id)) is not None
            and port.device_kind is DeviceKind.ROUTER
        }
        for port_id, alive in self.links.poll(uplinks).items():
            self._on_probe_port(port_id, alive)
        return bool(uplinks)

    def _on_probe_port(self, port_id: str, alive: bool) -> None:
        tags = self.topology.set_port_alive(port_id, alive)
        if tags:
            self.counters.flows_invalidated += self.datapath.invalidate(tags)

    def _on_simulated(
        self,
        port_id: str,
        result: SimulationResult,
        size: int,
        installed: tuple[tuple[int, ...], tuple[int, ...]] | None,
    ) -> None:
        self.host_stats.on_simulated(port_id, result, size, installed)
        self.traces.on_simulated(port_id, result, size, installed)

    def _invalidate(self, tags: Iterable[Tag]) -> None:
        self.counters.flows_invalidated += self.datapath.invalidate(tags)

    def _on_table_change(self, key: str, value: bytes | None, revision: int) -> None:
        self.counters.table_events += 1
        if is_nat_block_key(key):
            self.flowstate.on_block_change(key, value)
            return
        try:
            tag = self._apply_table_entry(key, value)
        except ValueError as exc:
            self.counters.bad_store_values += 1
            log.error("host %s: ignoring bad table entry %s: %s", self.host_id, key, exc)
            return
        if tag is not None:
            self.counters.flows_invalidated += self.datapath.invalidate([tag])

    def _apply_table_entry(self, key: str, value: bytes | None) -> str | None:
        kind, owner_id, name, entry = parse_table_key(key)
        if kind == "bridge" and name == "mac":
            vlan_text, _, mac_text = entry.partition("/")
            vlan, mac = int(vlan_text), mac_to_int(mac_text)
            if value is None:
                return self.tables.forget_mac(owner_id, vlan, mac)
            return self.tables.learn(LearnedMac(owner_id, vlan, mac, value.decode()))
        if kind == "router" and name == "arp":
            address = ipaddress.ip_address(entry)
            if value is None:
                return self.tables.forget_neighbour(owner_id, address.version, int(address))
            return self.tables.learn(
                LearnedNeighbour(
                    owner_id, address.version, int(address), mac_to_int(value.decode())
                )
            )
        return None  # tables of later features (NAT blocks, ...) are not ours to read here

    # ------------------------------------------------------------------------- learning

    def _on_learned(self, entries: Sequence[LearnedEntry]) -> None:
        """Apply locally at once (the flow about to be installed depends on it), publish later."""
        for entry in entries:
            tag = self.tables.learn(entry)
            if tag is None:
                continue
            self.counters.flows_invalidated += self.datapath.invalidate([tag])
            if isinstance(entry, LearnedMac):
                key = mac_entry_key(entry.bridge_id, entry.vlan, int_to_mac(entry.mac))
                value = entry.port_id.encode()
            else:
                key = arp_entry_key(entry.router_id, ip_text(entry.version, entry.ip))
                value = int_to_mac(entry.mac).encode()
            self._to_publish[key] = value
        if self._to_publish:
            self._publish_wakeup.set()

    def _publish(self, key: str, value: bytes) -> None:
        self._to_unpublish.discard(key)
        self._to_publish[key] = value
        self._publish_wakeup.set()

    def _unpublish(self, key: str) -> None:
        self._to_publish.pop(key, None)
        self._published.pop(key, None)
        self._to_unpublish.add(key)
        self._publish_wakeup.set()

    async def _publish_loop(self) -> None:
        delay = 0.1
        while True:
            await self._publish_wakeup.wait()
            self._publish_wakeup.clear()
            try:
                while self._to_publish or self._to_unpublish:
                    if self._to_publish:
                        key = next(iter(self._to_publish))
                        value = self._to_publish[key]
                        await self.store.put(key, value, lease=self.lease_id)
                        if self._to_publish.get(key) == value:
                            del self._to_publish[key]
                        if key not in self._to_unpublish:  # withdrawn while we were writing
                            self._published[key] = value
                        self.counters.published_entries += 1
                    else:
                        key = next(iter(self._to_unpublish))
                        await self.store.delete(key)
                        self._to_unpublish.discard(key)  # only once the delete went through
                delay = 0.1
            except (StoreError, OSError) as exc:
                self.counters.publish_errors += 1
                log.warning(
                    "host %s: publish failed (%s); retry in %.1fs", self.host_id, exc, delay
                )
                await self._sleep(delay)
                delay = min(delay * 2, 5.0)
                self._publish_wakeup.set()

    # ------------------------------------------------------------------------- ports

    async def _reconcile_loop(self) -> None:
        while True:
            # Wake on a change, or after reconcile_interval on the agent's clock (to retry
            # binds that failed). asyncio.wait, not wait_for: 3.11's wait_for can swallow a
            # cancellation that arrives just as the event fires, and the task would never stop.
            dirty = asyncio.ensure_future(self._ports_dirty.wait())
            tick = asyncio.ensure_future(self._sleep(self.reconcile_interval))
            try:
                await asyncio.wait((dirty, tick), return_when=asyncio.FIRST_COMPLETED)
            finally:
                dirty.cancel()
                tick.cancel()
            self._ports_dirty.clear()
            self._reconcile_ports()

    def _reconcile_ports(self) -> None:
        """Bind the exterior ports assigned to this host; unbind those no longer ours."""
        wanted: dict[str, tuple[int, str]] = {}
        for port in self.topology.all("port"):
            host_id = getattr(port, "host_id", None)
            interface = getattr(port, "interface_name", None)
            key = getattr(port, "tunnel_key", 0)
            if host_id == self.host_id and interface and key:
                wanted[port.id] = (key, interface)
        for port_id, binding in list(self.bound_ports.items()):
            if wanted.get(port_id) != binding:
                self._unbind(port_id)
        self._reconcile_vteps()
        self.probe.wake()  # gateways and this host's uplinks may have changed
        for port_id, (key, interface) in wanted.items():
            if port_id in self.bound_ports:
                continue
            try:
                self.datapath.bind_port(key, interface)
            except (OSError, ValueError) as exc:
                # The VM's interface may not exist yet; the next reconcile tries again.
                self.counters.bind_errors += 1
                log.info(
                    "host %s: cannot bind port %s to %s yet: %s",
                    self.host_id,
                    port_id,
                    interface,
                    exc,
                )
                continue
            self.bound_ports[port_id] = (key, interface)
            self._publish(
                port_active_key(self.host_id, port_id),
                json.dumps({"interface": interface}).encode(),
            )

    def _unbind(self, port_id: str) -> None:
        key, _interface = self.bound_ports.pop(port_id)
        with contextlib.suppress(KeyError, OSError, ValueError):
            self.datapath.unbind_port(key)
        self._unpublish(port_active_key(self.host_id, port_id))

    def _reconcile_vteps(self) -> None:
        """Every host accepts the L2 gateway's external VTEPs (a VTEP may send to any host):
        port id -> (tunnel key, VTEP IP, VNI) of each VTEP port, bound in the datapath. Not
        one at a HiveNet host's underlay address: its datagrams would shadow the host's."""
        hosts = set(self.topology.host_underlay_ip.values())
        wanted: dict[str, tuple[int, str, int]] = {}
        for port in self.topology.all("port"):
            if not isinstance(port, Port) or port.vtep_ip is None or not port.tunnel_key:
                continue
            if str(port.vtep_ip) in hosts:
                self.counters.bind_errors += 1
                log.info("host %s: VTEP port %s is at a host's address", self.host_id, port.id)
                continue
            wanted[port.id] = (port.tunnel_key, str(port.vtep_ip), port.vtep_vni or 0)
        for port_id, binding in list(self.bound_vteps.items()):
            if wanted.get(port_id) != binding:
                self._unbind_vtep(port_id)
        for port_id, binding in wanted.items():
            if port_id in self.bound_vteps:
                continue
            try:
                self.datapath.bind_vtep(*binding)
            except ValueError as exc:
                self.counters.bind_errors += 1
                log.info("host %s: cannot accept VTEP port %s: %s", self.host_id, port_id, exc)
                continue
            self.bound_vteps[port_id] = binding

    def _unbind_vtep(self, port_id: str) -> None:
        key, _ip, _vni = self.bound_vteps.pop(port_id)
        with contextlib.suppress(KeyError):
            self.datapath.unbind_vtep(key)

    # ------------------------------------------------------------------------- counters

    def counters_snapshot(self) -> dict[str, object]:
        agent = dataclasses.asdict(self.counters)
        return {
            "host_id": self.host_id,
            "revision": self.topology_mirror.revision,
            "store_connected": self.topology_mirror.connected,
            "bound_ports": len(self.bound_ports),
            "agent": agent,
            "pipeline": self.pipeline.counters(),
            "flowstate": self.flowstate.counters_snapshot(),
            "datapath": self.datapath.counters(),
            "metadata": self.metadata.counters_snapshot() if self.metadata is not None else None,
            "bgp": self.bgp.counters_snapshot() if self.bgp is not None else None,
            "probe": {**self.probe.snapshot(), "local_down_ports": sorted(self.links.down)},
        }

    def _write_counters(self) -> None:
        if self.counters_path is None:
            return
        tmp = self.counters_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.counters_snapshot(), indent=1, sort_keys=True))
        tmp.replace(self.counters_path)

    async def _counters_loop(self) -> None:
        while True:
            await self._sleep(1.0)
            try:
                self._write_counters()
            except OSError as exc:
                log.warning("host %s: cannot write counters: %s", self.host_id, exc)
