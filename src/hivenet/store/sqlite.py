"""The embedded Network State DB: `SqliteStore`, the SQLite backend of the `Store` protocol.

This module owns the SQLite schema, the etcd v3 semantics on top of it (revisions, MVCC history,
txns, leases, compaction) and the asyncio shell around it (watch wake-ups, cross-process change
polling, background lease expiry). It must not know about topology objects: it stores opaque
bytes under string keys (`topology.py` does the typing) and it must not import any layer above
`store/`.

Two layers, so the SQL stays synchronous and testable and only the shell waits:

- `_Engine` is synchronous. Each public method is exactly one SQLite transaction on one
  connection; writes use `BEGIN IMMEDIATE` so the write lock is taken before anything is read,
  which makes the read-compare-write of a txn atomic across processes and means a busy database
  fails before anything is written.
- `SqliteStore` is the async `Store`. In memory mode it calls the engine directly on the event
  loop thread (a call takes microseconds and can never wait for a lock). In file mode
  ("auto" execution) it first tries the call on the loop thread with a zero busy timeout; if
  another process holds the lock, or the call may be long (big ranges, compaction), the call
  runs on the store's single worker thread with the full busy timeout instead, so the event
  loop keeps serving watches and timers while SQLite waits. Measured with `bench/store.py`:
  a thread hop on every call cut put throughput about 5x; the no-wait fast path avoids it.

Schema (version 1, recorded in `meta`):

- `meta(name, value)`: `schema_version`, `revision` (the store revision), `compact_revision`.
- `kv`: the current value of every live key, plus the id of the event that wrote it.
- `events`: the event log AND the MVCC history. Every PUT/DELETE of a key is one row with the
  revision it happened at; `AUTOINCREMENT` ids give a total order (revision, then order within
  the txn) that never reuses an id, so a watcher's id cursor can never skip an event.
  A range at revision R reads, per key, the newest row with revision <= R. Compaction to C
  drops every row with revision <= C except the newest PUT of each key (still needed for
  ranges above C and as `prev_kv` of later events).
- `leases(id, ttl, deadline)`: deadlines are wall-clock seconds (`time.time()`). Several
  processes share the file and it outlives them and reboots, while Python leaves the
  reference point of `time.monotonic()` undefined (only differences within one process mean
  anything). Every process on the machine reads the same wall clock; a clock step moves all
  deadlines alike. Tests inject their own clock.

History grows until someone calls `compact()`; choosing when is the caller's policy.

Watches and large reads (measured with `bench/propagation.py` and `bench/startup.py`): a
commit wakes only the watches whose prefix one of its keys is under (all of them for another
process's commit, whose keys are unknown), and watches of one prefix at the same place in
the log share one event-log query until the next change, as a server fans one event out to
its watchers; 1000 agents' 4 watches each had cost 4000 queries per write. A paged range
bounds each page by `start_after` alone (SQLite would otherwise seek to the prefix and rescan
every earlier key), counts a (prefix, revision) once, and at a past revision walks the
`events_by_key` index from `start_after` a page at a time: an agent's paged load of 130k keys
is linear, it was quadratic.

Revisions follow etcd: a new store is at revision 1; every write that changes something bumps
it by exactly one (all changes of one txn share it); a revoke or an expiry deletes the lease's
keys in one revision of its own. A range or watch at revision R <= the compact revision raises
`CompactedError`; R above the current revision raises `FutureRevisionError`. Lease grant and
keepalive do not change the revision.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass
from itertools import starmap
from typing import Any, Final, Literal, TypeVar

from hivenet.store.base import (
    CompactedError,
    Compare,
    Delete,
    Event,
    EventType,
    FutureRevisionError,
    InvalidRequestError,
    KeyValue,
    Lease,
    LeaseNotFoundError,
    Put,
    RangeResult,
    StoreCorruptError,
    StoreError,
    StoreUnavailableError,
    TxnOp,
    TxnResult,
)
from hivenet.store.validate import (
    check_compare,
    check_int,
    check_key,
    check_ops,
    check_prefix,
    check_value,
    compare_holds,
)

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

_log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
MEMORY_PATH: Final = ":memory:"

_PUT: Final = 0
_DELETE: Final = 1
_WATCH_BATCH: Final = 512
_LONG_RANGE_LIMIT: Final = 1000  # larger pages run on the worker thread in "auto" execution

# Primary SQLite result codes (the low byte of an extended code).
_SQLITE_PERM: Final = 3
_SQLITE_BUSY: Final = 5
_SQLITE_LOCKED: Final = 6
_SQLITE_READONLY: Final = 8
_SQLITE_IOERR: Final = 10
_SQLITE_CORRUPT: Final = 11
_SQLITE_FULL: Final = 13
_SQLITE_CANTOPEN: Final = 14
_SQLITE_NOTADB: Final = 26

_SCHEMA: Final = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    """CREATE TABLE kv (
        key TEXT PRIMARY KEY,
        value BLOB NOT NULL,
        create_revision INTEGER NOT NULL,
        mod_revision INTEGER NOT NULL,
        version INTEGER NOT NULL,
        lease INTEGER NOT NULL,
        event_id INTEGER NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX kv_by_lease ON kv(lease) WHERE lease != 0",
    """CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        revision INTEGER NOT NULL,
        kind INTEGER NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        create_revision INTEGER NOT NULL,
        version INTEGER NOT NULL,
        lease INTEGER NOT NULL,
        prev_id INTEGER
    )""",
    "CREATE INDEX events_by_revision ON events(revision)",
    "CREATE INDEX events_by_key ON events(key, revision)",
    """CREATE TABLE leases (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ttl INTEGER NOT NULL,
        deadline REAL NOT NULL
    )""",
    "CREATE INDEX leases_by_deadline ON leases(deadline)",
)

_T = TypeVar("_T")
# Counts of keys kept (`_Engine._count`); ids per `IN (...)` (SQLite's variable limit).
_COUNT_CACHE_SIZE = 256
_IN_CHUNK = 500

# Page size of a new database. With SQLite's default 4096 a row holds at most ~1000 bytes
# in its leaf (a WITHOUT ROWID table's rows are index entries), and a rule's JSON is ~1.1 kB:
# every rule spilled into an overflow page of its own (4 KB read for ~100 B), so the store
# was 2.5x its data on disk and an agent's start-up read took one more page read per rule.
# 8192 keeps such values in the leaf: bench/startup.py's 130k-key read took 0.5-0.66 s
# instead of 0.9-1.0 s (CPU, same keys VACUUMed into each page size), and its file 268 MB
# instead of 620 MB. Writes of 1 kB values cost no more (fewer pages: no overflow page).
_PAGE_SIZE: Final = 8192
_KV_COLUMNS: Final = "key, value, create_revision, mod_revision, version, lease"
_EVENT_SELECT: Final = """
    SELECT e.id, e.revision, e.kind, e.key, e.value, e.create_revision, e.version, e.lease,
           p.id, p.value, p.create_revision, p.revision, p.version, p.lease
    FROM events e LEFT JOIN events p ON p.id = e.prev_id
"""


def _prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with `prefix` (None: no bound).

    SQLite compares TEXT with memcmp on UTF-8, which orders like Python compares code points.
    """
    chars = list(prefix)
    while chars:
        code_point = ord(chars[-1])
        if code_point < 0x10FFFF:
            code_point += 1
            if 0xD800 <= code_point <= 0xDFFF:  # surrogates cannot be stored
                code_point = 0xE000
            chars[-1] = chr(code_point)
            return "".join(chars)
        chars.pop()
    return None


def _key_range_sql(column: str, prefix: str) -> tuple[str, list[object]]:
    end = _prefix_end(prefix)
    if end is None:
        return f"{column} >= ?", [prefix]
    return f"{column} >= ? AND {column} < ?", [prefix, end]


def _page_range_sql(column: str, prefix: str, start_after: str | None) -> tuple[str, list[object]]:
    """Keys under `prefix` after `start_after`, as one lower and one upper bound: given both
    `>= prefix` and `> start_after`, SQLite seeks to the prefix and scans every key before
    `start_after` again, so a paged read of a large prefix would cost its square."""
    if start_after is None or start_after < prefix:
        return _key_range_sql(column, prefix)
    end = _prefix_end(prefix)
    if end is None:
        return f"{column} > ?", [start_after]
    return f"{column} > ? AND {column} < ?", [start_after, end]


def _kv_from_row(row: Sequence[Any]) -> KeyValue:
    return KeyValue(
        key=row[0],
        value=row[1],
        create_revision=row[2],
        mod_revision=row[3],
        version=row[4],
        lease=row[5],
    )


# --------------------------------------------------------------------------- errors


class _WouldBlock(Exception):
    """A no-wait call found the database locked; nothing happened. Retry where waiting is fine."""


def _primary_code(error: sqlite3.Error) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _is_busy(error: sqlite3.Error) -> bool:
    return _primary_code(error) in (_SQLITE_BUSY, _SQLITE_LOCKED) or "locked" in str(error)


def _translate(error: sqlite3.Error, location: str, busy_timeout: float) -> StoreError:
    """Map a sqlite3 error to the Store error family, naming the database it happened on."""
    primary = _primary_code(error)
    message = str(error)
    if _is_busy(error):
        return StoreUnavailableError(
            f"store {location} is locked by another connection "
            f"(gave up after busy timeout {busy_timeout:g}s): {message}"
        )
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "not a database" in message:
        return StoreCorruptError(f"store {location} is not a readable SQLite database: {message}")
    if primary in (_SQLITE_CANTOPEN, _SQLITE_IOERR, _SQLITE_FULL, _SQLITE_READONLY, _SQLITE_PERM):
        return StoreUnavailableError(f"store {location} cannot be used: {message}")
    if isinstance(error, sqlite3.ProgrammingError) and "closed" in message:
        return StoreUnavailableError(f"store {location} is closed")
    return StoreError(f"store {location}: {message}")


# --------------------------------------------------------------------------- engine


# The keys one write transaction changed (empty: the revision did not move).
_Keys = tuple[str, ...]


class _Revisions:
    """The revision counter of one write transaction: each group of changes gets one revision,
    allocated on its first change so a group that changes nothing does not bump it. Also
    collects the keys the transaction changed, so only the watches they concern are woken."""

    __slots__ = ("_group_open", "committed", "current", "keys")

    def __init__(self, committed: int) -> None:
        self.committed = committed
        self.current = committed
        self._group_open = False
        self.keys: list[str] = []

    def for_change(self) -> int:
        if not self._group_open:
            self.current += 1
            self._group_open = True
        return self.current

    def end_group(self) -> None:
        self._group_open = False

    @property
    def changed(self) -> bool:
        return self.current != self.committed

    def changed_keys(self) -> _Keys:
        """The keys changed (empty when the revision did not move)."""
        return tuple(self.keys) if self.changed else ()


@dataclass(frozen=True, slots=True)
class _EventBatch:
    """What one watch poll found, and where the watcher's cursor goes next."""

    events: list[Event]
    after_id: int  # the next poll returns events with a larger id
    floor_revision: int  # the oldest revision the watcher may still need
    full: bool  # the batch hit its limit: poll again without waiting


class _Engine:
    """Synchronous SQLite core. Every method is one transaction; callers serialize calls."""

    def __init__(self, path: str, *, busy_timeout: float) -> None:
        self.path = path
        self.location = "in memory" if path == MEMORY_PATH else repr(path)
        self.busy_timeout = busy_timeout
        # Serializes use of the connection between the event loop and the worker thread.
        self._lock = threading.RLock()
        self._no_wait = False
        self._poll_lock = threading.Lock()  # the poll connection: loop thread vs close()
        self._poll_connection: sqlite3.Connection | None = None
        self._last_data_version: int | None = None
        # (prefix, revision) -> number of keys (`_count`).
        self._counts: dict[tuple[str, int], int] = {}
        try:
            self._connection = self._connect()
        except sqlite3.Error as error:
            raise _translate(error, self.location, busy_timeout) from error
        try:
            self._initialize()
            if path != MEMORY_PATH:
                self._poll_connection = self._connect()
                self._poll_connection.execute("PRAGMA busy_timeout = 0")
                self._last_data_version = self._data_version()
        except BaseException:
            self.close()
            raise

    # -- connection and schema

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # self._lock serializes the loop and the worker thread
            cached_statements=256,
        )
        connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        return connection

    def _initialize(self) -> None:
        with self._lock:
            try:
                # Before anything is written: a new database takes this page size (an
                # existing one keeps its own). See `_PAGE_SIZE`.
                self._connection.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
                if self.path != MEMORY_PATH:
                    # WAL: readers never block the writer and vice versa, across processes.
                    # synchronous=NORMAL in WAL survives process crashes; only an OS crash or
                    # power loss can lose the last commits (never corrupts the file).
                    self._connection.execute("PRAGMA journal_mode = WAL").fetchone()
                    self._connection.execute("PRAGMA synchronous = NORMAL")
                # An existing store is only read, so opening it never waits for a writer; a
                # new one is created under the write lock (several processes may race here).
                for begin in ("BEGIN", "BEGIN IMMEDIATE"):
                    self._connection.execute(begin)
                    try:
                        created = self._create_or_check_schema(may_create=begin != "BEGIN")
                        self._connection.execute("COMMIT")
                    except BaseException:
                        self._rollback()
                        raise
                    if created is not None:
                        break
            except sqlite3.Error as error:
                raise _translate(error, self.location, self.busy_timeout) from error

    def _create_or_check_schema(self, *, may_create: bool) -> bool | None:
        """Check (or, if the database is empty and `may_create`, create) the schema.

        Returns True if it created the schema, False if a valid one was there, None if the
        database is empty and `may_create` is False.
        """
        connection = self._connection
        tables = {
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
        if not tables:
            if not may_create:
                return None
            for statement in _SCHEMA:
                connection.execute(statement)
            connection.executemany(
                "INSERT INTO meta(name, value) VALUES (?, ?)",
                [("schema_version", SCHEMA_VERSION), ("revision", 1), ("compact_revision", 0)],
            )
            return True
        if "meta" not in tables:
            raise StoreCorruptError(
                f"store {self.location} is a SQLite database but not a HiveNet store "
                f"(tables {sorted(tables)}, no 'meta' table)"
            )
        row = connection.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        version = row[0] if row else None
        if version != SCHEMA_VERSION:
            raise StoreCorruptError(
                f"store {self.location} has schema version {version!r}; "
                f"this HiveNet reads schema version {SCHEMA_VERSION}"
            )
        missing = {"kv", "events", "leases"} - tables
        if missing:
            raise StoreCorruptError(f"store {self.location} lacks tables {sorted(missing)}")
        return False

    def close(self) -> None:
        with self._lock, self._poll_lock:
            for connection in (self._connection, self._poll_connection):
                if connection is not None:
                    with contextlib.suppress(sqlite3.Error):
                        connection.close()

    def _rollback(self) -> None:
        if self._connection.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._connection.execute("ROLLBACK")

    # -- transaction wrappers

    def call_no_wait(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run an engine call only if it needs no waiting: raises _WouldBlock (having done
        nothing) if the worker thread is busy or another connection holds a conflicting lock."""
        if not self._lock.acquire(blocking=False):
            raise _WouldBlock
        try:
            connection = self._connection
            try:
                connection.execute("PRAGMA busy_timeout = 0")
            except sqlite3.Error as error:
                raise _translate(error, self.location, self.busy_timeout) from error
            self._no_wait = True
            try:
                return function(*args)
            finally:
                self._no_wait = False
                with contextlib.suppress(sqlite3.Error):
                    connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        finally:
            self._lock.release()

    def _failed(self, error: sqlite3.Error) -> Exception:
        if self._no_wait and _is_busy(error):
            return _WouldBlock()
        return _translate(error, self.location, self.busy_timeout)

    def _read(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._lock:
            try:
                self._connection.execute("BEGIN")
                try:
                    result = body(self._connection)
                finally:
                    self._rollback()  # a read transaction: nothing to keep
                return result
            except sqlite3.Error as error:
                raise self._failed(error) from error

    def _write(
        self, body: Callable[[sqlite3.Connection, _Revisions], _T], now: float
    ) -> tuple[_T, _Keys]:
        """Run `body` in one BEGIN IMMEDIATE transaction after expiring due leases.

        Returns the body's result and the keys it changed (empty: the revision did not move). If the body raises a
        StoreError after expiry changed something, the expiry is still committed (its own
        revisions) and the body's partial work is rolled back.
        """
        connection = self._connection
        with self._lock:
            try:
                connection.execute("BEGIN IMMEDIATE")
                try:
                    revisions = _Revisions(self._read_meta(connection, "revision"))
                    expired = self._expire_due_leases(connection, revisions, now)
                    if expired:
                        connection.execute("SAVEPOINT body")
                    revision_after_expiry = revisions.current
                    keys_after_expiry = len(revisions.keys)
                    try:
                        result = body(connection, revisions)
                    except StoreError:
                        if not expired:
                            raise
                        connection.execute("ROLLBACK TO body")
                        revisions.current = revision_after_expiry
                        del revisions.keys[keys_after_expiry:]
                        self._finish_write(connection, revisions)
                        raise
                    self._finish_write(connection, revisions)
                    return result, revisions.changed_keys()
                except BaseException:
                    self._rollback()
                    raise
            except sqlite3.Error as error:
                raise self._failed(error) from error

    def _finish_write(self, connection: sqlite3.Connection, revisions: _Revisions) -> None:
        if revisions.changed:
            connection.execute(
                "UPDATE meta SET value = ? WHERE name = 'revision'", (revisions.current,)
            )
        connection.execute("COMMIT")

    @staticmethod
    def _read_meta(connection: sqlite3.Connection, name: str) -> int:
        row = connection.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return int(row[0])

    # -- change detection (file mode)

    def _data_version(self) -> int:
        assert self._poll_connection is not None
        return int(self._poll_connection.execute("PRAGMA data_version").fetchone()[0])

    def changed_elsewhere(self) -> bool:
        """Cheap check (a few microseconds) whether any connection committed since last call.

        Uses a second connection: `data_version` only moves for commits by other connections,
        and to this one the store's own writes are "other" too. If the check itself fails the
        answer is "maybe", which only costs watchers one poll.
        """
        if self._poll_connection is None:
            return False
        with self._poll_lock:
            try:
                version = self._data_version()
            except sqlite3.Error:
                return True
        if version == self._last_data_version:
            return False
        self._last_data_version = version
        return True

    # -- reads

    def current_revision(self) -> int:
        return self._read(lambda connection: self._read_meta(connection, "revision"))

    def get(self, key: str) -> KeyValue | None:
        def body(connection: sqlite3.Connection) -> KeyValue | None:
            return self._get(connection, key)

        return self._read(body)

    @staticmethod
    def _get(connection: sqlite3.Connection, key: str) -> KeyValue | None:
        row = connection.execute(f"SELECT {_KV_COLUMNS} FROM kv WHERE key = ?", (key,)).fetchone()
        return _kv_from_row(row) if row else None

    def range(
        self, prefix: str, revision: int | None, limit: int, start_after: str | None
    ) -> RangeResult:
        def body(connection: sqlite3.Connection) -> RangeResult:
            current = self._read_meta(connection, "revision")
            if revision is None or revision == 0:
                return self._range_current(connection, prefix, current, limit, start_after)
            if revision > current:
                raise FutureRevisionError(
                    f"revision {revision} is newer than the current revision {current}"
                )
            compact_revision = self._read_meta(connection, "compact_revision")
            if revision <= compact_revision:
                raise CompactedError(revision, compact_revision)
            if revision == current:
                return self._range_current(connection, prefix, current, limit, start_after)
            return self._range_history(connection, prefix, revision, limit, start_after)

        return self._read(body)

    def _count(
        self,
        connection: sqlite3.Connection,
        prefix: str,
        revision: int,
        sql: str,
        params: Sequence[object],
    ) -> int:
        """The number of keys under `prefix` at `revision`, by `sql`. A revision's keys never
        change, so it is counted once: a paged read of a large prefix (an agent loading the
        topology, every page at one revision) would otherwise count every key on every page."""
        cached = self._counts.get((prefix, revision))
        if cached is not None:
            return cached
        count = int(connection.execute(sql, params).fetchone()[0])
        if len(self._counts) >= _COUNT_CACHE_SIZE:
            self._counts.clear()
        self._counts[(prefix, revision)] = count
        return count

    def _range_current(
        self,
        connection: sqlite3.Connection,
        prefix: str,
        current: int,
        limit: int,
        start_after: str | None,
    ) -> RangeResult:
        where, params = _key_range_sql("key", prefix)
        page_where, page_params = _page_range_sql("key", prefix, start_after)
        sql = f"SELECT {_KV_COLUMNS} FROM kv WHERE {page_where} ORDER BY key"
        if limit:
            sql += " LIMIT ?"
            page_params.append(limit + 1)
        rows = connection.execute(sql, page_params).fetchall()
        more = bool(limit) and len(rows) > limit
        kvs = list(starmap(KeyValue, rows[:limit] if limit else rows))
        if not limit and start_after is None:
            count = len(kvs)
        else:
            # `current` is committed (a read transaction), so its count is final.
            count = self._count(
                connection, prefix, current, f"SELECT COUNT(*) FROM kv WHERE {where}", params
            )
        return RangeResult(kvs=kvs, revision=current, more=more, count=count)

    def _range_history(
        self,
        connection: sqlite3.Connection,
        prefix: str,
        revision: int,
        limit: int,
        start_after: str | None,
    ) -> RangeResult:
        where, params = _key_range_sql("key", prefix)
        # Walk the keys in order along events_by_key, taking each key's newest event at
        # `revision`, a batch of keys at a time from `start_after` on, until the page (and one
        # more, to tell whether there is more) is full: a page costs its own size, not the
        # prefix's. Keys whose newest event is a DELETE did not exist then: skipped.
        wanted = limit + 1 if limit else 0
        rows: list[Sequence[Any]] = []
        after = start_after
        while True:
            page_where, page_params = _page_range_sql("key", prefix, after)
            group_sql = (
                f"SELECT key, MAX(id) FROM events WHERE {page_where} AND revision <= ? "
                "GROUP BY key ORDER BY key"
            )
            group_params: list[object] = [*page_params, revision]
            batch = wanted - len(rows) if wanted else 0
            if batch:
                group_sql += " LIMIT ?"
                group_params.append(batch)
            groups = connection.execute(group_sql, group_params).fetchall()
            newest: dict[int, Sequence[Any]] = {}
            ids = [event_id for _key, event_id in groups]
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                for row in connection.execute(
                    "SELECT id, key, value, create_revision, revision, version, lease, kind "
                    f"FROM events WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ):
                    newest[row[0]] = row
            rows.extend(newest[event_id][1:7] for event_id in ids if newest[event_id][7] == _PUT)
            if not batch or len(groups) < batch or len(rows) >= wanted:
                break
            after = groups[-1][0]
        more = bool(limit) and len(rows) > limit
        kvs = list(starmap(KeyValue, rows[:limit] if limit else rows))
        if not limit and start_after is None:
            count = len(kvs)
        else:
            count = self._count(
                connection,
                prefix,
                revision,
                "SELECT COUNT(*) FROM events e JOIN (SELECT MAX(id) AS id FROM events "
                f"WHERE {where} AND revision <= ? GROUP BY key) newest ON e.id = newest.id "
                f"WHERE e.kind = {_PUT}",
                [*params, revision],
            )
        return RangeResult(kvs=kvs, revision=revision, more=more, count=count)

    def fetch_events(
        self, prefix: str, start_revision: int, after_id: int, floor_revision: int, limit: int
    ) -> _EventBatch:
        """The next events for a watcher, after event id `after_id` and at or above
        `start_revision`. Raises CompactedError if compaction removed an event it still needs."""

        def body(connection: sqlite3.Connection) -> _EventBatch:
            compact_revision = self._read_meta(connection, "compact_revision")
            if compact_revision >= floor_revision:
                raise CompactedError(floor_revision, compact_revision)
            where, params = _key_range_sql("e.key", prefix)
            if after_id:
                cursor_sql, cursor_params = (
                    "e.id > ? AND e.revision >= ?",
                    [
                        after_id,
                        start_revision,
                    ],
                )
            else:
                cursor_sql, cursor_params = "e.revision >= ?", [start_revision]
            rows = connection.execute(
                f"{_EVENT_SELECT} WHERE {cursor_sql} AND {where} ORDER BY e.id LIMIT ?",
                [*cursor_params, *params, limit],
            ).fetchall()
            events = [_event_from_row(row) for row in rows]
            if len(rows) == limit:
                return _EventBatch(
                    events=events,
                    after_id=rows[-1][0],
                    floor_revision=max(floor_revision, rows[-1][1]),
                    full=True,
                )
            # Everything committed up to this snapshot has been seen: skip past non-matching
            # events too, so a quiet prefix does not rescan a busy log on every poll.
            newest_id = connection.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
            ).fetchone()
            current = self._read_meta(connection, "revision")
            return _EventBatch(
                events=events,
                after_id=max(after_id, int(newest_id[0]) if newest_id else 0),
                floor_revision=max(floor_revision, current + 1),
                full=False,
            )

        return self._read(body)

    # -- writes

    def put(self, key: str, value: bytes, lease: int, now: float) -> tuple[int, _Keys]:
        def body(connection: sqlite3.Connection, revisions: _Revisions) -> int:
            self._put(connection, revisions, key, value, lease, now)
            return revisions.current

        return self._write(body, now)

    def delete(self, key: str, prefix: bool, now: float) -> tuple[int, _Keys]:
        def body(connection: sqlite3.Connection, revisions: _Revisions) -> int:
            return self._delete(connection, revisions, key, prefix)

        return self._write(body, now)

    def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp],
        now: float,
    ) -> tuple[TxnResult, _Keys]:
        def body(connection: sqlite3.Connection, revisions: _Revisions) -> TxnResult:
            succeeded = all(
                compare_holds(compare, self._get(connection, compare.key)) for compare in compares
            )
            responses: list[list[KeyValue] | int | KeyValue | None] = []
            for op in success if succeeded else failure:
                if isinstance(op, Put):
                    responses.append(
                        self._put(connection, revisions, op.key, bytes(op.value), op.lease, now)
                    )
                elif isinstance(op, Delete):
                    responses.append(self._delete(connection, revisions, op.key, op.prefix))
                elif op.prefix:
                    responses.append(
                        self._range_current(connection, op.key, revisions.current, 0, None).kvs
                    )
                else:
                    found = self._get(connection, op.key)
                    responses.append([found] if found else [])
            return TxnResult(succeeded=succeeded, revision=revisions.current, responses=responses)

        return self._write(body, now)

    def _put(
        self,
        connection: sqlite3.Connection,
        revisions: _Revisions,
        key: str,
        value: bytes,
        lease: int,
        now: float,
    ) -> KeyValue | None:
        if lease:
            row = connection.execute(
                "SELECT deadline FROM leases WHERE id = ?", (lease,)
            ).fetchone()
            if row is None or row[0] <= now:
                raise LeaseNotFoundError(lease)
        previous_row = connection.execute(
            f"SELECT {_KV_COLUMNS}, event_id FROM kv WHERE key = ?", (key,)
        ).fetchone()
        revision = revisions.for_change()
        revisions.keys.append(key)
        if previous_row is None:
            previous, create_revision, version, previous_event = None, revision, 1, None
        else:
            previous = _kv_from_row(previous_row)
            create_revision, version = previous.create_revision, previous.version + 1
            previous_event = previous_row[6]
        event_id = connection.execute(
            "INSERT INTO events(revision, kind, key, value, create_revision, version, lease, "
            "prev_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (revision, _PUT, key, value, create_revision, version, lease, previous_event),
        ).lastrowid
        connection.execute(
            "INSERT OR REPLACE INTO kv(key, value, create_revision, mod_revision, version, lease, "
            "event_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, value, create_revision, revision, version, lease, event_id),
        )
        return previous

    def _delete(
        self, connection: sqlite3.Connection, revisions: _Revisions, key: str, prefix: bool
    ) -> int:
        if prefix:
            where, params = _key_range_sql("key", key)
        else:
            where, params = "key = ?", [key]
        doomed = connection.execute(
            f"SELECT key, event_id FROM kv WHERE {where} ORDER BY key", params
        ).fetchall()
        if not doomed:
            return 0
        self._log_deletes(connection, revisions, doomed)
        connection.execute(f"DELETE FROM kv WHERE {where}", params)
        return len(doomed)

    @staticmethod
    def _log_deletes(
        connection: sqlite3.Connection, revisions: _Revisions, doomed: Sequence[Sequence[Any]]
    ) -> None:
        revision = revisions.for_change()
        revisions.keys.extend(key for key, _event_id in doomed)
        connection.executemany(
            "INSERT INTO events(revision, kind, key, value, create_revision, version, lease, "
            f"prev_id) VALUES (?, {_DELETE}, ?, x'', 0, 0, 0, ?)",
            [(revision, key, event_id) for key, event_id in doomed],
        )

    def _revoke(self, connection: sqlite3.Connection, revisions: _Revisions, lease: int) -> None:
        doomed = connection.execute(
            "SELECT key, event_id FROM kv WHERE lease = ? ORDER BY key", (lease,)
        ).fetchall()
        if doomed:
            self._log_deletes(connection, revisions, doomed)
            connection.execute("DELETE FROM kv WHERE lease = ?", (lease,))
            revisions.end_group()
        connection.execute("DELETE FROM leases WHERE id = ?", (lease,))

    def _expire_due_leases(
        self, connection: sqlite3.Connection, revisions: _Revisions, now: float
    ) -> bool:
        due = connection.execute(
            "SELECT id FROM leases WHERE deadline <= ? ORDER BY deadline, id", (now,)
        ).fetchall()
        for (lease,) in due:
            self._revoke(connection, revisions, lease)
        revisions.end_group()
        return bool(due)

    def has_due_leases(self, now: float) -> bool:
        return self._read(
            lambda connection: (
                connection.execute(
                    "SELECT 1 FROM leases WHERE deadline <= ? LIMIT 1", (now,)
                ).fetchone()
                is not None
            )
        )

    def expire_due_leases(self, now: float) -> _Keys:
        """Revoke every lease past its deadline; the keys that deleted (empty: none)."""
        if not self.has_due_leases(now):
            return ()
        return self._write(lambda connection, revisions: None, now)[1]

    def lease_grant(self, ttl: int, now: float) -> tuple[Lease, _Keys]:
        def body(connection: sqlite3.Connection, revisions: _Revisions) -> Lease:
            lease_id = connection.execute(
                "INSERT INTO leases(ttl, deadline) VALUES (?, ?)", (ttl, now + ttl)
            ).lastrowid
            assert lease_id is not None
            return Lease(id=lease_id, ttl=ttl)

        return self._write(body, now)

    def lease_keepalive(self, lease: int, now: float) -> tuple[int, _Keys]:
        def body(connection: sqlite3.Connection, revisions: _Revisions) -> int:
            row = connection.execute("SELECT ttl FROM leases WHERE id = ?", (lease,)).fetchone()
            if row is None:
                raise LeaseNotFoundError(lease)
            connection.execute("UPDATE leases SET deadline = ? WHERE id = ?", (now + row[0], lease))
            return int(row[0])

        return self._write(body, now)

    def lease_revoke(self, lease: int, now: float) -> tuple[None, _Keys]:
        def body(connection: sqlite3.Connection, revisions: _Revisions) -> None:
            if connection.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
                raise LeaseNotFoundError(lease)
            self._revoke(connection, revisions, lease)

        return self._write(body, now)

    def compact(self, revision: int, now: float) -> _Keys:
        """Drop history at or below `revision`; returns the keys that expiring due leases
        deleted on the way (the compaction itself changes no key)."""

        def body(connection: sqlite3.Connection, revisions: _Revisions) -> None:
            if revision > revisions.current:
                raise FutureRevisionError(
                    f"cannot compact to revision {revision}: current revision is "
                    f"{revisions.current}"
                )
            compact_revision = self._read_meta(connection, "compact_revision")
            if revision <= compact_revision:
                raise CompactedError(revision, compact_revision)
            # Keep the newest PUT of each key at or below `revision`: ranges above it and the
            # prev_kv of later events still need it.
            connection.execute(
                f"""DELETE FROM events WHERE revision <= :revision AND id NOT IN (
                        SELECT e.id FROM events e JOIN (
                            SELECT MAX(id) AS id FROM events WHERE revision <= :revision
                            GROUP BY key
                        ) newest ON e.id = newest.id
                        WHERE e.kind = {_PUT})""",
                {"revision": revision},
            )
            connection.execute(
                "UPDATE meta SET value = ? WHERE name = 'compact_revision'", (revision,)
            )

        return self._write(body, now)[1]


def _event_from_row(row: Sequence[Any]) -> Event:
    (_, revision, kind, key, value, create_revision, version, lease) = row[:8]
    previous = None
    if row[8] is not None:
        previous = KeyValue(
            key=key,
            value=row[9],
            create_revision=row[10],
            mod_revision=row[11],
            version=row[12],
            lease=row[13],
        )
    if kind == _PUT:
        kv = KeyValue(key, value, create_revision, revision, version, lease)
        return Event(EventType.PUT, kv, previous)
    return Event(EventType.DELETE, KeyValue(key, b"", 0, revision, 0, 0), previous)


# --------------------------------------------------------------------------- async shell


class _WatchStream(AsyncIterator[Event]):
    """One watch: a cursor into the event log, a buffer, and a wake-up the store sets.

    Cancel-safe: the cursor only moves after a fetch returns, and the buffered events stay
    until they are handed out, so a cancelled `anext()` neither loses nor repeats an event.
    """

    def __init__(self, store: SqliteStore, prefix: str, start_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        self._start_revision = start_revision
        self._after_id = 0
        self._floor_revision = start_revision
        self._buffer: collections.deque[Event] = collections.deque()
        self._poll_now = True
        self._ended = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def __repr__(self) -> str:
        return f"<watch {self._prefix!r} from revision {self._start_revision} on {self._store!r}>"

    @property
    def prefix(self) -> str:
        return self._prefix

    def wake_up(self, running: asyncio.AbstractEventLoop | None) -> None:
        """Called by the store (from any thread) when the event log may have grown."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        if loop is running:
            wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(wake.set)

    async def __anext__(self) -> Event:
        while not self._buffer:
            if self._ended or self._store.closed:
                self._end()
                raise StopAsyncIteration
            wake = self._register()
            if not self._poll_now:
                await wake.wait()
                self._poll_now = True
                continue
            wake.clear()  # a commit from now on wakes us again
            try:
                batch = await self._store._fetch_events(
                    self._prefix, self._start_revision, self._after_id, self._floor_revision
                )
            except StoreUnavailableError:
                if self._store.closed:
                    continue
                raise
            except CompactedError:
                self._end()
                raise
            self._after_id, self._floor_revision = batch.after_id, batch.floor_revision
            self._buffer.extend(batch.events)
            self._poll_now = batch.full
        return self._buffer.popleft()

    def _register(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._wake is None or self._loop is not loop:
            self._loop, self._wake = loop, asyncio.Event()
            self._poll_now = True
            self._store._add_watch(self)
        return self._wake

    def _end(self) -> None:
        self._ended = True
        self._buffer.clear()
        self._store._remove_watch(self)
        if self._wake is not None:
            self.wake_up(_running_loop())

    async def aclose(self) -> None:
        """Stop watching; a pending or later `anext()` raises StopAsyncIteration."""
        self._end()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class SqliteStore:
    """The SQLite backend of `Store`: in memory (one process) or on a WAL file (many processes).

    `path` is a file path or ":memory:". `clock` returns wall-clock seconds for lease
    deadlines (inject one in tests). `busy_timeout` is how long a write waits for another
    process's lock before `StoreUnavailableError`. `watch_poll_interval` is how often, while
    anything is watched, a file store checks for other processes' commits;
    `lease_check_interval` how often it looks for expired leases.

    `execution` says where SQLite calls run. "loop": on the event loop thread (the default
    for memory, which never waits for a lock). "thread": always on the store's worker thread.
    "auto" (the default for files): on the loop thread with a zero busy timeout, and on the
    worker thread (with the full busy timeout) when another process holds the lock, or for
    calls that may be long (unpaginated or large ranges, compaction). `bench/store.py`
    measured why: a thread hop per call costs about 5x in put throughput, while waiting for a
    lock on the loop thread would stall every watch and timer of the process.

    Opening a new file takes the write lock to create the schema (waiting up to
    `busy_timeout`); opening an existing store only reads. The store binds to the event loop
    that uses it; its background task (lease expiry and change polling) starts with the first
    call. Use it from one event loop at a time.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] = MEMORY_PATH,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 5.0,
        watch_poll_interval: float = 0.005,
        lease_check_interval: float = 0.1,
        execution: Literal["auto", "loop", "thread"] = "auto",
    ) -> None:
        path = os.fspath(path)
        if not isinstance(path, str) or not path:
            raise InvalidRequestError(f"path must be a file path or ':memory:', got {path!r}")
        for name, interval in (
            ("busy_timeout", busy_timeout),
            ("watch_poll_interval", watch_poll_interval),
            ("lease_check_interval", lease_check_interval),
        ):
            if not isinstance(interval, int | float) or interval < 0:
                raise InvalidRequestError(f"{name} must be a number >= 0, got {interval!r}")
        if execution not in ("auto", "loop", "thread"):
            raise InvalidRequestError(
                f"execution must be 'auto', 'loop' or 'thread', got {execution!r}"
            )
        self._in_memory = path == MEMORY_PATH
        self._engine = _Engine(path, busy_timeout=busy_timeout)
        self._clock = clock
        self._watch_poll_interval = watch_poll_interval
        self._lease_check_interval = lease_check_interval
        if execution == "auto" and self._in_memory:
            execution = "loop"
        self._execution = execution
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hn-store")
            if execution != "loop"
            else None
        )
        # Open watches by prefix (a change wakes only the prefixes it concerns).
        self._watches: dict[str, weakref.WeakSet[_WatchStream]] = {}
        # Watch polls shared until the next change (`_fetch_events`), and that change's count.
        self._polls: dict[tuple[str, int, int, int], _EventBatch] = {}
        self._poll_epoch = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._maintenance_wake: asyncio.Event | None = None

    @property
    def path(self) -> str:
        return self._engine.path

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"SqliteStore({self._engine.path!r})"

    # -- plumbing

    async def _run(self, function: Callable[..., _T], *args: Any, long: bool = False) -> _T:
        """Run one engine call where `execution` says; `long` calls go to the worker thread."""
        if self._closed:
            raise StoreUnavailableError(f"store {self._engine.location} is closed")
        self._ensure_background()
        if self._executor is None:
            return function(*args)
        if self._execution == "auto" and not long:
            try:
                return self._engine.call_no_wait(function, *args)
            except _WouldBlock:
                pass
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    async def _run_write(self, function: Callable[..., tuple[_T, _Keys]], *args: Any) -> _T:
        result, keys = await self._run(function, *args)
        if keys:
            self._notify(keys)
        return result

    def _ensure_background(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._maintenance is not None and not self._maintenance.done():
            return
        self._loop = loop
        self._maintenance_wake = asyncio.Event()
        self._maintenance = loop.create_task(self._maintain(), name=f"hn-store-{id(self):x}")

    def _notify(self, keys: Collection[str] | None = None) -> None:
        """The event log may have grown: forget the shared poll results, and wake (each on its
        own loop) the watches whose prefix one of `keys` is under; every watch when the keys
        are not known (another process's commit, closing)."""
        self._poll_epoch += 1
        self._polls.clear()
        running = _running_loop()
        for prefix, streams in list(self._watches.items()):
            if keys is None or any(key.startswith(prefix) for key in keys):
                for stream in list(streams):
                    stream.wake_up(running)

    async def _fetch_events(
        self, prefix: str, start_revision: int, after_id: int, floor_revision: int
    ) -> _EventBatch:
        """One watch poll. Watches of one prefix at the same place in the log (every watch
        that has caught up) share one query until the next change: a commit seen by a thousand
        watches of a prefix costs one read, as a server fanning one event out to its watchers
        does. The shared result is dropped by `_notify`, before any watch is woken."""
        if after_id and start_revision <= floor_revision:
            # Every event after `after_id` is at or above the floor, so the start revision
            # filters nothing: watches that started at different revisions share the poll.
            start_revision = 0
        poll = (prefix, start_revision, after_id, floor_revision)
        batch = self._polls.get(poll)
        if batch is None:
            epoch = self._poll_epoch
            batch = await self._run(
                self._engine.fetch_events,
                prefix,
                start_revision,
                after_id,
                floor_revision,
                _WATCH_BATCH,
            )
            if epoch == self._poll_epoch:  # else the log grew meanwhile: the batch may be stale
                self._polls[poll] = batch
        return batch

    def _add_watch(self, stream: _WatchStream) -> None:
        self._watches.setdefault(stream.prefix, weakref.WeakSet()).add(stream)
        if self._maintenance_wake is not None and self._loop is _running_loop():
            self._maintenance_wake.set()  # start polling for other processes' commits

    def _remove_watch(self, stream: _WatchStream) -> None:
        streams = self._watches.get(stream.prefix)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._watches[stream.prefix]

    async def _maintain(self) -> None:
        """Per-process background work: lease expiry, and noticing other processes' commits."""
        loop = asyncio.get_running_loop()
        wake = self._maintenance_wake
        assert wake is not None
        next_lease_check = 0.0
        while not self._closed:
            polling = any(self._watches.values()) and not self._in_memory
            if polling and self._engine.changed_elsewhere():
                self._notify()
            if loop.time() >= next_lease_check:
                next_lease_check = loop.time() + self._lease_check_interval
                try:
                    expired = await self._run(self._engine.expire_due_leases, self._clock())
                    if expired:
                        self._notify(expired)
                except StoreError as error:
                    if self._closed:
                        return
                    _log.warning("lease expiry check failed: %s", error)
            if polling:
                timeout = self._watch_poll_interval
            else:
                timeout = max(0.0, next_lease_check - loop.time())
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout)

    # -- Store protocol

    async def current_revision(self) -> int:
        return await self._run(self._engine.current_revision)

    async def get(self, key: str) -> KeyValue | None:
        return await self._run(self._engine.get, check_key(key))

    async def range(
        self,
        prefix: str,
        *,
        revision: int | None = None,
        limit: int = 0,
        start_after: str | None = None,
    ) -> RangeResult:
        """Keys starting with `prefix`, sorted, at `revision` (None or 0: now); limit 0 = all.

        `count` is the number of keys under `prefix` at that revision, whatever `limit` and
        `start_after` say; `more` is True when keys remain after the last one returned.
        """
        check_prefix(prefix)
        if revision is not None:
            check_int(revision, "revision", minimum=0)
        check_int(limit, "limit", minimum=0)
        if start_after is not None:
            check_prefix(start_after, "start_after")
        return await self._run(
            self._engine.range,
            prefix,
            revision,
            limit,
            start_after,
            long=limit == 0 or limit > _LONG_RANGE_LIMIT,
        )

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        check_key(key)
        data = check_value(value, f"value (key {key!r})")
        check_int(lease, "lease", minimum=0)
        return await self._run_write(self._engine.put, key, data, lease, self._clock())

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        if prefix:
            check_prefix(key, "key")
        else:
            check_key(key)
        return await self._run_write(self._engine.delete, key, bool(prefix), self._clock())

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult:
        checked_compares = [check_compare(compare) for compare in compares]
        checked_success = check_ops(success, "success")
        checked_failure = check_ops(failure, "failure")
        return await self._run_write(
            self._engine.txn, checked_compares, checked_success, checked_failure, self._clock()
        )

    def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[Event]:
        """Every event under `prefix` from `start_revision` on, in order, exactly once.

        The iterator ends when the store closes or `aclose()` is called; resume after a
        disconnect with last revision + 1. It raises CompactedError if history it still needs
        has been compacted. Cancelling a pending `anext()` (e.g. a timeout) loses nothing.
        """
        check_prefix(prefix)
        check_int(start_revision, "start_revision", minimum=1)
        return _WatchStream(self, prefix, start_revision)

    async def lease_grant(self, ttl: int) -> Lease:
        check_int(ttl, "ttl", minimum=1)
        return await self._run_write(self._engine.lease_grant, ttl, self._clock())

    async def lease_keepalive(self, lease_id: int) -> int:
        check_int(lease_id, "lease_id", minimum=1)
        return await self._run_write(self._engine.lease_keepalive, lease_id, self._clock())

    async def lease_revoke(self, lease_id: int) -> None:
        check_int(lease_id, "lease_id", minimum=1)
        await self._run_write(self._engine.lease_revoke, lease_id, self._clock())

    async def compact(self, revision: int) -> None:
        check_int(revision, "revision", minimum=1)
        expired = await self._run(self._engine.compact, revision, self._clock(), long=True)
        self._notify(expired)  # also drops shared polls that predate the compaction

    async def close(self) -> None:
        """Stop the background task, end every watch iterator, close the database."""
        if self._closed:
            return
        self._closed = True
        self._notify()
        task = self._maintenance
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._executor is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._engine.close)
            self._executor.shutdown(wait=False)
        else:
            self._engine.close()
