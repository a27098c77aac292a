"""Trace requests answered by real agents (agent/tracing.py) through the API: a synthetic
trace `via: agent` sees the agent's live flow state and changes nothing; a live trace records
the next matching real upcall and then shows the installed flow's hit counters; requests
expire; the per-host bound answers 429; bad requests get a clear 4xx."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from hivenet.api import create_app
from hivenet.api.client import HivenetClient
from hivenet.cli.context import CliState
from hivenet.cli.main import app as cli_app
from hivenet.model import Port
from hivenet.store.keys import STATE_PREFIX
from tests.integration.agent.test_agents import Cloud, cloud, received
from tests.integration.agent.test_metrics import ping, routed_traffic
from tests.integration.common import eventually, run


@contextmanager
def api_client(store_url: str, state_dir: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    with TestClient(create_app(store_url, state_dir)) as http:
        token = (state_dir / "admin-token").read_text().strip()
        yield http, {"Authorization": f"Bearer {token}"}


async def call(
    http: TestClient, method: str, url: str, headers: dict[str, str], body: Any = None
) -> Any:
    # The agents run on this loop: the blocking client must not hold it.
    return await asyncio.to_thread(http.request, method, url, json=body, headers=headers)


async def state_keys(c: Cloud, kind: str) -> list[str]:
    result = await c.store.range(STATE_PREFIX)
    return [kv.key for kv in result.kvs if f"/{kind}/" in kv.key]


def test_synthetic_trace_through_the_agent_and_live_trace(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path}/state.db"

    async def scenario() -> None:
        async with cloud(store_url) as c:
            vm1, vm2, gw_mac = await routed_traffic(c)
            with api_client(store_url, tmp_path / "hn-api") as (http, auth):
                body = {"from_port": vm1.id, "ip_dst": "10.0.2.20", "dst_port": 22, "via": "agent"}
                agent = c.agents["h1"]
                upcalls = agent.pipeline.stats.upcalls
                response = await call(http, "POST", "/v1/traces", auth, body)
                assert response.status_code == 200, response.text
                trace = response.json()
                assert trace["simulated_by"] == "agent" and trace["flow_state"] == "live"
                assert [e["host"] for e in trace["egress"]] == ["h2"]
                # No upcall (so nothing learned), no flow, no flow state.
                assert agent.pipeline.stats.upcalls == upcalls
                assert len(c.datapaths["h1"].flow_table) == 0
                assert len(agent.flowstate.conntrack) == 0 and len(agent.flowstate.nat) == 0
                # The request and the answer are gone once answered.
                await eventually(lambda: not c.agents["h1"].traces._answered)

                # Live: the next upcall from vm1 to 10.0.2.20 is recorded, then its flow's hits.
                live = await call(
                    http, "POST", "/v1/traces/live", auth,
                    {"port": vm1.id, "count": 1, "ttl": 30, "match": {"ip_dst": "10.0.2.20", "proto": "icmp"}},
                )  # fmt: skip
                assert live.status_code == 201, live.text
                trace_id = live.json()["id"]
                await eventually(lambda: bool(c.agents["h1"].traces.live))
                pending = (await call(http, "GET", f"/v1/traces/live/{trace_id}", auth)).json()
                assert pending["status"] in ("pending", "waiting") and pending["records"] == []
                # A packet the match excludes is not recorded.
                c.datapaths["h1"].receive(vm1.tunnel_key, ping(vm1, gw_mac, "192.0.2.99", 1))
                for seq in range(4):
                    c.datapaths["h1"].receive(vm1.tunnel_key, ping(vm1, gw_mac, "10.0.2.20", seq))
                assert len(received(c, "h2", vm2)) == 4
                c.agents["h1"].traces.tick()

                async def recorded() -> dict[str, Any]:
                    while True:
                        got = (await call(http, "GET", f"/v1/traces/live/{trace_id}", auth)).json()
                        if got["status"] == "done" and got["records"][0]["flow"]["packets"] >= 3:
                            return got
                        await asyncio.sleep(0.05)

                done = await asyncio.wait_for(recorded(), 10)
                (record,) = done["records"]
                assert record["packet"]["ip_dst"] == "10.0.2.20"
                assert record["flow"]["installed"] and record["flow"]["packets"] == 3
                assert [e["host"] for e in record["egress"]] == ["h2"]

    run(scenario(), timeout=60)


def test_live_trace_bounds_and_bad_requests(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path}/state.db"

    async def scenario() -> None:
        async with cloud(store_url) as c:
            vm1, _vm2, _gw = await routed_traffic(c)
            with api_client(store_url, tmp_path / "hn-api") as (http, auth):
                bad = [
                    ({"port": vm1.id, "count": 1000}, 422, "count"),
                    ({"port": vm1.id, "match": {"ttl": "3"}}, 422, "match.ttl"),
                    ({"port": vm1.id, "match": {"ip_dst": "10.0.0.999"}}, 422, "match.ip_dst"),
                    ({"port": vm1.id, "match": {"tp_dst": "70000"}}, 422, "match.tp_dst"),
                    ({"port": vm1.id, "ttl": 0}, 422, "ttl"),
                    ({"port": "nope"}, 404, None),
                ]
                for body, status, field in bad:
                    response = await call(http, "POST", "/v1/traces/live", auth, body)
                    assert response.status_code == status, (body, response.text)
                    if field is not None:
                        fields = [d["field"] for d in response.json()["error"]["details"]]
                        assert any(field in str(f) for f in fields), (body, fields)
                # A port on no host: nobody could honour it.
                unbound = await c.repo.create(Port(device_kind="bridge", device_id=vm1.device_id))
                response = await call(
                    http, "POST", "/v1/traces/live", auth, {"port": unbound.obj.id}
                )
                assert response.status_code == 409, response.text
                # At most 8 at once per host; the 9th is refused.
                for _ in range(8):
                    ok = await call(
                        http, "POST", "/v1/traces/live", auth, {"port": vm1.id, "ttl": 2}
                    )
                    assert ok.status_code == 201, ok.text
                flood = await call(http, "POST", "/v1/traces/live", auth, {"port": vm1.id})
                assert flood.status_code == 429 and "wait" in flood.text
                await eventually(lambda: len(c.agents["h1"].traces.live) == 8)
                # They expire by themselves (their lease's TTL), and the agent forgets them.
                await eventually(lambda: not c.agents["h1"].traces.live, timeout=10)
                assert await state_keys(c, "trace_request") == []
                await eventually(lambda: not c.agents["h1"].traces._answered)
                missing = await call(http, "GET", "/v1/traces/live/h1~0123", auth)
                assert missing.status_code == 404

            # The agent's own bound, for requests written past the API.
            agent = c.agents["h1"]
            for index in range(10):
                agent.traces.on_request(
                    f"t{index}", json.dumps({"mode": "live", "port": vm1.id}).encode()
                )
            assert len(agent.traces.live) == 8 and agent.traces.rejected == 2

    run(scenario(), timeout=60)


def test_cli_live_trace_and_via_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store_url = f"sqlite:///{tmp_path}/state.db"

    async def scenario() -> None:
        async with cloud(store_url) as c:
            vm1, _vm2, gw_mac = await routed_traffic(c)
            with api_client(store_url, tmp_path / "hn-api") as (http, auth):
                client = HivenetClient(
                    "http://testserver", auth["Authorization"][7:], transport=http._transport
                )
                monkeypatch.setattr(CliState, "client", lambda self: client)
                runner = CliRunner()
                via_agent = await asyncio.to_thread(
                    runner.invoke, cli_app,
                    ["trace", "--from-port", vm1.id, "--ip-dst", "10.0.2.20", "--via", "agent"],
                    env={"COLUMNS": "200"},
                )  # fmt: skip
                assert via_agent.exit_code == 0, via_agent.output
                assert "simulated by agent" in via_agent.stdout and "FORWARDED" in via_agent.stdout
                live = asyncio.create_task(
                    asyncio.to_thread(
                        runner.invoke, cli_app,
                        ["trace", "--live", "--port", vm1.id, "--match", "proto=icmp", "--wait", "20"],
                        env={"COLUMNS": "200"},
                    )
                )  # fmt: skip
                await eventually(lambda: bool(c.agents["h1"].traces.live), timeout=10)
                for seq in range(3):
                    c.datapaths["h1"].receive(vm1.tunnel_key, ping(vm1, gw_mac, "10.0.2.20", seq))
                result = await asyncio.wait_for(live, 30)
                assert result.exit_code == 0, result.output
                assert "1 of 1 recorded" in result.stdout and "flow installed" in result.stdout
                bad = await asyncio.to_thread(
                    runner.invoke,
                    cli_app,
                    ["trace", "--live", "--port", vm1.id, "--match", "nonsense"],
                )
                assert bad.exit_code != 0 and "HEADER=VALUE" in bad.output

    run(scenario(), timeout=90)
