"""The subnet model: Neutron defaults, field-named refusals, pool iteration, overlay MTU."""

from __future__ import annotations

import ipaddress
from typing import Any

import pydantic
import pytest

from hivenet.model import Bridge, DeviceKind, FixedIp, Port, Subnet, overlay_mtu
from hivenet.model.subnet import VXLAN_OVERHEAD, reserved_addresses


def subnet(**fields: Any) -> Subnet:
    return Subnet.model_validate({"bridge_id": "b1", "cidr": "10.0.0.0/24", **fields})


def test_left_out_gateway_and_pools_get_neutron_defaults() -> None:
    made = subnet()
    assert str(made.gateway_ip) == "10.0.0.1"
    assert [str(p) for p in made.allocation_pools] == ["10.0.0.2-10.0.0.254"]
    # An explicit null gateway and an explicit empty pool list stay.
    no_gateway = subnet(gateway_ip=None)
    assert no_gateway.gateway_ip is None
    assert [str(p) for p in no_gateway.allocation_pools] == ["10.0.0.1-10.0.0.254"]
    assert subnet(allocation_pools=[]).allocation_pools == ()
    # A gateway in the middle splits the default pool around it.
    middle = subnet(gateway_ip="10.0.0.100")
    assert [str(p) for p in middle.allocation_pools] == [
        "10.0.0.1-10.0.0.99",
        "10.0.0.101-10.0.0.254",
    ]


def test_json_round_trip_keeps_everything() -> None:
    made = subnet(
        dns_nameservers=["10.0.0.53"],
        host_routes=[{"destination": "192.168.0.0/16", "nexthop": "10.0.0.254"}],
        domain_name="acme.example",
        lease_time=600,
    )
    assert Subnet.model_validate_json(made.model_dump_json()) == made


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"cidr": "10.0.0.1/24"}, "cidr", "10.0.0.1/24"),
        ({"gateway_ip": "10.0.1.1"}, "gateway_ip", "outside the cidr"),
        ({"gateway_ip": "10.0.0.255"}, "gateway_ip", "broadcast"),
        (
            {"allocation_pools": [{"start": "10.0.0.0", "end": "10.0.0.9"}]},
            "allocation_pools",
            "network or broadcast",
        ),
        (
            {"allocation_pools": [{"start": "10.0.1.2", "end": "10.0.1.9"}]},
            "allocation_pools",
            "outside the cidr",
        ),
        (
            {"allocation_pools": [{"start": "10.0.0.1", "end": "10.0.0.9"}]},
            "allocation_pools",
            "gateway_ip 10.0.0.1",
        ),
        (
            {
                "allocation_pools": [
                    {"start": "10.0.0.2", "end": "10.0.0.9"},
                    {"start": "10.0.0.9", "end": "10.0.0.20"},
                ]
            },
            "allocation_pools",
            "overlap",
        ),
        ({"allocation_pools": [{"start": "10.0.0.9", "end": "10.0.0.2"}]}, "allocation_pools", ""),
        ({"dns_nameservers": ["2001:db8::53"]}, "dns_nameservers", "not IPv4"),
        (
            {"host_routes": [{"destination": "2001:db8::/64", "nexthop": "2001:db8::1"}]},
            "host_routes",
            "not IPv4",
        ),
        ({"domain_name": "bad..name"}, "domain_name", "bad..name"),
        ({"domain_name": "-x.example"}, "domain_name", "-x.example"),
        ({"lease_time": 5}, "lease_time", ""),
    ],
)
def test_bad_fields_are_refused_by_name(fields: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(pydantic.ValidationError) as raised:
        subnet(**fields)
    errors = raised.value.errors()
    assert any(error["loc"][:1] == (field,) for error in errors), errors
    assert words in str(raised.value)


def test_reserved_addresses_by_family_and_size() -> None:
    net = ipaddress.ip_network
    assert reserved_addresses(net("10.0.0.0/30")) == {
        int(ipaddress.ip_address("10.0.0.0")),
        int(ipaddress.ip_address("10.0.0.3")),
    }
    assert reserved_addresses(net("10.0.0.0/31")) == frozenset()
    assert reserved_addresses(net("2001:db8::/64")) == {int(ipaddress.ip_address("2001:db8::"))}


def test_address_problem_names_the_reason() -> None:
    made = subnet()
    assert made.address_problem(ipaddress.ip_address("10.0.0.7")) is None
    assert "outside" in (made.address_problem(ipaddress.ip_address("10.0.1.7")) or "")
    assert "broadcast" in (made.address_problem(ipaddress.ip_address("10.0.0.255")) or "")
    assert "outside" in (made.address_problem(ipaddress.ip_address("2001:db8::1")) or "")


def test_first_free_continues_after_the_hint_and_wraps() -> None:
    made = subnet(
        allocation_pools=[
            {"start": "10.0.0.10", "end": "10.0.0.12"},
            {"start": "10.0.0.20", "end": "10.0.0.21"},
        ]
    )
    as_int = {str(a): int(a) for a in made.pool_addresses()}
    assert list(as_int) == ["10.0.0.10", "10.0.0.11", "10.0.0.12", "10.0.0.20", "10.0.0.21"]
    assert str(made.first_free(set())) == "10.0.0.10"
    assert str(made.first_free({as_int["10.0.0.20"]}, as_int["10.0.0.12"])) == "10.0.0.21"
    # After the last address it wraps to the first free one.
    assert str(made.first_free({as_int["10.0.0.10"]}, as_int["10.0.0.21"])) == "10.0.0.11"
    assert made.first_free(set(as_int.values())) is None
    # Every address comes once whatever the hint.
    for hint in [None, *as_int.values(), 0, 2**32 - 1]:
        assert sorted(int(a) for a in made.pool_addresses(hint)) == sorted(as_int.values())


def test_overlay_mtu_defaults_to_underlay_less_vxlan() -> None:
    assert overlay_mtu(None) == 1500 - VXLAN_OVERHEAD == 1450
    assert overlay_mtu(None, 9000) == 8950
    assert overlay_mtu(1400, 9000) == 1400
    assert Bridge(mtu=1400).mtu == 1400
    with pytest.raises(pydantic.ValidationError, match="mtu"):
        Bridge(mtu=20)


def test_port_fixed_ips_reference_their_subnets_and_refuse_duplicates() -> None:
    port = Port(
        device_kind=DeviceKind.BRIDGE,
        device_id="b1",
        fixed_ips=(FixedIp(subnet_id="s1"), FixedIp(subnet_id="s2", ip_address="10.1.0.5")),
    )
    assert ("fixed_ips", "subnet", "s1") in port.references()
    assert ("fixed_ips", "subnet", "s2") in port.references()
    with pytest.raises(pydantic.ValidationError, match="twice"):
        Port.model_validate(
            {
                "device_kind": "bridge",
                "device_id": "b1",
                "fixed_ips": [
                    {"subnet_id": "s1", "ip_address": "10.0.0.5"},
                    {"subnet_id": "s1", "ip_address": "10.0.0.5"},
                ],
            }
        )
