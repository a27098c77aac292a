"""One factory that builds the `create|list|show|update|delete` command group of every kind.

Owns the shape of those five verbs: which options each takes (first-class field options from
`fields.py`, `--set field=value` for the rest, `--json`, `--if-revision`, `--cascade`), how
their values become the request body, and what each prints. The command signatures are
generated from the model, so all ten kinds share this code. Must not hand-write per-kind
command bodies nor validate objects itself: the API server is the single judge.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.table import Table
from typer._click.exceptions import UsageError  # typer vendors click; its own UsageError

from hivenet.api.client import MAX_PAGE_SIZE, HivenetClient, StoredObject
from hivenet.cli.context import reporting_errors, state_of
from hivenet.cli.fields import (
    FieldOption,
    OptionValueError,
    field_help,
    field_shape,
    list_filters_for,
    model_for,
    options_for,
    parse_assignments,
)
from hivenet.cli.lbstats import load_balancer_stats
from hivenet.cli.output import list_table, make_console, object_table, print_json
from hivenet.cli.routers import ROUTER_SHOW_HELP, fetch_router_extra, router_extra_tables
from hivenet.cli.stats import STATS_KINDS, stats_command

SET_HELP = (
    "Any field as FIELD=VALUE (repeatable); VALUE is parsed as JSON when that fits the "
    "field, else taken as text. E.g. --set vlan_id=10 --set 'nat_targets=[...]'"
)
JSON_HELP = "Print the raw JSON the API returned instead of a table."
# Verbs a kind has beyond the five: reads the API offers for that kind only.
EXTRA_VERBS: dict[str, dict[str, Callable[..., None]]] = {
    "load_balancer": {"stats": load_balancer_stats},
    **{kind: {"stats": stats_command(kind)} for kind in STATS_KINDS},
}

# Kinds whose `show` adds what the API tells about the object beyond its fields: how to
# fetch it (keys merged into `--json`), the tables printed after the object's, and help.
SHOW_EXTRAS: dict[
    str,
    tuple[
        Callable[[HivenetClient, str], dict[str, Any]],
        Callable[[dict[str, Any]], list[Table]],
        str,
    ],
] = {"router": (fetch_router_extra, router_extra_tables, ROUTER_SHOW_HELP)}


def command_name(kind: str) -> str:
    return kind.replace("_", "-")


def _kind_label(kind: str) -> str:
    return kind.replace("_", " ")


def _param(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def _field_parameter(kind: str, option: FieldOption, *, panel: str) -> inspect.Parameter:
    model = model_for(kind)
    shape = field_shape(model, option.field)
    help_text = field_help(model, option.field, option.hint)
    python_type = shape.python_type
    if python_type is bool:
        flag = option.long_flag
        if "/" not in flag:
            flag = f"{flag}/--no-{flag.removeprefix('--')}"
        info = typer.Option(flag, help=help_text, show_default=False, rich_help_panel=panel)
        return _param(option.field, Annotated[bool | None, info])
    metavar = option.long_flag.removeprefix("--").replace("-", "_").upper()
    info = typer.Option(
        option.long_flag,
        help=help_text,
        show_default=False,
        # ints and enums keep typer's own metavar (<int>, [choice|...]).
        metavar=metavar if python_type is str else None,
        rich_help_panel=panel,
    )
    if shape.repeated:
        return _param(option.field, Annotated[list[python_type] | None, info])  # type: ignore[valid-type]
    return _param(option.field, Annotated[python_type | None, info])


def _context_parameter() -> inspect.Parameter:
    return inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )


def _id_argument(kind: str) -> inspect.Parameter:
    info = typer.Argument(metavar="ID", help=f"The {_kind_label(kind)}'s id.", show_default=False)
    return inspect.Parameter(
        "object_id", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[str, info]
    )


def _json_parameter() -> inspect.Parameter:
    return _param("as_json", Annotated[bool, typer.Option("--json", help=JSON_HELP)], False)


def _set_parameter() -> inspect.Parameter:
    info = typer.Option("--set", metavar="FIELD=VALUE", help=SET_HELP, show_default=False)
    return _param("assignments", Annotated[list[str] | None, info])


def _if_revision_parameter() -> inspect.Parameter:
    info = typer.Option(
        "--if-revision",
        min=1,
        help="Only if the object is still at this revision (sent as If-Match); else 412.",
        show_default=False,
    )
    return _param("if_revision", Annotated[int | None, info])


def _make_command(
    parameters: list[inspect.Parameter], run: Callable[..., None], doc: str
) -> Callable[..., None]:
    """A function typer can read: `parameters` become options/arguments, `run` gets them."""

    def command(**values: Any) -> None:
        run(**values)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command


def _body_from_options(kind: str, values: dict[str, Any]) -> dict[str, Any]:
    """The JSON fields given through first-class options and --set, checked for overlap."""
    model = model_for(kind)
    body: dict[str, Any] = {}
    for option in options_for(kind):
        value = values.get(option.field)
        if value is None:
            continue
        convert = field_shape(model, option.field).converter()
        try:
            if isinstance(value, list):
                body[option.field] = [convert(item) for item in value]
            else:
                body[option.field] = convert(value)
        except OptionValueError as exc:
            raise typer.BadParameter(str(exc), param_hint=option.long_flag) from None
    try:
        assigned = parse_assignments(model, values.get("assignments") or ())
    except OptionValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--set") from None
    for field_name, value in assigned.items():
        if field_name in body:
            raise typer.BadParameter(
                f"field {field_name!r} is given both by its own option and by --set",
                param_hint="--set",
            )
        body[field_name] = value
    return body


def _print_stored(
    kind: str, stored: StoredObject, *, as_json: bool, verb: str, all_fields: bool = False
) -> None:
    if as_json:
        print_json(stored.data)
        return
    title = f"{verb} {_kind_label(kind)} {stored.data.get('id', '')}".strip()
    make_console().print(
        object_table(
            kind, stored.data, revision=stored.revision, all_fields=all_fields, title=title
        )
    )


def _create_command(kind: str) -> Callable[..., None]:
    def run(ctx: typer.Context, as_json: bool, quiet: bool, **values: Any) -> None:
        body = _body_from_options(kind, values)
        object_id = values.get("object_id_option")
        if object_id is not None:
            if "id" in body:
                raise typer.BadParameter("id is given both by --id and by --set", param_hint="--id")
            body = {"id": object_id, **body}
        state = state_of(ctx)
        with reporting_errors(state):
            # The client retries a create whose answer was lost, under this key (or the id).
            stored = state.client().create(
                kind, body, idempotency_key=values.get("idempotency_key")
            )
        if quiet:
            typer.echo(stored.id)
        else:
            _print_stored(kind, stored, as_json=as_json, verb="created")

    id_option = typer.Option(
        "--id", metavar="ID", help="Choose the id (default: a new UUID).", show_default=False
    )
    key_option = typer.Option(
        "--idempotency-key",
        metavar="KEY",
        help="Name this create: running it again with the same key (and fields) returns the "
        "object the first run made instead of a second one. Without --id or this, the client "
        "makes a key of its own for its automatic retries.",
        show_default=False,
    )
    quiet_option = typer.Option("--quiet", "-q", help="Print only the new object's id.")
    parameters = [
        _context_parameter(),
        _param("object_id_option", Annotated[str | None, id_option]),
        _param("idempotency_key", Annotated[str | None, key_option]),
        *(_field_parameter(kind, option, panel="Fields") for option in options_for(kind)),
        _set_parameter(),
        _json_parameter(),
        _param("quiet", Annotated[bool, quiet_option], False),
    ]
    return _make_command(parameters, run, f"Create a {_kind_label(kind)}.")


def _list_command(kind: str) -> Callable[..., None]:
    filters = list_filters_for(kind)

    def run(
        ctx: typer.Context,
        as_json: bool,
        limit: int | None,
        marker: str | None,
        **values: Any,
    ) -> None:
        query = {option.list_filter or option.field: values.get(option.field) for option in filters}
        state = state_of(ctx)
        next_marker: str | None = None
        with reporting_errors(state):
            client = state.client()
            if limit is None and marker is None:
                items = client.list_all(kind, query)
            else:
                page = client.list_page(kind, query, limit=limit, marker=marker)
                items, next_marker = page.items, page.next_marker
        if as_json:
            print_json({"items": items, "next_marker": next_marker})
            return
        make_console().print(list_table(kind, items))
        if next_marker is not None:
            typer.echo(f"more: add --marker {next_marker}", err=True)

    limit_option = typer.Option(
        "--limit",
        min=1,
        max=MAX_PAGE_SIZE,
        help="Fetch one page of at most this many (default: every page).",
        show_default=False,
    )
    marker_option = typer.Option(
        "--marker", help="Start after this id (from a previous page).", show_default=False
    )
    parameters = [
        _context_parameter(),
        *(
            _param(
                option.field,
                Annotated[
                    str | None,
                    typer.Option(
                        option.long_flag,
                        help=f"Only those whose {option.field} is this.",
                        show_default=False,
                    ),
                ],
            )
            for option in filters
        ),
        _param("limit", Annotated[int | None, limit_option]),
        _param("marker", Annotated[str | None, marker_option]),
        _json_parameter(),
    ]
    return _make_command(parameters, run, f"List {_kind_label(kind)}s, sorted by id.")


def _show_command(kind: str) -> Callable[..., None]:
    def run(ctx: typer.Context, object_id: str, as_json: bool, all_fields: bool) -> None:
        state = state_of(ctx)
        extras = SHOW_EXTRAS.get(kind)
        extra: dict[str, Any] = {}
        with reporting_errors(state):
            client = state.client()
            stored = client.get(kind, object_id)
            if extras is not None:
                extra = extras[0](client, object_id)
        if as_json:
            print_json({**stored.data, **extra})
            return
        console = make_console()
        console.print(
            object_table(kind, stored.data, revision=stored.revision, all_fields=all_fields)
        )
        for table in extras[1](extra) if extras is not None else ():
            console.print(table)

    all_option = typer.Option(
        "--all-fields", "-a", help="Also show fields that are at their default."
    )
    parameters = [
        _context_parameter(),
        _id_argument(kind),
        _json_parameter(),
        _param("all_fields", Annotated[bool, all_option], False),
    ]
    extra_help = SHOW_EXTRAS[kind][2] if kind in SHOW_EXTRAS else ""
    return _make_command(parameters, run, f"Show one {_kind_label(kind)}. {extra_help}".strip())


def _update_command(kind: str) -> Callable[..., None]:
    def run(
        ctx: typer.Context,
        object_id: str,
        as_json: bool,
        if_revision: int | None,
        **values: Any,
    ) -> None:
        changes = _body_from_options(kind, values)
        if not changes:
            raise UsageError(
                "nothing to change: give at least one field option or --set FIELD=VALUE", ctx
            )
        state = state_of(ctx)
        with reporting_errors(state):
            stored = state.client().update(kind, object_id, changes, if_revision=if_revision)
        _print_stored(kind, stored, as_json=as_json, verb="updated")

    parameters = [
        _context_parameter(),
        _id_argument(kind),
        *(_field_parameter(kind, option, panel="Fields") for option in options_for(kind)),
        _set_parameter(),
        _if_revision_parameter(),
        _json_parameter(),
    ]
    return _make_command(
        parameters,
        run,
        f"Change fields of a {_kind_label(kind)} (PATCH: fields not given keep their value).",
    )


def _delete_command(kind: str) -> Callable[..., None]:
    def run(ctx: typer.Context, object_id: str, cascade: bool, if_revision: int | None) -> None:
        state = state_of(ctx)
        with reporting_errors(state):
            state.client().delete(kind, object_id, cascade=cascade, if_revision=if_revision)
        typer.echo(f"deleted {_kind_label(kind)} {object_id}")

    cascade_option = typer.Option(
        "--cascade", help="Also delete the objects that reference it (else 409 while referenced)."
    )
    parameters = [
        _context_parameter(),
        _id_argument(kind),
        _param("cascade", Annotated[bool, cascade_option], False),
        _if_revision_parameter(),
    ]
    return _make_command(parameters, run, f"Delete a {_kind_label(kind)}.")


def build_kind_app(kind: str) -> typer.Typer:
    """The `hivenet <kind>` command group with its five verbs."""
    model = model_for(kind)
    own_doc = inspect.cleandoc(model.__dict__.get("__doc__") or "")
    summary = " ".join(own_doc.split(". ", 1)[0].split()).rstrip(".")
    summary = f"{summary}." if summary else ""
    group = typer.Typer(
        name=command_name(kind),
        help=f"Manage {_kind_label(kind)}s. {summary}".strip(),
        no_args_is_help=True,
    )
    group.command("create")(_create_command(kind))
    group.command("list")(_list_command(kind))
    group.command("show")(_show_command(kind))
    group.command("update")(_update_command(kind))
    group.command("delete")(_delete_command(kind))
    for verb, command in EXTRA_VERBS.get(kind, {}).items():
        group.command(verb)(command)
    return group
