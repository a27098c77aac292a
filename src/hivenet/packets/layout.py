"""Declarative header layouts: a header is a table of (field name, bit width) and one generic
codec packs and unpacks it (STYLE.md point 9).

Owns the `Field`/`Layout` machinery and the `Header` base class that frozen, slotted header
dataclasses inherit: construction checks every field against its width and names the field
on failure; `decode` raises `TruncatedPacket` naming the layer. The whole fixed part of a
header is converted with one `int.from_bytes`, and fields are cut out with shifts, so any bit
width (3-bit flags, 13-bit offsets, 128-bit addresses) needs no special code. This is the
readable, general path; the datapath hot path (`flowextract.py`) uses hand-tuned `struct`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

from hivenet.packets.errors import MalformedPacket, TruncatedPacket


@dataclass(frozen=True, slots=True)
class Field:
    """One fixed-width header field; `as_bytes` fields decode to `bytes` (names, padding)."""

    name: str
    bits: int
    as_bytes: bool = False


class Layout:
    """The fixed part of one header, fields in wire order, most significant bit first."""

    __slots__ = ("_bytes_fields", "_masks", "_shifts", "fields", "layer", "names", "size")

    def __init__(self, layer: str, fields: tuple[Field, ...]) -> None:
        total_bits = sum(field.bits for field in fields)
        if total_bits % 8:
            raise ValueError(f"{layer}: layout of {total_bits} bits is not whole bytes")
        self.layer = layer
        self.fields = fields
        self.names = tuple(field.name for field in fields)
        self.size = total_bits // 8
        shifts = []
        remaining = total_bits
        for field in fields:
            remaining -= field.bits
            shifts.append(remaining)
        self._shifts = tuple(shifts)
        self._masks = tuple((1 << field.bits) - 1 for field in fields)
        self._bytes_fields = tuple(field.as_bytes for field in fields)

    def decode(self, data: bytes, offset: int = 0) -> tuple[Any, ...]:
        """The field values of the header at `offset` in `data`."""
        available = len(data) - offset
        if available < self.size:
            raise TruncatedPacket(
                self.layer, "header", f"needs {self.size} bytes, only {max(available, 0)} present"
            )
        value = int.from_bytes(data[offset : offset + self.size], "big")
        return tuple(
            ((value >> shift) & mask).to_bytes(field.bits // 8, "big")
            if as_bytes
            else (value >> shift) & mask
            for field, shift, mask, as_bytes in zip(
                self.fields, self._shifts, self._masks, self._bytes_fields, strict=True
            )
        )

    def encode(self, values: tuple[Any, ...]) -> bytes:
        value = 0
        for raw, shift, as_bytes in zip(values, self._shifts, self._bytes_fields, strict=True):
            value |= (int.from_bytes(raw, "big") if as_bytes else raw) << shift
        return value.to_bytes(self.size, "big")

    def check(self, values: tuple[Any, ...]) -> None:
        """Reject a value that does not fit its field, naming the layer, field and value."""
        for field, mask, raw in zip(self.fields, self._masks, values, strict=True):
            if field.as_bytes:
                if not isinstance(raw, bytes) or len(raw) * 8 != field.bits:
                    raise MalformedPacket(
                        self.layer,
                        field.name,
                        f"needs {field.bits // 8} bytes, got {raw!r:.40}",
                    )
            elif not isinstance(raw, int) or isinstance(raw, bool) or not 0 <= raw <= mask:
                raise MalformedPacket(
                    self.layer, field.name, f"{raw!r} does not fit in {field.bits} bits"
                )


class Header:
    """Base of the header dataclasses: the fields named in `LAYOUT` come first, in order.

    Subclasses are `@dataclass(frozen=True, slots=True)`; extra fields after the layout ones
    (options, variable parts) must have defaults and are coded by the subclass.
    """

    __slots__ = ()
    LAYOUT: ClassVar[Layout]

    if TYPE_CHECKING:

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    def __post_init__(self) -> None:
        self.LAYOUT.check(self.fixed_values())

    def fixed_values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.LAYOUT.names)

    @classmethod
    def from_fields(cls, fixed: tuple[Any, ...], *variable: Any) -> Self:
        """Build from decoded fixed-field values followed by the variable-part fields."""
        return cls(*fixed, *variable)

    @classmethod
    def decode_fixed(cls, data: bytes, offset: int = 0) -> Self:
        """Decode only the fixed part (header classes with options override `decode`)."""
        return cls(*cls.LAYOUT.decode(data, offset))

    def encode_fixed(self) -> bytes:
        return self.LAYOUT.encode(self.fixed_values())


def layout(layer: str, *fields: tuple[str, int] | tuple[str, int, bool]) -> Layout:
    """Shorthand: layout("UDP", ("src_port", 16), ("dst_port", 16), ...)."""
    return Layout(layer, tuple(Field(*spec) for spec in fields))
