"""`KernelFastPath`: the kernel objects of one host's eBPF fast path, made and removed here.

Owns: loading bpf/hn_fastpath.o with `bpftool prog loadall` (programs and maps pinned under
/sys/fs/bpf/hn-<name>/, mounting the BPF filesystem there first if needed), the collect-metadata
VXLAN device (`ip link ... type vxlan external`, default name hnvx0) with hn_tunnel_ingress at its
tc ingress, the clsact qdisc + hn_port_ingress filter of each bound port, the socket filters on
the agent's AF_PACKET sockets, the hn_underlay_ingress filter on the underlay interface (one
filter at its own preference; the qdisc is removed only if this made it), the map operations
(flow entries, port keys, counters) and the VXLAN device's own receive errors and drops.

Why these tools: `bpftool` (Debian's, built on libbpf) is the maintained loader, so there is no
ELF loader here; `tc` attaches a pinned program in one command; the map updates that run per
offloaded flow go through the bpf(2) shim (`bpfsys`), not a subprocess.

Must not touch: interfaces it was not handed, pins outside its own directory, or any object
without the `hn` prefix. Everything it made is removed by `close()`; after a crash,
`remove_stale_pins()` (from `hivenet lab clean`) and the lab's link sweep remove the rest.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
from itertools import count
from pathlib import Path

from hivenet.datapath.ebpf import bpfsys
from hivenet.datapath.ebpf.entries import FLOW_ENTRY, FLOW_KEY, entry_counters

BPFFS = Path("/sys/fs/bpf")
PIN_PREFIX = "hn-"
DEFAULT_OBJECT = Path(__file__).resolve().parent / "bpf" / "hn_fastpath.o"
OBJECT_ENV = "HIVENET_BPF_OBJECT"
DEFAULT_VXLAN_DEVICE = "hnvx0"

SO_ATTACH_BPF = 50
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
# enum hn_counter in hn_fastpath.c, in order.
KERNEL_COUNTERS = (
    "kernel_hits",
    "kernel_misses",
    "kernel_tunnel_delivered",
    "drop.kernel_tunnel_unknown_key",  # only a reassembled datagram (no agent saw it)
    "drop.kernel_tunnel_fragmented_flowstate",  # likewise
    "drop.kernel_action_failed",
    "drop.kernel_tunnel_unknown_source",
    "kernel_underlay_to_agent",  # the agent's socket took it: the kernel dropped its copy
    "drop.kernel_port_tx_too_big",  # larger than the port's MTU (bpf_check_mtu)
)
# tc preference of hn_underlay_ingress on the underlay interface (a shared interface: one
# filter of ours among whatever else is there).
UNDERLAY_FILTER_PREF = "20040"
CONFIG_VXLAN_PORT = 0
CONFIG_PEERS = 1  # hn_config index: 1 = hn_tunnel_peers is enforced
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")
# The (packets, bytes) at the head of a flow entry (struct hn_flow_entry), the rest skipped.
_ENTRY_COUNTERS = struct.Struct(f"=QQ{FLOW_ENTRY.size - 16}x")
_instances = count()


class FastPathUnavailable(RuntimeError):
    """The eBPF fast path cannot run here; the message is one line saying why."""


def object_path() -> Path:
    """The compiled program: $HIVENET_BPF_OBJECT, else the one `make` builds beside its source."""
    return Path(os.environ.get(OBJECT_ENV) or DEFAULT_OBJECT)


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise FastPathUnavailable(f"{' '.join(argv[:4])}...: {detail[-1] if detail else '?'}")


def _is_bpffs(path: Path) -> bool:
    try:
        with open("/proc/self/mounts") as mounts:
            return any(line.split()[1] == str(path) and line.split()[2] == "bpf" for line in mounts)
    except OSError:
        return False


def ensure_bpffs() -> None:
    """Mount the BPF filesystem on /sys/fs/bpf unless it is there (`ip netns exec` gives a
    process a fresh /sys without it; such a mount lives in that process's mount namespace)."""
    if not _is_bpffs(BPFFS):
        _run(["mount", "-t", "bpf", "bpf", str(BPFFS)])


def remove_pins(directory: Path) -> None:
    if directory.is_dir():
        for pinned in directory.iterdir():
            pinned.unlink(missing_ok=True)
        directory.rmdir()


def remove_stale_pins(*, every: bool = False) -> list[str]:
    """Remove the /sys/fs/bpf/hn-* directories of datapaths that are gone (named hn-<pid>-<n>:
    that PID no longer runs), or all of them with `every`; returns their names."""
    if not _is_bpffs(BPFFS):
        return []
    removed = []
    for directory in sorted(BPFFS.glob(f"{PIN_PREFIX}*")):
        owner = directory.name[len(PIN_PREFIX) :].split("-")[0]
        if not every and owner.isdigit() and Path(f"/proc/{owner}").exists():
            continue
        remove_pins(directory)
        removed.append(directory.name)
    return removed


def underlay_interface(underlay_ip: str) -> str:
    """The interface of this namespace that carries `underlay_ip` (`ip -j addr`: callable
    from inside a running event loop, unlike pyroute2's synchronous IPRoute)."""
    result = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True)
    for link in json.loads(result.stdout or "[]"):
        for address in link.get("addr_info", []):
            if address.get("local") == underlay_ip:
                return str(link["ifname"])
    raise FastPathUnavailable(f"underlay_ip {underlay_ip!r} is on no interface here")


class KernelFastPath:
    """The kernel side of one `EbpfDatapath` (see the module docstring)."""

    def __init__(
        self,
        underlay_ip: str | None,
        *,
        vxlan_port: int,
        name: str | None = None,
        vxlan_device: str = DEFAULT_VXLAN_DEVICE,
    ) -> None:
        self.name = name or f"{PIN_PREFIX}{os.getpid()}-{next(_instances)}"
        if not self.name.startswith(PIN_PREFIX) or "/" in self.name:
            raise ValueError(f"name: {self.name!r} must start with {PIN_PREFIX!r}, without '/'")
        if not vxlan_device.startswith("hn") or len(vxlan_device) > 15:
            raise ValueError(f"vxlan_device: {vxlan_device!r} must be an hn* interface name")
        self.underlay_ip = underlay_ip
        self.vxlan_port = vxlan_port
        self.vxlan_device = vxlan_device
        self.pin_dir = BPFFS / self.name
        self.tunnel_ifindex: int | None = None
        self._fds: dict[str, int] = {}
        self._vxlan_made = False
        self._attached: dict[int, str] = {}
        self._ifindexes: dict[int, int] = {}
        self._tunnel_peers: set[int] = set()  # in hn_tunnel_peers (host byte order)
        self._underlay_filtered: str | None = None  # the interface with hn_underlay_ingress
        self._underlay_qdisc_made = False

    # ---- life cycle -------------------------------------------------------------------------

    def setup(self) -> None:
        """Load, pin and wire everything; FastPathUnavailable (and nothing left behind) when
        this host cannot run it."""
        if os.geteuid() != 0:
            raise FastPathUnavailable("needs root (BPF programs and tc filters)")
        for tool in ("bpftool", "tc", "ip"):
            if shutil.which(tool) is None:
                raise FastPathUnavailable(f"{tool} is not installed (make install adds it)")
        program = object_path()
        if not program.is_file():
            raise FastPathUnavailable(f"no BPF object at {program} (make install builds it)")
        try:
            ensure_bpffs()
            remove_pins(self.pin_dir)
            _run(["bpftool", "prog", "loadall", str(program), str(self.pin_dir),
                  "pinmaps", str(self.pin_dir)])  # fmt: skip
            for pinned in ("hn_flows", "hn_ports", "hn_counters", "hn_config",
                           "hn_tunnel_peers", "hn_port_upcall", "hn_underlay_upcall",
                           "hn_port_frames"):  # fmt: skip
                self._fds[pinned] = bpfsys.object_get(str(self.pin_dir / pinned))
            bpfsys.map_update(
                self._fds["hn_config"], _U32.pack(CONFIG_VXLAN_PORT), _U32.pack(self.vxlan_port)
            )
            if self.underlay_ip is not None:
                self._make_vxlan_device()
        except BaseException as error:
            self.close()
            if isinstance(error, OSError):
                raise FastPathUnavailable(str(error)) from error
            raise

    def _make_vxlan_device(self) -> None:
        device = self.vxlan_device
        # An agent killed with -9 leaves its device behind, still holding the VXLAN port; it is
        # this host's own (one agent per host), so its successor replaces it, as with the pins.
        subprocess.run(["ip", "link", "del", device], capture_output=True)
        _run(["ip", "link", "add", device, "type", "vxlan", "external", "dstport",
              str(self.vxlan_port), "nolearning"])  # fmt: skip
        self._vxlan_made = True
        _run(["ip", "link", "set", device, "up"])
        _run(["tc", "qdisc", "replace", "dev", device, "clsact"])
        _run(["tc", "filter", "replace", "dev", device, "ingress", "pref", "1", "handle", "1",
              "bpf", "da", "pinned", str(self.pin_dir / "hn_tunnel_ingress")])  # fmt: skip
        self.tunnel_ifindex = socket.if_nametoindex(device)

    def open_underlay_socket(self) -> socket.socket | None:
        """An AF_PACKET socket on the underlay interface that receives only the VXLAN the
        kernel does not deliver itself (flow-state messages, unknown keys); None without an
        underlay."""
        if self.underlay_ip is None:
            return None
        interface = underlay_interface(self.underlay_ip)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, self._fds["hn_underlay_upcall"])
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            sock.bind((interface, ETH_P_ALL))
            sock.setblocking(False)
            # Only once the socket takes the agent's share may tc drop the kernel's copy.
            self._attach_underlay(interface)
        except BaseException:
            sock.close()
            raise
        return sock

    def _attach_underlay(self, interface: str) -> None:
        shown = subprocess.run(
            ["tc", "-j", "qdisc", "show", "dev", interface], capture_output=True, text=True
        )
        qdiscs = json.loads(shown.stdout or "[]")
        if not any(qdisc.get("kind") == "clsact" for qdisc in qdiscs):
            _run(["tc", "qdisc", "add", "dev", interface, "clsact"])
            self._underlay_qdisc_made = True
        self._underlay_filtered = interface
        _run(["tc", "filter", "replace", "dev", interface, "ingress", "pref",
              UNDERLAY_FILTER_PREF, "handle", "1", "bpf", "da", "pinned",
              str(self.pin_dir / "hn_underlay_ingress")])  # fmt: skip

    def _detach_underlay(self) -> None:
        interface, self._underlay_filtered = self._underlay_filtered, None
        if interface is None:
            return
        # The interface may be gone with its namespace: nothing left to remove then.
        if self._underlay_qdisc_made:
            subprocess.run(["tc", "qdisc", "del", "dev", interface, "clsact"], capture_output=True)
        else:
            subprocess.run(
                ["tc", "filter", "del", "dev", interface, "ingress", "pref", UNDERLAY_FILTER_PREF],
                capture_output=True,
            )
        self._underlay_qdisc_made = False

    def close(self) -> None:
        """Remove everything this made. Safe to call twice."""
        for port_key, interface_name in list(self._attached.items()):
            self.detach_port(port_key, interface_name)
        self._detach_underlay()
        if self._vxlan_made:
            subprocess.run(["ip", "link", "del", self.vxlan_device], capture_output=True)
            self._vxlan_made = False
            self.tunnel_ifindex = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        remove_pins(self.pin_dir)

    # ---- ports ------------------------------------------------------------------------------

    def attach_port(self, port_key: int, interface_name: str, sock: socket.socket) -> int:
        """Put the fast path on a bound port: the socket filter on the agent's `sock` first
        (so no frame is handled twice), then tc ingress, then the tunnel key. Its ifindex."""
        ifindex = socket.if_nametoindex(interface_name)
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_BPF, self._fds["hn_port_upcall"])
        self._attached[port_key] = interface_name
        self._ifindexes[port_key] = ifindex
        try:
            _run(["tc", "qdisc", "replace", "dev", interface_name, "clsact"])
            _run(["tc", "filter", "replace", "dev", interface_name, "ingress", "pref", "1",
                  "handle", "1", "bpf", "da", "pinned",
                  str(self.pin_dir / "hn_port_ingress")])  # fmt: skip
            bpfsys.map_update(self._fds["hn_port_frames"], _U32.pack(ifindex), _U64.pack(0))
            bpfsys.map_update(self._fds["hn_ports"], _U32.pack(port_key), _U32.pack(ifindex))
        except BaseException:
            self.detach_port(port_key, interface_name)
            raise
        return ifindex

    def detach_port(self, port_key: int, interface_name: str) -> None:
        self._attached.pop(port_key, None)
        ifindex = self._ifindexes.pop(port_key, None)
        if "hn_ports" in self._fds:
            bpfsys.map_delete(self._fds["hn_ports"], _U32.pack(port_key))
        if "hn_port_frames" in self._fds and ifindex is not None:
            bpfsys.map_delete(self._fds["hn_port_frames"], _U32.pack(ifindex))
        # The interface may be gone already (its namespace deleted): nothing left to remove.
        subprocess.run(["tc", "qdisc", "del", "dev", interface_name, "clsact"], capture_output=True)

    # ---- tunnel peers -----------------------------------------------------------------------

    def set_tunnel_peers(self, addresses: frozenset[str] | None) -> None:
        """hn_tunnel_ingress accepts VXLAN only from these IPv4 sources (None: from any).
        The map is filled before enforcement starts and emptied after it stops, and a change
        writes only the difference, so a peer that stays is never refused in between."""
        config = self._fds["hn_config"]
        if addresses is None:
            bpfsys.map_update(config, _U32.pack(CONFIG_PEERS), _U32.pack(0))
            wanted: set[int] = set()
        else:
            wanted = {
                int(address)
                for address in map(ipaddress.ip_address, addresses)
                if isinstance(address, ipaddress.IPv4Address)
            }
        peers = self._fds["hn_tunnel_peers"]
        for address in wanted - self._tunnel_peers:
            bpfsys.map_update(peers, _U32.pack(address), b"\x01")
        if addresses is not None:
            bpfsys.map_update(config, _U32.pack(CONFIG_PEERS), _U32.pack(1))
        for address in self._tunnel_peers - wanted:
            bpfsys.map_delete(peers, _U32.pack(address))
        self._tunnel_peers = wanted

    # ---- flow entries and counters ----------------------------------------------------------

    def set_entry(self, key: bytes, value: bytes) -> None:
        bpfsys.map_update(self._fds["hn_flows"], key, value)

    def delete_entry(self, key: bytes) -> None:
        bpfsys.map_delete(self._fds["hn_flows"], key)

    def entry_counters(self, key: bytes) -> tuple[int, int] | None:
        """(packets, bytes) the kernel counted on the entry; None when it is gone (evicted)."""
        value = bpfsys.map_lookup(self._fds["hn_flows"], key, FLOW_ENTRY.size)
        return None if value is None else entry_counters(value)

    def all_entry_counters(self) -> dict[bytes, tuple[int, int]]:
        """(packets, bytes) of every entry in the kernel, by key, in a few batch syscalls."""
        keys, values = bpfsys.map_dump(self._fds["hn_flows"], FLOW_KEY.size, FLOW_ENTRY.size)
        size = FLOW_KEY.size
        return dict(
            zip(
                [keys[start : start + size] for start in range(0, len(keys), size)],
                _ENTRY_COUNTERS.iter_unpack(values),
                strict=True,
            )
        )

    def entry_keys(self) -> list[bytes]:
        return bpfsys.map_keys(self._fds["hn_flows"], FLOW_KEY.size)

    def port_frames(self, ifindex: int) -> int | None:
        """Frames tc ingress saw on the port with `ifindex` since it was attached."""
        value = bpfsys.map_lookup(self._fds["hn_port_frames"], _U32.pack(ifindex), _U64.size)
        return _U64.unpack(value)[0] if value else None

    def counters(self) -> dict[str, int]:
        result = {}
        for index, name in enumerate(KERNEL_COUNTERS):
            value = bpfsys.map_lookup(self._fds["hn_counters"], _U32.pack(index), _U64.size)
            result[name] = _U64.unpack(value)[0] if value else 0
        if self._vxlan_made:
            result.update(vxlan_device_drops(self.vxlan_device))
        return result


def vxlan_device_drops(device: str) -> dict[str, int]:
    """What the kernel's VXLAN device counted itself as receive errors and drops
    (/proc/self/net/dev: `errs` is rx_errors, `drop` rx_dropped + rx_missed). The underlay
    programs keep from it every datagram it would refuse unfragmented, so these grow only for
    a reassembled datagram with a reserved bit set, or an error of the kernel's own."""
    try:
        lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    except OSError:
        return {}
    for line in lines:
        name, _, fields = line.partition(":")
        if name.strip() == device:
            receive = fields.split()
            return {
                "drop.kernel_vxlan_rx_errors": int(receive[2]),
                "drop.kernel_vxlan_rx_dropped": int(receive[3]),
            }
    return {}
