"""Lab scenario files: the one-machine cloud a `hivenet lab up` builds, as validated YAML.

Owns the scenario schema (hosts, networks with their tenant, routers with interfaces and static
routes, VMs, the optional external network), every check that can be made on the file alone
(names, references, addresses inside their subnets, no duplicate addresses, router interfaces
that do not overlap) and loading: `load_scenario(path)` / `parse_scenario(text)` raise
`ScenarioError` whose lines each name the field (`vms[2].ip`) and the value.
Must not touch the kernel, the store or the API: `hivenet.lab.lab` turns a `Scenario` into
namespaces and API calls.

A scenario file::

    name: default
    hosts: [h1, h2]
    networks:
      - {name: net1, subnet: 10.0.1.0/24, tenant: blue}
    routers:
      - name: r1
        interfaces: [{network: net1, ip: 10.0.1.1/24}]
        routes: [{dst: 10.0.9.0/24, gateway: 10.0.1.20}]
    vms:
      - {name: vm1, host: h1, network: net1, ip: 10.0.1.10/24, floating_ip: 198.51.100.10}
      - {name: vm2, host: h1, network: net1, ip: 10.0.1.11/24, dhcp_client: dhclient}
      - {name: vm3, host: h1, network: net1, ip: 10.0.1.12/24, dhcp: false}  # pinned
    external:
      host: h1                         # the gateway host: the uplink port is bound there
      router: r1
      router_ip: 192.0.2.1/24          # the uplink port's address (and the SNAT address)
      ip: 192.0.2.2/24                 # hn-ext's address: the outside world
      floating_range: 198.51.100.0/24  # optional; hn-ext routes it via router_ip
      snat: [net1]                     # networks source-NATed to router_ip when leaving

Each network is a bridge with one DHCP-enabled subnet (its gateway: the first router
interface on it); each VM's `ip` is its fixed IP there. VMs boot by DHCP (`dhcp_client`:
busybox `udhcpc`, the default, or ISC `dhclient`), answered by their host's agent; with
`dhcp: false` the lab configures the address and the default route itself.

Two tenants may use the same subnet: the networks are separate bridges, and only a router that
joins both would make the overlap ambiguous (refused).

The external section: `hn-ext` sits behind the exterior (uplink) port of `router`, bound on the
gateway host. Floating IPs come from `floating_range`: inside router_ip's subnet they are on
link (the router answers ARP for them); outside it, the uplink port also gets the range's
first address (the simulation attaches a floating IP to the router port whose subnet holds
it) and hn-ext a route to the range via router_ip. Without `floating_range`, floating IPs
come from router_ip's subnet. `snat` networks reach the outside as router_ip, ports
1024-65535 leased per host in blocks; a VM with a floating IP uses it instead (1:1 NAT).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from hivenet.model.types import MacAddress, ObjectId

SCENARIO_PACKAGE = "hivenet.lab"
SCENARIO_FOLDER = "scenarios"
DEFAULT_SCENARIO = "default"
# Reserved for the lab's own namespaces (`hn-api` names the API server's PID file, `hn-ext` the
# external network).
RESERVED_NAMES = frozenset({"api", "ext"})
# Host and VM names become namespace roles and parts of link names (`hn<tag><name>p`, at most
# 15 characters with a 4-character tag and a 1-character suffix): 8 characters at most.
_MACHINE_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
_DEVICE_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,27}$")


class ScenarioError(ValueError):
    """A scenario file is unreadable or invalid; each line names the field and the value."""


def _machine_name(value: str) -> str:
    if not _MACHINE_NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a host/VM name: 1-8 lowercase letters and digits, starting with "
            "a letter (it becomes part of namespace and interface names)"
        )
    if value in RESERVED_NAMES:
        raise ValueError(f"{value!r} is reserved for the lab itself")
    return value


def _device_name(value: str) -> str:
    if not _DEVICE_NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a network/router name: 1-28 lowercase letters, digits and '-', "
            "starting with a letter"
        )
    return value


MachineName = Annotated[str, AfterValidator(_machine_name)]
DeviceName = Annotated[str, AfterValidator(_device_name)]


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NetworkSpec(_Spec):
    """A tenant's L2 network: one virtual bridge with one IPv4 subnet."""

    name: DeviceName
    subnet: ipaddress.IPv4Network
    tenant: ObjectId = "admin"

    @model_validator(mode="after")
    def _room_for_hosts(self) -> NetworkSpec:
        if self.subnet.prefixlen > 30:
            raise ValueError(f"subnet {self.subnet}: at most /30 (room for two addresses)")
        return self


class RouterInterfaceSpec(_Spec):
    """A router port on `network` with address `ip` (the VMs' default gateway)."""

    network: DeviceName
    ip: ipaddress.IPv4Interface


class RouteSpec(_Spec):
    """A static route: `dst` via `gateway`, a neighbour on one of the router's networks."""

    dst: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address


class RouterSpec(_Spec):
    name: DeviceName
    tenant: ObjectId = "admin"
    interfaces: tuple[RouterInterfaceSpec, ...] = Field(min_length=1)
    routes: tuple[RouteSpec, ...] = ()


class VmSpec(_Spec):
    """A VM: a namespace whose `eth0` is a port of `network`, bound on `host`, holding `ip`
    (its fixed IP on the network's subnet). With `dhcp` (the default) the VM asks for its
    address, router, MTU (1450) and routes with `dhcp_client`, answered by its host's agent;
    `dhcp: false` pins them statically instead. Without `gateway` the default route goes via
    the network's router interface, if any (a VM's own `gateway` is added after DHCP)."""

    name: MachineName
    host: MachineName
    network: DeviceName
    ip: ipaddress.IPv4Interface
    mac: MacAddress | None = None
    gateway: ipaddress.IPv4Address | None = None
    floating_ip: ipaddress.IPv4Address | None = None  # 1:1 NAT on the external router
    dhcp: bool = True
    dhcp_client: Literal["udhcpc", "dhclient"] = "udhcpc"


SNAT_PORT_FIRST = 1024
SNAT_PORT_LAST = 65535


class UplinkSpec(_Spec):
    """One more uplink of the external router: its own gateway `host`, segment and addresses
    (`router_ip`: the uplink port's; `ip`: hn-ext's end)."""

    host: MachineName
    router_ip: ipaddress.IPv4Interface
    ip: ipaddress.IPv4Interface


class BgpSpec(_Spec):
    """BGP between every uplink port (AS `local_as`) and hn-ext (AS `peer_as`), which runs
    BIRD: the uplinks announce the floating range, hn-ext announces a default route."""

    local_as: int = Field(default=65001, ge=1, le=4294967295)
    peer_as: int = Field(default=65000, ge=1, le=4294967295)
    hold_time: int = Field(default=3, ge=3, le=65535)


class ExternalSpec(_Spec):
    """The `hn-ext` namespace: the outside world, behind an exterior port of `router` (address
    `router_ip`) bound on the gateway host `host`. `ip` is the outside end's address.
    `floating_range`: where VMs' floating IPs come from (default: router_ip's subnet).
    `snat`: networks of `router` whose traffic to the outside leaves as router_ip."""

    host: MachineName
    router: DeviceName
    router_ip: ipaddress.IPv4Interface
    ip: ipaddress.IPv4Interface
    mac: MacAddress | None = None
    floating_range: ipaddress.IPv4Network | None = None
    snat: tuple[DeviceName, ...] = ()
    uplinks: tuple[UplinkSpec, ...] = Field(default=(), max_length=7)
    bgp: BgpSpec | None = None

    @property
    def all_uplinks(self) -> tuple[UplinkSpec, ...]:
        """The first uplink (host, router_ip, ip) and the `uplinks` after it."""
        first = UplinkSpec(host=self.host, router_ip=self.router_ip, ip=self.ip)
        return (first, *self.uplinks)

    @property
    def snat_address(self) -> ipaddress.IPv4Address:
        """Where `snat` networks leave as: router_ip, or with several uplinks the router's
        address in the routed floating range (reachable through every uplink)."""
        gateway = self.floating_gateway
        if self.uplinks and gateway is not None:
            return gateway.ip
        return self.router_ip.ip

    @property
    def floating_network(self) -> ipaddress.IPv4Network:
        """Where floating IPs come from."""
        return self.floating_range or self.router_ip.network

    @property
    def floating_gateway(self) -> ipaddress.IPv4Interface | None:
        """The uplink port's address in an off-link floating range (its first address), or
        None when floating IPs are on router_ip's own subnet."""
        floating = self.floating_range
        if floating is None or floating.subnet_of(self.router_ip.network):
            return None
        return ipaddress.IPv4Interface(f"{floating.network_address + 1}/{floating.prefixlen}")

    @property
    def routed_prefixes(self) -> tuple[ipaddress.IPv4Network, ...]:
        """What hn-ext routes via router_ip (the off-link floating range, if any; with BGP
        hn-ext learns it instead)."""
        if self.floating_gateway is None or self.bgp is not None:
            return ()
        return (self.floating_network,)


class Scenario(_Spec):
    name: str = Field(default="lab", min_length=1, max_length=64)
    hosts: tuple[MachineName, ...] = Field(min_length=1, max_length=253)
    # Both may be empty: a lab of hosts whose networks come later through the API (e.g. the
    # `openstack` CLI), with VMs plugged onto their ports by `Lab.plug_vm`.
    networks: tuple[NetworkSpec, ...] = ()
    routers: tuple[RouterSpec, ...] = ()
    vms: tuple[VmSpec, ...] = ()
    external: ExternalSpec | None = None

    # ---- lookups ------------------------------------------------------------------------

    def network(self, name: str) -> NetworkSpec:
        for network in self.networks:
            if network.name == name:
                return network
        raise KeyError(name)

    def router(self, name: str) -> RouterSpec:
        for router in self.routers:
            if router.name == name:
                return router
        raise KeyError(name)

    def vm(self, name: str) -> VmSpec:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)

    def host_index(self, host: str) -> int:
        """1-based position of `host`: its underlay address is `underlay_address(index)`."""
        return self.hosts.index(host) + 1

    def gateway_of(self, vm: VmSpec) -> ipaddress.IPv4Address | None:
        """The VM's default gateway: its own `gateway`, else its network's first router
        interface, else None (no default route)."""
        if vm.gateway is not None:
            return vm.gateway
        for router in self.routers:
            for interface in router.interfaces:
                if interface.network == vm.network:
                    return interface.ip.ip
        return None

    # ---- cross-field checks -------------------------------------------------------------

    @model_validator(mode="after")
    def _check_references(self) -> Scenario:
        problems: list[str] = []
        _duplicates(problems, "hosts", self.hosts)
        _duplicates(problems, "networks", [n.name for n in self.networks])
        _duplicates(problems, "routers", [r.name for r in self.routers])
        _duplicates(problems, "vms", [v.name for v in self.vms])
        for index, vm in enumerate(self.vms):
            if vm.name in self.hosts:
                problems.append(
                    f"vms[{index}].name: {vm.name!r} is also a host name (namespaces would clash)"
                )
        # Every address on a network: (network, ip) -> who has it.
        owners: dict[tuple[str, ipaddress.IPv4Address], str] = {}
        networks = {n.name: n for n in self.networks}
        for r_index, router in enumerate(self.routers):
            self._check_router(r_index, router, networks, owners, problems)
        macs: dict[str, str] = {}
        for index, vm in enumerate(self.vms):
            where = f"vms[{index}]"
            if vm.host not in self.hosts:
                problems.append(f"{where}.host: {vm.host!r} is not in hosts {list(self.hosts)}")
            network = networks.get(vm.network)
            if network is None:
                problems.append(f"{where}.network: {vm.network!r} is not a declared network")
                continue
            _check_address(problems, f"{where}.ip", vm.ip, network)
            _claim(problems, owners, f"{where}.ip", vm.network, vm.ip.ip, f"VM {vm.name}")
            if vm.gateway is not None and vm.gateway not in network.subnet:
                problems.append(
                    f"{where}.gateway: {vm.gateway} is not in network {network.name}'s subnet "
                    f"{network.subnet}"
                )
            if vm.mac is not None:
                if int(vm.mac.split(":")[0], 16) & 1:
                    problems.append(f"{where}.mac: {vm.mac} is a multicast address")
                elif vm.mac in macs:
                    problems.append(f"{where}.mac: {vm.mac} is also the MAC of {macs[vm.mac]}")
                macs[vm.mac] = vm.name
        if self.external is not None:
            self._check_external(networks, problems)
        else:
            problems.extend(
                f"vms[{index}].floating_ip: {vm.floating_ip} needs an external section "
                "(the router that NATs it and the outside that reaches it)"
                for index, vm in enumerate(self.vms)
                if vm.floating_ip is not None
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _check_router(
        self,
        r_index: int,
        router: RouterSpec,
        networks: dict[str, NetworkSpec],
        owners: dict[tuple[str, ipaddress.IPv4Address], str],
        problems: list[str],
    ) -> None:
        attached: dict[str, ipaddress.IPv4Network] = {}
        for i_index, interface in enumerate(router.interfaces):
            where = f"routers[{r_index}].interfaces[{i_index}]"
            network = networks.get(interface.network)
            if network is None:
                problems.append(f"{where}.network: {interface.network!r} is not a declared network")
                continue
            if network.name in attached:
                problems.append(
                    f"{where}.network: router {router.name} already has an interface on "
                    f"{network.name}"
                )
                continue
            for other, subnet in attached.items():
                if subnet.overlaps(network.subnet):
                    problems.append(
                        f"{where}.network: {network.name} ({network.subnet}) overlaps {other} "
                        f"({subnet}) on the same router {router.name}"
                    )
            attached[network.name] = network.subnet
            _check_address(problems, f"{where}.ip", interface.ip, network)
            _claim(problems, owners, f"{where}.ip", network.name, interface.ip.ip, router.name)
        for route_index, route in enumerate(router.routes):
            where = f"routers[{r_index}].routes[{route_index}].gateway"
            if not any(route.gateway in subnet for subnet in attached.values()):
                problems.append(
                    f"{where}: {route.gateway} is on none of router {router.name}'s networks "
                    f"({', '.join(str(s) for s in attached.values()) or 'none'})"
                )

    def _check_external(self, networks: dict[str, NetworkSpec], problems: list[str]) -> None:
        external = self.external
        assert external is not None
        if external.host not in self.hosts:
            problems.append(f"external.host: {external.host!r} is not in hosts {list(self.hosts)}")
        if external.router not in {r.name for r in self.routers}:
            problems.append(f"external.router: {external.router!r} is not a declared router")
            return
        if external.ip.network != external.router_ip.network:
            problems.append(
                f"external.ip: {external.ip} is not in router_ip's subnet "
                f"{external.router_ip.network}"
            )
        elif external.ip.ip == external.router_ip.ip:
            problems.append(f"external.ip: {external.ip.ip} is also external.router_ip")
        attached = {
            interface.network: networks[interface.network].subnet
            for interface in self.router(external.router).interfaces
            if interface.network in networks
        }
        for name, subnet in attached.items():
            if subnet.overlaps(external.router_ip.network):
                problems.append(
                    f"external.router_ip: {external.router_ip.network} overlaps network "
                    f"{name} ({subnet}) on router {external.router}"
                )
        self._check_floating_range(attached, problems)
        self._check_uplinks(attached, problems)
        _duplicates(problems, "external.snat", external.snat)
        for index, network in enumerate(external.snat):
            if network not in attached:
                problems.append(
                    f"external.snat[{index}]: {network!r} is not a network of router "
                    f"{external.router} ({', '.join(attached) or 'none'})"
                )
        self._check_floating_ips(attached, problems)

    def _check_uplinks(
        self, attached: dict[str, ipaddress.IPv4Network], problems: list[str]
    ) -> None:
        external = self.external
        assert external is not None
        if external.uplinks and external.floating_gateway is None:
            problems.append(
                "external.uplinks: several uplinks need a routed floating_range (outside "
                "router_ip's subnet): SNAT and floating IPs must be reachable through each"
            )
        segments = [external.router_ip.network]
        hosts = [external.host]
        for index, uplink in enumerate(external.uplinks):
            where = f"external.uplinks[{index}]"
            if uplink.host not in self.hosts:
                problems.append(f"{where}.host: {uplink.host!r} is not in hosts {list(self.hosts)}")
            elif uplink.host in hosts:
                problems.append(f"{where}.host: {uplink.host!r} already has an uplink")
            hosts.append(uplink.host)
            if uplink.ip.network != uplink.router_ip.network:
                problems.append(
                    f"{where}.ip: {uplink.ip} is not in router_ip's subnet {uplink.router_ip.network}"
                )
            elif uplink.ip.ip == uplink.router_ip.ip:
                problems.append(f"{where}.ip: {uplink.ip.ip} is also its router_ip")
            for other in [*segments, *attached.values()]:
                if uplink.router_ip.network.overlaps(other):
                    problems.append(
                        f"{where}.router_ip: {uplink.router_ip.network} overlaps {other}"
                    )
            segments.append(uplink.router_ip.network)

    def _check_floating_range(
        self, attached: dict[str, ipaddress.IPv4Network], problems: list[str]
    ) -> None:
        external = self.external
        assert external is not None
        floating = external.floating_range
        if floating is None:
            return
        uplink = external.router_ip.network
        if floating.overlaps(uplink) and not floating.subnet_of(uplink):
            problems.append(
                f"external.floating_range: {floating} must lie inside router_ip's subnet "
                f"{uplink} (on link) or outside it (routed), not across it"
            )
            return
        if floating.subnet_of(uplink):
            return
        if floating.prefixlen > 30:
            problems.append(
                f"external.floating_range: {floating} is routed (outside {uplink}): at most /30 "
                "(the router takes its first address)"
            )
        for name, subnet in attached.items():
            if subnet.overlaps(floating):
                problems.append(
                    f"external.floating_range: {floating} overlaps network {name} ({subnet}) "
                    f"on router {external.router}"
                )

    def _check_floating_ips(
        self, attached: dict[str, ipaddress.IPv4Network], problems: list[str]
    ) -> None:
        external = self.external
        assert external is not None
        pool = external.floating_network
        taken = {
            external.router_ip.ip: "external.router_ip",
            external.ip.ip: "external.ip",
            pool.network_address: f"the network address of {pool}",
            pool.broadcast_address: f"the broadcast address of {pool}",
        }
        gateway = external.floating_gateway
        if gateway is not None:
            taken[gateway.ip] = f"the router's address in {pool}"
        for index, vm in enumerate(self.vms):
            if vm.floating_ip is None:
                continue
            where = f"vms[{index}].floating_ip"
            if vm.floating_ip not in pool:
                problems.append(
                    f"{where}: {vm.floating_ip} is not in the floating range {pool} "
                    "(external.floating_range, else router_ip's subnet)"
                )
            elif vm.floating_ip in taken:
                problems.append(f"{where}: {vm.floating_ip} is {taken[vm.floating_ip]}")
            if vm.network not in attached:
                problems.append(
                    f"{where}: VM {vm.name}'s network {vm.network} is not on the external "
                    f"router {external.router}, which would NAT it"
                )
            taken.setdefault(vm.floating_ip, f"the floating IP of VM {vm.name}")


def _duplicates(problems: list[str], field: str, names: Iterable[str]) -> None:
    seen: set[str] = set()
    for index, name in enumerate(names):
        if name in seen:
            problems.append(f"{field}[{index}]: duplicate name {name!r}")
        seen.add(name)


def _check_address(
    problems: list[str], where: str, address: ipaddress.IPv4Interface, network: NetworkSpec
) -> None:
    if address.network != network.subnet:
        problems.append(
            f"{where}: {address} is not in network {network.name}'s subnet {network.subnet} "
            "(same prefix length expected)"
        )
    elif address.ip in (network.subnet.network_address, network.subnet.broadcast_address):
        problems.append(
            f"{where}: {address.ip} is the network or broadcast address of {network.subnet}"
        )


def _claim(
    problems: list[str],
    owners: dict[tuple[str, ipaddress.IPv4Address], str],
    where: str,
    network: str,
    ip: ipaddress.IPv4Address,
    owner: str,
) -> None:
    key = (network, ip)
    if key in owners:
        problems.append(f"{where}: {ip} on {network} is already used by {owners[key]}")
    else:
        owners[key] = owner


# ---- loading ----------------------------------------------------------------------------------


def _describe(error: pydantic.ValidationError) -> str:
    lines: list[str] = []
    for item in error.errors():
        location = ""
        for part in item["loc"]:
            if isinstance(part, int):
                location += f"[{part}]"
            else:
                location += f".{part}" if location else str(part)
        message = str(item["msg"]).removeprefix("Value error, ")
        if not location:  # a cross-field check: its message already names each field
            lines.extend(message.splitlines())
            continue
        value = item.get("input")
        shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
        lines.append(f"{location}: {message}{shown}")
    return "\n".join(lines)


def scenario_from_data(data: Any, *, source: str = "scenario") -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a mapping at the top, got {type(data).__name__}")
    try:
        return Scenario.model_validate(data)
    except pydantic.ValidationError as error:
        raise ScenarioError(f"{source} is invalid:\n{_describe(error)}") from None


def parse_scenario(text: str, *, source: str = "scenario") -> Scenario:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ScenarioError(f"{source}: not valid YAML: {error}") from None
    return scenario_from_data(data, source=source)


def load_scenario(path: Path) -> Scenario:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ScenarioError(f"scenario {path}: cannot read: {error.strerror or error}") from None
    return parse_scenario(text, source=str(path))


def builtin_scenario_names() -> list[str]:
    """The scenarios shipped in `hivenet/lab/scenarios/` (`default`, `nat`, ...)."""
    folder = resources.files(SCENARIO_PACKAGE).joinpath(SCENARIO_FOLDER)
    return sorted(
        entry.name.removesuffix(".yaml")
        for entry in folder.iterdir()
        if entry.is_file() and entry.name.endswith(".yaml")
    )


def builtin_scenario_text(name: str = DEFAULT_SCENARIO) -> str:
    """The text of a scenario shipped in `hivenet/lab/scenarios/<name>.yaml`."""
    resource = resources.files(SCENARIO_PACKAGE).joinpath(SCENARIO_FOLDER).joinpath(f"{name}.yaml")
    if not _DEVICE_NAME_RE.match(name) or not resource.is_file():
        raise ScenarioError(
            f"no built-in scenario named {name!r} (built in: {', '.join(builtin_scenario_names())})"
        )
    return resource.read_text(encoding="utf-8")


def builtin_scenario(name: str = DEFAULT_SCENARIO) -> Scenario:
    return parse_scenario(builtin_scenario_text(name), source=f"built-in scenario {name!r}")


def resolve_scenario(argument: str | None) -> Scenario:
    """What `hivenet lab up --scenario ARG` means: nothing -> the default scenario; an existing
    file, or anything that looks like a path (a '/' or a .yaml/.yml suffix) -> that file;
    otherwise the built-in scenario of that name (`nat`)."""
    if argument is None:
        return builtin_scenario()
    path = Path(argument)
    if path.exists() or "/" in argument or path.suffix in (".yaml", ".yml"):
        return load_scenario(path)
    return builtin_scenario(argument)
