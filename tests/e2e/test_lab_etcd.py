"""End-to-end on a lab whose store is a local 3-member etcd cluster (`Lab(store="etcd")`):
the API server and every agent get all three endpoints, the agents reach the members from
inside their host namespaces on the lab's root underlay address. What must survive:

- the etcd leader killed (SIGKILL, by PID) in the middle of a stream of API writes and
  continuous pings: every acknowledged write is in the store afterwards, every agent reaches
  the revision of the last write, pings lose at most a couple of packets;
- the whole store gone for 30 s (all members SIGKILLed, restarted on their data dirs): pings
  keep flowing, also a new flow started during the outage, and a change made right after the
  store returns reaches every agent within seconds;
- a host's agent killed for good: within the lease TTL (+ slack) the other agents see the host
  down and drop traffic towards its ports at ingress (`egress_host_down`).

One lab for the module (unique tag and state dir, short agent lease TTL), removed afterwards
whatever happened; the tests run in this order and the one that kills a host is last. The first
test needs no lab: it checks that another process can reattach to a running cluster by its
state dir (what `hivenet lab status` does).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hivenet.api.client import ApiError, HivenetClient
from hivenet.lab.etcd import EtcdCluster, EtcdLabError, start_cluster, stop_all
from hivenet.lab.lab import Lab
from hivenet.lab.netns import (
    ROOT_UNDERLAY_ADDRESS,
    UNDERLAY_NETWORK,
    addresses_in,
)
from hivenet.lab.scenario import builtin_scenario
from hivenet.model import Route
from hivenet.model.topology import TOPOLOGY_PREFIX
from hivenet.store import StoreUnavailableError, open_store
from hivenet.store.keys import host_alive_key, port_active_key
from tests.e2e.common import running_lab

pytestmark = pytest.mark.e2e

LEASE_TTL = 3  # seconds: the agents' lease, so a dead host is noticed quickly
OUTAGE_SECONDS = 30.0
# Default scenario: h1 holds vm1 and vm2 (net1), h2 vm3 (net1), h3 vm4 (net2, behind r1).
VM1, VM2, VM3, VM4 = "10.0.1.10", "10.0.1.11", "10.0.1.20", "10.0.2.20"
HOSTS = ("h1", "h2", "h3")
_PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


# ---- helpers ---------------------------------------------------------------------------------


def store_get(lab: Lab, key: str) -> tuple[bool, int]:
    """(present, mod_revision) of `key`, read from the etcd cluster directly."""

    async def read() -> tuple[bool, int]:
        store = open_store(lab.store_url)
        try:
            kv = await store.get(key)
            return (kv is not None, 0 if kv is None else kv.mod_revision)
        finally:
            await store.close()

    return asyncio.run(read())


def route_keys(lab: Lab) -> set[str]:
    async def read() -> set[str]:
        store = open_store(lab.store_url)
        try:
            return {kv.key for kv in (await store.range(f"{TOPOLOGY_PREFIX}route/")).kvs}
        finally:
            await store.close()

    return asyncio.run(read())


def route_key(route_id: str) -> str:
    return f"{TOPOLOGY_PREFIX}route/{route_id}"


def wait_agents_at(lab: Lab, revision: int, timeout: float) -> float:
    """Seconds until every agent's counters show topology revision >= `revision` (all equal)."""
    started = time.monotonic()
    seen: dict[str, object] = {}
    while time.monotonic() - started < timeout:
        seen = {host: lab.fresh_agent_counters(host).get("revision") for host in HOSTS}
        values = [value for value in seen.values() if isinstance(value, int)]
        if len(values) == len(HOSTS) and min(values) >= revision and len(set(values)) == 1:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"agents not at revision {revision} after {timeout} s: {seen}")


class Pinger:
    """A background `ping -D` in a VM; its totals once it has finished."""

    def __init__(self, lab: Lab, vm: str, target: str, seconds: float, interval: float) -> None:
        self.lab, self.vm = lab, vm
        self.label = f"ping{target.replace('.', '')}"
        self.process = lab.start_in(
            vm,
            ["ping", "-n", "-D", "-i", f"{interval:g}", "-W", "1", "-w", f"{seconds:g}", target],
            label=self.label,
        )

    def result(self, timeout: float) -> tuple[int, int, str]:
        """(transmitted, received, output) after ping's own deadline."""
        try:
            self.process.popen.wait(timeout)
        finally:
            self.process.stop()
        output = self.lab.log_of(self.vm, self.label).read_text()
        summary = _PING_SUMMARY.search(output)
        assert summary is not None, output
        return int(summary.group(1)), int(summary.group(2)), output

    def stop(self) -> None:
        self.process.stop()


def reply_times(output: str) -> list[float]:
    """Wall-clock times (`ping -D`) of the replies."""
    return [
        float(line[1 : line.index("]")]) for line in output.splitlines() if "bytes from" in line
    ]


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest stretch inside [start, end] without a reply."""
    points = [start, *(t for t in times if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(points))


@dataclass
class WriteStream:
    """Creates `route.stream.<n>` every `period` seconds through the API and deletes every other
    one a few steps later; remembers which writes the API acknowledged (2xx) and when."""

    lab: Lab
    period: float = 0.1
    acked_creates: set[str] = field(default_factory=set)
    acked_deletes: set[str] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)
    unknown: set[str] = field(default_factory=set)  # ids with an unacknowledged write
    ack_times: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="hn-write-stream", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "the write stream did not stop"

    def _run(self) -> None:
        with HivenetClient(self.lab.api_url, self.lab.token(), timeout=10.0) as client:
            step = 0
            while not self._stop.is_set():
                step += 1
                route_id = f"route.stream.{step}"
                route = Route(
                    id=route_id,
                    tenant_id="demo",
                    router_id="r1",
                    dst_prefix=f"10.{200 + step // 250}.{step % 250}.0/24",  # type: ignore[arg-type]
                    next_hop_port_id="rp.r1.net2",
                    next_hop_gateway=VM4,  # type: ignore[arg-type]
                )
                self._attempt(
                    f"create {route_id}", functools.partial(client.create_object, route), route_id
                )
                doomed = f"route.stream.{step - 3}"
                if step % 2 == 0 and doomed in self.acked_creates:
                    self._attempt(
                        f"delete {doomed}",
                        functools.partial(client.delete, "route", doomed),
                        doomed,
                        delete=True,
                    )
                self._stop.wait(self.period)

    def _attempt(
        self, what: str, call: Callable[[], object], route_id: str, *, delete: bool = False
    ) -> None:
        try:
            call()
        except (ApiError, OSError) as error:  # no acknowledgement: outcome unknown, allowed
            self.failed.append(f"{what}: {error}")
            self.unknown.add(route_id)
            return
        self.ack_times.append(time.time())
        (self.acked_deletes if delete else self.acked_creates).add(route_id)


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("etcdlab")
    with running_lab(
        builtin_scenario(), root, timeout=90, store="etcd", agent_lease_ttl=LEASE_TTL
    ) as lab:
        yield lab
    stopped_etcd = stop_all(root / "state")  # what `down` should have stopped
    assert not stopped_etcd, f"etcd members outlived lab.down(): {stopped_etcd}"
    assert not (root / "state" / "etcd").exists()
    assert str(ROOT_UNDERLAY_ADDRESS) not in [a for _l, a in addresses_in(UNDERLAY_NETWORK)]


def ping_ok(lab: Lab, source: str, target: str, count: int = 3) -> None:
    result = lab.ping(source, target, count=count, interval=0.05, wait=1.0)
    assert result.ok, result.output


def assert_refused_without_client_certificate(cluster: EtcdCluster) -> None:
    url = f"etcds://{cluster.endpoints[0]}?cacert={cluster.ca_file}"

    async def read() -> None:
        store = open_store(url, call_timeout=1.0)
        try:
            with pytest.raises(StoreUnavailableError, match="refused the client certificate"):
                await store.get("/hivenet/v1/")
        finally:
            await store.close()

    asyncio.run(read())


# ---- tests -----------------------------------------------------------------------------------


def test_a_cluster_is_found_again_from_its_state_dir(tmp_path: Path) -> None:
    """What `lab status` and a test in another process rely on: load by state dir, PIDs,
    leader, health, kill and restart through the loaded object, stop_all."""
    with start_cluster(tmp_path, size=3) as started:
        loaded = EtcdCluster.load(tmp_path)
        assert loaded.url == started.url
        assert {m.name: m.pid for m in loaded.member_statuses()} == {
            name: started.pid(name) for name in started.names()
        }
        statuses = loaded.member_statuses()
        assert all(status.healthy for status in statuses)
        assert [status.name for status in statuses if status.is_leader] == [loaded.leader().name]
        follower = next(status.name for status in statuses if not status.is_leader)
        killed_pid = loaded.kill(follower)
        assert started.pid(follower) is None  # the record is gone for every reader
        assert killed_pid not in [status.pid for status in loaded.member_statuses()]
        loaded.start_member(follower)
        loaded.wait_healthy(20)
        assert EtcdCluster.load(tmp_path).pid(follower) == loaded.pid(follower) != killed_pid
        tls_dir = loaded.tls_dir
        assert loaded.secure and (tls_dir / "hivenet.password").is_file()
        stopped = stop_all(tmp_path)
        assert len(stopped) == 3
        assert not tls_dir.exists()  # certificates, keys and password go with the cluster
    with pytest.raises(EtcdLabError, match="no etcd cluster recorded"):
        EtcdCluster.load(tmp_path)


def test_b_lab_runs_on_three_members_reachable_from_host_namespaces(lab: Lab) -> None:
    cluster = lab.etcd_cluster()
    assert lab.store_url == cluster.url
    assert len(cluster.endpoints) == 3
    assert all(
        endpoint.startswith(f"{ROOT_UNDERLAY_ADDRESS.ip}:") for endpoint in cluster.endpoints
    )
    # TLS with client certificates and etcd auth, files in the lab's state dir.
    assert cluster.url.startswith("etcds://") and "&user=hivenet&password_file=" in cluster.url
    assert cluster.ca_file.is_relative_to(lab.state_dir) and cluster.ca_file.is_file()
    assert cluster.password_file.read_text().strip() not in cluster.url
    assert_refused_without_client_certificate(cluster)
    for host in HOSTS:
        argv = lab.agent_argv(host)
        assert argv[argv.index("--store") + 1] == cluster.url
        assert argv[argv.index("--lease-ttl") + 1] == str(LEASE_TTL)
    report = lab.status()
    assert [m.healthy for m in report.store_members] == [True, True, True]
    assert sum(m.is_leader for m in report.store_members) == 1
    assert all(lab.fresh_agent_counters(host)["store_connected"] for host in HOSTS)
    ping_ok(lab, "vm1", VM3)
    lab.ping("vm1", VM4, count=2)  # first contact across the router may lose one
    ping_ok(lab, "vm1", VM4)


def test_c_leader_killed_mid_stream_loses_no_acknowledged_write(lab: Lab) -> None:
    cluster = lab.etcd_cluster()
    ping_ok(lab, "vm1", VM3)
    pinger = Pinger(lab, "vm1", VM3, seconds=8, interval=0.05)
    stream = WriteStream(lab)
    try:
        stream.start()
        time.sleep(2.5)
        leader = cluster.leader()
        killed_at = time.time()
        cluster.kill(leader.name)
        time.sleep(4.0)
    finally:
        stream.stop()
    stream_ended = time.time()
    sent, received, output = pinger.result(timeout=20)
    cluster.start_member(leader.name)  # back on its data dir, for the tests that follow
    cluster.wait_healthy(20)

    writes_before = [t for t in stream.ack_times if t < killed_at]
    writes_after = [t for t in stream.ack_times if t > killed_at]
    assert len(writes_before) >= 10 and len(writes_after) >= 10, (
        f"{len(writes_before)} writes before, {len(writes_after)} after the kill; "
        f"failures: {stream.failed}"
    )
    write_gap = longest_gap(stream.ack_times, killed_at - 0.5, stream_ended)
    # No lost write: the store holds exactly what the acknowledged writes say.
    present = route_keys(lab)
    for route_id in stream.acked_creates - stream.acked_deletes - stream.unknown:
        assert route_key(route_id) in present, f"acknowledged {route_id} lost"
    for route_id in stream.acked_deletes:
        assert route_key(route_id) not in present, f"acknowledged delete of {route_id} lost"
    # Convergence: one more write, every agent must reach its revision.
    with lab.client() as client:
        client.create_object(
            Route(
                id="route.stream.last",
                tenant_id="demo",
                router_id="r1",
                dst_prefix="10.199.0.0/24",  # type: ignore[arg-type]
                next_hop_port_id="rp.r1.net2",
                next_hop_gateway=VM4,  # type: ignore[arg-type]
            )
        )
    exists, last_revision = store_get(lab, route_key("route.stream.last"))
    assert exists
    converged_in = wait_agents_at(lab, last_revision, timeout=10)
    lost = sent - received
    print(
        f"\nleader {leader.name} killed: {len(stream.acked_creates)} creates and "
        f"{len(stream.acked_deletes)} deletes acknowledged, {len(stream.failed)} unacknowledged "
        f"({stream.failed}); longest gap between acknowledged writes {write_gap:.2f} s; "
        f"agents at revision {last_revision} {converged_in:.2f} s after the last write; "
        f"pings {received}/{sent}"
    )
    assert lost <= 2, output
    assert longest_gap(reply_times(output), killed_at - 0.5, killed_at + 3) < 0.5, output
    # The store resolves the write in flight and the client retries: no write fails, and
    # writes stop for about one etcd election (measured: bench/store_failover.py).
    assert stream.failed == []
    assert write_gap < 3.0


def test_d_whole_store_down_30s_traffic_flows_and_changes_apply_right_after(lab: Lab) -> None:
    cluster = lab.etcd_cluster()
    ping_ok(lab, "vm1", VM3)
    pinger = Pinger(lab, "vm1", VM3, seconds=OUTAGE_SECONDS + 6, interval=0.1)
    time.sleep(1.0)
    upcalls_before = int(lab.fresh_agent_counters("h1")["pipeline"]["upcalls"])
    stopped_at = time.time()
    killed = cluster.kill_all()
    assert len(killed) == 3
    try:
        time.sleep(5.0)
        # New flows, simulated from cached state: vm2 has never talked to vm3 (its ARP request
        # is flooded by h1, the answer comes back through h2), and a TCP connection across the
        # router to a closed port (the SYN must reach vm4, the RST must come back).
        new_l2 = lab.ping("vm2", VM3, count=10, interval=0.1, wait=1.0)
        upcalls_during = int(lab.fresh_agent_counters("h1")["pipeline"]["upcalls"])
        new_tcp = lab.tcp_probe("vm1", VM4, 5999, timeout=3.0)
        # The agents really lost the store: no lease renewal gets through.
        renewals = {host: lab.fresh_agent_counters(host)["agent"] for host in HOSTS}
        time.sleep(max(0.0, stopped_at + 20.0 - time.time()))
        later = {host: lab.fresh_agent_counters(host) for host in HOSTS}
        renewed_during_outage = {
            host: later[host]["agent"]["lease_renewals"] - renewals[host]["lease_renewals"]
            for host in HOSTS
        }
        connected = {host: later[host]["store_connected"] for host in HOSTS}
        time.sleep(max(0.0, stopped_at + OUTAGE_SECONDS - time.time()))
    finally:
        for name in cluster.names():
            if not cluster.is_running(name):
                cluster.start_member(name)
    outage = time.time() - stopped_at
    cluster.wait_healthy(30)
    store_back_at = time.time()

    # Right after: an API change (the API server may need a moment to reconnect).
    with HivenetClient(lab.api_url, lab.token(), timeout=5.0) as client:
        deadline = time.monotonic() + 15
        while True:
            try:
                client.update("port", "vm.vm3", {"admin_state_up": False})
                break
            except (ApiError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        api_accepted_in = time.time() - store_back_at
        try:
            change_revision = store_get(lab, f"{TOPOLOGY_PREFIX}port/vm.vm3")[1]
            applied_in = wait_agents_at(lab, change_revision, timeout=15)
            cut = lab.ping("vm1", VM3, count=3, interval=0.1, wait=0.3)
        finally:
            client.update("port", "vm.vm3", {"admin_state_up": True})
    sent, received, output = pinger.result(timeout=30)
    times = reply_times(output)
    leases_lost = {h: lab.fresh_agent_counters(h)["agent"]["lease_lost"] for h in HOSTS}
    print(
        f"\nstore down {outage:.1f} s: lease renewals from +5 s to +20 s "
        f"{renewed_during_outage}, store_connected at +20 s {connected}; new flows: "
        f"vm2->vm3 ping {new_l2.received}/10 ({upcalls_during - upcalls_before} upcalls on h1), "
        f"vm1->vm4 TCP {new_tcp}; continuous ping: "
        f"{len([t for t in times if stopped_at < t < store_back_at])} replies during the outage, "
        f"longest gap {longest_gap(times, stopped_at, store_back_at):.2f} s, {received}/{sent} "
        f"in all (until vm3 was set down); API write accepted {api_accepted_in:.2f} s after the "
        f"store was healthy, on every agent {applied_in:.2f} s later; leases lost "
        f"{leases_lost}"
    )
    assert outage >= OUTAGE_SECONDS
    assert not any(renewed_during_outage.values()), renewed_during_outage
    assert new_l2.received == 10, new_l2.output
    assert upcalls_during > upcalls_before  # really new flows, simulated during the outage
    assert new_tcp == "refused"
    # The continuous ping went on during the whole outage (until the port was set down).
    assert longest_gap(times, stopped_at, store_back_at) < 1.0, output
    assert api_accepted_in < 10
    assert applied_in < 5
    assert cut.received == 0, cut.output
    # Port up again: traffic is back.
    deadline = time.monotonic() + 5
    while not lab.ping("vm1", VM3, count=1, wait=0.3).ok:
        assert time.monotonic() < deadline, "vm3 did not come back after admin_state_up"


def test_e_dead_host_ports_go_down_everywhere_within_the_lease_ttl(lab: Lab) -> None:
    """A dead host's learned entries (MAC, ARP) vanish with its lease and the others mark it
    down: they invalidate the flows towards it and stop tunnelling to it. (The drop reason the
    counters then show is where the re-simulation stops -- an unresolved neighbour on the
    router, a flood with no live port -- rather than `egress_host_down`.)"""
    ping_ok(lab, "vm1", VM4)  # h1 -> h3 (routed)
    lab.ping("vm3", VM4, count=2)
    ping_ok(lab, "vm3", VM4)  # h2 -> h3 (routed)
    senders = ("h1", "h2")
    pingers = [
        Pinger(lab, "vm1", VM4, seconds=LEASE_TTL + 7, interval=0.1),
        Pinger(lab, "vm3", VM4, seconds=LEASE_TTL + 7, interval=0.1),
    ]
    time.sleep(0.5)
    before = {host: lab.fresh_agent_counters(host) for host in senders}
    lab.kill_agent("h3")  # kill -9, not restarted
    killed_at = time.monotonic()
    alive_gone_after: float | None = None
    last_tunnel_tx: dict[str, tuple[int, float]] = {
        host: (int(before[host]["datapath"]["tunnel_tx_packets"]), 0.0) for host in senders
    }
    try:
        while time.monotonic() - killed_at < LEASE_TTL + 5:
            if alive_gone_after is None and not store_get(lab, host_alive_key("h3"))[0]:
                alive_gone_after = time.monotonic() - killed_at
            for host in senders:
                counters = lab.agent_counters(host) or {}
                sent_so_far = int(counters.get("datapath", {}).get("tunnel_tx_packets", 0))
                if sent_so_far != last_tunnel_tx[host][0]:
                    last_tunnel_tx[host] = (sent_so_far, time.monotonic() - killed_at)
            time.sleep(0.1)
        after = {host: lab.fresh_agent_counters(host) for host in senders}
    finally:
        for pinger in pingers:
            pinger.stop()

    def drops(counters: dict[str, object]) -> int:
        pipeline = counters["pipeline"]
        assert isinstance(pipeline, dict)
        return sum(int(v) for k, v in pipeline.items() if k.startswith("drop."))

    stopped_tunnelling = {host: round(last_tunnel_tx[host][1], 2) for host in senders}
    invalidated = {
        host: after[host]["agent"]["flows_invalidated"] - before[host]["agent"]["flows_invalidated"]
        for host in senders
    }
    new_drops = {host: drops(after[host]) - drops(before[host]) for host in senders}
    print(
        f"\nh3 killed (lease TTL {LEASE_TTL} s): alive key gone after "
        f"{alive_gone_after and round(alive_gone_after, 2)} s; "
        f"last tunnel packet (counters written each second) at {stopped_tunnelling}; "
        f"flows invalidated {invalidated}; new drops {new_drops}"
    )
    assert alive_gone_after is not None and alive_gone_after < LEASE_TTL + 1.5
    assert not store_get(lab, port_active_key("h3", "vm.vm4"))[0]
    for host in senders:
        # Tunnelled towards h3 until it was seen down, then never again although the pings
        # went on. Measured from when the alive key went, not from the kill: the counters file
        # is written each second and this loop polls three sources, so a change is seen up to
        # ~1.5 s late under load (CI saw 5.003 s against a fixed 5.0 s bound from the kill).
        # The loop runs to LEASE_TTL + 5 s, past this bound, so tunnelling on still fails.
        assert last_tunnel_tx[host][1] > 0.5, (host, last_tunnel_tx)
        assert last_tunnel_tx[host][1] < alive_gone_after + 2.5, (
            host,
            alive_gone_after,
            last_tunnel_tx,
        )
        assert invalidated[host] > 0 and new_drops[host] > 0, host
    assert lab.ping("vm1", VM4, count=3, interval=0.1, wait=0.3).received == 0
    ping_ok(lab, "vm1", VM3)  # traffic between live hosts is untouched
