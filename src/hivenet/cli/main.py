"""The `hivenet` command (entry point `hivenet.cli.main:app`).

Owns the root command: global options (--api-url, --token, --ca-cert, --insecure), `serve`,
`config show`, `token`, one command group per topology kind (built by
`resources.build_kind_app`), and the lazily loaded sub-apps other packages register in
`plugins.SUBAPP_SOURCES` (`agent`, `lab`). Must not contain per-kind logic or talk to the
store directly: everything goes through the REST API.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from hivenet.cli.config import SYSTEM_TRUST_STORE, mask_token
from hivenet.cli.context import CliState, reporting_errors, state_of
from hivenet.cli.output import make_console, print_json
from hivenet.cli.plugins import PluginGroup
from hivenet.cli.quotas import quota_app
from hivenet.cli.resources import build_kind_app, command_name
from hivenet.cli.serve import serve
from hivenet.cli.tokens import token_app
from hivenet.cli.trace import trace
from hivenet.model import KINDS

app = typer.Typer(
    cls=PluginGroup,
    name="hivenet",
    help="HiveNet: distributed L2-L4 network virtualization. Manage the virtual topology "
    "through the REST API, or run the API server with `hivenet serve`.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals hold the token
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"hivenet {version('hivenet')}")
        except PackageNotFoundError:
            typer.echo("hivenet (not installed as a package)")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    api_url: Annotated[
        str | None,
        typer.Option(
            "--api-url",
            metavar="URL",
            help="API server root, e.g. http://127.0.0.1:9696 "
            "(else $HIVENET_API_URL, the config file, the default).",
            show_default=False,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="Bearer token (else $HIVENET_TOKEN, the config file, <state dir>/admin-token).",
            show_default=False,
        ),
    ] = None,
    ca_cert: Annotated[
        str | None,
        typer.Option(
            "--ca-cert",
            metavar="PATH",
            help="PEM bundle of the CA that signed an https:// API server's certificate "
            "(else $HIVENET_CA_CERT, the config file, the system trust store).",
            show_default=False,
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Do not verify the API server's TLS certificate (warns every time; "
            "for a first test only).",
        ),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    state = CliState(
        api_url_option=api_url, token_option=token, ca_cert_option=ca_cert, insecure=insecure
    )
    ctx.obj = state
    ctx.call_on_close(state.close)


app.command("serve", rich_help_panel="Server")(serve)
app.command("trace", rich_help_panel="Observe")(trace)

config_app = typer.Typer(help="Inspect the client configuration.", no_args_is_help=True)


@config_app.command("show")
def show_config(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the API URL, token, CA bundle, config file and state dir in use, and where each
    came from."""
    state = state_of(ctx)
    with reporting_errors(state):
        settings = state.settings()
    config_file = (
        f"{settings.config_file} ({'present' if settings.config_file_exists else 'absent'})"
    )
    rows = [
        ("api_url", settings.api_url.value or "", settings.api_url.source),
        ("token", mask_token(settings.token.value), settings.token.source),
        ("ca_cert", settings.ca_cert.value or f"({SYSTEM_TRUST_STORE})", settings.ca_cert.source),
        ("config_file", config_file, "$HIVENET_CONFIG or ~/.config/hivenet/config.yaml"),
        ("state_dir", str(settings.state_dir), "$HIVENET_STATE_DIR or the default"),
    ]
    if as_json:
        print_json({name: {"value": value, "source": source} for name, value, source in rows})
        return
    table = Table(title="hivenet client configuration", title_justify="left")
    for column in ("setting", "value", "source"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    make_console().print(table)


app.add_typer(config_app, name="config", rich_help_panel="Server")
app.add_typer(token_app, name="token", rich_help_panel="Server")
app.add_typer(quota_app, name="quota", rich_help_panel="Server")

for _kind in KINDS:
    app.add_typer(build_kind_app(_kind), name=command_name(_kind), rich_help_panel="Topology")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
