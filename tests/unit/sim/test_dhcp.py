"""The pure DHCP responder: which reply for which message, the options it carries (checked
with scapy's own option decoder), NAKs, bad input counted and dropped, the flood budget, and
a fuzz of the parser plus responder that must never raise."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP

from hivenet.model import FixedIp, Subnet
from hivenet.packets.dhcp import (
    DHCP_ACK,
    DHCP_DECLINE,
    DHCP_DISCOVER,
    DHCP_INFORM,
    DHCP_NAK,
    DHCP_OFFER,
    DHCP_RELEASE,
    DHCP_REQUEST,
    OPTION_MESSAGE_TYPE,
    OPTION_PARAMETER_LIST,
    OPTION_REQUESTED_IP,
    OPTION_SERVER_ID,
    DhcpMessage,
    addresses_option,
    build_dhcp_request_message,
)
from hivenet.sim.dhcp import (
    DHCP_SERVER_FALLBACK_MAC,
    DhcpBudget,
    DhcpLease,
    DhcpVerdict,
    answer,
    decode_and_answer,
    lease_for,
    port_dhcp,
    server_address,
)
from tests.unit.sim.topo import Topo, port_mac

MAC = 0x020000000A01
OTHER_MAC = 0x020000000A02


def make_subnet(**fields: Any) -> Subnet:
    return Subnet.model_validate({"bridge_id": "b1", "cidr": "10.0.1.0/24", **fields})


def make_lease(**fields: Any) -> DhcpLease:
    lease = lease_for(make_subnet(**fields), ipaddress.IPv4Address("10.0.1.20"), MAC, 1450)
    assert lease is not None
    return lease


def request(message_type: int, *options: tuple[int, bytes], **fields: Any) -> DhcpMessage:
    mac = fields.pop("client_mac", MAC)
    return build_dhcp_request_message(
        client_mac=mac,
        xid=0x1234,
        message_type=message_type,
        options=options,
        **fields,
    )


def scapy_options(reply: DhcpMessage) -> dict[str, Any]:
    """The reply's options as scapy decodes them (an independent decoder)."""
    decoded = BOOTP(reply.encode())
    out: dict[str, Any] = {}
    for item in decoded[DHCP].options:
        if isinstance(item, tuple):
            out[item[0]] = item[1] if len(item) == 2 else list(item[1:])
    return out


def test_discover_gets_an_offer_with_every_option() -> None:
    lease = make_lease(
        dns_nameservers=["10.0.1.53", "10.0.1.54"],
        host_routes=[{"destination": "192.168.0.0/16", "nexthop": "10.0.1.254"}],
        domain_name="acme.example",
        lease_time=600,
    )
    got = answer(request(DHCP_DISCOVER), lease)
    assert got.verdict is DhcpVerdict.OFFER and got.reply is not None
    assert got.reply.xid == 0x1234 and got.reply.yiaddr == int(ipaddress.ip_address("10.0.1.20"))
    options = scapy_options(got.reply)
    assert options["message-type"] == DHCP_OFFER
    assert options["server_id"] == "10.0.1.1"
    assert options["subnet_mask"] == "255.255.255.0"
    assert options["router"] == "10.0.1.1"
    assert options["name_server"] == ["10.0.1.53", "10.0.1.54"]
    assert options["domain"] == b"acme.example"
    assert options["interface-mtu"] == 1450
    assert options["lease_time"] == 600
    assert options["renewal_time"] == 300 and options["rebinding_time"] == 525
    assert options["broadcast_address"] == "10.0.1.255"
    # RFC 3442, with the default route repeated because option 3 is then ignored.
    assert sorted(options["classless_static_routes"]) == sorted(
        ["192.168.0.0/16:10.0.1.254", "0.0.0.0/0:10.0.1.1"]
    )
    # Option 119 (scapy has no decoder for it): DNS wire labels, RFC 1035 3.1.
    assert got.reply.option(119) == b"\x04acme\x07example\x00"


def test_minimal_subnet_sends_only_what_it_has() -> None:
    lease = make_lease(gateway_ip=None)
    got = answer(request(DHCP_DISCOVER), lease)
    assert got.reply is not None
    options = scapy_options(got.reply)
    assert "router" not in options and "name_server" not in options
    assert "classless_static_routes" not in options and "domain" not in options
    assert options["server_id"] == "10.0.1.1"  # no gateway: the first host address


@pytest.mark.parametrize(
    ("options", "fields", "verdict"),
    [
        # SELECTING: our server id and our address.
        ((addresses_option(OPTION_SERVER_ID, "10.0.1.1"),), {}, DhcpVerdict.ACK),
        # INIT-REBOOT: no server id, a requested address.
        ((), {}, DhcpVerdict.ACK),
        # RENEWING: ciaddr, no requested address.
        (None, {"ciaddr": int(ipaddress.ip_address("10.0.1.20"))}, DhcpVerdict.ACK),
        # Another port's address, by any path: NAK.
        ((addresses_option(OPTION_REQUESTED_IP, "10.0.1.21"),), {}, DhcpVerdict.NAK),
        (None, {"ciaddr": int(ipaddress.ip_address("10.0.1.99"))}, DhcpVerdict.NAK),
        # Another server chosen: keep quiet.
        ((addresses_option(OPTION_SERVER_ID, "10.0.1.9"),), {}, DhcpVerdict.OTHER_SERVER),
    ],
)
def test_requests(options: Any, fields: dict[str, Any], verdict: DhcpVerdict) -> None:
    lease = make_lease()
    if options is None:
        sent = request(DHCP_REQUEST, **fields)
    else:
        has_requested = any(code == OPTION_REQUESTED_IP for code, _ in options)
        extra = () if has_requested else (addresses_option(OPTION_REQUESTED_IP, "10.0.1.20"),)
        sent = request(DHCP_REQUEST, *options, *extra, **fields)
    got = answer(sent, lease)
    assert got.verdict is verdict
    if verdict is DhcpVerdict.ACK:
        assert got.reply is not None and got.reply.message_type == DHCP_ACK
        assert got.reply.yiaddr == int(lease.address)
    elif verdict is DhcpVerdict.NAK:
        assert got.reply is not None and got.reply.message_type == DHCP_NAK
        assert got.reply.yiaddr == 0
        # A NAK leaks nothing of the configuration.
        assert set(scapy_options(got.reply)) <= {"message-type", "server_id", "error_message"}
    else:
        assert got.reply is None


def test_inform_release_decline() -> None:
    lease = make_lease()
    inform = answer(request(DHCP_INFORM, ciaddr=int(lease.address)), lease)
    assert inform.verdict is DhcpVerdict.INFORM and inform.reply is not None
    assert inform.reply.message_type == DHCP_ACK and inform.reply.yiaddr == 0
    assert "lease_time" not in scapy_options(inform.reply)  # RFC 2131 4.3.5
    assert answer(request(DHCP_RELEASE), lease).verdict is DhcpVerdict.RELEASE
    assert answer(request(DHCP_DECLINE), lease).verdict is DhcpVerdict.DECLINE


def test_nothing_for_other_macs_or_unserved_ports() -> None:
    lease = make_lease()
    other = answer(request(DHCP_DISCOVER, client_mac=OTHER_MAC), lease)
    assert (other.verdict, other.reply) == (DhcpVerdict.NOT_ITS_MAC, None)
    assert answer(request(DHCP_DISCOVER), None).verdict is DhcpVerdict.NO_CONFIG
    off = make_subnet(enable_dhcp=False)
    assert lease_for(off, ipaddress.IPv4Address("10.0.1.20"), MAC, 1450) is None
    v6 = Subnet.model_validate({"bridge_id": "b1", "cidr": "2001:db8::/64"})
    assert lease_for(v6, ipaddress.IPv6Address("2001:db8::5"), MAC, 1450) is None
    assert server_address(v6) is None


@pytest.mark.parametrize(
    ("mangle", "verdict"),
    [
        (lambda m: m.replace_options(((OPTION_MESSAGE_TYPE, b"\x01\x01"),)), DhcpVerdict.MALFORMED),
        (
            lambda m: m.replace_options(
                ((OPTION_MESSAGE_TYPE, bytes([DHCP_REQUEST])), (OPTION_REQUESTED_IP, b"\x0a\x00"))
            ),
            DhcpVerdict.MALFORMED,
        ),
        (
            lambda m: m.replace_options(
                ((OPTION_MESSAGE_TYPE, bytes([DHCP_REQUEST])), (OPTION_SERVER_ID, b"\x0a"))
            ),
            DhcpVerdict.MALFORMED,
        ),
        (lambda m: m.replace_options(()), DhcpVerdict.UNSUPPORTED),
        (lambda m: m.replace_options(((OPTION_MESSAGE_TYPE, bytes([DHCP_ACK])),)), None),
    ],
)
def test_bogus_options_are_counted_not_answered(mangle: Any, verdict: DhcpVerdict | None) -> None:
    base = request(DHCP_DISCOVER)
    got = answer(mangle(_Mangler(base)), make_lease())
    assert got.reply is None
    assert got.verdict is (verdict or DhcpVerdict.UNSUPPORTED)


class _Mangler:
    def __init__(self, message: DhcpMessage) -> None:
        self.message = message

    def replace_options(self, options: tuple[tuple[int, bytes], ...]) -> DhcpMessage:
        return dataclasses.replace(self.message, options=options)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01" * 10,
        request(DHCP_DISCOVER).encode()[:239],  # cut inside the fixed header
        request(DHCP_DISCOVER).encode()[:236] + b"\x00\x00\x00\x00",  # bad cookie
        request(DHCP_DISCOVER).encode()[:240] + bytes([OPTION_MESSAGE_TYPE, 40, 1]),  # long len
        request(DHCP_DISCOVER).encode()[:240] + bytes([OPTION_PARAMETER_LIST]),  # no length
    ],
)
def test_truncated_and_lying_payloads_are_malformed(payload: bytes) -> None:
    got = decode_and_answer(payload, make_lease())
    assert (got.verdict, got.reply) == (DhcpVerdict.MALFORMED, None)
    assert got.detail


def test_answers_follow_the_model() -> None:
    """No lease table: a changed address NAKs the old one at the next renewal."""
    lease = make_lease()
    renew = request(DHCP_REQUEST, ciaddr=int(lease.address))
    assert answer(renew, lease).verdict is DhcpVerdict.ACK
    moved = lease_for(lease.subnet, ipaddress.IPv4Address("10.0.1.30"), MAC, 1450)
    assert answer(renew, moved).verdict is DhcpVerdict.NAK
    offer = answer(request(DHCP_DISCOVER), moved).reply
    assert offer is not None and offer.yiaddr == int(ipaddress.ip_address("10.0.1.30"))


def test_budget_allows_a_burst_then_the_rate() -> None:
    budget = DhcpBudget(burst=3, rate=1.0)
    assert [budget.allow("p1", 100.0) for _ in range(4)] == [True, True, True, False]
    assert budget.allow("p2", 100.0)  # per port
    assert not budget.allow("p1", 100.5)
    assert budget.allow("p1", 101.0)
    assert not budget.allow("p1", 101.0)
    budget.forget_idle(200.0)
    assert len(budget) == 0


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_payloads_never_raise(payload: bytes) -> None:
    got = decode_and_answer(payload, make_lease())
    assert got.reply is None or got.verdict in (DhcpVerdict.OFFER, DhcpVerdict.ACK)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=20)), max_size=12),
    st.integers(0, 40),
)
def test_fuzz_mutated_options_never_raise_nor_leak(
    options: list[tuple[int, bytes]], cut: int
) -> None:
    """A real header with arbitrary option bytes (lengths may lie) and a random truncation:
    the responder either answers this port's MAC with this port's address, or drops."""
    header = request(DHCP_DISCOVER).encode()[:240]
    body = b"".join(
        bytes((code, len(data) + (code % 3) - 1 & 0xFF)) + data for code, data in options
    )
    payload = header + body
    payload = payload[: len(payload) - cut] if cut < len(body) else payload
    lease = make_lease()
    got = decode_and_answer(payload, lease)
    if got.reply is not None:
        assert got.reply.chaddr[:6] == MAC.to_bytes(6, "big")
        assert got.reply.yiaddr in (0, int(lease.address))


def _dhcp_topology(**bridge_fields: Any) -> tuple[Topo, Subnet]:
    topo = Topo()
    topo.bridge("b1", **bridge_fields)
    topo.router("r1")
    topo.link("b1", "r1", "10.0.1.1/24")
    subnet = topo.add(make_subnet(id="s1", dns_nameservers=["10.0.1.53"]))
    address = ipaddress.IPv4Address("10.0.1.20")
    topo.vm_port(
        "b1",
        "vm1",
        mac_n=0xA01,
        addresses=("10.0.1.20/24",),
        fixed_ips=(FixedIp(subnet_id="s1", ip_address=address),),
    )
    topo.vm_port("b1", "static", mac_n=0xA02, addresses=("10.0.1.30/24",))
    return topo, subnet


def test_port_dhcp_from_the_view() -> None:
    topo, _subnet = _dhcp_topology()
    view = topo.view()
    served = port_dhcp(view, view.ports["vm1"], underlay_mtu=1500)
    assert served is not None and served.subnet_id == "s1"
    assert served.lease.address == ipaddress.IPv4Address("10.0.1.20")
    assert served.lease.mtu == 1450 and served.lease.mac == MAC
    assert served.server_mac == port_mac(topo, "r1-b1")  # the gateway's router port
    assert port_dhcp(view, view.ports["static"], 1500) is None  # no fixed IP: not served
    assert port_dhcp(view, view.ports["b1-r1"], 1500) is None  # interior port

    topo_mtu, _ = _dhcp_topology(mtu=1400)
    view_mtu = topo_mtu.view()
    with_mtu = port_dhcp(view_mtu, view_mtu.ports["vm1"], 9000)
    assert with_mtu is not None and with_mtu.lease.mtu == 1400

    without_router, _ = _dhcp_topology()
    without_router.objects = [
        o for o in without_router.objects if getattr(o, "id", "") not in ("r1-b1", "b1-r1")
    ]
    view_alone = without_router.view()
    alone = port_dhcp(view_alone, view_alone.ports["vm1"], 1500)
    assert alone is not None and alone.server_mac == DHCP_SERVER_FALLBACK_MAC
