"""Benchmark of what tenancy costs an API request: the same mixed requests with a project
token (its hash looked up in the store on every request, every reference of every write
checked for the project in the write's txn) against the cluster-admin token (in-memory
token, unscoped writes), in the same run.

The mix, per round, on one project's topology (a chain, a bridge, a router): list bridges,
get the bridge, create a port on the bridge, patch the bridge's inbound chain, create a
rule on the chain naming the port, delete the rule, delete the port. Rounds alternate
between the two tokens (several runs each, the median), in process through the ASGI app
(`fastapi.testclient`) on the in-memory store, so the figures are the API's own cost.

Owns nothing but this measurement; must not be imported by the package.
The same run also measures the per-client rate limit's own cost (`api/ratelimit.py`): the
project token's rounds on a second app whose limit is on but never reached, against the first
app (no limit), alternating.

Usage: python bench/api_auth.py [--rounds N] [--runs R] [--quick]
Prints a table, then exactly one JSON line (`tenant_vs_admin`: the rate ratio, goal >= 0.9;
`rate_limited_vs_not`: the project token's rate with the limit on over without).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from hivenet.api import create_app
from hivenet.api.auth import ADMIN_TOKEN_FILE
from hivenet.api.ratelimit import RateLimit

PROJECT = "acme"
REQUESTS_PER_ROUND = 7


def _call(client: TestClient, token: str, method: str, url: str, body: Any = None) -> Any:
    response = client.request(method, url, json=body, headers={"Authorization": f"Bearer {token}"})
    if response.status_code >= 300:
        raise SystemExit(f"{method} {url}: {response.status_code} {response.text}")
    return response.json() if response.content else None


def run_rounds(client: TestClient, token: str, ids: dict[str, str], rounds: int) -> float:
    """Requests per second of `rounds` rounds of the mix with `token`."""
    bridge, chain = ids["bridge"], ids["chain"]
    started = time.perf_counter()
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
    return rounds * REQUESTS_PER_ROUND / (time.perf_counter() - started)


def _setup(client: TestClient, state_dir: Path) -> tuple[str, str, dict[str, str]]:
    """(admin token, a member token of PROJECT, ids of PROJECT's chain, bridge, router)."""
    admin = (state_dir / ADMIN_TOKEN_FILE).read_text().strip()
    tenant = _call(client, admin, "POST", "/v1/tokens", {"project": PROJECT, "role": "member"})[
        "secret"
    ]
    ids = {
        kind: _call(client, admin, "POST", f"/v1/{kind}s", {"tenant_id": PROJECT})["id"]
        for kind in ("chain", "bridge", "router")
    }
    return admin, tenant, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200, help="rounds of the mix per run")
    parser.add_argument("--runs", type=int, default=5, help="alternating runs per token")
    parser.add_argument("--quick", action="store_true", help="20 rounds, 3 runs")
    args = parser.parse_args()
    rounds, runs = (20, 3) if args.quick else (args.rounds, args.runs)

    never_reached = RateLimit(rate=1e9, burst=10**9)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as limited_tmp:
        state_dir, limited_dir = Path(tmp), Path(limited_tmp)
        with (
            TestClient(create_app("memory://", state_dir)) as client,
            TestClient(
                create_app("memory://", limited_dir, rate_limit=never_reached)
            ) as limited_client,
        ):
            admin, tenant, ids = _setup(client, state_dir)
            _, limited_tenant, limited_ids = _setup(limited_client, limited_dir)
            warm_up = max(rounds // 10, 2)
            run_rounds(client, admin, ids, warm_up)
            run_rounds(client, tenant, ids, warm_up)
            run_rounds(limited_client, limited_tenant, limited_ids, warm_up)
            rates: dict[str, list[float]] = {"admin": [], "tenant": [], "limited": []}
            for _ in range(runs):
                rates["admin"].append(run_rounds(client, admin, ids, rounds))
                rates["tenant"].append(run_rounds(client, tenant, ids, rounds))
                rates["limited"].append(
                    run_rounds(limited_client, limited_tenant, limited_ids, rounds)
                )

    admin_rate = statistics.median(rates["admin"])
    tenant_rate = statistics.median(rates["tenant"])
    limited_rate = statistics.median(rates["limited"])
    ratio = tenant_rate / admin_rate
    limit_ratio = limited_rate / tenant_rate
    print(f"{'mixed API requests, in process, memory store':<52} {'requests/s':>14}")
    print(f"{'cluster-admin token (unscoped)':<52} {admin_rate:>14.0f}")
    print(f"{'project token (store lookup + reference checks)':<52} {tenant_rate:>14.0f}")
    print(f"{'project / admin rate':<52} {ratio:>14.3f}")
    print(f"{'project token, rate limit on (never reached)':<52} {limited_rate:>14.0f}")
    print(f"{'rate limit on / off':<52} {limit_ratio:>14.3f}")
    print(
        json.dumps(
            {
                "bench": "api_auth",
                "rounds": rounds,
                "runs": runs,
                "requests_per_round": REQUESTS_PER_ROUND,
                "admin_requests_per_s": round(admin_rate, 1),
                "tenant_requests_per_s": round(tenant_rate, 1),
                "tenant_vs_admin": round(ratio, 3),
                "rate_limited_requests_per_s": round(limited_rate, 1),
                "rate_limited_vs_not": round(limit_ratio, 3),
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
