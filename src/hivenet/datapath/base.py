"""The `Datapath` protocol: what the agent asks of a host's packet path.

A datapath owns local interfaces bound to virtual ports, a flow table, and VXLAN tunnels to
other hosts. On a miss it hands (ingress port key, frame) to the upcall handler (the agent, which
simulates); the agent answers with `install_flow` and/or `execute`. Backends: `memory` (strict
in-process fake for tests) and `userspace` (AF_PACKET + UDP VXLAN). A kernel tc/eBPF backend can
implement the same protocol: actions are limited to `hivenet.flows.actions`, and the flow table
is reached only through the operations below (install, invalidate by tags, expire, read a
snapshot of the installed flows with their usage), never as an object of its own.
`tests/unit/datapath/test_contract.py` runs the same cases on every backend.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from hivenet.flows.actions import Action
from hivenet.flows.table import Flow, Tag

# (ingress port tunnel key, raw Ethernet frame) -> None
UpcallHandler = Callable[[int, bytes], None]
# One flow-state message (conntrack/NAT entries, flowstate/wire.py) received from a peer.
FlowStateHandler = Callable[[bytes], None]


def tunnel_peer_set(addresses: Iterable[str] | None) -> frozenset[str] | None:
    """`set_tunnel_peers`' argument as the canonical text of each address (as the socket
    API reports a datagram's source); ValueError naming a bad one."""
    if addresses is None:
        return None
    if isinstance(addresses, str):
        raise ValueError(f"tunnel peers: expected addresses, got the string {addresses!r}")
    peers: set[str] = set()
    for address in addresses:
        try:
            peers.add(str(ipaddress.ip_address(address)))
        except ValueError:
            raise ValueError(f"tunnel peers: {address!r} is not an IP address") from None
    return frozenset(peers)


class Datapath(Protocol):
    def bind_port(self, port_key: int, interface_name: str) -> None:
        """Start receiving from / delivering to `interface_name` as virtual port `port_key`.
        A bad key, or a key or interface already bound, raises ValueError naming it."""
        ...

    def unbind_port(self, port_key: int) -> None:
        """Stop using the port; KeyError when `port_key` is not bound."""
        ...

    def bind_vtep(self, port_key: int, remote_ip: str, vni: int) -> None:
        """Accept VXLAN from the external VTEP at `remote_ip` with `vni` as frames entering
        virtual port `port_key` (flow lookup, upcall on a miss), whether or not `remote_ip`
        is a tunnel peer; nothing else from it. ValueError names a bad or repeated value."""
        ...

    def unbind_vtep(self, port_key: int) -> None:
        """Stop accepting the VTEP bound as `port_key`; KeyError when none is."""
        ...

    def set_upcall_handler(self, handler: UpcallHandler) -> None: ...

    def install_flow(
        self,
        match: tuple[int, ...],
        mask: tuple[int, ...],
        actions: Sequence[Action],
        tags: Iterable[Tag],
        *,
        idle_timeout: float = 60.0,
        hard_timeout: float = 0.0,
        mtu: int = 0,
    ) -> Flow | None:
        """Install a megaflow: packets whose FlowMatch masked by `mask` equals `match`.

        `mtu` (0: none) is the largest IP packet, in L3 bytes (each segment's, for a GSO
        super-frame), the flow carries: a bigger one does not take it. IPv4 with DF and IPv6
        go to the upcall handler as a miss would (the simulation answers with ICMP
        "fragmentation needed" / "packet too big", counted as `mtu_upcalls`); IPv4 without
        DF is dropped and counted as "drop.too_big" (nothing fragments).

        Returns the installed `Flow` (its `removed` turns True when the flow leaves the
        table), or None for a backend that keeps none."""
        ...

    def invalidate(self, tags: Iterable[Tag]) -> int:
        """Remove every flow carrying any of `tags`; returns how many were removed."""
        ...

    def execute(self, frame: bytes, actions: Sequence[Action]) -> None:
        """Apply `actions` to one frame now (the packet that missed, or a generated one)."""
        ...

    def expire_flows(self) -> int:
        """Remove every flow whose idle or hard timeout has passed on the datapath's clock;
        returns how many were removed. (A backend may also do this on its own timer.)"""
        ...

    def flows(self) -> list[Flow]:
        """The installed flows with their tags and usage (packets, bytes, last_used), for
        reading (flow-state refresh, load-balancer counters). One installed flow is the same
        `Flow` object in every call until it is removed; change flows only through
        install_flow/invalidate/expire_flows."""
        ...

    def counters(self) -> dict[str, int]:
        """Counters by name; every backend has "flows" (installed now) and "drop.<reason>"
        for each reason it dropped a frame."""
        ...

    def set_flow_state_handler(self, handler: FlowStateHandler) -> None:
        """Who receives flow-state messages (tunnel key FLOWSTATE_TUNNEL_KEY): the agent."""
        ...

    def send_flow_state(self, remote_ip: str, payload: bytes) -> None:
        """One flow-state message to the host at `remote_ip` over the reserved tunnel key."""
        ...

    def set_tunnel_peers(self, addresses: Iterable[str] | None) -> None:
        """Accept tunnel packets (frames and flow-state messages) only from these underlay
        source addresses (the live members of this host's tunnel zones); any other is
        dropped and counted as "drop.tunnel_unknown_source". None (the initial state):
        accept every source. A bad address raises ValueError naming it."""
        ...
