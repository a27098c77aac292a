"""VIPs in the simulation (sim/vips.py + the engine's router stages) over real flow-state
tables: spread by weight, the backend sticking to the connection through member changes,
replies translated back, source-IP persistence, hairpin and same-subnet clients, health-driven
removal, rejects, and the megaflow/invalidation contract."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from hivenet.model import Member, OperatingStatus
from hivenet.packets import extract_flow_match
from hivenet.sim.vips import pool_tag
from tests.unit.lbsim.helpers import (
    CLIENTS,
    MEMBERS,
    ROUTER_BACK_IP,
    ROUTER_MACS,
    VIP,
    WEB_PORT,
    LbWorld,
    ip,
    lb_objects,
    member_reached,
    rewritten,
)
from tests.unit.sim.topo import arp_who_has, mac, tcp, udp

SYN, SYN_ACK, ACK = 0x02, 0x12, 0x10


def client_tcp(client: str, sport: int, flags: int = SYN, dport: int = 80) -> bytes:
    address, _host, n = CLIENTS[client]
    return tcp(mac(n), ROUTER_MACS["r1-front"], address, VIP, sport=sport, dport=dport, flags=flags)


def client_udp(client: str, sport: int) -> bytes:
    address, _host, n = CLIENTS[client]
    return udp(mac(n), ROUTER_MACS["r1-front"], address, VIP, sport=sport, dport=53)


def open_connections(world: LbWorld, count: int, start: int = 20000) -> dict[tuple[str, int], str]:
    """`count` new TCP connections from c1 and c2 alternately; (client, sport) -> member."""
    chosen: dict[tuple[str, int], str] = {}
    for n in range(count):
        client = "c1" if n % 2 == 0 else "c2"
        result = world.send(client, client_tcp(client, start + n))
        member = member_reached(result)
        assert member is not None, result.format_trace()
        chosen[(client, start + n)] = member
    return chosen


def test_new_flows_spread_by_weight_from_two_client_hosts() -> None:
    world = LbWorld.build(lb_objects({"m1": 1, "m2": 2, "m3": 3}))
    counts = Counter(open_connections(world, 1800).values())
    assert set(counts) == {"m1", "m2", "m3"}
    for member, weight in (("m1", 1), ("m2", 2), ("m3", 3)):
        share = counts[member] / 1800
        assert abs(share - weight / 6) < 0.04, counts


def test_member_reply_leaves_as_the_vip_and_the_connection_goes_on() -> None:
    world = LbWorld.build()
    first = world.send("c1", client_tcp("c1", 41000))
    member = member_reached(first)
    assert member is not None
    address, _host, n = MEMBERS[member]
    reply = world.send(
        member,
        tcp(
            mac(n),
            ROUTER_MACS["r1-back"],
            address,
            CLIENTS["c1"][0],
            WEB_PORT,
            41000,
            flags=SYN_ACK,
        ),
    )
    assert rewritten(reply)["ip_src"] == ip(VIP) and rewritten(reply)["tp_src"] == 80
    assert "ip_dst" not in rewritten(reply)
    again = world.send("c1", client_tcp("c1", 41000, ACK))
    assert member_reached(again) == member


def test_existing_connections_keep_their_member_only_new_flows_move() -> None:
    world = LbWorld.build()
    before = open_connections(world, 300)
    # Add m4, reweight m2, remove m3: every existing connection keeps its member...
    world.apply(
        Member(
            id="web-m4",
            pool_id="web",
            address=ipaddress.ip_address(MEMBERS["m4"][0]),
            protocol_port=WEB_PORT,
            weight=2,
        )
    )
    member = world.view.get("member", "web-m2")
    assert isinstance(member, Member)
    world.apply(member.model_copy(update={"weight": 5}))
    world.remove("member", "web-m3")
    for (client, sport), member_name in before.items():
        result = world.send(client, client_tcp(client, sport, ACK), use_cache=False)
        assert member_reached(result) == member_name
    # ... while new flows see the new table: m4 takes some, m3 none.
    after = Counter(open_connections(world, 300, start=30000).values())
    assert after["m4"] > 0 and after["m3"] == 0


def test_cached_vip_flows_carry_the_pool_tag_and_are_invalidated_by_member_changes() -> None:
    world = LbWorld.build()
    result = world.send("c1", client_tcp("c1", 42000))
    assert pool_tag("web") in result.tags
    match = extract_flow_match(client_tcp("c1", 42000, ACK), world.view.ports["c1"].tunnel_key)
    assert world.flows.lookup(match, world.now) is not None
    world.set_observed("web-m1", OperatingStatus.ONLINE)  # nothing changes for the flow...
    assert world.flows.lookup(match, world.now) is None  # ...but the pool's flows re-simulate
    again = world.send("c1", client_tcp("c1", 42000, ACK))
    assert member_reached(again) == member_reached(result)


def test_health_down_member_takes_no_new_flows_and_back_up_it_does() -> None:
    world = LbWorld.build(lb_objects(monitor=True))
    world.set_observed("web-m2", OperatingStatus.OFFLINE)
    counts = Counter(open_connections(world, 200).values())
    assert counts["m2"] == 0 and counts["m1"] > 0 and counts["m3"] > 0
    world.set_observed("web-m2", OperatingStatus.ONLINE)
    counts = Counter(open_connections(world, 200, start=30000).values())
    assert counts["m2"] > 0


def test_no_member_left_rejects_with_a_reset_and_is_never_cached() -> None:
    world = LbWorld.build()
    for name in ("m1", "m2", "m3"):
        world.set_observed(f"web-{name}", OperatingStatus.OFFLINE)
    result = world.send("c1", client_tcp("c1", 43000))
    assert result.drop_reason == "lb_no_backend" and not result.install
    (reset,) = result.generated
    answer = extract_flow_match(reset.frame, 0)
    assert answer.ip_src == ip(VIP) and answer.tcp_flags & 0x04


def test_vip_traffic_without_a_listener_is_rejected() -> None:
    world = LbWorld.build()
    result = world.send("c1", client_tcp("c1", 43001, dport=443))
    assert result.drop_reason == "rule_reject" and "lb-pre.r1" in result.format_trace()
    (reset,) = result.generated
    assert extract_flow_match(reset.frame, 0).ip_src == ip(VIP)


def test_udp_vip_with_source_ip_persistence() -> None:
    world = LbWorld.build()
    chosen = {
        member_reached(world.send("c1", client_udp("c1", sport))) for sport in range(5000, 5040)
    }
    assert len(chosen) == 1
    (member,) = chosen
    assert member is not None
    # The record outlives a table change that takes the member out of the source hash
    # (weight 0: draining, it keeps its persistent clients) ...
    drained = world.view.get("member", f"dns-{member}")
    assert isinstance(drained, Member)
    world.apply(drained.model_copy(update={"weight": 0}))
    assert member_reached(world.send("c1", client_udp("c1", 6000))) == member
    # ... until it expires (60 s after the last new flow) ...
    world.now += 61
    assert member_reached(world.send("c1", client_udp("c1", 6001))) != member
    # ... and it never survives its member going down.
    world.apply(drained)
    world.now += 61
    again = member_reached(world.send("c1", client_udp("c1", 6002)))
    world.set_observed(f"dns-{again}", OperatingStatus.OFFLINE)
    assert member_reached(world.send("c1", client_udp("c1", 6003))) not in (again, None)
    # Without persistence, one client's flows spread over the members.
    spread = LbWorld.build(lb_objects(persistence=False))
    seen = {member_reached(spread.send("c1", client_udp("c1", s))) for s in range(5000, 5060)}
    assert len(seen) == 3


def test_client_on_the_vip_subnet_gets_the_arp_answer_and_the_reply() -> None:
    world = LbWorld.build()
    result = world.send("c1", arp_who_has(mac(1), CLIENTS["c1"][0], VIP))
    (answer,) = result.generated
    reply = extract_flow_match(answer.frame, 0)
    assert reply.arp_op == 2 and reply.arp_spa == ip(VIP)
    assert reply.arp_sha == int(ROUTER_MACS["r1-front"].replace(":", ""), 16)
    # An address of the subnet that is no VIP gets no answer from the router.
    other = world.send("c1", arp_who_has(mac(1), CLIENTS["c1"][0], "10.0.1.99"))
    assert not any(extract_flow_match(g.frame, 0).arp_op == 2 for g in other.generated)


@pytest.mark.parametrize("caller", ["m1", "m2", "m3"])
def test_member_calling_its_own_vip_is_hairpinned(caller: str) -> None:
    world = LbWorld.build()
    address, _host, n = MEMBERS[caller]
    hits: set[str] = set()
    for sport in range(44000, 44060):
        frame = tcp(mac(n), ROUTER_MACS["r1-back"], address, VIP, sport=sport, dport=80, flags=SYN)
        result = world.send(caller, frame)
        member = member_reached(result)
        assert member is not None, result.format_trace()
        hits.add(member)
        rewrites = rewritten(result)
        # Leaving the port it came in by: source-NATed to the router, so the reply returns.
        assert rewrites["ip_src"] == ip(ROUTER_BACK_IP), result.format_trace()
        target_address, _target_host, target_n = MEMBERS[member]
        reply = world.send(
            member,
            tcp(
                mac(target_n),
                ROUTER_MACS["r1-back"],
                target_address,
                ROUTER_BACK_IP,
                sport=WEB_PORT,
                dport=rewrites["tp_src"],
                flags=SYN_ACK,
            ),
        )
        back = rewritten(reply)
        assert back["ip_src"] == ip(VIP) and back["tp_src"] == 80, reply.format_trace()
        assert back["ip_dst"] == ip(address) and back["tp_dst"] == sport, reply.format_trace()
    assert caller in hits  # it also reached itself


def test_listener_allowed_cidrs_and_removal() -> None:
    objects = lb_objects()
    objects = [
        o.model_copy(update={"allowed_cidrs": (ipaddress.ip_network("10.0.1.11/32"),)})
        if getattr(o, "id", "") == "web-80"
        else o
        for o in objects
    ]
    world = LbWorld.build(objects)
    refused = world.send("c1", client_tcp("c1", 45000))
    assert refused.drop_reason == "lb_client_not_allowed"
    assert member_reached(world.send("c2", client_tcp("c2", 45000))) is not None
    world.remove("listener", "web-80")
    gone = world.send("c2", client_tcp("c2", 45001))
    assert gone.drop_reason == "rule_reject" and member_reached(gone) is None
