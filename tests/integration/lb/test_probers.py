"""`SocketProber`, the real probes, against services on 127.0.0.1 (no namespace): a TCP
connect, an HTTP request judged by the monitor's expected codes, a UDP probe that an ICMP
port unreachable fails."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from hivenet.agent.health import ProbeTarget, SocketProber
from hivenet.model import HealthMonitor


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def http_port() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def target(port: int, **monitor: object) -> ProbeTarget:
    return ProbeTarget(
        member_id="m",
        pool_id="p",
        router_id="r",
        address="127.0.0.1",
        port=port,
        monitor=HealthMonitor.model_validate({"id": "hm", "pool_id": "p", "timeout": 1, **monitor}),
    )


def probe(prober: SocketProber, probe_target: ProbeTarget) -> bool:
    return asyncio.run(prober.probe(probe_target))


def test_tcp_http_and_udp_probes(http_port: int) -> None:
    prober = SocketProber()
    try:
        assert probe(prober, target(http_port, type="tcp"))
        assert not probe(prober, target(free_port(socket.SOCK_STREAM), type="tcp"))
        assert probe(prober, target(http_port, type="http", url_path="/healthz"))
        assert not probe(prober, target(http_port, type="http", url_path="/other"))
        assert probe(
            prober, target(http_port, type="http", url_path="/other", expected_codes="500-503")
        )
        # Nothing listens: the kernel answers port unreachable, the probe fails.
        assert not probe(prober, target(free_port(socket.SOCK_DGRAM), type="udp"))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listening:
            listening.bind(("127.0.0.1", 0))  # silent, but there: up
            assert probe(prober, target(listening.getsockname()[1], type="udp"))
    finally:
        prober.close()
