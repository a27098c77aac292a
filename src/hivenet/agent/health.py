"""Health monitoring of load-balancer members by the agents: `MemberHealth` (one per agent)
and the probers that do the I/O.

Design (the decisions, in one place):
- Who probes. Each monitored member (an admin-up member of an admin-up pool with an admin-up
  health monitor) is probed by `PROBERS_PER_MEMBER` (2) hosts: the live hosts ranking highest
  for it by rendezvous hashing (`sim.loadbalancer.choose_probers`). Not all hosts (N x M
  probes), not one (a single point of failure, and one host's view of the overlay). Every
  agent computes the same set from the same live hosts, so nothing is coordinated; when a
  prober dies its lease, its liveness key and its reports vanish, every agent recomputes the
  set and the next-ranked host takes over (starting from "unknown").
- The probe state machine is data (`sim.loadbalancer.PROBE_TRANSITIONS`): `max_retries_down`
  failures in a row take a member OFFLINE, `max_retries` successes in a row bring it back, a
  first success proves it serves. One probe every `delay` seconds, failing after `timeout`.
- Results: a prober writes `/hivenet/v1/state/<host>/member_health/<member_id>` =
  `{"status": "online"|"offline", "pool_id": ...}` on its own lease, only when its conclusion
  changes (and removes it when it stops probing the member).
- Every agent watches those keys and derives a member's observed status from the reports of
  live hosts (`sim.loadbalancer.derive_member_status`: OFFLINE only when every report says so,
  so one prober whose own host cannot reach the member does not take it away from everyone);
  it feeds the status into selection (`TopologyView.vips.set_observed`), which invalidates
  exactly the flows tagged with the member's pool. Existing connections keep their member
  through their NAT binding; new flows avoid it. Each change is also handed to
  `on_status_change`, which the agent points at the status write-back (agent/lbstats.py).
- How probes reach a member on a tenant overlay: through the virtual topology, the MidoNet
  way. For each load balancer's router whose members this host must probe, the agent
  (`OverlayProbing`) keeps a health-check namespace `hn-hm<tag>` on this host
  (`hivenet.agent.health_ns`) whose veth's host end is bound as an exterior port of that
  router, and runs a `SocketProber` (TCP connect / HTTP request / UDP / ping probes in worker
  threads that enter the namespace with `hivenet.nsutil`) there. A probe crosses the router,
  its chains and
  the tunnels like a client's packet; the member answers through the router, which routes
  the reply to the health address by the connected route of that port. The namespace and the
  port go away when this host no longer probes that router's members, and when the agent
  stops; a restarted agent adopts what it left (same names, same port id) or drops it.
- The health port is a topology object that the agent writes itself (an operator never
  hand-builds probe namespaces): id `hm.<router id>.<host id>` (`hm.<hash>` when that exceeds
  64 characters), the router's tenant, bound to this host (host_id + interface_name), created
  and deleted through `TopologyRepository` like the agent's own Host object. Its address comes
  from the router's health subnet 169.254.<n>.0/24 (link-local, never a tenant subnet; n is
  derived from the router id, 1..254 except 169, the metadata service's octet), cut into 64
  /30 blocks, one per probing host: the router port takes .4k+1, the namespace .4k+2, so each
  host has its own connected route and replies return to the host that probed. A host takes
  a free block (preferred: one derived from its id); two hosts that picked the same block at
  once see each other's port and the one whose host id sorts higher moves. At most 64 hosts
  probe one router's members (more only stop probing, with a warning; the others go on).
- Security groups: the agent never edits them. A probe comes from the router's health subnet
  (169.254.<n>.0/24, in 169.254.0.0/16); a member whose security group does not admit it
  looks down, as in Octavia, where the tenant allows the health manager's source. Members of
  ports without port security (the default) answer as they are.
- IPv4 members only: the health subnet is IPv4, so a host does not probe an IPv6 member
  (`can_probe` is False: it publishes no report, and the member keeps its last status).
- An agent given no prober does not probe at all (probing tenant addresses from the host's
  own namespace would fail and take every member down); it still derives member status from
  the other hosts' reports. `hivenet agent run` probes through the overlay when run as root
  with the userspace datapath (`--no-health-probes` to turn it off). The memory-tier tests
  inject a fake prober, or a fake namespace plumbing under the real `OverlayProbing`.

Must not touch flows, flow state or the datapath beyond `invalidate(tags)`; the only topology
objects it writes are this host's health ports (`hm.*`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import json
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from hivenet.agent.health_ns import (
    HealthNamespace,
    HealthNamespaceError,
    ensure_health_namespace,
    health_namespace_name,
    health_namespaces,
    host_tag,
    own_network_namespace_inode,
    remove_health_namespace,
)
from hivenet.model import DeviceKind, Port
from hivenet.model.loadbalancer import HealthMonitor, HealthMonitorType, OperatingStatus
from hivenet.nsutil import enter_namespace
from hivenet.sim import TopologyView
from hivenet.sim.loadbalancer import (
    PROBERS_PER_MEMBER,
    MemberProbe,
    choose_probers,
    derive_member_status,
)
from hivenet.store.base import StoreError
from hivenet.store.keys import STATE_PREFIX
from hivenet.store.topology import (
    ConflictError,
    NotFoundError,
    TopologyError,
    TopologyRepository,
)

log = logging.getLogger(__name__)

MEMBER_HEALTH_KIND = "member_health"
_HTTP_STATUS_PREFIX = b"HTTP/"


def member_health_key(host_id: str, member_id: str) -> str:
    return f"{STATE_PREFIX}{host_id}/{MEMBER_HEALTH_KIND}/{member_id}"


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """One probe to run: where, how, and through which load balancer's router."""

    member_id: str
    pool_id: str
    router_id: str
    address: str
    port: int
    monitor: HealthMonitor


class Prober(Protocol):
    def can_probe(self, target: ProbeTarget) -> bool:
        """False when this host cannot reach the member now (its health namespace is not
        ready, or the member's address family has no health path): no probe, no report."""
        ...

    async def probe(self, target: ProbeTarget) -> bool:
        """True when the member answered as the monitor expects (within its timeout)."""
        ...


# ---------------------------------------------------------------------------- real probes


def _tcp_probe(target: ProbeTarget) -> bool:
    with socket.create_connection((target.address, target.port), timeout=target.monitor.timeout):
        return True


def _http_probe(target: ProbeTarget) -> bool:
    monitor = target.monitor
    with socket.create_connection((target.address, target.port), timeout=monitor.timeout) as sock:
        request = (
            f"{(monitor.http_method or 'GET')} {monitor.url_path or '/'} HTTP/1.0\r\n"
            f"Host: {target.address}\r\nUser-Agent: hivenet-health\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(request.encode())
        head = b""
        while b"\r\n" not in head and len(head) < 1024:
            chunk = sock.recv(1024)
            if not chunk:
                break
            head += chunk
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[0].startswith(_HTTP_STATUS_PREFIX):
        return False
    return status_line[1].isdigit() and monitor.accepts_status(int(status_line[1]))


def _udp_probe(target: ProbeTarget) -> bool:
    """Octavia's UDP check: an ICMP port unreachable means down; an answer or silence up."""
    family = socket.AF_INET6 if ":" in target.address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(target.monitor.timeout)
        sock.connect((target.address, target.port))
        sock.send(b"hivenet-health\n")
        with contextlib.suppress(TimeoutError):  # silence: nothing refused the datagram
            sock.recv(2048)
        return True


def _ping_probe(target: ProbeTarget) -> bool:
    argv = ["ping", "-n", "-q", "-c", "1", "-W", str(target.monitor.timeout), target.address]
    completed = subprocess.run(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=target.monitor.timeout + 2,
    )
    return completed.returncode == 0


_PROBES: dict[HealthMonitorType, Callable[[ProbeTarget], bool]] = {
    HealthMonitorType.TCP: _tcp_probe,
    HealthMonitorType.HTTP: _http_probe,
    HealthMonitorType.UDP: _udp_probe,
    HealthMonitorType.PING: _ping_probe,
}


class SocketProber:
    """Probes with real sockets in worker threads; with `namespace`, the threads live in that
    network namespace (the host's health-check namespace on the overlay)."""

    def __init__(self, namespace: str | None = None, *, workers: int = 4) -> None:
        self.namespace = namespace
        self._executor = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="hn-health",
            initializer=functools.partial(enter_namespace, namespace) if namespace else None,
        )

    def can_probe(self, target: ProbeTarget) -> bool:
        return True

    async def probe(self, target: ProbeTarget) -> bool:
        loop = asyncio.get_running_loop()
        check = _PROBES[target.monitor.type]

        def run() -> bool:
            try:
                return check(target)
            except (OSError, subprocess.SubprocessError, ValueError):
                return False

        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._executor, run), target.monitor.timeout + 1
            )
        except TimeoutError:
            return False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------- the agent part


@dataclass(slots=True)
class _Probing:
    """This host's probing of one member."""

    target: ProbeTarget
    probe: MemberProbe
    next_due: float
    in_flight: bool = False
    published: OperatingStatus | None = None


@dataclass(slots=True)
class HealthCounters:
    probes: int = 0
    probe_failures: int = 0
    reports_published: int = 0
    status_changes: int = 0
    bad_reports: int = 0


class MemberHealth:
    """One agent's share of health monitoring, and every agent's view of member status.

    `tick(now)` (called by `run()`, or by tests) starts the probes that are due; reports of
    every host come in through `on_report`, liveness changes through `on_liveness`."""

    def __init__(
        self,
        host_id: str,
        topology: TopologyView,
        prober: Prober | None,
        *,
        publish: Callable[[str, bytes], None],
        unpublish: Callable[[str], None],
        live_hosts: Callable[[], set[str]],
        invalidate: Callable[[Iterable[str]], object],
        clock: Callable[[], float] = time.monotonic,
        tick_interval: float = 0.2,
        probers_per_member: int = PROBERS_PER_MEMBER,
        on_status_change: Callable[[str], object] | None = None,
    ) -> None:
        self.host_id = host_id
        self.topology = topology
        self.prober = prober
        self.publish = publish
        self.unpublish = unpublish
        self.live_hosts = live_hosts
        self.invalidate = invalidate
        self.clock = clock
        self.tick_interval = tick_interval
        self.probers_per_member = probers_per_member
        # Told the member id whenever its observed status changes (status write-back).
        self.on_status_change = on_status_change
        self.counters = HealthCounters()
        self.probing: dict[str, _Probing] = {}
        # member id -> host -> what that host reports.
        self.reports: dict[str, dict[str, OperatingStatus]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ probing

    def probers_of(self, member_id: str) -> tuple[str, ...]:
        return choose_probers(member_id, self.live_hosts(), self.probers_per_member)

    def assignments(self) -> dict[str, ProbeTarget]:
        """The members this host must probe now (member id -> probe), whatever it can reach."""
        wanted: dict[str, ProbeTarget] = {}
        for entry in self.topology.vips.monitored_members():
            member = entry.member
            if self.host_id not in self.probers_of(member.id):
                continue
            wanted[member.id] = ProbeTarget(
                member_id=member.id,
                pool_id=entry.pool.id,
                router_id=entry.router_id,
                address=str(member.monitor_address or member.address),
                port=member.monitor_port or member.protocol_port,
                monitor=entry.monitor,
            )
        return wanted

    def tick(self, now: float) -> None:
        """Follow the monitored set and the prober assignment; start the probes due."""
        if self.prober is None:
            return  # this host cannot reach the overlay: it never probes (see the module doc)
        wanted = self.assignments()
        for member_id in list(self.probing):
            if member_id not in wanted:
                probing = self.probing.pop(member_id)
                if probing.published is not None:
                    self.unpublish(member_health_key(self.host_id, member_id))
        for member_id, target in wanted.items():
            known = self.probing.get(member_id)
            if known is None or known.target.monitor != target.monitor:
                probing = self.probing[member_id] = _Probing(target, MemberProbe(), now)
            else:
                probing = known
                probing.target = target
            if probing.in_flight or probing.next_due > now:
                continue
            if not self.prober.can_probe(target):
                continue  # not reachable from here yet: neither a success nor a failure
            probing.in_flight = True
            probing.next_due = now + target.monitor.delay
            task = asyncio.get_running_loop().create_task(
                self._probe(member_id, probing), name=f"hn-{self.host_id}-probe"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _probe(self, member_id: str, probing: _Probing) -> None:
        target = probing.target
        assert self.prober is not None  # tick() starts probes only with a prober
        try:
            succeeded = await self.prober.probe(target)
        except Exception:  # a prober bug must not stop monitoring: count it as a failure
            log.exception("host %s: probe of member %s failed", self.host_id, member_id)
            succeeded = False
        finally:
            probing.in_flight = False
        self.counters.probes += 1
        if not succeeded:
            self.counters.probe_failures += 1
        if self.probing.get(member_id) is not probing:
            return  # no longer ours, or the monitor changed meanwhile
        probing.probe = probing.probe.advance(succeeded, target.monitor)
        status = probing.probe.status
        if status is not None and status != probing.published:
            probing.published = status
            value = json.dumps({"status": status.value, "pool_id": target.pool_id}).encode()
            self.publish(member_health_key(self.host_id, member_id), value)
            self.counters.reports_published += 1
            # Our own report counts at once (the watch will confirm it).
            self._set_report(self.host_id, member_id, status)

    async def run(self) -> None:
        try:
            while True:
                try:
                    self.tick(self.clock())
                except Exception:  # the loop must survive a bug in one tick
                    log.exception("host %s: health tick failed", self.host_id)
                await asyncio.sleep(self.tick_interval)
        finally:
            for task in list(self._tasks):
                task.cancel()

    # ------------------------------------------------------------------ reports

    def on_report(self, host_id: str, member_id: str, value: bytes | None) -> None:
        """A member_health key of `host_id` changed (value None: deleted)."""
        if value is None:
            self._set_report(host_id, member_id, None)
            return
        try:
            status = OperatingStatus(json.loads(value)["status"])
        except (ValueError, KeyError, TypeError):
            self.counters.bad_reports += 1
            log.warning("host %s: bad health report of %s for %s", self.host_id, host_id, member_id)
            return
        self._set_report(host_id, member_id, status)

    def on_liveness(self) -> None:
        """The set of live hosts changed: reports of dead hosts no longer count."""
        for member_id in list(self.reports):
            self._derive(member_id)

    def _set_report(self, host_id: str, member_id: str, status: OperatingStatus | None) -> None:
        reports = self.reports.setdefault(member_id, {})
        if status is None:
            reports.pop(host_id, None)
        else:
            reports[host_id] = status
        self._derive(member_id)
        if not reports:
            del self.reports[member_id]

    def _derive(self, member_id: str) -> None:
        live = self.live_hosts()
        reports = self.reports.get(member_id, {})
        status = derive_member_status(s for host, s in reports.items() if host in live)
        tags = self.topology.vips.set_observed(member_id, status)
        if tags:
            self.counters.status_changes += 1
            self.invalidate(tags)
            if self.on_status_change is not None:
                self.on_status_change(member_id)

    def observed(self, member_id: str) -> OperatingStatus | None:
        return self.topology.vips.observed.get(member_id)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


# ---------------------------------------------------------------------------- overlay access

HEALTH_PORT_ID_PREFIX = "hm."
HEALTH_SUBNET_PREFIXLEN = 24
HEALTH_BLOCK_PREFIXLEN = 30
HEALTH_BLOCKS_PER_ROUTER = 1 << (HEALTH_BLOCK_PREFIXLEN - HEALTH_SUBNET_PREFIXLEN)
# 169.254.169.0/24 holds the metadata service's address (169.254.169.254): never a health subnet.
_HEALTH_THIRD_OCTETS = tuple(octet for octet in range(1, 255) if octet != 169)
_MAX_OBJECT_ID_LEN = 64


def _hash_int(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "big")


def health_port_id(router_id: str, host_id: str) -> str:
    """The id of `host_id`'s health port on `router_id` (deterministic: a restarted agent, or
    any agent, finds it again)."""
    readable = f"{HEALTH_PORT_ID_PREFIX}{router_id}.{host_id}"
    if len(readable) <= _MAX_OBJECT_ID_LEN:
        return readable
    digest = hashlib.sha256(f"{router_id}\0{host_id}".encode()).hexdigest()[:32]
    return f"{HEALTH_PORT_ID_PREFIX}{digest}"


def health_subnet(router_id: str) -> ipaddress.IPv4Network:
    """The router's health subnet, 169.254.<n>.0/24 (see the module docstring)."""
    octet = _HEALTH_THIRD_OCTETS[_hash_int("subnet", router_id) % len(_HEALTH_THIRD_OCTETS)]
    return ipaddress.IPv4Network(f"169.254.{octet}.0/{HEALTH_SUBNET_PREFIXLEN}")


def health_block(
    subnet: ipaddress.IPv4Network, index: int
) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface]:
    """(router port address, namespace address) of block `index` (0..63) of `subnet`."""
    if not 0 <= index < HEALTH_BLOCKS_PER_ROUTER:
        raise ValueError(
            f"index: {index} is not a health block (0..{HEALTH_BLOCKS_PER_ROUTER - 1})"
        )
    base = int(subnet.network_address) + 4 * index
    return (
        ipaddress.IPv4Interface((base + 1, HEALTH_BLOCK_PREFIXLEN)),
        ipaddress.IPv4Interface((base + 2, HEALTH_BLOCK_PREFIXLEN)),
    )


def block_of(subnet: ipaddress.IPv4Network, port: Port) -> int | None:
    """The health block whose router side a port's address is (None: not a health address)."""
    for interface in port.addresses:
        if (
            interface.version == 4
            and interface.network.prefixlen == HEALTH_BLOCK_PREFIXLEN
            and interface.ip in subnet
        ):
            offset = int(interface.ip) - int(subnet.network_address)
            if offset % 4 == 1:
                return offset // 4
    return None


def choose_health_block(router_id: str, host_id: str, taken: Iterable[int]) -> int | None:
    """The first free block from one derived from (router, host); None when all are taken."""
    used = set(taken)
    start = _hash_int("block", router_id, host_id) % HEALTH_BLOCKS_PER_ROUTER
    for step in range(HEALTH_BLOCKS_PER_ROUTER):
        candidate = (start + step) % HEALTH_BLOCKS_PER_ROUTER
        if candidate not in used:
            return candidate
    return None


class HealthPlumbing(Protocol):
    """The kernel side of overlay probing (`KernelHealthPlumbing`; tests inject a fake)."""

    host_tag: str

    def ensure(self, spec: HealthNamespace) -> None: ...

    def remove(self, namespace: str) -> None: ...

    def existing(self) -> list[str]:
        """This agent's namespaces on the host (names), live or left over."""
        ...

    def prober(self, spec: HealthNamespace) -> Prober:
        """A prober whose probes start inside `spec`'s namespace."""
        ...


class KernelHealthPlumbing:
    """Health namespaces with pyroute2 (`hivenet.agent.health_ns`), probes with `SocketProber`."""

    def __init__(self, host_id: str) -> None:
        self.host_tag = host_tag(host_id, own_network_namespace_inode())
        # One kernel change at a time: a removal (agent stopping) waits for an ensure that a
        # cancelled task left running in its worker thread, instead of racing it.
        self._lock = threading.Lock()

    def ensure(self, spec: HealthNamespace) -> None:
        with self._lock:
            ensure_health_namespace(spec)

    def remove(self, namespace: str) -> None:
        with self._lock:
            remove_health_namespace(namespace)

    def existing(self) -> list[str]:
        with self._lock:
            return health_namespaces(self.host_tag)

    def prober(self, spec: HealthNamespace) -> Prober:
        return SocketProber(spec.namespace)


@dataclass(slots=True)
class _RouterAccess:
    """This host's way into one router: its health port and namespace, and their prober."""

    router_id: str
    port_id: str
    spec: HealthNamespace
    prober: Prober


class OverlayProbing:
    """A `Prober` that reaches members through the overlay: per router whose members this
    host probes (`routers_wanted()`), a health port (topology object) and a health namespace
    (`plumbing`), kept in step by `run()` (or `reconcile()` in tests) and removed by `close()`.

    A router is ready for probes once its namespace is built, its port is stored with the
    namespace's block and the agent has bound it (`is_bound(port id)`)."""

    def __init__(
        self,
        host_id: str,
        topology: TopologyView,
        repository: TopologyRepository,
        *,
        routers_wanted: Callable[[], set[str]],
        is_bound: Callable[[str], bool],
        plumbing: HealthPlumbing | None = None,
        reconcile_interval: float = 1.0,
        unbind_timeout: float = 3.0,
    ) -> None:
        self.host_id = host_id
        self.topology = topology
        self.repository = repository
        self.routers_wanted = routers_wanted
        self.is_bound = is_bound
        self.plumbing = plumbing if plumbing is not None else KernelHealthPlumbing(host_id)
        self.reconcile_interval = reconcile_interval
        self.unbind_timeout = unbind_timeout
        self.access: dict[str, _RouterAccess] = {}
        self.errors = 0
        self._swept = False

    # ------------------------------------------------------------------ Prober

    def can_probe(self, target: ProbeTarget) -> bool:
        access = self.access.get(target.router_id)
        return (
            access is not None
            and ":" not in target.address  # IPv4 only (see the module docstring)
            and self._port_in_place(access)
            and self.is_bound(access.port_id)
        )

    async def probe(self, target: ProbeTarget) -> bool:
        access = self.access.get(target.router_id)
        if access is None:
            return False
        return await access.prober.probe(target)

    # ------------------------------------------------------------------ reconciling

    async def run(self) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception:  # the loop must survive a store or kernel error; retried
                self.errors += 1
                log.exception("host %s: health namespace reconcile failed", self.host_id)
            await asyncio.sleep(self.reconcile_interval)

    async def reconcile(self) -> None:
        """Build what `routers_wanted()` needs, remove what it no longer does."""
        wanted = {r for r in self.routers_wanted() if self.topology.get("router", r) is not None}
        for router_id in sorted(set(self.access) - wanted):
            await self._remove(router_id)
        if not self._swept:
            await self._sweep_leftovers(wanted)
            self._swept = True
        for router_id in sorted(wanted):
            await self._ensure(router_id)

    def _own_port(self, router_id: str) -> Port | None:
        port = self.topology.get("port", health_port_id(router_id, self.host_id))
        return port if isinstance(port, Port) else None

    def _others_blocks(self, router_id: str, subnet: ipaddress.IPv4Network) -> dict[int, str]:
        """block -> (lowest) host id of the other hosts' health ports on `router_id`."""
        blocks: dict[int, str] = {}
        for port in self.topology.all("port"):
            if (
                isinstance(port, Port)
                and port.id.startswith(HEALTH_PORT_ID_PREFIX)
                and port.device_id == router_id
                and port.host_id is not None
                and port.host_id != self.host_id
            ):
                block = block_of(subnet, port)
                if block is not None:
                    blocks[block] = min(port.host_id, blocks.get(block, port.host_id))
        return blocks

    def _choose_block(self, router_id: str) -> int | None:
        subnet = health_subnet(router_id)
        others = self._others_blocks(router_id, subnet)
        current = self._own_port(router_id)
        block = None if current is None else block_of(subnet, current)
        if block is not None and (block not in others or self.host_id < others[block]):
            return block  # ours alone, or a tie we win: keep it
        return choose_health_block(router_id, self.host_id, others)

    async def _ensure(self, router_id: str) -> None:
        block = self._choose_block(router_id)
        if block is None:
            log.warning(
                "host %s: all %d health blocks of router %s are taken; not probing its members",
                self.host_id,
                HEALTH_BLOCKS_PER_ROUTER,
                router_id,
            )
            await self._remove(router_id)
            return
        router_side, namespace_side = health_block(health_subnet(router_id), block)
        spec = HealthNamespace.for_router(
            router_id, self.plumbing.host_tag, namespace_side, router_side.ip
        )
        access = self.access.get(router_id)
        # Every round: cheap when all is in place, rebuilds what was removed behind our back.
        await asyncio.to_thread(self.plumbing.ensure, spec)
        if access is None or access.spec != spec:
            if access is not None:
                _close_prober(access.prober)
            access = self.access[router_id] = _RouterAccess(
                router_id,
                health_port_id(router_id, self.host_id),
                spec,
                self.plumbing.prober(spec),
            )
        if not self._port_in_place(access):
            await self._write_port(access, router_side)

    def _port_in_place(self, access: _RouterAccess) -> bool:
        port = self._own_port(access.router_id)
        wanted_address = ipaddress.IPv4Interface((access.spec.gateway, HEALTH_BLOCK_PREFIXLEN))
        return (
            port is not None
            and port.host_id == self.host_id
            and port.interface_name == access.spec.host_link
            and port.addresses == (wanted_address,)
            and port.admin_state_up
        )

    async def _write_port(
        self, access: _RouterAccess, router_side: ipaddress.IPv4Interface
    ) -> None:
        router = self.topology.get("router", access.router_id)
        if router is None:
            return
        fields: dict[str, object] = {
            "host_id": self.host_id,
            "interface_name": access.spec.host_link,
            "addresses": (router_side,),
            "admin_state_up": True,
        }
        try:
            current = await self.repository.get(Port, access.port_id)
        except NotFoundError:
            port = Port.model_validate(
                {
                    "id": access.port_id,
                    "name": f"health checks of host {self.host_id}",
                    "tenant_id": router.tenant_id,
                    "device_kind": DeviceKind.ROUTER,
                    "device_id": access.router_id,
                    **fields,
                }
            )
            with contextlib.suppress(ConflictError):  # created meanwhile: the next round looks
                await self.repository.create(port)
            log.info(
                "host %s: health port %s on router %s at %s",
                self.host_id,
                access.port_id,
                access.router_id,
                router_side,
            )
            return
        if current.obj.device_id != access.router_id:
            raise ValueError(
                f"port {access.port_id}: is on {current.obj.device_kind.value} "
                f"{current.obj.device_id}, not on router {access.router_id}"
            )
        await self.repository.modify(
            Port, access.port_id, lambda port: Port.model_validate({**dict(port), **fields})
        )

    async def _remove(self, router_id: str) -> None:
        """Delete the port first (so the agent unbinds it), then the namespace. When the store
        cannot be reached the namespace stays too, and the next round tries again."""
        access = self.access.get(router_id)
        port_id = health_port_id(router_id, self.host_id)
        with contextlib.suppress(NotFoundError):
            await self.repository.delete(Port, port_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.unbind_timeout
        while self.is_bound(port_id) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.access.pop(router_id, None)
        if access is not None:
            _close_prober(access.prober)
            await asyncio.to_thread(self.plumbing.remove, access.spec.namespace)

    async def _sweep_leftovers(self, wanted: set[str]) -> None:
        """What a previous run of this agent left and nobody wants now: its health ports on
        other routers, and namespaces of this host tag that no wanted router maps to."""
        for port in self.topology.all("port"):
            if (
                isinstance(port, Port)
                and port.id.startswith(HEALTH_PORT_ID_PREFIX)
                and port.host_id == self.host_id
                and port.device_id not in wanted
                and port.id == health_port_id(port.device_id, self.host_id)
            ):
                with contextlib.suppress(NotFoundError):
                    await self.repository.delete(Port, port.id)
        keep = {health_namespace_name(router_id, self.plumbing.host_tag) for router_id in wanted}
        for namespace in self.plumbing.existing():
            if namespace not in keep:
                await asyncio.to_thread(self.plumbing.remove, namespace)

    async def close(self) -> None:
        """Remove every health port and namespace of this host (the agent is stopping, and
        has unbound its ports). A port the store does not take away now is adopted or swept
        by the next run; the namespaces go in any case."""
        for router_id in sorted(self.access):
            try:
                await self._remove(router_id)
            except (StoreError, TopologyError, OSError) as exc:
                log.warning(
                    "host %s: health port of router %s stays: %s", self.host_id, router_id, exc
                )
        for access in self.access.values():
            _close_prober(access.prober)
        self.access.clear()
        for namespace in self.plumbing.existing():
            try:
                await asyncio.to_thread(self.plumbing.remove, namespace)
            except (OSError, HealthNamespaceError) as exc:
                log.warning("host %s: cannot remove namespace %s: %s", self.host_id, namespace, exc)


def _close_prober(prober: Prober) -> None:
    close = getattr(prober, "close", None)
    if callable(close):
        close()
