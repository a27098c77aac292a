"""`MemoryDatapath`: a strict in-process fake of one host's datapath, and `MemoryUnderlay`,
the fake IP network that carries VXLAN between several of them.

Owns exact flow-table semantics for tests (a real `hivenet.flows.FlowTable`), strictness in
the spirit of Faucet's FakeOFTable (an unknown action, an output to a port key not bound on
this host, or a tunnel to an underlay address nobody owns raises `DatapathError` at install
or execute time, so a simulation bug fails the test instead of vanishing), delivery records
per bound port, and the egress half of a tunnel (the tunnel key names the egress port; no
simulation happens there). Does not simulate: misses go to the upcall handler (the agent).
Imports only packets/flows/model (see tests/unit/test_layers.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from hivenet.datapath._fragments import FragmentKey, FragmentTracker, ipv4_fragment
from hivenet.datapath.base import UpcallHandler, tunnel_peer_set
from hivenet.datapath.vtep import VtepTable
from hivenet.flows.actions import Action as FlowAction
from hivenet.flows.actions import (
    DecTtl,
    Drop,
    Output,
    PopVlan,
    PushVlan,
    SetField,
    Tunnel,
)
from hivenet.flows.execute import execute_actions
from hivenet.flows.table import Flow, FlowTable, Tag
from hivenet.model.types import FLOWSTATE_TUNNEL_KEY
from hivenet.packets import PacketError, extract_flow_match
from hivenet.packets.flowmatch import ETH_TYPE_IPV4
from hivenet.packets.mtu import FITS, TOO_BIG, mtu_verdict
from hivenet.packets.options import ipv4_unroutable

_KNOWN_ACTIONS = (SetField, DecTtl, PushVlan, PopVlan, Output, Tunnel, Drop)


def _drop_reason(actions: Sequence[FlowAction]) -> str:
    """The counter name of a frame that actions leave nowhere (the userspace datapath's)."""
    if not actions:
        return "flow_no_actions"
    reason = next((a.reason for a in actions if isinstance(a, Drop)), None)
    return "flow_no_output" if reason is None else f"flow_{reason}"


class DatapathError(ValueError):
    """Something a real datapath would refuse (the message names the field and value). A
    ValueError, as the userspace datapath raises for bad input, so callers catch one type."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """A frame handed to a local interface."""

    port_key: int
    interface_name: str
    frame: bytes


@dataclass(slots=True)
class _Counters:
    received: int = 0
    hits: int = 0
    misses: int = 0
    mtu_upcalls: int = 0
    upcalls_without_handler: int = 0
    malformed: int = 0
    executed: int = 0
    delivered: int = 0
    tunnelled: int = 0
    tunnel_received: int = 0
    dropped: int = 0
    installs: int = 0
    invalidated: int = 0
    flowstate_sent: int = 0
    flowstate_received: int = 0
    by_drop_reason: dict[str, int] = field(default_factory=dict)


class MemoryUnderlay:
    """Connects `MemoryDatapath`s by underlay IP. Delivery is immediate (the egress side does
    no simulation, so it cannot recurse). `partition(a, b)` drops traffic between two
    addresses (both directions) until `heal()`; `drop_all` drops everything."""

    def __init__(self) -> None:
        self._hosts: dict[str, MemoryDatapath] = {}
        self._partitions: set[frozenset[str]] = set()
        self.drop_all = False
        self.sent = 0
        self.dropped = 0

    def attach(self, underlay_ip: str, datapath: MemoryDatapath) -> None:
        if underlay_ip in self._hosts and self._hosts[underlay_ip] is not datapath:
            raise DatapathError(f"underlay_ip {underlay_ip!r} is already attached")
        self._hosts[underlay_ip] = datapath

    def detach(self, underlay_ip: str) -> None:
        self._hosts.pop(underlay_ip, None)

    def knows(self, underlay_ip: str) -> bool:
        return underlay_ip in self._hosts

    def partition(self, first_ip: str, second_ip: str) -> None:
        self._partitions.add(frozenset((first_ip, second_ip)))

    def heal(self) -> None:
        self._partitions.clear()
        self.drop_all = False

    def send(self, source_ip: str, remote_ip: str, tunnel_key: int, frame: bytes) -> bool:
        """Carry one VXLAN frame; False when the fake network dropped it."""
        destination = self._hosts.get(remote_ip)
        if destination is None:
            raise DatapathError(f"tunnel remote_ip {remote_ip!r} is not an underlay address")
        self.sent += 1
        if self.drop_all or frozenset((source_ip, remote_ip)) in self._partitions:
            self.dropped += 1
            return False
        destination.receive_tunnel(tunnel_key, frame, source_ip=source_ip)
        return True


class MemoryDatapath:
    """One host's datapath, in memory. Implements `hivenet.datapath.base.Datapath`.

    `receive(port_key, frame)` is a VM sending a frame on its interface; frames the
    datapath delivers to local interfaces are recorded per port (`take(port_key)`).
    `flow_table` is the fake's own (tests and benchmarks may read it); the agent sees only the
    protocol.
    """

    def __init__(
        self,
        host_id: str,
        underlay_ip: str,
        underlay: MemoryUnderlay | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_flows: int = 100_000,
    ) -> None:
        self.host_id = host_id
        self.underlay_ip = underlay_ip
        self.underlay = underlay
        self.clock = clock
        self.flow_table = FlowTable(max_flows)
        self._interfaces: dict[int, str] = {}
        self._delivered: dict[int, list[bytes]] = {}
        self.deliveries: list[Delivery] = []
        self._handler: UpcallHandler | None = None
        self._flow_state_handler: Callable[[bytes], None] | None = None
        self._counters = _Counters()
        self._tunnel_peers: frozenset[str] | None = None
        self._vteps = VtepTable()
        self.fragments = FragmentTracker()
        self._recording_fragment: FragmentKey | None = None
        if underlay is not None:
            underlay.attach(underlay_ip, self)

    # ---------------------------------------------------------------- Datapath protocol

    def bind_port(self, port_key: int, interface_name: str) -> None:
        if not isinstance(port_key, int) or not 1 <= port_key <= 0xEFFFFF:
            raise DatapathError(f"bind_port: port_key {port_key!r} is not a port tunnel key")
        if not interface_name:
            raise DatapathError(f"bind_port: interface_name {interface_name!r} is empty")
        bound = self._interfaces.get(port_key)
        if bound is not None:
            raise DatapathError(f"bind_port: port_key {port_key} is already bound to {bound!r}")
        for key, name in self._interfaces.items():
            if name == interface_name:
                raise DatapathError(
                    f"bind_port: interface_name {interface_name!r} is already bound as port {key}"
                )
        self._interfaces[port_key] = interface_name
        self._delivered.setdefault(port_key, [])

    def unbind_port(self, port_key: int) -> None:
        if self._interfaces.pop(port_key, None) is None:
            raise KeyError(f"unbind_port: port_key {port_key} is not bound on {self.host_id}")

    def bind_vtep(self, port_key: int, remote_ip: str, vni: int) -> None:
        if not isinstance(port_key, int) or not 1 <= port_key <= 0xEFFFFF:
            raise DatapathError(f"bind_vtep: port_key {port_key!r} is not a port tunnel key")
        if port_key in self._interfaces:
            raise DatapathError(f"bind_vtep: port_key {port_key} is bound to an interface")
        self._vteps.bind(port_key, remote_ip, vni)

    def unbind_vtep(self, port_key: int) -> None:
        self._vteps.unbind(port_key)

    def set_upcall_handler(self, handler: UpcallHandler) -> None:
        self._handler = handler

    def install_flow(
        self,
        match: tuple[int, ...],
        mask: tuple[int, ...],
        actions: Sequence[FlowAction],
        tags: Iterable[Tag],
        *,
        idle_timeout: float = 60.0,
        hard_timeout: float = 0.0,
        mtu: int = 0,
    ) -> Flow | None:
        self._check_actions(actions, "install_flow")
        try:
            flow = self.flow_table.install(
                match,
                mask,
                actions,
                tags,
                self.clock(),
                idle_timeout=idle_timeout,
                hard_timeout=hard_timeout,
                mtu=mtu,
            )
        except ValueError as error:
            raise DatapathError(f"install_flow: {error}") from error
        self._counters.installs += 1
        return flow

    def invalidate(self, tags: Iterable[Tag]) -> int:
        removed = len(self.flow_table.invalidate(tags))
        self._counters.invalidated += removed
        return removed

    def execute(self, frame: bytes, actions: Sequence[FlowAction]) -> None:
        self._check_actions(actions, "execute")
        self._counters.executed += 1
        if self._recording_fragment is not None:
            self.fragments.record(self._recording_fragment, tuple(actions))
            self._recording_fragment = None
        outputs = execute_actions(frame, actions)
        if not outputs:
            self._count_drop(_drop_reason(actions))
        for action, out_frame in outputs:
            if isinstance(action, Output):
                self._deliver(action.port_key, out_frame)
            else:
                self._counters.tunnelled += 1
                assert self.underlay is not None  # _check_actions guarantees it
                self.underlay.send(self.underlay_ip, action.remote_ip, action.tunnel_key, out_frame)

    def expire_flows(self) -> int:
        return len(self.flow_table.expire(self.clock()))

    def flows(self) -> list[Flow]:
        return self.flow_table.flows()

    def counters(self) -> dict[str, int]:
        counters = self._counters
        out = {
            name: getattr(counters, name)
            for name in counters.__dataclass_fields__
            if name != "by_drop_reason"
        }
        out["flows"] = len(self.flow_table)
        for reason, count in counters.by_drop_reason.items():
            out[f"drop.{reason}"] = count
        return out

    # ---------------------------------------------------------------- the fake's own API

    def receive(self, port_key: int, frame: bytes) -> None:
        """A frame sent by the VM on the interface bound to `port_key`."""
        if port_key not in self._interfaces:
            raise DatapathError(f"receive: port_key {port_key} is not bound on {self.host_id}")
        self._ingress(port_key, frame)

    def _ingress(self, port_key: int, frame: bytes) -> None:
        self._counters.received += 1
        fragment, tiny = ipv4_fragment(frame, port_key)
        if tiny is not None:
            self._count_drop(tiny)
            return
        try:
            match = extract_flow_match(frame, port_key)
        except PacketError:
            match = None
        if match is None:
            # As the userspace datapath does: a frame no parser accepts is never upcalled.
            self._counters.malformed += 1
            self._count_drop("malformed_frame")
            return
        now = self.clock()
        if fragment is not None:  # as the userspace datapath does (`datapath._fragments`)
            if fragment.start:
                actions, mtu, reason = self.fragments.later(fragment, now)
                if actions is None:
                    self._count_drop(reason or "fragment_no_first")
                elif mtu and len(frame) > mtu + 14:
                    self._count_drop("too_big")
                elif any(isinstance(action, DecTtl) for action in actions) and (
                    refused := ipv4_unroutable(frame, 18 if frame[12:14] == b"\x81\x00" else 14)
                ):
                    self._count_drop(refused)
                else:
                    self.execute(frame, actions)
                return
            reason = self.fragments.first(fragment, now)
            if reason is not None:
                self._count_drop(reason)
                return
        flow = self.flow_table.lookup(match, now, packet_bytes=len(frame))
        verdict = mtu_verdict(frame, flow.mtu) if flow is not None else FITS
        refused = (
            ipv4_unroutable(frame, 18 if frame[12:14] == b"\x81\x00" else 14)
            if flow is not None
            and match.eth_type == ETH_TYPE_IPV4
            and any(isinstance(action, DecTtl) for action in flow.actions)
            else None
        )
        if refused is not None:
            # As the userspace datapath: a routed flow re-checks every packet's header.
            self._count_drop(refused)
            return
        if flow is not None and verdict == FITS:
            self._counters.hits += 1
            if fragment is not None:
                self.fragments.record(fragment.key, tuple(flow.actions), flow.mtu)
            self.execute(frame, flow.actions)
            return
        if verdict == TOO_BIG:  # larger than the flow's MTU, may not be fragmented: the agent
            self._counters.mtu_upcalls += 1
        elif flow is not None:  # IPv4 without DF: nothing fragments
            self._count_drop("too_big")
            return
        else:
            self._counters.misses += 1
        if self._handler is None:
            self._counters.upcalls_without_handler += 1
            self._count_drop("no_upcall_handler")
            return
        if fragment is None:
            self._handler(port_key, frame)
            return
        self._recording_fragment = fragment.key  # the agent's first execute is its verdict
        try:
            self._handler(port_key, frame)
        finally:
            self._recording_fragment = None

    def set_flow_state_handler(self, handler: Callable[[bytes], None]) -> None:
        """Who receives flow-state messages (tunnel key FLOWSTATE_TUNNEL_KEY): the agent."""
        self._flow_state_handler = handler

    def send_flow_state(self, remote_ip: str, payload: bytes) -> None:
        """A flow-state message to the host at `remote_ip` over the reserved tunnel key."""
        if self.underlay is None or not self.underlay.knows(remote_ip):
            raise DatapathError(
                f"send_flow_state: remote_ip {remote_ip!r} is not an underlay address"
            )
        if remote_ip == self.underlay_ip:
            raise DatapathError(f"send_flow_state: remote_ip {remote_ip!r} is this host")
        if not payload:
            raise DatapathError("send_flow_state: empty payload")
        self._counters.flowstate_sent += 1
        self.underlay.send(self.underlay_ip, remote_ip, FLOWSTATE_TUNNEL_KEY, payload)

    def set_tunnel_peers(self, addresses: Iterable[str] | None) -> None:
        self._tunnel_peers = tunnel_peer_set(addresses)

    def receive_tunnel(
        self, tunnel_key: int, frame: bytes, *, source_ip: str | None = None
    ) -> None:
        """The egress half of a tunnel: deliver to the port the key names (or, for the
        reserved flow-state key, hand the message to the flow-state handler). `source_ip`:
        the outer source address (None: unknown, refused once tunnel peers are set)."""
        if source_ip is not None and source_ip in self._vteps.sources:
            vtep_port = self._vteps.port_key(source_ip, tunnel_key)
            if vtep_port is None:
                self._count_drop("tunnel_unknown_source")
            else:  # an external VTEP's frame enters the overlay here (the L2 gateway)
                self._ingress(vtep_port, frame)
            return
        peers = self._tunnel_peers
        if peers is not None and source_ip not in peers:
            self._count_drop("tunnel_unknown_source")
            return
        if tunnel_key == FLOWSTATE_TUNNEL_KEY:
            self._counters.flowstate_received += 1
            if self._flow_state_handler is None:
                self._count_drop("flowstate_without_handler")
                return
            self._flow_state_handler(frame)
            return
        self._counters.tunnel_received += 1
        if tunnel_key not in self._interfaces:
            raise DatapathError(
                f"tunnel key {tunnel_key} arrived at {self.host_id} ({self.underlay_ip}) "
                "but no port with that key is bound here"
            )
        self._deliver(tunnel_key, frame)

    def take(self, port_key: int) -> list[bytes]:
        """Frames delivered to `port_key` since the last `take`, in order."""
        frames = self._delivered.get(port_key, [])
        self._delivered[port_key] = []
        return frames

    def is_bound(self, port_key: int) -> bool:
        return port_key in self._interfaces

    # ---------------------------------------------------------------- internals

    def _deliver(self, port_key: int, frame: bytes) -> None:
        interface = self._interfaces.get(port_key)
        if interface is None:
            raise DatapathError(f"output: port_key {port_key} is not bound on {self.host_id}")
        self._counters.delivered += 1
        self._delivered.setdefault(port_key, []).append(frame)
        self.deliveries.append(Delivery(port_key, interface, frame))

    def _count_drop(self, reason: str) -> None:
        self._counters.dropped += 1
        by_reason = self._counters.by_drop_reason
        by_reason[reason] = by_reason.get(reason, 0) + 1

    def _check_actions(self, actions: Sequence[FlowAction], operation: str) -> None:
        for index, action in enumerate(actions):
            if not isinstance(action, _KNOWN_ACTIONS):
                raise DatapathError(
                    f"{operation}: actions[{index}] {action!r} is not a flow action"
                )
            if isinstance(action, Output) and action.port_key not in self._interfaces:
                raise DatapathError(
                    f"{operation}: actions[{index}] outputs to port_key {action.port_key}, "
                    f"which is not bound on host {self.host_id}"
                )
            if isinstance(action, Tunnel):
                if self.underlay is None or not self.underlay.knows(action.remote_ip):
                    raise DatapathError(
                        f"{operation}: actions[{index}] tunnels to remote_ip "
                        f"{action.remote_ip!r}, which is not an underlay address"
                    )
                if action.remote_ip == self.underlay_ip:
                    raise DatapathError(
                        f"{operation}: actions[{index}] tunnels to this host's own underlay_ip "
                        f"{action.remote_ip!r} (a local port must use Output)"
                    )
