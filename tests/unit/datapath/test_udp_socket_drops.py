"""`udp_socket_drops`: what the kernel dropped at a full UDP socket (the VXLAN socket's
`drop.tunnel_socket_overflow`) is read from /proc/self/net/udp for that socket alone."""

from __future__ import annotations

import socket

from hivenet.datapath.userspace import udp_socket_drops


def test_a_full_socket_counts_its_own_drops_and_no_other_socket_does() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as full,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as quiet,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        full.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel's minimum
        full.bind(("127.0.0.1", 0))
        quiet.bind(("127.0.0.1", 0))
        assert udp_socket_drops(full) == 0
        for _ in range(200):  # never read: the buffer fills after a few
            sender.sendto(b"x" * 1000, full.getsockname())
        sender.sendto(b"y", quiet.getsockname())
        dropped = udp_socket_drops(full)
        assert 0 < dropped < 200
        assert udp_socket_drops(quiet) == 0
        assert quiet.recv(10) == b"y"
