"""Who may talk to this host over the underlay, and the cluster key flow state is sealed with.

Owns: `tunnel_peer_addresses` (pure: the underlay addresses of the live members of the
tunnel zones this host is in, what the datapath's `set_tunnel_peers` gets), the store key of
the flow-state keyring and its life cycle in the store: `ensure_keyring` (created once, by
whichever agent comes first, with a create-if-absent transaction) and `rotate_keyring_if_due`
(on a schedule: the first agent to find the current key older than the rotation period
writes a new one with a compare-and-swap on the key's revision, so one rotation happens
however many agents try; receivers accept the current and the previous key), and
`rotate_keyring_now` (an operator's `hivenet agent rotate-key`).
Does not own the HMAC envelope (flowstate/auth.py) or the datapath.
"""

from __future__ import annotations

import secrets
from collections.abc import Container, Iterable

from hivenet.flowstate.auth import KEY_BYTES, Keyring
from hivenet.model import TunnelZone
from hivenet.store.base import Compare, Put, Store

FLOWSTATE_KEYRING_KEY = "/hivenet/v1/cluster/flowstate_keyring"
CLUSTER_PREFIX = "/hivenet/v1/cluster/"
DEFAULT_KEY_ROTATION = 24 * 3600.0  # seconds between flow-state key rotations


def tunnel_peer_addresses(
    zones: Iterable[TunnelZone], host_id: str, live_hosts: Container[str]
) -> frozenset[str]:
    """Underlay addresses of the other live members of every tunnel zone `host_id` is in."""
    peers: set[str] = set()
    for zone in zones:
        if not any(member.host_id == host_id for member in zone.members):
            continue
        for member in zone.members:
            if member.host_id != host_id and member.host_id in live_hosts:
                peers.add(str(member.underlay_ip))
    return frozenset(peers)


async def ensure_keyring(store: Store, now: float) -> Keyring:
    """The cluster's flow-state keyring, created (32 random bytes) if there is none yet."""
    fresh = Keyring.new(secrets.token_bytes(KEY_BYTES), now)
    await store.txn(
        [Compare(FLOWSTATE_KEYRING_KEY, "create_revision", "==", 0)],
        [Put(FLOWSTATE_KEYRING_KEY, fresh.to_json())],
    )
    stored = await store.get(FLOWSTATE_KEYRING_KEY)
    if stored is None:  # deleted between the two calls: an operator's doing
        raise LookupError(f"{FLOWSTATE_KEYRING_KEY} vanished right after it was created")
    return Keyring.from_json(stored.value)


async def rotate_keyring_if_due(store: Store, now: float, max_age: float) -> bool:
    """Write a new current key when the current one is older than `max_age` seconds (wall
    clock). True when this call rotated it; False when not due or another agent was faster."""
    stored = await store.get(FLOWSTATE_KEYRING_KEY)
    if stored is None:
        return False
    keyring = Keyring.from_json(stored.value)
    if now - keyring.current.created < max_age:
        return False
    rotated = keyring.rotated(secrets.token_bytes(KEY_BYTES), now)
    result = await store.txn(
        [Compare(FLOWSTATE_KEYRING_KEY, "mod_revision", "==", stored.mod_revision)],
        [Put(FLOWSTATE_KEYRING_KEY, rotated.to_json())],
    )
    return result.succeeded


async def rotate_keyring_now(store: Store, now: float, attempts: int = 5) -> Keyring:
    """Rotate the flow-state key now, whatever its age (an operator who suspects a leak runs
    it twice: the second rotation drops the suspect key from the receivers' keyring too).
    LookupError when there is no keyring yet (no agent has started); the keyring written."""
    for _ in range(attempts):
        stored = await store.get(FLOWSTATE_KEYRING_KEY)
        if stored is None:
            raise LookupError(
                f"no flow-state keyring at {FLOWSTATE_KEYRING_KEY}: no agent has started yet"
            )
        rotated = Keyring.from_json(stored.value).rotated(secrets.token_bytes(KEY_BYTES), now)
        result = await store.txn(
            [Compare(FLOWSTATE_KEYRING_KEY, "mod_revision", "==", stored.mod_revision)],
            [Put(FLOWSTATE_KEYRING_KEY, rotated.to_json())],
        )
        if result.succeeded:
            return rotated
    raise RuntimeError(f"the flow-state keyring kept changing under {attempts} rotation attempts")
