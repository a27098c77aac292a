"""The outside router of a lab with BGP: the BIRD 2 configuration `hn-ext` runs (pure).

hn-ext peers with every uplink port of the external router (each a directly connected eBGP
neighbour on its own segment), announces a default route (itself: the rest of the world) and
installs what it learns into its kernel, several equal paths merged into one ECMP route, so
the floating range is reached through every live gateway. Every static route of its own is
exported: a static protocol added later (`hivenet.lab.edge.announce`, then `birdc configure`)
announces more prefixes without restarting a session. Hold time from the scenario (3 s:
a dead gateway's routes go within seconds). Must not touch the kernel or processes:
`hivenet.lab.lab` writes the file and starts BIRD with it.
"""

from __future__ import annotations

from hivenet.lab.plan import ExternalPlan
from hivenet.lab.scenario import BgpSpec

OUTSIDE_BIRD_LABEL = "bird"
OUTSIDE_BIRD_CONFIG = "hn-ext-bird.conf"
OUTSIDE_BIRD_SOCKET = "hn-ext-bird.ctl"


def session_name(number: int) -> str:
    """BIRD's protocol name of the session with uplink `number` (1-based): gw1, gw2, ..."""
    return f"gw{number}"


def outside_bird_config(external: ExternalPlan, bgp: BgpSpec) -> str:
    keepalive = max(1, bgp.hold_time // 3)
    sessions = "".join(
        f"protocol bgp {session_name(number)} {{\n"
        f"  local {uplink.address} as {bgp.peer_as};\n"
        f"  neighbor {uplink.router_address} as {bgp.local_as};\n"
        f"  hold time {bgp.hold_time};\n"
        f"  keepalive time {keepalive};\n"
        "  connect retry time 2;\n"
        "  error wait time 1, 10;\n"
        "  ipv4 { import all; export where source = RTS_STATIC; };\n"
        "}\n"
        for number, uplink in enumerate(external.all_uplinks(), start=1)
    )
    first = external.all_uplinks()[0]
    return (
        "# The lab's outside router (hivenet.lab.outside).\n"
        "log stderr all;\n"
        f"router id {first.address};\n"
        "protocol device { scan time 10; }\n"
        "protocol static hn_default { ipv4; route 0.0.0.0/0 blackhole; }\n"
        "protocol kernel {\n"
        "  ipv4 { export where source = RTS_BGP; };\n"
        "  merge paths on;\n"
        "}\n" + sessions
    )
