"""`Cloud`: several hosts in one process -- one shared TopologyView and shared tables, a
`MemoryDatapath` + `FlowPipeline` per host, a `MemoryUnderlay` between them -- so scenario
tests read as "topology + inject a frame at a VM port + assert what each VM port received".

Learned entries are applied to the shared tables and their tags invalidated on every host,
as the agents will do through the store. Time is a manual clock (`advance()`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from hivenet.agent.pipeline import FlowPipeline
from hivenet.clock import ManualClock
from hivenet.datapath.memory import MemoryDatapath, MemoryUnderlay
from hivenet.model import Port, TopologyObject, TunnelZone, TunnelZoneMember
from hivenet.sim import LearnedEntry, MemoryTables, TopologyView


class Cloud:
    def __init__(self, hosts: Sequence[str]) -> None:
        self.clock = ManualClock()
        self.topology = TopologyView()
        self.tables = MemoryTables()
        self.underlay = MemoryUnderlay()
        self.datapaths: dict[str, MemoryDatapath] = {}
        self.pipelines: dict[str, FlowPipeline] = {}
        members = []
        for index, host_id in enumerate(hosts, 1):
            underlay_ip = f"192.0.2.{index}"
            datapath = MemoryDatapath(host_id, underlay_ip, self.underlay, clock=self.clock)
            self.datapaths[host_id] = datapath
            self.pipelines[host_id] = FlowPipeline(
                host_id,
                datapath,
                self.topology,
                self.tables,
                on_learned=self.publish,
                clock=self.clock,
            )
            members.append(
                TunnelZoneMember(host_id=host_id, underlay_ip=ipaddress.ip_address(underlay_ip))
            )
        self.apply(TunnelZone(id="underlay", members=tuple(members)))

    # --- topology and tables, as the agents' watch loops would apply them ---

    def apply(self, *objects: TopologyObject) -> None:
        for obj in objects:
            old = self.topology.get(obj.KIND, obj.id)
            if isinstance(old, Port) and old.host_id and old.interface_name:
                self.datapaths[old.host_id].unbind_port(old.tunnel_key)
            self.invalidate(self.topology.apply(obj))
            if isinstance(obj, Port) and obj.host_id and obj.interface_name:
                self.datapaths[obj.host_id].bind_port(obj.tunnel_key, obj.interface_name)

    def remove(self, kind: str, object_id: str) -> None:
        old = self.topology.get(kind, object_id)
        if isinstance(old, Port) and old.host_id and old.interface_name:
            self.datapaths[old.host_id].unbind_port(old.tunnel_key)
        self.invalidate(self.topology.remove(kind, object_id))

    def publish(self, entries: Sequence[LearnedEntry]) -> None:
        tags = [tag for entry in entries if (tag := self.tables.learn(entry)) is not None]
        self.invalidate(tags)

    def invalidate(self, tags: Iterable[str]) -> None:
        tags = list(tags)
        if tags:
            for datapath in self.datapaths.values():
                datapath.invalidate(tags)

    # --- traffic ---

    def port(self, port_id: str) -> Port:
        port = self.topology.get("port", port_id)
        assert isinstance(port, Port), f"no port {port_id!r}"
        return port

    def send(self, port_id: str, frame: bytes) -> None:
        """The VM on `port_id` sends `frame`."""
        port = self.port(port_id)
        assert port.host_id is not None, f"port {port_id} is not bound"
        self.datapaths[port.host_id].receive(port.tunnel_key, frame)

    def received(self, port_id: str) -> list[bytes]:
        """Frames delivered to the VM on `port_id` since the last call."""
        port = self.port(port_id)
        assert port.host_id is not None, f"port {port_id} is not bound"
        return self.datapaths[port.host_id].take(port.tunnel_key)

    def inboxes(self, port_ids: Iterable[str]) -> dict[str, int]:
        """How many frames each port received (and clears them)."""
        return {port_id: len(self.received(port_id)) for port_id in port_ids}

    def counters(self, host_id: str) -> dict[str, float]:
        return {**self.datapaths[host_id].counters(), **self.pipelines[host_id].counters()}

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        for datapath in self.datapaths.values():
            datapath.expire_flows()
