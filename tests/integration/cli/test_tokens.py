"""`hivenet token create|list|revoke` end to end against a real `hivenet serve` process:
a project admin issues a reader token, the reader reads but may not write, a revoked token
is refused on its next request."""

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


def test_token_commands_against_a_served_api(served: Served) -> None:
    hivenet = Hivenet()

    def as_token(token: str) -> dict[str, str | None]:
        return {"HIVENET_API_URL": served.base_url, "HIVENET_TOKEN": token}

    admin = as_token(served.admin_token)
    acme_admin = hivenet.json(
        "token", "create", "--project", "acme", "--role", "admin", "--name", "ops", env=admin
    )
    assert (acme_admin["project"], acme_admin["role"], acme_admin["name"]) == (
        "acme",
        "admin",
        "ops",
    )
    # The table shows the secret once, with a warning.
    shown = hivenet.ok(
        "token",
        "create",
        "--project",
        "acme",
        "--role",
        "reader",
        env=as_token(acme_admin["secret"]),
    ).stdout
    assert "shown once" in shown
    reader_secret = shown.strip().splitlines()[-1].strip()
    assert len(reader_secret) >= 43

    refused = hivenet.fails(
        "token",
        "create",
        "--project",
        "globex",
        "--role",
        "member",
        env=as_token(acme_admin["secret"]),
    )
    assert "403" in refused.stderr and "globex" in refused.stderr
    bad_role = hivenet.fails(
        "token", "create", "--project", "acme", "--role", "owner", code=2, env=admin
    )
    assert "owner" in bad_role.stderr

    listed = hivenet.json("token", "list", env=admin)
    assert {t["role"] for t in listed} == {"admin", "reader"}
    assert all("secret" not in t for t in listed)
    table = hivenet.ok("token", "list", env=admin).stdout
    assert acme_admin["id"] in table

    reader = as_token(reader_secret)
    assert hivenet.json("bridge", "list", env=reader)["items"] == []
    write = hivenet.fails("bridge", "create", "--name", "b", env=reader)
    assert "role 'reader' may only read" in write.stderr

    reader_id = next(t["id"] for t in listed if t["role"] == "reader")
    assert reader_id in hivenet.ok("token", "revoke", reader_id, env=admin).stdout
    gone = hivenet.fails("bridge", "list", env=reader)
    assert "401" in gone.stderr
