"""`vlan_access TAP TRUNK VLAN`: an 802.1Q access port, for a namespace whose kernel has no
VLAN devices (no 8021q, no bridge VLAN filtering, no tc vlan action, as on the lab machine).

Makes TAP device TAP (the "server" configures its address on it and its own kernel answers
ARP and ping), prints "ready", then relays until killed: every frame the server sends on TAP
leaves TRUNK tagged with VLAN; every frame arriving on TRUNK with that tag (inline, or in
PACKET_AUXDATA where the kernel took it off) reaches TAP untagged; anything else is dropped,
as a switch's access port would. The TAP device goes away with the process.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import sys

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
ETH_P_ALL = 3
ETH_P_8021Q = 0x8100
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_IGNORE_OUTGOING = 23
TP_STATUS_VLAN_VALID = 1 << 4
AUXDATA = struct.Struct("=IIIHHHH")  # status, len, snaplen, mac, net, vlan_tci, vlan_tpid


def untag(frame: bytes, ancillary: list[tuple[int, int, bytes]], vlan: int) -> bytes | None:
    """The frame without its tag when it was on `vlan`; None for anything else."""
    for level, kind, data in ancillary:
        if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= AUXDATA.size:
            status, *_rest, tci, _tpid = AUXDATA.unpack_from(data)
            if status & TP_STATUS_VLAN_VALID:
                return frame if tci & 0x0FFF == vlan else None
    if len(frame) >= 18 and int.from_bytes(frame[12:14], "big") == ETH_P_8021Q:
        tci = int.from_bytes(frame[14:16], "big")
        return frame[:12] + frame[16:] if tci & 0x0FFF == vlan else None
    return None


def tag(frame: bytes, vlan: int) -> bytes:
    return frame[:12] + struct.pack("!HH", ETH_P_8021Q, vlan) + frame[12:]


def main(argv: list[str]) -> int:
    tap_name, trunk, vlan = argv[0], argv[1], int(argv[2])
    tap = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tap, TUNSETIFF, struct.pack("16sH", tap_name.encode(), IFF_TAP | IFF_NO_PI))
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.bind((trunk, 0))
    print("ready", flush=True)
    space = socket.CMSG_SPACE(AUXDATA.size)
    while True:
        readable, _, _ = select.select([tap, sock.fileno()], [], [])
        if tap in readable:
            sock.send(tag(os.read(tap, 65535), vlan))
        if sock.fileno() in readable:
            frame, ancillary, _flags, _address = sock.recvmsg(65535, space)
            inner = untag(frame, ancillary, vlan)
            if inner is not None:
                os.write(tap, inner)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
