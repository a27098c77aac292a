"""`python -m hivenet.demo` end to end: real `hivenet serve` child, real CLI child processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

DEMO_TIMEOUT_SECONDS = 90


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_demo_builds_the_topology_and_stops_its_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVENET_")}
    env["HOME"] = str(tmp_path / "home")
    result = subprocess.run(
        [sys.executable, "-m", "hivenet.demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_SECONDS,
        check=False,
    )
    output = result.stdout
    assert result.returncode == 0, f"demo failed:\n{output}\n{result.stderr}"

    for line in (
        "$ hivenet router create --id edge-router --name edge-router",
        "$ hivenet bridge list",
        "$ hivenet port list",
        "hivenet bridge list",  # in the explore section
    ):
        assert line in output, line
    for name in ("blue-net", "green-net", "edge-router", "green-inbound", "underlay"):
        assert name in output, name
    for address in ("10.0.1.1/24", "10.0.2.1/24", "10.0.1.11/24", "10.0.2.12/24"):
        assert address in output, address
    assert "invalid MAC address '02:00:00:zz:00:01'" in output
    assert "ports (8)" in output and "routes (3)" in output and "rules (3)" in output

    pid_match = re.search(r"server PID (\d+), state dir (\S+)", output)
    assert pid_match is not None
    server_pid = int(pid_match.group(1))
    state_dir = tmp_path / pid_match.group(2)
    assert state_dir.parent == tmp_path / "var" / "demo"
    assert (state_dir / "admin-token").stat().st_mode & 0o077 == 0
    assert f"stopped server PID {server_pid}" in output
    assert not _process_exists(server_pid)
    assert not (state_dir / "serve.pid").exists()
    assert re.search(r"demo done: \d+ hivenet commands in [\d.]+ s", output)


@pytest.mark.slow
def test_interrupted_demo_still_stops_its_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVENET_")}
    env["HOME"] = str(tmp_path / "home")
    demo = subprocess.Popen(
        [sys.executable, "-m", "hivenet.demo"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert demo.stdout is not None
        server_pid = None
        for line in demo.stdout:
            found = re.search(r"server PID (\d+)", line)
            if found:
                server_pid = int(found.group(1))
            if line.startswith("server healthy"):
                break
        assert server_pid is not None and _process_exists(server_pid)
        demo.send_signal(signal.SIGINT)  # what Ctrl-C does
        rest = demo.stdout.read()
        assert demo.wait(timeout=DEMO_TIMEOUT_SECONDS) == 130
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert "demo interrupted" in rest
    assert f"stopped server PID {server_pid}" in rest
    assert not _process_exists(server_pid)
