"""The one-machine lab: a `Scenario` brought to life as namespaces, an API server and agents.

The orchestrator of `hivenet lab up|status|exec|down`, over four rooms it must not reach
past: `hivenet.lab.plan` (every name, pure), `hivenet.lab.record` (`lab.json` and the state
dir), `hivenet.lab.processes` (PID files) and `hivenet.lab.probes` (traffic between
namespaces); kernel plumbing is `hivenet.lab.netns`, a crash's leftovers are for
`hivenet.lab.cleanup.clean()`.

Bringing a lab up: underlay bridge, host namespaces, the store -- the embedded SQLite file, or
with `store="etcd"` a local 3-member etcd cluster (`hivenet.lab.etcd`) whose client URLs listen
on the root underlay address `netns.ROOT_UNDERLAY_ADDRESS` (172.31.250.254, given to this lab's
bridge: the agents run inside host namespaces, where 127.0.0.1 is not the root namespace's
loopback), over TLS with client certificates and etcd auth (its CA, certificates and the
`hivenet` user's password file under `<state dir>/etcd/tls/`, gone with `lab down|clean`) --,
`hivenet serve` in the root namespace, the topology written THROUGH THE REST API,
VM namespaces whose `eth0` is wired to a bound port in the host namespace, the optional outside
world `hn-ext` behind the external router's uplink port, one `hivenet agent run --datapath
userspace` per host inside its namespace; then waiting until every agent has bound its ports.
`down` tears exactly this lab down again.

Must not touch: anything not named by this lab's plan (other labs run beside it, each with its
own `LabScope` tag and state dir), the root namespace's addresses and routes (except the root
underlay address on this lab's own bridge, etcd labs only), a process it did not start (PIDs
are checked against their PID file before any signal).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivenet.api.client import ApiClientError, HivenetClient
from hivenet.lab import dhcpclient, netns
from hivenet.lab.etcd import EtcdCluster, EtcdLabError, EtcdMemberStatus, start_cluster
from hivenet.lab.etcd import stop_all as stop_etcd_cluster
from hivenet.lab.netns import LabError, LabScope, ProcessRecord
from hivenet.lab.outside import (
    OUTSIDE_BIRD_CONFIG,
    OUTSIDE_BIRD_LABEL,
    OUTSIDE_BIRD_SOCKET,
    outside_bird_config,
)
from hivenet.lab.plan import (
    EXTERNAL_ROLE,
    TUNNEL_ZONE_ID,
    VM_INTERFACE,
    ExternalPlan,
    VmPlan,
    assign_macs,
    plan_lab,
    topology_objects,
)
from hivenet.lab.probes import TrafficProbes
from hivenet.lab.processes import (
    AGENT_LABEL,
    CLI_MODULE,
    SERVE_LABEL,
    free_local_port,
    namespace_pids,
    start_process,
    tail,
    wait_gone,
)
from hivenet.lab.processes import read_record as read_process_record
from hivenet.lab.record import (
    DEFAULT_LAB_DATAPATH,
    DHCP_DIR,
    ENV_FILE,
    LAB_DATAPATHS,
    LAB_FILE,
    STORE_ETCD,
    STORE_FILE,
    STORE_SQLITE,
    SUPPORTED_STORES,
    TOKEN_FILE,
    LabRecord,
    read_record,
    remove_lab_files,
    save_record,
    state_dir_lock,
)
from hivenet.lab.scenario import Scenario, scenario_from_data
from hivenet.store import open_store
from hivenet.store.keys import STATE_PREFIX, host_alive_key, port_active_key

ETCD_MEMBERS = 3
DHCP_LABEL = "dhcp"
MIN_AGENT_LEASE_TTL = 2  # `hivenet agent run --lease-ttl` accepts no less
UP_TIMEOUT_SECONDS = 60.0

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


class Lab(TrafficProbes):
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
        datapath: str = DEFAULT_LAB_DATAPATH,
        progress: Progress = _quiet,
    ) -> None:
        if datapath not in LAB_DATAPATHS:
            raise LabError(
                f"--datapath {datapath!r}: the lab's agents run {' or '.join(LAB_DATAPATHS)}"
            )
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
            datapath=datapath,
        )
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._etcd: EtcdCluster | None = None  # the cluster this process started, if any

    # ---- loading and files ------------------------------------------------------------------

    @classmethod
    def load(cls, state_dir: Path, *, progress: Progress = _quiet) -> Lab:
        """The lab recorded in `state_dir/lab.json`."""
        directory = state_dir.expanduser().absolute()
        record = read_record(directory)
        scenario = scenario_from_data(record.scenario, source=str(directory / LAB_FILE))
        lab = cls(
            scenario,
            state_dir=directory,
            scope=LabScope(record.tag),
            store=record.store,
            agent_lease_ttl=record.agent_lease_ttl,
            datapath=record.datapath,
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
        save_record(self.state_dir, self.record)

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
        dhcp_vms = [vm for vm in plan.vms if vm.dhcp_client is not None]
        if dhcp_vms:
            clients = sorted({vm.dhcp_client or "" for vm in dhcp_vms})
            self.progress(
                f"{len(dhcp_vms)} VMs ask for their address by DHCP ({', '.join(clients)}), "
                "answered by their host's agent"
            )
            for vm in dhcp_vms:
                self.start_dhcp_client(vm)
            for vm in dhcp_vms:
                self.wait_dhcp_lease(vm, deadline=deadline)

    def _start_etcd(self, deadline: float) -> None:
        client_host = str(netns.ROOT_UNDERLAY_ADDRESS.ip)
        self.progress(
            f"{ETCD_MEMBERS}-member etcd cluster on {client_host} "
            "(TLS, client certificates, etcd user hivenet)"
        )
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
            popen, _record = start_process(
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
        raise LabError(f"hivenet serve did not start:\n{tail(log_path)}")

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
            f"{tail(self._log_path(self.plan.api_namespace, SERVE_LABEL))}"
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
            # A DHCP VM starts like a fresh VM (MTU 1500) and learns 1450 from the lease.
            mtu=netns.VM_MTU if vm.dhcp_client is None else netns.UNDERLAY_MTU,
        )
        netns.rename_link(vm.namespace, vm.setup_link, VM_INTERFACE, self.record.macs[vm.name])
        if vm.dhcp_client is not None:
            return  # configured by `start_dhcp_client` once its host's agent is up
        netns.add_address(VM_INTERFACE, vm.ip, namespace=vm.namespace)
        if vm.gateway is not None:
            netns.add_route("default", gateway=vm.gateway, namespace=vm.namespace)

    # ---- DHCP clients -----------------------------------------------------------------------

    def dhcp_files(self, vm: VmPlan) -> dhcpclient.ClientFiles:
        return dhcpclient.ClientFiles(self.state_dir / DHCP_DIR, vm.namespace)

    def start_dhcp_client(self, vm: VmPlan, client: str | None = None) -> int:
        """Start `vm`'s DHCP client (its scenario's, or `client`) in its namespace; its PID."""
        chosen = client or vm.dhcp_client or dhcpclient.UDHCPC
        files = self.dhcp_files(vm)
        dhcpclient.write_scripts(files.directory)
        # The event scripts find the lease file by the namespace's name (files.lease).
        argv = dhcpclient.client_argv(chosen, VM_INTERFACE, files, vm.name)
        popen, record = start_process(
            vm.namespace,
            vm.namespace,
            argv,
            label=DHCP_LABEL,
            directory=self.state_dir,
            log_path=self._log_path(vm.namespace, DHCP_LABEL),
        )
        self._children[vm.namespace] = popen
        return record.pid

    def stop_dhcp_client(self, vm: VmPlan) -> None:
        self._stop_labelled(vm.namespace, DHCP_LABEL)

    def wait_dhcp_lease(self, vm: VmPlan, *, deadline: float) -> dhcpclient.Lease:
        """`vm`'s lease once its client has configured the scenario's address (then its own
        `gateway`, if the scenario gives one); LabError with the client's log after
        `deadline`."""
        files = self.dhcp_files(vm)
        while True:
            lease = dhcpclient.read_lease(files)
            if lease is not None and str(lease.address) == vm.ip:
                break
            if time.monotonic() > deadline:
                log = tail(self._log_path(vm.namespace, DHCP_LABEL))
                raise LabError(f"{vm.name} got no DHCP lease for {vm.ip} in time:\n{log}")
            time.sleep(0.05)
        if vm.own_gateway is not None:  # replaces the default route the lease set
            netns.run_in_namespace(
                vm.namespace, ["ip", "route", "replace", "default", "via", vm.own_gateway]
            )
        return lease

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
        netns.rename_link(
            external.namespace, external.setup_link, VM_INTERFACE, self.record.macs[EXTERNAL_ROLE]
        )
        netns.add_address(VM_INTERFACE, external.ip, namespace=external.namespace)
        for uplink in external.uplinks:
            netns.create_veth(
                uplink.setup_link,
                uplink.port_link,
                namespace=external.namespace,
                peer_namespace=self.plan.host(uplink.host).namespace,
                mtu=netns.VM_MTU,
            )
            netns.rename_link(external.namespace, uplink.setup_link, uplink.interface, None)
            netns.add_address(uplink.interface, uplink.ip, namespace=external.namespace)
        for prefix in external.routes:
            netns.add_route(prefix, gateway=external.router_address, namespace=external.namespace)
        spec = self.scenario.external
        if spec is not None and spec.bgp is not None:
            config = self.state_dir / OUTSIDE_BIRD_CONFIG
            config.write_text(outside_bird_config(external, spec.bgp))
            self.start_in(
                EXTERNAL_ROLE,
                ["bird", "-f", "-c", str(config), "-s", str(self.outside_bird_socket)],
                label=OUTSIDE_BIRD_LABEL,
            )

    @property
    def outside_bird_socket(self) -> Path:
        """The control socket of hn-ext's BIRD: `birdc -s <it> show route`."""
        return self.state_dir / OUTSIDE_BIRD_SOCKET

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
            self.record.datapath,
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
        return read_process_record(netns.pid_file_path(namespace, AGENT_LABEL, self.state_dir))

    def agent_log(self, host: str) -> Path:
        return self._log_path(self.plan.host(host).namespace, AGENT_LABEL)

    def start_agent(self, host: str) -> int:
        """Start the agent of `host` inside its namespace; its PID."""
        namespace = self.plan.host(host).namespace
        popen, record = start_process(
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
        elif not wait_gone(record, 10.0):
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
                        f"the agent of {host} is not running:\n{tail(self.agent_log(host))}"
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

    def wait_agent_revision(self, host: str, revision: int, *, timeout: float = 20.0) -> None:
        """Wait until `host`'s agent has applied the store up to `revision` (a write the test
        made), so what the test does next meets the new state, not a race with the watch."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            counters = self.fresh_agent_counters(
                host, timeout=max(0.1, deadline - time.monotonic())
            )
            seen = counters.get("revision")
            if isinstance(seen, int) and seen >= revision:
                return
        raise LabError(
            f"the agent of {host} did not reach store revision {revision} within "
            f"{timeout:.0f} s (at {seen})"
        )

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
        namespaces = {name: name in existing for name in self.namespaces()}
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
        ours = {*self.namespaces(), self.plan.api_namespace}
        records = []
        for pid_file in sorted(self.state_dir.glob("*.json")):
            record = read_process_record(pid_file)
            if record is not None and record.namespace in ours:
                records.append(record)
        return records

    # ---- VMs plugged onto ports made through the API --------------------------------------------

    def namespaces(self) -> list[str]:
        """The plan's namespaces and those of the VMs `plug_vm` added."""
        return [*self.plan.namespaces(), *(vm.namespace for vm in self.plugged_vms())]

    def plugged_vms(self) -> list[VmPlan]:
        return [VmPlan(**data) for data in self.record.plugged.values()]

    def plugged_vm(self, name: str) -> VmPlan:
        data = self.record.plugged.get(name)
        if data is None:
            raise LabError(f"VM {name!r}: not plugged in this lab")
        return VmPlan(**data)

    def namespace_of(self, name: str) -> str:
        """The namespace of a VM (scenario or plugged), a host or the external network."""
        for vm in self.plugged_vms():
            if name in (vm.name, vm.namespace):
                return vm.namespace
        return self.plan.namespace_of(name)

    def plug_vm(
        self,
        name: str,
        *,
        host: str,
        interface: str,
        mac: str,
        ip: str,
        dhcp_client: str | None = dhcpclient.UDHCPC,
    ) -> VmPlan:
        """A VM namespace `name` (`eth0` with `mac`) wired to `interface` in `host`'s namespace,
        for a port made through the API after `up` and bound to (`host`, `interface`) -- e.g.
        `openstack port create --host h1` (`interface` is then Nova's `tap` + the first 11
        characters of the port id) --, with its DHCP client started; `ip` (with prefix) is the
        address its lease must give (`wait_dhcp_lease`), or with `dhcp_client` None its static
        address (if any). The agent binds the interface once it appears. Recorded in lab.json,
        so `down` removes it whatever happens."""
        taken = {vm.name for vm in self.plan.vms} | set(self.plan.host_names)
        if name in taken or name in self.record.plugged or name == EXTERNAL_ROLE:
            raise LabError(f"plug_vm: {name!r} is already a VM, host or role of this lab")
        host_plan = self.plan.host(host)
        setup_link = self.scope.link(f"{name}i")
        host_link = self.scope.link(f"{name}p")
        vm = VmPlan(
            name=name,
            host=host,
            network="",
            namespace=self.scope.namespace(name),
            port_id="",
            port_link=interface,
            setup_link=setup_link,
            ip=ip,
            gateway=None,
            dhcp_client=dhcp_client,
        )
        self.record.plugged[name] = dataclasses.asdict(vm)
        self._save_record()  # first, so `down` finds the namespace whatever fails next
        netns.create_namespace(vm.namespace, ipv6=False)
        # A DHCP VM starts like a fresh VM (MTU 1500) and learns 1450 from the lease.
        netns.create_veth(
            setup_link,
            host_link,
            namespace=vm.namespace,
            peer_namespace=host_plan.namespace,
            mtu=netns.VM_MTU if dhcp_client is None else netns.UNDERLAY_MTU,
        )
        netns.rename_link(vm.namespace, setup_link, VM_INTERFACE, mac)
        if interface != host_link:  # a name only ever made inside the host namespace
            netns.rename_link(host_plan.namespace, host_link, interface, None)
        if dhcp_client is not None:
            self.start_dhcp_client(vm)
        elif ip:
            netns.add_address(VM_INTERFACE, ip, namespace=vm.namespace)
        return vm

    # ---- commands in namespaces ---------------------------------------------------------------

    def exec_argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """`ip netns exec <namespace> argv...` for a VM, host or the external network."""
        if not argv:
            raise LabError("exec: no command given (e.g. `hivenet lab exec vm1 -- ping 10.0.1.11`)")
        return ["ip", "netns", "exec", self.namespace_of(name), *argv]

    def run(
        self, name: str, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return netns.run_in_namespace(self.namespace_of(name), argv, timeout=timeout, check=check)

    def log_of(self, name: str, label: str) -> Path:
        """The output file of the process `start_in(name, ..., label=label)` started."""
        return self._log_path(self.namespace_of(name), label)

    def start_in(self, name: str, argv: Sequence[str], *, label: str) -> netns.NamespaceProcess:
        """A background process in a lab namespace (PID file in the state dir; `down` ends it)."""
        namespace = self.namespace_of(name)
        log_path = self._log_path(namespace, label)
        log_path.unlink(missing_ok=True)
        with log_path.open("wb") as log:
            return netns.start_in_namespace(
                namespace, argv, label=label, output=log, directory=self.state_dir
            )

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
        record = read_process_record(pid_file)
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
        for namespace in self.namespaces():
            if namespace not in existing:
                continue
            # Whatever else runs in there (`lab exec` leftovers) would keep it alive.
            for pid in namespace_pids(namespace):
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
