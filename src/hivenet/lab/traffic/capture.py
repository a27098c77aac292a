"""`capture INTERFACE SECONDS`: "ready", then every frame seen on INTERFACE (inbound and
outbound) for SECONDS, one hex line each, then "done"."""

from __future__ import annotations

import select
import socket
import sys
import time

ETH_P_ALL = 3


def main(argv: list[str]) -> int:
    interface, seconds = argv[0], float(argv[1])
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as sock:
        sock.bind((interface, 0))
        deadline = time.monotonic() + seconds
        print("ready", flush=True)
        while (left := deadline - time.monotonic()) > 0:
            if select.select([sock], [], [], left)[0]:
                print(sock.recv(65535).hex(), flush=True)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
