"""`hivenet quota show|set|reset` against a real `hivenet serve` process: the cluster admin
sets a project's limits, the project's member is refused a create past them with a message
naming the kind, the project, the limit and the usage, and may not change them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli.conftest import Hivenet
from tests.integration.openstack.served import Served, serve


@pytest.fixture
def served(tmp_path: Path, isolated_env: Path) -> Iterator[Served]:
    with serve(tmp_path) as running:
        yield running


def test_quota_commands_against_a_served_api(served: Served) -> None:
    hivenet = Hivenet()

    def as_token(token: str) -> dict[str, str | None]:
        return {"HIVENET_API_URL": served.base_url, "HIVENET_TOKEN": token}

    admin = as_token(served.admin_token)
    member = as_token(
        hivenet.json("token", "create", "--project", "acme", "--role", "member", env=admin)[
            "secret"
        ]
    )
    shown = hivenet.json("quota", "show", "acme", env=admin)
    assert shown["quotas"]["bridge"] == 100 and shown["usage"]["bridge"] == 0
    table = hivenet.ok("quota", "show", "acme", env=admin).stdout
    assert "security_group_rule" in table and "500" in table

    changed = hivenet.json("quota", "set", "acme", "--networks", "1", "--ports", "-1", env=admin)
    assert changed["quotas"]["bridge"] == 1 and changed["quotas"]["port"] == -1
    assert "unlimited" in hivenet.ok("quota", "show", "acme", env=admin).stdout
    lb_kinds = hivenet.json(
        "quota", "set", "acme", "--load-balancers", "2", "--members", "20", "--chains", "5",
        "--health-monitors", "3", env=admin,
    )  # fmt: skip
    assert {k: lb_kinds["quotas"][k] for k in ("load_balancer", "member", "chain")} == {
        "load_balancer": 2,
        "member": 20,
        "chain": 5,
    }
    assert lb_kinds["quotas"]["health_monitor"] == 3 and lb_kinds["quotas"]["pool"] == 10
    hivenet.json("bridge", "create", "--name", "one", env=member)
    refused = hivenet.fails("bridge", "create", "--name", "two", env=member)
    assert "409" in refused.stderr
    assert "project acme may hold 1 bridge objects and holds 1" in refused.stderr

    own = hivenet.json("quota", "show", "acme", env=member)
    assert own["usage"]["bridge"] == 1
    denied = hivenet.fails("quota", "set", "acme", "--networks", "9", env=member)
    assert "403" in denied.stderr and "only the cluster admin" in denied.stderr
    nothing = hivenet.fails("quota", "set", "acme", code=2, env=admin)
    assert "at least one limit" in nothing.stderr

    assert "reset" in hivenet.ok("quota", "reset", "acme", env=admin).stdout
    assert hivenet.json("quota", "show", "acme", env=admin)["quotas"]["bridge"] == 100
    hivenet.json("bridge", "create", "--name", "two", env=member)
