"""`tcp_probe HOST PORT TIMEOUT`: try one TCP connection; print "connected", "refused" or
"timeout"."""

from __future__ import annotations

import socket
import sys


def main(argv: list[str]) -> int:
    host, port, timeout = argv[0], int(argv[1]), float(argv[2])
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        print("connected")
    except ConnectionRefusedError:
        print("refused")
    except TimeoutError:
        print("timeout")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
