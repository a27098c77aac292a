"""Benchmark of what tenancy costs an API request: the same mixed requests with a project
token (its hash looked up in the store on every request, every reference of every write
checked for the project in the write's txn) against the cluster-admin token (an in-memory
constant-time compare, unscoped writes: what the API costs with tenancy off), in the same run.

The mix, per round, on one project's topology (a chain, a bridge, a router): list bridges,
get the bridge, create a port on the bridge, patch the bridge's inbound chain, create a
rule on the chain naming the port, delete the rule, delete the port.

How it is measured, so that a busy shared machine does not decide the answer: two real
`hivenet serve` processes (memory store; A without a rate limit, B with one that is never
reached) get the rounds over HTTP keep-alive, in blocks of `--block` rounds, interleaved
block by block (admin and project token on A, the same on B, so both servers hold the same
history; the order rotated every cycle), `--blocks` blocks each. Per block the server's own CPU time (utime + stime of its
process, every thread, in ns from /proc/<pid>/task/*/schedstat) is read: what another
process steals from the server, or the client costs, is not in it. Each cycle's three blocks
run back to back, so each cycle gives a ratio under one load; the answer is the median of the
cycles' ratios by server CPU time (the wall-clock ratio is printed beside it). The table's
per-configuration figures are medians over the blocks.

Owns nothing but this measurement; must not be imported by the package.

Usage: python bench/api_auth.py [--block N] [--blocks K] [--quick]
Prints a table, then exactly one JSON line (`tenant_vs_admin`: the project token's request
rate over the admin's by server CPU time, goal >= 0.9; `rate_limited_vs_not`: the project
token's with the limit on over without, also by server CPU time; `*_wall`: the same by
wall clock).
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hivenet.api.auth import ADMIN_TOKEN_FILE

PROJECT = "acme"
REQUESTS_PER_ROUND = 7


def _call(client: httpx.Client, token: str, method: str, url: str, body: Any = None) -> Any:
    response = client.request(method, url, json=body, headers={"Authorization": f"Bearer {token}"})
    if response.status_code >= 300:
        raise SystemExit(f"{method} {url}: {response.status_code} {response.text}")
    return response.json() if response.content else None


def run_rounds(client: httpx.Client, token: str, ids: dict[str, str], rounds: int) -> None:
    bridge, chain = ids["bridge"], ids["chain"]
    for number in range(rounds):
        _call(client, token, "GET", "/v1/bridges")
        _call(client, token, "GET", f"/v1/bridges/{bridge}")
        port = _call(
            client,
            token,
            "POST",
            "/v1/ports",
            {"device_kind": "bridge", "device_id": bridge, "tenant_id": PROJECT},
        )
        _call(
            client,
            token,
            "PATCH",
            f"/v1/bridges/{bridge}",
            {"inbound_chain_id": chain if number % 2 else None},
        )
        rule = _call(
            client,
            token,
            "POST",
            "/v1/rules",
            {
                "chain_id": chain,
                "action": "accept",
                "in_port_ids": [port["id"]],
                "tenant_id": PROJECT,
            },
        )
        _call(client, token, "DELETE", f"/v1/rules/{rule['id']}")
        _call(client, token, "DELETE", f"/v1/ports/{port['id']}")


def process_cpu_seconds(pid: int) -> float:
    """CPU time of process `pid`, every thread, in seconds: the scheduler's nanosecond count
    (/proc/<pid>/task/*/schedstat), since utime/stime tick at 10 ms, too coarse per block."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that just ended
            continue
    return total / 1e9


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    """One `hivenet serve` process and what the bench set up on it."""

    process: subprocess.Popen[bytes]
    client: httpx.Client
    admin: str
    tenant: str = ""
    ids: dict[str, str] = field(default_factory=dict)


@contextmanager
def served(state_dir: Path, *options: str) -> Iterator[Server]:
    """A `hivenet serve` on 127.0.0.1 (memory store) until the block ends."""
    port = _free_port()
    executable = Path(sys.executable).parent / "hivenet"
    argv = [str(executable), "serve", "--store", "memory://", "--state-dir", str(state_dir)]
    process = subprocess.Popen(
        [*argv, "--port", str(port), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise SystemExit(f"hivenet serve exited {process.returncode}: {argv}")
                token_file = state_dir / ADMIN_TOKEN_FILE
                try:
                    if token_file.exists():
                        admin = token_file.read_text().strip()
                        headers = {"Authorization": f"Bearer {admin}"}
                        if client.get("/v1/bridges", headers=headers).status_code == 200:
                            break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("hivenet serve did not answer within 60 s")
                time.sleep(0.1)
            server = Server(process, client, admin)
            server.tenant = _call(
                client, admin, "POST", "/v1/tokens", {"project": PROJECT, "role": "member"}
            )["secret"]
            server.ids = {
                kind: _call(client, admin, "POST", f"/v1/{kind}s", {"tenant_id": PROJECT})["id"]
                for kind in ("chain", "bridge", "router")
            }
            yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure_block(server: Server, token: str, rounds: int) -> tuple[float, float]:
    """(server CPU seconds per request, requests per wall-clock second) of one block."""
    cpu_before = process_cpu_seconds(server.process.pid)
    started = time.perf_counter()
    run_rounds(server.client, token, server.ids, rounds)
    wall = time.perf_counter() - started
    cpu = process_cpu_seconds(server.process.pid) - cpu_before
    requests = rounds * REQUESTS_PER_ROUND
    return cpu / requests, requests / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=10, help="rounds of the mix per block")
    parser.add_argument("--blocks", type=int, default=60, help="blocks per configuration")
    parser.add_argument("--quick", action="store_true", help="5-round blocks, 10 of each")
    args = parser.parse_args()
    block, blocks = (5, 10) if args.quick else (args.block, args.blocks)

    names = ("admin", "tenant", "limited_admin", "limited")
    cpu: dict[str, list[float]] = {name: [] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    # Per cycle (its four blocks ran back to back, so under one load): the ratios.
    ratio_names = ("tenant", "tenant_limited", "limited", "tenant_wall", "limited_wall")
    ratios: dict[str, list[float]] = {name: [] for name in ratio_names}
    with (
        tempfile.TemporaryDirectory() as plain_dir,
        tempfile.TemporaryDirectory() as limited_dir,
        served(Path(plain_dir), "--rate-limit", "0") as plain,
        served(
            Path(limited_dir), "--rate-limit", "1000000000", "--rate-burst", "1000000000"
        ) as limited,
    ):
        configs = {
            "admin": (plain, plain.admin),
            "tenant": (plain, plain.tenant),
            "limited_admin": (limited, limited.admin),
            "limited": (limited, limited.tenant),
        }
        for server, token in configs.values():  # warm up every path once
            run_rounds(server.client, token, server.ids, max(block // 3, 2))
        order = list(configs)
        for cycle in range(blocks):
            for name in order[cycle % 4 :] + order[: cycle % 4]:
                server, token = configs[name]
                cpu_per_request, rate = measure_block(server, token, block)
                cpu[name].append(cpu_per_request)
                wall[name].append(rate)
            ratios["tenant"].append(cpu["admin"][-1] / cpu["tenant"][-1])
            ratios["tenant_limited"].append(cpu["limited_admin"][-1] / cpu["limited"][-1])
            ratios["limited"].append(cpu["tenant"][-1] / cpu["limited"][-1])
            ratios["tenant_wall"].append(wall["tenant"][-1] / wall["admin"][-1])
            ratios["limited_wall"].append(wall["limited"][-1] / wall["tenant"][-1])

    cpu_ms = {name: statistics.median(values) * 1000 for name, values in cpu.items()}
    rate = {name: statistics.median(values) for name, values in wall.items()}
    tenant_vs_admin = statistics.median(ratios["tenant"])
    tenant_vs_admin_limited = statistics.median(ratios["tenant_limited"])
    limited_vs_not = statistics.median(ratios["limited"])
    tenant_wall = statistics.median(ratios["tenant_wall"])
    limited_wall = statistics.median(ratios["limited_wall"])
    width = 52
    heading = f"medians of {blocks} blocks of {block * REQUESTS_PER_ROUND} requests"
    print(
        f"{'mixed API requests, hivenet serve, memory store':<{width}} {'server CPU':>10} {'wall':>8}"
    )
    print(f"{heading:<{width}} {'ms/request':>10} {'req/s':>8}")
    for name, label in (
        ("admin", "cluster-admin token (tenancy off)"),
        ("tenant", "project token (lookup + reference checks)"),
        ("limited_admin", "cluster-admin token, rate limit on (never reached)"),
        ("limited", "project token, rate limit on (never reached)"),
    ):
        print(f"{label:<{width}} {cpu_ms[name]:>10.3f} {rate[name]:>8.0f}")
    print("ratios of request rates (medians of the cycles' ratios):")
    print(f"{'project / admin':<{width}} {tenant_vs_admin:>10.3f} {tenant_wall:>8.3f}")
    print(
        f"{'project / admin, both with the rate limit on':<{width}} {tenant_vs_admin_limited:>10.3f}"
    )
    print(
        f"{'rate limit on / off (project token)':<{width}} {limited_vs_not:>10.3f} {limited_wall:>8.3f}"
    )
    print(
        json.dumps(
            {
                "bench": "api_auth",
                "block_rounds": block,
                "blocks": blocks,
                "requests_per_round": REQUESTS_PER_ROUND,
                "admin_server_cpu_ms_per_request": round(cpu_ms["admin"], 4),
                "tenant_server_cpu_ms_per_request": round(cpu_ms["tenant"], 4),
                "tenant_vs_admin": round(tenant_vs_admin, 3),
                "tenant_vs_admin_wall": round(tenant_wall, 3),
                "tenant_vs_admin_rate_limited": round(tenant_vs_admin_limited, 3),
                "rate_limited_server_cpu_ms_per_request": round(cpu_ms["limited"], 4),
                "rate_limited_vs_not": round(limited_vs_not, 3),
                "rate_limited_vs_not_wall": round(limited_wall, 3),
                "admin_requests_per_s": round(rate["admin"], 1),
                "tenant_requests_per_s": round(rate["tenant"], 1),
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
