"""End-to-end: `hivenet router show` on the edge lab (the lab of tests/e2e/test_lab_edge.py,
its own instance): both uplinks of r1 on live gateway hosts with their links up, each BGP
session Established as the gateway's BIRD reports it, and the default routes r1 learned from
hn-ext -- the CLI as a user runs it (a child process), through the API, from what the
gateway agents published."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from hivenet.lab.lab import Lab
from tests.e2e.test_lab_edge import GATEWAYS, PEERS, established, lab, wait_for  # noqa: F401

pytestmark = pytest.mark.e2e

UPLINKS = {"ext.r1": "gw1", "ext.r1.2": "gw2"}  # r1's uplink ports and their hosts


def router_show(lab: Lab, *options: str) -> subprocess.CompletedProcess[str]:  # noqa: F811
    return subprocess.run(
        [sys.executable, "-m", "hivenet.cli", "router", "show", "r1", *options],
        env={**os.environ, **lab.env(), "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def healthy(shown: dict[str, Any]) -> bool:
    """Both uplinks alive with their link up and an Established session each that has
    received and advertised a prefix, and a learned default route from each peer. The counts
    are in the gateway's report, republished when they change (checked each second), so they
    can lag the learned routes the store already holds."""
    uplinks = {uplink["port_id"]: uplink for uplink in shown.get("uplinks", [])}
    if {port: uplink["host_id"] for port, uplink in uplinks.items()} != UPLINKS:
        return False
    for uplink in uplinks.values():
        states = [peer["state"] for peer in uplink["bgp_peers"]]
        if not (uplink["host_alive"] and uplink["link_up"] and states == ["Established"]):
            return False
        session = uplink["bgp_peers"][0]
        if not (session["received"] >= 1 and session["advertised"] >= 1):  # default; range
            return False
    defaults = {
        route["learned_from"]
        for route in shown.get("learned_routes", [])
        if route["dst_prefix"] == "0.0.0.0/0"
    }
    return defaults == set(PEERS.values())


def test_router_show_lists_live_uplinks_sessions_and_learned_routes(lab: Lab) -> None:  # noqa: F811
    wait_for("hn-ext's BGP sessions with gw1 and gw2", lambda: established(lab) == set(GATEWAYS))
    last: dict[str, Any] = {}

    def check() -> bool:
        nonlocal last
        last = json.loads(router_show(lab, "--json").stdout)
        return healthy(last)

    try:
        wait_for("router show: both uplinks live, Established, default routes learned", check)
    except pytest.fail.Exception:
        pytest.fail(f"last `router show r1 --json`: {json.dumps(last, indent=1)}")
    table = router_show(lab).stdout
    assert "Uplinks" in table and "Learned routes" in table
    for port, host in UPLINKS.items():
        row = next(line for line in table.splitlines() if f" {port} " in line)
        assert host in row and "Established" in row and "up" in row, row
    defaults = [line for line in table.splitlines() if "0.0.0.0/0" in line]
    assert {peer for peer in PEERS.values() if any(peer in line for line in defaults)} == set(
        PEERS.values()
    ), table
