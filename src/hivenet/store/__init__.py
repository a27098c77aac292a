"""HiveNet store package: the `Store` protocol's types, its backends, and `open_store(url)`.

This module owns the URL scheme that picks a backend. It must not hold backend logic (that
lives in `sqlite.py` and `etcd.py`) nor topology typing (`topology.py`).

URLs:
- `memory://` or `sqlite:///:memory:`: a private in-memory SQLite store (one process).
- `sqlite:///abs/path.db`: a SQLite WAL file shared by every process on the machine. The part
  after `sqlite://` is an absolute path; `sqlite:////abs/path.db` means the same file.
- `etcd://host:port,host:port`: an etcd v3 cluster (`etcd.EtcdStore`), failing over between
  the endpoints in the order given. `etcds://` (or any TLS option) for TLS; URL options
  `cacert`, `cert`, `key`, `user`, `password_file`, `password_env` (see `etcd_url.py`).
  Keyword options: `call_timeout`, `connect_timeout`, `range_page_size`,
  `watch_reconnect_timeout`.

Print a store URL with `redact_store_url` (a URL this module accepts holds no password, but one
it refuses may).
"""

from __future__ import annotations

from typing import Any

from hivenet.store.base import (
    CompactedError,
    Compare,
    CompareOp,
    CompareTarget,
    Delete,
    Event,
    EventType,
    FutureRevisionError,
    Get,
    InvalidRequestError,
    KeyValue,
    Lease,
    LeaseNotFoundError,
    Put,
    RangeResult,
    Store,
    StoreCorruptError,
    StoreError,
    StoreUnavailableError,
    TxnOp,
    TxnResult,
    WriteOutcome,
)
from hivenet.store.etcd_url import ETCD_SCHEMES, redact_store_url
from hivenet.store.sqlite import SqliteStore

__all__ = [
    "CompactedError",
    "Compare",
    "CompareOp",
    "CompareTarget",
    "Delete",
    "Event",
    "EventType",
    "FutureRevisionError",
    "Get",
    "InvalidRequestError",
    "KeyValue",
    "Lease",
    "LeaseNotFoundError",
    "Put",
    "RangeResult",
    "SqliteStore",
    "Store",
    "StoreCorruptError",
    "StoreError",
    "StoreUnavailableError",
    "TxnOp",
    "TxnResult",
    "WriteOutcome",
    "check_store_url",
    "open_store",
    "redact_store_url",
    "sqlite_path_from_url",
]

MEMORY_URLS = ("memory://", "sqlite:///:memory:")
SQLITE_SCHEME = "sqlite://"


def sqlite_path_from_url(url: str) -> str:
    """The database path a `sqlite://` URL names (":memory:" for the in-memory URLs)."""
    if url in MEMORY_URLS:
        return ":memory:"
    if not url.startswith(SQLITE_SCHEME + "/"):
        raise InvalidRequestError(
            f"store url {url!r} is not a sqlite URL (expected 'sqlite:///abs/path.db')"
        )
    path = "/" + url[len(SQLITE_SCHEME) :].lstrip("/")
    if path == "/" or path.endswith("/"):
        raise InvalidRequestError(f"store url {url!r} names no database file")
    return path


def check_store_url(url: str) -> None:
    """Refuse a bad store URL before anything is opened (a command checks its `--store` with
    it): InvalidRequestError naming the problem; an etcd URL's files are read and checked."""
    if not isinstance(url, str):
        raise InvalidRequestError(f"store url must be a str, got {url!r}")
    if url in MEMORY_URLS or url.startswith(SQLITE_SCHEME):
        sqlite_path_from_url(url)
        return
    if url.startswith(ETCD_SCHEMES):
        from hivenet.store.etcd_url import parse_etcd_url

        parse_etcd_url(url)
        return
    raise _unknown_scheme(url)


def _unknown_scheme(url: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"store url {redact_store_url(url)!r} has an unknown scheme; expected 'memory://', "
        "'sqlite:///abs/path.db', 'etcd://host:port,...' or 'etcds://host:port,...'"
    )


def open_store(url: str, **options: Any) -> Store:
    """Open the store a URL names. `options` go to the backend (e.g. `clock`, `busy_timeout`;
    for etcd `call_timeout`...). An etcd store connects on its first call, not here.

    Raises InvalidRequestError for an unknown URL, StoreCorruptError for a file that is not a
    HiveNet store, StoreUnavailableError for a file that cannot be opened or stays locked.
    """
    if not isinstance(url, str):
        raise InvalidRequestError(f"store url must be a str, got {url!r}")
    if url in MEMORY_URLS or url.startswith(SQLITE_SCHEME):
        return SqliteStore(sqlite_path_from_url(url), **options)
    if url.startswith(ETCD_SCHEMES):
        # Imported here: only etcd users pay for loading gRPC.
        from hivenet.store.etcd import EtcdStore
        from hivenet.store.etcd_url import parse_etcd_url

        parsed = parse_etcd_url(url)  # every file read and checked before anything connects
        return EtcdStore(list(parsed.endpoints), tls=parsed.tls, auth=parsed.auth, **options)
    raise _unknown_scheme(url)
