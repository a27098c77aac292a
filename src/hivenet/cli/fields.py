"""How the `hivenet` command turns topology-model fields into command-line options.

Owns, per kind, the table of first-class options (which model field, which flag, which
list filter), the help text derived from the model (type, choices, references, defaults),
the conversion of option values to the JSON the API expects, and the generic
`--set field=value` parser that makes every other field reachable. Reads the model classes
only (never instantiates them for validation: the server is the judge) and does no I/O.
"""

from __future__ import annotations

import enum
import functools
import json
import operator
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

from pydantic import BaseModel

from hivenet.model import KINDS, PortRange, TopologyObject
from hivenet.model.subnet import AllocationPool, HostRoute
from hivenet.model.topology import TunnelZoneMember
from hivenet.model.types import (
    FixedIp,
    IpAddress,
    IpInterface,
    IpNetwork,
    MacAddress,
    ObjectId,
    VlanId,
    Weight,
)


class OptionValueError(ValueError):
    """A command-line value that cannot be turned into the field's JSON form."""


def parse_port_range(text: str) -> dict[str, int]:
    """`80` or `1000-2000` -> `{"start": .., "end": ..}` (the server checks the bounds)."""
    start_text, sep, end_text = text.strip().partition("-")
    try:
        start = int(start_text)
        end = int(end_text) if sep else start
    except ValueError:
        raise OptionValueError(
            f"invalid port range {text!r}: expected PORT or START-END, e.g. 80 or 1000-2000"
        ) from None
    return {"start": start, "end": end}


def _parse_pair(text: str, separator: str, fields: tuple[str, str], what: str) -> dict[str, str]:
    """`LEFT<separator>RIGHT` (both non-empty) -> `{fields[0]: LEFT, fields[1]: RIGHT}`;
    `what` names the value and shows an example in the error."""
    left, sep, right = text.partition(separator)
    if not sep or not left.strip() or not right.strip():
        raise OptionValueError(f"invalid {text!r}: expected {what}")
    return {fields[0]: left.strip(), fields[1]: right.strip()}


def parse_tunnel_zone_member(text: str) -> dict[str, str]:
    """`HOST_ID=UNDERLAY_IP` -> `{"host_id": .., "underlay_ip": ..}`."""
    return _parse_pair(
        text,
        "=",
        ("host_id", "underlay_ip"),
        "a tunnel zone member HOST_ID=UNDERLAY_IP, e.g. host-1=192.168.100.1",
    )


def parse_fixed_ip(text: str) -> dict[str, str | None]:
    """`SUBNET_ID` (allocate) or `SUBNET_ID=IP` (pin) -> `{"subnet_id": .., "ip_address": ..}`."""
    subnet_id, sep, address = text.partition("=")
    if not subnet_id.strip() or (sep and not address.strip()):
        raise OptionValueError(
            f"invalid fixed IP {text!r}: expected SUBNET_ID (the next free address) or "
            "SUBNET_ID=IP, e.g. 3f2a...=10.0.1.20"
        )
    return {"subnet_id": subnet_id.strip(), "ip_address": address.strip() if sep else None}


def parse_allocation_pool(text: str) -> dict[str, str]:
    """`START-END` -> `{"start": .., "end": ..}`."""
    return _parse_pair(
        text, "-", ("start", "end"), "an allocation pool START-END, e.g. 10.0.1.10-10.0.1.99"
    )


def parse_host_route(text: str) -> dict[str, str]:
    """`DESTINATION=NEXTHOP` -> `{"destination": .., "nexthop": ..}`."""
    return _parse_pair(
        text,
        "=",
        ("destination", "nexthop"),
        "a host route DESTINATION=NEXTHOP, e.g. 192.168.0.0/16=10.0.1.254",
    )


# Readable phrases for the annotated scalar types of hivenet.model.types.
_TYPE_PHRASES: list[tuple[Any, str]] = [
    (MacAddress, "MAC address, e.g. 02:00:00:00:00:01"),
    (ObjectId, "id"),
    (IpInterface, "address with prefix, e.g. 10.0.1.1/24"),
    (IpNetwork, "network in CIDR notation, e.g. 10.0.1.0/24"),
    (IpAddress, "IP address, e.g. 10.0.1.11"),
    (VlanId, "VLAN id 1-4094"),
    (Weight, "integer 0-65535"),
    (PortRange, "L4 port or range, e.g. 80 or 1000-2000"),
    (TunnelZoneMember, "HOST_ID=UNDERLAY_IP, e.g. host-1=192.168.100.1"),
    (FixedIp, "SUBNET_ID (next free address) or SUBNET_ID=IP"),
    (AllocationPool, "START-END, e.g. 10.0.1.10-10.0.1.99"),
    (HostRoute, "DESTINATION=NEXTHOP, e.g. 192.168.0.0/16=10.0.1.254"),
]

# Converters from one command-line string to the field's JSON value, by element type.
_CONVERTERS: list[tuple[Any, Callable[[str], Any]]] = [
    (PortRange, parse_port_range),
    (TunnelZoneMember, parse_tunnel_zone_member),
    (FixedIp, parse_fixed_ip),
    (AllocationPool, parse_allocation_pool),
    (HostRoute, parse_host_route),
]


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    """(annotation without None, whether None was allowed)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [arg for arg in args if arg is not type(None)]
        if len(rest) != len(args):
            return functools.reduce(operator.or_, rest), True
    return annotation, False


def _tuple_element(annotation: Any) -> Any | None:
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
    return None


def _same_type(left: Any, right: Any) -> bool:
    try:
        return bool(left == right)
    except TypeError:
        return False


@functools.cache
def _type_hints(model: type[BaseModel]) -> dict[str, Any]:
    return typing.get_type_hints(model, include_extras=True)


def _bare(annotation: Any) -> Any:
    """The runtime class behind an `Annotated[...]` alias."""
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


@dataclass(frozen=True, slots=True)
class FieldShape:
    """What the CLI needs to know about one model field's type."""

    element: Any  # the (element) annotation, Optional stripped
    repeated: bool  # a tuple field: the option may be given several times
    nullable: bool

    @property
    def python_type(self) -> type:
        """The type typer parses the option value into."""
        bare = _bare(self.element)
        if bare is bool:
            return bool
        if bare is int:
            return int
        if isinstance(bare, type) and issubclass(bare, enum.Enum):
            return bare
        return str

    def converter(self) -> Callable[[Any], Any]:
        for annotation, convert in _CONVERTERS:
            if _same_type(self.element, annotation):
                return convert
        return lambda value: value.value if isinstance(value, enum.Enum) else value


def field_shape(model: type[BaseModel], field_name: str) -> FieldShape:
    annotation, nullable = _strip_optional(_type_hints(model)[field_name])
    element = _tuple_element(annotation)
    if element is not None:
        return FieldShape(element, repeated=True, nullable=nullable)
    return FieldShape(annotation, repeated=False, nullable=nullable)


def _type_phrase(model: type[BaseModel], field_name: str, shape: FieldShape) -> str:
    for annotation, phrase in _TYPE_PHRASES:
        if _same_type(shape.element, annotation):
            return phrase
    bare = _bare(shape.element)
    if isinstance(bare, type) and issubclass(bare, enum.Enum):
        return "one of " + "|".join(str(member.value) for member in bare)
    if bare is bool:
        return "flag"
    if bare is int:
        bounds = _int_bounds(model, field_name)
        return f"integer {bounds}" if bounds else "integer"
    return "text"


def _int_bounds(model: type[BaseModel], field_name: str) -> str:
    low = high = None
    for constraint in model.model_fields[field_name].metadata:
        low = getattr(constraint, "ge", low)
        high = getattr(constraint, "le", high)
    if low is None and high is None:
        return ""
    if high is None:
        return f">= {low}"
    if low is None:
        return f"<= {high}"
    if high > 0xFFFF:
        return f"{low}-{high:#x}"
    return f"{low}-{high}"


def default_json(model: type[BaseModel], field_name: str) -> tuple[bool, Any]:
    """(has a fixed default, that default as JSON). Factory defaults count as not fixed."""
    info = model.model_fields[field_name]
    if info.is_required() or info.default_factory is not None:
        return False, None
    value = info.default
    if isinstance(value, enum.Enum):
        return True, value.value
    if isinstance(value, tuple):
        return True, list(value)
    return True, value


def field_help(model: type[TopologyObject], field_name: str, hint: str = "") -> str:
    """Option help derived from the model: field, type, reference, required/default."""
    shape = field_shape(model, field_name)
    parts = [f"{field_name}:", _type_phrase(model, field_name, shape)]
    referenced = model.REFS.get(field_name)
    if referenced:
        parts.append(f"(a {referenced.replace('_', ' ')})")
    if hint:
        parts.append(f"- {hint}")
    if shape.repeated:
        parts.append("- repeat for several; giving it replaces the whole list")
    info = model.model_fields[field_name]
    if info.is_required():
        parts.append("- required on create")
    else:
        fixed, default = default_json(model, field_name)
        if fixed and default not in (None, "", []) and not isinstance(default, bool):
            parts.append(f"- default {default}")
    return " ".join(parts)


@dataclass(frozen=True, slots=True)
class FieldOption:
    """A first-class option for one model field. `flag` defaults to --<field-with-dashes>;
    booleans get a --x/--no-x pair. `list_filter` names the list query parameter it also
    serves as (e.g. `device_id` for ports)."""

    field: str
    flag: str = ""
    hint: str = ""
    list_filter: str | None = None

    @property
    def long_flag(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")


def _opts(*specs: str | FieldOption) -> tuple[FieldOption, ...]:
    return tuple(FieldOption(spec) if isinstance(spec, str) else spec for spec in specs)


COMMON_OPTIONS = _opts(
    FieldOption("name", list_filter="name"),
    FieldOption("tenant_id", list_filter="tenant_id"),
)

_CHAIN_OPTIONS = ("inbound_chain_id", "outbound_chain_id")
_ADMIN_STATE = FieldOption("admin_state_up", flag="--admin-state-up/--admin-state-down")

KIND_OPTIONS: dict[str, tuple[FieldOption, ...]] = {
    "bridge": _opts(
        _ADMIN_STATE,
        "arp_proxy",
        FieldOption("mtu", hint="the MTU DHCP gives its VMs (default: underlay MTU - 50)"),
        *_CHAIN_OPTIONS,
    ),
    "router": _opts(_ADMIN_STATE, *_CHAIN_OPTIONS),
    "port": _opts(
        FieldOption("device_kind", hint="what --device-id names"),
        FieldOption("device_id", hint="the owning bridge or router", list_filter="device_id"),
        FieldOption("mac", hint="random if omitted on create"),
        FieldOption("addresses", flag="--address"),
        FieldOption("fixed_ips", flag="--subnet", hint="an address on a subnet (IPAM)"),
        FieldOption("peer_id", hint="links two devices (interior port)"),
        FieldOption("host_id", hint="with --interface: bind to a host interface"),
        FieldOption("interface_name", flag="--interface", hint="host interface to bind"),
        FieldOption("interface_vlan", hint="with --interface: bind to this VLAN of it"),
        FieldOption("vtep_ip", hint="with --vtep-vni: join an external VXLAN VTEP"),
        FieldOption("vtep_vni", hint="the VNI the VTEP uses for this bridge"),
        "vlan_id",
        FieldOption("port_group_ids", flag="--port-group-id"),
        _ADMIN_STATE,
        *_CHAIN_OPTIONS,
    ),
    "route": _opts(
        FieldOption("router_id", list_filter="router_id"),
        FieldOption("dst_prefix", flag="--dst"),
        FieldOption("src_prefix", flag="--src"),
        FieldOption("next_hop_port_id", flag="--next-hop-port"),
        FieldOption("next_hop_gateway", flag="--gateway"),
        "weight",
        "type",
        FieldOption("learned_from", hint="the bgp_peer that learned it (set by its speaker)"),
    ),
    "chain": (),
    "rule": _opts(
        FieldOption("chain_id", list_filter="chain_id"),
        "action",
        FieldOption("position", hint="lower runs first"),
        FieldOption("jump_chain_id", hint="target of a jump rule"),
        "nw_src",
        "nw_dst",
        FieldOption("nw_proto", hint="IP protocol number, e.g. 6 for TCP"),
        "tp_src",
        "tp_dst",
        FieldOption("in_port_ids", flag="--in-port-id"),
        FieldOption("out_port_ids", flag="--out-port-id"),
    ),
    "subnet": _opts(
        FieldOption("bridge_id", list_filter="bridge_id"),
        "cidr",
        FieldOption("gateway_ip", flag="--gateway", hint="default: the first host address"),
        FieldOption("allocation_pools", flag="--pool", hint="default: every host but the gateway"),
        FieldOption("dns_nameservers", flag="--dns"),
        FieldOption("host_routes", flag="--host-route"),
        FieldOption("enable_dhcp", flag="--dhcp/--no-dhcp"),
        FieldOption("lease_time", hint="DHCP lease, seconds"),
        FieldOption("domain_name", flag="--domain"),
    ),
    "port_group": _opts("stateful"),
    "bgp_peer": _opts(
        FieldOption("port_id", hint="the router's uplink port", list_filter="port_id"),
        "local_as",
        "peer_as",
        FieldOption("peer_ip", hint="the neighbour, on the uplink's subnet"),
        FieldOption("hold_time", hint="seconds (3..65535)"),
        FieldOption("advertise", flag="--advertise", hint="a prefix announced (repeat)"),
        _ADMIN_STATE,
    ),
    "ip_addr_group": _opts(FieldOption("addresses", flag="--address")),
    "host": (),
    "tunnel_zone": _opts(FieldOption("members", flag="--member"), "vxlan_port"),
    "load_balancer": _opts(
        FieldOption(
            "router_id", hint="the router that answers for its VIPs", list_filter="router_id"
        ),
        _ADMIN_STATE,
    ),
    "listener": _opts(
        FieldOption("load_balancer_id", list_filter="load_balancer_id"),
        FieldOption("vip_address", flag="--vip"),
        "protocol",
        FieldOption("protocol_port", flag="--port"),
        FieldOption("default_pool_id", flag="--pool-id", hint="where new flows go"),
        FieldOption("allowed_cidrs", flag="--allowed-cidr", hint="clients allowed (default all)"),
        _ADMIN_STATE,
    ),
    "pool": _opts(
        FieldOption("load_balancer_id", list_filter="load_balancer_id"),
        "protocol",
        "ip_version",
        "algorithm",
        "session_persistence",
        FieldOption("persistence_timeout", hint="seconds, with session persistence"),
        _ADMIN_STATE,
    ),
    "member": _opts(
        FieldOption("pool_id", list_filter="pool_id"),
        "address",
        FieldOption("protocol_port", flag="--port"),
        FieldOption("weight", hint="0 takes no new flows"),
        "monitor_address",
        "monitor_port",
        _ADMIN_STATE,
    ),
    "health_monitor": _opts(
        FieldOption("pool_id", list_filter="pool_id"),
        "type",
        FieldOption("delay", hint="seconds between probes"),
        FieldOption("timeout", hint="seconds, at most the delay"),
        FieldOption("max_retries", hint="successes in a row to mark a member up"),
        FieldOption("max_retries_down", hint="failures in a row to mark a member down"),
        "http_method",
        "url_path",
        FieldOption("expected_codes", hint="e.g. 200-299,302"),
        _ADMIN_STATE,
    ),
    "security_group": _opts("description"),
    "security_group_rule": _opts(
        FieldOption("security_group_id", list_filter="security_group_id"),
        "direction",
        "ethertype",
        FieldOption("protocol", hint="IP protocol number, e.g. 6 for TCP"),
        FieldOption("port_range_min", hint="first port (ICMP: the type)"),
        FieldOption("port_range_max", hint="last port (ICMP: the code)"),
        "remote_ip_prefix",
        "remote_group_id",
    ),
    "floating_ip": _opts(
        FieldOption("floating_ip_address", flag="--floating-ip"),
        FieldOption("router_id", list_filter="router_id"),
        FieldOption("port_id", hint="the fixed port"),
        FieldOption("fixed_ip_address", flag="--fixed-ip"),
    ),
}


def options_for(kind: str) -> tuple[FieldOption, ...]:
    return COMMON_OPTIONS + KIND_OPTIONS[kind]


def list_filters_for(kind: str) -> tuple[FieldOption, ...]:
    return tuple(option for option in options_for(kind) if option.list_filter)


# -- --set FIELD=VALUE ---------------------------------------------------------------------


@functools.cache
def _json_schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


def _accepted_json_types(node: dict[str, Any], defs: dict[str, Any]) -> set[str]:
    if "$ref" in node:
        return _accepted_json_types(defs.get(node["$ref"].rsplit("/", 1)[-1], {}), defs)
    accepted: set[str] = set()
    for key in ("anyOf", "oneOf", "allOf"):
        for child in node.get(key, ()):
            accepted |= _accepted_json_types(child, defs)
    declared = node.get("type")
    if isinstance(declared, str):
        accepted.add(declared)
    elif isinstance(declared, list):
        accepted.update(declared)
    if "integer" in accepted:
        accepted.add("number")
    return accepted or {"any"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def parse_field_value(model: type[BaseModel], field_name: str, raw: str) -> Any:
    """JSON when `raw` parses as JSON of a type the field accepts, else the raw string.

    So `--set vlan_id=10` sends 10 and `--set peer_id=null` sends null, while
    `--set name=123` keeps the string "123" because a name is always text.
    """
    try:
        parsed = json.loads(raw)
    except ValueError:
        return raw
    schema = _json_schema(model)
    accepted = _accepted_json_types(schema["properties"][field_name], schema.get("$defs", {}))
    kind_of_value = _json_type(parsed)
    if "any" in accepted or kind_of_value in accepted:
        return parsed
    if "string" in accepted:
        return raw
    return parsed


def parse_assignments(model: type[TopologyObject], assignments: Sequence[str]) -> dict[str, Any]:
    """`--set` values (`field=value`) -> {field: JSON value}; unknown or repeated fields fail."""
    fields: dict[str, Any] = {}
    for assignment in assignments:
        name, sep, raw = assignment.partition("=")
        field_name = name.strip().replace("-", "_")
        if not sep or not field_name:
            raise OptionValueError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. name=web")
        if field_name not in model.model_fields:
            known = ", ".join(sorted(model.model_fields))
            raise OptionValueError(
                f"--set {assignment!r}: {model.KIND} has no field {field_name!r} (fields: {known})"
            )
        if field_name in fields:
            raise OptionValueError(f"--set {assignment!r}: field {field_name!r} given twice")
        fields[field_name] = parse_field_value(model, field_name, raw)
    return fields


def model_for(kind: str) -> type[TopologyObject]:
    return KINDS[kind]
