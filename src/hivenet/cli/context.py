"""Per-invocation state of the `hivenet` command and its error policy.

Owns the object stored in the click context (global --api-url/--token), the lazily created
API client, and `reporting_errors()`, which turns API, connection and config failures into a
clear message on stderr and exit code 1 (usage errors stay with click: exit code 2).
Must not know about individual kinds or commands.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import typer

from hivenet.api.client import (
    ApiConnectionError,
    ApiError,
    AuthenticationError,
    HivenetClient,
)
from hivenet.cli.config import (
    ENV_TOKEN,
    ClientSettings,
    ConfigError,
    resolve_settings,
)
from hivenet.cli.output import describe_api_error, make_console

EXIT_FAILURE = 1


@dataclass
class CliState:
    api_url_option: str | None = None
    token_option: str | None = None
    _settings: ClientSettings | None = field(default=None, repr=False)
    _client: HivenetClient | None = field(default=None, repr=False)

    def settings(self) -> ClientSettings:
        if self._settings is None:
            self._settings = resolve_settings(
                api_url_option=self.api_url_option, token_option=self.token_option
            )
        return self._settings

    def client(self) -> HivenetClient:
        if self._client is None:
            settings = self.settings()
            self._client = HivenetClient(settings.api_url.value or "", settings.token.value)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def state_of(ctx: typer.Context) -> CliState:
    state = ctx.find_object(CliState)
    if state is None:
        state = ctx.ensure_object(CliState)
    return state


def fail(*lines: str) -> typer.Exit:
    """Print `lines` to stderr and return the exit to raise (code 1)."""
    console = make_console(stderr=True)
    for line in lines:
        console.print(line, markup=False)
    return typer.Exit(EXIT_FAILURE)


def _authentication_hint(state: CliState) -> list[str]:
    settings = state.settings()
    if settings.token.value is None:
        return [
            f"  no token was sent: {settings.token.source}",
            f"  pass --token, set {ENV_TOKEN}, or add `token:` to {settings.config_file}",
        ]
    return [
        f"  the API at {settings.api_url.value} rejected the token from {settings.token.source}",
        f"  check it against <state dir>/admin-token on the server, or pass --token / {ENV_TOKEN}",
    ]


@contextmanager
def reporting_errors(state: CliState) -> Iterator[None]:
    try:
        yield
    except ConfigError as exc:
        raise fail(f"error: {exc}") from None
    except AuthenticationError as exc:
        raise fail(*describe_api_error(exc), *_authentication_hint(state)) from None
    except ApiError as exc:
        raise fail(*describe_api_error(exc)) from None
    except ApiConnectionError as exc:
        source = state.settings().api_url.source
        raise fail(
            f"error: {exc}",
            f"  (API URL from {source}; is `hivenet serve` running there?)",
        ) from None
