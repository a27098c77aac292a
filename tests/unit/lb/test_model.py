"""Load-balancer topology objects: every bad input is refused with an error that names the
field and the value; good objects round-trip through JSON; pool fit rules; stats."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from hivenet.model import (
    KINDS,
    HealthMonitor,
    HealthMonitorType,
    HttpMethod,
    LbAlgorithm,
    Listener,
    LoadBalancer,
    LoadBalancerStats,
    Member,
    OperatingStatus,
    Pool,
    SessionPersistence,
    TopologyObject,
    decode,
    encode,
)
from hivenet.model.loadbalancer import parse_expected_codes, pool_fit_problem

LISTENER = {"load_balancer_id": "lb1", "vip_address": "203.0.113.10", "protocol_port": 80}
POOL = {"load_balancer_id": "lb1"}
MEMBER = {"pool_id": "pool1", "address": "10.0.0.5", "protocol_port": 8080}
MONITOR = {"pool_id": "pool1", "type": "tcp"}


def test_the_kinds_are_registered_with_their_references() -> None:
    assert KINDS["load_balancer"] is LoadBalancer
    assert KINDS["listener"] is Listener
    assert KINDS["pool"] is Pool
    assert KINDS["member"] is Member
    assert KINDS["health_monitor"] is HealthMonitor
    listener = Listener.model_validate({**LISTENER, "default_pool_id": "pool1"})
    assert set(listener.references()) == {
        ("load_balancer_id", "load_balancer", "lb1"),
        ("default_pool_id", "pool", "pool1"),
    }
    assert Member.model_validate(MEMBER).references() == [("pool_id", "pool", "pool1")]


def test_defaults() -> None:
    pool = Pool.model_validate(POOL)
    assert pool.algorithm is LbAlgorithm.MAGLEV
    assert pool.session_persistence is SessionPersistence.NONE
    assert pool.ip_version == 4 and pool.persistence_timeout == 360
    member = Member.model_validate(MEMBER)
    assert member.weight == 1 and member.admin_state_up
    assert member.operating_status is OperatingStatus.NO_MONITOR
    monitor = HealthMonitor.model_validate(MONITOR)
    assert (monitor.delay, monitor.timeout, monitor.max_retries, monitor.max_retries_down) == (
        5,
        3,
        3,
        3,
    )
    assert monitor.http_method is None and monitor.expected_code_ranges() == ()


def test_an_http_monitor_gets_the_usual_http_defaults() -> None:
    monitor = HealthMonitor.model_validate({**MONITOR, "type": "http"})
    assert monitor.http_method is HttpMethod.GET
    assert (monitor.url_path, monitor.expected_codes) == ("/", "200")
    custom = HealthMonitor.model_validate(
        {**MONITOR, "type": "http", "url_path": "/healthz?full=1", "expected_codes": "200-204,302"}
    )
    assert custom.expected_code_ranges() == ((200, 204), (302, 302))
    assert custom.accepts_status(204) and custom.accepts_status(302)
    assert not custom.accepts_status(301) and not custom.accepts_status(500)


@pytest.mark.parametrize(
    "obj",
    [
        LoadBalancer(router_id="r1", name="web"),
        Listener.model_validate(
            {**LISTENER, "vip_address": "2001:db8::10", "allowed_cidrs": ["2001:db8:1::/48"]}
        ),
        Pool.model_validate(
            {
                **POOL,
                "ip_version": 6,
                "session_persistence": "source_ip",
                "algorithm": "round_robin",
            }
        ),
        Member.model_validate({**MEMBER, "weight": 0, "monitor_address": "10.0.0.6"}),
        HealthMonitor.model_validate({**MONITOR, "type": "http", "http_method": "HEAD"}),
    ],
    ids=lambda obj: obj.KIND,
)
def test_objects_round_trip_through_json(obj: TopologyObject) -> None:
    assert decode(obj.KIND, encode(obj)) == obj
    assert type(obj).model_validate(obj.model_dump(mode="json")) == obj


# (model, fields, the field the error must name, a fragment of the value in the message)
BAD_INPUTS: list[tuple[type[TopologyObject], dict[str, Any], str, str]] = [
    (LoadBalancer, {}, "router_id", ""),
    (LoadBalancer, {"router_id": "r1", "provisioning_status": "busy"}, "provisioning_status", ""),
    (LoadBalancer, {"router_id": "r1", "vip": "10.0.0.1"}, "vip", ""),
    (Listener, {**LISTENER, "vip_address": "0.0.0.0"}, "vip_address", "0.0.0.0"),
    (Listener, {**LISTENER, "vip_address": "224.0.0.1"}, "vip_address", "224.0.0.1"),
    (Listener, {**LISTENER, "vip_address": "127.0.0.1"}, "vip_address", "127.0.0.1"),
    (Listener, {**LISTENER, "vip_address": "255.255.255.255"}, "vip_address", "255.255.255.255"),
    (Listener, {**LISTENER, "vip_address": "ff02::1"}, "vip_address", "ff02::1"),
    (Listener, {**LISTENER, "vip_address": "10.0.0.300"}, "vip_address", ""),
    (Listener, {**LISTENER, "protocol_port": 0}, "protocol_port", ""),
    (Listener, {**LISTENER, "protocol_port": 65536}, "protocol_port", ""),
    (Listener, {**LISTENER, "protocol": "http"}, "protocol", ""),
    (Listener, {**LISTENER, "allowed_cidrs": ["2001:db8::/32"]}, "allowed_cidrs", "2001:db8::/32"),
    (
        Listener,
        {**LISTENER, "allowed_cidrs": ["10.0.0.0/8", "10.0.0.0/8"]},
        "allowed_cidrs",
        "10.0.0.0/8",
    ),
    (Pool, {**POOL, "algorithm": "least_connections"}, "algorithm", ""),
    (Pool, {**POOL, "session_persistence": "http_cookie"}, "session_persistence", ""),
    (Pool, {**POOL, "persistence_timeout": 0}, "persistence_timeout", ""),
    (Pool, {**POOL, "ip_version": 5}, "ip_version", "5"),
    (Pool, {**POOL, "protocol": "sctp"}, "protocol", ""),
    (Member, {**MEMBER, "weight": 257}, "weight", ""),
    (Member, {**MEMBER, "weight": -1}, "weight", ""),
    (Member, {**MEMBER, "address": "::"}, "address", "::"),
    (Member, {**MEMBER, "address": "239.1.1.1"}, "address", "239.1.1.1"),
    (Member, {**MEMBER, "protocol_port": 70000}, "protocol_port", ""),
    (Member, {**MEMBER, "monitor_address": "2001:db8::5"}, "monitor_address", "2001:db8::5"),
    (Member, {**MEMBER, "monitor_port": 0}, "monitor_port", ""),
    (Member, {**MEMBER, "pool_id": "bad id"}, "pool_id", "bad id"),
    (HealthMonitor, {**MONITOR, "type": "icmp"}, "type", ""),
    (HealthMonitor, {**MONITOR, "delay": 5, "timeout": 6}, "timeout", "timeout=6"),
    (HealthMonitor, {**MONITOR, "delay": 0}, "delay", ""),
    (HealthMonitor, {**MONITOR, "max_retries": 0}, "max_retries", ""),
    (HealthMonitor, {**MONITOR, "max_retries_down": 11}, "max_retries_down", ""),
    (HealthMonitor, {**MONITOR, "http_method": "GET"}, "http_method", "GET"),
    (HealthMonitor, {**MONITOR, "url_path": "/x"}, "url_path", "/x"),
    (HealthMonitor, {**MONITOR, "expected_codes": "200"}, "expected_codes", "200"),
    (HealthMonitor, {**MONITOR, "type": "http", "http_method": "FETCH"}, "http_method", ""),
    (HealthMonitor, {**MONITOR, "type": "http", "url_path": "health"}, "url_path", "health"),
    (HealthMonitor, {**MONITOR, "type": "http", "url_path": "/a b"}, "url_path", "/a b"),
    (HealthMonitor, {**MONITOR, "type": "http", "expected_codes": "2xx"}, "expected_codes", "2xx"),
    (
        HealthMonitor,
        {**MONITOR, "type": "http", "expected_codes": "299-200"},
        "expected_codes",
        "299-200",
    ),
    (HealthMonitor, {**MONITOR, "type": "http", "expected_codes": "700"}, "expected_codes", "700"),
    (HealthMonitor, {**MONITOR, "type": "http", "expected_codes": ""}, "expected_codes", ""),
    (
        HealthMonitor,
        {**MONITOR, "type": "http", "expected_codes": "200,,302"},
        "expected_codes",
        "200,,302",
    ),
]


@pytest.mark.parametrize(
    ("model", "fields", "field", "value_text"),
    BAD_INPUTS,
    ids=[f"{case[0].KIND}-{case[2]}-{index}" for index, case in enumerate(BAD_INPUTS)],
)
def test_bad_input_names_the_field(
    model: type[TopologyObject], fields: dict[str, Any], field: str, value_text: str
) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        model.model_validate(fields)
    errors = caught.value.errors()
    # Unions (IPv4 | IPv6) report one error per member, located under the same field.
    assert {error["loc"][0] for error in errors} == {field}, errors
    if value_text:
        assert all(
            value_text in error["msg"] or value_text in str(error["input"]) for error in errors
        ), errors


def test_objects_are_frozen() -> None:
    member = Member.model_validate(MEMBER)
    with pytest.raises(pydantic.ValidationError):
        member.weight = 5


@pytest.mark.parametrize(
    ("text", "ranges"),
    [
        ("200", ((200, 200),)),
        ("200-299,302", ((200, 299), (302, 302))),
        (" 200 , 404 ", ((200, 200), (404, 404))),
        ("100-599", ((100, 599),)),
    ],
)
def test_expected_codes_parse(text: str, ranges: tuple[tuple[int, int], ...]) -> None:
    assert parse_expected_codes(text) == ranges


# ---- fit between an object and its pool


def _pool(**fields: Any) -> Pool:
    return Pool.model_validate({"id": "pool1", **POOL, **fields})


@pytest.mark.parametrize(
    ("obj", "pool", "problem_field"),
    [
        (Listener.model_validate({**LISTENER, "default_pool_id": "pool1"}), _pool(), None),
        (
            Listener.model_validate({**LISTENER, "default_pool_id": "pool1"}),
            _pool(load_balancer_id="lb2"),
            "default_pool_id",
        ),
        (
            Listener.model_validate({**LISTENER, "default_pool_id": "pool1", "protocol": "udp"}),
            _pool(),
            "default_pool_id",
        ),
        (
            Listener.model_validate(
                {**LISTENER, "default_pool_id": "pool1", "vip_address": "2001:db8::1"}
            ),
            _pool(),
            "vip_address",
        ),
        (Member.model_validate(MEMBER), _pool(), None),
        (Member.model_validate({**MEMBER, "address": "2001:db8::5"}), _pool(), "address"),
        (Member.model_validate({**MEMBER, "address": "2001:db8::5"}), _pool(ip_version=6), None),
        (HealthMonitor.model_validate({**MONITOR, "type": "http"}), _pool(), None),
        (HealthMonitor.model_validate({**MONITOR, "type": "udp"}), _pool(), "type"),
        (HealthMonitor.model_validate({**MONITOR, "type": "http"}), _pool(protocol="udp"), "type"),
        (HealthMonitor.model_validate({**MONITOR, "type": "ping"}), _pool(protocol="udp"), None),
    ],
)
def test_pool_fit(obj: TopologyObject, pool: Pool, problem_field: str | None) -> None:
    problem = pool_fit_problem(obj, pool)
    assert (problem[0] if problem else None) == problem_field, problem


def test_monitor_types_are_all_covered() -> None:
    for monitor_type in HealthMonitorType:
        fits = [
            pool_fit_problem(HealthMonitor(pool_id="pool1", type=monitor_type), _pool(protocol=p))
            is None
            for p in ("tcp", "udp")
        ]
        assert any(fits), monitor_type


def test_stats_merge_and_refuse_negative_counters() -> None:
    one = LoadBalancerStats(active_connections=2, total_connections=10, bytes_in=100)
    two = LoadBalancerStats(active_connections=1, total_connections=5, bytes_out=7)
    assert one.merged(two) == LoadBalancerStats(
        active_connections=3, total_connections=15, bytes_in=100, bytes_out=7
    )
    with pytest.raises(pydantic.ValidationError) as caught:
        LoadBalancerStats(bytes_in=-1)
    assert caught.value.errors()[0]["loc"] == ("bytes_in",)
