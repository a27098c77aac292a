"""The `Store` protocol: an etcd-like key-value store with revisions, watches, leases and txns.

This module owns the contract every backend (sqlite file, sqlite memory, etcd) must honour and
the value types that cross it. It must not know about topology objects (see `topology.py`).

Semantics (etcd v3):
- Every successful write (put, delete that removed something, txn with writes) bumps the
  store revision by exactly one; all events of one txn share that revision.
- `KeyValue.version` counts puts since the key was (re)created; a delete resets it.
- `watch(prefix, start_revision)` yields every event with `revision >= start_revision` whose key
  starts with `prefix`, in revision order (and, within a revision, in the order of the txn),
  exactly once. Asking for a revision older than the compaction point raises `CompactedError`.
- Keys put with a lease are deleted (a DELETE event each) when the lease expires or is revoked.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable


class StoreError(Exception):
    """Base of every error a backend raises."""


class CompactedError(StoreError):
    """The requested revision is older than the oldest history the store still keeps."""

    def __init__(self, requested: int, compact_revision: int) -> None:
        super().__init__(
            f"revision {requested} has been compacted (oldest available: {compact_revision + 1})"
        )
        self.requested = requested
        self.compact_revision = compact_revision


class FutureRevisionError(StoreError):
    """The requested revision is newer than the store's current revision."""


class LeaseNotFoundError(StoreError):
    """The lease does not exist (never granted, revoked or expired)."""

    def __init__(self, lease_id: int) -> None:
        super().__init__(f"lease {lease_id} not found (expired or revoked)")
        self.lease_id = lease_id


class WriteOutcome(enum.Enum):
    """What became of a write when the store could not answer it."""

    NOT_APPLIED = "not_applied"  # surely not applied (also every read)
    UNKNOWN = "unknown"  # it reached a member that failed before answering: read it back


class StoreUnavailableError(StoreError):
    """The backend cannot be reached or is locked.

    `outcome` says what became of a write (NOT_APPLIED unless a backend says otherwise);
    `failed` names what failed, as an operator would look for it (a member's endpoint,
    "no leader", "database locked"), or is "" when the message says it all.
    """

    def __init__(
        self,
        message: str,
        *,
        outcome: WriteOutcome | None = None,
        failed: str = "",
    ) -> None:
        super().__init__(message)
        self.outcome = outcome if outcome is not None else WriteOutcome.NOT_APPLIED
        self.failed = failed


class StoreCorruptError(StoreError):
    """The backend's data is unreadable; nothing was written."""


class InvalidRequestError(StoreError, ValueError):
    """The request itself is malformed (bad key, value, revision, txn op...); nothing was done."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


class EventType(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Event:
    """One change. For DELETE, `kv.value` is empty and `kv.mod_revision` is the delete's revision."""

    type: EventType
    kv: KeyValue
    prev_kv: KeyValue | None = None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True, slots=True)
class RangeResult:
    kvs: list[KeyValue]
    revision: int  # the store revision the read was served at
    more: bool = False  # True when `limit` cut the result; continue with start_after=kvs[-1].key
    count: int = 0  # number of keys in the whole range (ignoring limit)


CompareTarget = Literal["value", "version", "create_revision", "mod_revision", "lease"]
CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    """A txn guard. A missing key has version 0, create/mod revision 0, value b"" and lease 0."""

    key: str
    target: CompareTarget
    op: CompareOp
    value: bytes | int


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True, slots=True)
class Get:
    key: str
    prefix: bool = False


TxnOp = Put | Delete | Get


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int  # store revision after the txn
    # One entry per executed op: for Get the KeyValues found, for Delete the number deleted,
    # for Put the previous KeyValue (or None).
    responses: list[list[KeyValue] | int | KeyValue | None] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int  # seconds granted


@runtime_checkable
class Store(Protocol):
    """An etcd-like store. All methods are coroutines; every call returns or raises StoreError."""

    async def get(self, key: str) -> KeyValue | None: ...

    async def range(
        self,
        prefix: str,
        *,
        revision: int | None = None,
        limit: int = 0,
        start_after: str | None = None,
    ) -> RangeResult:
        """Keys starting with `prefix` (sorted), at `revision` (default: now); limit 0 = all."""
        ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Returns the new store revision."""
        ...

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Returns how many keys were deleted."""
        ...

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult: ...

    def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[Event]:
        """Events from `start_revision` on; iterate forever until the iterator is closed."""
        ...

    async def current_revision(self) -> int: ...

    async def lease_grant(self, ttl: int) -> Lease: ...

    async def lease_keepalive(self, lease_id: int) -> int:
        """Refresh; returns the TTL. Raises LeaseNotFoundError if it is gone."""
        ...

    async def lease_revoke(self, lease_id: int) -> None: ...

    async def compact(self, revision: int) -> None:
        """Drop history older than `revision`; watches/ranges below it raise CompactedError."""
        ...

    async def close(self) -> None: ...
