"""The lab's namespace plumbing: network namespaces, veth pairs, the underlay bridge, addresses,
routes and processes in namespaces, as a small typed layer over pyroute2.

Owns: creating and deleting the lab's kernel objects and starting processes inside lab
namespaces with a PID file each (so `hivenet.lab.cleanup` can end them after a crash). Every
name carries the `hn` prefix; a link name is at most 15 characters (IFNAMSIZ - 1).

Must not touch: any namespace, link or process whose name does not start with `hn`, the root
namespace's routing, or any interface that leads off the machine.

Addressing: the underlay is `UNDERLAY_NETWORK` (172.31.250.0/24), a private /24 that exists
only on the hosts' underlay interfaces inside lab namespaces and on a root-namespace bridge that
has no uplink, so no lab packet can leave the machine. Hosts are .1-.253. The bridge has no
address, except in a lab whose store is a local etcd cluster: there it gets
`ROOT_UNDERLAY_ADDRESS` (.254/24, the lab's own address, gone with the bridge) so agents inside
host namespaces reach the members listening on it. Only one lab at a time may hold it (the
root namespace has one route to the /24). VMs use MTU 1450 (room for the 50 bytes of
VXLAN/UDP/IPv4/Ethernet), the underlay 1500.

Why pyroute2 for links and addresses (one netlink round trip, errors as errno) but `ip netns
exec` for commands and processes: a child must enter the namespace (setns + its own mount
namespace for /sys) before exec; iproute2 does exactly that, pyroute2's NSPopen adds a proxy
process in between, which would make the PID we record not the PID of the command.
Names: `LabScope(tag)` hands out unique names per test ("hn" + 4-character tag), so parallel
tests never collide, and the default scope (tag "") gives the plain lab names `hn-h1`, `hn-vm1`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hivenet import nsutil

NAME_PREFIX = "hn"
MAX_LINK_NAME_LEN = 15
UNDERLAY_NETWORK = ipaddress.IPv4Network("172.31.250.0/24")
# The root namespace's address on a lab's underlay bridge (only labs with a local etcd store).
ROOT_UNDERLAY_ADDRESS = ipaddress.IPv4Interface(
    f"{UNDERLAY_NETWORK[254]}/{UNDERLAY_NETWORK.prefixlen}"
)
UNDERLAY_MTU = 1500
VM_MTU = 1450
DEFAULT_STATE_DIR = Path("/run/hivenet-lab")
STATE_DIR_ENV = "HIVENET_LAB_STATE_DIR"

_LINK_NAME_RE = re.compile(r"^hn[A-Za-z0-9_.-]{0,13}$")
_NAMESPACE_NAME_RE = re.compile(r"^hn[A-Za-z0-9_.-]{0,62}$")
_TAG_RE = re.compile(r"^([a-z0-9]{4})?$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


class LabError(RuntimeError):
    """A lab operation failed; the message names the object and the cause."""


def state_dir() -> Path:
    """Where PID files live: $HIVENET_LAB_STATE_DIR, else /run/hivenet-lab (gone on reboot,
    like the namespaces it describes)."""
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def check_link_name(name: str) -> str:
    if not isinstance(name, str) or not _LINK_NAME_RE.match(name):
        raise LabError(
            f"link name {name!r}: must start with {NAME_PREFIX!r} and be at most "
            f"{MAX_LINK_NAME_LEN} characters of letters, digits, '_', '.', '-'"
        )
    return name


def check_namespace_name(name: str) -> str:
    if not isinstance(name, str) or not _NAMESPACE_NAME_RE.match(name):
        raise LabError(
            f"namespace name {name!r}: must start with {NAME_PREFIX!r}, at most 64 characters "
            "of letters, digits, '_', '.', '-'"
        )
    return name


# ---- namespaces -------------------------------------------------------------------------------


def list_namespaces(prefix: str = NAME_PREFIX) -> list[str]:
    return nsutil.list_namespaces(prefix)


def namespace_exists(name: str) -> bool:
    return nsutil.namespace_exists(name)


def create_namespace(name: str, *, ipv6: bool = True) -> None:
    """Create namespace `name` with its loopback up. Without `ipv6`, IPv6 is off for every
    interface that enters it (set before any link exists, so none ever sends an RS or ND)."""
    check_namespace_name(name)
    if namespace_exists(name):
        raise LabError(f"namespace {name!r} already exists")
    try:
        nsutil.create_namespace(name, ipv6=ipv6)
    except OSError as error:
        raise LabError(str(error)) from error


def delete_namespace(name: str) -> bool:
    """Delete namespace `name`; False when it did not exist (idempotent)."""
    check_namespace_name(name)
    try:
        return nsutil.remove_namespace(name)
    except OSError as error:
        raise LabError(str(error)) from error


@contextmanager
def _ipr(namespace: str | None) -> Iterator[IPRoute]:
    """An IPRoute in `namespace` (None: the root namespace); never creates a namespace."""
    if namespace is not None:
        check_namespace_name(namespace)
    try:
        with nsutil.iproute(namespace) as ipr:
            yield ipr
    except FileNotFoundError:
        raise LabError(f"namespace {namespace!r} does not exist") from None


def _where(namespace: str | None) -> str:
    return "the root namespace" if namespace is None else f"namespace {namespace!r}"


def _index(ipr: IPRoute, link: str, namespace: str | None) -> int:
    index = nsutil.link_index(ipr, link)
    if index is None:
        raise LabError(f"link {link!r} not found in {_where(namespace)}")
    return index


def _netlink(action: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except NetlinkError as error:
        raise LabError(f"{action}: {os.strerror(error.code)} (errno {error.code})") from error


# ---- links ------------------------------------------------------------------------------------


def list_links(prefix: str = NAME_PREFIX, namespace: str | None = None) -> list[str]:
    with _ipr(namespace) as ipr:
        names = [str(link.get("ifname")) for link in ipr.get_links()]
    return sorted(name for name in names if name.startswith(prefix))


def create_bridge(name: str, *, mtu: int = UNDERLAY_MTU, namespace: str | None = None) -> None:
    """A Linux bridge (the underlay switch), up, with no address."""
    check_link_name(name)
    with _ipr(namespace) as ipr:
        _netlink(
            f"create bridge {name!r} in {_where(namespace)}",
            ipr.link,
            "add",
            ifname=name,
            kind="bridge",
        )
        index = _index(ipr, name, namespace)
        _netlink(f"set bridge {name!r} up", ipr.link, "set", index=index, mtu=mtu, state="up")


def create_veth(
    name: str,
    peer_name: str,
    *,
    namespace: str | None = None,
    peer_namespace: str | None = None,
    mtu: int = UNDERLAY_MTU,
) -> None:
    """A veth pair `name` <-> `peer_name`, each end moved to its namespace (None: stays in the
    root namespace), both with `mtu` and up. Offloads keep the kernel defaults (on)."""
    check_link_name(name)
    check_link_name(peer_name)
    _check_mtu(mtu)
    with _ipr(None) as ipr:
        _netlink(
            f"create veth {name!r}/{peer_name!r}",
            ipr.link,
            "add",
            ifname=name,
            kind="veth",
            peer={"ifname": peer_name},
        )
        try:
            for link, target in ((name, namespace), (peer_name, peer_namespace)):
                index = _index(ipr, link, None)
                _netlink(f"set MTU of {link!r}", ipr.link, "set", index=index, mtu=mtu)
                if target is not None:
                    check_namespace_name(target)
                    _netlink(
                        f"move {link!r} to namespace {target!r}",
                        ipr.link,
                        "set",
                        index=index,
                        net_ns_fd=target,
                    )
        except BaseException:
            delete_link(name)
            raise
    set_up(name, namespace=namespace)
    set_up(peer_name, namespace=peer_namespace)


def create_vxlan(
    name: str,
    *,
    vni: int,
    local_ip: str,
    remote_ip: str,
    underlay_link: str,
    namespace: str,
    port: int = 4789,
    mtu: int = VM_MTU,
    learning: bool = False,
) -> None:
    """A kernel VXLAN device (an external VTEP we did not write) inside `namespace`, sending
    VNI `vni` to `remote_ip`:`port` over `underlay_link` (with `learning`: unicast to a MAC
    it learned goes to the address that MAC came from instead), up."""
    check_link_name(name)
    if not 0 <= vni <= 0xFFFFFF:
        raise LabError(f"vni {vni!r}: expected 0..0xFFFFFF")
    with _ipr(namespace) as ipr:
        underlay_index = _index(ipr, underlay_link, namespace)
        _netlink(
            f"create VXLAN device {name!r} in {_where(namespace)}",
            ipr.link,
            "add",
            ifname=name,
            kind="vxlan",
            vxlan_id=vni,
            vxlan_local=str(ipaddress.ip_address(local_ip)),
            vxlan_group=str(ipaddress.ip_address(remote_ip)),
            vxlan_port=port,
            vxlan_link=underlay_index,
            vxlan_learning=int(learning),
        )
        index = _index(ipr, name, namespace)
        _netlink(f"set {name!r} up", ipr.link, "set", index=index, mtu=mtu, state="up")


_SET_FEATURES_SCRIPT = """
import json, sys
from pyroute2.ethtool import Ethtool
link, wanted = sys.argv[1], json.loads(sys.argv[2])
with Ethtool() as ethtool:
    features = ethtool.get_features(link)
    unknown = sorted(set(wanted) - set(features.features))
    if unknown:
        sys.exit(f"unknown feature(s) of {link}: {unknown}")
    for name, enable in wanted.items():
        features.features[name].enable = enable
    ethtool.set_features(link, features)
"""


def set_link_features(link: str, features: dict[str, bool], *, namespace: str) -> None:
    """Switch ethtool features ("tx-checksum-ip-generic", ...) of `link` in `namespace`.

    Runs pyroute2's ethtool ioctls in a child inside the namespace (the ioctl works on the
    caller's namespace; entering it from this process would move every thread)."""
    check_link_name(link)
    run_in_namespace(
        namespace, [sys.executable, "-c", _SET_FEATURES_SCRIPT, link, json.dumps(features)]
    )


def set_up(link: str, *, namespace: str | None = None) -> None:
    with _ipr(namespace) as ipr:
        index = _index(ipr, link, namespace)
        _netlink(
            f"set {link!r} up in {_where(namespace)}", ipr.link, "set", index=index, state="up"
        )


def set_mac(link: str, mac: str, *, namespace: str | None = None) -> None:
    with _ipr(namespace) as ipr:
        index = _index(ipr, link, namespace)
        _netlink(f"set MAC {mac} on {link!r}", ipr.link, "set", index=index, address=mac)


def attach_to_bridge(link: str, bridge: str, *, namespace: str | None = None) -> None:
    with _ipr(namespace) as ipr:
        bridge_index = _index(ipr, bridge, namespace)
        index = _index(ipr, link, namespace)
        _netlink(
            f"attach {link!r} to bridge {bridge!r}",
            ipr.link,
            "set",
            index=index,
            master=bridge_index,
        )


def delete_link(name: str, *, namespace: str | None = None) -> bool:
    """Delete link `name`; False when it did not exist (idempotent). Deleting one end of a veth
    pair deletes both."""
    check_link_name(name)
    with _ipr(namespace) as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as error:
            if error.code == 19:  # ENODEV: went away meanwhile (its peer's namespace died)
                return False
            raise LabError(f"delete link {name!r}: {os.strerror(error.code)}") from error
    return True


def add_address(link: str, interface: str, *, namespace: str | None = None) -> None:
    """Add `interface` ("10.0.1.1/24", "fd00::1/64") to `link`."""
    try:
        parsed = ipaddress.ip_interface(interface)
    except ValueError:
        raise LabError(f"address {interface!r}: not an address with prefix length") from None
    with _ipr(namespace) as ipr:
        index = _index(ipr, link, namespace)
        _netlink(
            f"add address {interface} to {link!r} in {_where(namespace)}",
            ipr.addr,
            "add",
            index=index,
            address=str(parsed.ip),
            prefixlen=parsed.network.prefixlen,
        )


def addresses_in(
    network: ipaddress.IPv4Network, *, namespace: str | None = None
) -> list[tuple[str, str]]:
    """(link, address/prefix) of every IPv4 address inside `network` in `namespace` (None: the
    root namespace), e.g. to find which lab already holds the root underlay address."""
    found: list[tuple[str, str]] = []
    with _ipr(namespace) as ipr:
        names = {int(link["index"]): str(link.get("ifname")) for link in ipr.get_links()}
        for entry in ipr.get_addr(family=2):  # AF_INET
            address = ipaddress.IPv4Interface(f"{entry.get('IFA_ADDRESS')}/{entry['prefixlen']}")
            if address.ip in network:
                found.append((names.get(int(entry["index"]), "?"), str(address)))
    return sorted(found)


def add_route(
    destination: str,
    *,
    gateway: str | None = None,
    link: str | None = None,
    namespace: str | None = None,
) -> None:
    """Add a route to `destination` ("default" or a CIDR) via `gateway` and/or out of `link`.
    Refuses the root namespace: the lab never changes the machine's own routing."""
    if namespace is None:
        raise LabError("add_route: the lab only routes inside its namespaces (namespace=None)")
    if destination != "default":
        try:
            ipaddress.ip_network(destination)
        except ValueError:
            raise LabError(f"route destination {destination!r}: not a CIDR or 'default'") from None
    if gateway is None and link is None:
        raise LabError(f"route to {destination!r}: needs a gateway or a link")
    arguments: dict[str, Any] = {"dst": destination}
    if gateway is not None:
        arguments["gateway"] = str(ipaddress.ip_address(gateway))
    with _ipr(namespace) as ipr:
        if link is not None:
            arguments["oif"] = _index(ipr, link, namespace)
        _netlink(
            f"add route to {destination} in {_where(namespace)}", ipr.route, "add", **arguments
        )


def _check_mtu(mtu: int) -> None:
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535:
        raise LabError(f"mtu {mtu!r}: expected an int in 68..65535")


# ---- commands and processes in namespaces -----------------------------------------------------


def _exec_argv(namespace: str, argv: Sequence[str]) -> list[str]:
    check_namespace_name(namespace)
    if not argv or not all(isinstance(part, str) for part in argv):
        raise LabError(f"command {argv!r}: expected a non-empty list of strings")
    return ["ip", "netns", "exec", namespace, *argv]


def run_in_namespace(
    namespace: str, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `argv` inside `namespace`, wait for it, return its output (text)."""
    full = _exec_argv(namespace, argv)
    try:
        result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as error:
        raise LabError(f"{' '.join(argv)!r} in {namespace!r}: no exit after {timeout}s") from error
    if check and result.returncode != 0:
        raise LabError(
            f"{' '.join(argv)!r} in {namespace!r} exited {result.returncode}: "
            f"{(result.stderr or result.stdout).strip()[-500:]}"
        )
    return result


def read_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot): with the PID, it
    names one process for good, even after the PID is reused. None if there is no such PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return int(stat.rpartition(")")[2].split()[19])


def read_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """What a PID file says about a process the lab started."""

    pid: int
    start_time: int
    namespace: str
    label: str
    argv: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps(
            {
                "pid": self.pid,
                "start_time": self.start_time,
                "namespace": self.namespace,
                "label": self.label,
                "argv": list(self.argv),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ProcessRecord:
        data = json.loads(text)
        return cls(
            pid=int(data["pid"]),
            start_time=int(data["start_time"]),
            namespace=str(data["namespace"]),
            label=str(data["label"]),
            argv=tuple(str(part) for part in data["argv"]),
        )

    def is_running(self) -> bool:
        """True only if the PID is still the process we started: same start time, and its
        command line is ours (or still `ip netns exec` just before it execs ours)."""
        if read_start_time(self.pid) != self.start_time:
            return False
        cmdline = read_cmdline(self.pid)
        if cmdline is None:
            return False
        return cmdline in (list(self.argv), _exec_argv(self.namespace, self.argv))


def pid_file_path(namespace: str, label: str, directory: Path | None = None) -> Path:
    return (directory or state_dir()) / f"{namespace}.{label}.json"


def stop_process(pid: int, *, timeout: float = 3.0) -> bool:
    """SIGTERM, then SIGKILL after `timeout`; True if the process is gone afterwards."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _reaped_or_gone(pid):
            return True
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    for _ in range(100):
        if _reaped_or_gone(pid):
            return True
        time.sleep(0.02)
    return False


def _reaped_or_gone(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return True
    except ChildProcessError:
        pass  # not our child: look at /proc
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")  # a zombie has exited


class NamespaceProcess:
    """A background process inside a lab namespace, with its PID file."""

    def __init__(self, popen: subprocess.Popen[bytes], record: ProcessRecord, pid_file: Path):
        self.popen = popen
        self.record = record
        self.pid_file = pid_file

    @property
    def pid(self) -> int:
        return self.record.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def stop(self, *, timeout: float = 3.0) -> int | None:
        """End the process (SIGTERM, then SIGKILL) and remove its PID file; its exit code."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        self.pid_file.unlink(missing_ok=True)
        return self.popen.returncode


def start_in_namespace(
    namespace: str,
    argv: Sequence[str],
    *,
    label: str,
    output: IO[bytes] | int | None = subprocess.DEVNULL,
    directory: Path | None = None,
    env: dict[str, str] | None = None,
) -> NamespaceProcess:
    """Start `argv` in the background inside `namespace` and record it in a PID file named
    after the namespace and `label` (unique per namespace)."""
    if not _LABEL_RE.match(label):
        raise LabError(f"process label {label!r}: 1-32 letters, digits, '_' or '-'")
    full = _exec_argv(namespace, argv)
    if not namespace_exists(namespace):
        raise LabError(f"namespace {namespace!r} does not exist")
    pid_file = pid_file_path(namespace, label, directory)
    if pid_file.exists():
        raise LabError(f"process {label!r} in {namespace!r} already recorded in {pid_file}")
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    popen = subprocess.Popen(
        full, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env
    )
    start_time = read_start_time(popen.pid)
    record = ProcessRecord(popen.pid, start_time or 0, namespace, label, tuple(argv))
    temporary = pid_file.with_suffix(".tmp")
    temporary.write_text(record.to_json())
    temporary.replace(pid_file)
    return NamespaceProcess(popen, record, pid_file)


# ---- names ------------------------------------------------------------------------------------


class LabScope:
    """Names for one lab: namespaces `hn<tag>-<role>`, links `hn<tag><role>`.

    The default scope (tag "") is the lab itself (`hn-h1`, `hn-vm1`); tests use
    `LabScope.unique()` so concurrent tests never share a name, and clean up with
    `hivenet.lab.cleanup.clean(tag=scope.tag)`.
    """

    def __init__(self, tag: str = "") -> None:
        if not isinstance(tag, str) or not _TAG_RE.match(tag):
            raise LabError(f"lab tag {tag!r}: empty or exactly 4 lowercase letters/digits")
        self.tag = tag

    @classmethod
    def unique(cls) -> LabScope:
        return cls(secrets.token_hex(2))

    @property
    def namespace_prefix(self) -> str:
        return f"{NAME_PREFIX}{self.tag}-" if self.tag else NAME_PREFIX

    @property
    def link_prefix(self) -> str:
        return f"{NAME_PREFIX}{self.tag}"

    def namespace(self, role: str) -> str:
        return check_namespace_name(f"{NAME_PREFIX}{self.tag}-{role}")

    def link(self, role: str) -> str:
        return check_link_name(f"{NAME_PREFIX}{self.tag}{role}")


def underlay_address(host_index: int) -> ipaddress.IPv4Interface:
    """The underlay address (with prefix) of host number `host_index` (1..253)."""
    if not 1 <= host_index <= 253:
        raise LabError(f"host_index {host_index}: expected 1..253")
    return ipaddress.IPv4Interface(f"{UNDERLAY_NETWORK[host_index]}/{UNDERLAY_NETWORK.prefixlen}")


@dataclass(frozen=True, slots=True)
class HostPlumbing:
    """A host namespace attached to the underlay bridge."""

    namespace: str
    underlay_link: str
    underlay_ip: str


@dataclass(frozen=True, slots=True)
class VmPlumbing:
    """A VM namespace: `vm_link` (inside the VM, with its address) is wired to `port_link`
    (inside the host namespace, what a datapath binds)."""

    namespace: str
    vm_link: str
    port_link: str
    address: str
    mac: str


def add_underlay(scope: LabScope) -> str:
    """The root-namespace bridge all hosts of `scope` attach to; its name."""
    bridge = scope.link("br")
    create_bridge(bridge)
    return bridge


def add_host(scope: LabScope, role: str, host_index: int, bridge: str) -> HostPlumbing:
    """Namespace `role` with an underlay interface on `bridge` at `underlay_address(index)`."""
    namespace = scope.namespace(role)
    create_namespace(namespace, ipv6=False)
    root_end, host_end = scope.link(f"{role}r"), scope.link(f"{role}u")
    create_veth(root_end, host_end, peer_namespace=namespace, mtu=UNDERLAY_MTU)
    attach_to_bridge(root_end, bridge)
    address = underlay_address(host_index)
    add_address(host_end, str(address), namespace=namespace)
    return HostPlumbing(namespace, host_end, str(address.ip))


def add_vm(
    scope: LabScope,
    role: str,
    host: HostPlumbing,
    address: str,
    mac: str,
    *,
    ipv6: bool = False,
) -> VmPlumbing:
    """Namespace `role` with one interface (`address`, `mac`, MTU 1450) whose other end sits in
    the host namespace for the datapath. Host namespaces have IPv6 off, so that end is silent;
    without `ipv6` the VM sends no IPv6 either (no solicitations in the way of exact counters)."""
    namespace = scope.namespace(role)
    create_namespace(namespace, ipv6=ipv6)
    vm_end, port_end = scope.link(f"{role}i"), scope.link(f"{role}p")
    create_veth(vm_end, port_end, namespace=namespace, peer_namespace=host.namespace, mtu=VM_MTU)
    set_mac(vm_end, mac, namespace=namespace)
    add_address(vm_end, address, namespace=namespace)
    return VmPlumbing(namespace, vm_end, port_end, address, mac)


def rename_link(namespace: str, link: str, new_name: str, mac: str | None) -> None:
    """Rename `link` inside `namespace` (a name like eth0 or a Nova tap name cannot be created
    in the root namespace, where the machine may have its own), set its MAC (None: keep it)
    and bring it up."""
    try:
        with _ipr(namespace) as ipr:
            index = _index(ipr, link, namespace)
            ipr.link("set", index=index, state="down")
            if mac is None:
                ipr.link("set", index=index, ifname=new_name)
            else:
                ipr.link("set", index=index, ifname=new_name, address=mac)
            ipr.link("set", index=index, state="up")
    except OSError as error:  # NetlinkError is an OSError
        raise LabError(f"rename {link!r} to {new_name!r} in {namespace!r}: {error}") from error
