"""Unit tests for `hivenet.packets.slots`: whichever way the values come in (keywords,
positional, attributes of a source), the generated builder makes what the constructor makes,
refuses what it refuses, and is the constructor itself wherever it could not."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hivenet.packets.flowmatch import FIELD_NAMES, FULL_MASKS, FlowMatch
from hivenet.packets.slots import slot_builder


@dataclass(frozen=True, slots=True)
class Record:
    name: str
    size: int
    tags: frozenset[str] = frozenset()
    items: list[int] = field(default_factory=list, hash=False)


@dataclass(frozen=True, slots=True)
class Checked:
    value: int

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError("negative")


class HandWritten:
    """A slotted immutable record that is not a dataclass, like `flowstate.NatBinding`."""

    __slots__ = ("left", "right")
    __match_args__ = ("left", "right")

    def __init__(self, left: int, right: int) -> None:
        if left > right:
            raise ValueError("left after right")
        object.__setattr__(self, "left", left)
        object.__setattr__(self, "right", right)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HandWritten) and (self.left, self.right) == (
            other.left,
            other.right,
        )

    def __hash__(self) -> int:
        return hash((self.left, self.right))

    def __repr__(self) -> str:
        return f"HandWritten({self.left!r}, {self.right!r})"


def _same(built: object, made: object) -> None:
    assert type(built) is type(made)
    assert built == made
    assert hash(built) == hash(made)
    assert repr(built) == repr(made)


records = st.fixed_dictionaries(
    {"name": st.text(max_size=5), "size": st.integers()},
    optional={"tags": st.frozensets(st.text(max_size=3), max_size=3)},
)


@given(records)
def test_keywords_build_what_the_constructor_builds(values: dict[str, Any]) -> None:
    build = slot_builder(Record, "keywords")
    assert build is not Record
    built = build(**values)
    _same(built, Record(**values))
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.size = 1  # type: ignore[misc]


def test_keywords_refuse_what_the_constructor_refuses() -> None:
    build = slot_builder(Record, "keywords")
    with pytest.raises(TypeError):
        build(size=1)  # name missing
    with pytest.raises(TypeError):
        build(name="a", size=1, colour="red")
    with pytest.raises(TypeError):
        build("a", 1)  # keyword-only


def test_default_factories_give_a_fresh_value_per_instance() -> None:
    for build in (slot_builder(Record, "keywords"), slot_builder(Record, "positional")):
        first, second = build(name="a", size=1), build(name="a", size=1)
        assert first.items == [] and first.items is not second.items


@given(records)
def test_positional_build_what_the_constructor_builds(values: dict[str, Any]) -> None:
    build = slot_builder(Record, "positional")
    ordered = [values[name] for name in ("name", "size", "tags") if name in values]
    _same(build(*ordered), Record(*ordered))


def test_positional_refuse_what_the_constructor_refuses() -> None:
    build = slot_builder(Record, "positional")
    with pytest.raises(TypeError):
        build("a")
    with pytest.raises(TypeError):
        build("a", 1, frozenset(), [], "extra")


def test_positional_keeps_keyword_only_fields_keyword_only() -> None:
    @dataclass(frozen=True, slots=True)
    class Flagged:
        value: int
        flag: bool = dataclasses.field(default=False, kw_only=True)

    build = slot_builder(Flagged, "positional")
    assert build is not Flagged
    assert build(3, flag=True) == Flagged(3, flag=True)
    with pytest.raises(TypeError):
        build(3, True)


flow_matches = st.fixed_dictionaries(
    {name: st.integers(0, FULL_MASKS[name]) for name in FIELD_NAMES}
)


@given(flow_matches)
def test_attributes_build_the_flow_match_of_any_source(values: dict[str, int]) -> None:
    """The walk's use: a FlowMatch from an object with (at least) its fields."""
    build = slot_builder(FlowMatch, "attributes", FIELD_NAMES)
    assert build is not FlowMatch
    _same(build(SimpleNamespace(**values, other=1)), FlowMatch(**values))


def test_attributes_missing_on_the_source_are_attribute_errors() -> None:
    build = slot_builder(Record, "attributes")
    assert build(SimpleNamespace(name="a", size=1, tags=frozenset(), items=[])) == Record(
        "a", 1, frozenset(), []
    )
    with pytest.raises(AttributeError):
        build(SimpleNamespace(name="a", size=1))


def test_checks_run_unless_the_caller_skips_them_on_purpose() -> None:
    """`checked` (the default): a class with checks gets its constructor, so they run;
    `checked=False` skips them (the caller has checked the values itself)."""
    assert slot_builder(Checked, "keywords") is Checked
    assert slot_builder(Checked, "positional") is Checked
    via_constructor = slot_builder(Checked, "attributes")
    with pytest.raises(ValueError, match="negative"):
        via_constructor(SimpleNamespace(value=-1))
    assert via_constructor(SimpleNamespace(value=1)) == Checked(1)
    unchecked = slot_builder(Checked, "positional", ("value",), checked=False)
    assert unchecked is not Checked and unchecked(-1).value == -1
    assert slot_builder(HandWritten, "positional") is HandWritten


def test_hand_written_record_unchecked() -> None:
    """A hand-written record's way: its fields are `__match_args__`, every value must be
    given."""
    build = slot_builder(HandWritten, "positional", ("left", "right"), checked=False)
    assert build is not HandWritten
    _same(build(1, 2), HandWritten(1, 2))
    assert build(2, 1).left == 2  # its __init__'s check skipped: the caller's job
    with pytest.raises(TypeError):
        build(1)
    with pytest.raises(AttributeError, match="immutable"):
        build(1, 2).left = 0
    by_keywords = slot_builder(HandWritten, "keywords", checked=False)
    assert by_keywords(left=1, right=2) == HandWritten(1, 2)
    with pytest.raises(TypeError):
        by_keywords(left=1)


def test_the_constructor_wherever_slots_are_not_exactly_the_fields() -> None:
    @dataclass(frozen=True)
    class Unslotted:
        value: int = 0

    @dataclass(frozen=True, slots=True)
    class Hidden:
        value: int
        cached: int = field(default=0, init=False)

    @dataclass(frozen=True, slots=True)
    class Base:
        value: int

    @dataclass(frozen=True, slots=True)
    class Derived(Base):
        extra: int = 0

    class Loose(HandWritten):  # no __slots__: instances have a __dict__
        pass

    assert slot_builder(Unslotted, "keywords") is Unslotted
    assert slot_builder(Hidden, "keywords") is Hidden
    assert slot_builder(Loose, "positional", ("left", "right"), checked=False) is Loose
    assert slot_builder(Record, "positional", ("size", "name", "tags", "items")) is Record
    assert slot_builder(Record, "positional", ("name", "size")) is Record
    derived = slot_builder(Derived, "positional")
    assert derived is not Derived and derived(1, 2) == Derived(1, 2)
