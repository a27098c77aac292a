"""A tenant network built ONLY with the real `openstack` CLI (python-openstackclient and
python-octaviaclient) against a lab's own `hivenet serve`, then used by lab VMs.

The lab has three hosts and nothing else; through a generated clouds.yaml (the lab's admin
token, endpoint overrides at the server's root) the CLI makes an external network with a
port for the outside namespace (bound on h3 to the interface its `binding:profile` names), a
tenant network and subnet with DNS, a router with an interface and an external gateway, two
ports bound Nova-style (`--host`: the agent binds `tap` + the first 11 characters of the port
id), a floating IP, security-group rules and a load balancer. Proven: every command exits 0
and reads back what it set; the ports go ACTIVE once bound; the two VMs (plugged onto those
taps on h1 and h2) get their Neutron addresses, gateway and DNS server by DHCP and ping each
other; the outside pings a VM through its floating IP; the VIP answers HTTP from both members.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from hivenet.lab.lab import Lab
from hivenet.lab.scenario import Scenario, scenario_from_data
from tests.e2e.common import running_lab

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

VENV_BIN = Path(sys.executable).parent
CLOUD = "lab"
PUBLIC_CIDR = "192.0.2.0/24"
OUTSIDE_IP = "192.0.2.1"  # the external subnet's gateway: the outside world
TENANT_CIDR = "10.20.0.0/24"
DNS_SERVER = "192.0.2.53"
FRONT_CIDR = "10.30.0.0/24"
MEMBERS = {"vm1": "h1", "vm2": "h2"}  # on the tenant network, behind the VIP
CLIENT, CLIENT_HOST = "vm3", "h3"  # on the front network, the load balancer's client
OUTSIDE_HOST = "h3"

# Prints "<member name> <count>" per member that answered, "failed <count>" for failures.
HTTP_CLIENT = """
import collections, sys, urllib.request
counts = collections.Counter()
for _ in range(int(sys.argv[2])):
    try:
        with urllib.request.urlopen(f"http://{sys.argv[1]}/who", timeout=3) as answer:
            counts[answer.read().decode().strip()] += 1
    except OSError:
        counts["failed"] += 1
for name, count in sorted(counts.items()):
    print(name, count)
"""


def scenario() -> Scenario:
    return scenario_from_data({"name": "openstack", "hosts": ["h1", "h2", "h3"]})


class OpenStackCli:
    """`openstack --os-cloud lab ... -f json` against the lab's API server."""

    def __init__(self, lab: Lab, directory: Path) -> None:
        self.clouds_yaml = directory / "clouds.yaml"
        endpoint = f"{lab.api_url}/"
        clouds = {
            "clouds": {
                CLOUD: {
                    "auth_type": "admin_token",
                    "auth": {"token": lab.token(), "endpoint": endpoint},
                    "network_endpoint_override": endpoint,
                    "load_balancer_endpoint_override": endpoint,
                }
            }
        }
        self.clouds_yaml.write_text(yaml.safe_dump(clouds))
        self.clouds_yaml.chmod(0o600)

    def __call__(self, *args: str) -> Any:
        """The parsed JSON output (None for commands that print nothing); exit 0 or fail."""
        command = [str(VENV_BIN / "openstack"), "--os-cloud", CLOUD, *args]
        if {"create", "show", "list"} & set(args[:4]) and "status" not in args:
            command += ["-f", "json"]
        result = subprocess.run(
            command,
            env={**os.environ, "OS_CLIENT_CONFIG_FILE": str(self.clouds_yaml)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"openstack {' '.join(args)}: {result.stderr}{result.stdout}"
        return json.loads(result.stdout) if result.stdout.strip() else None


def binding_host(port: dict[str, Any]) -> Any:
    return port.get("binding_host_id", port.get("binding:host_id"))


def wait_ports_active(cli: OpenStackCli, port_ids: list[str], timeout: float = 20.0) -> None:
    """Until every port's status is ACTIVE (its host's agent bound it), by `port list`."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = {p["ID"]: p["Status"] for p in cli("port", "list", "--long")}
        if all(statuses.get(port_id) == "ACTIVE" for port_id in port_ids):
            return
        assert time.monotonic() < deadline, f"ports not ACTIVE: {statuses}"
        time.sleep(0.5)


def reaches(lab: Lab, source: str, target: str, limit: float = 10.0) -> bool:
    """After a first reply (the router may drop the packet that finds its neighbour
    unresolved), three pings in a row all answered."""
    deadline = time.monotonic() + limit
    while lab.ping(source, target, count=1).received == 0:
        if time.monotonic() > deadline:
            return False
    return lab.ping(source, target, count=3).ok


def http_counts(lab: Lab, client: str, vip: str, count: int) -> Counter[str]:
    result = lab.run(client, [sys.executable, "-c", HTTP_CLIENT, vip, str(count)], timeout=60)
    counts: Counter[str] = Counter()
    for line in result.stdout.split("\n"):
        if line.strip():
            name, number = line.split()
            counts[name] += int(number)
    return counts


def wait_http_server(lab: Lab, vm: str, limit: float = 15.0) -> None:
    started = time.monotonic()
    while lab.tcp_probe(vm, "127.0.0.1", 80, timeout=1.0) != "connected":
        assert time.monotonic() - started < limit, f"no HTTP server in {vm}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(scenario(), tmp_path_factory.mktemp("oslab")) as lab:
        yield lab


def build_external(cli: OpenStackCli, lab: Lab) -> dict[str, Any]:
    """The external network and a port on it for the outside world, bound on h3 to the
    interface its binding:profile names."""
    public = cli("network", "create", "--external", "public")
    assert public["router:external"] is True
    subnet = cli(
        "subnet", "create", "--network", "public", "--subnet-range", PUBLIC_CIDR,
        "--gateway", OUTSIDE_IP, "--allocation-pool", "start=192.0.2.10,end=192.0.2.99",
        "--no-dhcp", "public-subnet",
    )  # fmt: skip
    assert (subnet["cidr"], subnet["gateway_ip"]) == (PUBLIC_CIDR, OUTSIDE_IP)
    assert subnet["enable_dhcp"] is False
    link = lab.scope.link("outp")
    port = cli(
        "port", "create", "--network", "public", "--host", OUTSIDE_HOST,
        "--binding-profile", f"interface_name={link}",
        "--disable-port-security", "--no-security-group", "--no-fixed-ip", "outside",
    )  # fmt: skip
    assert binding_host(port) == OUTSIDE_HOST and port["binding_profile"] == {
        "interface_name": link
    }
    assert port["port_security_enabled"] is False and port["fixed_ips"] == []
    return {"network": public, "subnet": subnet, "port": port, "link": link}


def build_tenant(cli: OpenStackCli) -> dict[str, Any]:
    network = cli("network", "create", "tenant")
    assert network["mtu"] == 1450 and network["router:external"] is False
    subnet = cli(
        "subnet", "create", "--network", "tenant", "--subnet-range", TENANT_CIDR,
        "--dns-nameserver", DNS_SERVER, "tenant-subnet",
    )  # fmt: skip
    assert subnet["dns_nameservers"] == [DNS_SERVER] and subnet["gateway_ip"] == "10.20.0.1"
    assert subnet["network_id"] == network["id"]
    return subnet


def build_front(cli: OpenStackCli) -> dict[str, Any]:
    network = cli("network", "create", "front")
    subnet = cli(
        "subnet", "create", "--network", "front", "--subnet-range", FRONT_CIDR, "front-subnet"
    )
    assert subnet["network_id"] == network["id"] and subnet["gateway_ip"] == "10.30.0.1"
    return subnet


def open_default_group(cli: OpenStackCli) -> None:
    """Ping and HTTP (port 80) into the project's default group from anywhere."""
    rules = [
        cli("security", "group", "rule", "create", *rule_args, "default")
        for rule_args in (("--protocol", "icmp"), ("--protocol", "tcp", "--dst-port", "80"))
    ]
    assert len({rule["security_group_id"] for rule in rules}) == 1, rules
    assert [(r["protocol"], r["port_range_min"], r["direction"]) for r in rules] == [
        ("icmp", None, "ingress"),
        ("tcp", 80, "ingress"),
    ]


def build_router(cli: OpenStackCli, public_id: str, public_subnet_id: str) -> dict[str, Any]:
    router = cli("router", "create", "edge")
    cli("router", "add", "subnet", "edge", "tenant-subnet")
    cli("router", "add", "subnet", "edge", "front-subnet")
    cli("router", "set", "--external-gateway", "public", "edge")
    shown: dict[str, Any] = cli("router", "show", "edge")
    assert shown["id"] == router["id"]
    gateway = shown["external_gateway_info"]
    assert gateway["network_id"] == public_id and gateway["enable_snat"] is True
    assert gateway["external_fixed_ips"][0]["subnet_id"] == public_subnet_id
    return shown


def build_load_balancer(cli: OpenStackCli, subnet_id: str, members: dict[str, str]) -> str:
    """A VIP on the tenant subnet: TCP 80 to port 80 of `members` (name -> address), with an
    HTTP health monitor; its address."""
    lb = cli("loadbalancer", "create", "--vip-subnet-id", "tenant-subnet", "--name", "lb1")
    assert lb["vip_subnet_id"] == subnet_id and lb["provisioning_status"] == "ACTIVE"
    listener = cli(
        "loadbalancer", "listener", "create", "--protocol", "TCP", "--protocol-port", "80",
        "--name", "web", "lb1",
    )  # fmt: skip
    assert (listener["protocol"], listener["protocol_port"]) == ("TCP", 80)
    pool = cli(
        "loadbalancer", "pool", "create", "--listener", "web", "--protocol", "TCP",
        "--lb-algorithm", "SOURCE_IP_PORT", "--name", "web-pool",
    )  # fmt: skip
    assert pool["lb_algorithm"] == "SOURCE_IP_PORT"

    def add_member(name: str) -> None:
        member = cli(
            "loadbalancer", "member", "create", "--address", members[name],
            "--protocol-port", "80", "--subnet-id", "tenant-subnet", "--name", name, "web-pool",
        )  # fmt: skip
        assert (member["address"], member["protocol_port"]) == (members[name], 80)

    in_parallel(*(lambda name=name: add_member(name) for name in members))
    monitor = cli(
        "loadbalancer", "healthmonitor", "create", "--delay", "2", "--timeout", "1",
        "--max-retries", "2", "--type", "HTTP", "--url-path", "/who", "--name", "hm", "web-pool",
    )  # fmt: skip
    assert (monitor["type"], monitor["url_path"]) == ("HTTP", "/who")
    return str(lb["vip_address"])


def in_parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Run independent CLI steps side by side (each `openstack` call costs a second or two of
    start-up); their results, or the first failure raised."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result() for future in futures]


def test_openstack_cli_builds_a_tenant_network_that_lab_vms_use(lab: Lab, tmp_path: Path) -> None:
    cli = OpenStackCli(lab, tmp_path)
    external, subnet, _front, _ = in_parallel(
        lambda: build_external(cli, lab),
        lambda: build_tenant(cli),
        lambda: build_front(cli),
        lambda: open_default_group(cli),
    )
    lab.plug_vm(
        "out",
        host=OUTSIDE_HOST,
        interface=external["link"],
        mac=external["port"]["mac_address"],
        ip=f"{OUTSIDE_IP}/24",
        dhcp_client=None,
    )

    # The router, and meanwhile three ports bound Nova-style (--host) on three hosts.
    placement = {vm: (host, "tenant") for vm, host in MEMBERS.items()}
    placement[CLIENT] = (CLIENT_HOST, "front")

    def create_port(vm: str) -> dict[str, Any]:
        host, net = placement[vm]
        port: dict[str, Any] = cli("port", "create", "--network", net, "--host", host, f"{vm}-port")
        assert binding_host(port) == host and port["status"] == "DOWN"
        return port

    router, *created = in_parallel(
        lambda: build_router(cli, external["network"]["id"], external["subnet"]["id"]),
        *(lambda vm=vm: create_port(vm) for vm in placement),
    )
    ports = dict(zip(placement, created, strict=True))
    addresses = {vm: port["fixed_ips"][0]["ip_address"] for vm, port in ports.items()}

    # The load balancer is built while the VMs come up.
    with ThreadPoolExecutor(max_workers=1) as background:
        vip_future = background.submit(
            build_load_balancer, cli, subnet["id"], {vm: addresses[vm] for vm in MEMBERS}
        )
        for vm, (host, _net) in placement.items():
            lab.plug_vm(
                vm,
                host=host,
                interface=f"tap{ports[vm]['id'][:11]}",  # Nova's name, bound by the agent
                mac=ports[vm]["mac_address"],
                ip=f"{addresses[vm]}/24",
            )
        for vm in MEMBERS:
            site = tmp_path / f"site-{vm}"
            site.mkdir()
            (site / "who").write_text(vm)
            lab.start_in(
                vm,
                [sys.executable, "-m", "http.server", "80", "--directory", str(site)],
                label="http",
            )
        deadline = time.monotonic() + 30
        for vm, (_host, net) in placement.items():
            lease = lab.wait_dhcp_lease(lab.plugged_vm(vm), deadline=deadline)
            router_ip = "10.20.0.1" if net == "tenant" else "10.30.0.1"
            assert [str(r) for r in lease.routers] == [router_ip], lease
            assert lease.mtu == 1450, lease
            if net == "tenant":
                assert [str(d) for d in lease.dns] == [DNS_SERVER], lease
        wait_ports_active(cli, [ports[vm]["id"] for vm in placement])

        # On different hosts, the members ping each other; through the router, the client
        # both; through SNAT on the gateway, vm2 the outside.
        assert reaches(lab, "vm1", addresses["vm2"]) and reaches(lab, "vm2", addresses["vm1"])
        assert reaches(lab, CLIENT, addresses["vm1"]) and reaches(lab, CLIENT, addresses["vm2"])
        assert reaches(lab, "vm2", OUTSIDE_IP)

        # A floating IP: the outside reaches vm1.
        fip = cli("floating", "ip", "create", "public")
        assert fip["floating_network_id"] == external["network"]["id"]
        floating = fip["floating_ip_address"]
        cli("floating", "ip", "set", "--port", "vm1-port", floating)
        shown = cli("floating", "ip", "show", fip["id"])
        assert (shown["port_id"], shown["fixed_ip_address"]) == (
            ports["vm1"]["id"],
            addresses["vm1"],
        )
        assert shown["router_id"] == router["id"]
        assert reaches(lab, "out", floating)
        vip = vip_future.result()

    # The VIP answers HTTP from both members.
    for vm in MEMBERS:
        wait_http_server(lab, vm)
    total: Counter[str] = Counter()
    deadline = time.monotonic() + 20
    while set(total) != set(MEMBERS):  # the first requests may meet unresolved neighbours
        total.update(http_counts(lab, CLIENT, vip, 10))
        assert time.monotonic() < deadline, total
    counts = http_counts(lab, CLIENT, vip, 40)
    assert counts["failed"] == 0 and set(counts) <= set(MEMBERS), counts

    # The status tree: the listener, its pool and both members, ONLINE by the monitor. Its
    # checks (every 2 s, 1 s timeout, several in a row to go ONLINE) may time out while the
    # machine is busy (a full `make test` once took over 20 s here; 33-37 s alone, 4 runs,
    # passed): the deadline bounds a hang, not the monitor's speed.
    deadline = time.monotonic() + 60
    while True:
        tree = cli("loadbalancer", "status", "show", "lb1")["loadbalancer"]
        pool = tree["listeners"][0]["pools"][0]
        statuses = {m["address"]: m["operating_status"] for m in pool["members"]}
        if statuses == {addresses[vm]: "ONLINE" for vm in MEMBERS}:
            break
        assert time.monotonic() < deadline, tree
        time.sleep(1)
    assert tree["listeners"][0]["name"] == "web" and pool["name"] == "web-pool"
    assert pool["health_monitor"]["type"] == "HTTP"
