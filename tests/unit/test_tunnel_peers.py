"""`hivenet.agent.underlay.tunnel_peer_addresses`: which underlay sources a host accepts."""

from __future__ import annotations

from hivenet.agent.underlay import tunnel_peer_addresses
from hivenet.model import TunnelZone, TunnelZoneMember


def zone(zone_id: str, **members: str) -> TunnelZone:
    return TunnelZone(
        id=zone_id,
        name=zone_id,
        members=tuple(TunnelZoneMember(host_id=h, underlay_ip=ip) for h, ip in members.items()),  # type: ignore[arg-type]
    )


def test_live_members_of_my_zones_only() -> None:
    zones = [
        zone("tz1", h1="10.0.0.1", h2="10.0.0.2", h3="10.0.0.3"),
        zone("tz2", h1="10.1.0.1", h4="10.1.0.4"),
        zone("tz3", h5="10.2.0.5", h6="10.2.0.6"),  # h1 is not in it
    ]
    live = {"h1", "h2", "h4", "h5", "h6"}  # h3 is down
    assert tunnel_peer_addresses(zones, "h1", live) == {"10.0.0.2", "10.1.0.4"}


def test_a_host_in_no_zone_has_no_peers() -> None:
    zones = [zone("tz1", h2="10.0.0.2", h3="10.0.0.3")]
    assert tunnel_peer_addresses(zones, "h1", {"h2", "h3"}) == frozenset()
