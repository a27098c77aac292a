"""`hivenet serve --rate-limit N/s --rate-burst M` on a real server process: a client over
its burst gets 429 with Retry-After; a bad rate is refused before the server starts."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.integration.cli.conftest import Hivenet
from tests.integration.openstack.served import serve


def test_serve_limits_each_client(tmp_path: Path, isolated_env: Path) -> None:
    with serve(tmp_path, "--rate-limit", "0.05/s", "--rate-burst", "4") as served:
        # The readiness probe (no token) drew on the address's bucket, not this token's.
        auth = {"Authorization": f"Bearer {served.admin_token}"}
        answers = [httpx.get(f"{served.base_url}/v1/bridges", headers=auth) for _ in range(5)]
        assert [a.status_code for a in answers] == [200, 200, 200, 200, 429]
        assert int(answers[-1].headers["Retry-After"]) >= 19
        assert "at most 0.05 requests/s with bursts of 4" in answers[-1].text


def test_serve_refuses_a_bad_rate(tmp_path: Path, isolated_env: Path) -> None:
    refused = Hivenet().fails(
        "serve", "--state-dir", str(tmp_path / "s"), "--rate-limit", "fast", code=2
    )
    assert "--rate-limit" in refused.stderr and "not a rate" in refused.stderr
