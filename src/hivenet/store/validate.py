"""Request validation and compare semantics shared by every `Store` backend.

Owns: the checks that turn bad input (keys, prefixes, values, integers, compares, txn
branches) into `InvalidRequestError` with a message naming the field and the value, and
`compare_holds`, etcd's compare semantics on one key (a missing key reads as value b"" and 0
for every number). Both backends call these, so they reject the same input with the same
message. Must not do I/O or know any backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, TypeVar

from hivenet.store.base import Compare, Delete, Get, InvalidRequestError, KeyValue, Put, TxnOp

__all__ = [
    "check_compare",
    "check_int",
    "check_key",
    "check_ops",
    "check_prefix",
    "check_value",
    "compare_holds",
]

_COMPARE_OPS: Final = frozenset({"==", "!=", "<", ">"})
_COMPARE_TARGETS: Final = frozenset(
    {"value", "version", "create_revision", "mod_revision", "lease"}
)
_Comparable = TypeVar("_Comparable", bytes, int)


def check_key(key: object, field: str = "key") -> str:
    if not isinstance(key, str) or not key:
        raise InvalidRequestError(f"{field} must be a non-empty str, got {key!r}")
    _check_encodable(key, field)
    return key


def check_prefix(prefix: object, field: str = "prefix") -> str:
    if not isinstance(prefix, str):
        raise InvalidRequestError(f"{field} must be a str, got {prefix!r}")
    _check_encodable(prefix, field)
    return prefix


def _check_encodable(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequestError(f"{field} is not valid UTF-8 text: {text!r}") from error


def check_value(value: object, field: str = "value") -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise InvalidRequestError(f"{field} must be bytes, got {type(value).__name__}: {value!r}")


def check_int(value: object, field: str, *, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidRequestError(f"{field} must be an int >= {minimum}, got {value!r}")
    return value


def check_compare(compare: object) -> Compare:
    if not isinstance(compare, Compare):
        raise InvalidRequestError(f"compares must hold Compare objects, got {compare!r}")
    check_key(compare.key, "compare.key")
    if compare.target not in _COMPARE_TARGETS:
        raise InvalidRequestError(
            f"compare.target must be one of {sorted(_COMPARE_TARGETS)}, got {compare.target!r}"
        )
    if compare.op not in _COMPARE_OPS:
        raise InvalidRequestError(
            f"compare.op must be one of {sorted(_COMPARE_OPS)}, got {compare.op!r}"
        )
    if compare.target == "value":
        if not isinstance(compare.value, bytes | bytearray | memoryview):
            raise InvalidRequestError(
                f"compare.value must be bytes for target 'value' (key {compare.key!r}), "
                f"got {compare.value!r}"
            )
    elif not isinstance(compare.value, int) or isinstance(compare.value, bool):
        raise InvalidRequestError(
            f"compare.value must be an int for target {compare.target!r} "
            f"(key {compare.key!r}), got {compare.value!r}"
        )
    return compare


def check_ops(ops: Sequence[object], branch: str) -> list[TxnOp]:
    """Validate one txn branch; like etcd, a key may be written at most once per branch."""
    checked: list[TxnOp] = []
    put_keys: list[str] = []
    deletes: list[Delete] = []
    for op in ops:
        if isinstance(op, Put):
            check_key(op.key, f"{branch} Put.key")
            check_value(op.value, f"{branch} Put.value (key {op.key!r})")
            check_int(op.lease, f"{branch} Put.lease (key {op.key!r})", minimum=0)
            put_keys.append(op.key)
        elif isinstance(op, Delete):
            if op.prefix:
                check_prefix(op.key, f"{branch} Delete.key")
            else:
                check_key(op.key, f"{branch} Delete.key")
            deletes.append(op)
        elif isinstance(op, Get):
            if op.prefix:
                check_prefix(op.key, f"{branch} Get.key")
            else:
                check_key(op.key, f"{branch} Get.key")
        else:
            raise InvalidRequestError(f"{branch} ops must be Put, Delete or Get, got {op!r}")
        checked.append(op)
    seen: set[str] = set()
    for key in put_keys:
        if key in seen:
            raise InvalidRequestError(f"{branch}: key {key!r} is put more than once in one txn")
        seen.add(key)
    for delete in deletes:
        for key in put_keys:
            if key == delete.key or (delete.prefix and key.startswith(delete.key)):
                raise InvalidRequestError(
                    f"{branch}: key {key!r} is both put and deleted in one txn"
                )
    return checked


def compare_holds(compare: Compare, current: KeyValue | None) -> bool:
    """etcd compare semantics; a missing key reads as value b"" and 0 for every number."""
    if compare.target == "value":
        assert not isinstance(compare.value, int)
        return _ordered(compare.op, current.value if current else b"", bytes(compare.value))
    assert isinstance(compare.value, int)
    actual: int = getattr(current, compare.target) if current else 0
    return _ordered(compare.op, actual, compare.value)


def _ordered(op: str, actual: _Comparable, expected: _Comparable) -> bool:
    if op == "==":
        return actual == expected
    if op == "!=":
        return actual != expected
    if op == "<":
        return actual < expected
    return actual > expected
