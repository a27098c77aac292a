"""Pieces every integration-test harness shares: a manual clock (`pass_time` moves it and lets
the loops sleeping on it run), `eventually`, `run`, `synced` and `AgentCloud` -- real `HostAgent`s on the strict memory datapath, wired through one store
and one memory underlay -- with `open_agent_cloud` to set one up and always tear it down.

Owns only these helpers. It must not touch topology (each harness builds its own) nor decide
how an agent is configured beyond the settings every integration cloud uses; the harnesses in
agent/, lb/, stateful/ and sim/ keep what is theirs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hivenet.agent.agent import HostAgent
from hivenet.clock import ManualClock as SleepingManualClock
from hivenet.datapath.memory import MemoryDatapath, MemoryUnderlay
from hivenet.model import TOPOLOGY_PREFIX, Host, Port
from hivenet.store import open_store
from hivenet.store.base import Store
from hivenet.store.keys import TABLES_PREFIX
from hivenet.store.topology import TopologyRepository


class ManualClock:
    """Time only moves when a test sets `now`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll `check` every 10 ms until it holds; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def pass_time(clock: SleepingManualClock, seconds: float, *, step: float = 0.1) -> None:
    """Move `clock` forward by `seconds` in steps. After each step, give the loops it woke a
    moment (real time) to do their work and sleep on it again -- a lease refresh due at some
    step is sent before time moves on. A loop that goes on to wait for something else (the
    publish loop after a successful retry) is waited for at most `grace` seconds."""
    loop = asyncio.get_running_loop()
    grace = 0.2
    moved = 0.0
    while moved < seconds - 1e-9:
        parked = clock.sleepers
        delta = min(step, seconds - moved)
        clock.advance(delta)
        moved += delta
        deadline = loop.time() + grace
        await asyncio.sleep(0.005)
        while clock.sleepers < parked and loop.time() < deadline:
            await asyncio.sleep(0.005)


async def until_gone(store: Store, key: str, timeout: float = 5.0) -> None:
    """Wait until `key` is gone from `store`: after a lease expired on the store's clock, its
    sweep (every lease_check_interval, real time) deletes the lease's keys."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await store.get(key) is not None:
        if loop.time() > deadline:
            raise AssertionError(f"{key} still in the store after {timeout} s")
        await asyncio.sleep(0.01)


def run(coro: Coroutine[Any, Any, None], timeout: float = 30.0) -> None:
    """Run a test scenario on a fresh event loop; fail it after `timeout` seconds."""
    asyncio.run(asyncio.wait_for(coro, timeout))


async def last_change(store: Store, prefix: str) -> int:
    """The revision of the newest key under `prefix` (0 when there is none)."""
    kvs = (await store.range(prefix)).kvs
    return max((kv.mod_revision for kv in kvs), default=0)


async def synced(store: Store, agents: Mapping[str, HostAgent]) -> None:
    """Every agent has published what it learned and applied every topology and table change
    written to `store` so far."""
    await eventually(lambda: all(a.pending_publications == 0 for a in agents.values()))
    topology_rev = await last_change(store, TOPOLOGY_PREFIX)
    tables_rev = await last_change(store, TABLES_PREFIX)
    await eventually(
        lambda: (
            all(a.topology_mirror.revision >= topology_rev for a in agents.values())
            and all(a.tables_mirror.revision >= tables_rev for a in agents.values())
        )
    )


@dataclass(kw_only=True)
class AgentCloud:
    """A cloud of `HostAgent`s on the memory datapath over one store.

    `hosts` maps host id to underlay IP. `ports` (VM name -> its port) and `vm_hosts` (VM
    name -> host id) are filled by harnesses that track their VMs by name: `synced` then also
    waits until every VM port on a live host is bound in that host's datapath."""

    store: Store
    repo: TopologyRepository
    underlay: MemoryUnderlay
    hosts: Mapping[str, str]
    vm_hosts: Mapping[str, str] = field(default_factory=dict)
    agents: dict[str, HostAgent] = field(default_factory=dict)
    datapaths: dict[str, MemoryDatapath] = field(default_factory=dict)
    ports: dict[str, Port] = field(default_factory=dict)

    async def start_host_agent(
        self,
        host_id: str,
        datapath: MemoryDatapath,
        configure: Callable[[HostAgent], None] | None = None,
        **options: Any,
    ) -> HostAgent:
        """Start an agent for `host_id` on `datapath` with the settings every integration
        cloud uses (tunnel zone "tz", 2 s lease, 50 ms reconcile) plus `options`;
        `configure` tunes the agent before it starts."""
        agent = HostAgent(
            self.store,
            datapath,
            host_id=host_id,
            underlay_ip=self.hosts[host_id],
            tunnel_zone_id="tz",
            lease_ttl=2,
            reconcile_interval=0.05,
            **options,
        )
        if configure is not None:
            configure(agent)
        await agent.start()
        self.agents[host_id] = agent
        self.datapaths[host_id] = datapath
        return agent

    async def kill_agent(self, host_id: str) -> None:
        """As close to kill -9 as one process allows: no graceful lease revoke (the host's
        keys vanish when its lease expires), no journal compaction, the datapath (and its
        flows) gone with the process."""
        agent = self.agents.pop(host_id)
        await agent.stop(graceful=False)
        self.underlay.detach(self.hosts[host_id])
        del self.datapaths[host_id]

    async def synced(self) -> None:
        """See `synced`; then every tracked VM port on a live host is bound."""
        await synced(self.store, self.agents)
        await eventually(
            lambda: all(
                self.datapaths[self.vm_hosts[vm]].is_bound(port.tunnel_key)
                for vm, port in self.ports.items()
                if self.vm_hosts[vm] in self.datapaths
            )
        )


CloudT = TypeVar("CloudT", bound=AgentCloud)


@asynccontextmanager
async def open_agent_cloud(
    store_url: str,
    cloud_class: type[CloudT],
    hosts: Mapping[str, str],
    *,
    store_options: Mapping[str, Any] | None = None,
    **fields: Any,
) -> AsyncIterator[CloudT]:
    """Open the store at `store_url` (with `store_options`, e.g. the test's `clock`), register
    `hosts` (host id -> underlay IP) as hosts and yield a `cloud_class` over it, a fresh memory
    underlay and the other `fields`; afterwards stop every agent still running and close the
    store, also when the test failed."""
    store = open_store(store_url, **(store_options or {}))
    repo = TopologyRepository(store)
    for host_id in hosts:
        await repo.create(Host(id=host_id, name=host_id))
    cloud = cloud_class(store=store, repo=repo, underlay=MemoryUnderlay(), hosts=hosts, **fields)
    try:
        yield cloud
    finally:
        for agent in list(cloud.agents.values()):
            await agent.stop()
        await store.close()
