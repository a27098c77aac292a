"""Failover benchmark: how long traffic through a dying gateway stops, next to the outside
router's own reaction in the same run, and how long a route the outside announces takes to
reach every agent.

One `edge` lab (hivenet/lab/scenarios/edge.yaml: router r1 with uplinks on gw1 and gw2, eBGP
with BIRD 2 in hn-ext, hold time 3 s; agents with the default 10 s lease, so only the gateway
probe can move traffic in under 10 s). Each run, for each kind of death:

- gateway: the gateway's agent killed -9 and its uplink link set down on the host's side;
- uplink: only the uplink's cable cut (hn-ext's end down), the agent lives and reports it;
- agent: only the agent killed -9, its link stays up (what hn-ext sees: a silent peer).

The victim is the gateway vm1's ping leaves through (nftables counters in hn-ext). Measured:
`out`, the longest gap between replies of vm1's 100 pkt/s ping to 203.0.113.1 (outside,
through SNAT; r1's ECMP choice is made on vm1's host: HiveNet's reaction), `in`, the same
for hn-ext's ping of vm2's floating IP (hn-ext's kernel chooses the gateway: its reaction
matters too), and `peer`, the time until hn-ext's BIRD no longer has the floating range from
the victim's session (birdc polled every 50 ms: the peer's BGP reaction, the figure to
compare `out` with). Then the gateway is brought back and everything waits until both
sessions, both next hops and every probe are up again.

Route learning (once per run): hn-ext's BIRD starts announcing 203.0.113.128/26 (`birdc
configure`); `api` is the time until r1's routes learned from both gateways are visible through
the API (polled every 50 ms; the gateways' BGP speakers read BIRD each second), `agents` until
every agent's counters file shows the store revision of those routes (written each second: an
upper bound, within a second).

Needs root. Everything it makes is named `hn<tag>...` and removed at the end, also on
failure. Prints a table, then exactly one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hivenet.lab.edge import INTERNET_IP, wait_until

VM2_FLOATING = "198.51.100.20"
FLOATING_RANGE = "198.51.100.0/24"
NEW_PREFIX = "203.0.113.128/26"
GATEWAYS = ("gw1", "gw2")
INGRESS = ("h1", "h2")
KINDS = ("gateway", "uplink", "agent")
PING_INTERVAL = 0.01


def wait_for(what: str, check: Callable[[], bool], timeout: float = 90.0) -> float:
    return wait_until(what, check, timeout)


class Edge:
    """The lab and what the bench reads of it."""

    def __init__(self, lab: Any) -> None:
        from hivenet.lab import edge

        self.lab = lab
        self.edge = edge
        self.sessions = {g: edge.session_of(lab, g) for g in GATEWAYS}
        self.router_address = {g: edge.uplink_of(lab, g).router_address for g in GATEWAYS}

    def established(self) -> set[str]:
        found = self.edge.bgp_sessions(self.lab)
        return {g for g, name in self.sessions.items() if name in found and found[name].established}

    def all_up(self) -> None:
        wait_for("both BGP sessions", lambda: self.established() == set(GATEWAYS))
        both = set(self.router_address.values())
        wait_for(
            "hn-ext's route via both",
            lambda: self.edge.next_hops(self.lab, FLOATING_RANGE) == both,
        )
        wait_for(
            "every probe up",
            lambda: all(
                self.edge.probed_states(self.lab, h) == dict.fromkeys(GATEWAYS, "up")
                and self.edge.probe_view(self.lab, h).get("down_ports") == []
                for h in INGRESS
            ),
        )

    def learned(self, prefix: str) -> list[tuple[str, int | None]]:
        """(route id, store revision) of r1's routes to `prefix` learned by BGP."""
        with self.lab.client() as client:
            items = client.list_all("route", {"router_id": "r1"})
            ids = [
                item["id"]
                for item in items
                if item.get("learned_from") and item.get("dst_prefix") == prefix
            ]
            return [(route_id, client.get("route", route_id).revision) for route_id in ids]

    def agents_at(self, revision: int) -> bool:
        for host in (*INGRESS, *GATEWAYS):
            counters = self.lab.agent_counters(host) or {}
            seen = counters.get("revision")
            if not isinstance(seen, int) or seen < revision:
                return False
        return True


def ping_gateway(arrivals: Any) -> str:
    """The one gateway vm1's ping entered hn-ext through during a whole second."""
    for _ in range(10):
        before = arrivals.counts()
        time.sleep(1.0)
        after = arrivals.counts()
        used = [g for g in GATEWAYS if after[(g, "ping")] > before[(g, "ping")]]
        if len(used) == 1:
            return used[0]
    raise RuntimeError(f"vm1's ping does not keep to one gateway: {before} -> {after}")


def one_death(edge: Edge, kind: str, number: int) -> dict[str, float | str]:
    lab, tools = edge.lab, edge.edge
    arrivals = tools.Arrivals(lab, {"ping": ["icmp", "type", "echo-request"]})
    out = tools.PingLog(lab, "vm1", INTERNET_IP, label=f"bo{number}", interval=PING_INTERVAL)
    into = tools.PingLog(
        lab, "ext", VM2_FLOATING, label=f"bi{number}", interval=PING_INTERVAL, bind=INTERNET_IP
    )
    try:
        wait_for(
            "both pings answered", lambda: min(len(out.reply_times()), len(into.reply_times())) > 20
        )
        victim = ping_gateway(arrivals)
        killed = time.time()
        if kind == "gateway":
            tools.kill_gateway(lab, victim)
        elif kind == "uplink":
            tools.set_uplink_cable(lab, victim, up=False)
        else:
            lab.kill_agent(victim)
        peer = wait_for(
            "hn-ext's BIRD withdrawing the victim's route",
            lambda: not tools.peer_has_route(lab, FLOATING_RANGE, victim),
            timeout=30,
        )
        time.sleep(2.0)
        row: dict[str, float | str] = {
            "kind": kind,
            "victim": victim,
            "out_gap": out.longest_gap(since=killed),
            "in_gap": into.longest_gap(since=killed),
            "peer_withdraw": peer - killed,
        }
    finally:
        out.stop()
        into.stop()
        arrivals.close()
    if kind == "uplink":
        tools.set_uplink_cable(lab, str(row["victim"]), up=True)
    else:
        tools.revive_gateway(lab, str(row["victim"]))
    edge.all_up()
    return row


def route_learning(edge: Edge) -> dict[str, float]:
    tools = edge.edge
    started = time.time()
    tools.announce(edge.lab, [NEW_PREFIX])
    seen = wait_for(
        "r1 learning the new prefix from both", lambda: len(edge.learned(NEW_PREFIX)) == 2
    )
    revision = max(rev or 0 for _, rev in edge.learned(NEW_PREFIX))
    agents = wait_for("every agent at that revision", lambda: edge.agents_at(revision))
    tools.announce(edge.lab, [])
    wait_for("the prefix withdrawn from r1", lambda: not edge.learned(NEW_PREFIX))
    return {"api": seen - started, "agents": agents - started}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from hivenet.lab.cleanup import clean
    from hivenet.lab.edge import add_internet
    from hivenet.lab.lab import Lab
    from hivenet.lab.netns import LabScope
    from hivenet.lab.scenario import builtin_scenario

    scope = LabScope.unique()
    state_dir = workdir / "lab"
    lab = Lab(builtin_scenario("edge"), state_dir=state_dir, scope=scope, datapath=args.datapath)
    deaths: list[dict[str, float | str]] = []
    learning: list[dict[str, float]] = []
    try:
        lab.up(timeout=120)
        add_internet(lab)
        edge = Edge(lab)
        edge.all_up()
        for number in range(args.runs):
            for kind in args.kinds:
                deaths.append(one_death(edge, kind, len(deaths)))
                print(f"run {number + 1} {kind}: {deaths[-1]}", file=sys.stderr, flush=True)
            learning.append(route_learning(edge))
            print(f"run {number + 1} learning: {learning[-1]}", file=sys.stderr, flush=True)
    finally:
        failures = lab.down()
        leftovers = clean(scope.tag, directory=state_dir)
        if failures or not leftovers.is_empty():
            print(f"cleanup: {failures} {leftovers}", file=sys.stderr)
    summary: dict[str, Any] = {"datapath": args.datapath, "runs": args.runs}
    for kind in args.kinds:
        rows = [row for row in deaths if row["kind"] == kind]
        summary[kind] = {
            field: {
                "median": statistics.median(float(row[field]) for row in rows),
                "max": max(float(row[field]) for row in rows),
            }
            for field in ("out_gap", "in_gap", "peer_withdraw")
        }
        summary[kind]["ratio_out_to_peer"] = statistics.median(
            float(row["out_gap"]) / max(float(row["peer_withdraw"]), 1e-3) for row in rows
        )
    summary["route_learning"] = {
        field: {
            "median": statistics.median(row[field] for row in learning),
            "max": max(row[field] for row in learning),
        }
        for field in ("api", "agents")
    }
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="repetitions of each death")
    parser.add_argument("--datapath", choices=("ebpf", "userspace"), default="ebpf")
    parser.add_argument(
        "--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="which deaths to run"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs: {args.runs} must be at least 1")
    if os.geteuid() != 0:
        print("bench/failover.py needs root (a lab); skipped", file=sys.stderr)
        print(json.dumps({"bench": "failover", "skipped": "not root"}))
        return 0
    with tempfile.TemporaryDirectory(prefix="hn-bench-failover-") as directory:
        summary = run(args, Path(directory))
    table = Table(title=f"failover, {args.datapath} datapath, {args.runs} runs (seconds)")
    for column in ("death", "what", "median", "max"):
        table.add_column(column)
    names = {
        "out_gap": "vm1 -> outside ping gap (HiveNet ECMP)",
        "in_gap": "outside -> floating IP ping gap",
        "peer_withdraw": "hn-ext BIRD withdraws the route (peer)",
    }
    for kind in args.kinds:
        for field, name in names.items():
            figures = summary[kind][field]
            table.add_row(kind, name, f"{figures['median']:.3f}", f"{figures['max']:.3f}")
        table.add_row(
            kind, "out gap / peer withdraw", f"{summary[kind]['ratio_out_to_peer']:.2f}x", ""
        )
    for field, name in (
        ("api", "new prefix in r1 (API)"),
        ("agents", "... in every agent (<= +1 s)"),
    ):
        figures = summary["route_learning"][field]
        table.add_row("learning", name, f"{figures['median']:.3f}", f"{figures['max']:.3f}")
    Console().print(table)
    print(json.dumps({"bench": "failover", **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
