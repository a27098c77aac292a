"""End-to-end: the L2 gateway on the default lab (net1: vm1 on h1, vm3 on h2), with two
"bare-metal servers" that run no HiveNet:

- bm1 sits behind an external VTEP: a namespace on the lab underlay (172.31.250.210) with a
  kernel VXLAN device (VNI `VNI`, learning, default destination h3) in a Linux bridge, and
  bm1's veth in that bridge. net1 has a VTEP port for it (vtep_ip, vtep_vni): every host
  tunnels bm1's frames straight to the VTEP, floods reach it by head-end replication, and
  what the VTEP sends to any host enters net1 there.
- bm2 sits behind VLAN `VLAN` on a veth whose other end is in gateway host h3; net1 has a
  port bound on h3 to that veth with interface_vlan=VLAN. The lab kernel has no VLAN
  devices, so bm2's side is an access-port relay (lab/traffic/vlan_access.py: bm2's own
  kernel stack on a TAP device; only frames tagged VLAN cross it, both ways). So every
  answer bm2 gets proves that HiveNet tagged its frames, and every frame of bm2's that
  reaches a VM that HiveNet took the tag off.

Each pings vm1 and vm3 and is pinged by them, and the two ping each other; before each
direction every neighbour cache is flushed, so each ping starts with an ARP request from its
sender, and the test reads the learned neighbour entries on both sides (ARP both ways).
Everything the test adds is named in the lab's scope and removed in a finally.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from hivenet.lab import netns
from hivenet.lab.lab import Lab
from hivenet.lab.probes import parse_ping, traffic_program
from hivenet.lab.scenario import builtin_scenario
from hivenet.model import DeviceKind, Port
from hivenet.store import open_store
from hivenet.store.topology import NotFoundError, TopologyRepository
from tests.e2e.common import running_lab

pytestmark = pytest.mark.e2e

VNI = 0xE0A001  # high in the tunnel-key space: no lab port has it
VLAN = 100
VTEP_INDEX = 210  # underlay 172.31.250.210, in no tunnel zone
BM1_IP, BM1_MAC = "10.0.1.50", "02:00:0a:00:01:32"
BM2_IP, BM2_MAC = "10.0.1.60", "02:00:0a:00:01:3c"
MTU = 1450  # net1's MTU (underlay 1500 less VXLAN)
VTEP_PORT_ID = "l2gw-vtep"
VLAN_PORT_ID = "l2gw-vlan"


@dataclass(frozen=True)
class Gateway:
    bm1: str  # namespaces
    bm2: str
    vtep: str
    vtep_ip: str
    vlan_port_link: str  # bm2's veth end in h3 (the port's interface_name)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(builtin_scenario("default"), tmp_path_factory.mktemp("l2gwlab")) as lab:
        yield lab


def write_ports(lab: Lab, ports: list[Port] | None) -> None:
    """Create `ports` (None: delete the test's ports) through the repository."""

    async def write() -> None:
        store = open_store(lab.store_url)
        try:
            repository = TopologyRepository(store)
            if ports is not None:
                for port in ports:
                    await repository.create(port)
                return
            for port_id in (VTEP_PORT_ID, VLAN_PORT_ID):
                with contextlib.suppress(NotFoundError):
                    await repository.delete(Port, port_id)
        finally:
            await store.close()

    asyncio.run(write())


@pytest.fixture(scope="module")
def gateway(lab: Lab) -> Iterator[Gateway]:
    scope = lab.scope
    h3 = lab.plan.host("h3")
    made_namespaces: list[str] = []
    relay: netns.NamespaceProcess | None = None
    try:
        # The external VTEP: kernel VXLAN + Linux bridge on the underlay, bm1 behind it.
        vtep = netns.add_host(scope, "vtep", VTEP_INDEX, lab.plan.bridge)
        made_namespaces.append(vtep.namespace)
        vxlan, bridge = scope.link("vx"), scope.link("vtbr")
        netns.create_vxlan(
            vxlan,
            vni=VNI,
            local_ip=vtep.underlay_ip,
            remote_ip=h3.underlay_ip,  # where its floods go (any HiveNet host would do)
            underlay_link=vtep.underlay_link,
            namespace=vtep.namespace,
            mtu=MTU,
            learning=True,
        )
        netns.create_bridge(bridge, mtu=MTU, namespace=vtep.namespace)
        netns.attach_to_bridge(vxlan, bridge, namespace=vtep.namespace)
        bm1 = scope.namespace("bm1")
        netns.create_namespace(bm1, ipv6=False)
        made_namespaces.append(bm1)
        bm1_link, bm1_bridge_end = scope.link("bm1i"), scope.link("bm1b")
        netns.create_veth(
            bm1_link, bm1_bridge_end, namespace=bm1, peer_namespace=vtep.namespace, mtu=MTU
        )
        netns.attach_to_bridge(bm1_bridge_end, bridge, namespace=vtep.namespace)
        netns.set_mac(bm1_link, BM1_MAC, namespace=bm1)
        netns.add_address(bm1_link, f"{BM1_IP}/24", namespace=bm1)
        # bm2 on VLAN 100 of a veth whose other end is in the gateway host h3. This kernel
        # has no VLAN devices, so bm2's "access switch port" is a relay (vlan_access): bm2's
        # own kernel stack on a TAP device, its frames tagged on the veth.
        bm2 = scope.namespace("bm2")
        netns.create_namespace(bm2, ipv6=False)
        made_namespaces.append(bm2)
        trunk, gateway_link, tap = scope.link("bm2i"), scope.link("bm2g"), scope.link("bm2t")
        netns.create_veth(trunk, gateway_link, namespace=bm2, peer_namespace=h3.namespace, mtu=MTU)
        relay = netns.start_in_namespace(
            bm2,
            [*traffic_program("vlan_access"), tap, trunk, str(VLAN)],
            label="vlanaccess",
            directory=lab.state_dir,
        )
        for _ in range(100):
            if tap in netns.list_links(tap, namespace=bm2):
                break
            time.sleep(0.05)
        netns.set_mac(tap, BM2_MAC, namespace=bm2)
        netns.add_address(tap, f"{BM2_IP}/24", namespace=bm2)
        netns.set_up(tap, namespace=bm2)
        write_ports(
            lab,
            [
                Port(
                    id=VTEP_PORT_ID,
                    name="bm1-vtep",
                    tenant_id="demo",
                    device_kind=DeviceKind.BRIDGE,
                    device_id="net1",
                    vtep_ip=vtep.underlay_ip,
                    vtep_vni=VNI,
                ),
                Port(
                    id=VLAN_PORT_ID,
                    name="bm2-vlan",
                    tenant_id="demo",
                    device_kind=DeviceKind.BRIDGE,
                    device_id="net1",
                    host_id="h3",
                    interface_name=gateway_link,
                    interface_vlan=VLAN,
                ),
            ],
        )
        yield Gateway(bm1, bm2, vtep.namespace, vtep.underlay_ip, gateway_link)
    finally:
        write_ports(lab, None)
        if relay is not None:
            relay.stop()
        for namespace in reversed(made_namespaces):
            netns.delete_namespace(namespace)  # takes the veth ends inside with it
        netns.delete_link(scope.link("vtepr"))


def namespace_of(lab: Lab, gateway: Gateway, name: str) -> str:
    return {"bm1": gateway.bm1, "bm2": gateway.bm2}.get(name) or lab.plan.namespace_of(name)


def ping(lab: Lab, gateway: Gateway, source: str, target: str, count: int = 3) -> bool:
    argv = ["ping", "-n", "-c", str(count), "-i", "0.1", "-W", "1", target]
    result = netns.run_in_namespace(
        namespace_of(lab, gateway, source), argv, timeout=30, check=False
    )
    return parse_ping(result.stdout + result.stderr, count).ok


def flush_neighbours(lab: Lab, gateway: Gateway, *names: str) -> None:
    for name in names:
        netns.run_in_namespace(namespace_of(lab, gateway, name), ["ip", "neigh", "flush", "all"])


def neighbour_mac(lab: Lab, gateway: Gateway, name: str, address: str) -> str | None:
    """The MAC `name` resolved `address` to (None: no usable entry)."""
    out = netns.run_in_namespace(
        namespace_of(lab, gateway, name), ["ip", "-4", "neigh", "show", address]
    ).stdout
    found = re.search(r"lladdr ([0-9a-f:]{17}) (REACHABLE|STALE|DELAY|PROBE)", out)
    return found.group(1) if found else None


def wait_reachable(lab: Lab, gateway: Gateway, source: str, target: str) -> None:
    """The first pings may meet the bindings still coming up (agents reconcile each second)."""
    for _ in range(20):
        if ping(lab, gateway, source, target, count=1):
            return
    counters = {
        host: {
            name: value
            for name, value in lab.fresh_agent_counters(host)["datapath"].items()
            if name.startswith(("drop.", "tunnel_", "upcalls"))
        }
        for host in ("h1", "h2", "h3")
    }
    pytest.fail(f"{source} never reached {target}; datapath counters: {counters}")


PAIRS = [
    ("bm1", "vm1"),  # VTEP <-> h1
    ("bm1", "vm3"),  # VTEP <-> h2
    ("bm2", "vm1"),  # VLAN on h3 <-> h1
    ("bm2", "vm3"),  # VLAN on h3 <-> h2
    ("bm1", "bm2"),  # VTEP <-> VLAN
]


def address_and_mac(lab: Lab, name: str) -> tuple[str, str]:
    if name == "bm1":
        return BM1_IP, BM1_MAC
    if name == "bm2":
        return BM2_IP, BM2_MAC
    return lab.plan.vm(name).address, lab.mac_of(name)


@pytest.mark.parametrize(("server", "vm"), PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_bare_metal_and_vm_ping_each_other_and_resolve_each_other_by_arp(
    lab: Lab, gateway: Gateway, server: str, vm: str
) -> None:
    server_ip, server_mac = address_and_mac(lab, server)
    vm_ip, vm_mac = address_and_mac(lab, vm)
    wait_reachable(lab, gateway, server, vm_ip)
    for source, target, target_ip, target_mac, source_ip, source_mac in (
        (server, vm, vm_ip, vm_mac, server_ip, server_mac),
        (vm, server, server_ip, server_mac, vm_ip, vm_mac),
    ):
        flush_neighbours(lab, gateway, server, vm)
        assert ping(lab, gateway, source, target_ip, count=5), f"{source} -> {target} lost pings"
        # The sender resolved the target by ARP, and the target learned the sender from it.
        assert neighbour_mac(lab, gateway, source, target_ip) == target_mac
        assert neighbour_mac(lab, gateway, target, source_ip) == source_mac


def test_the_vtep_learned_each_vm_at_its_own_host(lab: Lab, gateway: Gateway) -> None:
    """Unicast to a VM is tunnelled from the VM's own host, not relayed through h3: the
    kernel VTEP learned vm1's MAC behind h1 and vm3's behind h2."""
    for vm in ("vm1", "vm3"):
        wait_reachable(lab, gateway, "bm1", lab.plan.vm(vm).address)
    fdb = netns.run_in_namespace(
        gateway.vtep, ["bridge", "fdb", "show", "dev", lab.scope.link("vx")]
    ).stdout
    for vm, host in (("vm1", "h1"), ("vm3", "h2")):
        pattern = rf"{lab.mac_of(vm)} dst {re.escape(lab.plan.host(host).underlay_ip)}\b"
        assert re.search(pattern, fdb), f"{vm} not learned behind {host}:\n{fdb}"
