"""Trace requests an agent honours: `TraceRequests`, one per agent.

A trace request is a store key `/hivenet/v1/state/<host>/trace_request/<id>` (`<host>`: the
host of the port it is about) written by the API server on a lease of the request's TTL, so it
expires by itself. The agent's state watch hands it here; the answer is published under
`/hivenet/v1/state/<host>/trace_result/<id>` on the agent's lease and withdrawn when the
request goes. Two modes:
- `synthetic`: simulate a packet (sim/tracing.py's spec) from the port against this agent's
  topology, tables AND live flow state (conntrack/NAT: a return packet of an open connection
  is traced as such), side-effect free: the flow-state transaction is rolled back, learned
  entries are not applied, no flow is installed. Answered at once.
- `live`: record the trace of the next `count` real upcalls from the port whose ingress
  headers match `match` (FlowMatch field -> int). Each record keeps the key of the flow it
  installed; every publication reads that flow's hit counters from the flow table, so it
  shows whether later packets took the datapath's flow (`flow.installed`, `packets`,
  `bytes`).

Bounded: at most `max_live` live requests at once per agent (others are answered
`rejected`), `count` at most `MAX_LIVE_COUNT`, a record's steps at most `MAX_STEPS`. The
upcall path pays one dict lookup when no live trace is active on the port.
Must not change flows, tables or flow state (reads only).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hivenet.agent.flowstate_sync import FlowStateSync
from hivenet.flows.table import Flow
from hivenet.packets.flowmatch import FIELD_NAMES
from hivenet.sim import SimContext, SimulationResult, TablesView, TopologyView
from hivenet.sim.tracing import (
    TraceSpec,
    TraceSpecError,
    build_trace_frame,
    resolve_spec,
    trace_report,
    trace_simulation,
)
from hivenet.store.keys import trace_result_key

log = logging.getLogger(__name__)

MAX_LIVE_COUNT = 100
MAX_LIVE_PER_AGENT = 8
MAX_STEPS = 200
FlowKey = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(slots=True)
class LiveTrace:
    trace_id: str
    port_id: str
    match: dict[int, int]  # FlowMatch field index -> value
    count: int
    records: list[dict[str, Any]] = field(default_factory=list)
    flow_keys: list[FlowKey | None] = field(default_factory=list)

    def wants(self, values: tuple[int, ...]) -> bool:
        return len(self.records) < self.count and all(
            values[index] == value for index, value in self.match.items()
        )


class TraceRequests:
    """This host's answers to trace requests (rules in the module docstring)."""

    def __init__(
        self,
        host_id: str,
        topology: TopologyView,
        tables: TablesView,
        flowstate: FlowStateSync | None,
        flows: Callable[[], list[Flow]],
        *,
        publish: Callable[[str, bytes], None],
        unpublish: Callable[[str], None],
        clock: Callable[[], float],
        max_live: int = MAX_LIVE_PER_AGENT,
    ) -> None:
        self.host_id = host_id
        self.topology = topology
        self.tables = tables
        self.flowstate = flowstate
        self.flows = flows
        self.publish = publish
        self.unpublish = unpublish
        self.clock = clock
        self.max_live = max_live
        self.live: dict[str, LiveTrace] = {}
        self._live_by_port: dict[str, list[LiveTrace]] = {}
        self._answered: set[str] = set()
        self._last_published: dict[str, bytes] = {}
        self.rejected = 0

    # ---------------------------------------------------------------- requests

    def on_request(self, trace_id: str, value: bytes | None) -> None:
        """A request key of this host appeared (value) or went (None: expired, deleted)."""
        if value is None:
            self._forget(trace_id)
            return
        if trace_id in self._answered or trace_id in self.live:
            return
        try:
            request = json.loads(value)
            mode = request["mode"]
            port_id = request["port"]
        except (ValueError, KeyError, TypeError) as exc:
            self._answer(trace_id, {"status": "error", "error": f"bad request: {exc}"})
            return
        if port_id not in self.topology.ports:
            self._answer(trace_id, {"status": "error", "error": f"no port {port_id} here"})
        elif mode == "synthetic":
            self._answer(trace_id, self._synthetic(port_id, request.get("spec", {})))
        elif mode == "live":
            self._start_live(trace_id, port_id, request)
        else:
            self._answer(trace_id, {"status": "error", "error": f"unknown mode {mode!r}"})

    def _answer(self, trace_id: str, body: Mapping[str, Any]) -> None:
        self._answered.add(trace_id)
        value = json.dumps({"host": self.host_id, **body}, sort_keys=True).encode()
        if self._last_published.get(trace_id) != value:
            self._last_published[trace_id] = value
            self.publish(trace_result_key(self.host_id, trace_id), value)

    def _forget(self, trace_id: str) -> None:
        live = self.live.pop(trace_id, None)
        if live is not None:
            traces = self._live_by_port.get(live.port_id, [])
            traces[:] = [t for t in traces if t is not live]
            if not traces:
                self._live_by_port.pop(live.port_id, None)
        if trace_id in self._answered or live is not None:
            self._answered.discard(trace_id)
            self._last_published.pop(trace_id, None)
            self.unpublish(trace_result_key(self.host_id, trace_id))

    def _synthetic(self, port_id: str, spec_fields: Mapping[str, Any]) -> dict[str, Any]:
        try:
            spec = resolve_spec(self.topology, port_id, TraceSpec(**spec_fields))
            frame = build_trace_frame(spec)
        except (TraceSpecError, TypeError, ValueError) as exc:
            return {"status": "error", "error": str(exc)}
        hook = self.flowstate.begin(frame) if self.flowstate is not None else None
        context = SimContext(topology=self.topology, tables=self.tables, local_host_id=self.host_id)
        result = trace_simulation(frame, port_id, context, self.clock(), hook)
        return {"status": "done", "trace": self._report(result, port_id)}

    def _report(self, result: SimulationResult, port_id: str) -> dict[str, Any]:
        extra = {"simulated_by": "agent", "flow_state": "live", "revision": self.topology.revision}
        return trace_report(result, self.topology, port_id, self.host_id, extra=extra)

    def _start_live(self, trace_id: str, port_id: str, request: Mapping[str, Any]) -> None:
        if len(self.live) >= self.max_live:
            self.rejected += 1
            self._answer(
                trace_id,
                {
                    "status": "rejected",
                    "error": f"{self.max_live} live traces already on {self.host_id}",
                },
            )
            return
        try:
            count = int(request.get("count", 1))
            match = {
                FIELD_NAMES.index(name): int(value)
                for name, value in request.get("match", {}).items()
            }
        except (ValueError, TypeError) as exc:
            self._answer(trace_id, {"status": "error", "error": f"bad match: {exc}"})
            return
        live = LiveTrace(trace_id, port_id, match, max(1, min(count, MAX_LIVE_COUNT)))
        self.live[trace_id] = live
        self._live_by_port.setdefault(port_id, []).append(live)
        self._answered.add(trace_id)
        self._publish_live(live)

    # ---------------------------------------------------------------- upcalls

    def on_simulated(
        self, port_id: str, result: SimulationResult, _size: int, installed: FlowKey | None
    ) -> None:
        traces = self._live_by_port.get(port_id)
        if not traces:
            return
        values = result.match.as_tuple()
        for live in traces:
            if live.wants(values):
                report = self._report(result, port_id)
                report["steps"] = report["steps"][:MAX_STEPS]
                live.records.append(report)
                live.flow_keys.append(installed)
                self._publish_live(live)

    def _flow_hits(self, key: FlowKey | None, flows: Mapping[FlowKey, Flow]) -> dict[str, Any]:
        flow = flows.get(key) if key is not None else None
        if flow is None:
            return {"installed": False, "packets": 0, "bytes": 0}
        return {"installed": True, "packets": flow.packets, "bytes": flow.bytes}

    def _publish_live(self, live: LiveTrace, flows: Mapping[FlowKey, Flow] | None = None) -> None:
        if flows is None:
            flows = self._flows_by_key() if any(live.flow_keys) else {}
        records = [
            {**record, "flow": self._flow_hits(key, flows)}
            for record, key in zip(live.records, live.flow_keys, strict=True)
        ]
        status = "done" if len(records) >= live.count else "waiting"
        self._answer(
            live.trace_id,
            {"status": status, "mode": "live", "count": live.count, "records": records},
        )

    def _flows_by_key(self) -> dict[FlowKey, Flow]:
        return {(flow.match, flow.mask): flow for flow in self.flows()}

    def tick(self) -> None:
        """Refresh the flow hit counters of live traces with records (periodic)."""
        active = [live for live in self.live.values() if any(live.flow_keys)]
        if not active:
            return
        flows = self._flows_by_key()
        for live in active:
            self._publish_live(live, flows)

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.tick()
            except Exception:  # the loop must survive a bug in one pass
                log.exception("host %s: live trace refresh failed", self.host_id)
