"""The userspace datapath's per-frame receive path, in-process: ports whose sockets are fakes
that replay frames (`recv_into`) and record what is sent. Checks that the raw-key cache gives
the same result as parsing (also after a flow is removed or replaced), that offload flags are
handled on the reused buffer, that upcalls get copies, and that tunnel output is batched into
UDP GSO trains without reordering.
"""

from __future__ import annotations

import struct

import pytest

from hivenet.datapath import userspace
from hivenet.datapath._offload import F_DATA_VALID, F_NEEDS_CSUM, VNET_HEADER, ZERO_VNET_HEADER
from hivenet.flows.actions import Action, Output, Tunnel
from hivenet.packets import build_arp_request
from hivenet.packets.checksum import pseudo_header_sum
from hivenet.packets.flowmatch import FIELD_NAMES, FULL_MASKS, mask_from
from hivenet.packets.vxlan import vxlan_decapsulate
from tests.unit.datapath.fakes import MAC_A, RecordingUdpSocket, ReplaySocket, udp_frame


class Harness:
    def __init__(self) -> None:
        self.datapath = userspace.UserspaceDatapath("127.0.0.1", emc_capacity=4)
        self.sockets = {key: ReplaySocket() for key in (1, 2, 3)}
        for key, sock in self.sockets.items():
            port = userspace._BoundPort(key, f"p{key}", sock)  # type: ignore[arg-type]
            self.datapath._ports[key] = port
        self.tunnel = RecordingUdpSocket()
        self.datapath._tunnel_sock = self.tunnel  # type: ignore[assignment]
        self.upcalls: list[tuple[int, bytes]] = []
        self.datapath.set_upcall_handler(lambda port, frame: self.upcalls.append((port, frame)))

    def install(self, fields: dict[str, int], actions: list[Action]) -> None:
        match = tuple(fields.get(name, 0) for name in FIELD_NAMES)
        mask = mask_from({name: FULL_MASKS[name] for name in fields})
        self.datapath.install_flow(match, mask, actions, ["test"], idle_timeout=0)

    def receive(self, port_key: int, *packets: bytes) -> None:
        self.sockets[port_key].queue.extend(packets)
        self.datapath._on_port_readable(self.datapath._ports[port_key])


def to_port_2(harness: Harness) -> None:
    harness.install({"in_port": 1, "eth_type": 0x0800}, [Output(2)])


def test_cached_frames_are_forwarded_as_received_and_counted_as_exact_hits() -> None:
    harness = Harness()
    to_port_2(harness)
    packets = [ZERO_VNET_HEADER + udp_frame(port) for port in (1000, 1001, 1000, 1000)]
    harness.receive(1, *packets)
    assert harness.sockets[2].sent == packets
    counters = harness.datapath.counters()
    assert counters["megaflow_hits"] == 2  # one per new raw key
    assert counters["emc_hits"] == 2
    assert counters["port.2.tx_packets"] == 4


def test_a_removed_flow_is_not_used_from_the_cache() -> None:
    harness = Harness()
    to_port_2(harness)
    packet = ZERO_VNET_HEADER + udp_frame(1000)
    harness.receive(1, packet)
    assert harness.datapath.invalidate(["test"]) == 1
    harness.receive(1, packet)
    assert len(harness.sockets[2].sent) == 1
    assert harness.upcalls == [(1, packet[10:])]
    harness.install({"in_port": 1, "eth_type": 0x0800}, [Output(3)])
    harness.receive(1, packet)
    assert harness.sockets[3].sent == [packet]


def test_the_cache_is_bounded_per_port() -> None:
    harness = Harness()
    to_port_2(harness)
    harness.receive(1, *(ZERO_VNET_HEADER + udp_frame(port) for port in range(1000, 1010)))
    assert len(harness.datapath._ports[1].flow_cache) == 4
    assert len(harness.sockets[2].sent) == 10


def test_frames_without_a_raw_key_take_the_parse_path() -> None:
    harness = Harness()
    harness.install({"in_port": 1, "eth_type": 0x0806}, [Output(2)])
    arp = ZERO_VNET_HEADER + build_arp_request(
        sender_mac=MAC_A, sender_ip="10.0.0.1", target_ip="10.0.0.2"
    )
    harness.receive(1, arp, arp)
    assert harness.sockets[2].sent == [arp, arp]
    assert harness.datapath._ports[1].flow_cache == {}
    counters = harness.datapath.counters()
    assert counters["megaflow_hits"] == 1 and counters["emc_hits"] == 1


def test_malformed_frames_are_counted_and_dropped() -> None:
    harness = Harness()
    to_port_2(harness)
    harness.receive(1, ZERO_VNET_HEADER + udp_frame(1000)[:30], ZERO_VNET_HEADER[:4])
    assert harness.sockets[2].sent == []
    assert harness.datapath.counters()["drop.malformed_frame"] == 2


def test_data_valid_is_cleared_on_local_output_and_offload_requests_kept() -> None:
    harness = Harness()
    to_port_2(harness)
    frame = udp_frame(1000)
    data_valid = VNET_HEADER.pack(F_DATA_VALID, 0, 0, 0, 0, 0)
    partial = VNET_HEADER.pack(F_NEEDS_CSUM, 0, 0, 0, 34, 6)
    harness.receive(1, data_valid + frame, partial + frame)
    assert harness.sockets[2].sent == [ZERO_VNET_HEADER + frame, partial + frame]


def test_upcalls_get_their_own_copy_of_the_frame() -> None:
    harness = Harness()
    first, second = udp_frame(1000), udp_frame(1001, payload=b"y" * 18)
    harness.receive(1, ZERO_VNET_HEADER + first, ZERO_VNET_HEADER + second)
    assert harness.upcalls == [(1, first), (1, second)]


def test_small_tunnel_frames_leave_as_one_gso_train_in_order() -> None:
    harness = Harness()
    harness.install({"in_port": 1, "eth_type": 0x0800}, [Tunnel("127.0.0.2", 7)])
    frames = [udp_frame(1000 + index) for index in range(5)] + [udp_frame(2000, b"z")]
    frames.append(udp_frame(3000, b"w" * 30))  # longer: starts a new train
    harness.receive(1, *(ZERO_VNET_HEADER + frame for frame in frames))
    sent = harness.tunnel.split()
    assert [vxlan_decapsulate(datagram) for datagram in sent] == [(7, frame) for frame in frames]
    assert [segment for _data, segment in harness.tunnel.datagrams] == [len(sent[0]), 0]


def test_tunnel_frames_get_their_checksum_completed() -> None:
    harness = Harness()
    harness.install({"in_port": 1, "eth_type": 0x0800}, [Tunnel("127.0.0.2", 7)])
    frame = udp_frame(1000)
    partial = bytearray(frame)
    # What the sender's stack leaves for "the hardware": the pseudo-header sum, uncomplemented.
    udp_length = len(frame) - 34
    partial[40:42] = struct.pack(
        "!H", pseudo_header_sum(frame[26:30], frame[30:34], 17, udp_length)
    )
    harness.receive(1, VNET_HEADER.pack(F_NEEDS_CSUM, 0, 0, 0, 34, 6) + bytes(partial))
    (datagram,) = harness.tunnel.split()
    assert vxlan_decapsulate(datagram) == (7, frame)
    assert harness.datapath.counters()["offload_checksummed"] == 1


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_size_bounds_one_readiness_callback(batch_size: int) -> None:
    harness = Harness()
    harness.datapath._batch_size = batch_size
    to_port_2(harness)
    harness.receive(1, *(ZERO_VNET_HEADER + udp_frame(1000) for _ in range(5)))
    assert len(harness.sockets[2].sent) == batch_size
    assert len(harness.sockets[1].queue) == 5 - batch_size


def _tso_frame(payload_len: int) -> bytes:
    """A TCP super-frame with DF, as a VM's stack hands it to its interface (TSO)."""
    from hivenet.packets.builders import ethernet_frame, ipv4_packet, tcp_segment

    segment = tcp_segment("10.0.0.1", "10.0.0.2", 40000, 80, payload=bytes(payload_len), flags=0x10)
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", 6, segment, flags=0b010)
    return ethernet_frame("02:00:00:00:00:02", MAC_A, 0x0800, packet)


@pytest.mark.parametrize(("gso_size", "upcalled"), [(960, 0), (961, 4)])
def test_a_tso_frame_is_held_to_the_flows_mtu_by_its_segments(gso_size: int, upcalled: int) -> None:
    from hivenet.datapath._offload import GSO_TCPV4

    harness = Harness()
    match = tuple({"in_port": 1}.get(name, 0) for name in FIELD_NAMES)
    mask = mask_from({"in_port": FULL_MASKS["in_port"]})
    harness.datapath.install_flow(match, mask, [Output(2)], ["t"], idle_timeout=0, mtu=1000)
    header = VNET_HEADER.pack(F_NEEDS_CSUM, GSO_TCPV4, 54, gso_size, 34, 16)
    frame = _tso_frame(3840)
    harness.receive(1, header + frame)
    if not upcalled:  # 20 + 20 + 960 = 1000: the segments fit, the super-frame goes on whole
        assert harness.sockets[2].sent == [header + frame]
        assert harness.upcalls == []
    else:  # each wire segment goes to the simulation, which answers it
        assert harness.sockets[2].sent == []
        assert len(harness.upcalls) == upcalled
        assert max(len(f) for _port, f in harness.upcalls) == 14 + 40 + gso_size
        assert harness.datapath.counters()["mtu_upcalls"] == 1


# ---- the per-port upcall budget and turn-taking ---------------------------------------------


def test_a_port_over_its_upcall_budget_is_dropped_and_counted_while_others_upcall() -> None:
    harness = Harness()
    clock = [100.0]
    harness.datapath._clock = lambda: clock[0]
    harness.datapath.set_upcall_budget(10, 3)
    for start in range(0, 8, 2):  # in callbacks of two, as a busy loop would take them
        harness.receive(1, *(ZERO_VNET_HEADER + udp_frame(2000 + n) for n in (start, start + 1)))
    harness.receive(2, ZERO_VNET_HEADER + udp_frame(3000))
    assert [port for port, _frame in harness.upcalls] == [1, 1, 1, 2]
    counters = harness.datapath.counters()
    assert counters["drop.upcall_budget"] == 5
    assert counters["port.1.upcall_budget_drops"] == 5
    assert counters["port.2.upcall_budget_drops"] == 0
    clock[0] += 0.15  # one token and a half back for port 1
    harness.receive(1, ZERO_VNET_HEADER + udp_frame(2100), ZERO_VNET_HEADER + udp_frame(2101))
    assert [port for port, _frame in harness.upcalls] == [1, 1, 1, 2, 1]


def test_flows_already_installed_do_not_spend_the_budget() -> None:
    harness = Harness()
    harness.datapath.set_upcall_budget(1, 1)
    to_port_2(harness)
    harness.receive(1, *(ZERO_VNET_HEADER + udp_frame(1000 + n) for n in range(20)))
    assert len(harness.sockets[2].sent) == 20
    assert "drop.upcall_budget" not in harness.datapath.counters()


def test_rate_zero_means_no_budget() -> None:
    harness = Harness()
    harness.datapath.set_upcall_budget(0, 1)
    for n in range(30):
        harness.receive(1, ZERO_VNET_HEADER + udp_frame(4000 + n))
    assert len(harness.upcalls) == 30


def test_one_callback_stops_after_its_upcall_share_and_the_rest_waits_on_the_socket() -> None:
    harness = Harness()
    harness.datapath._upcalls_per_batch = 3
    harness.receive(1, *(ZERO_VNET_HEADER + udp_frame(5000 + n) for n in range(10)))
    assert len(harness.upcalls) == 3
    assert len(harness.sockets[1].queue) == 7
    # Cached frames do not count: a callback still forwards a whole batch of them.
    to_port_2(harness)
    harness.datapath._ports[1].flow_cache.clear()
    harness.sockets[1].queue.clear()
    harness.receive(1, *(ZERO_VNET_HEADER + udp_frame(6000) for _ in range(10)))
    assert len(harness.sockets[2].sent) == 10


def test_unbinding_forgets_the_ports_budget() -> None:
    harness = Harness()
    harness.datapath.set_upcall_budget(10, 1)
    harness.receive(1, ZERO_VNET_HEADER + udp_frame(1), ZERO_VNET_HEADER + udp_frame(2))
    assert harness.datapath.counters()["port.1.upcall_budget_drops"] == 1
    harness.datapath.unbind_port(1)
    assert 1 not in harness.datapath._upcall_budgets


@pytest.mark.parametrize(("rate", "burst"), [(-1, 1), (1, 0), (True, 1), (1, 2.0)])
def test_set_upcall_budget_refuses_nonsense(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        userspace.UserspaceDatapath("127.0.0.1").set_upcall_budget(rate, burst)


def test_frames_over_the_budget_also_end_a_callbacks_turn() -> None:
    """Each costs a parse and a lookup: a flooding port over its budget gets 16 per turn."""
    harness = Harness()
    harness.datapath.set_upcall_budget(1, 1)
    harness.receive(1, *(ZERO_VNET_HEADER + udp_frame(7000 + n) for n in range(40)))
    assert len(harness.upcalls) == 1
    assert harness.datapath.counters()["drop.upcall_budget"] == 15
    assert len(harness.sockets[1].queue) == 24


def test_the_kernels_drops_on_a_full_port_socket_are_summed_across_reads() -> None:
    """PACKET_STATISTICS resets on read: the counter keeps the sum."""
    harness = Harness()
    reported = iter([3, 0, 4, 0])

    def getsockopt(level: int, option: int, size: int) -> bytes:
        assert (level, option, size) == (userspace.SOL_PACKET, userspace.PACKET_STATISTICS, 8)
        return struct.pack("=II", 100, next(reported))

    harness.sockets[1].getsockopt = getsockopt  # type: ignore[attr-defined]
    counts = [harness.datapath.counters()["port.1.rx_kernel_drops"] for _ in range(3)]
    assert counts == [3, 3, 7]
    assert harness.datapath.counters()["port.2.rx_kernel_drops"] == 0  # no getsockopt: none
