"""Per-host traffic counters: `HostStats` (what one agent counts, kept off the hot path),
its publication under `/hivenet/v1/state/<host>/host_stats/<host>` (`host_stats_key`), and the agent's
Prometheus exposition (`AgentCollector`, `serve_metrics`).

What is counted, and where the cost goes:
- The fast path (a packet that hits an installed flow) pays nothing here: the flow table
  already counts packets and bytes per flow. When the pipeline simulates a packet it calls
  `on_simulated(ingress port id, result, frame length, installed flow key)` (the upcall path
  only), which only queues it; every `interval` seconds `scan()` counts the queued packets
  and remembers, for each installed flow's key (match, mask), what the flow is attributed
  to: its ingress port, egress ports (Output / Tunnel keys), devices (the `bridge:`,
  `router:` and `port:` tags of the result), chains (`chain:` tags: a chain's
  hits), the rules that matched (the trace's `rule` steps: chain and position) and drop
  reason; then it adds each flow's packet and byte delta since the last scan to what its key
  is attributed to.
- Ports: `rx` = packets entering the overlay at the port on this host (upcalls + flow hits),
  `tx` = packets the simulations here sent out of the port (locally or through a tunnel),
  `drops` = packets from the port that the simulation dropped. Counted at the ingress host,
  so the API's sum over hosts counts each packet once.
- Devices and chains: packets and bytes of flows (and upcalls) whose simulation went through
  them. Rules: packets they matched (reported by id for stored rules; the virtual chains'
  rules, security groups and VIPs, count in their chain only). Drops: by reason (first word
  of the simulation's reason, at most `MAX_DROP_REASONS` distinct, the rest as `other`).
  The datapath's own drops (malformed frames, tunnel errors, too big, full sockets, and every
  packet an installed drop flow dropped) are read from its `drop.<reason>` counters at scrape
  time, labelled the same way (`hivenet_datapath_drops`).
- Not counted: packets that hit a flow in the last `interval` before it was removed.

Bounded memory and label sets: every counter is keyed by the id of a port, device, chain or
rule that exists in this host's topology view (`scan()` forgets the others) or by a drop
reason (capped); the attribution table holds only keys of flows in the flow table; the queue
holds at most `max_pending` simulated packets between scans (beyond that they go uncounted
and `attribution_overflow` counts them).

Must not touch the datapath, flows or topology; it only reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from hivenet.flows.actions import Output, Tunnel
from hivenet.flows.table import Flow
from hivenet.sim import SimulationResult, TopologyView
from hivenet.store.keys import host_stats_key

if TYPE_CHECKING:
    from hivenet.agent.agent import HostAgent

log = logging.getLogger(__name__)

MAX_DROP_REASONS = 64
OTHER_REASON = "other"
# Device tag prefixes counted per device (the part after ':' is the object id).
DEVICE_KINDS = ("bridge", "router", "port")


@dataclass(slots=True)
class Traffic:
    packets: int = 0
    bytes: int = 0

    def add(self, packets: int, size: int) -> None:
        self.packets += packets
        self.bytes += size


@dataclass(slots=True)
class PortCounters:
    rx: Traffic = field(default_factory=Traffic)
    tx: Traffic = field(default_factory=Traffic)
    drops: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "rx_packets": self.rx.packets,
            "rx_bytes": self.rx.bytes,
            "tx_packets": self.tx.packets,
            "tx_bytes": self.tx.bytes,
            "drops": self.drops,
        }


@dataclass(frozen=True, slots=True)
class FlowAttribution:
    """What an installed flow's hits count towards (from the simulation that made it)."""

    ingress_port: str
    egress_ports: tuple[str, ...]
    devices: tuple[tuple[str, str], ...]  # (kind, id)
    chains: tuple[str, ...]
    rules: tuple[tuple[str, int], ...]  # (chain id, position) of each rule that matched
    drop_reason: str | None


def _reason_label(reason: str) -> str:
    return reason.split(":", 1)[0].split(" ", 1)[0] or OTHER_REASON


def _datapath_drop_reasons(counters: dict[str, Any]) -> dict[str, int]:
    """The datapath's `drop.<reason>` counters by label: a flow drop's reason is cut to its
    first word as the simulation's are (`flow_rule`, not the rule's text), and past
    `MAX_DROP_REASONS` distinct labels the rest add up under `other`."""
    out: dict[str, int] = {}
    for name, count in sorted(counters.items()):
        if not name.startswith("drop."):
            continue
        reason = _reason_label(name.removeprefix("drop."))
        if reason not in out and len(out) >= MAX_DROP_REASONS:
            reason = OTHER_REASON
        out[reason] = out.get(reason, 0) + int(count)
    return out


class HostStats:
    """One host's traffic counters (definitions in the module docstring)."""

    def __init__(
        self,
        host_id: str,
        topology: TopologyView,
        flows: Callable[[], list[Flow]],
        *,
        max_pending: int = 10_000,
    ) -> None:
        self.host_id = host_id
        self.topology = topology
        self.flows = flows
        self.max_pending = max_pending
        self.ports: dict[str, PortCounters] = {}
        self.devices: dict[tuple[str, str], Traffic] = {}
        self.chains: dict[str, Traffic] = {}
        self.rule_hits: dict[tuple[str, int], int] = {}  # (chain id, position) -> packets
        self.rule_ids: dict[tuple[str, int], str] = {}  # of stored rules, as of the last scan
        self._rule_ids_revision = -1
        self.drops: dict[str, int] = {}
        self.attribution_overflow = 0
        self.scans = 0
        self._attribution: dict[tuple[tuple[int, ...], tuple[int, ...]], FlowAttribution] = {}
        self._simulated: list[
            tuple[str, SimulationResult, int, tuple[tuple[int, ...], tuple[int, ...]] | None]
        ] = []
        self._flow_counts: dict[Flow, tuple[int, int]] = {}

    # ---------------------------------------------------------------- upcall path

    def on_simulated(
        self,
        ingress_port_id: str,
        result: SimulationResult,
        size: int,
        installed: tuple[tuple[int, ...], tuple[int, ...]] | None,
    ) -> None:
        """Queue one simulated packet (and the key of the flow installed for it) for the next
        scan, which counts it and attributes the flow: the upcall path only appends."""
        if len(self._simulated) >= self.max_pending:
            self.attribution_overflow += 1
            return
        self._simulated.append((ingress_port_id, result, size, installed))

    def _account(
        self,
        ingress_port_id: str,
        result: SimulationResult,
        size: int,
        installed: tuple[tuple[int, ...], tuple[int, ...]] | None,
    ) -> None:
        attribution = self._attribute(ingress_port_id, result)
        self._count(attribution, 1, size)
        for packet in result.generated:
            for port_id in self._egress_ports(packet.actions):
                self._port(port_id).tx.add(1, len(packet.frame))
        if installed is not None:
            self._attribution[installed] = attribution

    def _attribute(self, ingress_port_id: str, result: SimulationResult) -> FlowAttribution:
        devices: list[tuple[str, str]] = []
        chains: list[str] = []
        for tag in result.tags:
            if not isinstance(tag, str):  # a connection's (`flowstate` connection tags)
                continue
            kind, _, object_id = tag.partition(":")
            if kind == "chain":
                chains.append(object_id)
            elif kind in DEVICE_KINDS and object_id and ":" not in object_id:
                devices.append((kind, object_id))
        rules: list[tuple[str, int]] = []
        for step in result.trace:
            if step.event == "rule" and step.detail.startswith("#"):
                position = step.detail[1:].split(" ", 1)[0]
                if position.isdigit():
                    rules.append((step.where.id, int(position)))
        return FlowAttribution(
            ingress_port=ingress_port_id,
            egress_ports=tuple(self._egress_ports(result.actions)),
            devices=tuple(sorted(devices)),
            chains=tuple(sorted(chains)),
            rules=tuple(rules),
            drop_reason=(
                _reason_label(result.drop_reason) if result.drop_reason is not None else None
            ),
        )

    def _egress_ports(self, actions: Iterable[object]) -> Iterator[str]:
        for action in actions:
            if isinstance(action, Output):
                key = action.port_key
            elif isinstance(action, Tunnel):
                key = action.tunnel_key
            else:
                continue
            port_id = self.topology.port_by_tunnel_key.get(key)
            if port_id is not None:
                yield port_id

    def _port(self, port_id: str) -> PortCounters:
        counters = self.ports.get(port_id)
        if counters is None:
            counters = self.ports[port_id] = PortCounters()
        return counters

    def _count(self, attribution: FlowAttribution, packets: int, size: int) -> None:
        self._port(attribution.ingress_port).rx.add(packets, size)
        if attribution.drop_reason is not None:
            self._port(attribution.ingress_port).drops += packets
            reason = attribution.drop_reason
            if reason not in self.drops and len(self.drops) >= MAX_DROP_REASONS:
                reason = OTHER_REASON
            self.drops[reason] = self.drops.get(reason, 0) + packets
        for port_id in attribution.egress_ports:
            self._port(port_id).tx.add(packets, size)
        for device in attribution.devices:
            traffic = self.devices.get(device)
            if traffic is None:
                traffic = self.devices[device] = Traffic()
            traffic.add(packets, size)
        for chain_id in attribution.chains:
            traffic = self.chains.get(chain_id)
            if traffic is None:
                traffic = self.chains[chain_id] = Traffic()
            traffic.add(packets, size)
        for rule in attribution.rules:
            self.rule_hits[rule] = self.rule_hits.get(rule, 0) + packets

    # ---------------------------------------------------------------- periodic

    def scan(self) -> None:
        """Add every flow's hits since the last scan; forget what no longer exists."""
        self.scans += 1
        simulated, self._simulated = self._simulated, []
        for entry in simulated:
            self._account(*entry)
        flows = self.flows()
        counts: dict[Flow, tuple[int, int]] = {}
        kept: dict[tuple[tuple[int, ...], tuple[int, ...]], FlowAttribution] = {}
        for flow in flows:
            counts[flow] = (flow.packets, flow.bytes)
            key = (flow.match, flow.mask)
            attribution = self._attribution.get(key)
            if attribution is None:
                continue
            kept[key] = attribution
            packets, size = self._flow_counts.get(flow, (0, 0))
            if flow.packets > packets:
                self._count(attribution, flow.packets - packets, max(flow.bytes - size, 0))
        self._flow_counts = counts
        self._attribution = kept
        ports = self.topology.ports
        self.ports = {k: v for k, v in self.ports.items() if k in ports}
        self.devices = {
            k: v for k, v in self.devices.items() if self.topology.get(k[0], k[1]) is not None
        }
        self.chains = {k: v for k, v in self.chains.items() if k in self.topology.chains}
        # Rules are counted by where they sit; only stored rules are reported (by id). The
        # index is rebuilt only when the topology changed.
        if self._rule_ids_revision != self.topology.revision:
            self._rule_ids_revision = self.topology.revision
            self.rule_ids = {
                (str(getattr(rule, "chain_id", "")), int(getattr(rule, "position", -1))): rule.id
                for rule in self.topology.loaded("rule")  # rules of unused chains: no hits
            }
        self.rule_hits = {k: v for k, v in self.rule_hits.items() if k in self.rule_ids}

    def report(self) -> dict[str, Any]:
        """The JSON-able report the agent publishes (and the API sums)."""
        return {
            "ports": {port_id: c.as_dict() for port_id, c in sorted(self.ports.items())},
            "devices": {
                object_id: {"kind": kind, "packets": t.packets, "bytes": t.bytes}
                for (kind, object_id), t in sorted(self.devices.items())
            },
            "chains": {
                chain_id: {"packets": t.packets, "bytes": t.bytes}
                for chain_id, t in sorted(self.chains.items())
            },
            "rules": {
                self.rule_ids[key]: {"chain": key[0], "hits": hits}
                for key, hits in sorted(self.rule_hits.items())
                if key in self.rule_ids
            },
            "drops": dict(sorted(self.drops.items())),
        }


class HostStatsReporter:
    """Scans `stats` and publishes its report every `interval` seconds, when it changed."""

    def __init__(
        self,
        host_id: str,
        stats: HostStats,
        *,
        publish: Callable[[str, bytes], None],
        interval: float = 2.0,
    ) -> None:
        self.host_id = host_id
        self.stats = stats
        self.publish = publish
        self.interval = interval
        self._published: bytes | None = None

    def tick(self) -> None:
        self.stats.scan()
        value = json.dumps(self.stats.report(), sort_keys=True, separators=(",", ":")).encode()
        if value != self._published:
            self._published = value
            self.publish(host_stats_key(self.host_id), value)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.tick()
            except Exception:  # the loop must survive a bug in one scan
                log.exception("host %s: traffic stats scan failed", self.host_id)


# ---------------------------------------------------------------------------- Prometheus


def _tenant_of(topology: TopologyView, kind: str, object_id: str) -> str:
    obj = topology.get(kind, object_id)
    return str(getattr(obj, "tenant_id", "") or "")


class AgentCollector(Collector):
    """The agent's metrics, read at scrape time (nothing is kept twice). Labels: `host`
    always; `tenant`, `device`/`port`/`chain` ids of objects in the topology view (so the
    series set is bounded by the topology); `reason` capped at `MAX_DROP_REASONS`."""

    def __init__(self, agent: HostAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent, host = self.agent, self.agent.host_id
        topology = agent.topology
        stats = agent.host_stats
        port_labels = ["host", "tenant", "device", "port"]
        families = {
            name: CounterMetricFamily(f"hivenet_port_{name}", help_text, labels=port_labels)
            for name, help_text in (
                ("rx_packets", "Packets entering the overlay at a port (counted at ingress)"),
                ("rx_bytes", "Bytes entering the overlay at a port"),
                ("tx_packets", "Packets the simulations on this host sent out of a port"),
                ("tx_bytes", "Bytes the simulations on this host sent out of a port"),
                ("drops", "Packets from a port that the simulation dropped"),
            )
        }
        for port_id, counters in stats.ports.items():
            device = str(getattr(topology.get("port", port_id), "device_id", "") or "")
            labels = [host, _tenant_of(topology, "port", port_id), device, port_id]
            for name, value in counters.as_dict().items():
                families[name].add_metric(labels, value)
        yield from families.values()
        device_packets = CounterMetricFamily(
            "hivenet_device_packets",
            "Packets simulated or forwarded through a device",
            labels=["host", "tenant", "kind", "device"],
        )
        device_bytes = CounterMetricFamily(
            "hivenet_device_bytes",
            "Bytes simulated or forwarded through a device",
            labels=["host", "tenant", "kind", "device"],
        )
        for (kind, object_id), traffic in stats.devices.items():
            labels = [host, _tenant_of(topology, kind, object_id), kind, object_id]
            device_packets.add_metric(labels, traffic.packets)
            device_bytes.add_metric(labels, traffic.bytes)
        yield device_packets
        yield device_bytes
        chain_hits = CounterMetricFamily(
            "hivenet_chain_hits",
            "Packets evaluated by a rule chain",
            labels=["host", "tenant", "chain"],
        )
        for chain_id, traffic in stats.chains.items():
            chain_hits.add_metric(
                [host, _tenant_of(topology, "chain", chain_id), chain_id], traffic.packets
            )
        yield chain_hits
        rule_hits = CounterMetricFamily(
            "hivenet_rule_hits",
            "Packets a stored rule matched",
            labels=["host", "tenant", "chain", "rule"],
        )
        for key, hits in stats.rule_hits.items():
            rule_id = stats.rule_ids.get(key)
            if rule_id is not None:
                tenant = _tenant_of(topology, "rule", rule_id)
                rule_hits.add_metric([host, tenant, key[0], rule_id], hits)
        yield rule_hits
        drops = CounterMetricFamily(
            "hivenet_drops",
            "Packets dropped by the simulation, by reason",
            labels=["host", "reason"],
        )
        for reason, count in stats.drops.items():
            drops.add_metric([host, reason], count)
        yield drops
        yield from self._pipeline(host)
        yield from self._flowstate(host)
        yield from self._load_balancers(host)

    def _pipeline(self, host: str) -> Iterator[Metric]:
        pipeline = self.agent.pipeline.stats
        for name, value, help_text in (
            ("upcalls", pipeline.upcalls, "Packets that missed the flow table"),
            ("flow_installs", pipeline.installs, "Megaflows installed"),
            ("learned_entries", pipeline.learned, "MAC/ARP entries learned"),
            ("generated_packets", pipeline.generated, "Packets the simulation generated"),
            (
                "connection_replays",
                pipeline.replayed,
                "Upcalls answered by a connection template instead of a simulation",
            ),
            (
                "connection_replays_declined",
                pipeline.replay_declined,
                "Upcalls a connection template matched but whose flow-state answers differed "
                "from it (simulated instead)",
            ),
        ):
            family = CounterMetricFamily(f"hivenet_{name}", help_text, labels=["host"])
            family.add_metric([host], value)
            yield family
        seconds = CounterMetricFamily(
            "hivenet_simulation_seconds", "Time spent simulating upcalls", labels=["host"]
        )
        seconds.add_metric([host], pipeline.sim_seconds_total)
        yield seconds
        datapath = self.agent.datapath.counters()
        flows = GaugeMetricFamily("hivenet_flows", "Installed megaflows", labels=["host"])
        flows.add_metric([host], datapath.get("flows", 0))
        yield flows
        datapath_drops = CounterMetricFamily(
            "hivenet_datapath_drops",
            "Frames the datapath dropped, by reason: malformed frames, bad tunnel headers, "
            "installed drop flows (flow_<reason>), too big, full sockets (the backend's "
            "`drop.<reason>` counters)",
            labels=["host", "reason"],
        )
        for reason, dropped in _datapath_drop_reasons(datapath).items():
            datapath_drops.add_metric([host, reason], dropped)
        yield datapath_drops
        port_drops = {
            name: CounterMetricFamily(
                f"hivenet_port_{name}", help_text, labels=["host", "tenant", "device", "port"]
            )
            for name, help_text in (
                (
                    "upcall_budget_drops",
                    "Frames from a port that missed the flow table beyond the port's upcall "
                    "budget (dropped unsimulated)",
                ),
                (
                    "rx_kernel_drops",
                    "Frames from a port the kernel dropped: its socket was full (a flood held "
                    "to its turns)",
                ),
            )
        }
        topology = self.agent.topology
        for port_id, (key, _interface) in self.agent.bound_ports.items():
            device = str(getattr(topology.get("port", port_id), "device_id", "") or "")
            labels = [host, _tenant_of(topology, "port", port_id), device, port_id]
            for name, family in port_drops.items():
                count = datapath.get(f"port.{key}.{name}")
                if count is not None:
                    family.add_metric(labels, count)
        yield from port_drops.values()
        ports = GaugeMetricFamily("hivenet_bound_ports", "Ports bound here", labels=["host"])
        ports.add_metric([host], len(self.agent.bound_ports))
        yield ports
        overflow = CounterMetricFamily(
            "hivenet_stats_attribution_overflow",
            "Flows installed while the attribution table was full (their hits go uncounted)",
            labels=["host"],
        )
        overflow.add_metric([host], self.agent.host_stats.attribution_overflow)
        yield overflow

    def _flowstate(self, host: str) -> Iterator[Metric]:
        flowstate = self.agent.flowstate
        entries = GaugeMetricFamily(
            "hivenet_flowstate_entries", "Entries of a flow-state table", labels=["host", "table"]
        )
        entries.add_metric([host, "conntrack"], len(flowstate.conntrack))
        entries.add_metric([host, "nat"], len(flowstate.nat))
        yield entries
        limit = GaugeMetricFamily(
            "hivenet_flowstate_max_entries",
            "Entries a flow-state table may hold (0: unbounded)",
            labels=["host", "table"],
        )
        limit.add_metric([host, "conntrack"], flowstate.conntrack.max_entries or 0)
        limit.add_metric([host, "nat"], flowstate.nat.max_entries or 0)
        yield limit
        evicted = CounterMetricFamily(
            "hivenet_flowstate_evicted",
            "Entries a full flow-state table evicted to make room (half_open: TCP handshake "
            "not done, datagram never answered, NAT binding never used again)",
            labels=["host", "table", "kind"],
        )
        evicted.add_metric([host, "conntrack", "half_open"], flowstate.conntrack.evicted_half_open)
        evicted.add_metric([host, "conntrack", "other"], flowstate.conntrack.evicted_other)
        evicted.add_metric([host, "nat", "half_open"], flowstate.nat.evicted_unused)
        evicted.add_metric([host, "nat", "other"], flowstate.nat.evicted_other)
        yield evicted

    def _load_balancers(self, host: str) -> Iterator[Metric]:
        reports = {
            lb_id: json.loads(value) for lb_id, value in self.agent.lb_stats.published.items()
        }
        labels = ["host", "tenant", "load_balancer", "member"]
        families = {
            name: (GaugeMetricFamily if name == "active_connections" else CounterMetricFamily)(
                f"hivenet_lb_member_{name}", help_text, labels=labels
            )
            for name, help_text in (
                ("active_connections", "Live connections this host originated to a member"),
                ("total_connections", "Connections this host originated to a member"),
                ("bytes_in", "Client-to-member bytes counted on this host"),
                ("bytes_out", "Member-to-client bytes counted on this host"),
            )
        }
        for lb_id, report in reports.items():
            tenant = _tenant_of(self.agent.topology, "load_balancer", lb_id)
            for member_id, member in report.get("members", {}).items():
                for name, family in families.items():
                    family.add_metric([host, tenant, lb_id, member_id], member.get(name, 0))
        yield from families.values()


def agent_registry(agent: HostAgent) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    return registry


async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int
) -> asyncio.AbstractServer:
    """A minimal HTTP server for `GET /metrics` on the event loop's thread (the collector
    reads the agent's state, which only that thread changes)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5.0):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                body = generate_latest(registry)
                head = f"HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
            else:
                body = b"only GET /metrics here\n"
                head = "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(
                f"{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port)
