"""`echo_client HOST PORT SIZE CHUNKS INTERVAL TIMEOUT SOURCE_PORT`: one connection (from
SOURCE_PORT, 0: any) sending CHUNKS random chunks of SIZE bytes, INTERVAL seconds apart, each
read back from the echo before the next goes out ("progress <n> <wall time>" per chunk); then a
JSON line: local address, bytes, SHA-256 of what was sent, whether every echo matched, the
longest wait for one echo. TIMEOUT bounds each socket call."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time


def _read_exactly(connection: socket.socket, size: int, number: int) -> bytes:
    echoed = b""
    while len(echoed) < size:
        part = connection.recv(size - len(echoed))
        if not part:
            sys.exit(f"connection closed by the peer after {number - 1} chunks")
        echoed += part
    return echoed


def main(argv: list[str]) -> int:
    host, port, size, chunks = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    interval, timeout, source_port = float(argv[4]), float(argv[5]), int(argv[6])
    connection = socket.create_connection(
        (host, port), timeout=timeout, source_address=("0.0.0.0", source_port)
    )
    with connection:
        local = connection.getsockname()
        digest, echoes_match, longest = hashlib.sha256(), True, 0.0
        for number in range(1, chunks + 1):
            payload = os.urandom(size)
            digest.update(payload)
            started = time.monotonic()
            connection.sendall(payload)
            echoed = _read_exactly(connection, size, number)
            longest = max(longest, time.monotonic() - started)
            echoes_match = echoes_match and echoed == payload
            print(f"progress {number} {time.time():.3f}", flush=True)
            if interval:
                time.sleep(interval)
        connection.shutdown(socket.SHUT_WR)
        if connection.recv(1):
            sys.exit("unexpected data after the last echo")
    result = {
        "local_ip": local[0],
        "local_port": local[1],
        "bytes": size * chunks,
        "sha256": digest.hexdigest(),
        "echoes_match": echoes_match,
        "longest_wait": longest,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
