"""The authenticated underlay with real agents over the memory datapath (harness.py): each
agent accepts tunnel packets only from the live members of its tunnel zone; flow state is
sealed with the cluster key, and forged, replayed or foreign-sourced messages are counted and
never applied; a key rotation keeps NAT working."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

from hivenet.agent.underlay import FLOWSTATE_KEYRING_KEY, rotate_keyring_if_due
from hivenet.flowstate import ConntrackRecord, FlowKey, NatBinding, NatKind, NatRecord, encode
from hivenet.flowstate.auth import MAX_MESSAGE_AGE, next_sequence, seal
from hivenet.flowstate.conntrack import ConnState
from hivenet.model.types import FLOWSTATE_TUNNEL_KEY
from tests.integration.common import eventually
from tests.integration.stateful.harness import (
    HOSTS,
    LEASE_TTL,
    OUT_A_IP,
    SNAT_IP,
    SYN,
    VM_IPS,
    StatefulCloud,
    build_provider,
    run,
    stateful_cloud,
)

ROGUE_IP = "192.0.2.66"  # on the underlay, in no tunnel zone


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def forged_state(now: float) -> bytes:
    """A NAT binding and a conntrack entry for a connection nobody opened."""
    original = FlowKey(4, ip(VM_IPS["vm1"]), ip(OUT_A_IP), 6, 31337, 80)
    translated = FlowKey(4, ip(SNAT_IP), ip(OUT_A_IP), 6, 60001, 80)
    binding = NatBinding("rogue-zone", NatKind.SNAT, original, translated)
    conntrack = ConntrackRecord("rogue-zone", original, ConnState.ESTABLISHED, now + 600)
    return encode([conntrack], [NatRecord(binding, now + 600)], now=now)


def table_sizes(c: StatefulCloud, host: str) -> tuple[int, int]:
    sync = c.agents[host].flowstate
    return len(sync.conntrack), len(sync.nat)


def test_tunnel_peers_are_the_live_members_of_the_zone(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await build_provider(c)
            await c.start_all()
            for host, agent in c.agents.items():
                assert agent.tunnel_peers == {a for h, a in HOSTS.items() if h != host}
            await c.kill_agent("h4")
            await c.tick(LEASE_TTL * 2)  # h4's lease (and liveness) expires
            await eventually(lambda: HOSTS["h4"] not in (c.agents["h1"].tunnel_peers or ()))
            assert c.agents["h1"].tunnel_peers == {HOSTS["h2"], HOSTS["h3"]}

    run(scenario())


def test_forged_replayed_and_foreign_flow_state_is_never_applied(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await build_provider(c)
            await c.start_all()
            sent: list[tuple[str, bytes]] = []
            h1 = c.datapaths["h1"]
            original_send = h1.send_flow_state

            def recording_send(remote_ip: str, payload: bytes) -> None:
                sent.append((remote_ip, payload))
                original_send(remote_ip, payload)

            h1.send_flow_state = recording_send  # type: ignore[method-assign]
            c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 40000, 80, SYN))
            assert len(c.received("out-a")) == 1  # legitimate state reached h3 and applied
            h3_agent = c.agents["h3"]
            h3 = h3_agent.flowstate.counters
            assert h3.received_messages >= 1 and h3.rejected_unauthenticated == 0
            before = table_sizes(c, "h3")
            to_h3 = [payload for remote, payload in sent if remote == HOSTS["h3"]]
            assert to_h3
            receive = c.datapaths["h3"].receive_tunnel
            now = c.clock.now

            # From a peer's address: an unsealed message, one sealed with a guessed key.
            receive(FLOWSTATE_TUNNEL_KEY, forged_state(now), source_ip=HOSTS["h1"])
            guessed = seal(forged_state(now), key_id=0, key=bytes(32), sender="h1", sequence=1)
            receive(FLOWSTATE_TUNNEL_KEY, guessed, source_ip=HOSTS["h1"])
            assert h3.rejected_unauthenticated == 2
            # A genuine message captured on the wire, played again.
            receive(FLOWSTATE_TUNNEL_KEY, to_h3[0], source_ip=HOSTS["h1"])
            assert h3.rejected_replayed == 1
            # Sealed with the real key (a key holder's, or one captured long ago), but older
            # than the maximum age: refused even from a sender h3 never heard of.
            keyring = h3_agent.flowstate.keyring
            assert keyring is not None
            stale = seal(
                forged_state(now),
                key_id=keyring.current.key_id,
                key=keyring.current.secret,
                sender="h9",
                sequence=next_sequence(0, time.time() - 2 * MAX_MESSAGE_AGE),
            )
            receive(FLOWSTATE_TUNNEL_KEY, stale, source_ip=HOSTS["h1"])
            assert h3.rejected_replayed == 2
            # Genuine bytes, but from an address that is no tunnel peer: the datapath drops it.
            drops_before = c.datapaths["h3"].counters().get("drop.tunnel_unknown_source", 0)
            receive(FLOWSTATE_TUNNEL_KEY, to_h3[0], source_ip=ROGUE_IP)
            receive(c.ports["out-a"].tunnel_key, b"\x00" * 60, source_ip=ROGUE_IP)
            assert c.datapaths["h3"].counters()["drop.tunnel_unknown_source"] == drops_before + 2
            assert c.received_frames("out-a") == []
            assert table_sizes(c, "h3") == before
            snapshot = h3_agent.counters_snapshot()["flowstate"]
            assert isinstance(snapshot, dict) and snapshot["rejected_replayed"] == 2

    run(scenario())


def test_nat_keeps_working_across_a_key_rotation(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stateful_cloud("memory://", tmp_path / "state") as c:
            await build_provider(c)
            await c.start_all()
            c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 40000, 80, SYN))
            assert len(c.received("out-a")) == 1
            stored = await c.store.get(FLOWSTATE_KEYRING_KEY)
            assert stored is not None  # the first agent created it
            assert await rotate_keyring_if_due(c.store, time.time() + 10**6, 1.0)
            assert not await rotate_keyring_if_due(c.store, time.time(), 3600.0)  # not due
            await eventually(
                lambda: all(
                    a.flowstate.keyring is not None and a.flowstate.keyring.current.key_id == 1
                    for a in c.agents.values()
                )
            )
            received = c.agents["h3"].flowstate.counters.received_messages
            c.send("vm1", c.vm_tcp("vm1", OUT_A_IP, 40001, 80, SYN))
            assert len(c.received("out-a")) == 1
            h3 = c.agents["h3"].flowstate.counters
            assert h3.received_messages > received and h3.rejected_unauthenticated == 0

    run(scenario())
