"""`hivenet load-balancer stats ID`: a load balancer's counters, summed over the live hosts.

Owns that one verb (its options and its table); the numbers come from the API
(`GET /v1/load_balancers/{id}/stats`), which says what is counted. Registered in the kind
factory's extra verbs (`resources.EXTRA_VERBS`). Must not compute any statistic itself.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from hivenet.cli.stats import stats_command

_COUNTERS = ("active_connections", "total_connections", "bytes_in", "bytes_out")


def stats_table(stats: dict[str, Any]) -> Table:
    """One row for the load balancer, one per member; the reporting hosts in the caption."""
    hosts = stats.get("hosts") or []
    table = Table(
        title=f"load balancer {stats.get('load_balancer_id', '')} stats",
        title_justify="left",
        caption=f"reported by {', '.join(hosts) if hosts else 'no live host'}",
        caption_justify="left",
    )
    table.add_column("member", overflow="fold")
    for counter in _COUNTERS:
        table.add_column(counter.replace("_", " "), justify="right")
    table.add_row("(total)", *(Text(str(stats.get(counter, 0))) for counter in _COUNTERS))
    for member_id, member in (stats.get("members") or {}).items():
        table.add_row(member_id, *(Text(str(member.get(counter, 0))) for counter in _COUNTERS))
    return table


load_balancer_stats = stats_command(
    "load_balancer",
    render=lambda _object_id, stats: stats_table(stats),
    summary="Show a load balancer's connections and bytes per member, summed over live hosts.",
)
