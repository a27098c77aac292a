"""`tcp_sink HOST PORT`: accept one TCP connection, read it to the end, answer
"<bytes> <sha256>" of what arrived, close."""

from __future__ import annotations

import hashlib
import socket
import sys


def main(argv: list[str]) -> int:
    host, port = argv[0], int(argv[1])
    with socket.create_server((host, port)) as listener:
        connection, _peer = listener.accept()
    digest, total = hashlib.sha256(), 0
    with connection:
        while chunk := connection.recv(1 << 20):
            digest.update(chunk)
            total += len(chunk)
        connection.sendall(f"{total} {digest.hexdigest()}".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
