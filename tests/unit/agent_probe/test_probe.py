"""The gateway probe state machine (detect multiplier, recovery hysteresis, no flap on a
single lost probe) and the probe message codec."""

from __future__ import annotations

import asyncio

import pytest

from hivenet.agent.probe import (
    REPLY,
    REQUEST,
    GatewayProber,
    LinkWatcher,
    ProbeMessage,
    ProbeSession,
    decode_probe,
    encode_probe,
)


def run(session: ProbeSession, answers: str) -> list[bool | None]:
    """One tick per character; 'y': the request sent at that tick is answered, 'n': lost."""
    changes = []
    for answer in answers:
        changes.append(session.tick())
        if answer == "y":
            session.answered(session.sequence)
    return changes


def test_down_after_multiplier_missed_intervals_not_before() -> None:
    session = ProbeSession(multiplier=3, recover=3)
    run(session, "yyyy")
    assert session.up
    changes = run(session, "nnn")
    assert changes == [None, None, None] and session.up  # third miss is counted next tick
    assert session.tick() is False and not session.up


def test_single_lost_probes_never_flap() -> None:
    session = ProbeSession(multiplier=3, recover=3)
    changes = run(session, "y" + "ynyynyny" * 20)
    assert all(change is None for change in changes) and session.up


def test_recovery_needs_consecutive_answers() -> None:
    session = ProbeSession(multiplier=3, recover=3)
    run(session, "yn" + "nnn")
    assert not session.up
    changes = run(session, "yynyy")  # a miss resets the count
    assert all(change is None for change in changes) and not session.up
    assert run(session, "yy") == [None, True] and session.up


def test_late_answers_to_old_requests_do_not_count() -> None:
    session = ProbeSession(multiplier=2, recover=1)
    session.tick()
    old = session.sequence
    for _ in range(4):  # the previous request may still be answered, an older one not
        session.tick()
        session.answered(old)
    assert not session.up


def test_bad_parameters_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="multiplier"):
        ProbeSession(multiplier=0)
    with pytest.raises(ValueError, match="recover"):
        ProbeSession(recover=0)


def test_probe_messages_round_trip_and_bad_bytes_are_refused() -> None:
    reply = ProbeMessage(REPLY, 7, ("up-g1", "up-ü"))
    assert decode_probe(encode_probe(reply)) == reply
    request = ProbeMessage(REQUEST, 0xFFFFFFFF)
    assert decode_probe(encode_probe(request)) == request
    data = encode_probe(reply)
    for bad in (data[:-1], data + b"x", b"HNFS" + data[4:], data[:8]):
        with pytest.raises(ValueError, match="probe"):
            decode_probe(bad)
    with pytest.raises(ValueError, match="type"):
        encode_probe(ProbeMessage(9, 1))


def test_prober_answers_with_down_ports_and_reports_only_the_senders_own_ports() -> None:
    sent: list[tuple[str, ProbeMessage]] = []
    host_changes: list[str] = []
    port_changes: list[tuple[str, bool]] = []
    gateways = [("g1", "up-g1"), ("g2", "up-g2"), ("me", "up-me")]
    prober = GatewayProber(
        "me",
        lambda: gateways,
        lambda host, raw: sent.append((host, decode_probe(raw))),
        host_changes.append,
        lambda port, alive: port_changes.append((port, alive)),
        local_down_ports=lambda: {"up-me"},
        multiplier=2,
        recover=2,
    )
    prober.tick()
    assert sorted(host for host, _ in sent) == ["g1", "g2"]  # never itself
    # Answering a request: this host's down uplinks go in the reply.
    sent.clear()
    prober.receive("g1", encode_probe(ProbeMessage(REQUEST, 5)))
    assert sent == [("g1", ProbeMessage(REPLY, 5, ("up-me",)))]
    # g1 claims its own port and g2's: only its own is believed.
    sequence = prober.sessions["g1"].sequence
    prober.receive("g1", encode_probe(ProbeMessage(REPLY, sequence, ("up-g1", "up-g2"))))
    assert port_changes == [("up-g1", False)]
    prober.receive("g1", encode_probe(ProbeMessage(REPLY, sequence, ())))
    assert port_changes[-1] == ("up-g1", True)
    # g2 never answers: down after `multiplier` intervals; g1 answers and stays up.
    for _ in range(3):
        prober.tick()
        prober.receive("g1", encode_probe(ProbeMessage(REPLY, prober.sessions["g1"].sequence)))
    assert prober.is_down("g2") and not prober.is_down("g1")
    assert host_changes == ["g2"]
    # What the agent's counters file shows of it (the lab's failover tests read this).
    snapshot = prober.snapshot()
    assert snapshot["hosts"] == {"g1": "up", "g2": "down"} and snapshot["down_ports"] == []
    assert snapshot["host_changes"] == 1 and snapshot["port_changes"] == 2
    assert snapshot["sent"] == 8 and snapshot["answers"] == 5, snapshot
    # g2 is no longer a gateway: its session goes, and it is reported (lease-only again).
    gateways.remove(("g2", "up-g2"))
    prober.tick()
    assert "g2" not in prober.sessions and not prober.is_down("g2")
    assert host_changes == ["g2", "g2"]


def test_link_watcher_down_at_once_up_after_recover_polls_and_unseen_is_not_judged() -> None:
    links: dict[str, bool | None] = {"hnup1": True}
    watcher = LinkWatcher(links.get, recover=2)
    ports = {"up1": "hnup1", "fake": "hnfake"}  # hnfake: never seen in this namespace
    assert watcher.poll(ports) == {}
    links["hnup1"] = False
    assert watcher.poll(ports) == {"up1": False}
    links["hnup1"] = True
    assert watcher.poll(ports) == {}  # one good poll is not enough
    links["hnup1"] = False
    assert watcher.poll(ports) == {}  # still down, count restarts
    links["hnup1"] = True
    assert watcher.poll(ports) == {} and watcher.poll(ports) == {"up1": True}
    del links["hnup1"]  # a seen interface vanished: down
    assert watcher.poll(ports) == {"up1": False}
    assert watcher.poll({}) == {"up1": True}  # unbound: no longer judged


def test_prober_runs_no_timer_without_gateways_or_uplinks_and_wakes_on_a_change() -> None:
    """Most hosts have nothing to probe: `run` then waits for `wake()` instead of ticking
    every interval (1000 agents' 0.1 s ticks were most of a shared loop's work)."""
    gateways: list[tuple[str, str]] = []
    uplinks = [False]
    sent: list[str] = []
    sleeps: list[float] = []
    prober = GatewayProber(
        "me", lambda: gateways, lambda host, raw: sent.append(host), print, print, interval=0.1
    )

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    async def scenario() -> None:
        task = asyncio.create_task(prober.run(sleep, lambda: uplinks[0]))
        for _ in range(20):
            await asyncio.sleep(0)
        assert sleeps == [] and sent == []  # idle: waiting, no timer
        gateways.append(("g1", "up-g1"))
        prober.wake()
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(sleeps) >= 5 and sent.count("g1") == len(sleeps)  # ticking every interval
        gateways.clear()
        uplinks[0] = True  # an uplink of its own to poll keeps it ticking
        for _ in range(5):
            await asyncio.sleep(0)
        ticking = len(sleeps)
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(sleeps) > ticking
        uplinks[0] = False
        for _ in range(5):
            await asyncio.sleep(0)
        idle = len(sleeps)
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(sleeps) == idle and not prober.sessions
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
