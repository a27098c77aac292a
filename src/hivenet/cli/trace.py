"""`hivenet trace`: show the path of a synthetic packet through the overlay.

Owns the command's options (any header field; the API fills the rest from the port) and the
human rendering of a trace (`render_trace`): the packet, every step indented by branch depth
and coloured by what happened, where the packet leaves (port, host, tunnel key) and the
megaflow that would be installed; and live traces (`--live`: arm, wait, show the records
with their flows' hit counters). The simulation is the API's or the agent's (`POST
/v1/traces`, `/v1/traces/live`, see api/traces.py). Must not simulate itself.
"""

from __future__ import annotations

import time
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


def render_live(result: dict[str, Any]) -> Group:
    records = result.get("records", [])
    parts: list[Any] = [
        Text(
            f"live trace {result.get('id')} on host {result.get('host')}: {result.get('status')}, "
            f"{len(records)} of {result.get('count', '?')} recorded",
            style="bold",
        )
    ]
    for index, record in enumerate(records, 1):
        flow = record.get("flow", {})
        hits = (
            f"flow installed, {flow.get('packets', 0)} later packets / {flow.get('bytes', 0)} "
            "bytes hit it in the datapath"
            if flow.get("installed")
            else "no flow installed (or it is gone)"
        )
        parts.append(Text(f"\n#{index}: {hits}", style="bold cyan"))
        parts.append(render_trace(record))
    return Group(*parts)


def _live(
    ctx: typer.Context,
    port: str,
    count: int,
    match: list[str],
    expires: int,
    wait: float,
    as_json: bool,
) -> None:
    fields: dict[str, str] = {}
    for item in match:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"{item!r}: expected HEADER=VALUE", param_hint="--match")
        fields[name.strip()] = value.strip()
    state = state_of(ctx)
    with reporting_errors(state):
        client = state.client()
        created = client.live_trace({"port": port, "count": count, "ttl": expires, "match": fields})
        if not as_json:
            make_console(stderr=True).print(
                f"live trace {created['id']} armed on host {created['host']} for "
                f"{created['expires_in']} s; waiting up to {wait:.0f} s for {count} packet(s)"
            )
        deadline = time.monotonic() + wait
        result = client.get_live_trace(created["id"])
        while (
            result.get("status") not in ("done", "rejected", "error")
            and time.monotonic() < deadline
        ):
            time.sleep(0.5)
            result = client.get_live_trace(created["id"])
        if result.get("status") == "done":
            time.sleep(min(1.5, max(deadline - time.monotonic(), 0)))  # later packets' hits
            result = client.get_live_trace(created["id"])
    if as_json:
        print_json(result)
        return
    make_console().print(render_live(result))


def trace(
    ctx: typer.Context,
    from_port: Annotated[
        str | None, typer.Option("--from-port", help="The port id the packet enters at.")
    ] = None,
    ip_dst: Annotated[str | None, typer.Option("--ip-dst", help="Destination IP address.")] = None,
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
    via: Annotated[
        str,
        typer.Option(
            help="api: simulate in the API server from the store (default; no agent needed, "
            "fresh flow state); agent: ask the port's agent (its live conntrack/NAT state)."
        ),
    ] = "api",
    live: Annotated[
        bool, typer.Option("--live", help="Record the next real packets from --port instead.")
    ] = False,
    port: Annotated[str | None, typer.Option("--port", help="--live: the port to watch.")] = None,
    count: Annotated[int, typer.Option(help="--live: how many packets to record.")] = 1,
    match: Annotated[
        list[str] | None,
        typer.Option(
            "--match",
            help="--live: HEADER=VALUE (repeatable): eth_src, eth_dst, ip_src, ip_dst, proto, "
            "tp_src, tp_dst.",
        ),
    ] = None,
    wait: Annotated[float, typer.Option(help="--live: seconds to wait for the packets.")] = 30.0,
    expires: Annotated[
        int, typer.Option(help="--live: seconds until the agent forgets the request.")
    ] = 60,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON trace.")] = False,
) -> None:
    """Trace a synthetic packet from a port: every device, rule, NAT/LB decision and route,
    where it leaves (host, tunnel key) and the megaflow. Nothing is learned or installed.
    With --live, record the traces of the next real packets from --port (and whether later
    packets hit the flow they installed)."""
    if live:
        if port is None:
            raise typer.BadParameter("--live needs --port", param_hint="--port")
        _live(ctx, port, count, match or [], expires, wait, as_json)
        return
    if from_port is None or ip_dst is None:
        raise typer.BadParameter("needs --from-port and --ip-dst (or --live --port)")
    request: dict[str, Any] = {
        "from_port": from_port,
        "ip_dst": ip_dst,
        "proto": proto,
        "tcp_flags": tcp_flags,
        "vlan": vlan,
        "ttl": ttl,
        "via": via,
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
