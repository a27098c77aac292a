"""The pure part of the BGP speakers (agent/bgp.py): BIRD's configuration, reading what BIRD
learned, and the routes written for it."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from hivenet.agent.bgp import (
    LearnedRoute,
    bird_config,
    learned_routes_for,
    namespace_name,
    parse_learned_routes,
    route_id_for,
    uplink_address,
)
from hivenet.model import BgpPeer, DeviceKind, Port

# `birdc show route protocol hn_peer` of BIRD 2.0.12 (two routes, one with two next hops, and
# an unreachable one a peer may send).
BIRD_OUTPUT = """BIRD 2.0.12 ready.
Table master4:
0.0.0.0/0            unicast [hn_peer 23:50:30.549] * (100) [AS65000i]
\tvia 192.0.2.2 on hnbgp0
203.0.113.0/24       unicast [hn_peer 23:50:31.001] * (100) [AS65000 64999i]
\tvia 192.0.2.3 on hnbgp0 weight 1
\tvia 192.0.2.4 on hnbgp0 weight 1
198.18.0.0/15        unreachable [hn_peer 23:50:31.002] * (100) [AS65000i]
"""


def peer(**fields: object) -> BgpPeer:
    values: dict[str, object] = {
        "id": "peer1",
        "port_id": "up1",
        "local_as": 65001,
        "peer_as": 65000,
        "peer_ip": "192.0.2.2",
        "advertise": ["198.51.100.0/24", "203.0.113.128/25"],
    }
    values.update(fields)
    return BgpPeer.model_validate(values)


def uplink() -> Port:
    return Port(
        id="up1",
        tenant_id="admin",
        device_kind=DeviceKind.ROUTER,
        device_id="r1",
        addresses=(
            ipaddress.IPv4Interface("192.0.2.1/25"),
            ipaddress.IPv4Interface("198.51.100.1/24"),
        ),
    )


def test_parse_learned_routes_keeps_unicast_routes_and_their_first_next_hop() -> None:
    assert parse_learned_routes(BIRD_OUTPUT) == [
        LearnedRoute(ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv4Address("192.0.2.2")),
        LearnedRoute(ipaddress.IPv4Network("203.0.113.0/24"), ipaddress.IPv4Address("192.0.2.3")),
    ]
    assert parse_learned_routes("BIRD 2.0.12 ready.\n") == []


def test_bird_config_speaks_from_the_uplink_and_announces_the_public_prefixes() -> None:
    text = bird_config(peer(hold_time=3), ipaddress.IPv4Address("192.0.2.1"))
    assert "local 192.0.2.1 as 65001;" in text
    assert "neighbor 192.0.2.2 as 65000;" in text
    assert "hold time 3;" in text and "keepalive time 1;" in text
    assert "route 198.51.100.0/24 unreachable;" in text
    assert "route 203.0.113.128/25 unreachable;" in text
    assert "kernel" not in text  # learned routes stay in BIRD; the agent takes them


def test_learned_routes_become_marked_routes_of_the_uplinks_router() -> None:
    learned = parse_learned_routes(BIRD_OUTPUT)
    routes = learned_routes_for(peer(), uplink(), learned)
    assert [str(r.dst_prefix) for r in routes] == ["0.0.0.0/0", "203.0.113.0/24"]
    for route in routes:
        assert route.learned_from == "peer1"
        assert route.router_id == "r1" and route.next_hop_port_id == "up1"
    assert routes[0].id == "learned.peer1.0.0.0.0_0"
    long_id = route_id_for("p" * 64, ipaddress.IPv4Network("10.0.0.0/8"))
    assert len(long_id) <= 64 and long_id == route_id_for(
        "p" * 64, ipaddress.IPv4Network("10.0.0.0/8")
    )


def test_uplink_address_is_the_one_on_the_peers_subnet() -> None:
    assert uplink_address(uplink(), ipaddress.IPv4Address("192.0.2.2")) == ipaddress.IPv4Interface(
        "192.0.2.1/25"
    )
    assert uplink_address(uplink(), ipaddress.IPv4Address("192.0.2.200")) is None


def test_namespace_names_are_short_prefixed_and_distinct() -> None:
    names = {
        namespace_name(h, p, inode) for h in ("gw1", "gw2") for p in ("a", "b") for inode in (1, 2)
    }
    assert len(names) == 8
    assert all(name.startswith("hn-bgp") and len(name) == 15 for name in names)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("local_as", 0),
        ("peer_as", 4294967296),
        ("hold_time", 2),
        ("peer_ip", "2001:db8::1"),
        ("advertise", ["198.51.100.0/24", "198.51.100.0/24"]),
        ("advertise", ["2001:db8::/32"]),
    ],
)
def test_bad_bgp_peers_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        peer(**{field: value})
    assert field in str(caught.value)
