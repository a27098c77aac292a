"""End-to-end: the `hivenet lab` commands and `python -m hivenet.demo` as a user runs them
(child processes), each on its own tag and state dir; nothing of theirs is left afterwards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hivenet.lab.cleanup import clean
from hivenet.lab.netns import LabScope, list_links, list_namespaces

pytestmark = pytest.mark.e2e

HIVENET = (sys.executable, "-m", "hivenet.cli")
SMALL = """
name: small
hosts: [h1, h2]
networks: [{name: net1, subnet: 10.0.1.0/24}]
vms:
  - {name: vm1, host: h1, network: net1, ip: 10.0.1.10/24}
  - {name: vm2, host: h2, network: net1, ip: 10.0.1.11/24}
"""


@pytest.fixture
def scope(tmp_path: Path) -> Iterator[LabScope]:
    if os.geteuid() != 0:
        pytest.skip("e2e: needs root (network namespaces, veth)")
    scope = LabScope.unique()
    try:
        yield scope
    finally:
        report = clean(scope.tag, directory=tmp_path / "state")
        assert report.is_empty(), f"left behind: {report}"


def hivenet(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HIVENET, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def printed_hints(output: str) -> list[str]:
    """The commands of the "Explore:" block, as printed (comments after "  # " cut off)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Explore:"))
    hints = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        hints.append(line.split("  # ")[0].strip())
    return hints


def run_every_hint(output: str) -> None:
    """Each hint runs as a newcomer pastes it into bash (venv activated, no terminal input)."""
    hints = printed_hints(output)
    assert len(hints) >= 5, output
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for name in [n for n in env if n.startswith("HIVENET_")]:
        del env[name]
    for hint in hints:
        result = subprocess.run(
            ["bash", "-c", hint],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert result.returncode == 0, f"hint {hint!r} failed:\n{result.stdout}{result.stderr}"
        if " ping " in hint:
            assert " 0 received" not in result.stdout, result.stdout


def test_up_status_exec_down(scope: LabScope, tmp_path: Path) -> None:
    scenario = tmp_path / "small.yaml"
    scenario.write_text(SMALL)
    state = str(tmp_path / "state")
    up = hivenet("lab", "up", "--scenario", str(scenario), "--state-dir", state, "--tag", scope.tag)
    assert up.returncode == 0, up.stderr
    assert scope.namespace("vm1") in up.stdout and "API URL:" in up.stdout
    assert (tmp_path / "state" / "admin-token").exists()
    run_every_hint(up.stdout)

    status = hivenet("lab", "status", "--state-dir", state)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "phase up" in status.stdout and "(healthy)" in status.stdout
    # The API server, two agents and the two VMs' DHCP clients.
    assert status.stdout.count("running") == 5
    assert "root namespace" in status.stdout and "namespaces: 4/4 present" in status.stdout
    assert "drops by reason" in status.stdout

    ping = hivenet(
        "lab",
        "exec",
        "--state-dir",
        state,
        scope.namespace("vm1"),
        "ping",
        "-c1",
        "-W2",
        "10.0.1.11",
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "1 received" in ping.stdout
    failing = hivenet("lab", "exec", "--state-dir", state, "vm2", "--", "sh", "-c", "exit 7")
    assert failing.returncode == 7  # the command's own exit code
    unknown = hivenet("lab", "exec", "--state-dir", state, "vm9", "true")
    assert unknown.returncode == 1 and "'vm9': no VM, host or external network" in unknown.stderr

    # A second `up` on the same state dir replaces the first lab.
    again = hivenet(
        "lab", "up", "--scenario", str(scenario), "--state-dir", state, "--tag", scope.tag
    )
    assert again.returncode == 0, again.stderr
    assert "removing the previous lab" in again.stderr

    down = hivenet("lab", "down", "--state-dir", state)
    assert down.returncode == 0, down.stderr
    assert not list_namespaces(scope.namespace_prefix)
    assert not list_links(scope.link_prefix)
    assert not (tmp_path / "state").exists()
    assert hivenet("lab", "status", "--state-dir", state).returncode == 1


def test_demo_measures_every_path_and_tears_down(scope: LabScope, tmp_path: Path) -> None:
    state = tmp_path / "state"
    demo = subprocess.run(
        [
            sys.executable,
            "-m",
            "hivenet.demo",
            "--teardown",
            "--state-dir",
            str(state),
            "--tag",
            scope.tag,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    for path in ("same host h1", "h1 -> h2 (VXLAN)", "via router"):
        assert path in demo.stdout, path
    assert "Mbit/s" in demo.stdout
    # Each VM read its own identity from 169.254.169.254 (its host's agent answered).
    assert "vm1 on h1: instance-id vm.vm1, hostname vm1" in demo.stdout
    assert "vm4 on h3: instance-id vm.vm4, hostname vm4" in demo.stdout
    assert "bridges (2)" in demo.stdout  # `hivenet bridge list` reached the lab's API
    assert "lab removed" in demo.stdout
    # It ends with one trace (the path, the megaflow) and the page's URL.
    assert "trace from port vm." in demo.stdout and "megaflow:" in demo.stdout
    assert re.search(r"Topology page: http://127\.0\.0\.1:\d+/ui", demo.stdout)
    assert not list_namespaces(scope.namespace_prefix)
