"""Fixtures for the CLI tests: a real API server (uvicorn in a background thread on a free
127.0.0.1 port, embedded SQLite store in a temporary state dir) and an in-process `hivenet`
runner whose environment is isolated from the developer's (HOME, HIVENET_* variables)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner, Result

from hivenet.cli.main import app

SERVER_START_TIMEOUT = 15.0


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class RunningApi:
    url: str
    state_dir: Path
    token: str


@pytest.fixture(scope="session")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApi]:
    from hivenet.api import create_app

    state_dir = tmp_path_factory.mktemp("hn-cli-api")
    app_under_test = create_app(f"sqlite://{state_dir / 'hivenet.db'}", state_dir)
    port = free_local_port()
    server = uvicorn.Server(
        uvicorn.Config(app_under_test, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="hn-cli-api-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the API server thread died during startup")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the API server did not start within {SERVER_START_TIMEOUT} s")
        time.sleep(0.02)
    try:
        token = (state_dir / "admin-token").read_text().strip()
        yield RunningApi(f"http://127.0.0.1:{port}", state_dir, token)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class Hivenet:
    """Runs the `hivenet` command in-process and checks its outcome."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str, env: dict[str, str | None] | None = None) -> Result:
        # Output is piped here: tables are not squeezed to a $COLUMNS the environment set
        # (a developer's shell, or pytest-xdist's workers).
        return self.runner.invoke(app, list(args), env={"COLUMNS": None, **(env or {})})

    def ok(self, *args: str, env: dict[str, str | None] | None = None) -> Result:
        result = self(*args, env=env)
        assert result.exit_code == 0, (
            f"hivenet {' '.join(args)} exited {result.exit_code}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\nexception: {result.exception!r}"
        )
        return result

    def json(self, *args: str, env: dict[str, str | None] | None = None) -> Any:
        return json.loads(self.ok(*args, "--json", env=env).stdout)

    def fails(self, *args: str, code: int = 1, env: dict[str, str | None] | None = None) -> Result:
        result = self(*args, env=env)
        assert result.exit_code == code, (
            f"hivenet {' '.join(args)} exited {result.exit_code}, expected {code}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\nexception: {result.exception!r}"
        )
        return result


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No HIVENET_* from the developer, HOME and the state dir inside tmp_path."""
    import os

    for name in list(os.environ):
        if name.startswith("HIVENET_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HIVENET_STATE_DIR", str(tmp_path / "state"))
    return home


def hivenet_for(url: str, token: str, monkeypatch: pytest.MonkeyPatch) -> Hivenet:
    """A runner whose commands go to the server at `url` with `token` (through the
    environment, as a user would set them)."""
    monkeypatch.setenv("HIVENET_API_URL", url)
    monkeypatch.setenv("HIVENET_TOKEN", token)
    return Hivenet()


@pytest.fixture
def hivenet(api_server: RunningApi, isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> Hivenet:
    return hivenet_for(api_server.url, api_server.token, monkeypatch)


@pytest.fixture
def unique() -> str:
    """A suffix that keeps ids of different tests apart on the shared server."""
    import uuid

    return uuid.uuid4().hex[:8]
