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
  through their NAT binding; new flows avoid it.
- How probes reach a member on a tenant overlay: through the virtual topology. A `Prober` is
  injected into the agent. `SocketProber` runs TCP connect / HTTP request / UDP / ping probes
  in worker threads, optionally inside a network namespace (`setns` in the worker thread)
  that is attached to the overlay: the health-check namespace of this host, behind an
  exterior port of the load balancer's router bound on this host (so a probe crosses the
  router, its chains and the tunnels like a client's packet, and the member answers through
  the router). Creating that namespace and port is the deployment's job and is not automated
  yet: an agent given no prober does not probe at all (probing tenant addresses from the
  host's own namespace would fail and take every member down); it still derives member
  status from the other hosts' reports. The memory-tier tests inject a fake prober.

Must not touch flows, flow state or the datapath beyond `invalidate(tags)`; must not write
topology objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from hivenet.model.loadbalancer import HealthMonitor, HealthMonitorType, OperatingStatus
from hivenet.sim import TopologyView
from hivenet.sim.loadbalancer import (
    PROBERS_PER_MEMBER,
    MemberProbe,
    choose_probers,
    derive_member_status,
)
from hivenet.store.keys import STATE_PREFIX

log = logging.getLogger(__name__)

MEMBER_HEALTH_KIND = "member_health"
_CLONE_NEWNET = 0x40000000
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


def _enter_namespace(namespace: str) -> None:
    """Worker-thread initializer: move this thread into network namespace `namespace`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(
                error, f"setns into network namespace {namespace!r}: {os.strerror(error)}"
            )
    finally:
        os.close(fd)


class SocketProber:
    """Probes with real sockets in worker threads; with `namespace`, the threads live in that
    network namespace (the host's health-check namespace on the overlay)."""

    def __init__(self, namespace: str | None = None, *, workers: int = 4) -> None:
        self.namespace = namespace
        self._executor = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="hn-health",
            initializer=functools.partial(_enter_namespace, namespace) if namespace else None,
        )

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
        self.counters = HealthCounters()
        self.probing: dict[str, _Probing] = {}
        # member id -> host -> what that host reports.
        self.reports: dict[str, dict[str, OperatingStatus]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ probing

    def probers_of(self, member_id: str) -> tuple[str, ...]:
        return choose_probers(member_id, self.live_hosts(), self.probers_per_member)

    def tick(self, now: float) -> None:
        """Follow the monitored set and the prober assignment; start the probes due."""
        if self.prober is None:
            return  # this host cannot reach the overlay: it never probes (see the module doc)
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
            if not probing.in_flight and probing.next_due <= now:
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

    def observed(self, member_id: str) -> OperatingStatus | None:
        return self.topology.vips.observed.get(member_id)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
