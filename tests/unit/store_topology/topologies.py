"""A small topology with one object of every kind, built through the repository."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from hivenet.model import (
    BgpPeer,
    Bridge,
    Chain,
    DeviceKind,
    Direction,
    FixedIp,
    FloatingIp,
    HealthMonitor,
    HealthMonitorType,
    Host,
    IpAddrGroup,
    Listener,
    LoadBalancer,
    Member,
    Pool,
    Port,
    PortGroup,
    Route,
    Router,
    Rule,
    RuleAction,
    SecurityGroup,
    SecurityGroupRule,
    Subnet,
    TunnelZone,
    TunnelZoneMember,
)
from hivenet.store.topology import TopologyRepository


@dataclass
class Net:
    host: Host
    chain: Chain
    jump_chain: Chain
    port_group: PortGroup
    ip_group: IpAddrGroup
    bridge: Bridge
    router: Router
    vm_port: Port  # bridge port bound to the host, in the port group, filtered by `chain`
    bridge_uplink: Port  # bridge side of the bridge-router link
    router_downlink: Port  # router side of the link
    router_uplink: Port
    route: Route  # via router_uplink
    rule: Rule  # in `chain`, matching vm_port and the ip group
    jump_rule: Rule  # in `jump_chain`, jumping to `chain`
    tunnel_zone: TunnelZone
    load_balancer: LoadBalancer  # on `router`
    pool: Pool
    listener: Listener  # default pool: `pool`
    member: Member
    health_monitor: HealthMonitor
    security_group: SecurityGroup
    security_group_rule: SecurityGroupRule  # remote group: its own group
    floating_ip: FloatingIp  # on `router`, to vm_port
    subnet: Subnet  # 10.0.0.0/24 on `bridge`; vm_port holds an address of it
    bgp_peer: BgpPeer  # the session of router_uplink with 192.0.2.1


async def build(repo: TopologyRepository) -> Net:
    host = (await repo.create(Host(name="hn-host1"))).obj
    chain = (await repo.create(Chain(name="sg"))).obj
    jump_chain = (await repo.create(Chain(name="pre"))).obj
    port_group = (await repo.create(PortGroup(name="web", stateful=True))).obj
    ip_group = (await repo.create(IpAddrGroup(addresses=(ipaddress.ip_address("10.0.0.5"),)))).obj
    bridge = (await repo.create(Bridge(name="net1", inbound_chain_id=chain.id))).obj
    router = (await repo.create(Router(name="r1", outbound_chain_id=chain.id))).obj
    subnet = (
        await repo.create(Subnet(bridge_id=bridge.id, cidr=ipaddress.ip_network("10.0.0.0/24")))
    ).obj
    vm_port = (
        await repo.create(
            Port(
                device_kind=DeviceKind.BRIDGE,
                device_id=bridge.id,
                host_id=host.id,
                interface_name="hn-tap0",
                port_group_ids=(port_group.id,),
                outbound_chain_id=chain.id,
                fixed_ips=(FixedIp(subnet_id=subnet.id),),
            )
        )
    ).obj
    bridge_uplink = (
        await repo.create(Port(device_kind=DeviceKind.BRIDGE, device_id=bridge.id))
    ).obj
    router_downlink = (
        await repo.create(
            Port(
                device_kind=DeviceKind.ROUTER,
                device_id=router.id,
                addresses=(ipaddress.ip_interface("10.0.0.1/24"),),
                peer_id=bridge_uplink.id,
            )
        )
    ).obj
    router_uplink = (
        await repo.create(
            Port(
                device_kind=DeviceKind.ROUTER,
                device_id=router.id,
                addresses=(ipaddress.ip_interface("192.0.2.2/24"),),
            )
        )
    ).obj
    route = (
        await repo.create(
            Route(
                router_id=router.id,
                dst_prefix=ipaddress.ip_network("0.0.0.0/0"),
                next_hop_port_id=router_uplink.id,
                next_hop_gateway=ipaddress.ip_address("192.0.2.1"),
            )
        )
    ).obj
    rule = (
        await repo.create(
            Rule(
                chain_id=chain.id,
                action=RuleAction.DROP,
                in_port_ids=(vm_port.id,),
                ip_addr_group_src_id=ip_group.id,
            )
        )
    ).obj
    jump_rule = (
        await repo.create(
            Rule(chain_id=jump_chain.id, action=RuleAction.JUMP, jump_chain_id=chain.id)
        )
    ).obj
    tunnel_zone = (
        await repo.create(
            TunnelZone(
                members=(
                    TunnelZoneMember(
                        host_id=host.id, underlay_ip=ipaddress.ip_address("172.16.0.1")
                    ),
                )
            )
        )
    ).obj
    load_balancer = (await repo.create(LoadBalancer(router_id=router.id))).obj
    pool = (await repo.create(Pool(load_balancer_id=load_balancer.id))).obj
    listener = (
        await repo.create(
            Listener(
                load_balancer_id=load_balancer.id,
                vip_address=ipaddress.ip_address("192.0.2.10"),
                protocol_port=80,
                default_pool_id=pool.id,
            )
        )
    ).obj
    member = (
        await repo.create(
            Member(pool_id=pool.id, address=ipaddress.ip_address("10.0.0.5"), protocol_port=8080)
        )
    ).obj
    health_monitor = (
        await repo.create(HealthMonitor(pool_id=pool.id, type=HealthMonitorType.TCP))
    ).obj
    security_group = (await repo.create(SecurityGroup(name="web"))).obj
    security_group_rule = (
        await repo.create(
            SecurityGroupRule(
                security_group_id=security_group.id,
                direction=Direction.INGRESS,
                protocol=6,
                port_range_min=80,
                port_range_max=80,
                remote_group_id=security_group.id,
            )
        )
    ).obj
    floating_ip = (
        await repo.create(
            FloatingIp(
                floating_ip_address=ipaddress.ip_address("192.0.2.50"),
                router_id=router.id,
                port_id=vm_port.id,
            )
        )
    ).obj
    bgp_peer = (
        await repo.create(
            BgpPeer(
                port_id=router_uplink.id,
                local_as=65001,
                peer_as=65000,
                peer_ip=ipaddress.ip_address("192.0.2.1"),
            )
        )
    ).obj
    # The link is symmetric: re-read the bridge side.
    bridge_uplink = (await repo.get(Port, bridge_uplink.id)).obj
    return Net(
        host,
        chain,
        jump_chain,
        port_group,
        ip_group,
        bridge,
        router,
        vm_port,
        bridge_uplink,
        router_downlink,
        router_uplink,
        route,
        rule,
        jump_rule,
        tunnel_zone,
        load_balancer,
        pool,
        listener,
        member,
        health_monitor,
        security_group,
        security_group_rule,
        floating_ip,
        subnet,
        bgp_peer,
    )
