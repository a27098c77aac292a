"""Benchmark of the Neutron translation layer against the native API, in the same run.

Owns nothing but measurements; must not be imported by the package or run as a timed test.
Starts `hivenet serve` (embedded WAL-file store) on 127.0.0.1 and, over HTTP:
- creates ports alternately in batches through `/v1/ports` and `/v2.0/ports` (Neutron's with
  its defaults: port security and the project's default security group) until there are
  `--ports` ports (10k by default): ports created per second through each, and the ratio;
- lists every port: `/v2.0/ports` (one response, Neutron style) against `/v1/ports` (pages of
  1000 until the end), median of a few runs each, and the ratio;
- times `openstack port list` (the real CLI, auth_type none) at that size.

Usage: .venv/bin/python bench/neutron_api.py [--ports N] [--quick]
Prints a table, then exactly one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

BATCH = 100
LIST_RUNS = 5
V1_PAGE = 1000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_server(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "hivenet"),
            "serve",
            "--port",
            str(port),
            "--state-dir",
            str(directory / "hn-state"),
            "--openstack-noauth-project",
            "bench",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + "/", timeout=2).status_code == 200:
                return server, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise SystemExit("hivenet serve did not come up")
        time.sleep(0.2)


def create_ports(client: httpx.Client, base: str, token: str, total: int) -> dict[str, float]:
    """Alternate batches through /v1 and /v2.0 until `total` ports exist; ports/s each."""
    network = client.post(f"{base}/v2.0/networks", json={"network": {"name": "bench"}})
    network.raise_for_status()
    network_id = network.json()["network"]["id"]
    native_headers = {"Authorization": f"Bearer {token}"}
    elapsed = {"v1": 0.0, "v2.0": 0.0}
    created = {"v1": 0, "v2.0": 0}
    while sum(created.values()) < total:
        for api in ("v1", "v2.0"):
            count = min(BATCH, total - sum(created.values()))
            started = time.perf_counter()
            for _ in range(count):
                if api == "v1":
                    response = client.post(
                        f"{base}/v1/ports",
                        json={
                            "device_kind": "bridge",
                            "device_id": network_id,
                            "tenant_id": "bench",
                        },
                        headers=native_headers,
                    )
                else:
                    response = client.post(
                        f"{base}/v2.0/ports", json={"port": {"network_id": network_id}}
                    )
                response.raise_for_status()
            elapsed[api] += time.perf_counter() - started
            created[api] += count
    return {api: created[api] / elapsed[api] for api in elapsed if elapsed[api] > 0}


def list_latency(client: httpx.Client, base: str, token: str, total: int) -> dict[str, float]:
    """Median seconds to read every port through each API."""

    def neutron() -> int:
        response = client.get(f"{base}/v2.0/ports")
        response.raise_for_status()
        return len(response.json()["ports"])

    def native() -> int:
        count, marker = 0, None
        while True:
            params: dict[str, Any] = {"limit": V1_PAGE}
            if marker:
                params["marker"] = marker
            response = client.get(
                f"{base}/v1/ports", params=params, headers={"Authorization": f"Bearer {token}"}
            )
            response.raise_for_status()
            page = response.json()
            count += len(page["items"])
            marker = page["next_marker"]
            if marker is None:
                return count

    results: dict[str, float] = {}
    for api, read in (("v1", native), ("v2.0", neutron)):
        samples = []
        for _ in range(LIST_RUNS):
            started = time.perf_counter()
            seen = read()
            samples.append(time.perf_counter() - started)
            if seen < total:
                raise SystemExit(f"{api} listed {seen} ports, expected {total}")
        results[api] = statistics.median(samples)
    return results


def cli_port_list(base: str, directory: Path) -> float:
    clouds = directory / "clouds.yaml"
    clouds.write_text(
        yaml.safe_dump(
            {"clouds": {"bench": {"auth_type": "none", "network_endpoint_override": base + "/"}}}
        )
    )
    env = {**os.environ, "OS_CLIENT_CONFIG_FILE": str(clouds)}
    started = time.perf_counter()
    subprocess.run(
        [
            str(Path(sys.executable).parent / "openstack"),
            "--os-cloud",
            "bench",
            "port",
            "list",
            "-f",
            "value",
            "-c",
            "ID",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1000 ports")
    args = parser.parse_args()
    total = 1000 if args.quick else args.ports
    with tempfile.TemporaryDirectory(prefix="hn-bench-neutron-") as tmp:
        directory = Path(tmp)
        server, base = start_server(directory)
        try:
            token = (directory / "hn-state" / "admin-token").read_text().strip()
            with httpx.Client(timeout=120) as client:
                rates = create_ports(client, base, token, total)
                lists = list_latency(client, base, token, total)
            cli_seconds = cli_port_list(base, directory)
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {
        "bench": "neutron_api",
        "ports": total,
        "v1_ports_per_s": round(rates["v1"], 1),
        "neutron_ports_per_s": round(rates["v2.0"], 1),
        "create_ratio_neutron_to_v1": round(rates["v2.0"] / rates["v1"], 3),
        "v1_list_all_ms": round(lists["v1"] * 1000, 1),
        "neutron_list_all_ms": round(lists["v2.0"] * 1000, 1),
        "list_ratio_neutron_to_v1": round(lists["v2.0"] / lists["v1"], 3),
        "openstack_port_list_s": round(cli_seconds, 2),
    }
    print(f"{'measure':<34}{'/v1':>12}{'/v2.0':>12}{'ratio':>10}")
    print(
        f"{'ports created per second':<34}{result['v1_ports_per_s']:>12}"
        f"{result['neutron_ports_per_s']:>12}{result['create_ratio_neutron_to_v1']:>10}"
    )
    print(
        f"{f'list all {total} ports (ms, median)':<34}{result['v1_list_all_ms']:>12}"
        f"{result['neutron_list_all_ms']:>12}{result['list_ratio_neutron_to_v1']:>10}"
    )
    print(f"{'openstack port list (s)':<34}{'':>12}{result['openstack_port_list_s']:>12}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
