"""`tcp_source HOST PORT SIZE`: send SIZE random bytes to a `tcp_sink` (retrying the connect for
10 s while the sink starts), then print "<seconds>|<size> <sha256 sent>|<sink's answer>"."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time

CONNECT_RETRY_SECONDS = 10.0


def _connect(host: str, port: int) -> socket.socket:
    deadline = time.monotonic() + CONNECT_RETRY_SECONDS
    while True:
        try:
            return socket.create_connection((host, port), timeout=20)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    host, port, size = argv[0], int(argv[1]), int(argv[2])
    payload = os.urandom(size)
    with _connect(host, port) as connection:
        started = time.monotonic()
        connection.sendall(payload)
        connection.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := connection.recv(4096):
            reply += chunk
        elapsed = time.monotonic() - started
    print(f"{elapsed:.6f}|{size} {hashlib.sha256(payload).hexdigest()}|{reply.decode()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
