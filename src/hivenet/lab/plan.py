"""The plan of one lab: every name (namespaces, links, object ids) and the topology objects,
computed from a `Scenario` and a `LabScope`, before anything exists.

Pure: owns `LabPlan` and `topology_objects`; must not touch the kernel, the store, the API,
processes or files (`hivenet.lab.lab` brings the plan to life).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from hivenet.lab.netns import LabError, LabScope, underlay_address
from hivenet.lab.scenario import SNAT_PORT_FIRST, SNAT_PORT_LAST, Scenario
from hivenet.model import (
    BgpPeer,
    Bridge,
    Chain,
    DeviceKind,
    FixedIp,
    FloatingIp,
    Host,
    NatTarget,
    Port,
    PortGroup,
    Route,
    Router,
    Rule,
    RuleAction,
    Subnet,
    TopologyObject,
    TunnelZone,
    TunnelZoneMember,
)
from hivenet.model.types import random_mac

TUNNEL_ZONE_ID = "lab-underlay"
VM_INTERFACE = "eth0"
API_ROLE = "api"
EXTERNAL_ROLE = "ext"


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
    dhcp_client: str | None = None  # "udhcpc" or "dhclient"; None: configured statically
    own_gateway: str | None = None  # a default route the VM sets itself (scenario `gateway`)

    @property
    def address(self) -> str:
        return self.ip.split("/")[0]


@dataclass(frozen=True, slots=True)
class UplinkPlan:
    """One more uplink of the external router (the first is ExternalPlan's own fields)."""

    host: str
    port_id: str
    port_link: str  # the uplink port's interface, in the gateway host's namespace
    setup_link: str  # hn-ext's end until it is renamed `interface`
    interface: str  # its name inside hn-ext (eth1, eth2, ...)
    ip: str  # hn-ext's address on this segment, with prefix
    router_ip: str

    @property
    def address(self) -> str:
        return self.ip.split("/")[0]

    @property
    def router_address(self) -> str:
        return self.router_ip.split("/")[0]


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
    uplinks: tuple[UplinkPlan, ...] = ()  # more gateways (the scenario's external.uplinks)

    @property
    def address(self) -> str:
        return self.ip.split("/")[0]

    def all_uplinks(self) -> tuple[UplinkPlan, ...]:
        """Every uplink, the first one (eth0 in hn-ext) included."""
        first = UplinkPlan(
            host=self.host,
            port_id=self.port_id,
            port_link=self.port_link,
            setup_link=self.setup_link,
            interface=VM_INTERFACE,
            ip=self.ip,
            router_ip=self.router_ip,
        )
        return (first, *self.uplinks)

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
            for uplink in self.external.all_uplinks():
                ports[uplink.host].append(uplink.port_id)
        return ports


def router_port_id(router: str, network: str) -> str:
    return f"rp.{router}.{network}"


def uplink_port_id(network: str, router: str) -> str:
    return f"bp.{network}.{router}"


def subnet_id(network: str) -> str:
    return f"subnet.{network}"


def vm_port_id(vm: str) -> str:
    return f"vm.{vm}"


def external_port_id(router: str) -> str:
    return f"ext.{router}"


def extra_uplink_port_id(router: str, number: int) -> str:
    """The uplink ports after the first: ext.<router>.2, ext.<router>.3, ..."""
    return f"ext.{router}.{number}"


def uplink_group_id(router: str) -> str:
    """The stateful port group of a router's uplinks: connection state reaches every gateway."""
    return f"uplinks.{router}"


def bgp_peer_id(port_id: str) -> str:
    return f"bgp.{port_id}"


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
            underlay_interface=str(underlay_address(index)),
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
            dhcp_client=vm.dhcp_client if vm.dhcp else None,
            own_gateway=None if vm.gateway is None else str(vm.gateway),
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
            uplinks=tuple(
                UplinkPlan(
                    host=uplink.host,
                    port_id=extra_uplink_port_id(spec.router, number),
                    port_link=scope.link(f"{EXTERNAL_ROLE}{number}p"),
                    setup_link=scope.link(f"{EXTERNAL_ROLE}{number}i"),
                    interface=f"eth{number - 1}",
                    ip=str(uplink.ip),
                    router_ip=str(uplink.router_ip),
                )
                for number, uplink in enumerate(spec.uplinks, start=2)
            ),
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
        macs[EXTERNAL_ROLE] = scenario.external.mac or external_mac(scope)
    return macs


def topology_objects(
    scenario: Scenario, plan: LabPlan, macs: dict[str, str]
) -> list[TopologyObject]:
    """The topology the scenario describes, in an order the API accepts (referenced objects
    first): hosts, the tunnel zone, bridges and their subnets, routers (after their NAT chains) with their
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
    # One DHCP-enabled subnet per network; its gateway is the first router interface on it.
    gateways = {
        interface.network: interface.ip.ip
        for router in reversed(scenario.routers)
        for interface in reversed(router.interfaces)
    }
    objects.extend(
        Subnet.model_validate(
            {
                "id": subnet_id(network.name),
                "name": network.name,
                "tenant_id": network.tenant,
                "bridge_id": network.name,
                "cidr": network.subnet,
                "gateway_ip": gateways.get(network.name),
            }
        )
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
                # IPAM pins the scenario's address (and mirrors it into `addresses`).
                fixed_ips=(
                    FixedIp(
                        subnet_id=subnet_id(network.name),
                        ip_address=ipaddress.IPv4Interface(vm_plan.ip).ip,
                    ),
                ),
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
    uplinks = external.all_uplinks()
    objects: list[TopologyObject] = []
    group_ids: tuple[str, ...] = ()
    if len(uplinks) > 1:
        # A return packet may enter through another gateway than its flow left by.
        group_ids = (uplink_group_id(external.router),)
        objects.append(
            PortGroup(
                id=group_ids[0],
                name=f"{external.router} uplinks",
                tenant_id=tenant,
                stateful=True,
            )
        )
    for uplink in uplinks:
        addresses = [ipaddress.IPv4Interface(uplink.router_ip)]
        if spec.floating_gateway is not None:
            addresses.append(spec.floating_gateway)
        objects.append(
            Port(
                id=uplink.port_id,
                name=f"{external.router}-external-{uplink.host}",
                tenant_id=tenant,
                device_kind=DeviceKind.ROUTER,
                device_id=external.router,
                addresses=tuple(addresses),
                host_id=uplink.host,
                interface_name=uplink.port_link,
                port_group_ids=group_ids,
            )
        )
        if spec.bgp is not None:
            objects.append(
                BgpPeer(
                    id=bgp_peer_id(uplink.port_id),
                    name=f"{uplink.host} to the outside",
                    port_id=uplink.port_id,
                    local_as=spec.bgp.local_as,
                    peer_as=spec.bgp.peer_as,
                    peer_ip=ipaddress.IPv4Address(uplink.address),
                    hold_time=spec.bgp.hold_time,
                    advertise=() if spec.floating_range is None else (spec.floating_range,),
                )
            )
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
        snat_address = spec.snat_address
        for index, network in enumerate(spec.snat):
            objects.append(
                Rule(
                    id=snat_rule_id(external.router, network),
                    tenant_id=tenant,
                    chain_id=outbound,
                    position=10 + index,
                    action=RuleAction.SNAT,
                    nw_src=scenario.network(network).subnet,
                    out_port_ids=tuple(uplink.port_id for uplink in uplinks),
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


def external_mac(scope: LabScope) -> str:
    """A stable locally administered MAC for the external namespace of `scope`."""
    digest = hashlib.sha256(f"hivenet-lab-ext-{scope.tag}".encode()).digest()
    return ":".join(f"{byte:02x}" for byte in (0x02, *digest[:5]))
