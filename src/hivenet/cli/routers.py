"""What `hivenet router show ID` prints beyond the router's fields: its uplinks and their
liveness, and the routes it learned (`GET /v1/routers/{id}/uplinks`, api/uplinks.py says what
each value means and who is told what).

Owns those two tables and the keys `--json` adds to the router (`uplinks`,
`learned_routes`, as the API returned them; both only when either has an entry). Registered in the kind factory's show extras
(`resources.SHOW_EXTRAS`). Must not judge liveness itself: it prints what the API says.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from hivenet.api.client import HivenetClient

EXTRA_KEYS = ("uplinks", "learned_routes")
ROUTER_SHOW_HELP = (
    "With its uplinks (host, interface, host alive, link, BGP sessions) and learned routes; "
    "--json adds them as `uplinks` and `learned_routes` when it has any."
)


def fetch_router_extra(client: HivenetClient, router_id: str) -> dict[str, Any]:
    """`uplinks` and `learned_routes` as the API returned them; nothing for a router with
    neither (its `show --json` stays exactly the object, as for every other kind)."""
    answer = client.router_uplinks(router_id)
    extra = {key: answer.get(key) or [] for key in EXTRA_KEYS}
    return extra if any(extra.values()) else {}


def _state(value: bool | None, yes: str, no: str) -> Text:
    if value is None:
        return Text("-", style="dim")
    return Text(yes, style="green") if value else Text(no, style="bold red")


def _session(peer: dict[str, Any]) -> Text:
    state = peer.get("state")
    text = Text(f"{peer.get('peer_ip', '?')} AS {peer.get('peer_as', '?')}: ")
    if state is None:
        text.append("no report", style="dim")
    else:
        text.append(str(state), style="green" if state == "Established" else "bold red")
        text.append(
            f" (received {peer.get('received', 0)}, advertised {peer.get('advertised', 0)})"
        )
    if peer.get("admin_state_up") is False:
        text.append(" [disabled]", style="dim")
    return text


def uplinks_table(uplinks: list[dict[str, Any]]) -> Table:
    table = Table(title="Uplinks", title_justify="left")
    for column in ("port", "host", "interface", "addresses", "host alive", "link", "BGP session"):
        table.add_column(column, overflow="fold")
    for uplink in uplinks:
        peers = uplink.get("bgp_peers") or []
        sessions = Text("\n").join(_session(peer) for peer in peers) if peers else Text("-")
        table.add_row(
            str(uplink.get("port_id", "")),
            str(uplink.get("host_id") or "-"),
            str(uplink.get("interface_name") or "-"),
            ", ".join(uplink.get("addresses") or []) or "-",
            _state(uplink.get("host_alive"), "yes", "NO"),
            _state(uplink.get("link_up"), "up", "DOWN"),
            sessions,
        )
    return table


def learned_routes_table(routes: list[dict[str, Any]]) -> Table:
    table = Table(title="Learned routes", title_justify="left")
    for column in ("prefix", "next hop", "via port", "learned from"):
        table.add_column(column, overflow="fold")
    for route in routes:
        table.add_row(
            str(route.get("dst_prefix", "")),
            str(route.get("next_hop_gateway") or "-"),
            str(route.get("next_hop_port_id") or "-"),
            str(route.get("learned_from", "")),
        )
    return table


def router_extra_tables(extra: dict[str, Any]) -> list[Table]:
    """The Uplinks and Learned routes tables; none for a router without either (a tenant's
    router behind the provider router)."""
    uplinks, routes = extra.get("uplinks") or [], extra.get("learned_routes") or []
    if not uplinks and not routes:
        return []
    return [uplinks_table(uplinks), learned_routes_table(routes)]
