"""The metadata service of one host: `http://169.254.169.254/` for the VMs of its ports.

The simulation hands this host every packet a local VM port sends to the service address
(sim/metadata.py; `SimulationResult.handoff == "metadata"`). `MetadataProxy` gives each
such port its own address in a link-local range (`METADATA_NETWORK`, 169.254.64.0/18 by
default; a MidoNet idea), rewrites the packet to come from that address and go to the
server's, and writes it into a TUN device (`hnmd0`) in the agent's namespace, where the
kernel's TCP stack and an HTTP server bound to the server address (`metadata_app`, served
by uvicorn on the agent's event loop) take it. Replies come out of the TUN device, are
rewritten back (from 169.254.169.254 to the VM's address, from the MAC the VM sent to) and
delivered to the port through the datapath. The server knows the port by the client
address alone: a VM can only ever read the documents of its own port, whatever it puts in
its packets (and a source address that is not the port's own gets nothing).

Documents come from the stored port, read on each request (change the port's `metadata`
through the API and the next request sees it): the OpenStack layout
(`/openstack/<version>/meta_data.json`, `user_data`, `network_data.json`,
`vendor_data.json`) and the EC2 layout (`/<version>/meta-data/...`, `/<version>/user-data`).
No upstream (Nova) proxy: the port is the source of truth.

The TUN device is not persistent: it goes away with the agent, even after kill -9.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from hivenet.datapath.base import Datapath
from hivenet.flows.actions import Output
from hivenet.model import Port, Subnet
from hivenet.model.subnet import overlay_mtu
from hivenet.packets import rewrite_frame
from hivenet.sim.metadata import METADATA_ADDRESS, METADATA_TCP_PORT
from hivenet.sim.topology import PortInfo, TopologyView

log = logging.getLogger(__name__)

METADATA_NETWORK = ipaddress.IPv4Network("169.254.64.0/18")
METADATA_DEVICE = "hnmd0"
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_ETH_TYPE_IPV4 = b"\x08\x00"
_READ_BATCH = 64
OPENSTACK_VERSIONS = (
    "2012-08-10",
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2017-02-22",
    "2018-08-27",
    "latest",
)
EC2_VERSIONS = ("1.0", "2007-01-19", "2009-04-04", "latest")


# --- addresses -------------------------------------------------------------------------------


class AddressBook:
    """One address of `network` per port that spoke to the service (the server keeps the
    first host address). Ports that left the topology give theirs back when the range runs
    out."""

    def __init__(self, network: ipaddress.IPv4Network = METADATA_NETWORK) -> None:
        if network.prefixlen > 30:
            raise ValueError(f"metadata network: {network} is too small (at most /30)")
        self.network = network
        self.server = network.network_address + 1
        self._by_port: dict[str, ipaddress.IPv4Address] = {}
        self._by_address: dict[ipaddress.IPv4Address, str] = {}
        self._free = self._addresses()

    def _addresses(self) -> Iterator[ipaddress.IPv4Address]:
        for address in self.network.hosts():
            if address != self.server:
                yield address

    def address_of(self, port_id: str, alive: Callable[[str], bool]) -> ipaddress.IPv4Address:
        address = self._by_port.get(port_id)
        if address is not None:
            return address
        address = next(self._free, None)
        if address is None:
            for gone in [p for p in self._by_port if not alive(p)]:
                self._by_address.pop(self._by_port.pop(gone))
            taken = set(self._by_address)
            address = next((a for a in self._addresses() if a not in taken), None)
            if address is None:
                raise LookupError(f"metadata network {self.network}: every address is in use")
        self._by_port[port_id] = address
        self._by_address[address] = port_id
        return address

    def port_of(self, address: ipaddress.IPv4Address) -> str | None:
        return self._by_address.get(address)


# --- packets (pure) --------------------------------------------------------------------------


def to_server(
    frame: bytes, mapped: ipaddress.IPv4Address, server: ipaddress.IPv4Address
) -> bytes | None:
    """The IPv4 packet of a VM's Ethernet `frame`, from `mapped` to `server` (checksums
    updated); None when the frame is not untagged IPv4."""
    if len(frame) < 34 or frame[12:14] != _ETH_TYPE_IPV4:
        return None
    rewritten = rewrite_frame(frame, "ip_src", int(mapped))
    rewritten = rewrite_frame(rewritten, "ip_dst", int(server))
    return rewritten[14:]


def to_vm(packet: bytes, *, vm_ip: int, vm_mac: int, service_mac: int) -> bytes | None:
    """The Ethernet frame for the VM of a server's IPv4 `packet`: from the service address
    and `service_mac` (the MAC the VM sent to) to the VM; None when not IPv4."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    header = vm_mac.to_bytes(6, "big") + service_mac.to_bytes(6, "big") + _ETH_TYPE_IPV4
    frame = rewrite_frame(header + packet, "ip_src", int(METADATA_ADDRESS))
    return rewrite_frame(frame, "ip_dst", vm_ip)


# --- documents (pure) ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instance:
    """What the documents of one port say."""

    port: Port
    instance_id: str
    hostname: str
    local_ipv4: str
    mtu: int
    subnets: tuple[tuple[Subnet, str], ...]  # (subnet, the port's address on it)

    @property
    def public_keys(self) -> dict[str, str]:
        return dict(self.port.metadata.public_keys) if self.port.metadata else {}

    @property
    def user_data(self) -> str | None:
        data = self.port.metadata.user_data if self.port.metadata else ""
        return data or None


def instance_of(view: TopologyView, info: PortInfo, underlay_mtu: int) -> Instance:
    port = info.port
    subnets_by_id = view.objects.get("subnet", {})
    subnets: list[tuple[Subnet, str]] = []
    for fixed in port.fixed_ips:
        subnet = subnets_by_id.get(fixed.subnet_id)
        if isinstance(subnet, Subnet) and fixed.ip_address is not None:
            subnets.append((subnet, str(fixed.ip_address)))
    v4 = [str(a.ip) for a in port.addresses if a.version == 4]
    local_ipv4 = v4[0] if v4 else ""
    meta = port.metadata
    hostname = (
        (meta.hostname if meta else "")
        or port.name
        or (f"host-{local_ipv4.replace('.', '-')}" if local_ipv4 else f"host-{port.id[:8]}")
    )
    bridge = view.bridges.get(port.device_id)
    mtu = overlay_mtu(bridge.bridge.mtu if bridge else None, underlay_mtu)
    return Instance(
        port=port,
        instance_id=(meta.instance_id if meta else "") or port.id,
        hostname=hostname,
        local_ipv4=local_ipv4,
        mtu=mtu,
        subnets=tuple(subnets),
    )


def openstack_meta_data(instance: Instance) -> dict[str, object]:
    keys = instance.public_keys
    return {
        "uuid": instance.instance_id,
        "name": instance.hostname,
        "hostname": instance.hostname,
        "launch_index": 0,
        "availability_zone": "nova",
        "project_id": instance.port.tenant_id,
        "public_keys": keys,
        "keys": [{"name": name, "type": "ssh", "data": key} for name, key in keys.items()],
        "meta": {},
        "devices": [],
    }


def openstack_network_data(instance: Instance) -> dict[str, object]:
    port = instance.port
    link = f"tap{port.id[:11]}"
    networks: list[dict[str, object]] = []
    dns: list[str] = []
    for index, (subnet, address) in enumerate(instance.subnets):
        cidr = subnet.cidr
        version = cidr.version
        routes: list[dict[str, str]] = [
            {
                "network": str(route.destination.network_address),
                "netmask": str(route.destination.netmask),
                "gateway": str(route.nexthop),
            }
            for route in subnet.host_routes
        ]
        if subnet.gateway_ip is not None:
            any_address = "0.0.0.0" if version == 4 else "::"
            routes.append(
                {"network": any_address, "netmask": any_address, "gateway": str(subnet.gateway_ip)}
            )
        kind = f"ipv{version}_dhcp" if subnet.enable_dhcp and version == 4 else f"ipv{version}"
        networks.append(
            {
                "id": f"network{index}",
                "type": kind,
                "link": link,
                "network_id": port.device_id,
                "ip_address": address,
                "netmask": str(cidr.netmask),
                "routes": routes,
            }
        )
        dns.extend(str(server) for server in subnet.dns_nameservers if str(server) not in dns)
    return {
        "links": [
            {
                "id": link,
                "vif_id": port.id,
                "type": "phy",
                "ethernet_mac_address": str(port.mac),
                "mtu": instance.mtu,
            }
        ],
        "networks": networks,
        "services": [{"type": "dns", "address": server} for server in dns],
    }


def ec2_meta_data(instance: Instance) -> dict[str, str]:
    """The EC2 leaves (path under meta-data/ -> value)."""
    return {
        "ami-launch-index": "0",
        "hostname": instance.hostname,
        "instance-id": instance.instance_id,
        "local-hostname": instance.hostname,
        "local-ipv4": instance.local_ipv4,
        "mac": str(instance.port.mac),
        "placement/availability-zone": "nova",
    }


def _listing(names: list[str]) -> PlainTextResponse:
    return PlainTextResponse("\n".join(names))


def _not_found(what: str) -> PlainTextResponse:
    return PlainTextResponse(f"404 Not Found: {what}\n", status_code=404)


Handler = Callable[[Request, Instance], Response]


def metadata_app(lookup: Callable[[str], Instance | None]) -> Starlette:
    """The HTTP side: `lookup(client address)` is the instance behind it, if any. Every
    route answers 404 to an address with no instance and to an unknown version."""

    def serve(handler: Handler, versions: tuple[str, ...] = ()) -> Callable[..., Any]:
        async def endpoint(request: Request) -> Response:
            found = lookup(request.client.host) if request.client else None
            if found is None:
                return _not_found("no instance behind this address")
            version = str(request.path_params.get("version", ""))
            if versions and version not in versions and not _is_date(version):
                return _not_found("no such version")
            return handler(request, found)

        return endpoint

    def root(_request: Request, _found: Instance) -> Response:
        return _listing([*EC2_VERSIONS, "openstack"])

    def openstack_root(_request: Request, _found: Instance) -> Response:
        return _listing(list(OPENSTACK_VERSIONS))

    def openstack_index(_request: Request, found: Instance) -> Response:
        names = ["meta_data.json", "network_data.json", "vendor_data.json", "vendor_data2.json"]
        if found.user_data is not None:
            names.append("user_data")
        return _listing(sorted(names))

    def openstack_document(request: Request, found: Instance) -> Response:
        name = request.path_params["name"]
        if name == "meta_data.json":
            return JSONResponse(openstack_meta_data(found))
        if name == "network_data.json":
            return JSONResponse(openstack_network_data(found))
        if name in ("vendor_data.json", "vendor_data2.json"):
            return JSONResponse({})
        if name == "user_data" and found.user_data is not None:
            return Response(found.user_data, media_type="application/octet-stream")
        return _not_found(name)

    def ec2_index(_request: Request, found: Instance) -> Response:
        return _listing(["meta-data", *(["user-data"] if found.user_data is not None else [])])

    def ec2_user_data(_request: Request, found: Instance) -> Response:
        if found.user_data is None:
            return _not_found("user-data")
        return Response(found.user_data, media_type="application/octet-stream")

    def ec2_meta(request: Request, found: Instance) -> Response:
        path = str(request.path_params.get("path", "")).strip("/")
        leaves = ec2_meta_data(found)
        keys = list(found.public_keys.items())
        for index, (_name, key) in enumerate(keys):
            leaves[f"public-keys/{index}/openssh-key"] = key
        if path in leaves:
            return PlainTextResponse(leaves[path])
        if path == "public-keys":
            return _listing([f"{index}={name}" for index, (name, _key) in enumerate(keys)])
        prefix = f"{path}/" if path else ""
        children = sorted(
            {
                name[len(prefix) :].split("/")[0] + ("/" if "/" in name[len(prefix) :] else "")
                for name in leaves
                if name.startswith(prefix)
            }
        )
        if not children:
            return _not_found(path)
        return _listing(children)

    openstack, ec2 = OPENSTACK_VERSIONS, EC2_VERSIONS
    return Starlette(
        routes=[
            Route("/", serve(root)),
            Route("/openstack", serve(openstack_root)),
            Route("/openstack/", serve(openstack_root)),
            Route("/openstack/{version}", serve(openstack_index, openstack)),
            Route("/openstack/{version}/", serve(openstack_index, openstack)),
            Route("/openstack/{version}/{name}", serve(openstack_document, openstack)),
            Route("/{version}", serve(ec2_index, ec2)),
            Route("/{version}/", serve(ec2_index, ec2)),
            Route("/{version}/user-data", serve(ec2_user_data, ec2)),
            Route("/{version}/meta-data", serve(ec2_meta, ec2)),
            Route("/{version}/meta-data/", serve(ec2_meta, ec2)),
            Route("/{version}/meta-data/{path:path}", serve(ec2_meta, ec2)),
        ]
    )


def _is_date(text: str) -> bool:
    parts = text.split("-")
    return len(parts) == 3 and all(p.isdigit() for p in parts) and len(parts[0]) == 4


# --- the proxy (I/O) -------------------------------------------------------------------------


class _QuietServer(uvicorn.Server):
    """uvicorn on the agent's loop: the agent owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(slots=True)
class _Peer:
    port_id: str
    port_key: int
    vm_ip: int
    vm_mac: int
    service_mac: int


def open_tun(name: str) -> int:
    """A non-blocking fd of a new TUN device `name` (IPv4 packets, no extra header)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class MetadataProxy:
    """This host's metadata service: `await start()`, `from_vm(port, frame)` for each
    handed-off packet, `await stop()`. Runs on the agent's event loop (as the datapath)."""

    def __init__(
        self,
        topology: TopologyView,
        datapath: Datapath,
        *,
        underlay_mtu: int,
        network: ipaddress.IPv4Network = METADATA_NETWORK,
        device: str = METADATA_DEVICE,
    ) -> None:
        self.topology = topology
        self.datapath = datapath
        self.underlay_mtu = underlay_mtu
        self.addresses = AddressBook(network)
        self.device = device
        self.counters: dict[str, int] = {}
        self._peers: dict[ipaddress.IPv4Address, _Peer] = {}
        self._fd: int | None = None
        self._server: _QuietServer | None = None
        self._serving: asyncio.Task[None] | None = None

    @property
    def server_address(self) -> ipaddress.IPv4Address:
        return self.addresses.server

    def _configure_device(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=self.device)[0]
            ipr.addr(
                "add",
                index=index,
                address=str(self.server_address),
                prefixlen=self.addresses.network.prefixlen,
            )
            ipr.link("set", index=index, state="up")

    async def start(self) -> None:
        self._fd = open_tun(self.device)
        try:
            # pyroute2's synchronous socket runs its own loop: not on the agent's.
            await asyncio.to_thread(self._configure_device)
            config = uvicorn.Config(
                metadata_app(self.instance_at),
                host=str(self.server_address),
                port=METADATA_TCP_PORT,
                log_level="warning",
                access_log=False,
                lifespan="off",
            )
            self._server = _QuietServer(config)
            self._serving = asyncio.create_task(self._server.serve(), name="hn-metadata-http")
            while not self._server.started:
                if self._serving.done():
                    self._serving.result()  # raises what stopped it
                    raise OSError(errno.EADDRNOTAVAIL, "metadata server did not start")
                await asyncio.sleep(0.01)
        except BaseException:
            await self.stop()
            raise
        asyncio.get_running_loop().add_reader(self._fd, self._on_tun_readable)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._serving is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._serving, 5.0)
        self._server = self._serving = None
        if self._fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)  # the device goes with it
            self._fd = None

    # ----------------------------------------------------------------- both directions

    def from_vm(self, port: PortInfo, frame: bytes) -> None:
        """A packet port `port` sent to 169.254.169.254:80 (the simulation checked that)."""
        if self._fd is None:
            self._count("not_running")
            return
        if len(frame) < 34 or frame[12:14] != _ETH_TYPE_IPV4:
            self._count("not_ipv4")
            return
        source = int.from_bytes(frame[26:30], "big")
        if not any(a.ip == source for a in port.addresses_of(4)):
            self._count("foreign_source")  # not the port's own address: nothing for it
            return
        try:
            mapped = self.addresses.address_of(port.id, lambda p: p in self.topology.ports)
        except LookupError:
            self._count("no_address")
            return
        self._peers[mapped] = _Peer(
            port.id,
            port.tunnel_key,
            source,
            int.from_bytes(frame[6:12], "big"),
            int.from_bytes(frame[0:6], "big"),
        )
        packet = to_server(frame, mapped, self.server_address)
        if packet is None:
            self._count("not_ipv4")
            return
        try:
            os.write(self._fd, packet)
        except OSError:
            self._count("tun_write_error")
            return
        self._count("to_server")

    def _on_tun_readable(self) -> None:
        fd = self._fd
        if fd is None:
            return
        for _ in range(_READ_BATCH):
            try:
                packet = os.read(fd, 65535)
            except BlockingIOError:
                return
            except OSError:
                self._count("tun_read_error")
                return
            self._to_vm(packet)

    def _to_vm(self, packet: bytes) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4:
            self._count("kernel_not_ipv4")  # e.g. the kernel's own IPv6 chatter
            return
        peer = self._peers.get(ipaddress.IPv4Address(packet[16:20]))
        if peer is None or peer.port_id not in self.topology.ports:
            self._count("no_peer")
            return
        frame = to_vm(packet, vm_ip=peer.vm_ip, vm_mac=peer.vm_mac, service_mac=peer.service_mac)
        if frame is None:
            self._count("kernel_not_ipv4")
            return
        self.datapath.execute(frame, (Output(peer.port_key),))
        self._count("to_vm")

    # ----------------------------------------------------------------- documents

    def instance_at(self, client: str) -> Instance | None:
        try:
            address = ipaddress.IPv4Address(client)
        except ValueError:
            return None
        port_id = self.addresses.port_of(address)
        info = self.topology.ports.get(port_id) if port_id is not None else None
        if info is None:
            return None
        self._count("requests")
        return instance_of(self.topology, info, self.underlay_mtu)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def counters_snapshot(self) -> dict[str, int]:
        return dict(self.counters)
