"""The traffic programs of `hivenet.lab.traffic`, run as the lab runs them (`python -m ...`)
but on 127.0.0.1 in the root namespace: what they print is what the probes parse."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time

import pytest

from hivenet.lab.probes import traffic_program


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(process: subprocess.Popen[str]) -> None:
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"


def test_tcp_source_and_sink_agree_on_the_checksum() -> None:
    port = free_port()
    sink = subprocess.Popen([*traffic_program("tcp_sink"), "127.0.0.1", str(port)])
    try:
        source = subprocess.run(
            [*traffic_program("tcp_source"), "127.0.0.1", str(port), "100000"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    finally:
        sink.wait(10)
    elapsed, sent, received = source.stdout.strip().split("|")
    assert float(elapsed) >= 0
    assert sent == received and sent.startswith("100000 ")


def test_echo_client_and_server_report_the_same_conversation() -> None:
    port = free_port()
    server = subprocess.Popen(
        [*traffic_program("echo_server"), "127.0.0.1", str(port), "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(server)
        client = subprocess.run(
            [*traffic_program("echo_client"), "127.0.0.1", str(port), "512", "4", "0", "5", "0"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        served, _ = server.communicate(timeout=10)
    finally:
        server.kill()
    lines = client.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:4]] == [["progress", str(n)] for n in range(1, 5)]
    result = json.loads(lines[-1])
    session = json.loads(served.strip().splitlines()[-1])
    assert result["echoes_match"] is True and result["bytes"] == 2048
    assert session["bytes"] == 2048 and session["sha256"] == result["sha256"]
    assert session["peer_port"] == result["local_port"]


def test_tcp_probe_tells_connected_from_refused() -> None:
    port = free_port()

    def probe() -> str:
        argv = [*traffic_program("tcp_probe"), "127.0.0.1", str(port), "1"]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    assert probe() == "refused"
    with socket.create_server(("127.0.0.1", port)):
        assert probe() == "connected"


@pytest.mark.skipif(os.geteuid() != 0, reason="an AF_PACKET socket needs root")
def test_capture_frames_on_loopback_between_ready_and_done() -> None:
    capture = subprocess.Popen(
        [*traffic_program("capture"), "lo", "1.0"], stdout=subprocess.PIPE, text=True
    )
    try:
        wait_ready(capture)
        marker = hashlib.sha256(str(time.time()).encode()).hexdigest()[:16].encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(marker, ("127.0.0.1", free_port()))
        output, _ = capture.communicate(timeout=10)
    finally:
        capture.kill()
    lines = output.split()
    assert lines[-1] == "done"
    assert any(marker.hex() in line for line in lines[:-1])
