"""The L2 gateway through real `HostAgent`s on the strict memory datapath: a bridge joined to
an external VTEP (a recorder on the memory underlay) and a port bound to a VLAN.

What each VM interface and the VTEP receive is asserted; the VTEP sends into any host."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from hivenet.datapath.memory import MemoryDatapath
from hivenet.model import Bridge, DeviceKind, Port
from hivenet.packets import build_arp_request, build_udp_datagram, extract_flow_match, push_vlan
from tests.integration.agent.test_agents import HOSTS, cloud, vm_port
from tests.integration.common import eventually, run

VTEP_IP, VNI = "192.0.2.200", 0xE00001
BM_MAC = "02:00:00:00:00:99"


class RecordingVtep:
    """The external VTEP on the memory underlay: keeps what it receives."""

    def __init__(self) -> None:
        self.received: list[tuple[int, bytes]] = []

    def receive_tunnel(self, tunnel_key: int, frame: bytes, *, source_ip: str) -> None:
        self.received.append((tunnel_key, frame))


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/state.db"


def from_bare_metal(dst_mac: str, port: int = 7) -> bytes:
    return build_udp_datagram(
        eth_src=BM_MAC,
        eth_dst=dst_mac,
        ip_src="10.0.0.99",
        ip_dst="10.0.0.1",
        src_port=port,
        dst_port=port,
        payload=b"bare metal",
    )


def test_a_bridge_joined_to_an_external_vtep_floods_to_it_and_takes_its_frames(
    store_url: str,
) -> None:
    async def scenario() -> None:
        async with cloud(store_url) as c:
            vtep = RecordingVtep()
            c.underlay.attach(VTEP_IP, vtep)  # type: ignore[arg-type]
            bridge = (await c.repo.create(Bridge(name="net1"))).obj
            vm1 = await vm_port(c.repo, bridge, "h1", "hnvm1", "02:00:00:00:00:01", "10.0.0.1/24")
            vtep_port = (
                await c.repo.create(
                    Port(
                        device_kind=DeviceKind.BRIDGE,
                        device_id=bridge.id,
                        vtep_ip=ipaddress.ip_address(VTEP_IP),
                        vtep_vni=VNI,
                    )
                )
            ).obj
            for host in ("h1", "h2"):
                await c.start_agent(host)
            await c.synced()
            for host in ("h1", "h2"):  # every host accepts the VTEP
                await eventually(lambda h=host: vtep_port.id in c.agents[h].bound_vteps)

            # vm1's broadcast reaches the VTEP straight from h1, with the VTEP's VNI.
            arp = build_arp_request(sender_mac=vm1.mac, sender_ip="10.0.0.1", target_ip="10.0.0.99")
            c.datapaths["h1"].receive(vm1.tunnel_key, arp)
            assert vtep.received == [(VNI, arp)]

            # The VTEP sends to h2 (any host): the frame enters net1 there and reaches vm1.
            frame = from_bare_metal(vm1.mac)
            c.underlay.send(VTEP_IP, HOSTS["h2"], VNI, frame)
            assert c.datapaths["h1"].take(vm1.tunnel_key) == [frame]
            # ... and the bridge learned the bare-metal MAC on the VTEP port: vm1 unicasts
            # to it straight to the VTEP.
            await c.synced()
            reply = build_udp_datagram(
                eth_src=vm1.mac,
                eth_dst=BM_MAC,
                ip_src="10.0.0.1",
                ip_dst="10.0.0.99",
                src_port=7,
                dst_port=7,
                payload=b"reply",
            )
            vtep.received.clear()
            c.datapaths["h1"].receive(vm1.tunnel_key, reply)
            assert vtep.received == [(VNI, reply)]

            # Another VNI from the VTEP's address is a stranger's.
            dropped = c.datapaths["h2"].counters().get("drop.tunnel_unknown_source", 0)
            c.underlay.send(VTEP_IP, HOSTS["h2"], VNI + 1, from_bare_metal(vm1.mac, 8))
            assert c.datapaths["h1"].take(vm1.tunnel_key) == []
            assert c.datapaths["h2"].counters()["drop.tunnel_unknown_source"] == dropped + 1

            # The port goes: no host accepts the VTEP any more.
            await c.repo.delete(Port, vtep_port.id)
            for host in ("h1", "h2"):
                await eventually(lambda h=host: not c.agents[h].bound_vteps)
            c.underlay.send(VTEP_IP, HOSTS["h2"], VNI, from_bare_metal(vm1.mac, 9))
            assert c.datapaths["h1"].take(vm1.tunnel_key) == []

    run(scenario())


def test_a_vlan_bound_port_untags_what_it_takes_and_tags_what_it_sends(store_url: str) -> None:
    async def scenario() -> None:
        async with cloud(store_url) as c:
            bridge = (await c.repo.create(Bridge(name="net1"))).obj
            vm1 = await vm_port(c.repo, bridge, "h1", "hnvm1", "02:00:00:00:00:01", "10.0.0.1/24")
            gateway = (
                await c.repo.create(
                    Port(
                        device_kind=DeviceKind.BRIDGE,
                        device_id=bridge.id,
                        host_id="h2",
                        interface_name="hngw1",
                        interface_vlan=100,
                    )
                )
            ).obj
            for host in ("h1", "h2"):
                await c.start_agent(host)
            await c.synced()
            await eventually(lambda: gateway.id in c.agents["h2"].bound_ports)
            h2: MemoryDatapath = c.datapaths["h2"]

            untagged = from_bare_metal(vm1.mac)
            h2.receive(gateway.tunnel_key, push_vlan(untagged, 100))
            assert c.datapaths["h1"].take(vm1.tunnel_key) == [untagged]
            for wrong in (untagged, push_vlan(from_bare_metal(vm1.mac, 8), 200)):
                h2.receive(gateway.tunnel_key, wrong)
            assert c.datapaths["h1"].take(vm1.tunnel_key) == []

            arp = build_arp_request(sender_mac=vm1.mac, sender_ip="10.0.0.1", target_ip="10.0.0.99")
            c.datapaths["h1"].receive(vm1.tunnel_key, arp)
            (sent,) = h2.take(gateway.tunnel_key)
            assert sent == push_vlan(arp, 100)
            assert extract_flow_match(sent, 0).vlan == 100

    run(scenario())


def test_a_vtep_at_a_hosts_underlay_address_is_not_accepted(store_url: str) -> None:
    """Its datagrams would be taken for the VTEP's and the host's own tunnel traffic lost."""

    async def scenario() -> None:
        async with cloud(store_url) as c:
            bridge = (await c.repo.create(Bridge(name="net1"))).obj
            await c.repo.create(
                Port(
                    device_kind=DeviceKind.BRIDGE,
                    device_id=bridge.id,
                    vtep_ip=ipaddress.ip_address(HOSTS["h2"]),
                    vtep_vni=VNI,
                )
            )
            for host in ("h1", "h2"):
                await c.start_agent(host)
            await c.synced()
            for host in ("h1", "h2"):
                agent = c.agents[host]
                await eventually(lambda a=agent: a.counters.bind_errors > 0)
                assert agent.bound_vteps == {}

    run(scenario())
