"""Health ports and namespaces kept by the agents themselves (`OverlayProbing`), in the memory
tier: real agents, store and simulation, a fake kernel side (`FakePlumbing`, which records the
namespaces it is asked for and answers probes from the members' up/down set).

Proven here: each probing host gets exactly one health port on the LB's router (deterministic
id, bound to its host and its veth, a /30 of the router's health subnet not used by any other
host), the agent binds it, probes run inside the namespace built for it and bring the
members online; a host that stops probing gives its port and namespace back; a
probe's SYN from the health address reaches the member unchanged and the member's SYN-ACK
comes back out of that host's health port (the router's connected route); the ports and
namespaces go when the monitor goes and when the agent stops. Plus the pure address rules.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from hivenet.agent.health import (
    HEALTH_BLOCKS_PER_ROUTER,
    HEALTH_PORT_ID_PREFIX,
    ProbeTarget,
    block_of,
    choose_health_block,
    health_block,
    health_port_id,
    health_subnet,
)
from hivenet.agent.health_ns import HealthNamespace, health_namespace_name, host_tag
from hivenet.model import DeviceKind, HealthMonitor, Host, OperatingStatus, Port
from hivenet.packets import build_arp_request, build_tcp_segment, extract_flow_match
from hivenet.store.topology import NotFoundError

from .harness import (
    HOSTS,
    SYN,
    SYN_ACK,
    VM_IPS,
    WEB_PORT,
    LbCloud,
    build,
    eventually,
    ip,
    lb_cloud,
    member_of,
    run,
)

MONITOR = {"delay": 1, "timeout": 1, "max_retries": 2, "max_retries_down": 2}
NAMESPACE_MAC = "02:00:00:00:aa:01"


class FakeNamespaceProber:
    def __init__(self, plumbing: FakePlumbing, spec: HealthNamespace) -> None:
        self.plumbing = plumbing
        self.spec = spec

    def can_probe(self, target: ProbeTarget) -> bool:
        return True

    async def probe(self, target: ProbeTarget) -> bool:
        assert self.plumbing.built.get(self.spec.namespace) == self.spec, "probe outside it"
        self.plumbing.probes.append((self.spec.namespace, target.member_id))
        return member_of(ip(target.address)) not in self.plumbing.down

    def close(self) -> None:
        self.plumbing.closed_probers += 1


class FakePlumbing:
    """The kernel side of one host: namespaces by name, the probes run in them."""

    def __init__(self, host_id: str, down: set[str]) -> None:
        self.host_tag = f"{list(HOSTS).index(host_id):04x}"
        self.down = down
        self.built: dict[str, HealthNamespace] = {}
        self.removed: list[str] = []
        self.probes: list[tuple[str, str]] = []
        self.closed_probers = 0

    def ensure(self, spec: HealthNamespace) -> None:
        self.built[spec.namespace] = spec

    def remove(self, namespace: str) -> None:
        if self.built.pop(namespace, None) is not None:
            self.removed.append(namespace)

    def existing(self) -> list[str]:
        return sorted(self.built)

    def prober(self, spec: HealthNamespace) -> FakeNamespaceProber:
        return FakeNamespaceProber(self, spec)


def health_ports(c: LbCloud) -> dict[str, Port]:
    """host -> its health port, as the agents' topology cache (of h5) sees them."""
    ports = {}
    for port in c.agents["h5"].topology.all("port"):
        if isinstance(port, Port) and port.id.startswith(HEALTH_PORT_ID_PREFIX):
            assert port.host_id is not None
            ports[port.host_id] = port
    return ports


def probing_hosts(c: LbCloud) -> set[str]:
    return {host for host, agent in c.agents.items() if agent.health.assignments()}


def test_agents_build_bind_probe_through_and_remove_their_health_ports(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with lb_cloud(tmp_path) as c:
            plumbings: dict[str, FakePlumbing] = {}

            def plumbing(host_id: str) -> FakePlumbing:
                plumbings[host_id] = FakePlumbing(host_id, c.down)
                return plumbings[host_id]

            # A port of a host that is not running appears on the block h1 prefers (and took):
            # "h0" sorts first, so it keeps the block and h1 moves to another one.
            subnet = health_subnet("r1")
            await c.repo.create(Host(id="h0", name="h0"))
            await build(c, monitor=MONITOR, plumbing=plumbing)
            preferred = choose_health_block("r1", "h1", ())
            assert preferred is not None
            await c.repo.create(
                Port(
                    id=health_port_id("r1", "h0"),
                    device_kind=DeviceKind.ROUTER,
                    device_id="r1",
                    addresses=(health_block(subnet, preferred)[0],),
                    host_id="h0",
                    interface_name="hnhmparked",
                )
            )
            await eventually(
                lambda: all(a.live_hosts | {h} == set(HOSTS) for h, a in c.agents.items())
            )
            probers = probing_hosts(c)
            assert probers and probers != set(HOSTS), probers

            def in_place() -> bool:
                ports = health_ports(c)
                blocks = [block_of(subnet, port) for port in ports.values()]
                return (
                    set(ports) == probers | {"h0"}
                    and None not in blocks
                    and len(set(blocks)) == len(blocks)
                    and all(c.datapaths[h].is_bound(ports[h].tunnel_key) for h in probers)
                    and all(
                        [p.interface_name for p in ports.values() if p.host_id == h]
                        == [s.host_link for s in plumbings[h].built.values()]
                        and [p.addresses[0].ip for p in ports.values() if p.host_id == h]
                        == [s.gateway for s in plumbings[h].built.values()]
                        for h in probers
                    )
                )

            await eventually(in_place)
            ports = health_ports(c)
            blocks = {h: block_of(subnet, port) for h, port in ports.items()}
            assert None not in blocks.values() and len(set(blocks.values())) == len(blocks)
            if "h1" in probers:
                assert blocks["h1"] != preferred and blocks["h0"] == preferred
            for host in probers:
                port = ports[host]
                (spec,) = plumbings[host].built.values()
                assert port.id == f"hm.r1.{host}" and port.device_id == "r1"
                assert port.interface_name == spec.host_link
                assert port.addresses == (ipaddress.IPv4Interface((spec.gateway, 30)),)
                assert spec.address.ip in subnet and spec.address.network.prefixlen == 30
                assert spec.namespace == health_namespace_name("r1", plumbings[host].host_tag)
            # (Hosts that probed while the others were still starting give theirs back.)
            await eventually(lambda: not any(plumbings[h].built for h in set(HOSTS) - probers))

            # Probes run in the namespaces, and bring every member online.
            await c.advance(4.0)
            await eventually(
                lambda: all(
                    c.agents["h5"].health.observed(f"web-{vm}") is OperatingStatus.ONLINE
                    for vm in ("m1", "m2", "m3")
                )
            )
            for host in probers:
                assert {namespace for namespace, _ in plumbings[host].probes} == set(
                    plumbings[host].built
                )

            await check_probe_round_trip(c, next(iter(sorted(probers))), plumbings)

            # The monitor goes: so do the ports (unbound) and the namespaces.
            old_keys = {h: ports[h].tunnel_key for h in probers}
            await c.repo.delete(HealthMonitor, "web-hm")
            await eventually(lambda: set(health_ports(c)) == {"h0"})
            await eventually(
                lambda: not any(c.datapaths[h].is_bound(k) for h, k in old_keys.items())
            )
            await eventually(lambda: not any(p.built for p in plumbings.values()))
            assert all(plumbings[h].removed for h in probers)

            # Back, then one prober stops: its port and namespace go with it.
            await c.repo.create(
                HealthMonitor.model_validate(
                    {"id": "web-hm", "pool_id": "web", "type": "tcp", **MONITOR}
                )
            )
            await eventually(in_place)
            host = sorted(probers)[0]
            await c.agents.pop(host).stop()
            assert not plumbings[host].built
            try:
                await c.repo.get(Port, health_port_id("r1", host))
                raise AssertionError(f"the health port of {host} outlived its agent")
            except NotFoundError:
                pass

    run(scenario())


async def check_probe_round_trip(c: LbCloud, host: str, plumbings: dict[str, FakePlumbing]) -> None:
    """Frames as the namespace would send them: ARP for the gateway, then a SYN to m1; m1's
    SYN-ACK to the health address leaves through this host's health port."""
    port = health_ports(c)[host]
    (spec,) = plumbings[host].built.values()
    datapath = c.datapaths[host]
    datapath.receive(
        port.tunnel_key,
        build_arp_request(
            sender_mac=NAMESPACE_MAC, sender_ip=str(spec.address.ip), target_ip=str(spec.gateway)
        ),
    )
    answers = [extract_flow_match(f, 0) for f in datapath.take(port.tunnel_key)]
    assert answers and answers[-1].arp_op == 2, answers
    router_mac = answers[-1].arp_sha
    await c.synced()
    c.received("m1")
    datapath.receive(
        port.tunnel_key,
        build_tcp_segment(
            eth_src=NAMESPACE_MAC,
            eth_dst=":".join(f"{(router_mac >> s) & 0xFF:02x}" for s in range(40, -1, -8)),
            ip_src=str(spec.address.ip),
            ip_dst=VM_IPS["m1"],
            src_port=40001,
            dst_port=WEB_PORT,
            flags=SYN,
        ),
    )
    (syn,) = c.received("m1")
    assert (syn.ip_src, syn.ip_dst, syn.tp_dst) == (int(spec.address.ip), ip(VM_IPS["m1"]), 8080)
    c.send(
        "m1",
        build_tcp_segment(
            eth_src=c.ports["m1"].mac,
            eth_dst=c.router_macs["m1"],
            ip_src=VM_IPS["m1"],
            ip_dst=str(spec.address.ip),
            src_port=WEB_PORT,
            dst_port=40001,
            flags=SYN_ACK,
        ),
    )
    back = [extract_flow_match(f, 0) for f in datapath.take(port.tunnel_key)]
    assert [(m.ip_src, m.ip_dst, m.tp_src, m.tcp_flags) for m in back] == [
        (ip(VM_IPS["m1"]), int(spec.address.ip), WEB_PORT, SYN_ACK)
    ], back
    assert back[0].eth_dst == int(NAMESPACE_MAC.replace(":", ""), 16)


# ---------------------------------------------------------------------------- pure rules

_IDS = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=64).map(
    lambda text: "r" + text[:63]
)


@settings(max_examples=200, deadline=None)
@given(router_id=_IDS, host_id=_IDS)
def test_health_addresses_ids_and_names_keep_their_bounds(router_id: str, host_id: str) -> None:
    subnet = health_subnet(router_id)
    assert subnet.subnet_of(ipaddress.IPv4Network("169.254.0.0/16"))
    assert subnet.prefixlen == 24 and subnet.network_address.packed[2] not in (0, 169, 255)
    port_id = health_port_id(router_id, host_id)
    assert port_id.startswith(HEALTH_PORT_ID_PREFIX) and len(port_id) <= 64
    assert port_id == health_port_id(router_id, host_id)
    Port(id=port_id, device_kind=DeviceKind.ROUTER, device_id=router_id)  # a valid id
    block = choose_health_block(router_id, host_id, ())
    assert block is not None
    router_side, namespace_side = health_block(subnet, block)
    assert router_side.network == namespace_side.network and router_side.network.prefixlen == 30
    assert router_side.ip != namespace_side.ip and router_side.ip in subnet
    spec = HealthNamespace.for_router(
        router_id, host_tag(host_id, 4026531840), namespace_side, router_side.ip
    )
    for name in (spec.namespace, spec.host_link, spec.inner_link):
        assert name.startswith("hn") and len(name) <= 15, name


def test_choose_health_block_skips_taken_blocks_and_reports_a_full_router() -> None:
    preferred = choose_health_block("r1", "h1", ())
    assert preferred is not None
    other = choose_health_block("r1", "h1", {preferred})
    assert other is not None and other != preferred
    assert choose_health_block("r1", "h1", range(HEALTH_BLOCKS_PER_ROUTER)) is None
    last_free = (preferred + 7) % HEALTH_BLOCKS_PER_ROUTER
    taken = set(range(HEALTH_BLOCKS_PER_ROUTER)) - {last_free}
    assert choose_health_block("r1", "h1", taken) == last_free
