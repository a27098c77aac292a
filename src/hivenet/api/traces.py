"""`POST /v1/traces` (a synthetic packet from a port, no side effect) and live traces
(`POST /v1/traces/live`, `GET /v1/traces/live/{id}`: the next real packets from a port).

Where a synthetic trace is simulated: by default (`via: api`) here, from the store (topology,
learned MAC/ARP tables, host liveness, the ingress host's NAT port blocks; sim/tracing.py does
the simulating and the report): it works with no agent reachable and costs the agents
nothing, but cannot see the ingress agent's in-memory conntrack and NAT bindings, so the
packet is traced as the first packet of a new connection (`flow_state: "fresh"`). `via:
agent` writes a trace request the port's agent answers with its live flow state
(agent/tracing.py); 409 when the port's host is unknown or down, 504 when it does not answer.

Live traces are trace requests stored with a TTL (on a lease: they expire by itself) under the
port's host; at most `MAX_LIVE_PER_HOST` at once (429 beyond), `count` and TTL bounded.
Owns the request bodies (validated: 422 naming the field and value for impossible headers,
404 for an unknown or invisible port), loading a `TopologyView` and tables from the store
(cached per store revision), and the responses. Writes only trace requests (on their lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from hivenet.api.auth import Principal, authenticate
from hivenet.api.errors import ApiError, ErrorBody, detail
from hivenet.api.resources import API_PREFIX, get_repository
from hivenet.flowstate import ConntrackTable, FlowStateTransaction, NatTable
from hivenet.flowstate.portblocks import (
    NAT_BLOCK_PREFIX,
    PortBlockAllocator,
    PortBlockError,
    parse_block_key,
)
from hivenet.model import Port, TopologyObject, decode, parse_topology_key
from hivenet.model.topology import TOPOLOGY_PREFIX
from hivenet.model.types import mac_to_int
from hivenet.sim import MemoryTables, SimContext, TopologyView
from hivenet.sim.stateful import TransactionHook
from hivenet.sim.tables import LearnedMac, LearnedNeighbour
from hivenet.sim.tracing import (
    TraceSpec,
    TraceSpecError,
    build_trace_frame,
    resolve_spec,
    trace_report,
    trace_simulation,
)
from hivenet.store.base import KeyValue, Store
from hivenet.store.keys import (
    STATE_PREFIX,
    TABLES_PREFIX,
    TRACE_REQUEST_KIND,
    host_alive_key,
    parse_state_key,
    parse_table_key,
    trace_request_key,
    trace_result_key,
)
from hivenet.store.topology import NotFoundError, TopologyRepository

PAGE = 1000
LIVE_ID_SEPARATOR = "~"
MAX_LIVE_COUNT = 100
MAX_LIVE_TTL = 600
MAX_LIVE_PER_HOST = 8  # live requests at once per host (the agent enforces its own bound too)
AGENT_ANSWER_TIMEOUT = 5.0
REQUEST_LEASE_TTL = 30  # a synthetic request through an agent
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1}
MATCH_FIELDS = frozenset({"eth_src", "eth_dst", "ip_src", "ip_dst", "proto", "tp_src", "tp_dst"})


class TraceRequest(BaseModel):
    """A synthetic packet entering the overlay at `from_port`. Omitted headers default from
    the port: its MAC, its address of the destination's IP version, the MAC it would send
    to (the destination's port on the same bridge, else its gateway)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    from_port: str = Field(min_length=1, max_length=255)
    ip_dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    proto: Literal["tcp", "udp", "icmp", "arp"] = "tcp"
    ip_src: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    eth_src: str | None = Field(None, pattern=r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
    eth_dst: str | None = Field(None, pattern=r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
    src_port: int | None = Field(None, ge=0, le=65535)
    dst_port: int | None = Field(None, ge=0, le=65535)
    tcp_flags: str = Field("syn", max_length=40)
    vlan: int = Field(0, ge=0, le=4094)
    ttl: int = Field(64, ge=1, le=255)
    via: Literal["api", "agent"] = "api"

    def spec(self) -> TraceSpec:
        return TraceSpec(
            ip_dst=str(self.ip_dst),
            proto=self.proto,
            eth_src=self.eth_src,
            eth_dst=self.eth_dst,
            ip_src=str(self.ip_src) if self.ip_src is not None else None,
            src_port=self.src_port,
            dst_port=self.dst_port,
            tcp_flags=self.tcp_flags,
            vlan=self.vlan,
            ttl=self.ttl,
        )


class LiveTraceRequest(BaseModel):
    """Record the next `count` real upcalls from `port` whose headers match `match`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: str = Field(min_length=1, max_length=255)
    count: int = Field(1, ge=1, le=MAX_LIVE_COUNT)
    ttl: int = Field(60, ge=1, le=MAX_LIVE_TTL, description="seconds until it expires")
    match: dict[str, str] = Field(
        default_factory=dict,
        description=f"header -> value; headers: {', '.join(sorted(MATCH_FIELDS))}",
    )


class TraceStepBody(BaseModel):
    device_kind: str
    device_id: str
    device_name: str
    event: str
    detail: str
    depth: int


class TraceBody(BaseModel):
    """A trace: every step, where the packet leaves, the megaflow that would be installed."""

    model_config = ConfigDict(extra="allow")

    ingress_port: str
    ingress_host: str
    simulated_by: str
    flow_state: str
    revision: int
    packet: dict[str, str]
    steps: list[TraceStepBody]
    path: list[dict[str, str]]
    actions: list[str]
    egress: list[dict[str, Any]]
    drop_reason: str | None
    megaflow: dict[str, Any]
    tags: list[str]
    generated: list[dict[str, Any]]
    learned: list[str]


@dataclass
class StoreSnapshot:
    """What a simulation reads, as of one store revision."""

    revision: int
    view: TopologyView
    tables: MemoryTables
    nat_blocks: dict[str, list[tuple[str, bytes]]]  # host -> its NAT block keys
    topology_signature: tuple[tuple[str, int], ...] = ()  # (key, mod revision) of the view


async def _range_all(store: Store, prefix: str, revision: int) -> list[KeyValue]:
    out: list[KeyValue] = []
    start_after: str | None = None
    while True:
        page = await store.range(prefix, revision=revision, limit=PAGE, start_after=start_after)
        out.extend(page.kvs)
        if not page.more or not page.kvs:
            return out
        start_after = page.kvs[-1].key


def _apply_table(tables: MemoryTables, key: str, value: bytes) -> None:
    """Learn one MAC/ARP entry (other tables are not the simulation's to read)."""
    kind, owner_id, name, entry = parse_table_key(key)
    if kind == "bridge" and name == "mac":
        vlan_text, _, mac_text = entry.partition("/")
        tables.learn(LearnedMac(owner_id, int(vlan_text), mac_to_int(mac_text), value.decode()))
    elif kind == "router" and name == "arp":
        address = ipaddress.ip_address(entry)
        tables.learn(
            LearnedNeighbour(owner_id, address.version, int(address), mac_to_int(value.decode()))
        )


def _topology_view(kvs: list[KeyValue]) -> TopologyView:
    objects: list[TopologyObject] = []
    for kv in kvs:
        try:
            kind, _object_id = parse_topology_key(kv.key)
            objects.append(decode(kind, kv.value))
        except ValueError:
            continue  # the agents skip what no model accepts; so does a trace
    return TopologyView.from_objects(objects)


async def load_snapshot(store: Store, cached: StoreSnapshot | None = None) -> StoreSnapshot:
    """The store as a simulation reads it. The topology view of `cached` is reused when no
    topology key changed since (agents' publications move the revision all the time; only
    the tables and liveness are read again then)."""
    revision = await store.current_revision()
    topology = await _range_all(store, TOPOLOGY_PREFIX, revision)
    signature = tuple((kv.key, kv.mod_revision) for kv in topology)
    if cached is not None and cached.topology_signature == signature:
        view = cached.view
    else:
        view = _topology_view(topology)
    tables = MemoryTables()
    nat_blocks: dict[str, list[tuple[str, bytes]]] = {}
    for kv in await _range_all(store, TABLES_PREFIX, revision):
        if kv.key.startswith(NAT_BLOCK_PREFIX):  # value: the host holding the block
            nat_blocks.setdefault(kv.value.decode(errors="replace"), []).append((kv.key, kv.value))
            continue
        with contextlib.suppress(ValueError):
            _apply_table(tables, kv.key, kv.value)
    alive: set[str] = set()
    for kv in await _range_all(store, STATE_PREFIX, revision):
        try:
            host_id, kind, object_id = parse_state_key(kv.key)
        except ValueError:
            continue
        if kind == "host" and object_id == host_id:
            alive.add(host_id)
    hosts = {obj.id for obj in view.all("host")}
    hosts.update(p.host_id for p in view.ports.values() if p.host_id)
    for host_id in hosts:
        view.set_host_alive(host_id, host_id in alive)
    return StoreSnapshot(revision, view, tables, nat_blocks, signature)


class SnapshotCache:
    """The last snapshot, read again when the store revision moved (its topology view
    rebuilt only when a topology key changed)."""

    def __init__(self) -> None:
        self._snapshot: StoreSnapshot | None = None
        self._lock = asyncio.Lock()

    async def get(self, store: Store) -> StoreSnapshot:
        async with self._lock:
            current = await store.current_revision()
            if self._snapshot is None or self._snapshot.revision != current:
                self._snapshot = await load_snapshot(store, self._snapshot)
            return self._snapshot


def _fresh_hook(snapshot: StoreSnapshot, host_id: str) -> TransactionHook:
    """Empty conntrack and NAT tables holding the ingress host's NAT port blocks."""
    allocator = PortBlockAllocator(seed=zlib.crc32(host_id.encode()))
    for key, _value in snapshot.nat_blocks.get(host_id, []):
        try:
            allocator.add_block(parse_block_key(key))
        except PortBlockError:
            continue
    return TransactionHook(FlowStateTransaction(ConntrackTable(), NatTable(allocator), None))


def trace_in_snapshot(snapshot: StoreSnapshot, request: TraceRequest, now: float) -> dict[str, Any]:
    """Simulate the request's packet against `snapshot` (TraceSpecError for bad headers)."""
    view = snapshot.view
    port = view.ports[request.from_port]
    host_id = port.host_id or ""
    spec = resolve_spec(view, request.from_port, request.spec())
    frame = build_trace_frame(spec)
    context = SimContext(topology=view, tables=snapshot.tables, local_host_id=host_id)
    result = trace_simulation(
        frame, request.from_port, context, now, _fresh_hook(snapshot, host_id)
    )
    return trace_report(
        result,
        view,
        request.from_port,
        host_id,
        extra={"simulated_by": "api", "flow_state": "fresh", "revision": snapshot.revision},
    )


def parse_match(match: dict[str, str]) -> dict[str, int]:
    """Live-trace match (header -> text) as FlowMatch field -> int; ApiError 422 naming the
    header otherwise."""
    out: dict[str, int] = {}
    for name, text in match.items():
        try:
            if name not in MATCH_FIELDS:
                raise ValueError(
                    f"unknown header; expected one of {', '.join(sorted(MATCH_FIELDS))}"
                )
            if name in ("eth_src", "eth_dst"):
                out[name] = mac_to_int(text)
            elif name in ("ip_src", "ip_dst"):
                out[name] = int(ipaddress.ip_address(text))
            elif name == "proto":
                out["ip_proto"] = PROTOCOL_NUMBERS[text] if text in PROTOCOL_NUMBERS else int(text)
                if not 0 <= out["ip_proto"] <= 255:
                    raise ValueError("must be tcp, udp, icmp or 0-255")
            else:
                out[name] = int(text)
                if not 0 <= out[name] <= 65535:
                    raise ValueError("must be 0-65535")
        except (ValueError, TypeError) as exc:
            raise ApiError(
                422, f"match.{name}: {text!r}: {exc}", [detail(f"match.{name}", text, str(exc))]
            ) from None
    return out


async def _visible_port(repository: TopologyRepository, principal: Principal, port_id: str) -> Port:
    try:
        stored = await repository.get(Port, port_id)
    except (NotFoundError, pydantic.ValidationError):
        raise NotFoundError(Port.KIND, port_id) from None
    if not principal.may_access(stored.obj.tenant_id):
        raise NotFoundError(Port.KIND, port_id)
    port: Port = stored.obj
    return port


async def _bound_host(store: Store, port: Port) -> str:
    """The live host the port is bound to; ApiError 409 otherwise (an agent must answer)."""
    if not port.host_id:
        raise ApiError(409, f"port {port.id} is bound to no host: no agent can trace it",
                       [detail("port", port.id, "no host_id")])  # fmt: skip
    if await store.get(host_alive_key(port.host_id)) is None:
        raise ApiError(409, f"host {port.host_id} of port {port.id} is down",
                       [detail("port", port.id, f"host {port.host_id} has no live agent")])  # fmt: skip
    return port.host_id


async def _request(
    store: Store, host_id: str, trace_id: str, body: dict[str, Any], ttl: int
) -> int:
    lease = await store.lease_grant(ttl)
    await store.put(trace_request_key(host_id, trace_id), json.dumps(body).encode(), lease=lease.id)
    return lease.id


async def _through_agent(store: Store, port: Port, body: TraceRequest) -> dict[str, Any]:
    host_id = await _bound_host(store, port)
    trace_id = uuid.uuid4().hex
    spec = dataclasses.asdict(body.spec())
    lease = await _request(
        store,
        host_id,
        trace_id,
        {"mode": "synthetic", "port": port.id, "spec": spec},
        REQUEST_LEASE_TTL,
    )
    try:
        deadline = time.monotonic() + AGENT_ANSWER_TIMEOUT
        while time.monotonic() < deadline:
            answer = await store.get(trace_result_key(host_id, trace_id))
            if answer is not None:
                result = json.loads(answer.value)
                if result.get("status") != "done":
                    raise ApiError(422, f"impossible packet: {result.get('error')}",
                                   [detail("trace", body.from_port, str(result.get("error")))])  # fmt: skip
                trace: dict[str, Any] = result["trace"]
                return trace
            await asyncio.sleep(0.02)
    finally:
        await store.lease_revoke(lease)
    raise ApiError(
        504, f"the agent of host {host_id} did not answer within {AGENT_ANSWER_TIMEOUT:.0f} s"
    )


def traces_router() -> APIRouter:
    router = APIRouter(
        prefix=f"{API_PREFIX}/traces",
        tags=["traces"],
        responses={
            status: {"model": ErrorBody, "description": text}
            for status, text in {
                401: "missing or invalid bearer token",
                404: "no such port (or live trace)",
                409: "the port's host is down or unknown (via agent, live)",
                422: "impossible headers: the details name the field and value",
                429: "too many live traces on that host",
                500: "store corrupt",
                503: "store unavailable (locked); retry",
                504: "the agent did not answer",
            }.items()
        },
    )
    cache = SnapshotCache()

    @router.post(
        "",
        response_model=TraceBody,
        operation_id="create_trace",
        summary="Trace a synthetic packet from a port (no side effect)",
    )
    async def create_trace(
        body: TraceRequest,
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> dict[str, Any]:
        """`via: api` (default) simulates here from the store: works with no agent and costs
        the agents nothing, but sees no live conntrack/NAT state (a fresh connection). `via:
        agent` asks the agent of the port's host, which simulates with its live flow state."""
        port = await _visible_port(repository, principal, body.from_port)
        if body.via == "agent":
            return await _through_agent(repository.store, port, body)
        snapshot = await cache.get(repository.store)
        if body.from_port not in snapshot.view.ports:  # created after the snapshot's read
            snapshot = await load_snapshot(repository.store)
        try:
            return trace_in_snapshot(snapshot, body, time.monotonic())
        except TraceSpecError as exc:
            raise ApiError(
                422, f"impossible packet: {exc}", [detail(exc.field, exc.value, exc.why)]
            ) from None

    @router.post(
        "/live",
        status_code=201,
        operation_id="create_live_trace",
        summary="Record the traces of the next real packets from a port (expires by itself)",
    )
    async def create_live_trace(
        body: LiveTraceRequest,
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> dict[str, Any]:
        match = parse_match(body.match)
        port = await _visible_port(repository, principal, body.port)
        store = repository.store
        host_id = await _bound_host(store, port)
        existing = await store.range(f"{STATE_PREFIX}{host_id}/{TRACE_REQUEST_KIND}/")
        if len(existing.kvs) >= MAX_LIVE_PER_HOST:
            raise ApiError(429, f"{len(existing.kvs)} trace requests already active on host {host_id}; "
                           "wait for one to expire", [detail("port", body.port, f"host {host_id} is busy")])  # fmt: skip
        trace_id = f"{host_id}{LIVE_ID_SEPARATOR}{uuid.uuid4().hex}"
        request = {"mode": "live", "port": port.id, "count": body.count, "match": match}
        await _request(store, host_id, trace_id, request, body.ttl)
        return {
            "id": trace_id,
            "host": host_id,
            "port": port.id,
            "count": body.count,
            "expires_in": body.ttl,
        }

    @router.get(
        "/live/{trace_id}",
        operation_id="get_live_trace",
        summary="What a live trace recorded so far (404 once it expired)",
    )
    async def get_live_trace(
        trace_id: str,
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> dict[str, Any]:
        host_id, separator, _ = trace_id.partition(LIVE_ID_SEPARATOR)
        store = repository.store
        request = await store.get(trace_request_key(host_id, trace_id)) if separator else None
        if request is None:
            raise NotFoundError("live_trace", trace_id)
        port_id = json.loads(request.value).get("port", "")
        await _visible_port(repository, principal, port_id)
        answer = await store.get(trace_result_key(host_id, trace_id))
        if answer is None:
            return {"id": trace_id, "host": host_id, "status": "pending", "records": []}
        result: dict[str, Any] = json.loads(answer.value)
        return {"id": trace_id, **result}

    return router
