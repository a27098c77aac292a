"""The `Datapath` contract: every case runs on each backend in `RIGS` (the strict memory fake
and the real userspace datapath over replayed sockets), so the fake the integration tests use
is proved to behave like the real thing. tests/e2e/test_datapath_contract.py runs the same
cases once more on real veths and UDP.

Where the strict fake is stricter on purpose (an output to an unbound port at install time, a
tunnel frame for a key no port has) the case is not here; see tests/integration/sim.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hivenet.flows.actions import DecTtl, Drop, Output, SetField, Tunnel
from hivenet.model.types import FLOWSTATE_TUNNEL_KEY
from hivenet.packets import build_arp_request
from hivenet.packets.builders import ethernet_frame, ipv4_packet, ipv6_packet, udp_segment
from hivenet.packets.flowmatch import FIELD_NAMES, FULL_MASKS, mask_from
from tests.unit.datapath.fakes import MAC_A, MAC_B, udp_frame
from tests.unit.datapath.rigs import REMOTE_IP, MemoryRig, ReplayRig, Rig

RIGS = ["memory", "userspace-replay"]
IPV4 = 0x0800
STATE_MESSAGE = b"flow-state message " * 2  # opaque here; at least an Ethernet header long


@pytest.fixture(params=RIGS)
def rig(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    made: Rig = MemoryRig() if request.param == "memory" else ReplayRig(monkeypatch.setattr)
    try:
        yield made
    finally:
        made.close()


def install(
    rig: Rig,
    fields: dict[str, int],
    actions: list,
    tags: list[str],
    *,
    idle_timeout: float = 0.0,
    hard_timeout: float = 0.0,
) -> None:
    match = tuple(fields.get(name, 0) for name in FIELD_NAMES)
    mask = mask_from({name: FULL_MASKS[name] for name in fields})
    rig.datapath.install_flow(
        match, mask, actions, tags, idle_timeout=idle_timeout, hard_timeout=hard_timeout
    )


def with_ports(rig: Rig, *keys: int) -> list[tuple[int, bytes]]:
    """Bind `keys` and record upcalls in the list returned."""
    upcalls: list[tuple[int, bytes]] = []
    rig.datapath.set_upcall_handler(lambda port, frame: upcalls.append((port, frame)))
    for key in keys:
        rig.bind(key)
    return upcalls


# --------------------------------------------------------------------------- ports


def test_a_bad_port_key_is_refused_naming_it(rig: Rig) -> None:
    with pytest.raises(ValueError, match="port_key"):
        rig.datapath.bind_port(0, rig.interface_name(1))


def test_a_port_key_or_interface_is_bound_only_once(rig: Rig) -> None:
    rig.bind(1)
    with pytest.raises(ValueError, match="port_key"):
        rig.datapath.bind_port(1, rig.interface_name(2))
    with pytest.raises(ValueError, match="interface_name"):
        rig.datapath.bind_port(2, rig.interface_name(1))


def test_unbinding_a_port_that_is_not_bound_is_a_key_error(rig: Rig) -> None:
    rig.bind(1)
    rig.datapath.unbind_port(1)
    with pytest.raises(KeyError):
        rig.datapath.unbind_port(1)


# --------------------------------------------------------------------------- misses


def test_a_miss_goes_to_the_upcall_handler_with_its_port(rig: Rig) -> None:
    upcalls = with_ports(rig, 1, 2)
    frame = udp_frame()
    rig.send_from_vm(1, frame)
    assert upcalls == [(1, frame)]
    assert rig.delivered(2) == []


def test_a_miss_without_an_upcall_handler_is_a_counted_drop(rig: Rig) -> None:
    rig.bind(1)
    rig.send_from_vm(1, udp_frame(), udp_frame(1001))
    assert rig.datapath.counters()["drop.no_upcall_handler"] == 2


def test_a_malformed_frame_is_dropped_and_counted_not_upcalled(rig: Rig) -> None:
    upcalls = with_ports(rig, 1)
    rig.send_from_vm(1, udp_frame()[:20])
    assert upcalls == []
    assert rig.datapath.counters()["drop.malformed_frame"] == 1


# --------------------------------------------------------------------------- flows


def test_a_truncated_8021q_frame_is_counted_and_a_tagged_one_keeps_its_tag(rig: Rig) -> None:
    # Linux frees an 802.1Q frame too short to untag before any packet socket sees it: a real
    # port counts it by the interface's receive count (drop.port_stack), the fakes parse it.
    upcalls = with_ports(rig, 1, 2)
    truncated = udp_frame()[:12] + b"\x81\x00\x00\x05"
    rig.send_from_vm(1, truncated)
    counters = rig.datapath.counters()
    assert counters.get("drop.malformed_frame", 0) + counters.get("drop.port_stack", 0) == 1
    assert upcalls == [] and rig.delivered(2) == []
    # The kernel takes a whole tag off too (into metadata): the agent must still see it.
    tagged = udp_frame()[:12] + b"\x81\x00\x00\x05" + udp_frame()[12:]
    rig.send_from_vm(1, tagged)
    assert upcalls == [(1, tagged)]


def test_an_installed_flow_forwards_matching_frames_without_upcalls(rig: Rig) -> None:
    upcalls = with_ports(rig, 1, 2)
    install(rig, {"in_port": 1, "eth_type": IPV4}, [Output(2)], ["to2"])
    frames = [udp_frame(1000), udp_frame(1001), udp_frame(1000)]
    rig.send_from_vm(1, *frames)
    assert rig.delivered(2) == frames
    assert upcalls == []
    (flow,) = rig.datapath.flows()
    assert frozenset(flow.tags) == {"to2"}
    assert flow.packets == 3
    assert flow.bytes == sum(len(frame) for frame in frames)
    assert rig.datapath.counters()["flows"] == 1


def test_a_frame_the_flow_does_not_match_is_upcalled(rig: Rig) -> None:
    upcalls = with_ports(rig, 1, 2)
    install(rig, {"in_port": 1, "eth_type": IPV4}, [Output(2)], ["to2"])
    arp = build_arp_request(sender_mac=MAC_A, sender_ip="10.0.0.1", target_ip="10.0.0.2")
    rig.send_from_vm(1, arp)
    assert upcalls == [(1, arp)]
    assert rig.delivered(2) == []


def test_flow_actions_rewrite_the_frame(rig: Rig) -> None:
    with_ports(rig, 1, 2)
    install(rig, {"in_port": 1}, [SetField("eth_dst", 0x020000000009), Output(2)], ["rw"])
    rig.send_from_vm(1, udp_frame())
    (delivered,) = rig.delivered(2)
    assert delivered[:6] == bytes.fromhex("020000000009")
    assert delivered[6:] == udp_frame()[6:]


def test_a_drop_flow_counts_its_reason(rig: Rig) -> None:
    upcalls = with_ports(rig, 1, 2)
    install(rig, {"in_port": 1}, [Drop("rule_drop")], ["deny"])
    rig.send_from_vm(1, udp_frame(), udp_frame(1001))
    assert rig.delivered(2) == []
    assert upcalls == []
    assert rig.datapath.counters()["drop.flow_rule_drop"] == 2


def test_a_routed_flow_drops_a_bad_ipv4_header_checksum_and_counts_it(rig: Rig) -> None:
    # The checksum is no match field: a flow that a good packet installed through a router
    # (it decrements the TTL) checks every packet; a bridged flow forwards it (a switch).
    upcalls = with_ports(rig, 1, 2, 3)
    install(rig, {"in_port": 1}, [DecTtl(), Output(2)], ["routed"])
    install(rig, {"in_port": 3}, [Output(2)], ["bridged"])
    good = udp_frame()
    bad = good[:24] + bytes((good[24] ^ 0x5A,)) + good[25:]
    rig.send_from_vm(1, bad)
    assert rig.delivered(2) == []
    assert rig.datapath.counters()["drop.bad_ip_checksum"] == 1
    rig.send_from_vm(1, good)
    assert len(rig.delivered(2)) == 1
    rig.send_from_vm(3, bad)
    assert rig.delivered(2) == [bad]
    assert upcalls == []
    assert rig.datapath.counters()["drop.bad_ip_checksum"] == 1


def test_a_routed_flow_drops_a_source_routed_packet_and_counts_it(rig: Rig) -> None:
    # IP options are no match field: a routed flow re-checks every packet for a source route.
    upcalls = with_ports(rig, 1, 2)
    install(rig, {"in_port": 1}, [DecTtl(), Output(2)], ["routed"])
    segment = udp_segment("10.0.0.1", "10.0.0.2", 1000, 9, b"x" * 18)
    lsrr = bytes((131, 7, 4, 10, 0, 0, 2, 0))  # loose source route via 10.0.0.2, end of list
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", 17, segment, options=lsrr)
    record_route = ipv4_packet(
        "10.0.0.1", "10.0.0.2", 17, segment, options=bytes((7, 7, 4, 0, 0, 0, 0, 0))
    )
    rig.send_from_vm(1, ethernet_frame(MAC_B, MAC_A, IPV4, packet))
    assert rig.delivered(2) == []
    assert rig.datapath.counters()["drop.ip_source_route"] == 1
    rig.send_from_vm(1, ethernet_frame(MAC_B, MAC_A, IPV4, record_route))
    assert len(rig.delivered(2)) == 1 and upcalls == []


def udp_of_size(size: int, *, df: bool = True, v6: bool = False) -> bytes:
    """A UDP datagram of `size` L3 bytes between the addresses of `udp_frame`."""
    if v6:
        segment = udp_segment("2001:db8::1", "2001:db8::2", 1000, 9, b"x" * (size - 48))
        packet = ipv6_packet("2001:db8::1", "2001:db8::2", 17, segment)
        return ethernet_frame(MAC_B, MAC_A, 0x86DD, packet)
    segment = udp_segment("10.0.0.1", "10.0.0.2", 1000, 9, b"x" * (size - 28))
    packet = ipv4_packet("10.0.0.1", "10.0.0.2", 17, segment, flags=0b010 if df else 0)
    return ethernet_frame(MAC_B, MAC_A, IPV4, packet)


@pytest.mark.parametrize("to_tunnel", [False, True])
def test_a_flow_hit_bigger_than_the_flows_mtu_goes_to_the_agent_if_it_may_not_be_fragmented(
    rig: Rig, to_tunnel: bool
) -> None:
    upcalls = with_ports(rig, 1, 2)
    out = Tunnel(REMOTE_IP, 2) if to_tunnel else Output(2)
    match = tuple({"in_port": 1}.get(name, 0) for name in FIELD_NAMES)
    mask = mask_from({"in_port": FULL_MASKS["in_port"]})
    rig.datapath.install_flow(match, mask, [out], ["mtu"], idle_timeout=0, mtu=1000)
    fits = [udp_of_size(1000), udp_of_size(1000, df=False), udp_of_size(1000, v6=True)]
    rig.send_from_vm(1, *fits)
    sent = [frame for _ip, _key, frame in rig.tunnelled()] if to_tunnel else rig.delivered(2)
    assert sorted(sent) == sorted(fits)  # a kernel fast path may send its own ones first
    assert upcalls == []
    too_big = [udp_of_size(1001), udp_of_size(1001, v6=True)]
    rig.send_from_vm(1, *too_big)
    assert upcalls == [(1, frame) for frame in too_big]  # the simulation answers them
    assert rig.datapath.counters()["mtu_upcalls"] == 2
    rig.send_from_vm(1, udp_of_size(1001, df=False))  # nothing fragments: dropped
    assert rig.datapath.counters()["drop.too_big"] == 1
    assert len(upcalls) == 2
    sent = [frame for _ip, _key, frame in rig.tunnelled()] if to_tunnel else rig.delivered(2)
    assert sent == []


def test_invalidate_removes_exactly_the_flows_carrying_the_tags(rig: Rig) -> None:
    upcalls = with_ports(rig, 1, 2, 3)
    install(rig, {"in_port": 1}, [Output(3)], ["port:a", "router:r"])
    install(rig, {"in_port": 2}, [Output(3)], ["port:b"])
    rig.send_from_vm(1, udp_frame())  # warm any cache the backend keeps
    assert rig.datapath.invalidate(["port:zzz"]) == 0
    assert rig.datapath.invalidate(["router:r"]) == 1
    assert [frozenset(flow.tags) for flow in rig.datapath.flows()] == [{"port:b"}]
    assert rig.datapath.counters()["flows"] == 1
    rig.delivered(3)
    rig.send_from_vm(1, udp_frame())
    rig.send_from_vm(2, udp_frame())
    assert upcalls == [(1, udp_frame())]
    assert rig.delivered(3) == [udp_frame()]


def test_a_flow_installed_again_replaces_the_first(rig: Rig) -> None:
    with_ports(rig, 1, 2, 3)
    install(rig, {"in_port": 1}, [Output(2)], ["old"])
    rig.send_from_vm(1, udp_frame())
    install(rig, {"in_port": 1}, [Output(3)], ["new"])
    rig.send_from_vm(1, udp_frame())
    assert rig.delivered(2) == [udp_frame()]
    assert rig.delivered(3) == [udp_frame()]
    assert [frozenset(flow.tags) for flow in rig.datapath.flows()] == [{"new"}]


def test_idle_flows_expire_on_the_datapath_clock_and_use_keeps_them(rig: Rig) -> None:
    upcalls = with_ports(rig, 1, 2)
    install(rig, {"in_port": 1}, [Output(2)], ["idle"], idle_timeout=5.0)
    rig.clock.advance(4.0)
    assert rig.datapath.expire_flows() == 0
    rig.send_from_vm(1, udp_frame())
    (flow,) = rig.datapath.flows()
    assert flow.last_used == rig.clock()
    rig.clock.advance(4.0)
    assert rig.datapath.expire_flows() == 0  # used 4 s ago, idle timeout 5 s
    rig.clock.advance(1.5)
    assert rig.datapath.expire_flows() == 1
    assert rig.datapath.flows() == []
    rig.send_from_vm(1, udp_frame())
    assert len(upcalls) == 1
    assert len(rig.delivered(2)) == 1


def test_hard_timeout_expires_a_flow_in_use(rig: Rig) -> None:
    with_ports(rig, 1, 2)
    install(rig, {"in_port": 1}, [Output(2)], ["hard"], idle_timeout=0.0, hard_timeout=3.0)
    for _ in range(3):
        rig.clock.advance(0.9)
        rig.send_from_vm(1, udp_frame())
        assert rig.datapath.expire_flows() == 0
    rig.clock.advance(0.4)
    assert rig.datapath.expire_flows() == 1


def test_a_tunnel_to_a_bad_address_is_refused_naming_it(rig: Rig) -> None:
    with_ports(rig, 1)
    with pytest.raises(ValueError, match="remote_ip"):
        install(rig, {"in_port": 1}, [Tunnel("not-an-ip", 7)], ["t"])
    with pytest.raises(ValueError, match="remote_ip"):
        rig.datapath.execute(udp_frame(), [Tunnel("not-an-ip", 7)])
    assert rig.datapath.flows() == []


# --------------------------------------------------------------------------- execute, tunnels


def test_execute_outputs_one_frame_now(rig: Rig) -> None:
    with_ports(rig, 1, 2)
    rig.datapath.execute(udp_frame(), [Output(2)])
    assert rig.delivered(2) == [udp_frame()]
    assert rig.datapath.flows() == []


def test_a_tunnel_action_sends_the_frame_to_the_peer_under_the_key(rig: Rig) -> None:
    with_ports(rig, 1)
    install(rig, {"in_port": 1}, [Tunnel(REMOTE_IP, 42)], ["remote"])
    rig.send_from_vm(1, udp_frame(1000), udp_frame(1001))
    rig.datapath.execute(udp_frame(1002), [Tunnel(REMOTE_IP, 43)])
    assert rig.tunnelled() == [
        (REMOTE_IP, 42, udp_frame(1000)),
        (REMOTE_IP, 42, udp_frame(1001)),
        (REMOTE_IP, 43, udp_frame(1002)),
    ]


def test_a_frame_from_the_tunnel_goes_to_the_port_its_key_names(rig: Rig) -> None:
    upcalls = with_ports(rig, 1, 2)
    rig.arrive_from_tunnel(2, udp_frame())
    assert rig.delivered(2) == [udp_frame()]
    assert rig.delivered(1) == []
    assert upcalls == []  # the ingress host simulated already


def test_flow_state_messages_travel_on_the_reserved_key(rig: Rig) -> None:
    received: list[bytes] = []
    rig.datapath.set_flow_state_handler(received.append)
    rig.datapath.send_flow_state(REMOTE_IP, STATE_MESSAGE + b"1")
    assert rig.tunnelled() == [(REMOTE_IP, FLOWSTATE_TUNNEL_KEY, STATE_MESSAGE + b"1")]
    rig.arrive_from_tunnel(FLOWSTATE_TUNNEL_KEY, STATE_MESSAGE + b"2")
    assert received == [STATE_MESSAGE + b"2"]


ROGUE_IP = "127.0.0.9"  # an underlay address that is not a tunnel peer


def unknown_source_drops(rig: Rig) -> int:
    """Tunnel packets dropped for their source, wherever the backend dropped them (the eBPF
    datapath's kernel counts those it would have delivered itself)."""
    counters = rig.datapath.counters()
    return sum(v for name, v in counters.items() if name.endswith("tunnel_unknown_source"))


def test_without_tunnel_peers_every_source_is_accepted(rig: Rig) -> None:
    with_ports(rig, 2)
    rig.arrive_from_tunnel(2, udp_frame(), ROGUE_IP)
    assert rig.delivered(2) == [udp_frame()]
    assert unknown_source_drops(rig) == 0


def test_frames_from_a_source_that_is_not_a_tunnel_peer_are_dropped_and_counted(
    rig: Rig,
) -> None:
    upcalls = with_ports(rig, 2)
    rig.datapath.set_tunnel_peers([REMOTE_IP])
    rig.arrive_from_tunnel(2, udp_frame(1000), ROGUE_IP)
    rig.arrive_from_tunnel(2, udp_frame(1001))
    assert rig.delivered(2) == [udp_frame(1001)]
    assert unknown_source_drops(rig) == 1
    assert upcalls == []


def test_flow_state_from_a_source_that_is_not_a_tunnel_peer_never_reaches_the_handler(
    rig: Rig,
) -> None:
    received: list[bytes] = []
    rig.datapath.set_flow_state_handler(received.append)
    rig.datapath.set_tunnel_peers([REMOTE_IP])
    rig.arrive_from_tunnel(FLOWSTATE_TUNNEL_KEY, STATE_MESSAGE + b"rogue", ROGUE_IP)
    rig.arrive_from_tunnel(FLOWSTATE_TUNNEL_KEY, STATE_MESSAGE + b"peer")
    assert received == [STATE_MESSAGE + b"peer"]
    assert unknown_source_drops(rig) == 1


def test_tunnel_peers_can_change_and_be_lifted(rig: Rig) -> None:
    with_ports(rig, 2)
    rig.datapath.set_tunnel_peers([])
    rig.arrive_from_tunnel(2, udp_frame(1000))
    rig.datapath.set_tunnel_peers([ROGUE_IP, REMOTE_IP])
    rig.arrive_from_tunnel(2, udp_frame(1001), ROGUE_IP)
    rig.datapath.set_tunnel_peers(None)
    rig.arrive_from_tunnel(2, udp_frame(1002), "127.0.0.10")
    assert rig.delivered(2) == [udp_frame(1001), udp_frame(1002)]
    assert unknown_source_drops(rig) == 1


def test_a_tunnel_peer_that_is_not_an_address_is_refused_naming_it(rig: Rig) -> None:
    with pytest.raises(ValueError, match="not-an-ip"):
        rig.datapath.set_tunnel_peers([REMOTE_IP, "not-an-ip"])


def test_flow_state_without_a_handler_is_a_counted_drop(rig: Rig) -> None:
    rig.arrive_from_tunnel(FLOWSTATE_TUNNEL_KEY, STATE_MESSAGE)
    assert rig.datapath.counters()["drop.flowstate_without_handler"] == 1


# --------------------------------------------------------------------------- external VTEPs

VTEP_IP = "127.0.0.20"  # an external VXLAN VTEP (the L2 gateway): not a tunnel peer
VTEP_VNI = 5000
VTEP_PORT = 7  # the virtual port its frames enter by


def with_vtep(rig: Rig, *keys: int) -> list[tuple[int, bytes]]:
    upcalls = with_ports(rig, *keys)
    rig.datapath.set_tunnel_peers([REMOTE_IP])
    rig.datapath.bind_vtep(VTEP_PORT, VTEP_IP, VTEP_VNI)
    return upcalls


def test_a_frame_from_a_bound_vtep_enters_its_port_and_a_miss_goes_to_the_agent(
    rig: Rig,
) -> None:
    upcalls = with_vtep(rig, 1)
    rig.arrive_from_tunnel(VTEP_VNI, udp_frame(1000), VTEP_IP)
    assert upcalls == [(VTEP_PORT, udp_frame(1000))]
    assert rig.delivered(1) == []
    assert unknown_source_drops(rig) == 0


def test_a_vtep_frame_that_hits_a_flow_is_forwarded_without_an_upcall(rig: Rig) -> None:
    upcalls = with_vtep(rig, 1)
    install(rig, {"in_port": VTEP_PORT}, [Output(1)], ["vtep"])
    rig.arrive_from_tunnel(VTEP_VNI, udp_frame(1000), VTEP_IP)
    rig.arrive_from_tunnel(VTEP_VNI, udp_frame(1001), VTEP_IP)
    assert rig.delivered(1) == [udp_frame(1000), udp_frame(1001)]
    assert upcalls == []


def test_a_vtep_is_accepted_only_with_its_vni_and_never_as_a_tunnel_peer(rig: Rig) -> None:
    upcalls = with_vtep(rig, 1)
    rig.arrive_from_tunnel(VTEP_VNI + 1, udp_frame(1000), VTEP_IP)  # not its VNI
    rig.arrive_from_tunnel(FLOWSTATE_TUNNEL_KEY, STATE_MESSAGE, VTEP_IP)  # not a peer's
    rig.arrive_from_tunnel(VTEP_VNI, udp_frame(1001), VTEP_IP)  # the VTEP's frame
    rig.arrive_from_tunnel(1, udp_frame(1002))  # a peer's delivery to the local port
    assert unknown_source_drops(rig) == 2
    assert upcalls == [(VTEP_PORT, udp_frame(1001))]
    assert rig.delivered(1) == [udp_frame(1002)]


def test_an_unbound_vtep_is_a_stranger_again(rig: Rig) -> None:
    upcalls = with_vtep(rig)
    rig.datapath.unbind_vtep(VTEP_PORT)
    rig.arrive_from_tunnel(VTEP_VNI, udp_frame(), VTEP_IP)
    assert upcalls == []
    assert unknown_source_drops(rig) == 1
    with pytest.raises(KeyError, match=str(VTEP_PORT)):
        rig.datapath.unbind_vtep(VTEP_PORT)


def test_bad_or_repeated_vtep_bindings_are_refused_naming_the_value(rig: Rig) -> None:
    with_vtep(rig, 1)
    with pytest.raises(ValueError, match="not-an-ip"):
        rig.datapath.bind_vtep(8, "not-an-ip", 1)
    with pytest.raises(ValueError, match="0xf00000"):
        rig.datapath.bind_vtep(8, VTEP_IP, 0xF00000)  # the reserved keys
    with pytest.raises(ValueError, match=str(VTEP_VNI)):
        rig.datapath.bind_vtep(8, VTEP_IP, VTEP_VNI)  # that VNI of that VTEP is taken
    with pytest.raises(ValueError, match="port_key"):
        rig.datapath.bind_vtep(1, VTEP_IP, VTEP_VNI + 1)  # key 1 is an interface's
