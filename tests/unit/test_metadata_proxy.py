"""The metadata service's pure parts (agent/metadata.py): per-port link-local addresses,
the packet rewrites both ways (checked with scapy as an independent oracle), the documents
and the HTTP layouts (OpenStack and EC2) a VM reads, only ever its own."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from starlette.testclient import TestClient

from hivenet.agent.metadata import (
    AddressBook,
    Instance,
    instance_of,
    metadata_app,
    to_server,
    to_vm,
)
from hivenet.model import FixedIp, InstanceMetadata, Subnet
from hivenet.sim import TopologyView
from hivenet.sim.metadata import METADATA_MAC
from tests.unit.sim.topo import Topo

VM_IP = "10.0.1.20"
SERVER = ipaddress.IPv4Address("169.254.64.1")


def test_addresses_are_per_port_stable_and_reused_only_from_ports_that_left() -> None:
    book = AddressBook(ipaddress.IPv4Network("169.254.64.0/29"))  # 6 hosts: server + 5
    assert book.server == SERVER
    first = book.address_of("p1", lambda _p: True)
    assert book.address_of("p1", lambda _p: True) == first != SERVER
    taken = {book.address_of(f"p{n}", lambda _p: True) for n in range(2, 6)}
    assert len(taken | {first}) == 5 and SERVER not in taken
    with pytest.raises(LookupError, match="every address is in use"):
        book.address_of("p6", lambda _p: True)
    reused = book.address_of("p6", lambda p: p != "p3")  # p3 left the topology
    assert book.port_of(reused) == "p6" and book.port_of(first) == "p1"
    with pytest.raises(ValueError, match="too small"):
        AddressBook(ipaddress.IPv4Network("169.254.64.0/31"))


def _syn() -> bytes:
    return bytes(
        Ether(src="02:00:00:00:0a:01", dst="fa:16:3e:a9:fe:fe")
        / IP(src=VM_IP, dst="169.254.169.254", ttl=64)
        / TCP(sport=40000, dport=80, flags="S", seq=1)
    )


def test_packets_are_rewritten_both_ways_with_valid_checksums() -> None:
    mapped = ipaddress.IPv4Address("169.254.64.2")
    packet = to_server(_syn(), mapped, SERVER)
    assert packet is not None
    request = IP(packet)
    assert (request.src, request.dst, request[TCP].dport) == (str(mapped), str(SERVER), 80)
    recomputed = IP(bytes(request.__class__(packet)))
    del recomputed.chksum, recomputed[TCP].chksum
    again = IP(bytes(recomputed))
    assert (again.chksum, again[TCP].chksum) == (request.chksum, request[TCP].chksum)

    answer = bytes(IP(src=str(SERVER), dst=str(mapped)) / TCP(sport=80, dport=40000, flags="SA"))
    frame = to_vm(
        answer,
        vm_ip=int(ipaddress.IPv4Address(VM_IP)),
        vm_mac=0x0200_0000_0A01,
        service_mac=METADATA_MAC,
    )
    assert frame is not None
    reply = Ether(frame)
    assert (reply.src, reply.dst) == ("fa:16:3e:a9:fe:fe", "02:00:00:00:0a:01")
    assert (reply[IP].src, reply[IP].dst) == ("169.254.169.254", VM_IP)
    fresh = reply.copy()
    del fresh[IP].chksum, fresh[TCP].chksum
    fresh = Ether(bytes(fresh))
    assert (fresh[IP].chksum, fresh[TCP].chksum) == (reply[IP].chksum, reply[TCP].chksum)


def test_what_is_not_ipv4_is_refused() -> None:
    arp_frame = b"\xff" * 12 + b"\x08\x06" + b"\0" * 28
    assert to_server(arp_frame, SERVER, SERVER) is None
    assert to_vm(b"\x60" + b"\0" * 39, vm_ip=1, vm_mac=1, service_mac=1) is None


def _topology(metadata: InstanceMetadata | None = None, name: str = "vm1") -> TopologyView:
    topo = Topo()
    topo.bridge("b1", mtu=1400)
    topo.add(
        Subnet.model_validate(
            {
                "id": "s1",
                "bridge_id": "b1",
                "cidr": "10.0.1.0/24",
                "dns_nameservers": ["10.0.1.53"],
                "host_routes": [{"destination": "192.168.0.0/16", "nexthop": "10.0.1.254"}],
            }
        )
    )
    fixed = (FixedIp(subnet_id="s1", ip_address=ipaddress.IPv4Address(VM_IP)),)
    port = topo.vm_port(
        "b1", "vm1", mac_n=0xA01, addresses=(f"{VM_IP}/24",), fixed_ips=fixed, metadata=metadata
    )
    if name != "vm1":
        topo.objects.remove(port)
        topo.add(port.model_copy(update={"name": name}))
    topo.vm_port("b1", "vm2", mac_n=0xA02, addresses=("10.0.1.30/24",))
    return topo.view()


KEYS = {"alice": "ssh-ed25519 AAAAC3Nz alice@example", "bob": "ssh-rsa AAAAB3 bob@example"}


def _instance(view: TopologyView, port_id: str = "vm1") -> Instance:
    return instance_of(view, view.ports[port_id], 1500)


def test_documents_follow_the_port_and_fall_back_to_sensible_defaults() -> None:
    view = _topology(InstanceMetadata(instance_id="i-1", hostname="web-1", public_keys=KEYS))
    instance = _instance(view)
    assert (instance.instance_id, instance.hostname, instance.local_ipv4) == ("i-1", "web-1", VM_IP)
    assert instance.mtu == 1400 and instance.user_data is None
    plain = _instance(_topology(name=""))
    assert (plain.instance_id, plain.hostname) == ("vm1", "host-10-0-1-20")
    assert _instance(_topology()).hostname == "vm1"  # the port's name


def _client(view: TopologyView, owner: dict[str, str]) -> TestClient:
    def lookup(address: str) -> Instance | None:
        port_id = owner.get(address)
        return _instance(view, port_id) if port_id else None

    return TestClient(metadata_app(lookup), client=("169.254.64.2", 40000))


def test_openstack_layout() -> None:
    view = _topology(
        InstanceMetadata(
            instance_id="i-1", hostname="web-1", public_keys=KEYS, user_data="#!/bin/sh\necho hi\n"
        )
    )
    client = _client(view, {"169.254.64.2": "vm1"})
    assert "latest" in client.get("/openstack").text.split("\n")
    assert "user_data" in client.get("/openstack/latest/").text.split("\n")
    meta = client.get("/openstack/latest/meta_data.json").json()
    assert meta["uuid"] == "i-1" and meta["hostname"] == "web-1" and meta["public_keys"] == KEYS
    assert {k["name"] for k in meta["keys"]} == set(KEYS)
    assert client.get("/openstack/2012-08-10/meta_data.json").json()["uuid"] == "i-1"
    assert client.get("/openstack/latest/user_data").text == "#!/bin/sh\necho hi\n"
    network = client.get("/openstack/latest/network_data.json").json()
    (link,) = network["links"]
    assert link["mtu"] == 1400 and link["ethernet_mac_address"] == str(view.ports["vm1"].port.mac)
    (net,) = network["networks"]
    assert (
        net["ip_address"] == VM_IP
        and net["type"] == "ipv4_dhcp"
        and net["netmask"] == "255.255.255.0"
    )
    assert {"network": "192.168.0.0", "netmask": "255.255.0.0", "gateway": "10.0.1.254"} in net[
        "routes"
    ]
    assert {"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.0.1.1"} in net["routes"]
    assert network["services"] == [{"type": "dns", "address": "10.0.1.53"}]
    assert client.get("/openstack/latest/vendor_data.json").json() == {}
    assert client.get("/openstack/nonsense/meta_data.json").status_code == 404
    assert client.get("/openstack/latest/secrets").status_code == 404


def test_ec2_layout() -> None:
    view = _topology(InstanceMetadata(instance_id="i-1", hostname="web-1", public_keys=KEYS))
    client = _client(view, {"169.254.64.2": "vm1"})
    index = client.get("/latest/meta-data/").text.split("\n")
    assert {"instance-id", "hostname", "local-ipv4", "public-keys/", "placement/"} <= set(index)
    assert client.get("/latest/meta-data/instance-id").text == "i-1"
    assert client.get("/2009-04-04/meta-data/local-ipv4").text == VM_IP
    assert client.get("/latest/meta-data/public-keys/").text == "0=alice\n1=bob"
    assert client.get("/latest/meta-data/public-keys/0/").text == "openssh-key"
    assert client.get("/latest/meta-data/public-keys/1/openssh-key").text == KEYS["bob"]
    assert client.get("/latest/meta-data/placement/availability-zone").text == "nova"
    assert client.get("/latest/user-data").status_code == 404  # none set
    assert client.get("/latest/meta-data/nothing-here").status_code == 404


def test_an_address_without_an_instance_reads_nothing() -> None:
    view = _topology(InstanceMetadata(instance_id="i-1", user_data="secret"))
    stranger = _client(view, {"169.254.64.9": "vm1"})  # someone else's mapped address
    for path in (
        "/",
        "/openstack/latest/meta_data.json",
        "/latest/user-data",
        "/latest/meta-data/",
    ):
        response = stranger.get(path)
        assert response.status_code == 404 and "secret" not in response.text
    neighbour = _client(view, {"169.254.64.2": "vm2"})
    assert neighbour.get("/latest/meta-data/instance-id").text == "vm2"
    assert neighbour.get("/latest/user-data").status_code == 404
