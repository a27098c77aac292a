"""VXLAN encapsulation (RFC 7348) of an inner Ethernet frame in a UDP payload.

Owns the 8-byte header's meaning for HiveNet: the 24-bit VNI carries a tunnel key (egress
port, flood key or the flow-state key; their allocation is the agent's business, not this
module's). UDP and the outer IP belong to whoever sends: the userspace datapath uses a kernel
UDP socket; `build_vxlan_frame` exists for tests and for talking to raw interfaces.
"""

from __future__ import annotations

from hivenet.packets.addresses import IpLike, MacLike
from hivenet.packets.builders import build_udp_datagram
from hivenet.packets.headers import VXLAN_FLAG_VNI_VALID, VXLAN_PORT, VxlanHeader

VXLAN_HEADER_SIZE = 8
VXLAN_SOURCE_PORT_MIN = 49152  # RFC 7348 5: the dynamic range, chosen by hashing the inner flow


def vxlan_encapsulate(inner_frame: bytes, vni: int) -> bytes:
    """The UDP payload carrying `inner_frame` with tunnel key `vni` (0..2**24-1)."""
    return VxlanHeader(VXLAN_FLAG_VNI_VALID, 0, vni, 0).encode() + inner_frame


def vxlan_decapsulate(udp_payload: bytes) -> tuple[int, bytes]:
    """(vni, inner frame) of a VXLAN UDP payload; the I flag must be set (reserved bits are
    ignored, as RFC 7348 asks of receivers)."""
    header = VxlanHeader.decode(udp_payload, 0)
    return header.vni, bytes(udp_payload[VXLAN_HEADER_SIZE:])


def build_vxlan_frame(
    inner_frame: bytes,
    vni: int,
    *,
    eth_src: MacLike,
    eth_dst: MacLike,
    ip_src: IpLike,
    ip_dst: IpLike,
    src_port: int = VXLAN_SOURCE_PORT_MIN,
    dst_port: int = VXLAN_PORT,
) -> bytes:
    """A complete outer Ethernet/IP/UDP/VXLAN frame around `inner_frame`."""
    return build_udp_datagram(
        eth_src=eth_src,
        eth_dst=eth_dst,
        ip_src=ip_src,
        ip_dst=ip_dst,
        src_port=src_port,
        dst_port=dst_port,
        payload=vxlan_encapsulate(inner_frame, vni),
    )
