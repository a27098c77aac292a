"""BGP peering of a router's uplink port: `BgpPeer`, one session per uplink (infrastructure).

A `bgp_peer` says that the agent of the host where `port_id` (an exterior router port, the
uplink) is bound speaks BGP with `peer_ip` (a neighbour on that port's subnet, AS `peer_as`)
as AS `local_as` from the port's own address, announces `advertise` (the cloud's floating
ranges and the tenant prefixes meant to be public) with the port's address as next hop, and
writes what it learns into the port's router as routes marked `learned_from` this peer
(agent/bgp.py). Only the cluster admin writes these (api/tenancy.py).

`UplinkReport` is what that agent says about an uplink it binds (its link, its sessions),
under its host's state keys (agent/uplinks.py writes it, api/uplinks.py reads it).

Must not touch the store, the clock or any I/O.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hivenet.model.topology import TopologyObject
from hivenet.model.types import IpAddress, IpNetwork, ObjectId

BGP_TCP_PORT = 179
AS_MAX = 4294967295  # 4-byte AS numbers (RFC 6793)
# RFC 4271 4.2: 0 or at least 3 seconds; 0 (no keepalives) is not offered: a silent dead
# gateway must be noticed.
HOLD_TIME_MIN = 3
HOLD_TIME_MAX = 65535


class BgpPeer(TopologyObject):
    """One BGP session of an uplink port (see the module docstring)."""

    KIND: ClassVar[str] = "bgp_peer"
    REFS: ClassVar[dict[str, str]] = {"port_id": "port"}

    port_id: ObjectId
    local_as: int = Field(ge=1, le=AS_MAX)
    peer_as: int = Field(ge=1, le=AS_MAX)
    peer_ip: IpAddress
    hold_time: int = Field(default=9, ge=HOLD_TIME_MIN, le=HOLD_TIME_MAX)
    advertise: tuple[IpNetwork, ...] = Field(default=(), max_length=256)
    admin_state_up: bool = True

    @model_validator(mode="after")
    def _check(self) -> BgpPeer:
        if self.peer_ip.version != 4:
            raise ValueError(f"peer_ip: {self.peer_ip} is not IPv4 (IPv6 peering is not built)")
        for prefix in self.advertise:
            if prefix.version != 4:
                raise ValueError(f"advertise: {prefix} is not IPv4")
        if len(set(self.advertise)) != len(self.advertise):
            raise ValueError("advertise: a prefix appears twice")
        return self


BGP_KINDS: tuple[type[TopologyObject], ...] = (BgpPeer,)


class BgpSessionReport(BaseModel):
    """One session as the gateway's BIRD tells it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    state: str = Field(min_length=1, max_length=32)  # Established, Active, Connect, Idle, ...
    received: int = Field(default=0, ge=0)  # prefixes imported from the peer
    advertised: int = Field(default=0, ge=0)  # prefixes exported to the peer


class UplinkReport(BaseModel):
    """A gateway agent's report of one uplink port it binds: the interface's operational
    state (None: the agent cannot see it) and each running session, by bgp_peer id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    interface: str = Field(min_length=1, max_length=15)
    link_up: bool | None = None
    bgp: dict[str, BgpSessionReport] = {}
