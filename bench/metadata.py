"""Metadata benchmark: requests per second a VM gets from http://169.254.169.254/, against
the same HTTP server reached over a plain veth, in the same run.

HiveNet's metadata path (agent/metadata.py): the VM's packets are handed to its host's agent
by the simulation (each one: the service's packets are never cached), NATed into a TUN device
where the kernel's TCP and a Starlette app on uvicorn, on the agent's own event loop, answer;
replies go back through the agent and the datapath. The peer: the same kind of server
(Starlette on uvicorn, one process, a static answer of the same size) in a namespace of the
bench joined to the VM by a veth: what the request costs without HiveNet in the way. The
ratio (HiveNet / peer) is the figure that means something on a shared, noisy machine.

One lab host (a real `hivenet agent` process, userspace datapath) with one VM. A client in
the VM (`CLIENT`, Python's http.client) runs CONNECTIONS threads for SECONDS each round, in
two modes: keep-alive (one connection per thread, requests back to back) and a new
connection per request (what a boot-time client such as cloud-init mostly does). Rounds
alternate HiveNet and peer; medians of ROUNDS. Also the median request latency.

Needs root. Everything the bench makes is named `hn<tag>...` and removed at the end, also on
failure. Prints a table, then exactly one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

ROUNDS = 3
SECONDS = 3.0
CONNECTIONS = 4
PEER_NETWORK = ("192.168.77.1", "192.168.77.2")  # the VM's end, the server's end (a /30)
PATH = "/latest/meta-data/instance-id"
SCENARIO = """
name: metadata-bench
hosts: [h1]
networks:
  - {name: net1, subnet: 10.0.1.0/24, tenant: bench}
routers:
  - name: r1
    tenant: bench
    interfaces: [{network: net1, ip: 10.0.1.1/24}]
vms:
  - {name: vm1, host: h1, network: net1, ip: 10.0.1.10/24}
"""

# The peer: the agent's server stack, a static answer as long as the VM's instance id.
PEER_SERVER = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
body = sys.argv[3]
async def answer(request):
    return PlainTextResponse(body)
app = Starlette(routes=[Route("/{path:path}", answer)])
uvicorn.run(app, host=sys.argv[1], port=int(sys.argv[2]), log_level="warning", access_log=False)
"""

# The client, in the VM: threads hammering one URL; prints {"requests", "errors", "latency"}.
CLIENT = """
import http.client, json, sys, threading, time
host, path, seconds, threads, keepalive = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
done = []; errors = []; latencies = []
deadline = time.monotonic() + seconds
def work():
    count = failed = 0; lat = []
    conn = None
    while time.monotonic() < deadline:
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, 80, timeout=5)
            started = time.perf_counter()
            conn.request("GET", path)
            response = conn.getresponse(); response.read()
            lat.append(time.perf_counter() - started)
            if response.status == 200: count += 1
            else: failed += 1
            if not keepalive:
                conn.close(); conn = None
        except Exception:
            failed += 1
            if conn is not None: conn.close()
            conn = None
    done.append(count); errors.append(failed); latencies.extend(lat)
pool = [threading.Thread(target=work) for _ in range(threads)]
started = time.monotonic()
for t in pool: t.start()
for t in pool: t.join()
elapsed = time.monotonic() - started
latencies.sort()
print(json.dumps({"requests": sum(done), "errors": sum(errors), "seconds": elapsed,
                  "latency": latencies[len(latencies) // 2] if latencies else 0.0}))
"""


def run_client(
    lab: Any, host: str, seconds: float, connections: int, keepalive: bool
) -> dict[str, float]:
    result = lab.run(
        "vm1",
        [
            sys.executable,
            "-c",
            CLIENT,
            host,
            PATH,
            str(seconds),
            str(connections),
            "1" if keepalive else "0",
        ],
        timeout=seconds + 60,
    )
    data: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    data["rate"] = data["requests"] / data["seconds"] if data["seconds"] else 0.0
    return data


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from hivenet.lab.cleanup import clean
    from hivenet.lab.lab import Lab
    from hivenet.lab.netns import LabScope
    from hivenet.lab.scenario import parse_scenario
    from hivenet.nsutil import create_namespace, remove_namespace

    scope = LabScope.unique()
    lab = Lab(parse_scenario(SCENARIO), state_dir=workdir / "lab", scope=scope)
    peer_ns = f"{scope.namespace_prefix}mdpeer"
    client_link, server_link = f"hn{scope.tag}mdc", f"hn{scope.tag}mds"
    server: subprocess.Popen[bytes] | None = None
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        mode: {"hivenet": [], "peer": []} for mode in ("keepalive", "per_request")
    }
    try:
        lab.up(timeout=90)
        vm_ns = lab.plan.vm("vm1").namespace
        create_namespace(peer_ns)
        _ip(
            "link",
            "add",
            client_link,
            "netns",
            vm_ns,
            "type",
            "veth",
            "peer",
            "name",
            server_link,
            "netns",
            peer_ns,
        )
        _ip("-n", vm_ns, "addr", "add", f"{PEER_NETWORK[0]}/30", "dev", client_link)
        _ip("-n", vm_ns, "link", "set", client_link, "up")
        _ip("-n", peer_ns, "addr", "add", f"{PEER_NETWORK[1]}/30", "dev", server_link)
        _ip("-n", peer_ns, "link", "set", server_link, "up")
        _ip("-n", peer_ns, "link", "set", "lo", "up")
        instance_id = lab.run(
            "vm1",
            ["curl", "-sS", "--max-time", "10", "--retry", "3", f"http://169.254.169.254{PATH}"],
        ).stdout
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                peer_ns,
                sys.executable,
                "-c",
                PEER_SERVER,
                PEER_NETWORK[1],
                "80",
                instance_id,
            ],
        )
        deadline = time.monotonic() + 20
        while (
            lab.run(
                "vm1",
                ["curl", "-s", "--max-time", "1", f"http://{PEER_NETWORK[1]}{PATH}"],
                check=False,
            ).stdout
            != instance_id
        ):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the peer server did not answer")
            time.sleep(0.2)
        for _round in range(args.rounds):
            for mode, keepalive in (("keepalive", True), ("per_request", False)):
                for name, host in (("hivenet", "169.254.169.254"), ("peer", PEER_NETWORK[1])):
                    results[mode][name].append(
                        run_client(lab, host, args.seconds, args.connections, keepalive)
                    )
        counters = lab.fresh_agent_counters("h1").get("metadata") or {}
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        remove_namespace(peer_ns)
        failures = lab.down()
        leftovers = clean(scope.tag, directory=workdir / "lab")
        if failures or not leftovers.is_empty():
            print(f"cleanup: {failures} {leftovers}", file=sys.stderr)

    out: dict[str, Any] = {"agent_metadata_counters": counters}
    for mode, by_side in results.items():
        ours, theirs = by_side["hivenet"], by_side["peer"]
        out[mode] = {
            "hivenet_rps": statistics.median(r["rate"] for r in ours),
            "peer_rps": statistics.median(r["rate"] for r in theirs),
            # per pair of adjacent rounds (a slow phase of the machine hits both), median
            "ratio": statistics.median(
                o["rate"] / t["rate"] for o, t in zip(ours, theirs, strict=True) if t["rate"]
            ),
            "hivenet_latency_ms": statistics.median(r["latency"] for r in ours) * 1000,
            "peer_latency_ms": statistics.median(r["latency"] for r in theirs) * 1000,
            "errors": {
                "hivenet": sum(r["errors"] for r in ours),
                "peer": sum(r["errors"] for r in theirs),
            },
            "rounds": {
                "hivenet": [round(r["rate"]) for r in ours],
                "peer": [round(r["rate"]) for r in theirs],
            },
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import os

    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--connections", type=int, default=CONNECTIONS)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/metadata.py needs root (a lab); skipped", file=sys.stderr)
        print(json.dumps({"bench": "metadata", "skipped": "not root"}))
        return 0
    with tempfile.TemporaryDirectory(prefix="hn-bench-metadata-") as directory:
        results = run(args, Path(directory))
    table = Table(
        title=f"metadata requests from a VM ({args.connections} threads, {args.seconds:g} s x {args.rounds} rounds)"
    )
    for column in (
        "mode",
        "HiveNet req/s",
        "peer req/s",
        "ratio",
        "HiveNet p50 ms",
        "peer p50 ms",
        "errors",
    ):
        table.add_column(column, justify="right" if column != "mode" else "left")
    for mode, label in (("keepalive", "keep-alive"), ("per_request", "new conn. each")):
        row = results[mode]
        table.add_row(
            label,
            f"{row['hivenet_rps']:.0f}",
            f"{row['peer_rps']:.0f}",
            f"{row['ratio']:.2f}x",
            f"{row['hivenet_latency_ms']:.2f}",
            f"{row['peer_latency_ms']:.2f}",
            f"{row['errors']['hivenet']}/{row['errors']['peer']}",
        )
    Console().print(table)
    print("peer: the same server stack (Starlette on uvicorn) on a veth straight to the VM")
    print(json.dumps({"bench": "metadata", **results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
