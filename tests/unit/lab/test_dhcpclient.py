"""The lab's DHCP client event scripts, run for real by /bin/sh with a fake `ip` that records
its calls: what they configure and what they record in the lease file."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hivenet.lab.dhcpclient import (
    DHCLIENT,
    UDHCPC,
    ClientFiles,
    client_argv,
    parse_lease,
    read_events,
    read_lease,
    write_scripts,
)


def run_script(tmp_path: Path, client: str, args: list[str], env: dict[str, str]) -> list[str]:
    write_scripts(tmp_path)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    calls = tmp_path / "ip-calls"
    fake_ip = fake_bin / "ip"
    fake_ip.write_text(
        f'#!/bin/sh\nif [ "$1" = netns ]; then echo hn-vm1; exit 0; fi\necho "$*" >> {calls}\n'
    )
    fake_ip.chmod(0o755)
    files = ClientFiles(tmp_path, "hn-vm1")
    full_env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "interface": "eth0", **env}
    if client == UDHCPC:  # else the script finds the file by the namespace's name
        full_env["HN_LEASE_FILE"] = str(files.lease)
    subprocess.run(
        ["/bin/sh", str(files.script(client)), *args], env=full_env, check=True, timeout=10
    )
    return calls.read_text().splitlines() if calls.exists() else []


def test_udhcpc_bound_with_static_routes(tmp_path: Path) -> None:
    calls = run_script(
        tmp_path,
        UDHCPC,
        ["bound"],
        {
            "ip": "10.0.1.10",
            "mask": "24",
            "router": "10.0.1.1",
            "dns": "10.0.1.53 10.0.1.54",
            "domain": "acme.example",
            "mtu": "1450",
            "staticroutes": "192.168.0.0/16 10.0.1.254 0.0.0.0/0 10.0.1.1",
            "lease": "600",
            "serverid": "10.0.1.1",
        },
    )
    assert calls == [
        "link set dev eth0 mtu 1450",
        "-4 addr flush dev eth0",
        "addr replace 10.0.1.10/24 dev eth0",
        "route replace 192.168.0.0/16 via 10.0.1.254 dev eth0",
        "route replace 0.0.0.0/0 via 10.0.1.1 dev eth0",
    ]
    lease = read_lease(ClientFiles(tmp_path, "hn-vm1"))
    assert lease is not None
    assert lease.event == "bound" and lease.address == ipaddress.IPv4Interface("10.0.1.10/24")
    assert [str(s) for s in lease.dns] == ["10.0.1.53", "10.0.1.54"]
    assert lease.mtu == 1450 and lease.lease_time == 600 and lease.domain == "acme.example"
    assert [(str(d), str(g)) for d, g in lease.routes] == [
        ("192.168.0.0/16", "10.0.1.254"),
        ("0.0.0.0/0", "10.0.1.1"),
    ]
    assert read_events(ClientFiles(tmp_path, "hn-vm1")) == ["bound 10.0.1.10"]


def test_udhcpc_renew_keeps_the_address_and_uses_the_router(tmp_path: Path) -> None:
    calls = run_script(
        tmp_path, UDHCPC, ["renew"], {"ip": "10.0.1.10", "mask": "24", "router": "10.0.1.1"}
    )
    assert "-4 addr flush dev eth0" not in calls
    assert calls[-1] == "route replace default via 10.0.1.1 dev eth0"


def test_dhclient_decodes_option_121_and_the_netmask(tmp_path: Path) -> None:
    calls = run_script(
        tmp_path,
        DHCLIENT,
        [],
        {
            "reason": "BOUND",
            "new_ip_address": "10.0.1.10",
            "new_subnet_mask": "255.255.255.0",
            "new_routers": "10.0.1.1",
            "new_interface_mtu": "1450",
            "new_rfc3442_classless_static_routes": "16 192 168 10 0 1 254 0 10 0 1 1",
            "new_domain_name_servers": "10.0.1.53",
            "new_dhcp_lease_time": "600",
        },
    )
    assert "addr replace 10.0.1.10/24 dev eth0" in calls
    assert "route replace 192.168.0.0/16 via 10.0.1.254 dev eth0" in calls
    assert "route replace 0.0.0.0/0 via 10.0.1.1 dev eth0" in calls
    lease = read_lease(ClientFiles(tmp_path, "hn-vm1"))
    assert lease is not None and lease.event == "bound" and lease.mtu == 1450


def test_argv_and_bad_lease_files(tmp_path: Path) -> None:
    files = ClientFiles(tmp_path, "hn-vm1")
    assert client_argv(UDHCPC, "eth0", files, "vm1")[:2] == ["busybox", "udhcpc"]
    assert str(files.dhclient_conf) in client_argv(DHCLIENT, "eth0", files, "vm1")
    with pytest.raises(ValueError, match="dnsmasq"):
        client_argv("dnsmasq", "eth0", files, "vm1")
    with pytest.raises(ValueError, match="lease file"):
        parse_lease("event=bound\nip=not-an-ip\n")
    assert read_lease(files) is None


def test_scripts_can_be_rewritten_while_a_client_executes_them(tmp_path: Path) -> None:
    """Every VM of a lab shares one script; writing it in place while another VM's client
    runs it fails with ETXTBSY. A running binary in its place reproduces that for certain."""
    running = tmp_path / f"{UDHCPC}.script"
    shutil.copy("/bin/sleep", running)
    running.chmod(0o755)
    sleeper = subprocess.Popen([str(running), "30"])
    try:
        write_scripts(tmp_path)
        assert running.read_text().startswith("#!/bin/sh")
        assert os.access(running, os.X_OK)
        assert sleeper.poll() is None
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    finally:
        sleeper.kill()
        sleeper.wait()
