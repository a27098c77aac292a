"""Fast constructors for the immutable slotted records built on the per-packet hot path:
`slot_builder(cls, take)`, the one generator of them.

A frozen dataclass's `__init__` sets each field through `object.__setattr__` (~0.2-0.3 us a
field: ~4.3 us for the 23 fields of a `FlowMatch`), and a hand-written immutable record
does the same after its checks. The function generated here makes
the instance with `object.__new__` and sets each field through its slot's descriptor, so
what it builds is what the constructor builds (type, fields, equality, hash, repr,
immutability). Its users differ only in where the values come from, `take`:

- "keywords": `build(**fields)`, keyword-only; a field left out gets its default, a
  `default_factory` field a fresh value, as the dataclass's `__init__` gives them; a missing
  or unknown field is a `TypeError` (`sim/engine.py`'s `SimulationResult`, the flow-state
  hook's decisions in `sim/stateful.py`).
- "positional": `build(*values)` in field order, defaults likewise (`flowstate/wire.py`:
  `ConntrackRecord` from entries it has checked itself).
- "attributes": `build(source)`: `source.<field>` for each field (`sim/walk.py`: the
  `FlowMatch` of a `PacketState`'s current fields).

Where the generated function could build what the constructor would not, the constructor
itself is returned (for "attributes", a function calling it with the source's attributes):
when `cls`'s fields (a dataclass's, else a hand-written record's `__match_args__`) are not
exactly its slots, or not `fields` in that order when given; and, when `checked` (the
default), when `cls` is not a dataclass or has a `__post_init__` (the checks it runs would
be skipped). `checked=False` is for a caller that has checked the values itself: skipping
the constructor's checks, a `__post_init__` or a hand-written `__init__`, is then the point.
The generated source holds only the field names (identifiers) and fixed text.
Owns nothing else; pure.
"""

from __future__ import annotations

import dataclasses
import keyword
from collections.abc import Callable
from types import MemberDescriptorType
from typing import Any, Literal, TypeVar

Take = Literal["keywords", "positional", "attributes"]

_T = TypeVar("_T")
_MISSING = object()  # "not given": a `default_factory` field's factory is called


def slot_builder(
    cls: type[_T], take: Take, fields: tuple[str, ...] | None = None, *, checked: bool = True
) -> Callable[..., _T]:
    """A constructor of `cls` that sets its slots through their descriptors, its values
    taken as `take` says (see the module's docstring); `fields`: the fields, in order, the
    caller relies on (default: `cls`'s own). The constructor itself where that could build
    something the constructor would not."""
    declared = _record_fields(cls)
    names = declared if fields is None else fields
    if (
        declared is None
        or names != declared
        or not _slots_are(cls, names)
        or (checked and (not dataclasses.is_dataclass(cls) or hasattr(cls, "__post_init__")))
    ):
        return _constructor(cls, take, names or ())
    # Every generated name starts with "__": no field can be spelled so (`_slots_are`).
    namespace: dict[str, Any] = {"__new": object.__new__, "__cls": cls, "__MISSING": _MISSING}
    params: list[str] = []
    keyword_only: list[str] = []
    defaulting: list[str] = []
    setting: list[str] = []
    for name, default, factory, kw_only in _parameters(cls, names):
        namespace[f"__set_{name}"] = getattr(cls, name).__set__
        if take == "attributes":
            setting.append(f"    __set_{name}(__instance, __source.{name})\n")
            continue
        setting.append(f"    __set_{name}(__instance, {name})\n")
        if factory is not dataclasses.MISSING:
            namespace[f"__factory_{name}"] = factory
            param = f"{name}=__MISSING"
            defaulting.append(f"    if {name} is __MISSING:\n        {name} = __factory_{name}()\n")
        elif default is not dataclasses.MISSING:
            namespace[f"__default_{name}"] = default
            param = f"{name}=__default_{name}"
        else:
            param = name
        (keyword_only if take == "keywords" or kw_only else params).append(param)
    if take == "attributes":
        params = ["__source"]
    if keyword_only:
        params += ["*", *keyword_only]
    source = (
        f"def build({', '.join(params)}):\n{''.join(defaulting)}"
        f"    __instance = __new(__cls)\n{''.join(setting)}    return __instance\n"
    )
    exec(compile(source, f"<{cls.__name__} from {take}>", "exec"), namespace)
    build: Callable[..., _T] = namespace["build"]
    return build


def _record_fields(cls: type) -> tuple[str, ...] | None:
    """The fields `cls`'s constructor takes, in order: a dataclass's (None if one is not an
    `__init__` parameter), a hand-written record's `__match_args__`; None for anything else."""
    if dataclasses.is_dataclass(cls):
        fields = dataclasses.fields(cls)
        return tuple(f.name for f in fields) if all(f.init for f in fields) else None
    match_args = getattr(cls, "__match_args__", None)
    return tuple(match_args) if isinstance(match_args, tuple) and match_args else None


def _slots_are(cls: type, names: tuple[str, ...]) -> bool:
    """`cls` and every base keep their instances' state in slots (no `__dict__` a
    constructor's checks could fill), those slots are `names`, each is reachable through its
    descriptor, and none is spelled like a generated name."""
    slots: set[str] = set()
    for klass in cls.__mro__[:-1]:
        declared = vars(klass).get("__slots__")
        if declared is None:
            return False
        slots.update((declared,) if isinstance(declared, str) else declared)
    slots.discard("__weakref__")
    return (
        slots == set(names)
        and len(names) == len(slots)
        and all(
            name.isidentifier()
            and not keyword.iskeyword(name)
            and not name.startswith("__")
            and isinstance(getattr(cls, name, None), MemberDescriptorType)
            for name in names
        )
    )


def _parameters(cls: type, names: tuple[str, ...]) -> list[tuple[str, Any, Any, bool]]:
    """(name, default, default factory, keyword-only) per field, as a dataclass's `__init__`
    takes them (`dataclasses.MISSING`: none); for a hand-written record, no defaults (its
    `__init__`'s are not known here: every value must be given)."""
    if dataclasses.is_dataclass(cls):
        return [
            (f.name, f.default, f.default_factory, f.kw_only is True)
            for f in dataclasses.fields(cls)
        ]
    return [(name, dataclasses.MISSING, dataclasses.MISSING, False) for name in names]


def _constructor(cls: type[_T], take: Take, names: tuple[str, ...]) -> Callable[..., _T]:
    if take != "attributes":
        return cls

    def build(source: object) -> _T:
        return cls(**{name: getattr(source, name) for name in names})

    return build
