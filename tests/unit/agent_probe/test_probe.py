"""The gateway probe state machine (detect multiplier, recovery hysteresis, no flap on a
single lost probe) and the probe message codec."""

from __future__ import annotations

import pytest

from hivenet.agent.probe import (
    REPLY,
    REQUEST,
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
