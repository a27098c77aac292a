"""The one-machine lab: a `Scenario` brought to life as namespaces, an API server and agents.

Owns the orchestration of `hivenet lab up|status|exec|down`: the names of one lab (`LabPlan`,
pure), its record in `<state-dir>/lab.json`, bringing it up (underlay bridge, host namespaces,
the store -- the embedded SQLite file, or with `store="etcd"` a local 3-member etcd cluster
(`hivenet.lab.etcd`) whose client URLs listen on the root underlay address
`netns.ROOT_UNDERLAY_ADDRESS` (172.31.250.254, given to this lab's bridge: the agents run inside
host namespaces, where 127.0.0.1 is not the root namespace's loopback) --, `hivenet serve` in
the root namespace, the topology written THROUGH THE
REST API, VM namespaces whose `eth0` is wired to a bound port in the host namespace, the
optional outside world `hn-ext` behind the external router's uplink port with the router's
SNAT chains and the VMs' floating IPs, one `hivenet agent run --datapath userspace` per host
inside its namespace), waiting until every agent has bound its ports, tearing exactly this
lab down again, and the traffic probes the demo and the end-to-end tests share (ping with
RTTs, a checksummed TCP transfer, iperf3, a packet capture inside a VM, a checksummed echo
server/client that reports each peer as the server saw it, a TCP connect probe).

Must not touch: anything not named by this lab's plan (other labs run beside it, each with
its own `LabScope` tag and state dir), the root namespace's addresses and routes (except the
root underlay address on this lab's own bridge, etcd labs only), a process it did not start (PIDs are checked against their PID file before any signal). Kernel
plumbing is `hivenet.lab.netns`; a crash's leftovers are for `hivenet.lab.cleanup.clean()`.

Layout of the state dir (also the `hivenet serve` and agent state dir, so `HIVENET_STATE_DIR`
pointed at it makes `hivenet bridge list` find the admin token and `hivenet agent stats` the
counters): `lab.json`, `lab.env`, `hivenet.db` (SQLite store) or `etcd/` (the cluster's data,
logs, PID records and description), `admin-token`, `<namespace>.<label>.json` PID files and
`.log` files, `agent-<host>.json` counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from hivenet.api.client import ApiClientError, HivenetClient
from hivenet.lab import netns
from hivenet.lab.etcd import EtcdCluster, EtcdLabError, EtcdMemberStatus, start_cluster
from hivenet.lab.etcd import stop_all as stop_etcd_cluster
from hivenet.lab.netns import LabError, LabScope, ProcessRecord
from hivenet.lab.scenario import SNAT_PORT_FIRST, SNAT_PORT_LAST, Scenario, scenario_from_data
from hivenet.model import (
    Bridge,
    Chain,
    DeviceKind,
    FloatingIp,
    Host,
    NatTarget,
    Port,
    Route,
    Router,
    Rule,
    RuleAction,
    TopologyObject,
    TunnelZone,
    TunnelZoneMember,
)
from hivenet.model.types import random_mac
from hivenet.store import open_store
from hivenet.store.keys import STATE_PREFIX, host_alive_key, port_active_key

LAB_FILE = "lab.json"
ENV_FILE = "lab.env"
STORE_FILE = "hivenet.db"
TOKEN_FILE = "admin-token"
TUNNEL_ZONE_ID = "lab-underlay"
VM_INTERFACE = "eth0"
API_ROLE = "api"
EXTERNAL_ROLE = "ext"
AGENT_LABEL = "agent"
SERVE_LABEL = "serve"
STORE_SQLITE = "sqlite"
STORE_ETCD = "etcd"
SUPPORTED_STORES = (STORE_SQLITE, STORE_ETCD)
ETCD_MEMBERS = 3
MIN_AGENT_LEASE_TTL = 2  # `hivenet agent run --lease-ttl` accepts no less
UP_TIMEOUT_SECONDS = 60.0
LAB_RECORD_VERSION = 1
CLI_MODULE = (sys.executable, "-m", "hivenet.cli")

Progress = Callable[[str], None]


def _quiet(_message: str) -> None:
    return None


class NeedsRootError(LabError):
    """The lab creates namespaces, veths and a bridge: only root may."""


def require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise NeedsRootError(
            f"hivenet lab {action} needs root: it creates network namespaces, veth pairs and "
            "a bridge (run it as root, e.g. with sudo)"
        )


def default_state_dir() -> Path:
    """$HIVENET_LAB_STATE_DIR, else /run/hivenet-lab (where `hivenet lab clean` looks)."""
    return netns.state_dir()


# ---- the plan: every name of one lab, computed from the scenario and the scope -------------


@dataclass(frozen=True, slots=True)
class HostPlan:
    name: str
    index: int
    namespace: str
    root_link: str  # the underlay veth's end on the root bridge
    underlay_link: str  # its end inside the host namespace
    underlay_interface: str  # with prefix, e.g. 172.31.250.1/24

    @property
    def underlay_ip(self) -> str:
        return self.underlay_interface.split("/")[0]


@dataclass(frozen=True, slots=True)
class VmPlan:
    name: str
    host: str
    network: str
    namespace: str
    port_id: str
    port_link: str  # the port's interface_name, in the host namespace
    setup_link: str  # the VM end's name until it is renamed eth0 inside the VM namespace
    ip: str  # with prefix
    gateway: str | None
    floating_ip: str | None = None  # its 1:1 NAT address on the external router

    @property
    def address(self) -> str:
        return self.ip.split("/")[0]


@dataclass(frozen=True, slots=True)
class ExternalPlan:
    host: str
    router: str
    namespace: str
    port_id: str
    port_link: str
    setup_link: str
    ip: str
    router_ip: str
    floating_gateway: str | None = None  # the uplink's address in a routed floating range
    routes: tuple[str, ...] = ()  # prefixes hn-ext routes via router_ip

    @property
    def address(self) -> str:
        return self.ip.split("/")[0]

    @property
    def router_address(self) -> str:
        """The uplink port's address: hn-ext's next hop and the SNAT source address."""
        return self.router_ip.split("/")[0]


@dataclass(frozen=True, slots=True)
class LabPlan:
    tag: str
    bridge: str
    api_namespace: str  # names the API server's PID file; not a real namespace
    hosts: tuple[HostPlan, ...]
    vms: tuple[VmPlan, ...]
    external: ExternalPlan | None

    def host(self, name: str) -> HostPlan:
        for host in self.hosts:
            if host.name == name:
                return host
        raise LabError(f"host {name!r}: not in this lab ({', '.join(self.host_names)})")

    def vm(self, name: str) -> VmPlan:
        """A VM by name (`vm1`) or by namespace (`hn-vm1`)."""
        for vm in self.vms:
            if name in (vm.name, vm.namespace):
                return vm
        if self.external is not None and name in (EXTERNAL_ROLE, self.external.namespace):
            raise LabError(f"{name!r} is the external network, not a VM")
        raise LabError(f"VM {name!r}: not in this lab ({', '.join(v.name for v in self.vms)})")

    def namespace_of(self, name: str) -> str:
        """The namespace of a VM, a host or the external network, by name or namespace."""
        for vm in self.vms:
            if name in (vm.name, vm.namespace):
                return vm.namespace
        for host in self.hosts:
            if name in (host.name, host.namespace):
                return host.namespace
        if self.external is not None and name in (EXTERNAL_ROLE, self.external.namespace):
            return self.external.namespace
        known = [v.name for v in self.vms] + list(self.host_names)
        if self.external is not None:
            known.append(EXTERNAL_ROLE)
        raise LabError(
            f"{name!r}: no VM, host or external network of that name ({', '.join(known)})"
        )

    @property
    def host_names(self) -> tuple[str, ...]:
        return tuple(host.name for host in self.hosts)

    def namespaces(self) -> list[str]:
        names = [host.namespace for host in self.hosts] + [vm.namespace for vm in self.vms]
        if self.external is not None:
            names.append(self.external.namespace)
        return names

    def root_links(self) -> list[str]:
        return [self.bridge, *(host.root_link for host in self.hosts)]

    def expected_ports(self) -> dict[str, list[str]]:
        """host -> ids of the exterior ports its agent must bind."""
        ports: dict[str, list[str]] = {host.name: [] for host in self.hosts}
        for vm in self.vms:
            ports[vm.host].append(vm.port_id)
        if self.external is not None:
            ports[self.external.host].append(self.external.port_id)
        return ports


def router_port_id(router: str, network: str) -> str:
    return f"rp.{router}.{network}"


def uplink_port_id(network: str, router: str) -> str:
    return f"bp.{network}.{router}"


def vm_port_id(vm: str) -> str:
    return f"vm.{vm}"


def external_port_id(router: str) -> str:
    return f"ext.{router}"


def route_id(router: str, index: int) -> str:
    return f"route.{router}.{index}"


def nat_chain_ids(router: str) -> tuple[str, str]:
    """(inbound, outbound) chain of a router that SNATs networks to its uplink address."""
    return f"nat-in.{router}", f"nat-out.{router}"


def reverse_snat_rule_id(router: str) -> str:
    return f"rule.{router}.rev-snat"


def snat_rule_id(router: str, network: str) -> str:
    return f"rule.{router}.snat.{network}"


def floating_ip_id(vm: str) -> str:
    return f"fip.{vm}"


def plan_lab(scenario: Scenario, scope: LabScope) -> LabPlan:
    """Every namespace, link and port id of the lab `scenario` describes, in `scope`."""
    hosts = tuple(
        HostPlan(
            name=name,
            index=index,
            namespace=scope.namespace(name),
            root_link=scope.link(f"{name}r"),
            underlay_link=scope.link(f"{name}u"),
            underlay_interface=str(netns.underlay_address(index)),
        )
        for index, name in enumerate(scenario.hosts, start=1)
    )
    vms = tuple(
        VmPlan(
            name=vm.name,
            host=vm.host,
            network=vm.network,
            namespace=scope.namespace(vm.name),
            port_id=vm_port_id(vm.name),
            port_link=scope.link(f"{vm.name}p"),
            setup_link=scope.link(f"{vm.name}i"),
            ip=str(vm.ip),
            gateway=None if (gw := scenario.gateway_of(vm)) is None else str(gw),
            floating_ip=None if vm.floating_ip is None else str(vm.floating_ip),
        )
        for vm in scenario.vms
    )
    external = None
    if scenario.external is not None:
        spec = scenario.external
        external = ExternalPlan(
            host=spec.host,
            router=spec.router,
            namespace=scope.namespace(EXTERNAL_ROLE),
            port_id=external_port_id(spec.router),
            port_link=scope.link(f"{EXTERNAL_ROLE}p"),
            setup_link=scope.link(f"{EXTERNAL_ROLE}i"),
            ip=str(spec.ip),
            router_ip=str(spec.router_ip),
            floating_gateway=None if spec.floating_gateway is None else str(spec.floating_gateway),
            routes=tuple(str(prefix) for prefix in spec.routed_prefixes),
        )
    plan = LabPlan(
        tag=scope.tag,
        # '-' never occurs in host or VM names, so no `<name><suffix>` link can take this name.
        bridge=scope.link("-ul"),
        api_namespace=scope.namespace(API_ROLE),
        hosts=hosts,
        vms=vms,
        external=external,
    )
    links = plan.root_links() + [vm.port_link for vm in vms] + [vm.setup_link for vm in vms]
    duplicated = sorted({name for name in links if links.count(name) > 1})
    if duplicated:
        raise LabError(f"scenario gives two interfaces the same name: {', '.join(duplicated)}")
    return plan


def assign_macs(scenario: Scenario, scope: LabScope) -> dict[str, str]:
    """VM name (and "ext") -> the MAC of its port: the scenario's, else a random local one."""
    macs = {vm.name: vm.mac or random_mac() for vm in scenario.vms}
    if scenario.external is not None:
        macs[EXTERNAL_ROLE] = scenario.external.mac or _external_mac(scope)
    return macs


def topology_objects(
    scenario: Scenario, plan: LabPlan, macs: dict[str, str]
) -> list[TopologyObject]:
    """The topology the scenario describes, in an order the API accepts (referenced objects
    first): hosts, the tunnel zone, bridges, routers (after their NAT chains) with their
    ports, the bridge ports peered to them and static routes, the VM ports bound to (host,
    interface), the external port, its SNAT rules and the VMs' floating IPs."""
    objects: list[TopologyObject] = [Host(id=host.name, name=host.name) for host in plan.hosts]
    objects.append(
        TunnelZone(
            id=TUNNEL_ZONE_ID,
            name=TUNNEL_ZONE_ID,
            members=tuple(
                TunnelZoneMember(host_id=host.name, underlay_ip=host.underlay_ip)  # type: ignore[arg-type]
                for host in plan.hosts
            ),
        )
    )
    objects.extend(
        Bridge(id=network.name, name=network.name, tenant_id=network.tenant)
        for network in scenario.networks
    )
    external_spec = scenario.external
    for router in scenario.routers:
        if external_spec is not None and external_spec.snat and external_spec.router == router.name:
            inbound, outbound = nat_chain_ids(router.name)
            objects.append(
                Chain(id=inbound, name=f"{router.name} reverse SNAT", tenant_id=router.tenant)
            )
            objects.append(Chain(id=outbound, name=f"{router.name} SNAT", tenant_id=router.tenant))
            objects.append(
                Router(
                    id=router.name,
                    name=router.name,
                    tenant_id=router.tenant,
                    inbound_chain_id=inbound,
                    outbound_chain_id=outbound,
                )
            )
        else:
            objects.append(Router(id=router.name, name=router.name, tenant_id=router.tenant))
        subnets: dict[str, ipaddress.IPv4Network] = {}
        for interface in router.interfaces:
            network = scenario.network(interface.network)
            port_id = router_port_id(router.name, network.name)
            objects.append(
                Port(
                    id=port_id,
                    name=f"{router.name}-{network.name}",
                    tenant_id=router.tenant,
                    device_kind=DeviceKind.ROUTER,
                    device_id=router.name,
                    addresses=(interface.ip,),
                )
            )
            objects.append(
                Port(
                    id=uplink_port_id(network.name, router.name),
                    name=f"{network.name}-{router.name}",
                    tenant_id=network.tenant,
                    device_kind=DeviceKind.BRIDGE,
                    device_id=network.name,
                    peer_id=port_id,
                )
            )
            subnets[port_id] = network.subnet
        for index, route in enumerate(router.routes):
            # The scenario checked that the gateway is on one of the router's networks.
            next_hop = next(port for port, subnet in subnets.items() if route.gateway in subnet)
            objects.append(
                Route(
                    id=route_id(router.name, index),
                    tenant_id=router.tenant,
                    router_id=router.name,
                    dst_prefix=route.dst,
                    next_hop_port_id=next_hop,
                    next_hop_gateway=route.gateway,
                )
            )
    for vm_plan in plan.vms:
        network = scenario.network(vm_plan.network)
        objects.append(
            Port(
                id=vm_plan.port_id,
                name=vm_plan.name,
                tenant_id=network.tenant,
                device_kind=DeviceKind.BRIDGE,
                device_id=network.name,
                mac=macs[vm_plan.name],
                addresses=(ipaddress.IPv4Interface(vm_plan.ip),),
                host_id=vm_plan.host,
                interface_name=vm_plan.port_link,
            )
        )
    if plan.external is not None and external_spec is not None:
        objects.extend(_external_objects(scenario, plan.external))
    return objects


def _external_objects(scenario: Scenario, external: ExternalPlan) -> list[TopologyObject]:
    """The uplink port, the SNAT rules of its router and the VMs' floating IPs."""
    spec = scenario.external
    assert spec is not None
    tenant = scenario.router(external.router).tenant
    addresses = [spec.router_ip]
    if spec.floating_gateway is not None:
        addresses.append(spec.floating_gateway)
    objects: list[TopologyObject] = [
        Port(
            id=external.port_id,
            name=f"{external.router}-external",
            tenant_id=tenant,
            device_kind=DeviceKind.ROUTER,
            device_id=external.router,
            addresses=tuple(addresses),
            host_id=external.host,
            interface_name=external.port_link,
        )
    ]
    if spec.snat:
        inbound, outbound = nat_chain_ids(external.router)
        # Replies to SNATed connections get their VM's address back before routing.
        objects.append(
            Rule(
                id=reverse_snat_rule_id(external.router),
                tenant_id=tenant,
                chain_id=inbound,
                position=10,
                action=RuleAction.REV_SNAT,
            )
        )
        snat_address = spec.router_ip.ip
        for index, network in enumerate(spec.snat):
            objects.append(
                Rule(
                    id=snat_rule_id(external.router, network),
                    tenant_id=tenant,
                    chain_id=outbound,
                    position=10 + index,
                    action=RuleAction.SNAT,
                    nw_src=scenario.network(network).subnet,
                    out_port_ids=(external.port_id,),
                    nat_targets=(
                        NatTarget(
                            address_from=snat_address,
                            address_to=snat_address,
                            port_from=SNAT_PORT_FIRST,
                            port_to=SNAT_PORT_LAST,
                        ),
                    ),
                )
            )
    for vm in scenario.vms:
        if vm.floating_ip is not None:
            objects.append(
                FloatingIp(
                    id=floating_ip_id(vm.name),
                    name=f"{vm.name} floating",
                    tenant_id=tenant,
                    floating_ip_address=vm.floating_ip,
                    router_id=external.router,
                    port_id=vm_port_id(vm.name),
                )
            )
    return objects


# ---- the record in <state-dir>/lab.json -----------------------------------------------------


@dataclass
class LabRecord:
    """What `lab up` wrote down, so later commands (another process) find the same lab."""

    tag: str
    scenario: dict[str, Any]
    store_url: str  # "" until an etcd cluster is up (its ports are picked at start)
    phase: str = "building"  # building -> up
    api_url: str | None = None
    macs: dict[str, str] = field(default_factory=dict)  # VM (or "ext") -> MAC of its port
    created_at: float = field(default_factory=time.time)
    store: str = STORE_SQLITE  # backend kind: "sqlite" or "etcd"
    agent_lease_ttl: int | None = None  # None: the agent's default

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": LAB_RECORD_VERSION,
                "tag": self.tag,
                "scenario": self.scenario,
                "store_url": self.store_url,
                "phase": self.phase,
                "api_url": self.api_url,
                "macs": self.macs,
                "created_at": self.created_at,
                "store": self.store,
                "agent_lease_ttl": self.agent_lease_ttl,
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, *, source: str) -> LabRecord:
        try:
            data = json.loads(text)
            if data.get("version") != LAB_RECORD_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {LAB_RECORD_VERSION}")
            return cls(
                tag=str(data["tag"]),
                scenario=dict(data["scenario"]),
                store_url=str(data["store_url"]),
                phase=str(data["phase"]),
                api_url=None if data.get("api_url") is None else str(data["api_url"]),
                macs={str(k): str(v) for k, v in dict(data.get("macs") or {}).items()},
                created_at=float(data.get("created_at") or 0.0),
                store=str(data.get("store") or STORE_SQLITE),
                agent_lease_ttl=(
                    None if data.get("agent_lease_ttl") is None else int(data["agent_lease_ttl"])
                ),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise LabError(f"{source}: not a lab record ({error})") from None


# ---- processes: PID files in the state dir, started in their own session ------------------


def _start_process(
    namespace: str | None,
    record_namespace: str,
    argv: Sequence[str],
    *,
    label: str,
    directory: Path,
    log_path: Path,
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Start `argv` (inside `namespace`, None: the root namespace) in a session of its own, so
    a lab left running survives the terminal that started it, and write its PID file the way
    `hivenet.lab.cleanup` reads them."""
    pid_file = netns.pid_file_path(record_namespace, label, directory)
    if pid_file.exists():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if ProcessRecord.from_json(pid_file.read_text()).is_running():
                raise LabError(f"{label} in {record_namespace} is already running ({pid_file})")
        pid_file.unlink(missing_ok=True)
    full = list(argv) if namespace is None else ["ip", "netns", "exec", namespace, *argv]
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    record = ProcessRecord(
        popen.pid, netns.read_start_time(popen.pid) or 0, record_namespace, label, tuple(argv)
    )
    temporary = pid_file.with_suffix(".tmp")
    temporary.write_text(record.to_json())
    temporary.replace(pid_file)
    return popen, record


def _read_record(pid_file: Path) -> ProcessRecord | None:
    try:
        return ProcessRecord.from_json(pid_file.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _wait_gone(record: ProcessRecord, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not record.is_running():
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(record.pid, os.WNOHANG)
        time.sleep(0.02)
    return False


def _namespace_pids(namespace: str) -> list[int]:
    result = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
    )
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def _iperf3_error(output: str) -> str:
    try:
        return str(json.loads(output).get("error") or output.strip()[-300:])
    except (ValueError, AttributeError):
        return output.strip()[-300:]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[None]:
    """Only one `lab up`/`lab down` at a time per state dir (two would each record processes
    the other then cannot find). The lock file sits beside the state dir, which `down`
    removes, and is never deleted, so every waiter locks the same file."""
    lock_path = state_dir.with_name(f".{state_dir.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "another process"
            raise LabError(
                f"the lab in {state_dir} is being built or removed by PID {holder}; "
                "wait for it or use another --state-dir"
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(str(os.getpid()))
        lock_file.flush()
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


# ---- traffic probes -------------------------------------------------------------------------

_PING_REPLY_RE = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms")


@dataclass(frozen=True, slots=True)
class PingResult:
    sent: int
    received: int
    rtts_ms: tuple[float, ...]  # in reply order; the first includes ARP and upcalls
    output: str

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.received == self.sent

    @property
    def first_ms(self) -> float | None:
        return self.rtts_ms[0] if self.rtts_ms else None

    @property
    def steady_p50_ms(self) -> float | None:
        """Median RTT without the first reply (flows installed, ARP cached)."""
        rest = self.rtts_ms[1:]
        return statistics.median(rest) if rest else None


def parse_ping(output: str, sent: int) -> PingResult:
    rtts = tuple(float(match.group(2)) for match in _PING_REPLY_RE.finditer(output))
    summary = re.search(r"(\d+) packets transmitted, (\d+) received", output)
    if summary is not None:
        sent, received = int(summary.group(1)), int(summary.group(2))
    else:
        received = len(rtts)
    return PingResult(sent, received, rtts, output)


@dataclass(frozen=True, slots=True)
class TransferResult:
    bytes_sent: int
    seconds: float
    checksum_ok: bool
    tool: str  # "python" (SHA-256 checked) or "iperf3"
    detail: str = ""

    @property
    def megabits_per_second(self) -> float:
        return self.bytes_sent * 8 / self.seconds / 1e6 if self.seconds > 0 else 0.0


TCP_SINK_SCRIPT = """
import hashlib, socket, sys
listener = socket.create_server((sys.argv[1], int(sys.argv[2])))
connection, _ = listener.accept()
digest, total = hashlib.sha256(), 0
while chunk := connection.recv(1 << 20):
    digest.update(chunk)
    total += len(chunk)
connection.sendall(f"{total} {digest.hexdigest()}".encode())
connection.close()
"""

TCP_SOURCE_SCRIPT = """
import hashlib, os, socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = os.urandom(size)
deadline = time.monotonic() + 10
while True:
    try:
        connection = socket.create_connection((host, port), timeout=20)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
started = time.monotonic()
connection.sendall(payload)
connection.shutdown(socket.SHUT_WR)
reply = b""
while chunk := connection.recv(4096):
    reply += chunk
elapsed = time.monotonic() - started
print(f"{elapsed:.6f}|{size} {hashlib.sha256(payload).hexdigest()}|{reply.decode()}")
"""

# Every frame seen on eth0 for N seconds, one hex line each, then "done"; inbound and outbound.
CAPTURE_SCRIPT = """
import select, socket, sys, time
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
sock.bind((sys.argv[1], 0))
deadline = time.monotonic() + float(sys.argv[2])
print("ready", flush=True)
while (left := deadline - time.monotonic()) > 0:
    if select.select([sock], [], [], left)[0]:
        print(sock.recv(65535).hex(), flush=True)
print("done", flush=True)
"""


# An echo server for N connections at once: "ready", then per connection, when its client has
# closed its sending side, one JSON line: the peer address as this end saw it (after any NAT),
# the bytes and the SHA-256 of what arrived. Every chunk is echoed back as it arrives.
ECHO_SERVER_SCRIPT = """
import hashlib, json, socket, sys, threading
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
listener = socket.create_server((host, port), backlog=64)
print("ready", flush=True)
lock = threading.Lock()
def serve(connection, peer):
    digest, total = hashlib.sha256(), 0
    with connection:
        while chunk := connection.recv(65536):
            digest.update(chunk)
            total += len(chunk)
            connection.sendall(chunk)
    line = {"peer_ip": peer[0], "peer_port": peer[1], "bytes": total,
            "sha256": digest.hexdigest()}
    with lock:
        print(json.dumps(line), flush=True)
threads = []
for _ in range(count):
    connection, peer = listener.accept()
    thread = threading.Thread(target=serve, args=(connection, peer))
    thread.start()
    threads.append(thread)
for thread in threads:
    thread.join()
"""

# One connection (from source port argv[7], 0: any) sending `chunks` random chunks of
# `size` bytes, `interval` seconds apart, each read back from the echo before the next goes out
# ("progress <n> <wall time>" per chunk); then a JSON line: local address, bytes, SHA-256 of
# what was sent, whether every echo matched, the longest wait for one echo.
ECHO_CLIENT_SCRIPT = """
import hashlib, json, os, socket, sys, time
host, port, size, chunks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
interval, timeout, source_port = float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
connection = socket.create_connection((host, port), timeout=timeout,
                                      source_address=("0.0.0.0", source_port))
local = connection.getsockname()
digest, echoes_match, longest = hashlib.sha256(), True, 0.0
for number in range(1, chunks + 1):
    payload = os.urandom(size)
    digest.update(payload)
    started = time.monotonic()
    connection.sendall(payload)
    echoed = b""
    while len(echoed) < size:
        part = connection.recv(size - len(echoed))
        if not part:
            sys.exit(f"connection closed by the peer after {number - 1} chunks")
        echoed += part
    longest = max(longest, time.monotonic() - started)
    echoes_match = echoes_match and echoed == payload
    print(f"progress {number} {time.time():.3f}", flush=True)
    if interval:
        time.sleep(interval)
connection.shutdown(socket.SHUT_WR)
if connection.recv(1):
    sys.exit("unexpected data after the last echo")
print(json.dumps({"local_ip": local[0], "local_port": local[1], "bytes": size * chunks,
                  "sha256": digest.hexdigest(), "echoes_match": echoes_match,
                  "longest_wait": longest}), flush=True)
"""

# Try one TCP connection with a deadline: prints "connected", "refused" or "timeout".
TCP_PROBE_SCRIPT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except ConnectionRefusedError:
    print("refused")
except (TimeoutError, socket.timeout):
    print("timeout")
"""


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    lines.append(json.loads(line))
    return lines


@dataclass(frozen=True, slots=True)
class EchoSession:
    """One connection as the echo server saw it."""

    peer_ip: str
    peer_port: int
    bytes_received: int
    sha256: str


class EchoServer:
    """`ECHO_SERVER_SCRIPT` running in a lab namespace (see `Lab.echo_server`)."""

    def __init__(self, process: netns.NamespaceProcess, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_path.exists() and "ready" in self.log_path.read_text().split():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise LabError(f"echo server did not start: {_tail(self.log_path)}")

    def sessions(self, count: int, timeout: float = 10.0) -> list[EchoSession]:
        """The first `count` finished connections (waits for them up to `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            lines = _json_lines(self.log_path)
            if len(lines) >= count:
                return [
                    EchoSession(
                        str(line["peer_ip"]),
                        int(line["peer_port"]),
                        int(line["bytes"]),
                        str(line["sha256"]),
                    )
                    for line in lines[:count]
                ]
            if time.monotonic() > deadline or self.process.poll() not in (None, 0):
                raise LabError(
                    f"echo server: {len(lines)} of {count} connections finished:\n"
                    f"{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.stop()


@dataclass(frozen=True, slots=True)
class EchoResult:
    local_ip: str
    local_port: int
    bytes_sent: int
    sha256: str
    echoes_match: bool
    longest_wait: float


class EchoClient:
    """`ECHO_CLIENT_SCRIPT` running in a lab namespace (see `Lab.echo_client`)."""

    def __init__(self, process: netns.NamespaceProcess, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def progress(self) -> list[tuple[int, float]]:
        """(chunk number, wall-clock time its echo arrived), in order."""
        out: list[tuple[int, float]] = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text().splitlines():
                words = line.split()
                if len(words) == 3 and words[0] == "progress":
                    out.append((int(words[1]), float(words[2])))
        return out

    def wait_progress(self, chunks: int, timeout: float) -> float:
        """Until `chunks` echoes have arrived; the wall-clock time of the last one."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.progress()
            if len(done) >= chunks:
                return done[-1][1]
            code = self.process.poll()
            if code is not None or time.monotonic() > deadline:
                why = f"it exited with {code}" if code is not None else f"after {timeout:.0f} s"
                raise LabError(
                    f"echo client: {len(done)} of {chunks} echoes ({why}):\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def result(self, timeout: float) -> EchoResult:
        """Wait for the client to finish; what it sent and whether every echo matched."""
        try:
            code = self.process.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LabError(
                f"echo client still running after {timeout:.0f} s:\n{_tail(self.log_path)}"
            ) from None
        finally:
            self.process.stop()
        lines = _json_lines(self.log_path)
        if code != 0 or not lines:
            raise LabError(f"echo client failed (exit {code}):\n{_tail(self.log_path)}")
        line = lines[-1]
        return EchoResult(
            str(line["local_ip"]),
            int(line["local_port"]),
            int(line["bytes"]),
            str(line["sha256"]),
            bool(line["echoes_match"]),
            float(line["longest_wait"]),
        )


class Capture:
    """Frames seen on a VM's eth0 during a time window (see `Lab.capture`)."""

    def __init__(self, process: netns.NamespaceProcess, log_path: Path, seconds: float) -> None:
        self.process = process
        self.log_path = log_path
        self.seconds = seconds

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_path.exists() and "ready" in self.log_path.read_text():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise LabError(f"capture did not start: {_tail(self.log_path)}")

    def frames(self) -> list[bytes]:
        """Wait for the window to end; every frame captured."""
        try:
            self.process.popen.wait(self.seconds + 10)
        finally:
            self.process.stop()
        lines = self.log_path.read_text().split()
        if "done" not in lines:
            raise LabError(f"capture did not finish: {_tail(self.log_path)}")
        return [bytes.fromhex(line) for line in lines if line not in ("ready", "done")]


# ---- the lab ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    namespace: str
    label: str
    pid: int
    running: bool


@dataclass(frozen=True, slots=True)
class LabStatus:
    phase: str
    api_url: str | None
    api_healthy: bool
    namespaces: dict[str, bool]
    processes: list[ProcessStatus]
    agents: dict[str, dict[str, Any] | None]  # host -> its counters file (None: none yet)
    store: str = STORE_SQLITE
    store_url: str = ""
    store_members: list[EtcdMemberStatus] = field(default_factory=list)  # etcd labs only
    store_problem: str | None = None  # why the etcd members could not be looked at


class Lab:
    """One lab: `Lab(scenario, state_dir=..., scope=...)`, then `up()`; or `Lab.load(state_dir)`
    for a lab another process brought up. `down()` removes everything it made."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        state_dir: Path,
        scope: LabScope | None = None,
        store: str = STORE_SQLITE,
        agent_lease_ttl: int | None = None,
        progress: Progress = _quiet,
    ) -> None:
        if store not in SUPPORTED_STORES:
            raise LabError(
                f"--store {store!r}: the lab supports {', '.join(SUPPORTED_STORES)} for now"
            )
        if agent_lease_ttl is not None and (
            isinstance(agent_lease_ttl, bool)
            or not isinstance(agent_lease_ttl, int)
            or agent_lease_ttl < MIN_AGENT_LEASE_TTL
        ):
            raise LabError(
                f"--lease-ttl {agent_lease_ttl!r}: expected whole seconds >= "
                f"{MIN_AGENT_LEASE_TTL} (or none: the agent's default)"
            )
        self.scenario = scenario
        self.state_dir = state_dir.expanduser().absolute()
        self.scope = scope or LabScope()
        self.plan = plan_lab(scenario, self.scope)
        self.progress = progress
        self.record = LabRecord(
            tag=self.scope.tag,
            scenario=scenario.model_dump(mode="json"),
            store_url=f"sqlite://{self.state_dir / STORE_FILE}" if store == STORE_SQLITE else "",
            macs=assign_macs(scenario, self.scope),
            store=store,
            agent_lease_ttl=agent_lease_ttl,
        )
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._etcd: EtcdCluster | None = None  # the cluster this process started, if any

    # ---- loading and files ------------------------------------------------------------------

    @classmethod
    def load(cls, state_dir: Path, *, progress: Progress = _quiet) -> Lab:
        """The lab recorded in `state_dir/lab.json`."""
        directory = state_dir.expanduser().absolute()
        path = directory / LAB_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise LabError(
                f"no lab in {directory} (no {LAB_FILE}); start one with `hivenet lab up`"
            ) from None
        record = LabRecord.from_json(text, source=str(path))
        scenario = scenario_from_data(record.scenario, source=str(path))
        lab = cls(
            scenario,
            state_dir=directory,
            scope=LabScope(record.tag),
            store=record.store,
            agent_lease_ttl=record.agent_lease_ttl,
            progress=progress,
        )
        lab.record = record
        return lab

    @property
    def store_url(self) -> str:
        if not self.record.store_url:
            raise LabError(f"the lab in {self.state_dir} has no store yet ({self.record.phase})")
        return self.record.store_url

    @property
    def uses_etcd(self) -> bool:
        return self.record.store == STORE_ETCD

    def etcd_cluster(self) -> EtcdCluster:
        """The lab's etcd cluster (kill, restart, leader by PID): the one this process started,
        else the one recorded in the state dir."""
        if not self.uses_etcd:
            raise LabError(f"the lab in {self.state_dir} runs on {self.record.store}, not etcd")
        if self._etcd is not None:
            return self._etcd
        try:
            return EtcdCluster.load(self.state_dir)
        except EtcdLabError as error:
            raise LabError(str(error)) from None

    @property
    def api_url(self) -> str:
        if self.record.api_url is None:
            raise LabError(
                f"the lab in {self.state_dir} has no API server (phase {self.record.phase})"
            )
        return self.record.api_url

    @property
    def token_path(self) -> Path:
        return self.state_dir / TOKEN_FILE

    def token(self) -> str:
        return self.token_path.read_text().strip()

    def client(self, timeout: float = 10.0) -> HivenetClient:
        return HivenetClient(self.api_url, self.token(), timeout=timeout)

    def env(self) -> dict[str, str]:
        """What a shell needs for `hivenet ...` to reach this lab's API and agents' counters."""
        return {"HIVENET_API_URL": self.api_url, "HIVENET_STATE_DIR": str(self.state_dir)}

    def mac_of(self, vm: str) -> str:
        return self.record.macs[self.plan.vm(vm).name]

    def _save_record(self) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.state_dir / LAB_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(self.record.to_json())
        temporary.replace(path)

    def _log_path(self, namespace: str, label: str) -> Path:
        return self.state_dir / f"{namespace}.{label}.log"

    # ---- up ---------------------------------------------------------------------------------

    def up(self, *, timeout: float = UP_TIMEOUT_SECONDS) -> None:
        """Clean a previous lab of this state dir, then build this one; on failure remove what
        was made (the logs stay in the state dir) and raise."""
        require_root("up")
        with state_dir_lock(self.state_dir):
            self._up(timeout)

    def _up(self, timeout: float) -> None:
        started = time.monotonic()
        previous = self.state_dir / LAB_FILE
        if previous.exists():
            self.progress(f"removing the previous lab of {self.state_dir}")
            try:
                Lab.load(self.state_dir)._down(remove_files=True)
            except LabError as error:
                self.progress(f"  (previous lab record unusable: {error}; removing its files)")
                remove_lab_files(self.state_dir)
        self._refuse_taken_names()
        self._save_record()  # first, so a crash from here on is cleaned by `lab down`
        try:
            self._build(deadline=started + timeout)
        except BaseException:
            self.progress("lab up failed; removing what was made (logs stay in the state dir)")
            self._teardown()
            raise
        self.record.phase = "up"
        self._save_record()
        (self.state_dir / ENV_FILE).write_text(
            "".join(f"export {key}={value}\n" for key, value in self.env().items())
        )

    def _refuse_taken_names(self) -> None:
        existing_namespaces = set(netns.list_namespaces(netns.NAME_PREFIX))
        taken = [name for name in self.plan.namespaces() if name in existing_namespaces]
        existing_links = set(netns.list_links(netns.NAME_PREFIX))
        taken += [name for name in self.plan.root_links() if name in existing_links]
        if self.uses_etcd:
            holders = netns.addresses_in(netns.UNDERLAY_NETWORK)
            if holders:
                link, address = holders[0]
                raise LabError(
                    f"--store etcd: the root namespace already has {address} on {link}, so "
                    "another lab with a local etcd store runs (the root namespace reaches one "
                    "lab underlay at a time); stop it, or use --store sqlite"
                )
        if taken:
            raise LabError(
                f"{', '.join(taken)} already exist(s) and belong(s) to no lab of {self.state_dir}: "
                "another lab is running (stop it with `hivenet lab down --state-dir <its dir>`) "
                "or a crashed one left them (`hivenet lab clean` removes every hn* object)"
            )

    def _build(self, *, deadline: float) -> None:
        plan = self.plan
        self.progress(f"underlay bridge {plan.bridge} and {len(plan.hosts)} host namespaces")
        netns.create_bridge(plan.bridge)
        if self.uses_etcd:
            netns.add_address(plan.bridge, str(netns.ROOT_UNDERLAY_ADDRESS))
        for host in plan.hosts:
            netns.add_host(self.scope, host.name, host.index, plan.bridge)
        if self.uses_etcd:
            self._start_etcd(deadline)
        self.progress("store and API server")
        self._start_api_server(deadline)
        self.progress(f"topology through the API at {self.api_url}")
        self._create_topology()
        self.progress(f"{len(plan.vms)} VM namespaces")
        for vm in plan.vms:
            self._add_vm_namespace(vm)
        if plan.external is not None:
            self._add_external_namespace(plan.external)
        self.progress(f"{len(plan.hosts)} agents (userspace datapath)")
        for host in plan.hosts:
            self.start_agent(host.name)
        self.progress("waiting for every agent to bind its ports")
        self.wait_agents_ready(timeout=max(deadline - time.monotonic(), 1.0))

    def _start_etcd(self, deadline: float) -> None:
        client_host = str(netns.ROOT_UNDERLAY_ADDRESS.ip)
        self.progress(f"{ETCD_MEMBERS}-member etcd cluster on {client_host}")
        try:
            self._etcd = start_cluster(
                self.state_dir,
                size=ETCD_MEMBERS,
                client_host=client_host,
                timeout=max(deadline - time.monotonic(), 5.0),
            )
        except EtcdLabError as error:
            raise LabError(f"etcd cluster: {error}") from None
        self.record.store_url = self._etcd.url
        self._save_record()

    def _start_api_server(self, deadline: float) -> None:
        for _attempt in range(3):  # the free port may be taken between probe and bind
            port = free_local_port()
            argv = [
                *CLI_MODULE,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--state-dir",
                str(self.state_dir),
                "--store",
                self.store_url,
            ]
            log_path = self._log_path(self.plan.api_namespace, SERVE_LABEL)
            popen, _record = _start_process(
                None,
                self.plan.api_namespace,
                argv,
                label=SERVE_LABEL,
                directory=self.state_dir,
                log_path=log_path,
            )
            self._children[self.plan.api_namespace] = popen
            self.record.api_url = f"http://127.0.0.1:{port}"
            if self._wait_api_healthy(popen, deadline):
                self._save_record()
                return
            self._stop_labelled(self.plan.api_namespace, SERVE_LABEL)
        raise LabError(f"hivenet serve did not start:\n{_tail(log_path)}")

    def _wait_api_healthy(self, popen: subprocess.Popen[bytes], deadline: float) -> bool:
        with HivenetClient(self.api_url, timeout=1.0) as client:
            while time.monotonic() < deadline:
                if popen.poll() is not None:
                    return False
                with contextlib.suppress(ApiClientError):
                    if client.health().get("status") == "ok" and self.token_path.exists():
                        return True
                time.sleep(0.05)
        raise LabError(
            f"hivenet serve not healthy in time:\n"
            f"{_tail(self._log_path(self.plan.api_namespace, SERVE_LABEL))}"
        )

    def _create_topology(self) -> None:
        with self.client() as client:
            for obj in topology_objects(self.scenario, self.plan, self.record.macs):
                client.create_object(obj)

    def _add_vm_namespace(self, vm: VmPlan) -> None:
        host = self.plan.host(vm.host)
        netns.create_namespace(vm.namespace, ipv6=False)
        netns.create_veth(
            vm.setup_link,
            vm.port_link,
            namespace=vm.namespace,
            peer_namespace=host.namespace,
            mtu=netns.VM_MTU,
        )
        _rename_link(vm.namespace, vm.setup_link, VM_INTERFACE, self.record.macs[vm.name])
        netns.add_address(VM_INTERFACE, vm.ip, namespace=vm.namespace)
        if vm.gateway is not None:
            netns.add_route("default", gateway=vm.gateway, namespace=vm.namespace)

    def _add_external_namespace(self, external: ExternalPlan) -> None:
        host = self.plan.host(external.host)
        netns.create_namespace(external.namespace, ipv6=False)
        netns.create_veth(
            external.setup_link,
            external.port_link,
            namespace=external.namespace,
            peer_namespace=host.namespace,
            mtu=netns.VM_MTU,
        )
        _rename_link(
            external.namespace, external.setup_link, VM_INTERFACE, self.record.macs[EXTERNAL_ROLE]
        )
        netns.add_address(VM_INTERFACE, external.ip, namespace=external.namespace)
        for prefix in external.routes:
            netns.add_route(prefix, gateway=external.router_address, namespace=external.namespace)

    # ---- agents -----------------------------------------------------------------------------

    def agent_argv(self, host: str) -> list[str]:
        plan = self.plan.host(host)
        return [
            *CLI_MODULE,
            "agent",
            "run",
            "--host-id",
            plan.name,
            "--store",
            self.store_url,
            "--underlay-ip",
            plan.underlay_ip,
            "--tunnel-zone",
            TUNNEL_ZONE_ID,
            "--datapath",
            "userspace",
            "--state-dir",
            str(self.state_dir),
            *(
                ()
                if self.record.agent_lease_ttl is None
                else ("--lease-ttl", str(self.record.agent_lease_ttl))
            ),
        ]

    def agent_record(self, host: str) -> ProcessRecord | None:
        namespace = self.plan.host(host).namespace
        return _read_record(netns.pid_file_path(namespace, AGENT_LABEL, self.state_dir))

    def agent_log(self, host: str) -> Path:
        return self._log_path(self.plan.host(host).namespace, AGENT_LABEL)

    def start_agent(self, host: str) -> int:
        """Start the agent of `host` inside its namespace; its PID."""
        namespace = self.plan.host(host).namespace
        popen, record = _start_process(
            namespace,
            namespace,
            self.agent_argv(host),
            label=AGENT_LABEL,
            directory=self.state_dir,
            log_path=self.agent_log(host),
        )
        self._children[namespace] = popen
        return record.pid

    def kill_agent(self, host: str, signum: int = signal.SIGKILL) -> None:
        """Send `signum` to the agent of `host` (default: kill -9) and wait until it is gone."""
        record = self.agent_record(host)
        if record is None or not self._alive(record):
            raise LabError(f"the agent of {host} is not running")
        os.kill(record.pid, signum)
        child = self._children.get(record.namespace)
        if child is not None and child.pid == record.pid:
            child.wait(10)
        elif not _wait_gone(record, 10.0):
            raise LabError(f"the agent of {host} (PID {record.pid}) survived signal {signum}")

    def wait_agents_ready(
        self, *, timeout: float = 30.0, hosts: Iterable[str] | None = None
    ) -> None:
        """Until each agent process (the one in its PID file) is registered in the store and has
        published, under its current lease, that it bound every port planned for its host."""
        wanted = list(hosts) if hosts is not None else list(self.plan.host_names)
        expected = self.plan.expected_ports()
        deadline = time.monotonic() + timeout
        missing: list[str] = []
        while True:
            records = {host: self.agent_record(host) for host in wanted}
            for host, record in records.items():
                if record is None or not self._alive(record):
                    raise LabError(
                        f"the agent of {host} is not running:\n{_tail(self.agent_log(host))}"
                    )
            pids = {host: record.pid for host, record in records.items() if record is not None}
            missing = asyncio.run(_unbound_ports(self.store_url, pids, expected))
            if not missing:
                return
            if time.monotonic() > deadline:
                raise LabError(
                    f"agents did not bind every port within {timeout:.0f} s; missing: "
                    f"{', '.join(missing)}"
                )
            time.sleep(0.1)

    def _alive(self, record: ProcessRecord) -> bool:
        """Whether the recorded process lives. A child of ours is asked directly: just after
        the fork its /proc cmdline is still ours, which `is_running()` would call a stranger."""
        child = self._children.get(record.namespace)
        if child is not None and child.pid == record.pid:
            return child.poll() is None
        return record.is_running()

    def agent_counters(self, host: str) -> dict[str, Any] | None:
        path = self.state_dir / f"agent-{self.plan.host(host).name}.json"
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data

    def fresh_agent_counters(self, host: str, *, timeout: float = 5.0) -> dict[str, Any]:
        """The counters of `host`'s agent written after this call (agents write each second)."""
        path = self.state_dir / f"agent-{self.plan.host(host).name}.json"
        asked = time.time()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if path.stat().st_mtime > asked:
                    counters = self.agent_counters(host)
                    if counters is not None:
                        return counters
            time.sleep(0.05)
        raise LabError(f"the agent of {host} wrote no counters within {timeout:.0f} s")

    # ---- status -----------------------------------------------------------------------------

    def status(self) -> LabStatus:
        existing = set(netns.list_namespaces(netns.NAME_PREFIX))
        namespaces = {name: name in existing for name in self.plan.namespaces()}
        processes = [
            ProcessStatus(record.namespace, record.label, record.pid, record.is_running())
            for record in self._process_records()
        ]
        healthy = False
        if self.record.api_url is not None:
            with (
                contextlib.suppress(ApiClientError),
                HivenetClient(self.record.api_url, timeout=1.0) as client,
            ):
                healthy = client.health().get("status") == "ok"
        agents = {host: self.agent_counters(host) for host in self.plan.host_names}
        members: list[EtcdMemberStatus] = []
        problem = None
        if self.uses_etcd:
            try:
                members = self.etcd_cluster().member_statuses()
            except LabError as error:
                problem = str(error)
        return LabStatus(
            self.record.phase,
            self.record.api_url,
            healthy,
            namespaces,
            processes,
            agents,
            store=self.record.store,
            store_url=self.record.store_url,
            store_members=members,
            store_problem=problem,
        )

    def _process_records(self) -> list[ProcessRecord]:
        if not self.state_dir.is_dir():
            return []
        ours = {*self.plan.namespaces(), self.plan.api_namespace}
        records = []
        for pid_file in sorted(self.state_dir.glob("*.json")):
            record = _read_record(pid_file)
            if record is not None and record.namespace in ours:
                records.append(record)
        return records

    # ---- commands in namespaces ---------------------------------------------------------------

    def exec_argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """`ip netns exec <namespace> argv...` for a VM, host or the external network."""
        if not argv:
            raise LabError("exec: no command given (e.g. `hivenet lab exec vm1 -- ping 10.0.1.11`)")
        return ["ip", "netns", "exec", self.plan.namespace_of(name), *argv]

    def run(
        self, name: str, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return netns.run_in_namespace(
            self.plan.namespace_of(name), argv, timeout=timeout, check=check
        )

    def log_of(self, name: str, label: str) -> Path:
        """The output file of the process `start_in(name, ..., label=label)` started."""
        return self._log_path(self.plan.namespace_of(name), label)

    def start_in(self, name: str, argv: Sequence[str], *, label: str) -> netns.NamespaceProcess:
        """A background process in a lab namespace (PID file in the state dir; `down` ends it)."""
        namespace = self.plan.namespace_of(name)
        log_path = self._log_path(namespace, label)
        log_path.unlink(missing_ok=True)
        with log_path.open("wb") as log:
            return netns.start_in_namespace(
                namespace, argv, label=label, output=log, directory=self.state_dir
            )

    def ping(
        self,
        vm: str,
        target: str,
        *,
        count: int = 3,
        interval: float = 0.05,
        wait: float = 1.0,
    ) -> PingResult:
        """`ping` from a VM; never raises for lost replies (look at the result)."""
        argv = ["ping", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", f"{wait:g}", target]
        timeout = count * (interval + wait) + 10
        result = self.run(vm, argv, timeout=timeout, check=False)
        return parse_ping(result.stdout + result.stderr, count)

    def tcp_transfer(
        self,
        source: str,
        sink: str,
        sink_ip: str,
        *,
        size: int = 8 << 20,
        port: int = 5201,
        listen_ip: str | None = None,
    ) -> TransferResult:
        """`size` random bytes from `source` to `sink` over TCP; both ends hash them (SHA-256).
        `source` connects to `sink_ip`; `sink` listens on `listen_ip` (default: `sink_ip`;
        another address when `sink_ip` is translated on the way, e.g. a floating IP)."""
        listen = sink_ip if listen_ip is None else listen_ip
        server = self.start_in(
            sink, [sys.executable, "-c", TCP_SINK_SCRIPT, listen, str(port)], label="tcpsink"
        )
        try:
            result = self.run(
                source,
                [sys.executable, "-c", TCP_SOURCE_SCRIPT, sink_ip, str(port), str(size)],
                timeout=120,
                check=False,
            )
        finally:
            server.stop()
        if result.returncode != 0:
            raise LabError(
                f"TCP transfer {source} -> {sink} ({sink_ip}) failed: {result.stderr.strip()[-500:]}"
            )
        elapsed, sent, received = result.stdout.strip().split("|")
        return TransferResult(size, float(elapsed), sent == received, "python", received)

    def iperf3(
        self, source: str, sink: str, sink_ip: str, *, seconds: float = 2.0
    ) -> TransferResult:
        """An iperf3 TCP run from `source` to `sink`; throughput as the receiver counted it."""
        if shutil.which("iperf3") is None:
            raise LabError("iperf3 is not installed")
        server = self.start_in(
            sink, ["iperf3", "-s", "-1", "-B", sink_ip, "-p", "5202"], label="iperf3"
        )
        error = ""
        try:
            deadline = time.monotonic() + 5.0
            while True:
                result = self.run(
                    source,
                    ["iperf3", "-c", sink_ip, "-p", "5202", "-t", f"{seconds:g}", "-J"],
                    timeout=seconds + 30,
                    check=False,
                )
                try:
                    report = json.loads(result.stdout)
                    received = report["end"]["sum_received"]
                    return TransferResult(
                        int(received["bytes"]), float(received["seconds"]), True, "iperf3"
                    )
                except (ValueError, KeyError, TypeError):
                    error = _iperf3_error(result.stdout + result.stderr)
                # Until the server listens (it has just started), or it gave up.
                if server.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        finally:
            server.stop()
        raise LabError(f"iperf3 {source} -> {sink_ip}: {error}")

    def echo_server(
        self, name: str, listen_ip: str, port: int, *, connections: int = 1, label: str = "echosrv"
    ) -> EchoServer:
        """An echo server in `name` (a VM or "ext") for `connections` connections; ready when
        this returns. It reports each peer as it saw it: after SNAT, the translated source."""
        server = EchoServer(
            self.start_in(
                name,
                [sys.executable, "-c", ECHO_SERVER_SCRIPT, listen_ip, str(port), str(connections)],
                label=label,
            ),
            self.log_of(name, label),
        )
        server.wait_ready()
        return server

    def echo_client(
        self,
        name: str,
        target_ip: str,
        port: int,
        *,
        chunk_size: int = 1024,
        chunks: int = 64,
        interval: float = 0.0,
        source_port: int = 0,
        timeout: float = 60.0,
        label: str = "echocli",
    ) -> EchoClient:
        """Start a checksummed echo conversation from `name` to `target_ip:port` (background;
        `.result()` waits). `timeout` bounds each socket call (connect, one echo)."""
        argv = [
            sys.executable,
            "-c",
            ECHO_CLIENT_SCRIPT,
            target_ip,
            str(port),
            str(chunk_size),
            str(chunks),
            f"{interval:g}",
            f"{timeout:g}",
            str(source_port),
        ]
        return EchoClient(self.start_in(name, argv, label=label), self.log_of(name, label))

    def tcp_probe(self, name: str, target_ip: str, port: int, *, timeout: float = 2.0) -> str:
        """One TCP connection attempt from `name`: "connected", "refused" or "timeout"."""
        result = self.run(
            name,
            [sys.executable, "-c", TCP_PROBE_SCRIPT, target_ip, str(port), f"{timeout:g}"],
            timeout=timeout + 15,
            check=False,
        )
        outcome = result.stdout.strip()
        if outcome not in ("connected", "refused", "timeout"):
            raise LabError(f"TCP probe {name} -> {target_ip}:{port}: {result.stderr.strip()}")
        return outcome

    def capture(self, vm: str, seconds: float, *, label: str = "capture") -> Capture:
        """Start capturing every frame on `vm`'s eth0 for `seconds`; `.frames()` waits."""
        namespace = self.plan.namespace_of(vm)
        process = self.start_in(
            vm, [sys.executable, "-c", CAPTURE_SCRIPT, VM_INTERFACE, f"{seconds:g}"], label=label
        )
        capture = Capture(process, self._log_path(namespace, label), seconds)
        capture.wait_ready()
        return capture

    # ---- down -------------------------------------------------------------------------------

    def down(self, *, remove_files: bool = True) -> list[str]:
        """Stop this lab's processes, delete its namespaces and links and (by default) its files
        in the state dir. Returns what could not be removed (empty: all gone)."""
        require_root("down")
        with state_dir_lock(self.state_dir):
            return self._down(remove_files=remove_files)

    def _down(self, *, remove_files: bool) -> list[str]:
        failures = self._teardown()
        if remove_files and not failures:
            remove_lab_files(self.state_dir)
        return failures

    def _stop_labelled(self, namespace: str, label: str) -> None:
        pid_file = netns.pid_file_path(namespace, label, self.state_dir)
        record = _read_record(pid_file)
        if record is not None and self._alive(record):
            child = self._children.get(namespace)
            if child is not None and child.pid == record.pid:
                child.terminate()
                try:
                    child.wait(5)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait(5)
            else:
                netns.stop_process(record.pid)
        pid_file.unlink(missing_ok=True)

    def _teardown(self) -> list[str]:
        failures: list[str] = []
        # Agents first (a graceful stop revokes their leases), then everything else recorded.
        for record in sorted(self._process_records(), key=lambda r: r.label != AGENT_LABEL):
            self._stop_labelled(record.namespace, record.label)
            if record.is_running():
                failures.append(f"process {record.pid} ({record.label} in {record.namespace})")
        # The store last: the agents revoke their leases in it as they stop.
        try:
            stop_etcd_cluster(self.state_dir)
        except EtcdLabError as error:
            failures.append(f"etcd: {error}")
        self._etcd = None
        existing = set(netns.list_namespaces(netns.NAME_PREFIX))
        own_pid = os.getpid()
        for namespace in self.plan.namespaces():
            if namespace not in existing:
                continue
            # Whatever else runs in there (`lab exec` leftovers) would keep it alive.
            for pid in _namespace_pids(namespace):
                if pid != own_pid and not netns.stop_process(pid):
                    failures.append(f"process {pid} in {namespace}")
            try:
                netns.delete_namespace(namespace)
            except (OSError, LabError) as error:
                failures.append(f"namespace {namespace}: {error}")
        for link in self.plan.root_links():
            try:
                netns.delete_link(link)
            except LabError as error:
                failures.append(f"link {link}: {error}")
        for child in self._children.values():
            child.poll()  # reap what ended, so no zombie outlives the lab
        self._children.clear()
        return failures


def _external_mac(scope: LabScope) -> str:
    """A stable locally administered MAC for the external namespace of `scope`."""
    digest = hashlib.sha256(f"hivenet-lab-ext-{scope.tag}".encode()).digest()
    return ":".join(f"{byte:02x}" for byte in (0x02, *digest[:5]))


def _rename_link(namespace: str, link: str, new_name: str, mac: str) -> None:
    """Rename `link` inside `namespace` (a name like eth0 cannot be created in the root
    namespace, where the machine may have its own), set its MAC and bring it up."""
    try:
        with IPRoute(netns=namespace, flags=0) as ipr:
            found = ipr.link_lookup(ifname=link)
            if not found:
                raise LabError(f"link {link!r} not found in namespace {namespace!r}")
            index = found[0]
            ipr.link("set", index=index, state="down")
            ipr.link("set", index=index, ifname=new_name, address=mac)
            ipr.link("set", index=index, state="up")
    except OSError as error:  # NetlinkError is an OSError
        raise LabError(f"rename {link!r} to {new_name!r} in {namespace!r}: {error}") from error


async def _unbound_ports(
    store_url: str, agent_pids: dict[str, int], expected: dict[str, list[str]]
) -> list[str]:
    """ "host/port" for every expected port not yet published as bound by the CURRENT agent of
    its host (the one with that PID, under its lease); "host (not registered)" when the host's
    alive key does not name that PID yet."""
    store = open_store(store_url)
    try:
        state = (await store.range(STATE_PREFIX)).kvs
    finally:
        await store.close()
    by_key = {kv.key: kv for kv in state}
    missing: list[str] = []
    for host, pid in agent_pids.items():
        alive = by_key.get(host_alive_key(host))
        try:
            alive_pid = json.loads(alive.value).get("pid") if alive is not None else None
        except ValueError:
            alive_pid = None
        if alive is None or alive_pid != pid:
            missing.append(f"{host} (agent PID {pid} not registered)")
            continue
        for port_id in expected.get(host, []):
            active = by_key.get(port_active_key(host, port_id))
            if active is None or active.lease != alive.lease:
                missing.append(f"{host}/{port_id}")
    return missing


def remove_lab_files(state_dir: Path) -> None:
    """Delete what a lab writes into its state dir (never anything else), then the dir if empty."""
    if not state_dir.is_dir():
        return
    patterns = [
        LAB_FILE,
        ENV_FILE,
        TOKEN_FILE,
        f"{STORE_FILE}*",
        "agent-*.json",
        "agent-*.tmp",
        f"{netns.NAME_PREFIX}*.json",
        f"{netns.NAME_PREFIX}*.log",
        f"{netns.NAME_PREFIX}*.tmp",
        "lab.tmp",
    ]
    for pattern in patterns:
        for path in state_dir.glob(pattern):
            if path.is_file():
                path.unlink(missing_ok=True)
    # The agents' flow-state journals: a later lab in this dir must not inherit connections.
    for path in state_dir.glob("flowstate-*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        state_dir.rmdir()
