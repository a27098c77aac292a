"""DHCPv4 messages (RFC 2131 / RFC 2132): the BOOTP header, the magic cookie and options.

Owns the wire format and the reply addressing rules of RFC 2131 4.1, so that `hivenet.sim`
can implement a DHCP server (lease choice, pools and timers are the simulation's business).
Options stay as ordered (code, data) pairs; `option()` joins split long options (RFC 3396).
Not handled: option overload into `sname`/`file` (option 52) is not unpacked.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import ClassVar, Self

from hivenet.packets.addresses import BROADCAST_MAC, IpLike, MacLike, ip_address, mac_to_int
from hivenet.packets.builders import build_udp_datagram
from hivenet.packets.errors import MalformedPacket, TruncatedPacket, UnsupportedPacket
from hivenet.packets.layout import Header, Layout, layout
from hivenet.packets.options import Option
from hivenet.packets.parse import parse_frame

DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
DHCP_MAGIC_COOKIE = 0x63825363
BOOTP_REQUEST = 1
BOOTP_REPLY = 2
BOOTP_FLAG_BROADCAST = 0x8000
BOOTP_MINIMUM_SIZE = 300  # RFC 1542 2.1: some clients drop shorter messages

# Message types (option 53).
DHCP_DISCOVER = 1
DHCP_OFFER = 2
DHCP_REQUEST = 3
DHCP_DECLINE = 4
DHCP_ACK = 5
DHCP_NAK = 6
DHCP_RELEASE = 7
DHCP_INFORM = 8

# Option codes.
OPTION_PAD = 0
OPTION_SUBNET_MASK = 1
OPTION_ROUTER = 3
OPTION_DNS_SERVERS = 6
OPTION_HOSTNAME = 12
OPTION_DOMAIN_NAME = 15
OPTION_INTERFACE_MTU = 26
OPTION_BROADCAST_ADDRESS = 28
OPTION_REQUESTED_IP = 50
OPTION_LEASE_TIME = 51
OPTION_OVERLOAD = 52
OPTION_MESSAGE_TYPE = 53
OPTION_SERVER_ID = 54
OPTION_PARAMETER_LIST = 55
OPTION_MESSAGE = 56
OPTION_MAX_MESSAGE_SIZE = 57
OPTION_RENEWAL_TIME = 58
OPTION_REBINDING_TIME = 59
OPTION_CLIENT_ID = 61
OPTION_DOMAIN_SEARCH = 119
OPTION_CLASSLESS_ROUTES = 121
OPTION_END = 255


@dataclass(frozen=True, slots=True)
class DhcpMessage(Header):
    """A BOOTP/DHCP message. `chaddr` is the 16-byte client hardware address field (the MAC
    is its first `hlen` bytes); `sname` and `file` are the raw 64/128-byte fields."""

    LAYOUT: ClassVar[Layout] = layout(
        "DHCP",
        ("op", 8),
        ("htype", 8),
        ("hlen", 8),
        ("hops", 8),
        ("xid", 32),
        ("secs", 16),
        ("flags", 16),
        ("ciaddr", 32),
        ("yiaddr", 32),
        ("siaddr", 32),
        ("giaddr", 32),
        ("chaddr", 128, True),
        ("sname", 512, True),
        ("file", 1024, True),
        ("magic_cookie", 32),
    )
    op: int
    htype: int
    hlen: int
    hops: int
    xid: int
    secs: int
    flags: int
    ciaddr: int
    yiaddr: int
    siaddr: int
    giaddr: int
    chaddr: bytes
    sname: bytes = bytes(64)
    file: bytes = bytes(128)
    magic_cookie: int = DHCP_MAGIC_COOKIE
    options: tuple[Option, ...] = ()

    def __post_init__(self) -> None:
        Header.__post_init__(self)
        for code, data in self.options:
            if not 1 <= code <= 254:
                raise MalformedPacket("DHCP", "options", f"code {code} is pad/end or invalid")
            if not isinstance(data, bytes):
                raise MalformedPacket("DHCP", "options", f"option {code} data is not bytes")

    @classmethod
    def decode(cls, data: bytes, offset: int = 0) -> Self:
        """Decode a UDP payload; a missing end option is tolerated, a bad cookie is not."""
        fixed = cls.LAYOUT.decode(data, offset)
        if fixed[-1] != DHCP_MAGIC_COOKIE:
            raise MalformedPacket(
                "DHCP", "magic_cookie", f"{fixed[-1]:#010x} is not {DHCP_MAGIC_COOKIE:#010x}"
            )
        options: list[Option] = []
        position = offset + cls.LAYOUT.size
        size = len(data)
        while position < size:
            code = data[position]
            if code == OPTION_END:
                break
            if code == OPTION_PAD:
                position += 1
                continue
            if position + 1 >= size:
                raise TruncatedPacket("DHCP", "options", f"option {code} has no length byte")
            length = data[position + 1]
            if position + 2 + length > size:
                raise TruncatedPacket(
                    "DHCP", "options", f"option {code} length {length} runs past the message"
                )
            options.append((code, bytes(data[position + 2 : position + 2 + length])))
            position += 2 + length
        return cls.from_fields(fixed, tuple(options))

    def encode(self) -> bytes:
        parts = [self.encode_fixed()]
        for code, data in self.options:
            # RFC 3396: an option longer than 255 bytes is split into consecutive instances.
            chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
            parts.extend(bytes((code, len(chunk))) + chunk for chunk in chunks)
        parts.append(bytes((OPTION_END,)))
        encoded = b"".join(parts)
        return encoded + bytes(max(0, BOOTP_MINIMUM_SIZE - len(encoded)))

    def option(self, code: int) -> bytes | None:
        """The data of option `code` (all instances joined, RFC 3396), None if absent."""
        found = [data for option_code, data in self.options if option_code == code]
        return b"".join(found) if found else None

    @property
    def message_type(self) -> int | None:
        data = self.option(OPTION_MESSAGE_TYPE)
        if data is None:
            return None
        if len(data) != 1:
            raise MalformedPacket("DHCP", "message_type", f"option 53 has {len(data)} bytes")
        return data[0]

    @property
    def client_mac(self) -> int:
        if self.htype != 1 or self.hlen != 6:
            raise UnsupportedPacket(
                "DHCP", "htype", f"not Ethernet (htype {self.htype}, hlen {self.hlen})"
            )
        return int.from_bytes(self.chaddr[:6], "big")

    @property
    def requested_ip(self) -> ipaddress.IPv4Address | None:
        data = self.option(OPTION_REQUESTED_IP)
        if data is None:
            return None
        if len(data) != 4:
            raise MalformedPacket("DHCP", "requested_ip", f"option 50 has {len(data)} bytes")
        return ipaddress.IPv4Address(data)


# --- option encoders -------------------------------------------------------------------------


def addresses_option(code: int, *addresses: IpLike) -> Option:
    """An option holding IPv4 addresses (router, DNS servers, server id, ...)."""
    packed = []
    for address in addresses:
        value = ip_address(address)
        if value.version != 4:
            raise ValueError(f"option {code}: {value} is not IPv4")
        packed.append(value.packed)
    return (code, b"".join(packed))


def u32_option(code: int, value: int) -> Option:
    """A 32-bit option (lease, renewal and rebinding times in seconds)."""
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"option {code}: {value} does not fit in 32 bits")
    return (code, value.to_bytes(4, "big"))


def message_type_option(message_type: int) -> Option:
    if not DHCP_DISCOVER <= message_type <= DHCP_INFORM:
        raise ValueError(f"message_type: {message_type} is not a DHCP message type (1..8)")
    return (OPTION_MESSAGE_TYPE, bytes((message_type,)))


def build_dhcp_request_message(
    *,
    client_mac: MacLike,
    xid: int,
    message_type: int = DHCP_DISCOVER,
    options: tuple[Option, ...] = (),
    broadcast: bool = True,
    ciaddr: int = 0,
) -> DhcpMessage:
    """A client message (DISCOVER, REQUEST, ...), as tests and the lab's fake clients send."""
    return DhcpMessage(
        BOOTP_REQUEST,
        1,
        6,
        0,
        xid,
        0,
        BOOTP_FLAG_BROADCAST if broadcast else 0,
        ciaddr,
        0,
        0,
        0,
        mac_to_int(client_mac).to_bytes(6, "big") + bytes(10),
        options=(message_type_option(message_type), *options),
    )


def dhcp_reply(
    request: DhcpMessage,
    *,
    message_type: int,
    your_ip: IpLike | None,
    server_ip: IpLike,
    options: tuple[Option, ...] = (),
) -> DhcpMessage:
    """A server reply (OFFER, ACK, NAK) to `request`: same xid, flags, relay and client
    address; message type and server identifier options first (RFC 2131 4.3)."""
    yiaddr = 0 if your_ip is None else int(ip_address(your_ip))
    return DhcpMessage(
        BOOTP_REPLY,
        request.htype,
        request.hlen,
        0,
        request.xid,
        0,
        request.flags,
        request.ciaddr if message_type == DHCP_ACK else 0,
        yiaddr,
        0,
        request.giaddr,
        request.chaddr,
        options=(
            message_type_option(message_type),
            addresses_option(OPTION_SERVER_ID, server_ip),
            *options,
        ),
    )


def build_dhcp_reply_frame(
    request_frame: bytes,
    reply: DhcpMessage,
    *,
    server_mac: MacLike,
    server_ip: IpLike,
) -> bytes:
    """The frame carrying `reply` to the client of `request_frame`, addressed per RFC 2131
    4.1: to a relay (giaddr) on port 67; else to ciaddr if set; else broadcast if the client
    asked (or for a NAK); else unicast to yiaddr at the client's MAC."""
    parsed = parse_frame(request_frame)
    vlan = parsed.vlan.vid if parsed.vlan else 0
    broadcast_ip = ipaddress.IPv4Address("255.255.255.255")
    destination_port = DHCP_CLIENT_PORT
    destination_mac: int = reply.client_mac
    if reply.giaddr:
        destination_ip = ipaddress.IPv4Address(reply.giaddr)
        destination_port = DHCP_SERVER_PORT
        destination_mac = parsed.ethernet.src
    elif reply.ciaddr and reply.message_type != DHCP_NAK:
        destination_ip = ipaddress.IPv4Address(reply.ciaddr)
    elif reply.flags & BOOTP_FLAG_BROADCAST or reply.message_type == DHCP_NAK or not reply.yiaddr:
        destination_ip = broadcast_ip
        destination_mac = BROADCAST_MAC
    else:
        destination_ip = ipaddress.IPv4Address(reply.yiaddr)
    return build_udp_datagram(
        eth_src=server_mac,
        eth_dst=destination_mac,
        ip_src=server_ip,
        ip_dst=destination_ip,
        src_port=DHCP_SERVER_PORT,
        dst_port=destination_port,
        payload=reply.encode(),
        vlan=vlan,
    )
