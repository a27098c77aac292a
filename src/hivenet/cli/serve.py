"""`hivenet serve`: run the REST API server on this machine.

Owns the command-line side only: the state directory default (shared with the client config),
the default embedded-store URL `sqlite:///<state-dir>/hivenet.db`, creating the state
directory, and handing everything to `hivenet.api.run_server`. The server itself (auth,
admin-token file, routes) belongs to `hivenet.api`; this module must not reimplement it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from hivenet.cli.config import (
    ADMIN_TOKEN_FILE,
    DEFAULT_PORT,
    ENV_STATE_DIR,
    default_state_dir,
    running_as_root,
)
from hivenet.cli.context import fail


def default_store_url(state_dir: Path) -> str:
    return f"sqlite://{state_dir.resolve() / 'hivenet.db'}"  # sqlite:///abs/path.db


def serve(
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            metavar="URL",
            help="Store URL, e.g. sqlite:///path/hivenet.db or etcd://host:2379 "
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
) -> None:
    """Run the HiveNet API server (foreground; stop with Ctrl-C)."""
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
        from hivenet.api import run_server
        from hivenet.api.neutron import OpenStackOptions
    except ImportError as exc:
        raise fail(f"error: the API server is not available in this installation: {exc}") from None
    typer.echo(
        f"hivenet: API on http://{host}:{port} (store {store_url}; "
        f"token file {resolved_state_dir / ADMIN_TOKEN_FILE})",
        err=True,
    )
    run_server(
        store_url,
        host,
        port,
        resolved_state_dir,
        openstack=OpenStackOptions(noauth_project=openstack_noauth_project),
    )
