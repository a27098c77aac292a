"""`hivenet quota show|set|reset`: a project's quotas through `/v1/quotas/{project}`.

Owns those verbs, their options (Neutron's names: --networks, --ports, ...) and the table;
who may change what is the API's rule (`api/quotas.py`: the cluster admin).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from hivenet.cli.context import reporting_errors, state_of
from hivenet.cli.output import make_console, print_json
from hivenet.store.quota import DEFAULT_QUOTAS

quota_app = typer.Typer(
    help="Show and set a project's quotas (how many networks, ports, ... it may hold).",
    no_args_is_help=True,
)

Limit = Annotated[int | None, typer.Option(min=-1, help="-1: unlimited")]


def _limit_text(limit: object) -> str:
    return "unlimited" if limit == -1 else str(limit)


def _quota_table(found: dict[str, Any]) -> Table:
    table = Table(title=f"quotas of project {found.get('project', '')}", title_justify="left")
    for column in ("kind", "limit", "in use", "default"):
        table.add_column(column)
    quotas, usage = found.get("quotas", {}), found.get("usage", {})
    for kind, default in DEFAULT_QUOTAS.items():
        table.add_row(
            Text(kind),
            Text(_limit_text(quotas.get(kind))),
            Text(str(usage.get(kind, ""))),
            Text(_limit_text(default)),
        )
    return table


def _show(found: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(found)
    else:
        make_console().print(_quota_table(found))


@quota_app.command("show")
def show_quotas(
    ctx: typer.Context,
    project: Annotated[str, typer.Argument(help="The project.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """A project's limit and usage per kind."""
    state = state_of(ctx)
    with reporting_errors(state):
        found = state.client().get_quotas(project)
    _show(found, as_json)


@quota_app.command("set")
def set_quotas(
    ctx: typer.Context,
    project: Annotated[str, typer.Argument(help="The project.")],
    networks: Limit = None,
    subnets: Limit = None,
    ports: Limit = None,
    routers: Limit = None,
    floating_ips: Limit = None,
    security_groups: Limit = None,
    security_group_rules: Limit = None,
    chains: Limit = None,
    rules: Limit = None,
    routes: Limit = None,
    ip_addr_groups: Limit = None,
    port_groups: Limit = None,
    load_balancers: Limit = None,
    listeners: Limit = None,
    pools: Limit = None,
    members: Limit = None,
    health_monitors: Limit = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Change some of a project's limits (cluster admin). A limit below the usage deletes
    nothing: it refuses creates until enough is deleted."""
    given = {
        "bridge": networks,
        "subnet": subnets,
        "port": ports,
        "router": routers,
        "floating_ip": floating_ips,
        "security_group": security_groups,
        "security_group_rule": security_group_rules,
        "chain": chains,
        "rule": rules,
        "route": routes,
        "ip_addr_group": ip_addr_groups,
        "port_group": port_groups,
        "load_balancer": load_balancers,
        "listener": listeners,
        "pool": pools,
        "member": members,
        "health_monitor": health_monitors,
    }
    limits = {kind: limit for kind, limit in given.items() if limit is not None}
    if not limits:
        raise typer.BadParameter("name at least one limit, e.g. --networks 10")
    state = state_of(ctx)
    with reporting_errors(state):
        found = state.client().set_quotas(project, limits)
    _show(found, as_json)


@quota_app.command("reset")
def reset_quotas(
    ctx: typer.Context,
    project: Annotated[str, typer.Argument(help="The project.")],
) -> None:
    """Every kind of a project back to its default limit (cluster admin)."""
    state = state_of(ctx)
    with reporting_errors(state):
        state.client().reset_quotas(project)
    make_console().print(f"quotas of project {project} reset to the defaults")
