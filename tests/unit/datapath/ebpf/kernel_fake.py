"""A strict in-process stand-in for the eBPF datapath's kernel side (`FastPathKernel`), so the
unit tier runs `EbpfDatapath` without root: it keeps the flow and port maps as bytes, and
`forward()` does what hn_port_ingress does with a hit (a packet larger than the entry's mtu is
a miss; decoding the entry record the datapath
wrote, applying it with the Python reference `execute_actions`, counting it on the entry).
tests/e2e/test_ebpf_programs.py checks the real programs against the same reference.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from hivenet.datapath.ebpf import entries
from hivenet.flows.actions import Action, DecTtl, Output, SetField, Tunnel
from hivenet.flows.execute import execute_actions
from hivenet.flows.table import flow_match_values
from hivenet.packets import extract_flow_match
from hivenet.packets.errors import PacketError
from hivenet.packets.mtu import ip_size
from tests.unit.datapath.fakes import ReplaySocket

TUNNEL_IFINDEX = 900
_FIELDS = (
    (entries.SET_ETH_SRC, "eth_src"),
    (entries.SET_ETH_DST, "eth_dst"),
    (entries.SET_IP_SRC, "ip_src"),
    (entries.SET_IP_DST, "ip_dst"),
    (entries.SET_TP_SRC, "tp_src"),
    (entries.SET_TP_DST, "tp_dst"),
)


def decode_entry(value: bytes, port_of_ifindex: dict[int, int]) -> list[Action]:
    """The action list a `hn_flow_entry` record stands for (the inverse of kernel_entry)."""
    (_p, _b, flags, out_ifindex, tunnel_id, remote, ip_src, ip_dst, tp_src, tp_dst, eth_src,
     eth_dst, _mtu) = entries.FLOW_ENTRY.unpack(value)  # fmt: skip
    stored = {"eth_src": eth_src, "eth_dst": eth_dst, "ip_src": ip_src, "ip_dst": ip_dst,
              "tp_src": tp_src, "tp_dst": tp_dst}  # fmt: skip
    actions: list[Action] = [
        SetField(name, int.from_bytes(stored[name], "big")) for bit, name in _FIELDS if flags & bit
    ]
    if flags & entries.DEC_TTL:
        actions.append(DecTtl())
    if flags & entries.OUT_TUNNEL:
        assert out_ifindex == TUNNEL_IFINDEX
        actions.append(Tunnel(str(ipaddress.IPv4Address(remote)), tunnel_id))
    else:
        actions.append(Output(port_of_ifindex[out_ifindex]))
    return actions


class FakeKernel:
    def __init__(self, *, with_tunnel: bool = True) -> None:
        self.tunnel_ifindex: int | None = TUNNEL_IFINDEX if with_tunnel else None
        self.flows: dict[bytes, bytes] = {}
        self.ports: dict[int, int] = {}  # port key -> ifindex
        self.interfaces: dict[str, int] = {}
        self.underlay = ReplaySocket()
        self.set_up = False
        self.closed = False
        self.tunnel_peers: frozenset[str] | None = None
        self.unknown_source_drops = 0

    def setup(self) -> None:
        self.set_up = True

    def close(self) -> None:
        self.closed = True

    def open_underlay_socket(self) -> socket.socket | None:
        return self.underlay if self.tunnel_ifindex else None  # type: ignore[return-value]

    def attach_port(self, port_key: int, interface_name: str, sock: socket.socket) -> int:
        ifindex = self.interfaces.setdefault(interface_name, 100 + len(self.interfaces))
        self.ports[port_key] = ifindex
        return ifindex

    def port_frames(self, ifindex: int) -> int | None:
        return None  # no interface behind it: no stack-drop count

    def detach_port(self, port_key: int, interface_name: str) -> None:
        del self.ports[port_key]

    def set_entry(self, key: bytes, value: bytes) -> None:
        assert len(key) == entries.FLOW_KEY.size and len(value) == entries.FLOW_ENTRY.size
        self.flows[key] = value

    def delete_entry(self, key: bytes) -> None:
        del self.flows[key]

    def entry_counters(self, key: bytes) -> tuple[int, int] | None:
        value = self.flows.get(key)
        return None if value is None else entries.entry_counters(value)

    def all_entry_counters(self) -> dict[bytes, tuple[int, int]]:
        return {key: entries.entry_counters(value) for key, value in self.flows.items()}

    def counters(self) -> dict[str, int]:
        return {
            "kernel_fake_entries": len(self.flows),
            "drop.kernel_tunnel_unknown_source": self.unknown_source_drops,
        }

    def set_tunnel_peers(self, addresses: frozenset[str] | None) -> None:
        self.tunnel_peers = addresses

    def forward(self, port_key: int, frame: bytes) -> list[tuple[Action, bytes]] | None:
        """What tc ingress does with `frame` from port `port_key`: None on a miss (the agent's
        tap has it), else the (Output | Tunnel, frame) it sends, counted on the entry."""
        ifindex = self.ports[port_key]
        try:
            values = flow_match_values(extract_flow_match(frame, port_key))
        except PacketError:
            return None
        key = entries.kernel_key(values, ifindex)
        value = self.flows.get(key) if key is not None else None
        if key is None or value is None:
            return None
        mtu = entries.FLOW_ENTRY.unpack(value)[-1]
        size = ip_size(frame)
        if mtu and size is not None and size[1] > mtu:
            return None
        packets, byte_count = entries.entry_counters(value)
        self.flows[key] = struct.pack("=QQ", packets + 1, byte_count + len(frame)) + value[16:]
        port_of_ifindex = {index: key for key, index in self.ports.items()}
        return execute_actions(frame, decode_entry(value, port_of_ifindex))  # type: ignore[return-value]
