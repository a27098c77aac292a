"""`hivenet agent ...`: run the host agent, read its counters.

Owns the command-line shell around `HostAgent`: option parsing, logging, signal handling,
choosing the datapath. Offered to the `hivenet` command by `hivenet.cli.plugins`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from hivenet.agent.agent import HostAgent
from hivenet.agent.flowstate_sync import default_max_entries
from hivenet.agent.probe import DEFAULT_INTERVAL as DEFAULT_PROBE_INTERVAL
from hivenet.flows.budget import DEFAULT_UPCALL_BURST, DEFAULT_UPCALL_RATE
from hivenet.model.subnet import DEFAULT_UNDERLAY_MTU

if TYPE_CHECKING:
    from hivenet.datapath.base import Datapath
    from hivenet.datapath.userspace import UserspaceDatapath

app = typer.Typer(help="The HiveNet host agent.", no_args_is_help=True)


def default_state_dir() -> Path:
    env = os.environ.get("HIVENET_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/hivenet")
    return Path.home() / ".local" / "state" / "hivenet"


DEFAULT_METRICS_ADDRESS = "127.0.0.1:9464"


def parse_metrics_address(text: str) -> tuple[str, int] | None:
    """'HOST:PORT' -> (host, port); 'off' -> None; anything else: a BadParameter naming it."""
    if text == "off":
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise typer.BadParameter(
            f"{text!r}: expected HOST:PORT (port 1-65535) or 'off'", param_hint="--metrics"
        )
    return host.strip("[]"), int(port_text)


def counters_file(state_dir: Path, host_id: str) -> Path:
    return state_dir / f"agent-{host_id}.json"


@app.command("run")
def run(
    host_id: Annotated[
        str, typer.Option(help="This host's id (a Host object; created if missing).")
    ],
    store: Annotated[
        str,
        typer.Option(
            help="Store URL: sqlite:///path.db, etcd://h:p,h:p, or etcds://h:p,h:p?cacert=...&"
            "cert=...&key=...&user=...&password_file=... (docs/deploy.md)"
        ),
    ],
    underlay_ip: Annotated[
        str | None, typer.Option(help="This host's tunnel endpoint (VXLAN source address).")
    ] = None,
    tunnel_zone: Annotated[
        str | None, typer.Option(help="Tunnel zone id to join with --underlay-ip.")
    ] = None,
    datapath: Annotated[
        str,
        typer.Option(
            help="ebpf (the default: established flows in the kernel at tc; falls back to "
            "userspace, saying why, where it cannot load), userspace (AF_PACKET + VXLAN, every "
            "packet in Python) or memory"
        ),
    ] = "ebpf",
    vxlan_port: Annotated[int, typer.Option(min=1, max=65535)] = 4789,
    underlay_mtu: Annotated[
        int,
        typer.Option(
            min=576,
            max=65535,
            help="The underlay's MTU: VMs on bridges without their own mtu get it less 50 "
            "(VXLAN) by DHCP.",
        ),
    ] = DEFAULT_UNDERLAY_MTU,
    lease_ttl: Annotated[
        int, typer.Option(min=2, help="Seconds before peers consider us gone.")
    ] = 10,
    state_dir: Annotated[Path | None, typer.Option(help="Where counters are written.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
    health_probes: Annotated[
        bool | None,
        typer.Option(
            "--health-probes/--no-health-probes",
            help="Probe load-balancer members through the overlay from health namespaces "
            "(default: on when root with the userspace datapath).",
        ),
    ] = None,
    metrics: Annotated[
        str,
        typer.Option(
            help="Where to serve Prometheus metrics (GET /metrics): HOST:PORT, or 'off'.",
        ),
    ] = DEFAULT_METRICS_ADDRESS,
    metadata: Annotated[
        bool | None,
        typer.Option(
            "--metadata/--no-metadata",
            help="Serve http://169.254.169.254/ to this host's VMs (a TUN device hnmd0 and "
            "169.254.64.0/18 in the agent's namespace; default: on when root with the "
            "userspace or ebpf datapath).",
        ),
    ] = None,
    bgp: Annotated[
        bool | None,
        typer.Option(
            "--bgp/--no-bgp",
            help="Run a BIRD 2 speaker (in a namespace hn-bgp...) for each bgp_peer of an "
            "uplink bound on this host (default: on when root with the userspace or ebpf "
            "datapath and bird installed).",
        ),
    ] = None,
    upcall_rate: Annotated[
        float,
        typer.Option(
            min=0,
            envvar="HIVENET_UPCALL_RATE",
            help="Upcalls (new flows to simulate) each port may cause per second; its excess "
            "is dropped and counted (drop.upcall_budget). 0: no limit.",
        ),
    ] = DEFAULT_UPCALL_RATE,
    upcall_burst: Annotated[
        int,
        typer.Option(
            min=1,
            envvar="HIVENET_UPCALL_BURST",
            help="Upcalls a port may cause at once after a quiet spell.",
        ),
    ] = DEFAULT_UPCALL_BURST,
    max_connections: Annotated[
        int,
        typer.Option(
            min=0,
            envvar="HIVENET_MAX_CONNECTIONS",
            help="Entries each flow-state table (conntrack, NAT) may hold; a full table evicts "
            "half-open connections first, oldest first (counted in `agent stats`). "
            "0: one per 16 KiB of memory, 64k..4M.",
        ),
    ] = 0,
    gateway_probe_interval: Annotated[
        float,
        typer.Option(
            min=0,
            envvar="HIVENET_GATEWAY_PROBE_INTERVAL",
            help="Seconds between probes of each gateway host (a gateway that misses 3 leaves "
            "this host's ECMP sets; 3 answers bring it back). 0: no probes, the lease decides.",
        ),
    ] = DEFAULT_PROBE_INTERVAL,
    connection_templates: Annotated[
        bool,
        typer.Option(
            envvar="HIVENET_CONNECTION_TEMPLATES",
            help="Answer a new connection like the last one by asking its conntrack and NAT "
            "questions again instead of simulating it (counted as connection_replays).",
        ),
    ] = True,
) -> None:
    """Run the agent for one host until SIGTERM/SIGINT."""
    metrics_address = parse_metrics_address(metrics)
    logging.basicConfig(
        level=log_level.upper(),
        format=f"%(asctime)s {host_id} %(levelname)s %(name)s: %(message)s",
    )
    state = state_dir or default_state_dir()
    state.mkdir(parents=True, exist_ok=True)
    if datapath not in ("userspace", "ebpf", "memory"):
        raise typer.BadParameter(
            f"{datapath!r}: expected userspace, ebpf or memory", param_hint="--datapath"
        )
    if health_probes is None:
        health_probes = os.geteuid() == 0 and datapath in ("userspace", "ebpf")
    elif health_probes and os.geteuid() != 0:
        raise typer.BadParameter(
            "needs root (it creates network namespaces)", param_hint="--health-probes"
        )
    if metadata is None:
        metadata = os.geteuid() == 0 and datapath in ("userspace", "ebpf")
    elif metadata and os.geteuid() != 0:
        raise typer.BadParameter("needs root (it creates a TUN device)", param_hint="--metadata")
    if bgp is None:
        bgp = os.geteuid() == 0 and datapath in ("userspace", "ebpf") and bool(shutil.which("bird"))
    elif bgp and (os.geteuid() != 0 or not shutil.which("bird")):
        raise typer.BadParameter("needs root and bird (apt-get install bird2)", param_hint="--bgp")
    from hivenet.store import InvalidRequestError, check_store_url

    try:
        check_store_url(store)
    except InvalidRequestError as error:
        raise typer.BadParameter(str(error), param_hint="--store") from None
    asyncio.run(
        _run_agent(
            host_id=host_id,
            store_url=store,
            underlay_ip=underlay_ip,
            tunnel_zone=tunnel_zone,
            datapath_kind=datapath,
            vxlan_port=vxlan_port,
            lease_ttl=lease_ttl,
            counters_path=counters_file(state, host_id),
            # Per host: several agents (a lab) may share one state dir, never one journal.
            flowstate_dir=state / f"flowstate-{host_id}",
            health_probes=health_probes,
            underlay_mtu=underlay_mtu,
            metrics_address=metrics_address,
            metadata=metadata,
            upcall_budget=(upcall_rate, upcall_burst),
            bgp_dir=state / f"bgp-{host_id}" if bgp else None,
            max_connections=max_connections or default_max_entries(),
            gateway_probe_interval=gateway_probe_interval,
            connection_templates=connection_templates,
        )
    )


async def _run_agent(
    *,
    host_id: str,
    store_url: str,
    underlay_ip: str | None,
    tunnel_zone: str | None,
    datapath_kind: str,
    vxlan_port: int,
    lease_ttl: int,
    counters_path: Path,
    flowstate_dir: Path,
    health_probes: bool = False,
    underlay_mtu: int = DEFAULT_UNDERLAY_MTU,
    metrics_address: tuple[str, int] | None = None,
    metadata: bool = False,
    upcall_budget: tuple[float, int] = (DEFAULT_UPCALL_RATE, DEFAULT_UPCALL_BURST),
    bgp_dir: Path | None = None,
    max_connections: int | None = None,
    gateway_probe_interval: float = DEFAULT_PROBE_INTERVAL,
    connection_templates: bool = True,
) -> None:
    from hivenet.store import open_store

    store = open_store(store_url)
    datapath: Datapath
    if datapath_kind in ("userspace", "ebpf"):
        host_datapath = _start_host_datapath(datapath_kind, underlay_ip, vxlan_port)
        host_datapath.set_upcall_budget(*upcall_budget)
        datapath = host_datapath
    else:
        from hivenet.datapath.memory import MemoryDatapath

        datapath = MemoryDatapath(host_id, underlay_ip or "127.0.0.1")
    agent = HostAgent(
        store,
        datapath,
        host_id=host_id,
        underlay_ip=underlay_ip,
        tunnel_zone_id=tunnel_zone,
        lease_ttl=lease_ttl,
        counters_path=counters_path,
        state_dir=flowstate_dir,
        overlay_health_probes=health_probes,
        underlay_mtu=underlay_mtu,
        metrics_address=metrics_address,
        metadata=metadata,
        bgp=bgp_dir is not None,
        bgp_dir=bgp_dir,
        flowstate_max_entries=max_connections,
        gateway_probe_interval=gateway_probe_interval,
        connection_templates=connection_templates,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.start()
    # The loaded topology lives as long as the process: move it out of the cyclic GC's
    # generations so that later full collections do not walk it again (a gen-2 pass over a
    # large view stalls the agent for as long; bench/propagation.py saw 1.1 s in one process).
    gc.collect()
    gc.freeze()
    logging.getLogger(__name__).info(
        "agent %s up: revision %d, %d local ports", host_id, agent.revision, len(agent.bound_ports)
    )
    try:
        await stop.wait()
    finally:
        await agent.stop()
        close = getattr(datapath, "close", None)
        if close is not None:
            close()
        await store.close()


def _start_host_datapath(kind: str, underlay_ip: str | None, vxlan_port: int) -> UserspaceDatapath:
    """The host's datapath, started; `ebpf` falls back to `userspace` with one line saying why."""
    from hivenet.datapath.userspace import UserspaceDatapath

    if kind == "ebpf":
        from hivenet.datapath.ebpf.datapath import EbpfDatapath
        from hivenet.datapath.ebpf.kernel import FastPathUnavailable

        ebpf = EbpfDatapath(underlay_ip, vxlan_port=vxlan_port)
        try:
            ebpf.start()
        except FastPathUnavailable as error:
            print(f"ebpf datapath unavailable ({error}); using userspace", file=sys.stderr)
        else:
            return ebpf
    userspace = UserspaceDatapath(underlay_ip, vxlan_port=vxlan_port)
    userspace.start()
    return userspace


@app.command("stats")
def stats(
    host_id: Annotated[str, typer.Option(help="The host whose counters to show.")],
    state_dir: Annotated[Path | None, typer.Option()] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print raw JSON.")] = False,
) -> None:
    """Show an agent's counters (written every second by `hivenet agent run`)."""
    path = counters_file(state_dir or default_state_dir(), host_id)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        typer.echo(f"error: no counters at {path} (is the agent for {host_id} running?)", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    table = Table(title=f"agent {host_id} (revision {data.get('revision')})", title_justify="left")
    table.add_column("counter")
    table.add_column("value", justify="right")
    for section in ("agent", "pipeline", "flowstate", "datapath"):
        for name, value in sorted(data.get(section, {}).items()):
            shown = f"{value:.6f}" if isinstance(value, float) else str(value)
            table.add_row(f"{section}.{name}", shown)
    Console().print(table)


@app.command("rotate-key")
def rotate_key(
    store: Annotated[
        str, typer.Option(help="Store URL, as for `hivenet agent run` (docs/deploy.md)")
    ],
) -> None:
    """Rotate the cluster's flow-state key now (agents pick it up by their store watch; they
    accept the previous key meanwhile). Run it twice to retire a key you think leaked."""
    from hivenet.agent.underlay import rotate_keyring_now
    from hivenet.store import open_store

    async def rotate() -> int:
        opened = open_store(store)
        try:
            return (await rotate_keyring_now(opened, time.time())).current.key_id
        finally:
            await opened.close()

    try:
        key_id = asyncio.run(rotate())
    except (LookupError, ValueError, RuntimeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"flow-state key rotated: key {key_id} is current, the one before it still accepted")
