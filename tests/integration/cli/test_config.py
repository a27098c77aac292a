"""Where `hivenet` takes its API URL and token from, in order, and `hivenet config show`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hivenet.cli.config import DEFAULT_API_URL, ConfigError, resolve_settings
from tests.integration.cli.conftest import Hivenet, RunningApi


def _write_config(home: Path, text: str) -> Path:
    path = home / ".config" / "hivenet" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _write_admin_token(state_dir: Path, token: str) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "admin-token"
    path.write_text(token + "\n")
    return path


def test_resolution_order_option_env_file_token_file(tmp_path: Path) -> None:
    home, state = tmp_path / "home", tmp_path / "state"
    config = _write_config(home, "api_url: http://file:1\ntoken: file-token\n")
    token_file = _write_admin_token(state, "state-token")
    env = {"HIVENET_API_URL": "http://env:2", "HIVENET_TOKEN": "env-token"}
    env["HIVENET_STATE_DIR"] = str(state)

    def resolve(api_url: str | None, token: str | None, environ: dict[str, str]) -> tuple:
        settings = resolve_settings(
            api_url_option=api_url, token_option=token, env=environ, home=home, is_root=False
        )
        return (
            settings.api_url.value,
            settings.api_url.source,
            settings.token.value,
            settings.token.source,
        )

    assert resolve("http://opt:3", "opt-token", env) == (
        "http://opt:3",
        "--api-url option",
        "opt-token",
        "--token option",
    )
    assert resolve(None, None, env) == (
        "http://env:2",
        "environment variable HIVENET_API_URL",
        "env-token",
        "environment variable HIVENET_TOKEN",
    )
    only_state = {"HIVENET_STATE_DIR": str(state)}
    assert resolve(None, None, only_state) == (
        "http://file:1",
        f"config file {config}",
        "file-token",
        f"config file {config}",
    )
    config.write_text("# nothing set\n")
    assert resolve(None, None, only_state) == (
        DEFAULT_API_URL,
        "built-in default",
        "state-token",
        f"admin-token file {token_file}",
    )
    token_file.unlink()
    _, _, token, source = resolve(None, None, only_state)
    assert token is None and "does not exist" in source


def test_ca_cert_resolution_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = _write_config(home, "ca_cert: certs/ca.pem\n")
    https = {"HIVENET_API_URL": "https://api:9696", "HIVENET_TOKEN": "t"}

    def resolve(option: str | None, env: dict[str, str]) -> tuple[str | None, str]:
        ca = resolve_settings(
            api_url_option=None, token_option=None, ca_cert_option=option, env=env, home=home
        ).ca_cert
        return ca.value, ca.source

    assert resolve("/opt/ca.pem", {**https, "HIVENET_CA_CERT": "/env/ca.pem"}) == (
        "/opt/ca.pem",
        "--ca-cert option",
    )
    assert resolve(None, {**https, "HIVENET_CA_CERT": "/env/ca.pem"}) == (
        "/env/ca.pem",
        "environment variable HIVENET_CA_CERT",
    )
    # Relative to the config file's folder; the file is read for an https URL only.
    assert resolve(None, https) == (
        str(config.parent / "certs" / "ca.pem"),
        f"config file {config}",
    )
    assert resolve(None, {**https, "HIVENET_API_URL": "http://api:9696"})[0] is None
    config.write_text("# nothing set\n")
    assert resolve(None, https) == (None, "built-in default: the system trust store")


def test_default_state_dir_depends_on_root(tmp_path: Path) -> None:
    as_root = resolve_settings(
        api_url_option=None, token_option=None, env={}, home=tmp_path, is_root=True
    )
    as_user = resolve_settings(
        api_url_option=None, token_option=None, env={}, home=tmp_path, is_root=False
    )
    assert as_root.state_dir == Path("/var/lib/hivenet")
    assert as_user.state_dir == tmp_path / ".local" / "state" / "hivenet"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("api_url: [unclosed\n", "not valid YAML"),
        ("- a list\n", "must be a mapping"),
        ("api_url: http://x\ncolour: blue\n", "unknown key 'colour'"),
        ("token: 42\n", "token must be a non-empty string"),
    ],
)
def test_bad_config_file_is_named(tmp_path: Path, text: str, message: str) -> None:
    config = _write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as error:
        resolve_settings(api_url_option=None, token_option=None, env={}, home=tmp_path)
    assert str(config) in str(error.value)


def test_url_without_scheme_gets_http(tmp_path: Path) -> None:
    settings = resolve_settings(
        api_url_option="127.0.0.1:9696/", token_option="t", env={}, home=tmp_path
    )
    assert settings.api_url.value == "http://127.0.0.1:9696"


def test_config_show_names_the_sources(isolated_env: Path, tmp_path: Path) -> None:
    token_file = _write_admin_token(tmp_path / "state", "secret-admin-token")
    shown = json.loads(
        Hivenet().ok("config", "show", "--json", env={"HIVENET_API_URL": "http://env:9"}).stdout
    )
    assert shown["api_url"] == {
        "value": "http://env:9",
        "source": "environment variable HIVENET_API_URL",
    }
    assert shown["token"]["source"] == f"admin-token file {token_file}"
    assert "secret-admin-token" not in json.dumps(shown)  # masked
    assert shown["state_dir"]["value"] == str(tmp_path / "state")

    table = Hivenet().ok("config", "show").stdout
    assert "admin-token file" in table and "built-in default" in table


def test_cli_uses_config_file_and_admin_token_file(
    api_server: RunningApi, isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hivenet = Hivenet()
    _write_config(isolated_env, f"api_url: {api_server.url}\n")
    monkeypatch.setenv("HIVENET_STATE_DIR", str(api_server.state_dir))
    hivenet.ok("host", "list")  # URL from the file, token from the server's admin-token
    _write_config(isolated_env, f"api_url: {api_server.url}\ntoken: stale\n")
    result = hivenet.fails("host", "list")  # the file's token wins over the admin-token file
    assert "rejected the token from config file" in result.stderr


def test_broken_config_file_is_exit_1(isolated_env: Path) -> None:
    config = _write_config(isolated_env, "colour: blue\n")
    result = Hivenet().fails("host", "list")
    assert f"config file {config}: unknown key 'colour'" in result.stderr
