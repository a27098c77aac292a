"""`hivenet lab up|status|exec|down|clean`: the one-machine lab from the command line.

Owns the command-line shell around `hivenet.lab.lab.Lab`: options, the summary tables, exit
codes (1 with a clear message for bad input, a missing lab or a missing root) and `exec`
handing the terminal to a command inside a lab namespace. Offered to the `hivenet` command by
`hivenet.cli.plugins`; must not import `hivenet.cli` (layer rule) nor build anything itself.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from hivenet.agent.cli import stats as agent_stats
from hivenet.lab.etcd import EtcdMemberStatus
from hivenet.lab.lab import Lab, LabStatus, NeedsRootError, require_root
from hivenet.lab.netns import LabError, LabScope
from hivenet.lab.record import (
    DEFAULT_LAB_DATAPATH,
    ENV_FILE,
    default_state_dir,
    remove_lab_files,
)
from hivenet.lab.scenario import ScenarioError, builtin_scenario_names, resolve_scenario
from hivenet.store import redact_store_url

app = typer.Typer(
    help="A whole HiveNet cloud on this machine: hosts and VMs as network namespaces.",
    no_args_is_help=True,
)
# Tables wider than 80 columns stay readable when the output goes to a file or a pipe.
console = Console(width=None if sys.stdout.isatty() else 160)

StateDirOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="Where the lab keeps its store, token, logs and PID files "
        "(default: $HIVENET_LAB_STATE_DIR or /run/hivenet-lab).",
        show_default=False,
        file_okay=False,
    ),
]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _state_dir(option: Path | None) -> Path:
    return (option or default_state_dir()).expanduser().absolute()


def _load(state_dir: Path) -> Lab:
    try:
        return Lab.load(state_dir)
    except (LabError, ScenarioError) as error:
        raise _fail(str(error)) from None


@app.command("up")
def up(
    scenario: Annotated[
        str | None,
        typer.Option(
            "--scenario",
            help="Scenario YAML file, or the name of a built-in one: "
            f"{', '.join(builtin_scenario_names())} (default: the built-in 3 hosts / 4 VMs / "
            "1 router; `nat` adds the outside world, SNAT and floating IPs).",
            show_default=False,
        ),
    ] = None,
    state_dir: StateDirOption = None,
    store: Annotated[
        str,
        typer.Option(
            "--store",
            help="State store: sqlite (one embedded file) or etcd (a local 3-member etcd "
            "cluster, clients on the lab's root underlay address 172.31.250.254; one etcd lab "
            "at a time).",
        ),
    ] = "sqlite",
    lease_ttl: Annotated[
        int | None,
        typer.Option(
            "--lease-ttl",
            min=2,
            help="The agents' lease TTL in seconds: how soon a dead host's ports go down "
            "everywhere (default: the agent's own).",
            show_default=False,
        ),
    ] = None,
    datapath: Annotated[
        str,
        typer.Option(
            "--datapath",
            help="The agents' datapath: ebpf (the default: established flows in the kernel at "
            "tc; an agent that cannot load it says so and falls back to userspace) or userspace "
            "(AF_PACKET, every packet in Python).",
        ),
    ] = DEFAULT_LAB_DATAPATH,
    tag: Annotated[
        str,
        typer.Option(
            "--tag",
            help="4 lowercase letters/digits put into every name (hn<tag>-vm1), so several "
            "labs can run side by side; each needs its own --state-dir.",
        ),
    ] = "",
    timeout: Annotated[
        float, typer.Option("--timeout", min=5.0, help="Seconds to wait for the agents.")
    ] = 60.0,
) -> None:
    """Build the lab: namespaces, store, API server, topology (via the API), VMs, agents."""
    try:
        require_root("up")
        spec = resolve_scenario(scenario)
        lab = Lab(
            spec,
            state_dir=_state_dir(state_dir),
            scope=LabScope(tag),
            store=store,
            agent_lease_ttl=lease_ttl,
            datapath=datapath,
            progress=lambda message: typer.echo(f"- {message}", err=True),
        )
        lab.up(timeout=timeout)
    except (LabError, ScenarioError) as error:
        raise _fail(str(error)) from None
    print_summary(lab)


def print_summary(lab: Lab, out: Console = console) -> None:
    hosts = Table(title="hosts", title_justify="left")
    for column in ("host", "namespace", "underlay IP", "agent PID", "VMs"):
        hosts.add_column(column)
    for host in lab.plan.hosts:
        record = lab.agent_record(host.name)
        vms = ", ".join(vm.name for vm in lab.plan.vms if vm.host == host.name)
        hosts.add_row(
            host.name,
            host.namespace,
            host.underlay_ip,
            str(record.pid) if record else "-",
            vms or "-",
        )
    out.print(hosts)
    vms_table = Table(title="VMs", title_justify="left")
    columns = ["VM", "namespace", "host", "network", "tenant", "eth0", "MAC", "gateway"]
    external = lab.plan.external
    if external is not None:
        columns.append("floating IP")
    for column in columns:
        vms_table.add_column(column)
    for vm in lab.plan.vms:
        row = [
            vm.name,
            vm.namespace,
            vm.host,
            vm.network,
            lab.scenario.network(vm.network).tenant,
            vm.ip,
            lab.record.macs.get(vm.name, "-"),
            vm.gateway or "-",
        ]
        if external is not None:
            row.append(vm.floating_ip or "-")
        vms_table.add_row(*row)
    if external is not None:
        routes = ", ".join(external.routes)
        vms_table.add_row(
            "(external)",
            external.namespace,
            external.host,
            f"router {external.router} uplink {external.router_ip}",
            "-",
            external.ip,
            lab.record.macs.get("ext", "-"),
            external.router_address + (f" for {routes}" if routes else ""),
            "-",
        )
    out.print(vms_table)
    if lab.uses_etcd:
        print_store_members(lab.etcd_cluster().member_statuses(), out)
    spec = lab.scenario.external
    if spec is not None and spec.snat:
        out.print(
            f"SNAT:       {', '.join(spec.snat)} -> {spec.router_ip.ip} "
            f"(leaving by {spec.router}'s uplink on {spec.host})"
        )
    out.print(f"store:      {redact_store_url(lab.store_url)}")
    out.print(f"API URL:    {lab.api_url}")
    out.print(f"token file: {lab.token_path}")
    out.print(f"state dir:  {lab.state_dir}  (logs, PID files, agent counters)")
    print_explore_hints(lab, out)


@dataclass(frozen=True, slots=True)
class Hint:
    """One command a newcomer can paste as is (run by the tests exactly as printed)."""

    command: str
    what: str


def state_dir_option(lab: Lab) -> str:
    """ " --state-dir <dir>" unless the lab lives in the default state dir (found by itself)."""
    if lab.state_dir == default_state_dir().expanduser().absolute():
        return ""
    return f" --state-dir {lab.state_dir}"


def explore_hints(lab: Lab) -> list[Hint]:
    """What to try on a running lab; printed by `hivenet lab up` and by the demo."""
    where = state_dir_option(lab)
    first = lab.plan.vms[0]
    others = [vm for vm in lab.plan.vms if vm.name != first.name]
    target = others[-1] if others else first
    hints = [
        Hint(
            f"hivenet lab exec{where} {first.namespace} ping -c 3 {target.address}",
            f"{first.name} -> {target.name}",
        ),
    ]
    external = lab.plan.external
    if external is not None:
        hints.append(
            Hint(
                f"hivenet lab exec{where} {first.namespace} ping -c 3 {external.address}",
                f"{first.name} -> the outside world (SNAT)",
            )
        )
        floating = next((vm for vm in lab.plan.vms if vm.floating_ip), None)
        if floating is not None:
            hints.append(
                Hint(
                    f"hivenet lab exec{where} {external.namespace} ping -c 3 {floating.floating_ip}",
                    f"the outside world -> {floating.name}'s floating IP",
                )
            )
    host = lab.plan.hosts[0].name
    hints += [
        Hint(f"hivenet lab exec{where} {first.namespace} bash", f"a shell inside VM {first.name}"),
        Hint(f"hivenet lab status{where}", "processes, the agents' counters and drops by reason"),
        Hint(f"hivenet lab stats{where} {host}", f"every counter of {host}'s agent"),
        Hint(
            f"source {lab.state_dir / ENV_FILE} && hivenet bridge list && hivenet port list",
            "the REST API (lab.env sets HIVENET_API_URL, HIVENET_STATE_DIR)",
        ),
    ]
    return hints


def print_explore_hints(lab: Lab, out: Console = console) -> None:
    hints = explore_hints(lab)
    width = max(len(hint.command) for hint in hints)
    out.print("Explore:  (`hivenet` is on PATH after `source .venv/bin/activate`)")
    for hint in hints:
        # Never wrapped: each line must paste as one command.
        line = f"  {hint.command.ljust(width)}  # {hint.what}"
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    stop = f"Stop:     hivenet lab down{state_dir_option(lab)}   (or: make lab-clean)"
    out.print(stop, markup=False, highlight=False, soft_wrap=True)


@app.command("stats")
def stats(
    host: Annotated[str, typer.Argument(help="The host whose agent's counters to show (h1).")],
    state_dir: StateDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print raw JSON.")] = False,
) -> None:
    """Every counter of one host's agent in the running lab (`hivenet agent stats`, with the
    lab's state dir found for you)."""
    lab = _load(_state_dir(state_dir))
    try:
        host_id = lab.plan.host(host).name
    except LabError as error:
        raise _fail(str(error)) from None
    agent_stats(host_id=host_id, state_dir=lab.state_dir, as_json=as_json)


@app.command("status")
def status(state_dir: StateDirOption = None) -> None:
    """Namespaces, processes, the agents' key counters and drops by reason per host."""
    lab = _load(_state_dir(state_dir))
    report = lab.status()
    print_status(lab, report)
    if not is_healthy(report):
        raise typer.Exit(1)


def is_healthy(report: LabStatus) -> bool:
    return (
        report.phase == "up"
        and report.api_healthy
        and all(report.namespaces.values())
        and all(process.running for process in report.processes)
        and report.store_problem is None
        and all(member.healthy for member in report.store_members)
    )


def print_store_members(members: list[EtcdMemberStatus], out: Console = console) -> None:
    table = Table(title="store (etcd members)", title_justify="left")
    for column in ("member", "client endpoint", "PID", "state", "leader"):
        table.add_column(column)
    for member in members:
        state = "healthy" if member.healthy else ("running, NOT healthy" if member.pid else "GONE")
        table.add_row(
            member.name,
            member.endpoint,
            str(member.pid) if member.pid else "-",
            state,
            "leader" if member.is_leader else "",
        )
    out.print(table)


def _counter(data: dict[str, Any] | None, section: str, name: str) -> str:
    if data is None:
        return "-"
    value = data.get(section, {}).get(name) if section else data.get(name)
    return "-" if value is None else str(value)


def print_status(lab: Lab, report: LabStatus, out: Console = console) -> None:
    out.print(
        f"lab in {lab.state_dir}: phase {report.phase}, API {report.api_url or '-'} "
        f"({'healthy' if report.api_healthy else 'NOT answering'})"
    )
    processes = Table(title="processes", title_justify="left")
    for column in ("runs in", "process", "PID", "state"):
        processes.add_column(column)
    for process in report.processes:
        # The API server's PID file is named after a pseudo-namespace; it runs in the root one.
        where = (
            "root namespace" if process.namespace == lab.plan.api_namespace else process.namespace
        )
        processes.add_row(
            where,
            process.label,
            str(process.pid),
            "running" if process.running else "GONE",
        )
    out.print(processes)
    out.print(f"store: {report.store} {redact_store_url(report.store_url) or '-'}")
    if report.store_problem is not None:
        out.print(f"store members: {report.store_problem}")
    elif report.store_members:
        print_store_members(report.store_members, out)
    missing = [name for name, exists in report.namespaces.items() if not exists]
    out.print(
        f"namespaces: {len(report.namespaces) - len(missing)}/{len(report.namespaces)} present"
        + (f" (missing: {', '.join(missing)})" if missing else "")
    )
    agents = Table(title="agents", title_justify="left")
    columns = (
        ("host", "", ""),
        ("revision", "", "revision"),
        ("store", "", "store_connected"),
        ("bound ports", "", "bound_ports"),
        ("upcalls", "pipeline", "upcalls"),
        ("flows", "datapath", "flows"),
        ("megaflow hits", "datapath", "megaflow_hits"),
        ("tunnel tx", "datapath", "tunnel_tx_packets"),
        ("tunnel rx", "datapath", "tunnel_rx_packets"),
        ("invalidated", "agent", "flows_invalidated"),
    )
    for title, _section, _name in columns:
        agents.add_column(title, justify="left" if title == "host" else "right")
    agents.add_column("drops", justify="right")
    for host, data in report.agents.items():
        drops = drops_by_reason(data)
        agents.add_row(
            host,
            *(_counter(data, section, name) for _t, section, name in columns[1:]),
            "-" if data is None else str(sum(drops.values())),
        )
    out.print(agents)
    print_drops(report, out)


DROP_SECTIONS = ("datapath", "pipeline")  # where an agent's counters keep "drop.<reason>"


def drops_by_reason(counters: dict[str, Any] | None) -> dict[str, int]:
    """ "<section> <reason>" -> count for every non-zero drop counter of one agent: the
    datapath's (malformed frames, bad VXLAN, flow drops...) and the simulation's."""
    drops: dict[str, int] = {}
    for section in DROP_SECTIONS:
        for name, value in sorted(((counters or {}).get(section) or {}).items()):
            if name.startswith("drop.") and isinstance(value, int | float) and value:
                drops[f"{section} {name.removeprefix('drop.')}"] = int(value)
    return drops


def print_drops(report: LabStatus, out: Console = console) -> None:
    table = Table(title="drops by reason", title_justify="left")
    for column in ("host", "where", "reason"):
        table.add_column(column)
    table.add_column("packets", justify="right")
    for host, data in report.agents.items():
        for key, count in drops_by_reason(data).items():
            section, reason = key.split(" ", 1)
            table.add_row(host, section, reason, str(count))
    if table.row_count:
        out.print(table)
    else:
        out.print("drops by reason: none")


@app.command(
    "exec",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def exec_command(
    name: Annotated[str, typer.Argument(help="VM (vm1 or hn-vm1), host (h1) or ext.")],
    command: Annotated[
        list[str] | None, typer.Argument(help="The command and its arguments.")
    ] = None,
    state_dir: StateDirOption = None,
) -> None:
    """Run a command inside a lab namespace, e.g. `hivenet lab exec hn-vm1 ping -c1 10.0.2.20`."""
    try:
        require_root("exec")
    except NeedsRootError as error:
        raise _fail(str(error)) from None
    lab = _load(_state_dir(state_dir))
    try:
        argv = lab.exec_argv(name, command or [])
    except LabError as error:
        raise _fail(str(error)) from None
    os.execvp(argv[0], argv)


@app.command("down")
def down(state_dir: StateDirOption = None) -> None:
    """Stop the lab's processes, delete its namespaces and links, remove its files."""
    directory = _state_dir(state_dir)
    try:
        require_root("down")
    except NeedsRootError as error:
        raise _fail(str(error)) from None
    lab = _load(directory)
    failures = lab.down()
    if failures:
        raise _fail("could not remove: " + "; ".join(failures) + " (try `hivenet lab clean`)")
    typer.echo(f"lab of {directory} is down")


@app.command("clean")
def clean(
    state_dir: StateDirOption = None,
    tag: Annotated[
        str, typer.Option("--tag", help="Only the lab objects with this tag (default: all hn*).")
    ] = "",
) -> None:
    """Remove every hn* namespace, link and lab process, also after a crash."""
    from hivenet.lab.cleanup import clean as clean_everything

    directory = _state_dir(state_dir)
    try:
        require_root("clean")
        scope = LabScope(tag)
    except LabError as error:
        raise _fail(str(error)) from None
    report = clean_everything(scope.tag, directory=directory)
    stopped_etcd = _stop_lab_etcd(directory)
    if not tag:
        remove_lab_files(directory)
    typer.echo(
        f"stopped {len(report.processes) + len(stopped_etcd)} process(es), deleted "
        f"{len(report.namespaces)} namespace(s) and {len(report.links)} link(s)"
    )
    if report.failures:
        raise _fail("; ".join(report.failures))


def _stop_lab_etcd(directory: Path) -> list[int]:
    """The lab's local etcd cluster, if one was started under `directory`."""
    try:
        from hivenet.lab.etcd import stop_all
    except ImportError:
        return []
    try:
        return list(stop_all(directory))
    except Exception as error:  # a broken etcd record must not stop the rest of the clean
        typer.echo(f"warning: could not stop the lab's etcd: {error}", err=True)
        return []
