"""Where the `hivenet` command finds its API URL, token and local state directory.

Owns the resolution order and remembers, for every setting, which source supplied it (so
`hivenet config show` can say so):

    API URL: --api-url > $HIVENET_API_URL  > config file `api_url` > http://127.0.0.1:9696
    token:   --token   > $HIVENET_TOKEN    > config file `token`   > <state dir>/admin-token
    CA:      --ca-cert > $HIVENET_CA_CERT  > config file `ca_cert` > the system trust store

(a relative `ca_cert` in the config file is relative to the file's folder). There is
deliberately no setting that turns certificate verification off: only the `--insecure` flag
of each command line does.

The config file is `~/.config/hivenet/config.yaml` ($HIVENET_CONFIG overrides the path).
The state dir is $HIVENET_STATE_DIR, else /var/lib/hivenet as root, else
~/.local/state/hivenet. Reads files and the environment only; never talks to the network.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_PORT = 9696
DEFAULT_API_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
ADMIN_TOKEN_FILE = "admin-token"
CONFIG_KEYS = ("api_url", "token", "ca_cert")
SYSTEM_TRUST_STORE = "the system trust store"

ENV_API_URL = "HIVENET_API_URL"
ENV_TOKEN = "HIVENET_TOKEN"
ENV_CA_CERT = "HIVENET_CA_CERT"
ENV_STATE_DIR = "HIVENET_STATE_DIR"
ENV_CONFIG = "HIVENET_CONFIG"


class ConfigError(Exception):
    """A config source exists but cannot be used (unreadable, not YAML, unknown key)."""


@dataclass(frozen=True, slots=True)
class Setting:
    """A resolved value and a human description of where it came from."""

    value: str | None
    source: str


@dataclass(frozen=True, slots=True)
class ClientSettings:
    api_url: Setting
    token: Setting
    ca_cert: Setting  # value None: the system trust store
    config_file: Path
    config_file_exists: bool
    state_dir: Path


def default_state_dir(env: Mapping[str, str], *, is_root: bool, home: Path) -> Path:
    explicit = env.get(ENV_STATE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    if is_root:
        return Path("/var/lib/hivenet")
    return home / ".local" / "state" / "hivenet"


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def config_file_path(env: Mapping[str, str], home: Path) -> Path:
    explicit = env.get(ENV_CONFIG)
    if explicit:
        return Path(explicit).expanduser()
    return home / ".config" / "hivenet" / "config.yaml"


def read_config_file(path: Path) -> dict[str, str]:
    """The config file's settings; {} when the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {path} must be a mapping with keys {', '.join(CONFIG_KEYS)}, "
            f"got {type(loaded).__name__}"
        )
    settings: dict[str, str] = {}
    for key, value in loaded.items():
        if key not in CONFIG_KEYS:
            raise ConfigError(
                f"config file {path}: unknown key {key!r} (known: {', '.join(CONFIG_KEYS)})"
            )
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"config file {path}: {key} must be a non-empty string, got {value!r}"
            )
        settings[key] = value.strip()
    return settings


def read_admin_token(state_dir: Path) -> tuple[str | None, str]:
    """(token, why) from `<state_dir>/admin-token`; token None with the reason when unusable."""
    path = state_dir / ADMIN_TOKEN_FILE
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None, f"no token (admin-token file {path} does not exist)"
    except OSError as exc:
        return None, f"no token (admin-token file {path} unreadable: {exc.strerror or exc})"
    if not token:
        return None, f"no token (admin-token file {path} is empty)"
    return token, f"admin-token file {path}"


def resolve_settings(
    *,
    api_url_option: str | None,
    token_option: str | None,
    ca_cert_option: str | None = None,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
    is_root: bool | None = None,
) -> ClientSettings:
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    is_root = running_as_root() if is_root is None else is_root

    config_path = config_file_path(env, home)
    state_dir = default_state_dir(env, is_root=is_root, home=home)
    explicit_url = api_url_option or env.get(ENV_API_URL)
    needs_file = (
        not explicit_url
        or not (token_option or env.get(ENV_TOKEN))
        or (_is_https(explicit_url) and not (ca_cert_option or env.get(ENV_CA_CERT)))
    )
    # A config file that is not consulted cannot break a command that does not need it.
    file_settings = read_config_file(config_path) if needs_file else {}

    if api_url_option:
        api_url = Setting(api_url_option, "--api-url option")
    elif env.get(ENV_API_URL):
        api_url = Setting(env[ENV_API_URL], f"environment variable {ENV_API_URL}")
    elif "api_url" in file_settings:
        api_url = Setting(file_settings["api_url"], f"config file {config_path}")
    else:
        api_url = Setting(DEFAULT_API_URL, "built-in default")

    if token_option:
        token = Setting(token_option, "--token option")
    elif env.get(ENV_TOKEN):
        token = Setting(env[ENV_TOKEN], f"environment variable {ENV_TOKEN}")
    elif "token" in file_settings:
        token = Setting(file_settings["token"], f"config file {config_path}")
    else:
        value, why = read_admin_token(state_dir)
        token = Setting(value, why)

    if ca_cert_option:
        ca_cert = Setting(str(Path(ca_cert_option).expanduser()), "--ca-cert option")
    elif env.get(ENV_CA_CERT):
        ca_cert = Setting(
            str(Path(env[ENV_CA_CERT]).expanduser()), f"environment variable {ENV_CA_CERT}"
        )
    elif "ca_cert" in file_settings:
        in_file = config_path.parent / Path(file_settings["ca_cert"]).expanduser()
        ca_cert = Setting(str(in_file), f"config file {config_path}")
    else:
        ca_cert = Setting(None, f"built-in default: {SYSTEM_TRUST_STORE}")

    return ClientSettings(
        api_url=Setting(_normalize_url(api_url.value or DEFAULT_API_URL), api_url.source),
        token=token,
        ca_cert=ca_cert,
        config_file=config_path,
        config_file_exists=config_path.exists(),
        state_dir=state_dir,
    )


def _is_https(url: str) -> bool:
    return url.strip().lower().startswith("https://")


def _normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    return url


def mask_token(token: str | None) -> str:
    if not token:
        return "(none)"
    if len(token) <= 8:
        return "*" * len(token)
    return f"{token[:4]}…{token[-2:]} ({len(token)} characters)"
