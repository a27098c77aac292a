"""L4 load-balancer topology objects: LoadBalancer, Listener, Pool, Member, HealthMonitor.

Owns their shape, the checks one object can make on its own (a timeout within the delay, a
weight in range, a VIP and its allowed CIDRs of one IP family, well-formed HTTP check fields,
...) and the checks between an object and the pool it names (`pool_fit_problem`: a member's
family, a listener's protocol and load balancer, a health monitor's type), which the store's
topology repository runs inside its write transaction. Also the counters agents report per
host (`LoadBalancerStats`), which are not topology objects.

How the objects hang together (ids point upwards):

    Router <- LoadBalancer <- Listener (VIP address, protocol, port) --default_pool_id--> Pool
                           <- Pool <- Member (address, port, weight)
                                   <- HealthMonitor

The status fields (`operating_status`, `provisioning_status`) are written by agents from what
their health monitors observe; a client that sets them only states a starting point.

Every check raises `ValueError` from a validator attached to the field it is about, so the
error names the field and the value. Must not touch the store, the clock or any I/O.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from hivenet.model.topology import TopologyObject
from hivenet.model.types import IpAddress, IpNetwork, ObjectId

MEMBER_WEIGHT_MAX = 256
MemberWeight = Annotated[int, Field(ge=0, le=MEMBER_WEIGHT_MAX)]
ServicePort = Annotated[int, Field(ge=1, le=65535)]
# Health-check timing in whole seconds, as in Octavia.
CheckSeconds = Annotated[int, Field(ge=1, le=86400)]
CheckRetries = Annotated[int, Field(ge=1, le=10)]

DEFAULT_PERSISTENCE_TIMEOUT = 360
DEFAULT_HTTP_URL_PATH = "/"
DEFAULT_EXPECTED_CODES = "200"

_URL_PATH_RE = re.compile(r"^/[\x21-\x7e]*$")
_URL_PATH_MAX = 2048
_EXPECTED_CODES_MAX = 64
_HTTP_STATUS_MIN, _HTTP_STATUS_MAX = 100, 599


class LbProtocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


class LbAlgorithm(enum.StrEnum):
    MAGLEV = "maglev"  # consistent hash of the 5-tuple: every agent picks the same member
    ROUND_ROBIN = "round_robin"  # per agent: agents do not coordinate their turns
    SOURCE_IP = "source_ip"  # consistent hash of the source address only


class SessionPersistence(enum.StrEnum):
    NONE = "none"
    SOURCE_IP = "source_ip"  # a source address sticks to its member for persistence_timeout


class HealthMonitorType(enum.StrEnum):
    TCP = "tcp"  # a TCP handshake to the member's (monitor) port
    HTTP = "http"  # an HTTP request; the status code must be in expected_codes
    UDP = "udp"  # a UDP probe; an ICMP port-unreachable marks the member down
    PING = "ping"  # ICMP echo


class HttpMethod(enum.StrEnum):
    GET = "GET"
    HEAD = "HEAD"
    POST = "POST"
    PUT = "PUT"
    DELETE = "DELETE"
    OPTIONS = "OPTIONS"
    PATCH = "PATCH"
    TRACE = "TRACE"
    CONNECT = "CONNECT"


class OperatingStatus(enum.StrEnum):
    """What agents observe. A member takes new flows when ONLINE or NO_MONITOR (no health
    monitor watches it); DRAINING keeps its existing flows but takes no new ones."""

    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"
    DEGRADED = "degraded"  # some members of a pool (or pools of a load balancer) are down
    ERROR = "error"
    NO_MONITOR = "no_monitor"


class ProvisioningStatus(enum.StrEnum):
    """Whether the agents have taken the object into use."""

    ACTIVE = "active"
    PENDING_CREATE = "pending_create"
    PENDING_UPDATE = "pending_update"
    PENDING_DELETE = "pending_delete"
    ERROR = "error"


# Health-monitor types that make sense per pool protocol (an HTTP check of a UDP service
# cannot succeed; a UDP probe of a TCP service says nothing about it).
MONITOR_TYPES_FOR_PROTOCOL: dict[LbProtocol, frozenset[HealthMonitorType]] = {
    LbProtocol.TCP: frozenset(
        {HealthMonitorType.TCP, HealthMonitorType.HTTP, HealthMonitorType.PING}
    ),
    LbProtocol.UDP: frozenset({HealthMonitorType.UDP, HealthMonitorType.PING}),
}


def _check_unicast(field: str, address: IpAddress) -> IpAddress:
    """An address a VIP or a member can have: not unspecified, multicast, loopback or the
    IPv4 limited broadcast (packets to or from those never reach a member)."""
    if address.is_unspecified or address.is_multicast or address.is_loopback:
        raise ValueError(f"{field}={address}: must be a unicast address")
    if address == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{field}={address}: must be a unicast address, not the broadcast")
    return address


def parse_expected_codes(text: str) -> tuple[tuple[int, int], ...]:
    """`"200-299,302"` -> ((200, 299), (302, 302)): comma-separated HTTP status codes
    (100-599) and inclusive ranges; ValueError naming `expected_codes` otherwise."""
    if not text or len(text) > _EXPECTED_CODES_MAX:
        raise ValueError(
            f"expected_codes={text!r}: give 1-{_EXPECTED_CODES_MAX} characters of codes "
            "and ranges, e.g. '200' or '200-299,302'"
        )
    ranges: list[tuple[int, int]] = []
    for item in text.split(","):
        low_text, dash, high_text = item.strip().partition("-")
        bounds = (low_text, high_text) if dash else (low_text,)
        if not all(len(bound) == 3 and bound.isdigit() and bound.isascii() for bound in bounds):
            raise ValueError(
                f"expected_codes={text!r}: {item.strip()!r} is not a status code or a range "
                "of them (e.g. '200' or '200-299,302')"
            )
        low, high = int(bounds[0]), int(bounds[-1])
        for code in (low, high):
            if not _HTTP_STATUS_MIN <= code <= _HTTP_STATUS_MAX:
                raise ValueError(
                    f"expected_codes={text!r}: {code} is not an HTTP status code "
                    f"({_HTTP_STATUS_MIN}-{_HTTP_STATUS_MAX})"
                )
        if low > high:
            raise ValueError(f"expected_codes={text!r}: range {low}-{high} is reversed")
        ranges.append((low, high))
    return tuple(ranges)


class LoadBalancer(TopologyObject):
    """A virtual L4 load balancer on a router: the router answers for the VIPs of its
    listeners and the agent at the ingress host picks a member per new flow."""

    KIND: ClassVar[str] = "load_balancer"
    REFS: ClassVar[dict[str, str]] = {"router_id": "router"}

    router_id: ObjectId
    admin_state_up: bool = True
    provisioning_status: ProvisioningStatus = ProvisioningStatus.ACTIVE
    operating_status: OperatingStatus = OperatingStatus.NO_MONITOR


class Listener(TopologyObject):
    """A VIP address, protocol and port of a load balancer; new flows to it go to a member
    of `default_pool_id` (none: the VIP answers with a reject). `allowed_cidrs` limits the
    clients (empty: everyone)."""

    KIND: ClassVar[str] = "listener"
    REFS: ClassVar[dict[str, str]] = {
        "load_balancer_id": "load_balancer",
        "default_pool_id": "pool",
    }

    load_balancer_id: ObjectId
    vip_address: IpAddress
    protocol: LbProtocol = LbProtocol.TCP
    protocol_port: ServicePort
    default_pool_id: ObjectId | None = None
    allowed_cidrs: tuple[IpNetwork, ...] = ()
    admin_state_up: bool = True
    provisioning_status: ProvisioningStatus = ProvisioningStatus.ACTIVE
    operating_status: OperatingStatus = OperatingStatus.NO_MONITOR

    @field_validator("vip_address")
    @classmethod
    def _vip_is_unicast(cls, value: IpAddress) -> IpAddress:
        return _check_unicast("vip_address", value)

    @field_validator("allowed_cidrs")
    @classmethod
    def _cidrs_match_vip(
        cls, value: tuple[IpNetwork, ...], info: ValidationInfo
    ) -> tuple[IpNetwork, ...]:
        vip = info.data.get("vip_address")
        for cidr in value:
            if vip is not None and cidr.version != vip.version:
                raise ValueError(
                    f"allowed_cidrs: {cidr} is IPv{cidr.version} but vip_address {vip} is "
                    f"IPv{vip.version}"
                )
        if len(set(value)) != len(value):
            raise ValueError(f"allowed_cidrs: {[str(c) for c in value]} lists a CIDR twice")
        return value

    def admits(self, source: IpAddress) -> bool:
        """Whether a client at `source` may use this listener."""
        return not self.allowed_cidrs or any(source in cidr for cidr in self.allowed_cidrs)


class Pool(TopologyObject):
    """Members that serve a listener, and how one is chosen for a new flow.

    `ip_version` is the family of the VIPs the pool serves and of its members: the load
    balancer translates addresses (DNAT), which cannot turn IPv4 into IPv6.
    `persistence_timeout` (seconds) is used with `session_persistence=source_ip` only."""

    KIND: ClassVar[str] = "pool"
    REFS: ClassVar[dict[str, str]] = {"load_balancer_id": "load_balancer"}

    load_balancer_id: ObjectId
    protocol: LbProtocol = LbProtocol.TCP
    ip_version: int = 4
    algorithm: LbAlgorithm = LbAlgorithm.MAGLEV
    session_persistence: SessionPersistence = SessionPersistence.NONE
    persistence_timeout: CheckSeconds = DEFAULT_PERSISTENCE_TIMEOUT
    admin_state_up: bool = True
    provisioning_status: ProvisioningStatus = ProvisioningStatus.ACTIVE
    operating_status: OperatingStatus = OperatingStatus.NO_MONITOR

    @field_validator("ip_version")
    @classmethod
    def _known_ip_version(cls, value: int) -> int:
        if value not in (4, 6):
            raise ValueError(f"ip_version={value}: must be 4 or 6")
        return value


class Member(TopologyObject):
    """A backend of a pool: where translated flows go. Weight 0 takes no new flows;
    `monitor_address`/`monitor_port` send health checks elsewhere than the service."""

    KIND: ClassVar[str] = "member"
    REFS: ClassVar[dict[str, str]] = {"pool_id": "pool"}

    pool_id: ObjectId
    address: IpAddress
    protocol_port: ServicePort
    weight: MemberWeight = 1
    admin_state_up: bool = True
    monitor_address: IpAddress | None = None
    monitor_port: ServicePort | None = None
    provisioning_status: ProvisioningStatus = ProvisioningStatus.ACTIVE
    operating_status: OperatingStatus = OperatingStatus.NO_MONITOR

    @field_validator("address")
    @classmethod
    def _address_is_unicast(cls, value: IpAddress) -> IpAddress:
        return _check_unicast("address", value)

    @field_validator("monitor_address")
    @classmethod
    def _monitor_address_matches(
        cls, value: IpAddress | None, info: ValidationInfo
    ) -> IpAddress | None:
        if value is None:
            return value
        _check_unicast("monitor_address", value)
        address = info.data.get("address")
        if address is not None and address.version != value.version:
            raise ValueError(
                f"monitor_address={value} is IPv{value.version} but address {address} is "
                f"IPv{address.version}"
            )
        return value


class HealthMonitor(TopologyObject):
    """How agents probe the members of a pool: every `delay` seconds, a probe that fails
    after `timeout`; `max_retries` successes in a row mark a member online,
    `max_retries_down` failures in a row mark it down. The HTTP fields are for type `http`
    only (and default to GET / expecting 200 there)."""

    KIND: ClassVar[str] = "health_monitor"
    REFS: ClassVar[dict[str, str]] = {"pool_id": "pool"}

    pool_id: ObjectId
    type: HealthMonitorType
    delay: CheckSeconds = 5
    timeout: CheckSeconds = 3
    max_retries: CheckRetries = 3
    max_retries_down: CheckRetries = 3
    http_method: HttpMethod | None = None
    url_path: str | None = None
    expected_codes: str | None = None
    admin_state_up: bool = True
    provisioning_status: ProvisioningStatus = ProvisioningStatus.ACTIVE
    operating_status: OperatingStatus = OperatingStatus.NO_MONITOR

    @model_validator(mode="before")
    @classmethod
    def _http_defaults(cls, data: Any) -> Any:
        """An HTTP monitor that leaves a field out gets the usual default (stored as such)."""
        if isinstance(data, dict) and data.get("type") in (HealthMonitorType.HTTP, "http"):
            data = dict(data)
            for field, default in (
                ("http_method", HttpMethod.GET.value),
                ("url_path", DEFAULT_HTTP_URL_PATH),
                ("expected_codes", DEFAULT_EXPECTED_CODES),
            ):
                if data.get(field) is None:
                    data[field] = default
        return data

    @field_validator("timeout")
    @classmethod
    def _timeout_within_delay(cls, value: int, info: ValidationInfo) -> int:
        delay = info.data.get("delay")
        if delay is not None and value > delay:
            raise ValueError(
                f"timeout={value} exceeds delay={delay}: a probe must time out before the "
                "next one starts"
            )
        return value

    @field_validator("http_method", "url_path", "expected_codes")
    @classmethod
    def _http_fields_only_for_http(cls, value: Any, info: ValidationInfo) -> Any:
        monitor_type = info.data.get("type")
        if value is not None and monitor_type not in (None, HealthMonitorType.HTTP):
            shown = value.value if isinstance(value, enum.Enum) else value
            raise ValueError(
                f"{info.field_name}={shown!r}: only for type 'http', not {monitor_type.value!r}"
            )
        return value

    @field_validator("url_path")
    @classmethod
    def _url_path_form(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > _URL_PATH_MAX or not _URL_PATH_RE.match(value)):
            raise ValueError(
                f"url_path={value!r}: must start with '/' and hold up to {_URL_PATH_MAX} "
                "printable ASCII characters without spaces, e.g. '/healthz'"
            )
        return value

    @field_validator("expected_codes")
    @classmethod
    def _expected_codes_form(cls, value: str | None) -> str | None:
        if value is not None:
            parse_expected_codes(value)
        return value

    def expected_code_ranges(self) -> tuple[tuple[int, int], ...]:
        """The accepted HTTP status codes as inclusive ranges (empty for non-HTTP monitors)."""
        return parse_expected_codes(self.expected_codes) if self.expected_codes else ()

    def accepts_status(self, status_code: int) -> bool:
        return any(low <= status_code <= high for low, high in self.expected_code_ranges())


LB_KINDS: tuple[type[TopologyObject], ...] = (
    LoadBalancer,
    Listener,
    Pool,
    Member,
    HealthMonitor,
)

# Fields that tie an object to its owner, or that other objects were checked against
# (`pool_fit_problem`): changing them later would bypass those checks.
LB_IMMUTABLE_FIELDS: dict[str, tuple[str, ...]] = {
    "listener": ("load_balancer_id",),
    "pool": ("load_balancer_id", "protocol", "ip_version"),
    "member": ("pool_id",),
    "health_monitor": ("pool_id",),
}


def pool_reference(obj: TopologyObject) -> tuple[str, str] | None:
    """(field, pool id) of the pool `obj` must fit (`pool_fit_problem`); None if none."""
    if isinstance(obj, Listener):
        return None if obj.default_pool_id is None else ("default_pool_id", obj.default_pool_id)
    if isinstance(obj, Member | HealthMonitor):
        return ("pool_id", obj.pool_id)
    return None


def pool_fit_problem(obj: TopologyObject, pool: Pool) -> tuple[str, object, str] | None:
    """(field, value, reason) when `obj` (a listener naming `pool` as its default pool, a
    member or a health monitor of `pool`) does not fit the pool; None when it does."""
    if isinstance(obj, Listener):
        return _listener_pool_problem(obj, pool)
    if isinstance(obj, Member) and pool.ip_version != obj.address.version:
        return (
            "address",
            str(obj.address),
            f"is IPv{obj.address.version} but pool {pool.id} serves IPv{pool.ip_version}",
        )
    if isinstance(obj, HealthMonitor) and obj.type not in MONITOR_TYPES_FOR_PROTOCOL[pool.protocol]:
        allowed = sorted(t.value for t in MONITOR_TYPES_FOR_PROTOCOL[pool.protocol])
        return (
            "type",
            obj.type.value,
            f"cannot check a {pool.protocol.value} pool (use one of {', '.join(allowed)})",
        )
    return None


def _listener_pool_problem(listener: Listener, pool: Pool) -> tuple[str, object, str] | None:
    if pool.load_balancer_id != listener.load_balancer_id:
        return (
            "default_pool_id",
            pool.id,
            f"pool belongs to load balancer {pool.load_balancer_id}, "
            f"not {listener.load_balancer_id}",
        )
    if pool.protocol is not listener.protocol:
        return (
            "default_pool_id",
            pool.id,
            f"pool protocol {pool.protocol.value} differs from the listener's "
            f"{listener.protocol.value}",
        )
    if pool.ip_version != listener.vip_address.version:
        return (
            "vip_address",
            str(listener.vip_address),
            f"is IPv{listener.vip_address.version} but pool {pool.id} serves IPv{pool.ip_version}",
        )
    return None


class LoadBalancerStats(BaseModel):
    """Counters one agent reports for one load balancer (or listener, or member) under its
    host's state keys; `merged` adds the reports of several hosts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    active_connections: int = Field(default=0, ge=0)
    total_connections: int = Field(default=0, ge=0)
    bytes_in: int = Field(default=0, ge=0)
    bytes_out: int = Field(default=0, ge=0)
    request_errors: int = Field(default=0, ge=0)

    def merged(self, other: LoadBalancerStats) -> LoadBalancerStats:
        return LoadBalancerStats(
            active_connections=self.active_connections + other.active_connections,
            total_connections=self.total_connections + other.total_connections,
            bytes_in=self.bytes_in + other.bytes_in,
            bytes_out=self.bytes_out + other.bytes_out,
            request_errors=self.request_errors + other.request_errors,
        )
