"""`GET /v1/load_balancers/{id}/stats`: a load balancer's counters, summed over the hosts.

Owns the HTTP side of load-balancer statistics and how the hosts' reports add up. Each
agent publishes its counters of a load balancer under
`/hivenet/v1/state/<host>/lb_stats/<lb id>` on its lease (agent/lbstats.py says exactly what
is counted): `{"load_balancer": LoadBalancerStats, "members": {member id: LoadBalancerStats}}`.
A report counts when its host is live (its liveness key is present; both keys vanish with
the host's lease, so a dead host's report drops out when its lease expires, a stopped one's
at once). Every member of the load balancer's pools is listed, at zero when no host reports
it; a report that does not parse is skipped and logged, never summed.

Auth and tenant scoping as for the collections: a caller who may not see the load balancer
gets 404, as for an unknown id. Must not write to the store nor know how agents count.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pydantic
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from hivenet.api.auth import Principal, authenticate
from hivenet.api.errors import ErrorBody
from hivenet.api.hoststats import live_host_values
from hivenet.api.resources import API_PREFIX, PLURALS, get_repository
from hivenet.model import Host
from hivenet.model.loadbalancer import LoadBalancer, LoadBalancerStats, Member, Pool
from hivenet.model.types import ObjectId
from hivenet.store.keys import lb_stats_key
from hivenet.store.topology import MAX_PAGE_SIZE, NotFoundError, TopologyRepository

_log = logging.getLogger("hivenet.api")

_object_id_adapter: pydantic.TypeAdapter[str] = pydantic.TypeAdapter(ObjectId)


class HostLbReport(BaseModel):
    """One host's report of one load balancer, as the agent writes it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    load_balancer: LoadBalancerStats
    members: dict[str, LoadBalancerStats] = {}


class MemberStatsBody(BaseModel):
    active_connections: int = Field(ge=0)
    total_connections: int = Field(ge=0)
    bytes_in: int = Field(ge=0)
    bytes_out: int = Field(ge=0)


class LoadBalancerStatsBody(BaseModel):
    """The sum of the live hosts' reports. `hosts`: the hosts whose reports were summed."""

    load_balancer_id: str
    active_connections: int = Field(ge=0)
    total_connections: int = Field(ge=0)
    bytes_in: int = Field(ge=0)
    bytes_out: int = Field(ge=0)
    members: dict[str, MemberStatsBody]
    hosts: list[str]


def _member_body(stats: LoadBalancerStats) -> MemberStatsBody:
    return MemberStatsBody(
        active_connections=stats.active_connections,
        total_connections=stats.total_connections,
        bytes_in=stats.bytes_in,
        bytes_out=stats.bytes_out,
    )


def sum_reports(
    load_balancer_id: str, member_ids: Sequence[str], reports: dict[str, HostLbReport]
) -> LoadBalancerStatsBody:
    """Add up the reports (host id -> report) of one load balancer."""
    total = LoadBalancerStats()
    members = {member_id: LoadBalancerStats() for member_id in member_ids}
    for report in reports.values():
        total = total.merged(report.load_balancer)
        for member_id, stats in report.members.items():
            members[member_id] = members.get(member_id, LoadBalancerStats()).merged(stats)
    return LoadBalancerStatsBody(
        load_balancer_id=load_balancer_id,
        active_connections=total.active_connections,
        total_connections=total.total_connections,
        bytes_in=total.bytes_in,
        bytes_out=total.bytes_out,
        members={member_id: _member_body(stats) for member_id, stats in sorted(members.items())},
        hosts=sorted(reports),
    )


async def _all_ids(
    repository: TopologyRepository, cls: type[Host] | type[Pool] | type[Member], **filters: str
) -> list[str]:
    ids: list[str] = []
    marker: str | None = None
    while True:
        page = await repository.list(
            cls, field_filters=filters or None, limit=MAX_PAGE_SIZE, marker=marker
        )
        ids.extend(item.obj.id for item in page.items)
        if page.next_marker is None or not page.items:
            return ids
        marker = page.next_marker


async def live_host_reports(
    repository: TopologyRepository, load_balancer_id: str
) -> dict[str, HostLbReport]:
    """host id -> its report of the load balancer, for every live host that has one."""
    values = await live_host_values(
        repository, lambda host_id: lb_stats_key(host_id, load_balancer_id)
    )
    reports: dict[str, HostLbReport] = {}
    for host_id, value in values.items():
        try:
            reports[host_id] = HostLbReport.model_validate_json(value)
        except pydantic.ValidationError as exc:
            _log.warning(
                "skipping host %s's stats of load balancer %s: %s", host_id, load_balancer_id, exc
            )
    return reports


async def load_balancer_stats(
    repository: TopologyRepository, load_balancer_id: str
) -> LoadBalancerStatsBody:
    """The summed statistics of a load balancer (NotFoundError for an unknown id)."""
    await repository.get(LoadBalancer, load_balancer_id)
    member_ids: list[str] = []
    for pool_id in await _all_ids(repository, Pool, load_balancer_id=load_balancer_id):
        member_ids.extend(await _all_ids(repository, Member, pool_id=pool_id))
    reports = await live_host_reports(repository, load_balancer_id)
    return sum_reports(load_balancer_id, member_ids, reports)


def lbstats_router() -> APIRouter:
    plural = PLURALS[LoadBalancer.KIND]
    router = APIRouter(
        prefix=f"{API_PREFIX}/{plural}",
        tags=[plural],
        responses={
            status: {"model": ErrorBody, "description": text}
            for status, text in {
                401: "missing or invalid bearer token",
                404: "no such load balancer",
                500: "store corrupt",
                503: "store unavailable (locked); retry",
            }.items()
        },
    )

    @router.get(
        "/{load_balancer_id}/stats",
        response_model=LoadBalancerStatsBody,
        operation_id="get_load_balancer_stats",
        summary="Counters of a load balancer, summed over the live hosts",
    )
    async def get_stats(
        load_balancer_id: str,
        principal: Principal = Depends(authenticate),
        repository: TopologyRepository = Depends(get_repository),
    ) -> LoadBalancerStatsBody:
        try:
            checked_id = _object_id_adapter.validate_python(load_balancer_id)
        except pydantic.ValidationError:
            raise NotFoundError(LoadBalancer.KIND, load_balancer_id) from None
        stored = await repository.get(LoadBalancer, checked_id)
        if not principal.may_access(stored.obj.tenant_id):
            raise NotFoundError(LoadBalancer.KIND, checked_id)
        return await load_balancer_stats(repository, checked_id)

    return router
