"""A gateway's uplink reports (agent/uplinks.py) and how BIRD's session summary is read
(agent/bgp.py `parse_session_status`): what is published, and that it is published only when
it changed."""

from __future__ import annotations

import ipaddress

from hivenet.agent.bgp import SessionStatus, parse_session_status
from hivenet.agent.uplinks import UplinkStatusReporter, uplink_reports
from hivenet.model import BgpPeer, Bridge, DeviceKind, Port, Router
from hivenet.model.bgp import UplinkReport
from hivenet.sim import TopologyView
from hivenet.store.keys import uplink_status_key

# `birdc show protocols all hn_peer` of BIRD 2.0.12, before and after the session came up
# (trimmed of the capability lines, which the parser does not read).
BIRD_ACTIVE = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
hn_peer    BGP        ---        start  03:05:55.770  Active
  BGP state:          Active
    Neighbor address: 127.0.0.2
    Neighbor AS:      65000
    Local AS:         65001
    Connect delay:    4.601/5
  Channel ipv4
    State:          DOWN
    Table:          master4
    Preference:     100
    Input filter:   ACCEPT
    Output filter:  (unnamed)
    IGP IPv4 table: master4
"""
BIRD_ESTABLISHED = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
hn_peer    BGP        ---        up     03:05:59.708  Established
  BGP state:          Established
    Neighbor address: 127.0.0.2
    Neighbor AS:      65000
    Local AS:         65001
    Neighbor ID:      10.0.0.2
    Session:          external multihop AS4
    Source address:   127.0.0.1
    Hold timer:       212.140/240
    Keepalive timer:  63.649/80
  Channel ipv4
    State:          UP
    Table:          master4
    Preference:     100
    Input filter:   ACCEPT
    Output filter:  (unnamed)
    Routes:         1 imported, 2 exported, 1 preferred
    Route change stats:     received   rejected   filtered    ignored   accepted
      Import updates:              1          0          0          0          1
      Import withdraws:            0          0        ---          0          0
      Export updates:              2          0          0        ---          2
      Export withdraws:            0        ---        ---        ---          0
    BGP Next hop:   127.0.0.1
"""


def test_session_status_reads_state_and_prefix_counts() -> None:
    assert parse_session_status(BIRD_ACTIVE) == SessionStatus("Active", 0, 0)
    assert parse_session_status(BIRD_ESTABLISHED) == SessionStatus("Established", 1, 2)
    kept = BIRD_ESTABLISHED.replace("1 imported, 2 exported", "3 imported, 1 filtered, 4 exported")
    assert parse_session_status(kept) == SessionStatus("Established", 3, 4)
    # Only the summary line (no `all`): its Info column.
    summary = "\n".join(BIRD_ESTABLISHED.splitlines()[:3])
    assert parse_session_status(summary) == SessionStatus("Established", 0, 0)
    assert parse_session_status("BIRD 2.0.12 ready.\n").state == "unknown"


def topology() -> TopologyView:
    view = TopologyView()
    view.apply_all(
        [
            Router(id="r1", tenant_id="admin"),
            Bridge(id="net", tenant_id="admin"),
            Port(
                id="up1",
                tenant_id="admin",
                device_kind=DeviceKind.ROUTER,
                device_id="r1",
                addresses=(ipaddress.IPv4Interface("192.0.2.1/25"),),
                host_id="gw1",
                interface_name="eth1",
                tunnel_key=11,
            ),
            Port(
                id="up2",
                tenant_id="admin",
                device_kind=DeviceKind.ROUTER,
                device_id="r1",
                addresses=(ipaddress.IPv4Interface("192.0.2.129/25"),),
                host_id="gw1",
                interface_name="eth2",
                tunnel_key=12,
            ),
            Port(
                id="vm",
                tenant_id="admin",
                device_kind=DeviceKind.BRIDGE,
                device_id="net",
                host_id="gw1",
                interface_name="tap0",
                tunnel_key=13,
            ),
            BgpPeer(id="p1", port_id="up1", local_as=65001, peer_as=65000, peer_ip="192.0.2.2"),
            BgpPeer(id="p2", port_id="up2", local_as=65001, peer_as=65000, peer_ip="192.0.2.130"),
        ]
    )
    return view


BOUND = {"up1": (11, "eth1"), "up2": (12, "eth2"), "vm": (13, "tap0")}


def test_reports_cover_bound_router_ports_with_their_sessions() -> None:
    links = {"eth1": True, "eth2": False}
    reports = uplink_reports(
        topology(), BOUND, {"p1": SessionStatus("Established", 1, 2)}, links.get
    )
    assert set(reports) == {"up1", "up2"}  # not the bridge port
    assert reports["up1"].link_up is True and reports["up2"].link_up is False
    assert reports["up1"].bgp["p1"].state == "Established"
    assert (reports["up1"].bgp["p1"].received, reports["up1"].bgp["p1"].advertised) == (1, 2)
    assert reports["up2"].bgp == {}  # no session read yet: nothing claimed
    assert reports["up1"].interface == "eth1"


def test_reporter_publishes_on_change_and_withdraws_unbound_ports() -> None:
    view = topology()
    bound = dict(BOUND)
    sessions = {"p1": SessionStatus("Active")}
    links: dict[str, bool | None] = {"eth1": True, "eth2": None}
    published: dict[str, bytes] = {}
    writes: list[str] = []

    def publish(key: str, value: bytes) -> None:
        published[key] = value
        writes.append(key)

    reporter = UplinkStatusReporter(
        "gw1",
        view,
        bound=lambda: bound,
        sessions=lambda: sessions,
        link_state=links.get,
        publish=publish,
        unpublish=lambda key: published.pop(key),
    )
    reporter.report()
    key1, key2 = uplink_status_key("gw1", "up1"), uplink_status_key("gw1", "up2")
    assert set(published) == {key1, key2}
    first = UplinkReport.model_validate_json(published[key1])
    assert first.bgp["p1"].state == "Active" and first.link_up is True
    assert UplinkReport.model_validate_json(published[key2]).link_up is None
    for _ in range(5):  # nothing changed: nothing written
        reporter.report()
    assert len(writes) == 2
    sessions["p1"] = SessionStatus("Established", 1, 3)
    links["eth1"] = False
    reporter.report()
    assert writes[2:] == [key1]
    changed = UplinkReport.model_validate_json(published[key1])
    assert changed.link_up is False and changed.bgp["p1"].state == "Established"
    del bound["up2"]
    reporter.report()
    assert set(published) == {key1}
