"""The pipeline hands a VM's packets for 169.254.169.254 to the host's metadata service
(agent/metadata.py) every time, even after the same VM's other traffic installed
megaflows, and only once the host runs it (`FlowPipeline.set_handoff`)."""

from __future__ import annotations

from hivenet.sim.topology import PortInfo
from tests.integration.sim.harness import Cloud
from tests.unit.sim.topo import Topo, port_mac, tcp


def test_service_packets_reach_the_service_every_time_and_nothing_else_does() -> None:
    cloud = Cloud(["h1"])
    topo = Topo()
    topo.bridge("b1")
    topo.vm_port("b1", "vm1", "h1", mac_n=1, addresses=("10.0.1.10/24",))
    topo.vm_port("b1", "vm2", "h1", mac_n=2, addresses=("10.0.1.20/24",))
    cloud.apply(*topo.objects)
    handed: list[tuple[str, str, bytes]] = []

    def take(service: str, port: PortInfo, frame: bytes) -> None:
        handed.append((service, port.id, frame))

    cloud.pipelines["h1"].set_handoff(take)
    vm1, vm2 = port_mac(topo, "vm1"), port_mac(topo, "vm2")
    to_service = tcp(vm1, vm2, "10.0.1.10", "169.254.169.254", dport=80)
    to_vm2 = tcp(vm1, vm2, "10.0.1.10", "10.0.1.20", dport=80)
    cloud.send("vm2", tcp(vm2, vm1, "10.0.1.20", "10.0.1.10", sport=80, dport=40000))
    cloud.received("vm1")
    for _ in range(3):
        cloud.send("vm1", to_vm2)  # a megaflow vm1 -> vm2 (by MAC) is installed and hit
    assert len(cloud.received("vm2")) == 3
    for _ in range(2):
        cloud.send("vm1", to_service)  # same MACs: only ip_dst tells it apart
    assert handed == [("metadata", "vm1", to_service)] * 2
    assert cloud.received("vm2") == []

    cloud.pipelines["h1"].set_handoff(None)  # a host without the service
    cloud.advance(120)  # the old megaflows expire
    cloud.send("vm1", to_service)
    assert len(handed) == 2 and len(cloud.received("vm2")) == 1  # bridged like any frame
