"""End-to-end: `EbpfDatapath` in two host namespaces (the static-flow test driver), VMs on veths
with offloads on, VXLAN over the lab underlay through each host's collect-metadata device.
Established packets must be forwarded by the kernel (its hit counters rise, userspace sees only
the first packets), real ping and an 8 MiB TCP transfer (SHA-256 checked) must get through, and
invalidating the flows must take their kernel entries out at once (traffic then goes through
the agent's miss path, and the kernel stops counting hits).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hivenet.datapath.ebpf._testdriver import argv as driver_argv
from hivenet.lab.netns import LabScope, run_in_namespace, start_in_namespace
from tests.e2e.conftest import DatapathDriver
from tests.e2e.test_userspace_datapath import (
    TRANSFER_BYTES,
    VM1_MAC,
    VM2_MAC,
    TwoHosts,
    build_two_hosts,
    ping,
    tcp_transfer,
    tunnel,
    vm_to_tunnel_flows,
)

pytestmark = pytest.mark.e2e


class EbpfDriver(DatapathDriver):
    def invalidate(self) -> None:
        """SIGUSR2: the driver invalidates every flow of its config."""
        os.kill(self.process.pid, signal.SIGUSR2)


@pytest.fixture
def start_ebpf(tmp_path: Path) -> Iterator[Callable[[str, dict[str, Any]], EbpfDriver]]:
    drivers: list[EbpfDriver] = []

    def start(namespace: str, config: dict[str, Any]) -> EbpfDriver:
        name = f"ebpf{len(drivers)}"
        config_file = tmp_path / f"{name}.json"
        config_file.write_text(json.dumps(config))
        counters_file = tmp_path / f"{name}.counters.json"
        log_file = tmp_path / f"{name}.log"
        with log_file.open("wb") as log:
            process = start_in_namespace(
                namespace, driver_argv(str(config_file), str(counters_file)), label=name, output=log
            )
        driver = EbpfDriver(process, counters_file, log_file)
        drivers.append(driver)
        driver.wait_ready()
        return driver

    yield start
    for driver in drivers:
        driver.process.stop()


def start_two(lab: TwoHosts, start_ebpf: Callable[[str, dict[str, Any]], EbpfDriver]) -> tuple:
    def config(host: Any, port_key: int, vm: Any, peer_mac: str, peer: Any, peer_key: int) -> dict:
        return {
            "underlay_ip": host.underlay_ip,
            "ports": {str(port_key): vm.port_link},
            "flows": vm_to_tunnel_flows(port_key, peer_mac, peer.underlay_ip, peer_key),
            # After invalidation the misses still get through, by the agent's path.
            "miss_actions": {str(port_key): [tunnel(peer.underlay_ip, peer_key)]},
        }

    dp1 = start_ebpf(lab.h1.namespace, config(lab.h1, 1, lab.vm1, VM2_MAC, lab.h2, 2))
    dp2 = start_ebpf(lab.h2.namespace, config(lab.h2, 2, lab.vm2, VM1_MAC, lab.h1, 1))
    return dp1, dp2


def test_established_traffic_is_forwarded_by_the_kernel_across_two_hosts(
    lab_scope: LabScope, start_ebpf: Callable[[str, dict[str, Any]], EbpfDriver]
) -> None:
    lab = build_two_hosts(lab_scope)
    dp1, dp2 = start_two(lab, start_ebpf)
    ping(lab.vm1.namespace, "10.0.1.2", count=5)
    tcp_transfer(lab.vm1, lab.vm2, "10.0.1.2")
    for driver in (dp1, dp2):
        counters = driver.counters()
        assert counters["kernel_entries"] >= 1, counters
        assert counters["kernel_tunnel_delivered"] > 0, counters
        # Userspace handled only first packets, ARP and the TCP handshake and teardown.
        userspace_frames = counters["megaflow_hits"] + counters["upcalls"]
        assert userspace_frames < counters["kernel_hits"], counters
    # The data direction: nearly all of the 8 MiB crossed h1's port in the kernel, and the
    # kernel's per-entry counts reached the port counters.
    counters = dp1.counters()
    assert counters["kernel_bytes"] > 0.9 * TRANSFER_BYTES, counters
    assert counters["port.1.rx_bytes"] >= counters["kernel_bytes"], counters


def test_invalidation_takes_the_kernel_entries_out_at_once(
    lab_scope: LabScope, start_ebpf: Callable[[str, dict[str, Any]], EbpfDriver]
) -> None:
    lab = build_two_hosts(lab_scope)
    dp1, _dp2 = start_two(lab, start_ebpf)
    ping(lab.vm1.namespace, "10.0.1.2", count=4)
    before = dp1.counters()
    assert before["kernel_entries"] >= 1 and before["kernel_hits"] >= 1, before
    dp1.invalidate()
    after = dp1.counters()
    assert after["kernel_entries"] == 0 and after["flows"] == 0, after
    ping(lab.vm1.namespace, "10.0.1.2", count=3)
    final = dp1.counters()
    assert final["kernel_hits"] == after["kernel_hits"], final
    assert final["upcalls"] >= after["upcalls"] + 3, final


def test_the_kernel_objects_are_removed_when_the_datapath_stops(
    lab_scope: LabScope, start_ebpf: Callable[[str, dict[str, Any]], EbpfDriver]
) -> None:
    lab = build_two_hosts(lab_scope)
    # Someone else's filter on h1's underlay interface (a shared interface): it must stay.
    underlay = ["dev", lab.h1.underlay_link, "ingress"]
    run_in_namespace(
        lab.h1.namespace, ["tc", "qdisc", "add", "dev", lab.h1.underlay_link, "clsact"]
    )
    # (u32 matching a destination MAC of de:ad:be:ef:..: no frame here; act_gact is absent)
    run_in_namespace(lab.h1.namespace, ["tc", "filter", "add", *underlay, "pref", "7",
                                        "protocol", "all", "u32", "match", "u32", "0xdeadbeef",
                                        "0xffffffff", "at", "0", "classid", "1:1"])  # fmt: skip
    dp1, dp2 = start_two(lab, start_ebpf)
    links = run_in_namespace(lab.h1.namespace, ["ip", "-o", "link"]).stdout
    assert "hnvx0" in links
    filters = run_in_namespace(
        lab.h1.namespace, ["tc", "filter", "show", "dev", lab.vm1.port_link, "ingress"]
    ).stdout
    assert "hn_port_ingress" in filters
    underlay_filters = run_in_namespace(lab.h1.namespace, ["tc", "filter", "show", *underlay])
    assert "hn_underlay_ingress" in underlay_filters.stdout
    assert "u32" in underlay_filters.stdout
    dp1.process.stop()
    links = run_in_namespace(lab.h1.namespace, ["ip", "-o", "link"]).stdout
    assert "hnvx0" not in links
    qdiscs = run_in_namespace(lab.h1.namespace, ["tc", "qdisc", "show", "dev", lab.vm1.port_link])
    assert "clsact" not in qdiscs.stdout
    underlay_filters = run_in_namespace(lab.h1.namespace, ["tc", "filter", "show", *underlay])
    assert "hn_underlay_ingress" not in underlay_filters.stdout
    assert "u32" in underlay_filters.stdout  # only ours went
    # Where the underlay had no clsact, the datapath removes the one it made.
    qdiscs = run_in_namespace(
        lab.h2.namespace, ["tc", "qdisc", "show", "dev", lab.h2.underlay_link]
    )
    assert "clsact" in qdiscs.stdout
    dp2.process.stop()
    qdiscs = run_in_namespace(
        lab.h2.namespace, ["tc", "qdisc", "show", "dev", lab.h2.underlay_link]
    )
    assert "clsact" not in qdiscs.stdout
