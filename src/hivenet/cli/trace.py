"""`hivenet trace`: show the path of a synthetic packet through the overlay.

Owns the command's options (any header field; the API fills the rest from the port) and the
human rendering of a trace (`render_trace`): the packet, every step indented by branch depth
and coloured by what happened, where the packet leaves (port, host, tunnel key) and the
megaflow that would be installed. The simulation is the API's (`POST /v1/traces`, see
api/traces.py: no side effect, simulated from the store). Must not simulate itself.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from hivenet.cli.context import reporting_errors, state_of
from hivenet.cli.output import make_console, print_json

_EVENT_STYLES = {
    "drop": "bold red",
    "rule": "yellow",
    "nat": "magenta",
    "output": "green",
    "tunnel": "green",
    "ingress": "cyan",
}


def _event_style(event: str) -> str:
    for prefix, style in _EVENT_STYLES.items():
        if event.startswith(prefix):
            return style
    return ""


def render_trace(trace: dict[str, Any]) -> Group:
    packet = trace.get("packet", {})
    summary = " ".join(f"{name}={value}" for name, value in packet.items())
    verdict = (
        Text(f"DROPPED: {trace['drop_reason']}", style="bold red")
        if trace.get("drop_reason")
        else Text("FORWARDED", style="bold green")
    )
    header = Text.assemble(
        ("trace from port ", ""),
        (str(trace.get("ingress_port", "")), "bold"),
        (f" on host {trace.get('ingress_host') or '?'}", ""),
        (
            f"  (simulated by {trace.get('simulated_by', '?')}, "
            f"flow state {trace.get('flow_state', '?')})",
            "dim",
        ),
    )
    steps = Table(box=None, show_header=False, pad_edge=False)
    steps.add_column("where", no_wrap=True)
    steps.add_column("event", no_wrap=True)
    steps.add_column("detail", overflow="fold")
    for step in trace.get("steps", []):
        name = step.get("device_name") or step.get("device_id") or ""
        where = "  " * int(step.get("depth", 0)) + f"{step.get('device_kind', '')} {name}".strip()
        event = str(step.get("event", ""))
        steps.add_row(where, Text(event, style=_event_style(event)), str(step.get("detail", "")))
    egress = Table(title="leaves through", title_justify="left", show_edge=False)
    for column in ("port", "device", "host", "tunnel key", "remote ip"):
        egress.add_column(column, overflow="fold")
    for out in trace.get("egress", []):
        egress.add_row(
            str(out.get("port_name") or out.get("port_id")),
            str(out.get("device_id", "")),
            str(out.get("host", "")),
            str(out.get("tunnel_key", "")),
            str(out.get("remote_ip") or "(local)"),
        )
    megaflow = trace.get("megaflow", {})
    flow = Text.assemble(
        ("megaflow: ", "bold"),
        (", ".join(f"{k}={v}" for k, v in megaflow.get("match", {}).items()), ""),
        ("\nactions: ", "bold"),
        ("; ".join(trace.get("actions", [])) or "drop", ""),
        (
            f"\ninstall: {megaflow.get('install')} (idle {megaflow.get('idle_timeout')}s)",
            "dim",
        ),
    )
    parts: list[Any] = [header, Text(summary, style="dim"), verdict, steps]
    if trace.get("egress"):
        parts.append(egress)
    for generated in trace.get("generated", []):
        parts.append(
            Text(
                f"generated {generated.get('description')}: "
                f"{'; '.join(generated.get('actions', []))}",
                style="cyan",
            )
        )
    parts.append(Panel(flow, expand=False))
    return Group(*parts)


def trace(
    ctx: typer.Context,
    from_port: Annotated[
        str, typer.Option("--from-port", help="The port id the packet enters at.")
    ],
    ip_dst: Annotated[str, typer.Option("--ip-dst", help="Destination IP address.")],
    proto: Annotated[str, typer.Option(help="tcp, udp, icmp or arp.")] = "tcp",
    dst_port: Annotated[
        int | None, typer.Option("--dst-port", help="TCP/UDP destination port (default 80).")
    ] = None,
    src_port: Annotated[
        int | None, typer.Option("--src-port", help="TCP/UDP source port (default 49152).")
    ] = None,
    ip_src: Annotated[
        str | None, typer.Option("--ip-src", help="Source IP (default: the port's).")
    ] = None,
    eth_src: Annotated[
        str | None, typer.Option("--eth-src", help="Source MAC (default: the port's).")
    ] = None,
    eth_dst: Annotated[
        str | None,
        typer.Option(
            "--eth-dst", help="Destination MAC (default: the destination's or gateway's)."
        ),
    ] = None,
    tcp_flags: Annotated[str, typer.Option("--tcp-flags", help="e.g. syn or syn,ack.")] = "syn",
    vlan: Annotated[int, typer.Option(help="802.1Q VLAN id (0: untagged).")] = 0,
    ttl: Annotated[int, typer.Option(help="IP TTL / hop limit.")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON trace.")] = False,
) -> None:
    """Trace a synthetic packet from a port: every device, rule, NAT/LB decision and route,
    where it leaves (host, tunnel key) and the megaflow. Nothing is learned or installed."""
    request: dict[str, Any] = {
        "from_port": from_port,
        "ip_dst": ip_dst,
        "proto": proto,
        "tcp_flags": tcp_flags,
        "vlan": vlan,
        "ttl": ttl,
    }
    optional = {
        "dst_port": dst_port,
        "src_port": src_port,
        "ip_src": ip_src,
        "eth_src": eth_src,
        "eth_dst": eth_dst,
    }
    request.update({name: value for name, value in optional.items() if value is not None})
    state = state_of(ctx)
    with reporting_errors(state):
        result = state.client().trace(request)
    if as_json:
        print_json(result)
        return
    make_console().print(render_trace(result))
