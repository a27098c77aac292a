"""lab/edge.py: a BGP session read twice from BIRD is the same session when its state held,
though BIRD's printed `since` may move by a millisecond between reads."""

from __future__ import annotations

from hivenet.lab.edge import Session


def test_a_millisecond_of_since_is_the_same_session() -> None:
    first = Session("up", "05:28:29.493", "Established")
    assert Session("up", "05:28:29.494", "Established").held_since(first)
    assert Session("up", "2026-12-06 05:28:29.494", "Established").held_since(first)


def test_a_session_re_established_later_or_in_another_state_did_not_hold() -> None:
    first = Session("up", "05:28:29.493", "Established")
    assert not Session("up", "05:28:31.020", "Established").held_since(first)
    assert not Session("start", "05:28:29.493", "Active").held_since(first)


def test_midnight_between_two_reads() -> None:
    assert Session("up", "00:00:00.100", "Established").held_since(
        Session("up", "23:59:59.900", "Established")
    )
