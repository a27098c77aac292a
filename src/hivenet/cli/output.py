"""Rendering of API objects for the `hivenet` command: rich tables for people, JSON for tools.

Owns the columns shown per kind in `list`, the field/value layout of `show`, how values
(lists, port ranges, tunnel-zone members) print in a cell, and the error printer that writes
the server's message with field and value to stderr. Must not talk to the API: it is given
data and consoles.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from hivenet.api.client import ApiError
from hivenet.cli.fields import default_json, model_for

PIPED_WIDTH = 200

# The columns `list` shows per kind (the full object is one `show` or `--json` away).
LIST_COLUMNS: dict[str, tuple[str, ...]] = {
    "bridge": ("id", "name", "tenant_id", "admin_state_up", "arp_proxy", "inbound_chain_id"),
    "router": ("id", "name", "tenant_id", "admin_state_up", "inbound_chain_id"),
    "port": (
        "id",
        "name",
        "device_kind",
        "device_id",
        "mac",
        "addresses",
        "peer_id",
        "host_id",
        "interface_name",
        "tunnel_key",
    ),
    "subnet": (
        "id",
        "name",
        "bridge_id",
        "cidr",
        "gateway_ip",
        "allocation_pools",
        "dns_nameservers",
        "enable_dhcp",
    ),
    "route": (
        "id",
        "router_id",
        "type",
        "dst_prefix",
        "src_prefix",
        "next_hop_port_id",
        "next_hop_gateway",
        "weight",
        "learned_from",
    ),
    "bgp_peer": ("id", "port_id", "local_as", "peer_as", "peer_ip", "hold_time", "advertise"),
    "chain": ("id", "name", "tenant_id"),
    "rule": (
        "id",
        "chain_id",
        "position",
        "action",
        "nw_src",
        "nw_dst",
        "nw_proto",
        "tp_dst",
        "jump_chain_id",
    ),
    "port_group": ("id", "name", "tenant_id", "stateful"),
    "ip_addr_group": ("id", "name", "tenant_id", "addresses"),
    "host": ("id", "name", "tenant_id"),
    "tunnel_zone": ("id", "name", "type", "vxlan_port", "members"),
    "load_balancer": (
        "id",
        "name",
        "router_id",
        "admin_state_up",
        "provisioning_status",
        "operating_status",
    ),
    "listener": (
        "id",
        "name",
        "load_balancer_id",
        "vip_address",
        "protocol",
        "protocol_port",
        "default_pool_id",
        "operating_status",
    ),
    "pool": (
        "id",
        "name",
        "load_balancer_id",
        "protocol",
        "algorithm",
        "session_persistence",
        "operating_status",
    ),
    "member": (
        "id",
        "pool_id",
        "address",
        "protocol_port",
        "weight",
        "admin_state_up",
        "operating_status",
    ),
    "health_monitor": (
        "id",
        "pool_id",
        "type",
        "delay",
        "timeout",
        "max_retries",
        "max_retries_down",
        "operating_status",
    ),
}


def make_console(*, stderr: bool = False) -> Console:
    # Tables are wider than 80 columns (ids are UUIDs); when piped, do not squeeze them
    # (unless $COLUMNS says how wide).
    file = sys.stderr if stderr else sys.stdout
    width = None if file.isatty() or os.environ.get("COLUMNS") else PIPED_WIDTH
    return Console(file=file, width=width, highlight=False, soft_wrap=False)


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ", ".join(format_value(item) for item in value)
    if isinstance(value, dict):
        if set(value) == {"start", "end"}:
            start, end = value["start"], value["end"]
            return str(start) if start == end else f"{start}-{end}"
        if set(value) == {"host_id", "underlay_ip"}:
            return f"{value['host_id']}={value['underlay_ip']}"
        if set(value) == {"subnet_id", "ip_address"}:
            return f"{value['ip_address']} on subnet {value['subnet_id']}"
        if set(value) == {"destination", "nexthop"}:
            return f"{value['destination']} via {value['nexthop']}"
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def _plural_label(kind: str) -> str:
    return kind.replace("_", " ") + "s"


def _display_order(kind: str, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rules read best in the order they run (chain, position, id); the rest by id."""
    if kind == "rule":
        return sorted(
            items, key=lambda r: (str(r.get("chain_id")), r.get("position", 0), str(r.get("id")))
        )
    return list(items)


def list_table(kind: str, items: Sequence[dict[str, Any]]) -> Table:
    columns = LIST_COLUMNS[kind]
    items = _display_order(kind, items)
    table = Table(title=f"{_plural_label(kind)} ({len(items)})", title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=column.endswith("id"))
    for item in items:
        table.add_row(*(Text(format_value(item.get(column))) for column in columns))
    return table


def visible_fields(kind: str, data: dict[str, Any], *, all_fields: bool) -> Iterable[str]:
    """Fields worth showing: all of them with `all_fields`, else those not at their default."""
    model = model_for(kind)
    for name, value in data.items():
        if all_fields or name not in model.model_fields:
            yield name
            continue
        fixed, default = default_json(model, name)
        if not fixed or value != default or name in ("name", "tenant_id"):
            yield name


def object_table(
    kind: str,
    data: dict[str, Any],
    *,
    revision: int | None,
    all_fields: bool,
    title: str | None = None,
) -> Table:
    table = Table(
        title=title or f"{kind.replace('_', ' ')} {data.get('id', '')}", title_justify="left"
    )
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name in visible_fields(kind, data, all_fields=all_fields):
        table.add_row(name, Text(format_value(data[name])))
    if revision is not None:
        table.add_row("revision", Text(str(revision)))
    return table


def describe_api_error(error: ApiError) -> list[str]:
    """Lines for stderr: status and message, then one line per field detail or extra item."""
    lines = [f"error: {error.status} {error.message}"]
    for detail in error.details:
        # Servers often fold the first detail into the message; do not say it twice.
        already_said = detail.message in error.message and (
            detail.field is None
            or (
                detail.field in error.message
                and (detail.value is None or str(detail.value) in error.message)
            )
        )
        if not already_said:
            lines.append(f"  {detail.describe()}")
    for key, value in error.body.items():
        if key in ("status", "message", "details"):
            continue
        lines.append(f"  {key}: {format_value(value)}")
    return lines
