"""Per-invocation state of the `hivenet` command and its error policy.

Owns the object stored in the click context (global --api-url/--token/--ca-cert/--insecure),
the lazily created API client (and the warning `--insecure` prints each time it makes one), and
`reporting_errors()`, which turns API, connection, TLS and config failures into a clear
message on stderr and exit code 1 (usage errors stay with click: exit code 2).
Must not know about individual kinds or commands.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import typer

from hivenet.api.client import (
    ApiConnectionError,
    ApiError,
    AuthenticationError,
    HivenetClient,
    InsecureTlsWarning,
    TlsVerificationError,
)
from hivenet.api.tls import TlsFileError
from hivenet.cli.config import (
    ENV_CA_CERT,
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
    ca_cert_option: str | None = None
    insecure: bool = False
    _settings: ClientSettings | None = field(default=None, repr=False)
    _client: HivenetClient | None = field(default=None, repr=False)

    def settings(self) -> ClientSettings:
        if self._settings is None:
            self._settings = resolve_settings(
                api_url_option=self.api_url_option,
                token_option=self.token_option,
                ca_cert_option=self.ca_cert_option,
            )
        return self._settings

    def client(self) -> HivenetClient:
        if self._client is None:
            settings = self.settings()
            url = settings.api_url.value or ""
            if self.insecure:
                make_console(stderr=True).print(
                    f"warning: --insecure: the TLS certificate of {url} is NOT verified; "
                    "anyone on the way can read and change this session, the token included",
                    markup=False,
                    soft_wrap=True,
                )
                with warnings.catch_warnings():  # said above, in the command's own words
                    warnings.simplefilter("ignore", InsecureTlsWarning)
                    self._client = HivenetClient(url, settings.token.value, insecure=True)
                return self._client
            try:
                self._client = HivenetClient(
                    url, settings.token.value, ca_cert=settings.ca_cert.value
                )
            except TlsFileError as exc:
                raise ConfigError(
                    f"CA bundle {exc.path} (from {settings.ca_cert.source}): {exc.reason}"
                ) from None
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
        console.print(line, markup=False, soft_wrap=True)  # a line stays one line
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
    except TlsVerificationError as exc:
        raise fail(_verification_failure(state, exc)) from None
    except ApiConnectionError as exc:
        settings = state.settings()
        tls_hint = (
            "; a server run with --tls-cert wants an https:// URL"
            if (settings.api_url.value or "").startswith("http://")
            else ""
        )
        raise fail(
            f"error: {exc}",
            f"  (API URL from {settings.api_url.source}; is `hivenet serve` running there?"
            f"{tls_hint})",
        ) from None


def _verification_failure(state: CliState, exc: TlsVerificationError) -> str:
    """One line: whose certificate, why it was refused, and what to do about it."""
    settings = state.settings()
    said = f"error: the TLS certificate of {exc.base_url} was refused ({exc.verify_reason})"
    if settings.ca_cert.value is None:
        return (
            f"{said}: pass --ca-cert PATH naming the CA that signed it "
            f"(or set {ENV_CA_CERT}, or `ca_cert:` in {settings.config_file})"
        )
    return (
        f"{said}: it is not signed for this address by the CA in {settings.ca_cert.value} "
        f"(from {settings.ca_cert.source}); pass --ca-cert PATH naming the CA that signed it"
    )
