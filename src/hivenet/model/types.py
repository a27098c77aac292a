"""Validated scalar types shared by the topology objects: ids, MACs, VLANs, port ranges.

Each type rejects bad input at construction with a message that names the value; pydantic adds
the field name. Nothing here touches I/O.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def new_id() -> str:
    return str(uuid.uuid4())


def _check_id(value: str) -> str:
    if not _ID_RE.match(value):
        raise ValueError(
            f"invalid id {value!r}: 1-64 characters of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return value


def _check_mac(value: str) -> str:
    normalized = value.strip().lower().replace("-", ":")
    if not _MAC_RE.match(normalized):
        raise ValueError(
            f"invalid MAC address {value!r}: expected six hex octets like 02:00:00:00:00:01"
        )
    return normalized


ObjectId = Annotated[str, AfterValidator(_check_id)]
MacAddress = Annotated[str, AfterValidator(_check_mac)]
VlanId = Annotated[int, Field(ge=1, le=4094)]
L4Port = Annotated[int, Field(ge=0, le=65535)]
Weight = Annotated[int, Field(ge=0, le=65535)]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

TUNNEL_KEY_MIN = 1  # 0 is never a port
TUNNEL_KEY_MAX = 0xEFFFFF  # 0xF00000.. are reserved: flood keys and flow-state messages
FLOOD_KEY_BASE = 0xF00000
FLOWSTATE_TUNNEL_KEY = 0xFFFFFF


def mac_to_int(mac: str) -> int:
    return int(mac.replace(":", ""), 16)


def int_to_mac(value: int) -> str:
    raw = f"{value:012x}"
    return ":".join(raw[i : i + 2] for i in range(0, 12, 2))


def random_mac() -> str:
    """A locally administered unicast MAC (02:xx:...)."""
    raw = uuid.uuid4().int & 0xFFFFFFFFFF
    return int_to_mac((0x02 << 40) | raw)


class _Value(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PortRange(_Value):
    """An inclusive L4 port range; `start == end` is a single port."""

    start: L4Port
    end: L4Port

    @model_validator(mode="after")
    def _ordered(self) -> PortRange:
        if self.start > self.end:
            raise ValueError(f"port range start {self.start} is greater than end {self.end}")
        return self

    def contains(self, port: int) -> bool:
        return self.start <= port <= self.end


class NatTarget(_Value):
    """Where NAT may translate to: an address range and an L4 port range (0-0 = keep port)."""

    address_from: IpAddress
    address_to: IpAddress
    port_from: L4Port = 0
    port_to: L4Port = 0

    @model_validator(mode="after")
    def _ordered(self) -> NatTarget:
        if self.address_from.version != self.address_to.version:
            raise ValueError(
                f"NAT target mixes IPv{self.address_from.version} and IPv{self.address_to.version}"
            )
        if int(self.address_from) > int(self.address_to):
            raise ValueError(
                f"NAT address_from {self.address_from} is greater than address_to {self.address_to}"
            )
        if self.port_from > self.port_to:
            raise ValueError(
                f"NAT port_from {self.port_from} is greater than port_to {self.port_to}"
            )
        return self


class FixedIp(_Value):
    """One address of a port on a subnet (Neutron's fixed_ips entry). `ip_address` None on a
    create or update asks the store to allocate the next free address of the subnet's pools;
    a stored port always carries the address."""

    subnet_id: ObjectId
    ip_address: IpAddress | None = None


class AllowedAddressPair(_Value):
    """An extra (IP prefix, MAC) a port with port security may send from, as Neutron's
    allowed_address_pairs: `mac_address` None means the port's own MAC."""

    ip_address: IpNetwork
    mac_address: MacAddress | None = None


USER_DATA_MAX = 65536  # bytes, as Nova's limit on user data
PUBLIC_KEYS_MAX = 16
PUBLIC_KEY_MAX = 16384


class InstanceMetadata(_Value):
    """What the metadata service (169.254.169.254) tells the VM behind a port, as Nova's
    metadata does: `instance_id` (default: the port's id), `hostname` (default: the port's
    name, else `host-` and its address with dashes), SSH `public_keys` by name and
    `user_data` (cloud-init's input, at most 64 KiB)."""

    instance_id: str = Field(default="", max_length=255)
    hostname: str = Field(default="", max_length=253, pattern=r"^[A-Za-z0-9.-]*$")
    public_keys: dict[str, str] = Field(default_factory=dict)
    user_data: str = ""

    @field_validator("public_keys")
    @classmethod
    def _bounded_keys(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > PUBLIC_KEYS_MAX:
            raise ValueError(f"public_keys: at most {PUBLIC_KEYS_MAX} keys, got {len(value)}")
        for name, key in value.items():
            if not 1 <= len(name) <= 255 or not 1 <= len(key) <= PUBLIC_KEY_MAX:
                raise ValueError(
                    f"public_keys[{name[:40]!r}]: names are 1-255 characters, keys 1-"
                    f"{PUBLIC_KEY_MAX}"
                )
        return value

    @field_validator("user_data")
    @classmethod
    def _bounded_user_data(cls, value: str) -> str:
        size = len(value.encode())
        if size > USER_DATA_MAX:
            raise ValueError(f"user_data: {size} bytes, at most {USER_DATA_MAX}")
        return value
