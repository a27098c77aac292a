"""`frozen_builder(cls)`: the keyword form of `hivenet.packets.slots.slot_builder`, under the
name `sim/stateful.py` imports it by (the flow-state hook's decisions). New code calls
`slot_builder(cls, "keywords")` itself; this module goes once nothing imports it.
Owns nothing else; pure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from hivenet.packets.slots import slot_builder

_T = TypeVar("_T")


def frozen_builder(cls: type[_T]) -> Callable[..., _T]:
    """`build(**fields)`: an instance of the frozen slotted dataclass `cls`, equal to
    `cls(**fields)`, its slots set through their descriptors; `cls` itself when it has a
    `__post_init__` or is not slotted (see `slot_builder`)."""
    return slot_builder(cls, "keywords")
