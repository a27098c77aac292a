"""A gateway host's report of its uplinks, for `GET /v1/routers/{id}/uplinks` (api/uplinks.py).

Owns `UplinkStatusReporter`: for each router port bound on this host (an uplink), the
interface's operational state (read as the gateway probe reads it, raw: no hysteresis) and
each of its BGP sessions as this host's BIRD last told (`BgpSpeakers.sessions`: state,
prefixes received and advertised), published as a `model.bgp.UplinkReport` under
`/hivenet/v1/state/<host>/uplink_status/<port>` on the host's lease. Checked once per second;
written only when a report changed (never per probe tick), and again with everything else
the agent publishes when its lease is replaced; withdrawn when the port is no longer bound
here. A report vanishes with its host's lease, so a dead host's reports are gone once its
lease expires. Must not decide liveness or routes (agent/probe.py, agent/bgp.py do).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from hivenet.agent.bgp import SessionStatus
from hivenet.clock import SYSTEM_CLOCK, Clock
from hivenet.model import BgpPeer, DeviceKind
from hivenet.model.bgp import BgpSessionReport, UplinkReport
from hivenet.sim.topology import TopologyView
from hivenet.store.keys import uplink_status_key

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0


def uplink_reports(
    topology: TopologyView,
    bound: Mapping[str, tuple[int, str]],
    sessions: Mapping[str, SessionStatus],
    link_state: Callable[[str], bool | None],
) -> dict[str, UplinkReport]:
    """port id -> report, for every router port in `bound` (port id -> (key, interface))."""
    peers_of: dict[str, list[str]] = {}
    for peer in topology.all("bgp_peer"):
        if isinstance(peer, BgpPeer) and peer.id in sessions:
            peers_of.setdefault(peer.port_id, []).append(peer.id)
    reports: dict[str, UplinkReport] = {}
    for port_id, (_key, interface) in bound.items():
        info = topology.ports.get(port_id)
        if info is None or info.port.device_kind is not DeviceKind.ROUTER:
            continue
        bgp = {
            peer_id: BgpSessionReport(
                state=(sessions[peer_id].state or "unknown")[:32],
                received=sessions[peer_id].received,
                advertised=sessions[peer_id].advertised,
            )
            for peer_id in sorted(peers_of.get(port_id, ()))
        }
        reports[port_id] = UplinkReport(interface=interface, link_up=link_state(interface), bgp=bgp)
    return reports


class UplinkStatusReporter:
    """`await run()`: publish this host's uplink reports when they change."""

    def __init__(
        self,
        host_id: str,
        topology: TopologyView,
        *,
        bound: Callable[[], Mapping[str, tuple[int, str]]],
        sessions: Callable[[], Mapping[str, SessionStatus]],
        link_state: Callable[[str], bool | None],
        publish: Callable[[str, bytes], None],
        unpublish: Callable[[str], None],
        clock: Clock = SYSTEM_CLOCK,
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.host_id = host_id
        self.topology = topology
        self.bound = bound
        self.sessions = sessions
        self.link_state = link_state
        self.publish = publish
        self.unpublish = unpublish
        self.clock = clock
        self.interval = interval
        self.published: dict[str, UplinkReport] = {}  # port id -> last report handed over
        self.writes = 0

    def report(self) -> None:
        """Hand over the reports that changed; withdraw those of ports no longer bound here."""
        reports = uplink_reports(self.topology, self.bound(), self.sessions(), self.link_state)
        for port_id in self.published.keys() - reports.keys():
            del self.published[port_id]
            self.unpublish(uplink_status_key(self.host_id, port_id))
        for port_id, report in reports.items():
            if self.published.get(port_id) == report:
                continue
            self.published[port_id] = report
            self.publish(
                uplink_status_key(self.host_id, port_id), report.model_dump_json().encode()
            )
            self.writes += 1

    async def run(self) -> None:
        while True:
            try:
                self.report()
            except (OSError, ValueError) as exc:  # a bad read must not end the reports
                log.warning("host %s: uplink report failed: %s", self.host_id, exc)
            await self.clock.sleep(self.interval)
