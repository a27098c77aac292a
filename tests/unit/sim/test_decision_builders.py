"""`slot_builder(cls, "keywords")` makes what the constructor makes, for the flow-state
hook's decisions (the generator's other cases: tests/unit/packets/test_slots.py)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivenet.packets.slots import slot_builder
from hivenet.sim.flowstate_hook import ConntrackDecision, NatDecision

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
        built = slot_builder(cls, "keywords")(**values)
        assert type(built) is cls
        assert built == cls(**values)
        with pytest.raises(dataclasses.FrozenInstanceError):
            built.tags = frozenset()  # type: ignore[misc]


def test_default_factory_fields_are_fresh_per_instance() -> None:
    build = slot_builder(NatDecision, "keywords")
    first, second = build(), build()
    assert first.rewrites == {} and first.rewrites is not second.rewrites
    assert first.inner_rewrites is not second.inner_rewrites


def test_missing_required_field_and_unknown_field_are_type_errors() -> None:
    build = slot_builder(ConntrackDecision, "keywords")
    with pytest.raises(TypeError):
        build()
    with pytest.raises(TypeError):
        build(is_return=True, colour="red")
