"""`echo_server HOST PORT COUNT`: an echo server for COUNT connections at once. Prints "ready",
echoes every chunk as it arrives, and per connection, when its client has closed its sending
side, one JSON line: the peer address as this end saw it (after any NAT), the bytes and the
SHA-256 of what arrived."""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading

_print_lock = threading.Lock()


def _serve(connection: socket.socket, peer: tuple[str, int]) -> None:
    digest, total = hashlib.sha256(), 0
    with connection:
        while chunk := connection.recv(65536):
            digest.update(chunk)
            total += len(chunk)
            connection.sendall(chunk)
    line = {"peer_ip": peer[0], "peer_port": peer[1], "bytes": total, "sha256": digest.hexdigest()}
    with _print_lock:
        print(json.dumps(line), flush=True)


def main(argv: list[str]) -> int:
    host, port, count = argv[0], int(argv[1]), int(argv[2])
    with socket.create_server((host, port), backlog=64) as listener:
        print("ready", flush=True)
        threads = []
        for _ in range(count):
            connection, peer = listener.accept()
            thread = threading.Thread(target=_serve, args=(connection, peer))
            thread.start()
            threads.append(thread)
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
