"""The key layout of the Network State DB beyond topology objects (DESIGN.md, "Keys").

- `/hivenet/v1/state/<host>/<kind>/<id>`: per-host state, written on the host's lease so it
  vanishes with the host (liveness, which ports the host has activated).
- `/hivenet/v1/tables/<kind>/<id>/<name>/<key>`: shared tables learned by agents (a bridge's
  MAC table, a router's ARP/ND table), also on the learning host's lease.

Owns only the spelling of keys (build and parse); values are the callers' business.
"""

from __future__ import annotations

STATE_PREFIX = "/hivenet/v1/state/"
TABLES_PREFIX = "/hivenet/v1/tables/"
LB_STATS_KIND = "lb_stats"
HOST_STATS_KIND = "host_stats"
TRACE_REQUEST_KIND = "trace_request"
TRACE_RESULT_KIND = "trace_result"
UPLINK_STATUS_KIND = "uplink_status"


def host_alive_key(host_id: str) -> str:
    return f"{STATE_PREFIX}{host_id}/host/{host_id}"


def port_active_key(host_id: str, port_id: str) -> str:
    return f"{STATE_PREFIX}{host_id}/port/{port_id}"


def lb_stats_key(host_id: str, load_balancer_id: str) -> str:
    """Where a host's agent reports its counters of one load balancer (on its lease)."""
    return f"{STATE_PREFIX}{host_id}/{LB_STATS_KIND}/{load_balancer_id}"


def host_stats_key(host_id: str) -> str:
    """Where a host's agent reports its traffic counters (agent/metrics.py; on its lease)."""
    return f"{STATE_PREFIX}{host_id}/{HOST_STATS_KIND}/{host_id}"


def trace_request_key(host_id: str, trace_id: str) -> str:
    """A trace request for a port of `host_id` (agent/tracing.py), on the API's lease of the
    request's TTL (the one state key not on its host's own lease: it expires by itself)."""
    return f"{STATE_PREFIX}{host_id}/{TRACE_REQUEST_KIND}/{trace_id}"


def trace_result_key(host_id: str, trace_id: str) -> str:
    """The agent's answer to a trace request (on its lease; withdrawn with the request)."""
    return f"{STATE_PREFIX}{host_id}/{TRACE_RESULT_KIND}/{trace_id}"


def uplink_status_key(host_id: str, port_id: str) -> str:
    """A gateway's report of one of its uplink ports: link, BGP sessions (agent/uplinks.py;
    on its lease)."""
    return f"{STATE_PREFIX}{host_id}/{UPLINK_STATUS_KIND}/{port_id}"


def parse_state_key(key: str) -> tuple[str, str, str]:
    """(host_id, kind, id) of a state key; ValueError otherwise."""
    if not key.startswith(STATE_PREFIX):
        raise ValueError(f"not a state key: {key!r}")
    parts = key[len(STATE_PREFIX) :].split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"not a state key: {key!r}")
    return parts[0], parts[1], parts[2]


def mac_entry_key(bridge_id: str, vlan: int, mac: str) -> str:
    return f"{TABLES_PREFIX}bridge/{bridge_id}/mac/{vlan}/{mac}"


def arp_entry_key(router_id: str, ip: str) -> str:
    return f"{TABLES_PREFIX}router/{router_id}/arp/{ip}"


def parse_table_key(key: str) -> tuple[str, str, str, str]:
    """(kind, id, table name, entry key) of a table key; ValueError otherwise.

    The entry key may itself contain '/' (a MAC entry is '<vlan>/<mac>')."""
    if not key.startswith(TABLES_PREFIX):
        raise ValueError(f"not a table key: {key!r}")
    parts = key[len(TABLES_PREFIX) :].split("/", 3)
    if len(parts) != 4 or not all(parts):
        raise ValueError(f"not a table key: {key!r}")
    return parts[0], parts[1], parts[2], parts[3]
