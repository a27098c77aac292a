"""`EbpfDatapath`'s offload bookkeeping over the fake kernel (no root): when kernel entries are
written, that they go with their megaflow (invalidation, replacement, expiry, unbinding), and
that kernel traffic keeps megaflows alive and shows in the counters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hivenet.flows.actions import Output, SetField
from hivenet.packets.flowmatch import FIELD_NAMES, FULL_MASKS, mask_from
from tests.unit.datapath.ebpf.rig import EbpfReplayRig
from tests.unit.datapath.fakes import udp_frame

IPV4 = 0x0800


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[EbpfReplayRig]:
    made = EbpfReplayRig(monkeypatch.setattr)
    try:
        yield made
    finally:
        made.close()


def install(
    rig: EbpfReplayRig, tags: list[str], *, idle_timeout: float = 0.0, **actions: int
) -> None:
    """A megaflow for IPv4 from port 1 (every UDP 5-tuple), output to port 2."""
    fields = {"in_port": 1, "eth_type": IPV4}
    match = tuple(fields.get(name, 0) for name in FIELD_NAMES)
    mask = mask_from({name: FULL_MASKS[name] for name in fields})
    rewrites = [SetField(name, value) for name, value in actions.items()]
    rig.ebpf.install_flow(match, mask, [*rewrites, Output(2)], tags, idle_timeout=idle_timeout)


def bind(rig: EbpfReplayRig) -> list[tuple[int, bytes]]:
    upcalls: list[tuple[int, bytes]] = []
    rig.ebpf.set_upcall_handler(lambda port, frame: upcalls.append((port, frame)))
    rig.bind(1)
    rig.bind(2)
    return upcalls


def test_a_megaflow_hit_in_userspace_puts_the_flows_exact_entry_in_the_kernel(
    rig: EbpfReplayRig,
) -> None:
    bind(rig)
    install(rig, ["t"])
    rig.send_from_vm(1, udp_frame(1000), udp_frame(1000), udp_frame(1000), udp_frame(1001))
    assert rig.kernel_forwarded == 2  # the 2nd and 3rd frame of the first 5-tuple
    assert len(rig.delivered(2)) == 4
    assert len(rig.kernel.flows) == 2  # one exact entry per 5-tuple under the megaflow
    counters = rig.ebpf.counters()
    assert counters["kernel_entries"] == 2
    assert counters["port.1.rx_packets"] == 4 and counters["port.2.tx_packets"] == 4


def test_the_flow_installed_for_an_upcall_gets_that_frames_entry_at_once(
    rig: EbpfReplayRig,
) -> None:
    upcalls = bind(rig)

    def simulate(port: int, frame: bytes) -> None:
        upcalls.append((port, frame))
        install(rig, ["t"])
        rig.ebpf.execute(frame, [Output(2)])

    rig.ebpf.set_upcall_handler(simulate)
    rig.send_from_vm(1, udp_frame(1000), udp_frame(1000))
    assert len(upcalls) == 1
    assert rig.kernel_forwarded == 1
    assert len(rig.delivered(2)) == 2


def test_invalidation_removes_the_kernel_entries_of_the_megaflow(rig: EbpfReplayRig) -> None:
    upcalls = bind(rig)
    install(rig, ["bridge:1"])
    rig.send_from_vm(1, udp_frame(1000), udp_frame(1001))
    assert len(rig.kernel.flows) == 2
    assert rig.ebpf.invalidate(["bridge:1"]) == 1
    assert rig.kernel.flows == {}
    rig.send_from_vm(1, udp_frame(1000))
    assert len(upcalls) == 1 and rig.kernel_forwarded == 0


def test_a_replaced_megaflow_takes_its_kernel_entries_with_it(rig: EbpfReplayRig) -> None:
    bind(rig)
    install(rig, ["t"], eth_dst=0x020000000099)
    rig.send_from_vm(1, udp_frame(1000))
    install(rig, ["t"], eth_dst=0x0200000000AA)  # same match and mask: replaces
    assert rig.kernel.flows == {}
    rig.send_from_vm(1, udp_frame(1000), udp_frame(1000))
    frames = rig.delivered(2)
    assert [frame[:6].hex() for frame in frames] == ["020000000099"] + ["0200000000aa"] * 2


def test_kernel_hits_keep_a_megaflow_alive_and_idle_ones_expire_with_their_entries(
    rig: EbpfReplayRig,
) -> None:
    bind(rig)
    install(rig, ["t"], idle_timeout=10.0)
    rig.send_from_vm(1, udp_frame(1000))
    for _ in range(3):  # 24 s of kernel-only traffic: userspace sees none of it
        rig.clock.advance(8.0)
        rig.send_from_vm(1, udp_frame(1000))
        assert rig.ebpf.expire_flows() == 0
    (flow,) = rig.ebpf.flows()
    assert flow.packets == 4
    rig.clock.advance(11.0)
    assert rig.ebpf.expire_flows() == 1
    assert rig.kernel.flows == {} and rig.ebpf.kernel_entries() == {}


def test_unbinding_a_port_removes_the_entries_that_use_it(rig: EbpfReplayRig) -> None:
    bind(rig)
    install(rig, ["t"])
    rig.send_from_vm(1, udp_frame(1000))
    assert len(rig.kernel.flows) == 1
    rig.ebpf.unbind_port(2)
    assert rig.kernel.flows == {}


def test_a_full_kernel_map_that_evicted_an_entry_is_noticed(rig: EbpfReplayRig) -> None:
    bind(rig)
    install(rig, ["t"])
    rig.send_from_vm(1, udp_frame(1000))
    rig.kernel.flows.clear()  # what the LRU map does when full
    assert rig.ebpf.counters()["kernel_entries"] == 0
    rig.send_from_vm(1, udp_frame(1000), udp_frame(1000))
    assert rig.kernel_forwarded == 1  # re-offloaded by the next userspace hit


def test_with_many_entries_the_counters_come_from_one_batch_dump(
    rig: EbpfReplayRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    bind(rig)
    install(rig, ["t"], idle_timeout=10.0)
    ports = range(1000, 1100)  # more entries than _BATCH_SYNC_ENTRIES
    rig.send_from_vm(1, *(udp_frame(port) for port in ports))
    assert len(rig.kernel.flows) == 100

    def no_lookups(key: bytes) -> None:
        raise AssertionError("a lookup per entry: the batch dump was not used")

    monkeypatch.setattr(rig.kernel, "entry_counters", no_lookups)
    rig.clock.advance(8.0)
    rig.send_from_vm(1, *(udp_frame(port) for port in ports))  # all in the kernel now
    assert rig.kernel_forwarded == 100
    assert rig.ebpf.expire_flows() == 0
    (flow,) = rig.ebpf.flows()
    assert flow.packets == 200
    evicted = next(iter(rig.kernel.flows))
    del rig.kernel.flows[evicted]  # the LRU map dropped one
    assert rig.ebpf.counters()["kernel_entries"] == 99
    rig.clock.advance(11.0)
    assert rig.ebpf.expire_flows() == 1
    assert rig.kernel.flows == {}


def test_a_first_frame_is_sent_before_its_kernel_entry_is_written(rig: EbpfReplayRig) -> None:
    # The entry's syscalls come after the batch's frames left: the first packet never waits.
    seen_during_upcall: list[int] = []

    def simulate(port: int, frame: bytes) -> None:
        install(rig, ["t"])
        rig.ebpf.execute(frame, [Output(2)])
        seen_during_upcall.append(len(rig.kernel.flows))

    bind(rig)
    rig.ebpf.set_upcall_handler(simulate)
    rig.send_from_vm(1, udp_frame(1000))
    assert seen_during_upcall == [0]
    assert len(rig.delivered(2)) == 1
    assert len(rig.kernel.flows) == 1  # written once the batch was done
    rig.send_from_vm(1, udp_frame(1000))
    assert rig.kernel_forwarded == 1
