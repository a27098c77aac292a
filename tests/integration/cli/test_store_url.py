"""`hivenet serve` and `hivenet agent run` refuse a bad `--store` at start, in one message
naming the option and the path, and never echo a password given in the URL."""

from __future__ import annotations

from pathlib import Path

from tests.integration.cli.conftest import Hivenet


def test_serve_refuses_an_unreadable_ca_file_naming_it(isolated_env: Path) -> None:
    missing = isolated_env / "no-such-ca.pem"
    result = Hivenet().fails(
        "serve",
        "--store",
        f"etcds://127.0.0.1:2379?cacert={missing}",
        "--state-dir",
        str(isolated_env / "state"),
    )
    assert "--store" in result.stderr
    assert f"option cacert: cannot read '{missing}'" in result.stderr


def test_serve_refuses_a_password_in_the_url_without_printing_it(isolated_env: Path) -> None:
    result = Hivenet().fails(
        "serve",
        "--store",
        "etcd://127.0.0.1:2379?user=hivenet&password=hunter2",
        "--state-dir",
        str(isolated_env / "state"),
    )
    assert "password_file" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_agent_refuses_a_certificate_without_its_key(isolated_env: Path) -> None:
    cert = isolated_env / "client.pem"
    cert.write_text("x")
    result = Hivenet().fails(
        "agent",
        "run",
        "--host-id",
        "h1",
        "--store",
        f"etcd://127.0.0.1:2379?cert={cert}",
        "--state-dir",
        str(isolated_env / "state"),
        code=2,
    )
    assert "needs option key" in result.stderr
