"""`hivenet {port,bridge,router,chain,rule,host} stats ID`: an object's traffic counters, summed
over the live hosts by the API (`GET /v1/<plural>/{id}/stats`; api/hoststats.py says what is
summed, agent/metrics.py what is counted).

Owns those verbs (built per kind by `stats_command`) and their tables. Registered in the kind
factory's extra verbs (`resources.EXTRA_VERBS`). Must not compute any statistic itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.table import Table

from hivenet.cli.context import reporting_errors, state_of
from hivenet.cli.output import make_console, print_json

STATS_KINDS = ("port", "bridge", "router", "chain", "rule", "host")


def stats_table(kind: str, object_id: str, stats: dict[str, Any]) -> Table:
    """counter -> value rows (drops by reason for a host); the reporting hosts in the caption."""
    hosts = stats.get("hosts")
    caption = None
    if hosts is not None:
        caption = f"reported by {', '.join(hosts) if hosts else 'no live host'}"
    elif "alive" in stats:
        caption = "host is live" if stats["alive"] else "host is down (no report)"
    table = Table(
        title=f"{kind} {object_id} stats",
        title_justify="left",
        caption=caption,
        caption_justify="left",
    )
    table.add_column("counter")
    table.add_column("value", justify="right")
    for name, value in stats.items():
        if isinstance(value, int) and not isinstance(value, bool):
            table.add_row(name.replace("_", " "), str(value))
    drops, ports = stats.get("drops"), stats.get("ports")
    for reason, count in sorted(drops.items() if isinstance(drops, dict) else ()):
        table.add_row(f"drops: {reason}", str(count))
    for port_id, counters in sorted(ports.items() if isinstance(ports, dict) else ()):
        table.add_row(
            f"port {port_id}",
            f"rx {counters.get('rx_packets', 0)} tx {counters.get('tx_packets', 0)} "
            f"drops {counters.get('drops', 0)}",
        )
    return table


def stats_command(
    kind: str,
    render: Callable[[str, dict[str, Any]], Table] | None = None,
    summary: str | None = None,
) -> Callable[..., None]:
    """The `stats ID` verb of `kind`: `render(id, stats)` (default `stats_table`) as a table,
    or the raw JSON."""

    def show_stats(
        ctx: typer.Context,
        object_id: Annotated[
            str, typer.Argument(metavar="ID", help="The object's id.", show_default=False)
        ],
        as_json: Annotated[
            bool, typer.Option("--json", help="Print the raw JSON the API returned.")
        ] = False,
    ) -> None:
        state = state_of(ctx)
        with reporting_errors(state):
            stats = state.client().object_stats(kind, object_id)
        if as_json:
            print_json(stats)
            return
        table = render(object_id, stats) if render else stats_table(kind, object_id, stats)
        make_console().print(table)

    show_stats.__doc__ = summary or f"Show a {kind}'s traffic counters, summed over the live hosts."
    return show_stats
