"""Security groups and floating IPs: `SecurityGroup`, `SecurityGroupRule`, `FloatingIp`.

Owns their shape and the checks one object can make on its own (a port range only for TCP,
UDP or ICMP, a remote prefix of the rule's ethertype, an ICMP "range" that is a type and a
code, a floating IP and its fixed IP of one family). The per-port port-security fields
(`port_security_enabled`, `security_group_ids`, `allowed_address_pairs`) live on `Port`.

How they are used (see `sim/secgroups.py`): a port's security groups are compiled into two
virtual chains per port (what the VM sends: egress rules; what it receives: ingress rules),
stateful (replies to an allowed connection pass); a floating IP is 1:1 NAT on its router
(DNAT of the floating address to the fixed one, SNAT of the fixed one when it leaves through
the router port whose subnet holds the floating address, and ARP answers for the floating
address on that port).

Must not touch the store, the clock or any I/O.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from pydantic import Field, model_validator

from hivenet.model.topology import TopologyObject
from hivenet.model.types import IpAddress, IpNetwork, ObjectId

IP_PROTO_ICMP = 1
IP_PROTO_TCP = 6
IP_PROTO_UDP = 17
IP_PROTO_ICMPV6 = 58


class Direction(enum.StrEnum):
    INGRESS = "ingress"  # traffic to the port's VM
    EGRESS = "egress"  # traffic the VM sends


class EtherType(enum.StrEnum):
    IPV4 = "IPv4"
    IPV6 = "IPv6"

    @property
    def version(self) -> int:
        return 4 if self is EtherType.IPV4 else 6


class SecurityGroup(TopologyObject):
    """A named set of allow rules; ports name the groups they are in."""

    KIND: ClassVar[str] = "security_group"

    description: str = Field(default="", max_length=255)


class SecurityGroupRule(TopologyObject):
    """One allow rule of a security group (everything not allowed is dropped).

    `protocol`: IP protocol number (None: any). `port_range_min`/`port_range_max`: the
    destination port range for TCP/UDP; for ICMP/ICMPv6 (Neutron's convention) the ICMP type
    and code. `remote_ip_prefix` or `remote_group_id` (not both) restrict the other end: its
    source address for ingress, its destination for egress.
    """

    KIND: ClassVar[str] = "security_group_rule"
    REFS: ClassVar[dict[str, str]] = {
        "security_group_id": "security_group",
        "remote_group_id": "security_group",
    }

    security_group_id: ObjectId
    direction: Direction
    ethertype: EtherType = EtherType.IPV4
    protocol: int | None = Field(default=None, ge=0, le=255)
    port_range_min: int | None = Field(default=None, ge=0, le=65535)
    port_range_max: int | None = Field(default=None, ge=0, le=65535)
    remote_ip_prefix: IpNetwork | None = None
    remote_group_id: ObjectId | None = None

    @property
    def is_icmp(self) -> bool:
        return self.protocol in (IP_PROTO_ICMP, IP_PROTO_ICMPV6)

    @model_validator(mode="after")
    def _check(self) -> SecurityGroupRule:
        if self.remote_ip_prefix is not None and self.remote_group_id is not None:
            raise ValueError(
                f"security group rule: remote_ip_prefix={self.remote_ip_prefix} and "
                f"remote_group_id={self.remote_group_id} are mutually exclusive"
            )
        if (
            self.remote_ip_prefix is not None
            and self.remote_ip_prefix.version != self.ethertype.version
        ):
            raise ValueError(
                f"security group rule: remote_ip_prefix {self.remote_ip_prefix} is not "
                f"{self.ethertype.value}"
            )
        has_ports = self.port_range_min is not None or self.port_range_max is not None
        if has_ports and self.protocol not in (
            IP_PROTO_TCP,
            IP_PROTO_UDP,
            IP_PROTO_ICMP,
            IP_PROTO_ICMPV6,
        ):
            raise ValueError(
                f"security group rule: port_range_min/max need protocol 6, 17, 1 or 58, "
                f"got protocol={self.protocol}"
            )
        if self.is_icmp:
            if self.port_range_min is None and self.port_range_max is not None:
                raise ValueError(
                    f"security group rule: ICMP code port_range_max={self.port_range_max} "
                    "needs an ICMP type in port_range_min"
                )
            for name in ("port_range_min", "port_range_max"):
                value = getattr(self, name)
                if value is not None and value > 255:
                    raise ValueError(
                        f"security group rule: ICMP {name} is a type/code 0..255, got {value}"
                    )
        elif has_ports:
            if self.port_range_min is None or self.port_range_max is None:
                raise ValueError(
                    "security group rule: give both port_range_min and port_range_max, got "
                    f"{self.port_range_min}..{self.port_range_max}"
                )
            if self.port_range_min > self.port_range_max:
                raise ValueError(
                    f"security group rule: port_range_min {self.port_range_min} is greater "
                    f"than port_range_max {self.port_range_max}"
                )
        return self


class FloatingIp(TopologyObject):
    """A public address 1:1 NATed by `router_id` to a fixed address: `fixed_ip_address`, or
    the port `port_id`'s first address of the same family when only the port is given.
    Unassociated (neither set) it is reserved and does nothing."""

    KIND: ClassVar[str] = "floating_ip"
    REFS: ClassVar[dict[str, str]] = {"router_id": "router", "port_id": "port"}

    floating_ip_address: IpAddress
    router_id: ObjectId
    port_id: ObjectId | None = None
    fixed_ip_address: IpAddress | None = None

    @model_validator(mode="after")
    def _check(self) -> FloatingIp:
        if (
            self.fixed_ip_address is not None
            and self.fixed_ip_address.version != self.floating_ip_address.version
        ):
            raise ValueError(
                f"floating IP {self.floating_ip_address}: fixed_ip_address "
                f"{self.fixed_ip_address} is of another IP version"
            )
        if self.fixed_ip_address is not None and self.fixed_ip_address == (
            self.floating_ip_address
        ):
            raise ValueError(
                f"floating IP {self.floating_ip_address}: fixed_ip_address is the same address"
            )
        return self


SECURITY_KINDS: tuple[type[TopologyObject], ...] = (SecurityGroup, SecurityGroupRule, FloatingIp)
