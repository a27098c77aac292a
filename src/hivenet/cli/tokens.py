"""`hivenet token create|list|revoke`: project tokens with a role, through `/v1/tokens`.

Owns those verbs, their options and tables; who may issue what is the API's rule
(`api/tokens.py`). The secret is printed once, by `create`; nothing here stores it.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from hivenet.cli.context import reporting_errors, state_of
from hivenet.cli.output import make_console, print_json

token_app = typer.Typer(
    help="Issue, list and revoke project tokens (roles: admin, member, reader).",
    no_args_is_help=True,
)
ROLES = ("admin", "member", "reader")
_COLUMNS = ("id", "project", "role", "name", "created_at", "expires_at", "created_by")


def _tokens_table(title: str, tokens: list[dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in _COLUMNS:
        table.add_column(column.replace("_", " "), overflow="fold")
    for token in tokens:
        table.add_row(*(Text(str(token.get(column) or "")) for column in _COLUMNS))
    return table


@token_app.command("create")
def create_token(
    ctx: typer.Context,
    project: Annotated[str, typer.Option("--project", help="The project the token acts for.")],
    role: Annotated[
        str,
        typer.Option("--role", help="admin (also manages the project's tokens), member, reader."),
    ] = "member",
    name: Annotated[str | None, typer.Option("--name", help="A label for listings.")] = None,
    expires_at: Annotated[
        str | None,
        typer.Option("--expires-at", help="ISO 8601 time with zone, e.g. 2027-01-01T00:00:00Z."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Issue a token; its secret is printed this once (the server keeps only its hash)."""
    if role not in ROLES:
        raise typer.BadParameter(f"{role!r} is not one of {', '.join(ROLES)}", param_hint="--role")
    state = state_of(ctx)
    with reporting_errors(state):
        created = state.client().create_token(project, role, name=name, expires_at=expires_at)
    if as_json:
        print_json(created)
        return
    console = make_console()
    console.print(_tokens_table("token created", [created]))
    console.print("secret (shown once, store it now):", style="bold")
    console.print(Text(str(created.get("secret", ""))), soft_wrap=True)


@token_app.command("list")
def list_tokens(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the tokens you manage (all for the cluster admin, your project's for its admins)."""
    state = state_of(ctx)
    with reporting_errors(state):
        tokens = state.client().list_tokens()
    if as_json:
        print_json(tokens)
        return
    make_console().print(_tokens_table("tokens", tokens))


@token_app.command("revoke")
def revoke_token(
    ctx: typer.Context,
    token_id: Annotated[str, typer.Argument(metavar="ID", help="The token's id (not its secret).")],
) -> None:
    """Revoke a token: its next request, on every API server, is refused."""
    state = state_of(ctx)
    with reporting_errors(state):
        state.client().revoke_token(token_id)
    make_console().print(f"revoked token {token_id}")
