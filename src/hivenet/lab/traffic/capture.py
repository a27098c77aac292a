"""`capture INTERFACE SECONDS`: "ready", then every frame seen on INTERFACE (inbound and
outbound) for SECONDS, one hex line each, then "drops N" (frames the kernel dropped because
this reader fell behind) and "done".

The socket's receive buffer is made large (as root, past `rmem_max`) and the hex lines are
written in blocks, so a bulk transfer being captured does not crowd out the frames a test
looks for; the drop count says when it did anyway, so a test never trusts a partial capture.
"""

from __future__ import annotations

import select
import socket
import struct
import sys
import time

ETH_P_ALL = 3
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33
RECEIVE_BUFFER = 64 * 1024 * 1024


def main(argv: list[str]) -> int:
    interface, seconds = argv[0], float(argv[1])
    out = sys.stdout
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind((interface, 0))
        sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)  # reading resets the counters
        deadline = time.monotonic() + seconds
        print("ready", flush=True)
        while (left := deadline - time.monotonic()) > 0:
            if select.select([sock], [], [], left)[0]:
                out.write(sock.recv(65535).hex() + "\n")
        _packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    out.write(f"drops {drops}\n")
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
