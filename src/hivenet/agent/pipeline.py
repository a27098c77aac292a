"""`FlowPipeline`: the agent's upcall handler logic, independent of how upcalls arrive.

Owns what happens to a packet that missed the datapath's flow table: look up the ingress
port by tunnel key, simulate, hand learned MAC/ARP entries to the `on_learned` callback
(which publishes them and invalidates their tags on every host) BEFORE installing the flow
(the simulation already saw its own learned entries, so the flow stays valid), install the
megaflow unless the result says not to, execute the packet and every generated packet, and
count upcalls, installs, drops by reason and simulation latency; then tell `on_simulated`
(the agent's traffic counters, agent/metrics.py) what the upcall became.
Does not own the topology cache, the shared tables or the datapath: they are passed in.

Connection templates (stateful pipelines, `templates=True`): a result that opened a connection
and may be replayed (`sim/replay.py`) becomes a template once its flow is installed; a later
upcall whose match equals it under its logic mask gets its result by asking the template's
flow-state questions again instead of walking the topology (counted as `replayed`; an answer
of another shape rolls the questions back and simulates, `replay_declined`). A template lasts
while a flow carrying all its tags other than its connection's is installed: its own, or the
newest one replayed from it (`Flow.removed`: any invalidation of what it depends on removes
that flow). Bounded: MAX_TEMPLATE_MASKS masks per ingress port, MAX_TEMPLATES templates (all
dropped when full).

Batches (`with pipeline.batch():` around a run of upcalls, as a datapath drains a receive
batch): each upcall is simulated and its flow state committed at once, but the new entries
are pushed together at the end (`FlowStateSync.end_batch`: one message per peer, not one per
connection), and only then are the batch's results applied in order (learned entries, flow,
packet), so a peer still has a connection's state before its first packet. A result whose
flow tags a later upcall of the batch invalidated (e.g. it cached "no connection" and a later
packet opened it), or that carries the tag of an entry an earlier result of the batch learned
(it was simulated before that entry reached the tables: a MAC that moved), is executed but
not installed, as the per-upcall order would have removed the flow right after installing it
or simulated it afresh (and no template is made or kept alive by it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import and_
from typing import TYPE_CHECKING, Any

from hivenet.datapath.base import Datapath
from hivenet.flows.table import Flow, Tag, flow_match_values
from hivenet.model.subnet import DEFAULT_UNDERLAY_MTU
from hivenet.packets import FlowMatch, PacketError, extract_flow_match
from hivenet.sim import (
    NO_FLOW_STATE,
    FlowStateHook,
    LearnedEntry,
    SimContext,
    SimulationResult,
    TablesView,
    TopologyView,
    simulate,
)
from hivenet.sim.dhcp import DhcpBudget
from hivenet.sim.flowstate_hook import ConntrackDecision, NatDecision
from hivenet.sim.replay import ConnectionTemplate, masked
from hivenet.sim.rules import CompiledRule
from hivenet.sim.topology import PortInfo

if TYPE_CHECKING:
    from hivenet.agent.flowstate_sync import FlowStateSync

LearnedCallback = Callable[[Sequence[LearnedEntry]], None]
# How often the DHCP budget forgets ports that went quiet (it holds one entry per port).
DHCP_BUDGET_SWEEP_UPCALLS = 4096
# (ingress port id, result, frame length, installed flow key (match, mask) or None) after
# each simulated upcall (traffic counters).
FlowKey = tuple[tuple[int, ...], tuple[int, ...]]
SimulatedCallback = Callable[[str, SimulationResult, int, FlowKey | None], None]
# (service, ingress port, frame) for a packet the simulation handed to a host service
# (`SimulationResult.handoff`, e.g. "metadata": agent/metadata.py).
HandoffCallback = Callable[[str, PortInfo, bytes], None]


MAX_TEMPLATE_MASKS = 8  # per ingress port: each is tried on every upcall of the port
MAX_TEMPLATES = 4096


class ConnectionTemplates:
    """The pipeline's connection templates: by ingress port (every logic mask holds it
    whole), then by logic mask, then by the match under it, each with the installed flow
    that keeps it valid (see the module docstring)."""

    __slots__ = ("_by_port", "count")

    def __init__(self) -> None:
        # in_port -> logic mask -> masked match -> [template, carrier flow]
        self._by_port: dict[int, dict[tuple[int, ...], dict[tuple[int, ...], list[Any]]]] = {}
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def find(self, match: FlowMatch) -> ConnectionTemplate | None:
        """The valid template `match` equals under its logic mask, if any."""
        masks = self._by_port.get(match.in_port)
        if masks is None:
            return None
        values = flow_match_values(match)
        for mask, table in masks.items():
            key = tuple(map(and_, values, mask))
            entry = table.get(key)
            if entry is None:
                continue
            if entry[1].removed:
                del table[key]
                self.count -= 1
                continue
            template: ConnectionTemplate = entry[0]
            return template
        return None

    def installed(self, result: SimulationResult, flow: Flow) -> None:
        """`result`'s flow was installed: a simulated result becomes a template, a replayed
        one's flow keeps its template valid from now on."""
        record = result.replay
        if record is None:
            return
        logic_mask, questions = record
        masks = self._by_port.get(result.match.in_port)
        table = masks.get(logic_mask) if masks is not None else None
        key = masked(result.match, logic_mask)
        if not questions:  # replayed: carried by the newest of its flows
            entry = table.get(key) if table is not None else None
            if entry is not None and entry[0].static_tags <= result.tags:
                entry[1] = flow
            return
        template = ConnectionTemplate.of(result)
        if template is None:
            return
        if self.count >= MAX_TEMPLATES and (table is None or key not in table):
            self.clear()
            masks = table = None
        if masks is None:
            masks = self._by_port[result.match.in_port] = {}
        if table is None:
            if len(masks) >= MAX_TEMPLATE_MASKS:
                for stale in [mask for mask, held in masks.items() if not held]:
                    del masks[stale]
                if len(masks) >= MAX_TEMPLATE_MASKS:
                    return
            table = masks[logic_mask] = {}
        if key not in table:
            self.count += 1
        table[key] = [template, flow]

    def clear(self) -> None:
        self._by_port.clear()
        self.count = 0


class _UpcallFlowState:
    """The flow-state hook of the upcall being simulated (`FlowStateSync.begin` makes one
    per upcall) behind one object, so the simulation context that carries it is built once
    instead of copied per upcall. `hook` is `NO_FLOW_STATE` between upcalls."""

    __slots__ = ("hook",)

    def __init__(self) -> None:
        self.hook: FlowStateHook = NO_FLOW_STATE

    def conntrack(self, packet: FlowMatch, zone: str, now: float) -> ConntrackDecision:
        return self.hook.conntrack(packet, zone, now)

    def nat(self, packet: FlowMatch, rule: CompiledRule, zone: str, now: float) -> NatDecision:
        return self.hook.nat(packet, rule, zone, now)


@dataclass(slots=True)
class PipelineStats:
    upcalls: int = 0
    unknown_port: int = 0
    installs: int = 0
    not_installed: int = 0
    generated: int = 0
    learned: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    # Upcalls answered by a connection template, and those whose answers differed from it.
    replayed: int = 0
    replay_declined: int = 0
    sim_seconds_total: float = 0.0
    sim_seconds_max: float = 0.0

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {
            "upcalls": self.upcalls,
            "unknown_port": self.unknown_port,
            "installs": self.installs,
            "not_installed": self.not_installed,
            "generated": self.generated,
            "learned": self.learned,
            "replayed": self.replayed,
            "replay_declined": self.replay_declined,
            "sim_seconds_total": self.sim_seconds_total,
            "sim_seconds_max": self.sim_seconds_max,
            "sim_seconds_mean": self.sim_seconds_total / self.upcalls if self.upcalls else 0.0,
        }
        for reason, count in sorted(self.drops.items()):
            out[f"drop.{reason}"] = count
        return out


class FlowPipeline:
    """Upcall handler for one host. Register it with `datapath.set_upcall_handler(pipeline.
    handle_upcall)` (the constructor does it)."""

    def __init__(
        self,
        host_id: str,
        datapath: Datapath,
        topology: TopologyView,
        tables: TablesView,
        *,
        on_learned: LearnedCallback | None = None,
        flow_state: FlowStateHook = NO_FLOW_STATE,
        stateful: FlowStateSync | None = None,
        on_simulated: SimulatedCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
        timer: Callable[[], float] = time.perf_counter,
        underlay_mtu: int = DEFAULT_UNDERLAY_MTU,
        templates: bool = True,
    ) -> None:
        self.host_id = host_id
        self.datapath = datapath
        self.topology = topology
        # DHCP is answered per message (never cached): a per-port budget bounds a flood.
        self.dhcp_budget = DhcpBudget()
        self.context = SimContext(
            topology=topology,
            tables=tables,
            local_host_id=host_id,
            flow_state=flow_state,
            underlay_mtu=underlay_mtu,
            dhcp_budget=self.dhcp_budget,
            record_questions=stateful is not None and templates,
        )
        self.on_learned = on_learned
        self.on_handoff: HandoffCallback | None = None
        # Conntrack/NAT: a transaction per upcall, committed and pushed before forwarding.
        self.stateful = stateful
        # Connection templates (None: every upcall is simulated).
        self.templates = ConnectionTemplates() if stateful is not None and templates else None
        self.on_simulated = on_simulated
        self.clock = clock
        self.timer = timer
        self.stats = PipelineStats()
        self.last_result: SimulationResult | None = None
        # Inside `batch()`: (port, result, frame, position in the batch's invalidation log).
        self._deferred: list[tuple[PortInfo, SimulationResult, bytes, int]] | None = None
        self._invalidated: list[frozenset[Tag]] = []
        # `context` with the current upcall's flow-state hook, rebuilt only when `context`
        # is replaced (`set_handoff`): (the context it was made from, the copy).
        self._upcall_flow_state = _UpcallFlowState()
        self._stateful_context: tuple[SimContext, SimContext] | None = None
        datapath.set_upcall_handler(self.handle_upcall)

    def _context_for_upcall(self) -> SimContext:
        """`self.context` with `_upcall_flow_state` as its hook (made once per `context`)."""
        made = self._stateful_context
        if made is None or made[0] is not self.context:
            made = self._stateful_context = (
                self.context,
                dataclasses.replace(self.context, flow_state=self._upcall_flow_state),
            )
        return made[1]

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Upcalls inside are applied together at the end, after one flow-state push per
        peer (see the module docstring). Nested batches are one batch."""
        if self._deferred is not None:
            yield
            return
        self._deferred = []
        self._invalidated = self.stateful.begin_batch() if self.stateful is not None else []
        try:
            yield
        finally:
            deferred, self._deferred = self._deferred, None
            invalidated = self._invalidated
            if self.stateful is not None:
                self.stateful.end_batch(self.clock())
            # Entries learned by results applied before: a result simulated before they
            # reached the tables may depend on what they replace (a MAC that moved).
            learned: set[Tag] = set()
            for port, result, frame, position in deferred:
                later = invalidated[position:]
                stale = (
                    bool(later) and any(not tags.isdisjoint(result.tags) for tags in later)
                ) or (bool(learned) and not learned.isdisjoint(result.tags))
                self._complete(port, result, frame, install=not stale)
                learned.update(entry.tag for entry in result.learned)

    def handle_upcall(self, port_key: int, frame: bytes) -> None:
        self.stats.upcalls += 1
        port = self.topology.port_by_key(port_key)
        if port is None:
            self.stats.unknown_port += 1
            self._count_drop("unknown_port_key")
            return
        started = self.timer()
        now = self.clock()
        if self.stats.upcalls % DHCP_BUDGET_SWEEP_UPCALLS == 0:
            self.dhcp_budget.forget_idle(now)
        try:  # parse once; a malformed frame is simulate()'s to count and drop
            match: FlowMatch | None = extract_flow_match(frame, port_key)
        except PacketError:
            match = None
        if self.stateful is None:
            result = simulate(frame, port.id, self.context, now, match=match)
        else:
            hook = self.stateful.begin(frame, match)
            replayed = None
            templates = self.templates
            if templates is not None and match is not None and templates.count:
                template = templates.find(match)
                if template is not None:
                    try:
                        replayed = template.replay(hook, match, frame, now)
                    except Exception:
                        hook.transaction.rollback()
                        raise
                    if replayed is None:
                        self.stats.replay_declined += 1
                        hook.transaction.rollback()
                        hook = self.stateful.again(hook)
            if replayed is not None:
                self.stats.replayed += 1
                self.stateful.finish(hook, replayed, port.id, now)
                self._after_simulation(port, replayed, frame, started)
                return
            current: _UpcallFlowState | None = None
            if self._upcall_flow_state.hook is NO_FLOW_STATE:
                current = self._upcall_flow_state
                current.hook = hook
                context = self._context_for_upcall()
            else:  # an upcall inside a simulation (never seen): a context of its own
                context = dataclasses.replace(self.context, flow_state=hook)
            try:
                result = simulate(frame, port.id, context, now, match=match)
            except Exception:
                # NAT bindings enter the table during the simulation: never leak them.
                hook.transaction.rollback()
                raise
            finally:
                if current is not None:
                    current.hook = NO_FLOW_STATE  # holds no transaction between upcalls
            self.stateful.finish(hook, result, port.id, now)
        self._after_simulation(port, result, frame, started)

    def _after_simulation(
        self, port: PortInfo, result: SimulationResult, frame: bytes, started: float
    ) -> None:
        elapsed = self.timer() - started
        self.stats.sim_seconds_total += elapsed
        self.stats.sim_seconds_max = max(self.stats.sim_seconds_max, elapsed)
        self.last_result = result
        if self._deferred is not None:
            self._deferred.append((port, result, frame, len(self._invalidated)))
            return
        self._complete(port, result, frame)

    def _complete(
        self, port: PortInfo, result: SimulationResult, frame: bytes, *, install: bool = True
    ) -> None:
        installed = self.apply(result, frame, install=install)
        if result.handoff is not None and self.on_handoff is not None:
            self.on_handoff(result.handoff, port, frame)
        if self.on_simulated is not None:
            self.on_simulated(port.id, result, len(frame), installed)

    def apply(
        self, result: SimulationResult, frame: bytes, *, install: bool = True
    ) -> FlowKey | None:
        """Act on a simulation result for `frame` (learned entries, flow, packet, replies);
        returns the key (match, mask) of the flow installed, if any. `install=False`: the
        packet only (the flow went stale before it could be installed)."""
        installed: FlowKey | None = None
        if result.learned:
            self.stats.learned += len(result.learned)
            if self.on_learned is not None:
                self.on_learned(result.learned)
        if result.install and install:
            installed = (result.masked_match, result.mask)
            flow = self.datapath.install_flow(
                installed[0],
                installed[1],
                result.actions,
                result.tags,
                idle_timeout=result.idle_timeout,
                mtu=result.mtu,
            )
            self.stats.installs += 1
            if flow is not None and self.templates is not None and result.replay is not None:
                self.templates.installed(result, flow)
        else:
            self.stats.not_installed += 1
        if result.drop_reason is not None:
            self._count_drop(result.drop_reason)
        self.datapath.execute(result.frame or frame, result.actions)
        for packet in result.generated:
            self.stats.generated += 1
            self.datapath.execute(packet.frame, packet.actions)
        return installed

    def set_handoff(self, callback: HandoffCallback | None, *, metadata: bool = True) -> None:
        """Who takes packets for host services (None: the host runs none); `metadata`: whether
        the metadata service is one of them. Set it before ports are bound: flows simulated
        without it do not tell the services' packets apart."""
        self.on_handoff = callback
        self.context = dataclasses.replace(self.context, metadata=callback is not None and metadata)

    def counters(self) -> dict[str, float]:
        return self.stats.as_dict()

    def _count_drop(self, reason: str) -> None:
        self.stats.drops[reason] = self.stats.drops.get(reason, 0) + 1
