"""`GET /v1/{ports,bridges,routers,chains,rules,hosts}/{id}/stats`: traffic counters summed over
the live hosts, and `live_host_values`, how any per-host report is read from the store.

Each agent publishes one report under `/hivenet/v1/state/<host>/host_stats/<host>` on its
lease (agent/metrics.py says exactly what is counted): ports, devices and chains by id, drops
by reason. A report counts when its host is live (its liveness key is present; both vanish
with the host's lease); a report that does not parse is skipped and logged, never summed.
A port is counted at the host where its packets enter, so the sum counts each packet once.

Auth and tenant scoping as for the collections: a caller who may not see the object gets
404, as for an unknown id; host stats are for the admin only (hosts are not a tenant's).
Must not write to the store nor know how agents count.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pydantic
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from hivenet.api.auth import Principal, authenticate
from hivenet.api.errors import ErrorBody
from hivenet.api.resources import API_PREFIX, PLURALS, get_repository
from hivenet.model import Bridge, Chain, Host, Port, Router, Rule
from hivenet.model.topology import TopologyObject
from hivenet.model.types import ObjectId
from hivenet.store.base import Get, KeyValue
from hivenet.store.keys import host_alive_key, host_stats_key
from hivenet.store.topology import MAX_PAGE_SIZE, NotFoundError, TopologyRepository

_log = logging.getLogger("hivenet.api")

# Hosts read per store transaction (two gets each; etcd allows 128 operations per txn).
HOSTS_PER_TXN = 50

_object_id_adapter: pydantic.TypeAdapter[str] = pydantic.TypeAdapter(ObjectId)


async def all_host_ids(repository: TopologyRepository) -> list[str]:
    ids: list[str] = []
    marker: str | None = None
    while True:
        page = await repository.list(Host, limit=MAX_PAGE_SIZE, marker=marker)
        ids.extend(item.obj.id for item in page.items)
        if page.next_marker is None or not page.items:
            return ids
        marker = page.next_marker


async def live_host_values(
    repository: TopologyRepository, key_of: Callable[[str], str]
) -> dict[str, bytes]:
    """host id -> the value at `key_of(host)`, for every live host that has one."""
    store = repository.store
    host_ids = await all_host_ids(repository)
    values: dict[str, bytes] = {}
    for start in range(0, len(host_ids), HOSTS_PER_TXN):
        chunk = host_ids[start : start + HOSTS_PER_TXN]
        operations = []
        for host_id in chunk:
            operations.append(Get(host_alive_key(host_id)))
            operations.append(Get(key_of(host_id)))
        result = await store.txn([], operations)
        for index, host_id in enumerate(chunk):
            alive, report = result.responses[2 * index], result.responses[2 * index + 1]
            if _found(alive) and _found(report):
                assert isinstance(report, list)
                values[host_id] = report[0].value
    return values


def _found(response: object) -> bool:
    return isinstance(response, list) and bool(response) and isinstance(response[0], KeyValue)


class PortCountersBody(BaseModel):
    rx_packets: int = Field(0, ge=0)
    rx_bytes: int = Field(0, ge=0)
    tx_packets: int = Field(0, ge=0)
    tx_bytes: int = Field(0, ge=0)
    drops: int = Field(0, ge=0)


class TrafficBody(BaseModel):
    packets: int = Field(0, ge=0)
    bytes: int = Field(0, ge=0)


class HostReport(BaseModel):
    """One host's report, as the agent writes it."""

    ports: dict[str, PortCountersBody] = {}
    devices: dict[str, dict[str, Any]] = {}
    chains: dict[str, TrafficBody] = {}
    rules: dict[str, dict[str, Any]] = {}
    drops: dict[str, int] = {}


class PortStatsBody(PortCountersBody):
    """A port's counters summed over the live hosts that reported it (`hosts`)."""

    port_id: str
    hosts: list[str]


class DeviceStatsBody(TrafficBody):
    """Packets and bytes through a device (bridge, router) or chain, summed over `hosts`."""

    kind: str
    id: str
    hosts: list[str]


class RuleStatsBody(BaseModel):
    """Packets a rule matched, summed over `hosts`."""

    rule_id: str
    hits: int = Field(ge=0)
    hosts: list[str]


class HostStatsBody(BaseModel):
    host_id: str
    alive: bool
    drops: dict[str, int]
    ports: dict[str, PortCountersBody]


async def live_host_reports(repository: TopologyRepository) -> dict[str, HostReport]:
    reports: dict[str, HostReport] = {}
    for host_id, value in (await live_host_values(repository, host_stats_key)).items():
        try:
            reports[host_id] = HostReport.model_validate_json(value)
        except pydantic.ValidationError as exc:
            _log.warning("skipping host %s's traffic stats: %s", host_id, exc)
    return reports


def sum_port(port_id: str, reports: dict[str, HostReport]) -> PortStatsBody:
    totals = dict.fromkeys(PortCountersBody.model_fields, 0)
    hosts = []
    for host_id, report in sorted(reports.items()):
        counters = report.ports.get(port_id)
        if counters is None:
            continue
        hosts.append(host_id)
        for name, value in counters.model_dump().items():
            totals[name] += value
    return PortStatsBody(port_id=port_id, hosts=hosts, **totals)


def sum_traffic(kind: str, object_id: str, reports: dict[str, HostReport]) -> DeviceStatsBody:
    packets = size = 0
    hosts = []
    for host_id, report in sorted(reports.items()):
        if kind == "chain":
            traffic = report.chains.get(object_id)
            found = (traffic.packets, traffic.bytes) if traffic is not None else None
        else:
            device = report.devices.get(object_id)
            found = (
                (int(device.get("packets", 0)), int(device.get("bytes", 0)))
                if device is not None and device.get("kind") == kind
                else None
            )
        if found is None:
            continue
        hosts.append(host_id)
        packets += found[0]
        size += found[1]
    return DeviceStatsBody(kind=kind, id=object_id, packets=packets, bytes=size, hosts=hosts)


def sum_rule(rule_id: str, reports: dict[str, HostReport]) -> RuleStatsBody:
    hits = 0
    hosts = []
    for host_id, report in sorted(reports.items()):
        rule = report.rules.get(rule_id)
        if rule is not None:
            hosts.append(host_id)
            hits += int(rule.get("hits", 0))
    return RuleStatsBody(rule_id=rule_id, hits=hits, hosts=hosts)


def _checked_id(kind: str, object_id: str) -> str:
    try:
        return _object_id_adapter.validate_python(object_id)
    except pydantic.ValidationError:
        raise NotFoundError(kind, object_id) from None


async def _visible(
    repository: TopologyRepository,
    principal: Principal,
    cls: type[TopologyObject],
    object_id: str,
) -> str:
    checked = _checked_id(cls.KIND, object_id)
    stored = await repository.get(cls, checked)
    if not principal.may_access(stored.obj.tenant_id):
        raise NotFoundError(cls.KIND, checked)
    return checked


_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        401: "missing or invalid bearer token",
        404: "no such object",
        500: "store corrupt",
        503: "store unavailable (locked); retry",
    }.items()
}


def hoststats_router() -> APIRouter:
    router = APIRouter(prefix=API_PREFIX, tags=["stats"], responses=_RESPONSES)

    @router.get(
        f"/{PLURALS[Port.KIND]}/{{port_id}}/stats",
        response_model=PortStatsBody,
        operation_id="get_port_stats",
        summary="A port's rx/tx/drop counters, summed over the live hosts",
    )
    async def port_stats(
        port_id: str,
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> PortStatsBody:
        checked = await _visible(repository, principal, Port, port_id)
        return sum_port(checked, await live_host_reports(repository))

    def add_traffic_route(cls: type[TopologyObject]) -> None:
        @router.get(
            f"/{PLURALS[cls.KIND]}/{{object_id}}/stats",
            response_model=DeviceStatsBody,
            operation_id=f"get_{cls.KIND}_stats",
            summary=f"Packets and bytes through a {cls.KIND}, summed over the live hosts",
        )
        async def traffic_stats(
            object_id: str,
            principal: Principal = Depends(authenticate),
            repository: TopologyRepository = Depends(get_repository),
        ) -> DeviceStatsBody:
            checked = await _visible(repository, principal, cls, object_id)
            return sum_traffic(cls.KIND, checked, await live_host_reports(repository))

    for cls in (Bridge, Router, Chain):
        add_traffic_route(cls)

    @router.get(
        f"/{PLURALS[Rule.KIND]}/{{rule_id}}/stats",
        response_model=RuleStatsBody,
        operation_id="get_rule_stats",
        summary="Packets a rule matched, summed over the live hosts",
    )
    async def rule_stats(
        rule_id: str,
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> RuleStatsBody:
        checked = await _visible(repository, principal, Rule, rule_id)
        return sum_rule(checked, await live_host_reports(repository))

    @router.get(
        f"/{PLURALS[Host.KIND]}/{{host_id}}/stats",
        response_model=HostStatsBody,
        operation_id="get_host_stats",
        summary="A host's drops by reason and port counters (admin only)",
    )
    async def host_stats(
        host_id: str,
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> HostStatsBody:
        checked = _checked_id(Host.KIND, host_id)
        if not principal.is_admin:
            raise NotFoundError(Host.KIND, checked)
        await repository.get(Host, checked)
        store = repository.store
        alive = await store.get(host_alive_key(checked)) is not None
        value = await store.get(host_stats_key(checked)) if alive else None
        report = HostReport()
        if value is not None:
            try:
                report = HostReport.model_validate(json.loads(value.value))
            except (pydantic.ValidationError, ValueError) as exc:
                _log.warning("skipping host %s's traffic stats: %s", checked, exc)
        return HostStatsBody(host_id=checked, alive=alive, drops=report.drops, ports=report.ports)

    return router
