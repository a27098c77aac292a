"""Floating IPs (1:1 NAT, ARP on the uplink, hairpin), security groups (stateful, remote
group) and port security (spoofed MAC/IP/ARP/DHCP dropped and counted), with real agents over
the memory datapath (see harness.py for the topology)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from hivenet.model import (
    AllowedAddressPair,
    Direction,
    FloatingIp,
    Port,
    SecurityGroup,
    SecurityGroupRule,
)
from hivenet.packets import (
    build_arp_reply,
    build_arp_request,
    build_tcp_segment,
    build_udp_datagram,
)
from tests.integration.stateful.harness import (
    ACK,
    OUT_A_IP,
    SYN,
    VM_IPS,
    StatefulCloud,
    build_provider,
    eventually,
    run,
    stateful_cloud,
)

FLOATING = "203.0.113.50"


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def tcp_from(
    c: StatefulCloud,
    vm: str,
    dst: str,
    sport: int,
    dport: int,
    flags: int,
    src: str | None = None,
    eth_src: str | None = None,
) -> bytes:
    """A TCP segment from `vm`: to a neighbour on its subnet directly, else via the router."""
    neighbour = next(
        (
            p
            for v, p in c.ports.items()
            if VM_IPS[v] == dst and v.startswith("vm") and vm.startswith("vm")
        ),
        None,
    )
    eth_dst = neighbour.mac if neighbour is not None else c.router_macs[vm]
    return build_tcp_segment(
        eth_src=eth_src or c.ports[vm].mac,
        eth_dst=eth_dst,
        ip_src=src or VM_IPS[vm],
        ip_dst=dst,
        src_port=sport,
        dst_port=dport,
        flags=flags,
    )


async def setup(c: StatefulCloud, **kwargs: object) -> None:
    await build_provider(c, **kwargs)  # type: ignore[arg-type]
    await c.repo.create(
        FloatingIp(
            id="fip2",
            floating_ip_address=ipaddress.ip_address(FLOATING),
            router_id="r1",
            port_id="vm2",
        )
    )
    await c.start_all()


def test_floating_ip_inbound_outbound_arp_and_hairpin(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await setup(c)
            # The router answers ARP for the floating address on its uplink.
            out = c.ports["out-a"]
            c.send(
                "out-a",
                build_arp_request(sender_mac=out.mac, sender_ip=OUT_A_IP, target_ip=FLOATING),
            )
            (answer,) = c.received("out-a")
            assert answer.arp_op == 2 and answer.arp_spa == ip(FLOATING)

            # Outside -> floating IP reaches vm2 at its fixed address, ports kept.
            c.send("out-a", tcp_from(c, "out-a", FLOATING, 5555, 22, SYN))
            (inbound,) = c.received("vm2")
            assert (inbound.ip_src, inbound.ip_dst) == (ip(OUT_A_IP), ip(VM_IPS["vm2"]))
            assert (inbound.tp_src, inbound.tp_dst) == (5555, 22)
            # vm2's reply leaves as the floating IP (reverse DNAT on h2, state pushed by h3).
            c.send("vm2", tcp_from(c, "vm2", OUT_A_IP, 22, 5555, SYN | ACK))
            (reply,) = c.received("out-a")
            assert (reply.ip_src, reply.tp_src) == (ip(FLOATING), 22)
            assert reply.ip_dst == ip(OUT_A_IP) and reply.tp_dst == 5555

            # vm2 opening a connection to the outside uses its floating IP (1:1, port kept).
            c.send("vm2", tcp_from(c, "vm2", OUT_A_IP, 6000, 443, SYN))
            (outbound,) = c.received("out-a")
            assert (outbound.ip_src, outbound.tp_src) == (ip(FLOATING), 6000)

            # Hairpin: vm1 reaches vm2 through the floating IP; vm2 sees the router's address
            # (so its reply comes back through the router) and vm1 sees the floating IP.
            # h1 leased a port block of the hairpin address 10.0.0.1 when it started (its vm1
            # is behind r1): the very first SYN goes through.
            c.send("vm1", tcp_from(c, "vm1", FLOATING, 7000, 22, SYN))
            (hair,) = c.received("vm2")
            assert "nat_ports_exhausted" not in c.drops("h1")
            assert hair.ip_dst == ip(VM_IPS["vm2"]) and hair.tp_dst == 22
            assert hair.ip_src == ip("10.0.0.1")
            c.send("vm2", tcp_from(c, "vm2", "10.0.0.1", 22, hair.tp_src, SYN | ACK))
            (pin,) = c.received("vm1")
            assert (pin.ip_src, pin.tp_src) == (ip(FLOATING), 22)
            assert (pin.ip_dst, pin.tp_dst) == (ip(VM_IPS["vm1"]), 7000)

            # Disassociating the floating IP stops DNAT at once (flows invalidated by tag).
            await c.repo.delete(FloatingIp, "fip2")
            await eventually(
                lambda: all(
                    a.topology.get("floating_ip", "fip2") is None for a in c.agents.values()
                )
            )
            c.send("out-a", tcp_from(c, "out-a", FLOATING, 5555, 22, ACK))
            assert c.received("vm2") == []

    run(scenario())


def test_security_group_allows_listed_drops_rest_and_passes_replies(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            repo = c.repo
            await repo.create(SecurityGroup(id="ssh-only"))
            await repo.create(
                SecurityGroupRule(
                    security_group_id="ssh-only",
                    direction=Direction.INGRESS,
                    protocol=6,
                    port_range_min=22,
                    port_range_max=22,
                )
            )
            await setup(
                c,
                vm_port_fields={
                    "vm2": {"port_security_enabled": True, "security_group_ids": ("ssh-only",)}
                },
            )
            # Allowed: ssh in through the floating IP; the SYN-ACK (no egress rule at all)
            # passes as the reply of a tracked connection; so does the rest of the stream.
            c.send("out-a", tcp_from(c, "out-a", FLOATING, 5555, 22, SYN))
            assert len(c.received("vm2")) == 1
            c.send("vm2", tcp_from(c, "vm2", OUT_A_IP, 22, 5555, SYN | ACK))
            assert len(c.received("out-a")) == 1
            c.send("out-a", tcp_from(c, "out-a", FLOATING, 5555, 22, ACK))
            c.send("vm2", tcp_from(c, "vm2", OUT_A_IP, 22, 5555, ACK))
            assert len(c.received("vm2")) == 1 and len(c.received("out-a")) == 1
            # Everything else is dropped, and counted as such.
            c.send("out-a", tcp_from(c, "out-a", FLOATING, 5556, 23, SYN))
            assert c.received("vm2") == []
            assert c.drops("h3").get("security_group") == 1
            c.send("vm2", tcp_from(c, "vm2", OUT_A_IP, 7000, 80, SYN))  # new, outbound
            assert c.received("out-a") == []
            assert c.drops("h2").get("security_group") == 1
            # A lone mid-stream segment opens nothing; a later SYN of the same 5-tuple
            # still does (the mid-stream drop was not cached as "no connection").
            c.send("out-a", tcp_from(c, "out-a", FLOATING, 5600, 22, ACK))
            c.send("out-a", tcp_from(c, "out-a", FLOATING, 5600, 22, SYN))
            assert len(c.received("vm2")) == 2  # both allowed by the ssh rule
            c.send("vm2", tcp_from(c, "vm2", OUT_A_IP, 22, 5600, SYN | ACK))
            assert len(c.received("out-a")) == 1
            # The chain is visible in the trace.
            trace = c.agents["h2"].pipeline.last_result.format_trace()  # type: ignore[union-attr]
            assert "sg-in.vm2" in trace and "conntrack" in trace

            # A rule change recompiles vm2's chain and invalidates its flows: port 23 opens.
            await repo.create(
                SecurityGroupRule(
                    security_group_id="ssh-only",
                    direction=Direction.INGRESS,
                    protocol=6,
                    port_range_min=23,
                    port_range_max=23,
                    remote_ip_prefix=ipaddress.ip_network("203.0.113.0/24"),
                )
            )
            await c.synced()
            c.send("out-a", tcp_from(c, "out-a", FLOATING, 5556, 23, SYN))
            assert len(c.received("vm2")) == 1

    run(scenario())


def test_remote_group_membership_follows_ports(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            repo = c.repo
            await repo.create(SecurityGroup(id="web"))
            await repo.create(SecurityGroup(id="clients"))
            await repo.create(
                SecurityGroupRule(
                    security_group_id="web",
                    direction=Direction.INGRESS,
                    protocol=6,
                    port_range_min=80,
                    port_range_max=80,
                    remote_group_id="clients",
                )
            )
            open_egress = {"security_group_id": "clients", "direction": Direction.EGRESS}
            await repo.create(SecurityGroupRule(**open_egress))  # type: ignore[arg-type]
            await setup(
                c,
                vm_port_fields={
                    "vm2": {"port_security_enabled": True, "security_group_ids": ("web",)},
                },
            )
            c.send(
                "vm1",
                tcp_from(
                    c,
                    "vm1",
                    VM_IPS["vm2"],
                    1234,
                    80,
                    SYN,
                ),
            )
            assert c.received("vm2") == []  # vm1 is not in "clients" yet
            await repo.modify(
                Port,
                "vm1",
                lambda p: p.model_copy(
                    update={"port_security_enabled": True, "security_group_ids": ("clients",)}
                ),
            )
            await c.synced()
            c.send("vm1", tcp_from(c, "vm1", VM_IPS["vm2"], 1234, 80, SYN))
            assert len(c.received("vm2")) == 1

    run(scenario())


def test_spoofed_frames_are_dropped_and_counted(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await c.repo.create(SecurityGroup(id="open"))
            for direction in Direction:
                await c.repo.create(
                    SecurityGroupRule(security_group_id="open", direction=direction)
                )
            pair = AllowedAddressPair(ip_address=ipaddress.ip_network("10.0.0.200/32"))
            await setup(
                c,
                vm_port_fields={
                    "vm1": {
                        "port_security_enabled": True,
                        "security_group_ids": ("open",),
                        "allowed_address_pairs": (pair,),
                    }
                },
            )
            vm1 = c.ports["vm1"]
            legit = tcp_from(c, "vm1", OUT_A_IP, 1000, 80, SYN)
            c.send("vm1", legit)
            assert c.drops("h1").get("spoofed_mac") is None
            c.send(
                "vm1", tcp_from(c, "vm1", VM_IPS["vm2"], 1000, 80, SYN, eth_src="02:00:00:00:00:99")
            )
            c.send("vm1", tcp_from(c, "vm1", VM_IPS["vm2"], 1000, 80, SYN, src="10.0.0.99"))
            c.send(
                "vm1",
                build_arp_reply(
                    sender_mac=vm1.mac,
                    sender_ip="10.0.0.12",
                    target_mac=c.router_macs["vm1"],
                    target_ip="10.0.0.1",
                ),
            )
            c.send(
                "vm1",
                build_udp_datagram(
                    eth_src=vm1.mac,
                    eth_dst="ff:ff:ff:ff:ff:ff",
                    ip_src=VM_IPS["vm1"],
                    ip_dst="255.255.255.255",
                    src_port=67,
                    dst_port=68,
                ),
            )
            # The allowed address pair may be used.
            c.send("vm1", tcp_from(c, "vm1", VM_IPS["vm2"], 1000, 80, SYN, src="10.0.0.200"))
            received = c.received("vm2")
            assert [m.ip_src for m in received] == [ip("10.0.0.200")]
            drops = c.drops("h1")
            for reason in ("spoofed_mac", "spoofed_ip", "spoofed_arp", "spoofed_dhcp_server"):
                assert drops.get(reason) == 1, drops
            # Repeats are served by cached drop flows and counted by the datapath.
            c.send("vm1", tcp_from(c, "vm1", VM_IPS["vm2"], 1000, 80, SYN, src="10.0.0.99"))
            assert c.datapaths["h1"].counters().get("drop.flow_spoofed_ip", 0) >= 1

    run(scenario())
