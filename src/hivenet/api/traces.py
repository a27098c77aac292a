"""`POST /v1/traces`: trace a synthetic packet from a port, simulated in the API server from
the store (sim/tracing.py does the simulating and the report).

Where it simulates, and why here: the API server reads the whole network state from the store
(topology, learned MAC/ARP tables, host liveness, the ingress host's NAT port blocks), so a
trace works with no agent reachable and costs no agent anything; it is the default of
`hivenet trace`. What it cannot see is the ingress agent's in-memory conntrack and NAT
bindings: the packet is traced as the first packet of a new connection (a return packet of an
open connection is traced as an unsolicited one). The report says so (`simulated_by: api`,
`flow_state: "fresh"`).

Owns the request body (validated: 422 naming the field and value for an impossible header
combination, 404 for an unknown or invisible port), loading a `TopologyView` and tables from
the store (cached per store revision), and the response. Must not write to the store.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import zlib
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from hivenet.api.auth import Principal, authenticate
from hivenet.api.errors import ApiError, ErrorBody, detail
from hivenet.api.resources import API_PREFIX, get_repository
from hivenet.flowstate import ConntrackTable, FlowStateTransaction, NatTable
from hivenet.flowstate.portblocks import PortBlockAllocator, PortBlockError, parse_block_key
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
from hivenet.store.base import Store
from hivenet.store.keys import (
    STATE_PREFIX,
    TABLES_PREFIX,
    parse_state_key,
    parse_table_key,
)
from hivenet.store.topology import NotFoundError, TopologyRepository

PAGE = 1000


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


async def _range_all(store: Store, prefix: str, revision: int) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    start_after: str | None = None
    while True:
        page = await store.range(prefix, revision=revision, limit=PAGE, start_after=start_after)
        out.extend((kv.key, kv.value) for kv in page.kvs)
        if not page.more or not page.kvs:
            return out
        start_after = page.kvs[-1].key


def _apply_table(tables: MemoryTables, key: str, value: bytes) -> str | None:
    """Learn one MAC/ARP entry; returns the NAT block's holder for a NAT block key."""
    kind, owner_id, name, entry = parse_table_key(key)
    if kind == "bridge" and name == "mac":
        vlan_text, _, mac_text = entry.partition("/")
        tables.learn(LearnedMac(owner_id, int(vlan_text), mac_to_int(mac_text), value.decode()))
    elif kind == "router" and name == "arp":
        address = ipaddress.ip_address(entry)
        tables.learn(
            LearnedNeighbour(owner_id, address.version, int(address), mac_to_int(value.decode()))
        )
    elif kind == "nat":
        return value.decode(errors="replace")
    return None


async def load_snapshot(store: Store) -> StoreSnapshot:
    revision = await store.current_revision()
    objects: list[TopologyObject] = []
    for key, value in await _range_all(store, TOPOLOGY_PREFIX, revision):
        try:
            kind, _object_id = parse_topology_key(key)
            objects.append(decode(kind, value))
        except ValueError:
            continue  # the agents skip what no model accepts; so does a trace
    view = TopologyView.from_objects(objects)
    tables = MemoryTables()
    nat_blocks: dict[str, list[tuple[str, bytes]]] = {}
    for key, value in await _range_all(store, TABLES_PREFIX, revision):
        try:
            holder = _apply_table(tables, key, value)
        except ValueError:
            continue
        if holder is not None:
            nat_blocks.setdefault(holder, []).append((key, value))
    alive: set[str] = set()
    for key, _value in await _range_all(store, STATE_PREFIX, revision):
        try:
            host_id, kind, object_id = parse_state_key(key)
        except ValueError:
            continue
        if kind == "host" and object_id == host_id:
            alive.add(host_id)
    hosts = {obj.id for obj in view.all("host")}
    hosts.update(p.host_id for p in view.ports.values() if p.host_id)
    for host_id in hosts:
        view.set_host_alive(host_id, host_id in alive)
    return StoreSnapshot(revision, view, tables, nat_blocks)


class SnapshotCache:
    """One snapshot, reloaded when the store revision moved."""

    def __init__(self) -> None:
        self._snapshot: StoreSnapshot | None = None
        self._lock = asyncio.Lock()

    async def get(self, store: Store) -> StoreSnapshot:
        async with self._lock:
            current = await store.current_revision()
            if self._snapshot is None or self._snapshot.revision != current:
                self._snapshot = await load_snapshot(store)
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
    spec = resolve_spec(
        view,
        request.from_port,
        TraceSpec(
            ip_dst=str(request.ip_dst),
            proto=request.proto,
            eth_src=request.eth_src,
            eth_dst=request.eth_dst,
            ip_src=str(request.ip_src) if request.ip_src is not None else None,
            src_port=request.src_port,
            dst_port=request.dst_port,
            tcp_flags=request.tcp_flags,
            vlan=request.vlan,
            ttl=request.ttl,
        ),
    )
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


def traces_router() -> APIRouter:
    router = APIRouter(
        prefix=f"{API_PREFIX}/traces",
        tags=["traces"],
        responses={
            status: {"model": ErrorBody, "description": text}
            for status, text in {
                401: "missing or invalid bearer token",
                404: "no such port",
                422: "impossible headers: the details name the field and value",
                500: "store corrupt",
                503: "store unavailable (locked); retry",
            }.items()
        },
    )
    cache = SnapshotCache()

    @router.post(
        "",
        response_model=TraceBody,
        operation_id="create_trace",
        summary="Trace a synthetic packet from a port (simulated from the store, no side effect)",
    )
    async def create_trace(
        body: TraceRequest,
        request: Request,
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> dict[str, Any]:
        try:
            stored = await repository.get(Port, body.from_port)
        except (NotFoundError, pydantic.ValidationError):
            raise NotFoundError(Port.KIND, body.from_port) from None
        if not principal.may_access(stored.obj.tenant_id):
            raise NotFoundError(Port.KIND, body.from_port)
        snapshot = await cache.get(repository.store)
        if body.from_port not in snapshot.view.ports:  # created after the snapshot's read
            snapshot = await load_snapshot(repository.store)
        try:
            return trace_in_snapshot(snapshot, body, time.monotonic())
        except TraceSpecError as exc:
            raise ApiError(
                422, f"impossible packet: {exc}", [detail(exc.field, exc.value, exc.why)]
            ) from None

    return router
