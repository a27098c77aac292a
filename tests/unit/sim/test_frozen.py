"""Unit tests for `hivenet.sim.frozen`: a builder makes what the constructor makes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivenet.sim.flowstate_hook import ConntrackDecision, NatDecision
from hivenet.sim.frozen import frozen_builder

texts = st.text(max_size=8)
tag_sets = st.frozensets(texts, max_size=3)
rewrite_maps = st.dictionaries(st.sampled_from(["ip_src", "tp_src"]), st.integers(0, 9))


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "rewrites": rewrite_maps,
            "tags": tag_sets,
            "cacheable": st.booleans(),
            "applied": st.booleans(),
            "inner_rewrites": rewrite_maps,
            "description": texts,
        },
    ),
    st.fixed_dictionaries(
        {"is_return": st.booleans()},
        optional={
            "verdict": texts,
            "tags": tag_sets,
            "cacheable": st.booleans(),
            "reads_tcp_flags": st.booleans(),
        },
    ),
)
def test_decisions_built_equal_the_constructed(
    nat: dict[str, object], conntrack: dict[str, object]
) -> None:
    """Any subset of the fields given, the rest defaulted as the constructor defaults them."""
    for cls, values in ((NatDecision, nat), (ConntrackDecision, conntrack)):
        built = frozen_builder(cls)(**values)
        assert type(built) is cls
        assert built == cls(**values)
        with pytest.raises(dataclasses.FrozenInstanceError):
            built.tags = frozenset()  # type: ignore[misc]


def test_default_factory_fields_are_fresh_per_instance() -> None:
    build = frozen_builder(NatDecision)
    first, second = build(), build()
    assert first.rewrites == {} and first.rewrites is not second.rewrites
    assert first.inner_rewrites is not second.inner_rewrites


def test_missing_required_field_and_unknown_field_are_type_errors() -> None:
    build = frozen_builder(ConntrackDecision)
    with pytest.raises(TypeError):
        build()
    with pytest.raises(TypeError):
        build(is_return=True, colour="red")


def test_classes_with_checks_or_without_slots_get_their_constructor() -> None:
    @dataclass(frozen=True, slots=True)
    class Checked:
        value: int

        def __post_init__(self) -> None:
            if self.value < 0:
                raise ValueError("negative")

    @dataclass(frozen=True)
    class Unslotted:
        value: int = 0
        items: list[int] = field(default_factory=list)

    assert frozen_builder(Checked) is Checked
    assert frozen_builder(Unslotted) is Unslotted
