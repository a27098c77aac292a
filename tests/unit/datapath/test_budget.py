"""The per-port upcall token bucket (`hivenet.flows.budget.UpcallBudget`), on a clock the
test moves by hand."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivenet.flows.budget import UpcallBudget


def spend(budget: UpcallBudget, count: int, now: float) -> int:
    return sum(budget.allow(now) for _ in range(count))


def test_a_full_bucket_allows_the_burst_then_refuses_and_counts() -> None:
    budget = UpcallBudget(rate=10, burst=5, now=0.0)
    assert spend(budget, 8, 0.0) == 5
    assert budget.dropped == 3


def test_tokens_come_back_at_the_rate_and_never_beyond_the_burst() -> None:
    budget = UpcallBudget(rate=10, burst=5, now=0.0)
    spend(budget, 5, 0.0)
    assert spend(budget, 10, 0.2) == 2  # 0.2 s at 10/s
    assert spend(budget, 100, 60.0) == 5  # a long pause refills the burst only


def test_a_clock_that_steps_back_gives_nothing() -> None:
    budget = UpcallBudget(rate=10, burst=1, now=5.0)
    assert budget.allow(5.0)
    assert not budget.allow(4.0)
    assert not budget.allow(5.05)  # half a token since t=5 (the step back did not reset it)
    assert budget.allow(5.2)


@pytest.mark.parametrize(
    ("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (1, 1.5), (1, True), (float("nan"), 1)]
)
def test_nonsense_settings_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        UpcallBudget(rate=rate, burst=burst, now=0.0)


@given(
    rate=st.integers(1, 5000),
    burst=st.integers(1, 5000),
    steps=st.lists(st.tuples(st.floats(0, 2), st.integers(0, 3000)), max_size=30),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    rate: int, burst: int, steps: list[tuple[float, int]]
) -> None:
    """Over any run of requests, what is allowed stays within what the bucket can give, and
    every request is either allowed or counted as dropped."""
    budget = UpcallBudget(rate=rate, burst=burst, now=0.0)
    now = 0.0
    allowed = requested = 0
    for pause, count in steps:
        now += pause
        allowed += spend(budget, count, now)
        requested += count
        assert allowed <= burst + rate * now + 1e-6
    assert allowed + budget.dropped == requested
