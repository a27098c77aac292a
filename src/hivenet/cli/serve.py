"""`hivenet serve`: run the REST API server on this machine.

Owns the command-line side only: the state directory default (shared with the client config),
the default embedded-store URL `sqlite:///<state-dir>/hivenet.db`, creating the state
directory, checking the TLS files (`--tls-cert`/`--tls-key`, errors named by option) before
anything starts, and handing everything to `hivenet.api.run_server`. The server itself (auth,
admin-token file, routes) belongs to `hivenet.api`; this module must not reimplement it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from hivenet.api import DEFAULT_MAX_BODY_BYTES, DEFAULT_RATE_BURST, DEFAULT_RATE_LIMIT
from hivenet.api.tls import TlsFileError, check_server_files
from hivenet.cli.config import (
    ADMIN_TOKEN_FILE,
    DEFAULT_PORT,
    ENV_STATE_DIR,
    default_state_dir,
    running_as_root,
)
from hivenet.cli.context import fail
from hivenet.store import InvalidRequestError, check_store_url, redact_store_url

_TLS_OPTIONS = {"cert": "--tls-cert", "key": "--tls-key"}


def default_store_url(state_dir: Path) -> str:
    return f"sqlite://{state_dir.resolve() / 'hivenet.db'}"  # sqlite:///abs/path.db


def serve(
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            metavar="URL",
            help="Store URL, e.g. sqlite:///path/hivenet.db, etcd://host:2379, or etcds://host:2379"
            "?cacert=...&cert=...&key=...&user=...&password_file=... (docs/deploy.md) "
            "(default: sqlite:///<state-dir>/hivenet.db).",
            show_default=False,
        ),
    ] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=1, max=65535, help="TCP port to listen on.")
    ] = DEFAULT_PORT,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            envvar=ENV_STATE_DIR,
            help="Where the admin token and the embedded database live "
            "(default: /var/lib/hivenet as root, else ~/.local/state/hivenet).",
            show_default=False,
            file_okay=False,
        ),
    ] = None,
    openstack_noauth_project: Annotated[
        str | None,
        typer.Option(
            "--openstack-noauth-project",
            metavar="PROJECT",
            help="Neutron/Octavia requests without X-Auth-Token act for this project "
            "(clouds.yaml auth_type: none). Default: they are refused.",
            show_default=False,
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            "--tls-cert",
            metavar="PATH",
            help="Serve HTTPS with this PEM certificate (chain, the server's first); "
            "needs --tls-key.",
            show_default=False,
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(
            "--tls-key",
            metavar="PATH",
            help="The certificate's unencrypted PEM private key; needs --tls-cert.",
            show_default=False,
        ),
    ] = None,
    max_body_bytes: Annotated[
        int,
        typer.Option(
            "--max-body-bytes",
            min=1,
            metavar="BYTES",
            help="Refuse request bodies longer than this with 413 (all APIs, Neutron and "
            "Octavia included).",
        ),
    ] = DEFAULT_MAX_BODY_BYTES,
    rate_limit: Annotated[
        str,
        typer.Option(
            "--rate-limit",
            metavar="N/s",
            help="Requests per second each client (bearer token, else address) may make; "
            "over it: 429 with Retry-After. 0: no limit. Per API server process.",
        ),
    ] = f"{DEFAULT_RATE_LIMIT:g}/s",
    rate_burst: Annotated[
        int,
        typer.Option(
            "--rate-burst",
            min=1,
            metavar="M",
            help="Requests a client may make at once before --rate-limit applies.",
        ),
    ] = DEFAULT_RATE_BURST,
) -> None:
    """Run the HiveNet API server (foreground; stop with Ctrl-C)."""
    if (tls_cert is None) != (tls_key is None):
        given, missing = (
            ("--tls-cert", "--tls-key") if tls_key is None else ("--tls-key", "--tls-cert")
        )
        raise typer.BadParameter(
            f"{given} {tls_cert or tls_key} needs {missing} too (give both or neither)",
            param_hint=missing,
        )
    if tls_cert is not None and tls_key is not None:
        tls_cert, tls_key = tls_cert.expanduser(), tls_key.expanduser()
        try:
            check_server_files(tls_cert, tls_key)
        except TlsFileError as exc:
            raise fail(f"error: {_TLS_OPTIONS[exc.role]} {exc.path}: {exc.reason}") from None
    from hivenet.api.ratelimit import RateLimit, parse_rate

    try:
        limit = RateLimit(parse_rate(rate_limit), rate_burst)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--rate-limit") from None
    resolved_state_dir = (
        state_dir.expanduser()
        if state_dir is not None
        else default_state_dir(os.environ, is_root=running_as_root(), home=Path.home())
    )
    try:
        resolved_state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise fail(
            f"error: cannot create state dir {resolved_state_dir}: {exc.strerror or exc}"
        ) from None
    store_url = store or default_store_url(resolved_state_dir)
    try:
        check_store_url(store_url)
    except InvalidRequestError as error:
        raise fail(f"error: --store: {error}") from None
    try:
        from hivenet.api import run_server
        from hivenet.api.neutron import OpenStackOptions
    except ImportError as exc:
        raise fail(f"error: the API server is not available in this installation: {exc}") from None
    scheme = "https" if tls_cert is not None else "http"
    typer.echo(
        f"hivenet: API on {scheme}://{host}:{port} (store {redact_store_url(store_url)}; "
        f"token file {resolved_state_dir / ADMIN_TOKEN_FILE}; "
        f"TLS {f'certificate {tls_cert}' if tls_cert else 'off'}; "
        f"max request body {max_body_bytes} bytes; "
        f"rate limit {limit.describe() + ' per client' if limit.enabled else 'off'}); "
        f"topology page {scheme}://{host}:{port}/ui#token=<token>",
        err=True,
    )
    run_server(
        store_url,
        host,
        port,
        resolved_state_dir,
        openstack=OpenStackOptions(noauth_project=openstack_noauth_project),
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_body_bytes=max_body_bytes,
        rate_limit=limit,
    )
