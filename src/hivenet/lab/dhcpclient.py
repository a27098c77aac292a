"""DHCP clients in the lab's VM namespaces: busybox `udhcpc` (the default) and ISC `dhclient`,
each driven by an event script of ours that configures the interface (address, MTU, default
route or the classless static routes of option 121) and records what the lease said in a
lease file, `KEY=VALUE` lines that `read_lease` turns back into a `Lease`.

Owns the client command lines, the event scripts and the lease file format. The scripts touch
only the VM's interface and the lease file: never /etc/resolv.conf (a namespace shares the
host's), so the name servers are only recorded. Must not talk to the API nor build namespaces
(`hivenet.lab` does that and starts the client as one of its processes).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

UDHCPC = "udhcpc"
DHCLIENT = "dhclient"
CLIENTS = (UDHCPC, DHCLIENT)

# The lease file is rewritten whole (tmp + mv) at each event; `<lease>.log` gets a line per
# event ("bound 10.0.1.10", "renew 10.0.1.10", "nak", ...). Unless $HN_LEASE_FILE says
# otherwise, the file is named after the VM's namespace, next to the script (dhclient runs its
# script with a clean environment anyway).
_RECORD = r"""
: "${HN_LEASE_FILE:=$(dirname "$0")/$(ip netns identify).lease}"

record() {
  {
    echo "event=$1"
    echo "ip=$2"
    echo "prefix=$3"
    echo "router=$4"
    echo "dns=$5"
    echo "domain=$6"
    echo "search=$7"
    echo "mtu=$8"
    echo "routes=$9"
    echo "lease=${10}"
    echo "server=${11}"
  } > "$HN_LEASE_FILE.tmp" && mv "$HN_LEASE_FILE.tmp" "$HN_LEASE_FILE"
  echo "$1 $2" >> "$HN_LEASE_FILE.log"
}

apply_routes() {  # $1: interface, $2: router, $3: "dest/len gw ..." (option 121 wins)
  if [ -n "$3" ]; then
    set -- "$1" "$2" $3
    dev="$1"; shift 2
    while [ $# -ge 2 ]; do
      if [ "$2" = 0.0.0.0 ]; then
        ip route replace "$1" dev "$dev"
      else
        ip route replace "$1" via "$2" dev "$dev"
      fi
      shift 2
    done
  elif [ -n "$2" ]; then
    for gw in $2; do ip route replace default via "$gw" dev "$1"; break; done
  fi
}
"""

UDHCPC_SCRIPT = (
    "#!/bin/sh\n"
    "# hivenet lab: udhcpc event script (see hivenet/lab/dhcpclient.py)\n"
    + _RECORD
    + r"""
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set dev "$interface" up
    echo "deconfig" >> "$HN_LEASE_FILE.log"
    ;;
  bound|renew)
    [ -n "${mtu:-}" ] && ip link set dev "$interface" mtu "$mtu"
    [ "$1" = bound ] && ip -4 addr flush dev "$interface"
    ip addr replace "$ip/${mask:-32}" dev "$interface"
    apply_routes "$interface" "${router:-}" "${staticroutes:-}"
    record "$1" "$ip" "${mask:-}" "${router:-}" "${dns:-}" "${domain:-}" "${search:-}" \
      "${mtu:-}" "${staticroutes:-}" "${lease:-}" "${serverid:-}"
    ;;
  leasefail|nak)
    echo "$1" >> "$HN_LEASE_FILE.log"
    ;;
esac
exit 0
"""
)

DHCLIENT_SCRIPT = (
    "#!/bin/sh\n"
    "# hivenet lab: dhclient event script (see hivenet/lab/dhcpclient.py)\n"
    + _RECORD
    + r"""
# Option 121 as dhclient passes it: widths, significant octets and routers, as numbers.
classless_routes() {
  set -- $1
  out=""
  while [ $# -gt 0 ]; do
    width=$1; shift
    octets=$(( (width + 7) / 8 )); net=""; i=0
    while [ $i -lt 4 ]; do
      if [ $i -lt $octets ]; then part=$1; shift; else part=0; fi
      net="$net${net:+.}$part"; i=$((i + 1))
    done
    gw="$1.$2.$3.$4"; shift 4
    out="$out${out:+ }$net/$width $gw"
  done
  echo "$out"
}

prefix_of() {  # dotted netmask -> prefix length
  bits=0
  for octet in $(echo "$1" | tr . ' '); do
    case $octet in
      255) bits=$((bits + 8));; 254) bits=$((bits + 7));; 252) bits=$((bits + 6));;
      248) bits=$((bits + 5));; 240) bits=$((bits + 4));; 224) bits=$((bits + 3));;
      192) bits=$((bits + 2));; 128) bits=$((bits + 1));;
    esac
  done
  echo $bits
}

case "$reason" in
  PREINIT)
    ip link set dev "$interface" up
    ;;
  BOUND|RENEW|REBIND|REBOOT)
    [ -n "${new_interface_mtu:-}" ] && ip link set dev "$interface" mtu "$new_interface_mtu"
    prefix=$(prefix_of "${new_subnet_mask:-255.255.255.255}")
    if [ -n "${old_ip_address:-}" ] && [ "$old_ip_address" != "$new_ip_address" ]; then
      ip -4 addr flush dev "$interface"
    fi
    ip addr replace "$new_ip_address/$prefix" dev "$interface"
    routes=$(classless_routes "${new_rfc3442_classless_static_routes:-}")
    apply_routes "$interface" "${new_routers:-}" "$routes"
    event=$(echo "$reason" | tr 'A-Z' 'a-z')
    record "$event" "$new_ip_address" "$prefix" "${new_routers:-}" \
      "${new_domain_name_servers:-}" "${new_domain_name:-}" "${new_domain_search:-}" \
      "${new_interface_mtu:-}" "$routes" "${new_dhcp_lease_time:-}" \
      "${new_dhcp_server_identifier:-}"
    ;;
  EXPIRE|FAIL|RELEASE|STOP)
    ip -4 addr flush dev "$interface"
    echo "$(echo "$reason" | tr 'A-Z' 'a-z')" >> "$HN_LEASE_FILE.log"
    ;;
esac
exit 0
"""
)

DHCLIENT_CONF = """\
# hivenet lab: what dhclient asks for (option 121 is not built into dhclient)
option rfc3442-classless-static-routes code 121 = array of unsigned integer 8;
request subnet-mask, broadcast-address, routers, domain-name, domain-name-servers,
        domain-search, host-name, interface-mtu, rfc3442-classless-static-routes;
"""


@dataclass(frozen=True, slots=True)
class ClientFiles:
    """Where one VM's client keeps its script, configuration, lease and PID files."""

    directory: Path
    name: str  # the VM's namespace

    @property
    def lease(self) -> Path:
        return self.directory / f"{self.name}.lease"

    @property
    def events(self) -> Path:
        return self.directory / f"{self.name}.lease.log"

    def script(self, client: str) -> Path:
        return self.directory / f"{client}.script"

    @property
    def dhclient_conf(self) -> Path:
        return self.directory / "dhclient.conf"

    @property
    def dhclient_leases(self) -> Path:
        return self.directory / f"{self.name}.dhclient.leases"

    @property
    def dhclient_pid(self) -> Path:
        return self.directory / f"{self.name}.dhclient.pid"


def write_scripts(directory: Path) -> None:
    """The event scripts and dhclient's configuration, shared by every VM of a lab.

    Each file is written to a temporary name and renamed over the old one: another VM's
    client may be executing the script right now, and opening a running executable for
    writing fails with ETXTBSY (a rename leaves the running copy's inode alone)."""
    directory.mkdir(parents=True, exist_ok=True)
    for client, text in ((UDHCPC, UDHCPC_SCRIPT), (DHCLIENT, DHCLIENT_SCRIPT)):
        _replace(directory / f"{client}.script", text, 0o755)
    _replace(directory / "dhclient.conf", DHCLIENT_CONF, 0o644)


def _replace(path: Path, text: str, mode: int) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text)
    staging.chmod(mode)
    os.replace(staging, path)


def client_argv(client: str, interface: str, files: ClientFiles, hostname: str) -> list[str]:
    """The command line of a client that stays in the foreground, renews by itself and
    retries quickly (the lab's DHCP server is the local agent: no reason to wait long)."""
    if client == UDHCPC:
        return [
            "busybox", "udhcpc", "-f", "-i", interface, "-s", str(files.script(UDHCPC)),
            "-t", "10", "-T", "1", "-A", "2", "-x", f"hostname:{hostname}",
            "-O", "staticroutes", "-O", "mtu", "-O", "search",
        ]  # fmt: skip
    if client == DHCLIENT:
        return [
            shutil.which("dhclient") or "/sbin/dhclient", "-4", "-d", "-v",
            "-cf", str(files.dhclient_conf), "-sf", str(files.script(DHCLIENT)),
            "-lf", str(files.dhclient_leases), "-pf", str(files.dhclient_pid), interface,
        ]  # fmt: skip
    raise ValueError(f"DHCP client {client!r}: expected one of {', '.join(CLIENTS)}")


@dataclass(frozen=True, slots=True)
class Lease:
    """What a VM's DHCP client last configured, as its event script recorded it."""

    event: str
    address: ipaddress.IPv4Interface
    routers: tuple[ipaddress.IPv4Address, ...]
    dns: tuple[ipaddress.IPv4Address, ...]
    domain: str
    search: str
    mtu: int | None
    routes: tuple[tuple[ipaddress.IPv4Network, ipaddress.IPv4Address], ...]
    lease_time: int | None
    server: str


def parse_lease(text: str) -> Lease:
    """A lease file's text as a `Lease`; ValueError names the bad line."""
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    try:
        words = fields.get("routes", "").split()
        routes = tuple(
            (ipaddress.IPv4Network(words[i]), ipaddress.IPv4Address(words[i + 1]))
            for i in range(0, len(words) - 1, 2)
        )
        return Lease(
            event=fields["event"],
            address=ipaddress.IPv4Interface(f"{fields['ip']}/{fields.get('prefix') or 32}"),
            routers=tuple(ipaddress.IPv4Address(r) for r in fields.get("router", "").split()),
            dns=tuple(ipaddress.IPv4Address(s) for s in fields.get("dns", "").split()),
            domain=fields.get("domain", ""),
            search=fields.get("search", ""),
            mtu=int(fields["mtu"]) if fields.get("mtu") else None,
            routes=routes,
            lease_time=int(fields["lease"]) if fields.get("lease") else None,
            server=fields.get("server", ""),
        )
    except (KeyError, ValueError) as exc:
        raise ValueError(f"lease file: {exc} in {text!r}") from exc


def read_lease(files: ClientFiles) -> Lease | None:
    """The VM's current lease (None while it has none)."""
    try:
        text = files.lease.read_text()
    except OSError:
        return None
    return parse_lease(text)


def read_events(files: ClientFiles) -> list[str]:
    try:
        return files.events.read_text().splitlines()
    except OSError:
        return []
