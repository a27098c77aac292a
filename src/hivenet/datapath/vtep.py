"""External VXLAN VTEPs a datapath accepts frames from (the L2 gateway, docs/architecture.md).

Owns `VtepTable`: (VTEP address, VNI) -> the virtual port key its frames enter the overlay
through, with the checks of `Datapath.bind_vtep` (a bad address, VNI or key, or one bound
twice, is a ValueError naming it). A VTEP is not a tunnel peer: a datagram from its address
is accepted only with a VNI bound to it, and then it is a frame entering a bridge (flow
lookup, upcall on a miss), never a delivery by port key or a flow-state message.
Pure: no sockets, no I/O.
"""

from __future__ import annotations

import ipaddress

from hivenet.model.types import TUNNEL_KEY_MAX, TUNNEL_KEY_MIN

# A VTEP's VNI is taken from the port tunnel-key space (the store reserves it), so it is never
# a local port's key: the eBPF datapath's kernel delivers those by key alone.
VTEP_VNI_MIN = TUNNEL_KEY_MIN
VTEP_VNI_MAX = TUNNEL_KEY_MAX


class VtepTable:
    def __init__(self) -> None:
        self._by_source: dict[tuple[str, int], int] = {}
        self._by_key: dict[int, tuple[str, int]] = {}
        # Addresses with at least one VNI bound: the receive paths test this first.
        self.sources: frozenset[str] = frozenset()

    def bind(self, port_key: int, remote_ip: str, vni: int) -> None:
        try:
            address = ipaddress.ip_address(remote_ip)
        except ValueError:
            raise ValueError(f"remote_ip: {remote_ip!r} is not an IP address") from None
        if address.version != 4:
            raise ValueError(f"remote_ip: {remote_ip!r} is not IPv4 (the underlay is IPv4)")
        if isinstance(vni, bool) or not isinstance(vni, int):
            raise ValueError(f"vni: expected an int, got {vni!r}")
        if not VTEP_VNI_MIN <= vni <= VTEP_VNI_MAX:
            raise ValueError(f"vni: {vni:#x} is outside {VTEP_VNI_MIN:#x}..{VTEP_VNI_MAX:#x}")
        if port_key in self._by_key:
            raise ValueError(
                f"port_key: {port_key} is already bound to VTEP {self._by_key[port_key]}"
            )
        source = (str(address), vni)
        if source in self._by_source:
            raise ValueError(
                f"vni: {vni} of VTEP {address} is already bound as port {self._by_source[source]}"
            )
        self._by_source[source] = port_key
        self._by_key[port_key] = source
        self.sources = frozenset(ip for ip, _ in self._by_source)

    def unbind(self, port_key: int) -> None:
        source = self._by_key.pop(port_key, None)
        if source is None:
            raise KeyError(f"port_key: {port_key} is not bound to a VTEP")
        del self._by_source[source]
        self.sources = frozenset(ip for ip, _ in self._by_source)

    def port_key(self, remote_ip: str, vni: int) -> int | None:
        """The port a frame from `remote_ip` with `vni` enters by; None: not accepted."""
        return self._by_source.get((remote_ip, vni))

    def __contains__(self, port_key: object) -> bool:
        return port_key in self._by_key

    def bound(self) -> dict[int, tuple[str, int]]:
        return dict(self._by_key)
