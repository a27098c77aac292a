"""The etcd v3 backend of the `Store` protocol: `EtcdStore`, over one or more cluster endpoints.

This module owns the mapping between the `Store` contract (`base.py`, with `sqlite.py` as the
reference implementation) and etcd's gRPC API: requests, responses, errors, deadlines, endpoint
failover and watch resumption. It must not know about topology objects, start or stop etcd
processes (`hivenet.lab.etcd` does), or keep leases alive (`leases.LeaseKeeper` does; here
`lease_keepalive` is one refresh).

Client: the protobuf messages and gRPC stubs that `aetcd` 1.0.0 ships (`aetcd.rpc`), on
`grpc.aio` channels of our own, one per endpoint. `aetcd.Client` itself is not used, because
for this contract it falls short where it matters: its range builder drops `limit` and
`revision` (no pagination, no historical reads), its compares lack the `lease` target, a client
talks to a single host:port (no failover), its shared watch multiplexer reports a lost
stream to every watch without a way to resume each one from its own revision, and it has no
TLS (insecure channels only) and authenticates once at connect, never again when the token
expires.

Security (the URL options are parsed in `etcd_url.py`): TLS channels verify each member
against the given CA bundle (`cacert`, else the system's) and present the client certificate
if one is given. With a `user`, the store gets a token from etcd's Authenticate RPC (through
whichever member it is talking to: tokens are issued through raft, so every member knows
them) and sends it as the `token` metadata of every request, watch and keepalive stream. A
rejected token (expired: etcd's simple tokens live `--auth-token-ttl` after their last use; a
restarted member; an older auth revision) is renewed and the request sent again, at most twice
per call: etcd checks the token before it acts, so this is safe for writes too. A watch whose
creation etcd 3.4 refuses with "permission denied" (what an expired token gets there) is
created again with a new token once before the refusal counts. A refused password raises
StoreUnavailableError at once, naming the user and where the password came from; a TLS
handshake failure is reported with gRPC's reason and the CA file.

Behaviour:
- Every call has a deadline (`call_timeout`, all retries included); running out of it raises
  StoreUnavailableError. Every request carries etcd's `hasleader` metadata, so a member cut off
  from its cluster refuses at once ("no leader") instead of hanging until the deadline.
- Failover: calls go to one endpoint until it fails, then to the next; writes go to the
  leader (every member's status is asked at the first write and after any failover), so a
  dead leader fails the write in flight at once instead of a follower holding it until its
  own timeout. A try of a read, or of a write that is safe to replay, gets `attempt_timeout`
  (doubling on each timeout); rounds over all endpoints pause at most 0.1 s, so a new leader
  is found within about that of its election. Reads are retried on any endpoint. A write is
  sent again when it surely was not applied (no connection, or "no leader", which etcd
  answers before looking at the request).
- A txn whose member fails mid-call: if it cannot apply twice (`_replay_guard`: its success
  branch falsifies one of its compares, `mod_revision == n` or "key absent"; its failure
  branch writes nothing), the store reads the guard key's history on a surviving member
  (once there is a leader), answers with the txn's result if it was applied (op results
  replayed on the revision before it) and sends it again if not. The one miss: a create
  applied, then deleted by someone else before the check, is sent again. Any other write
  raises StoreUnavailableError with outcome UNKNOWN naming the member; a call that found no
  member raises it with NOT_APPLIED, naming what failed ("no leader", refused endpoints).
- Large ranges are read in pages of `range_page_size` keys at the revision of the first page
  (limit + key continuation), so a big result is one consistent snapshot. `count` is the size
  of the whole prefix at that revision, also when `start_after` is given (one read-only txn).
- Watches (prev_kv on) survive the loss of their member: the stream is re-created on another
  endpoint from the revision after the last event received. etcd sends whole revisions in one
  response (no fragmenting is asked for), so nothing is lost or repeated. A start revision
  below etcd's compaction raises CompactedError. `close()` gives live watches up to 0.3 s to
  receive what was committed before it (etcd replays history to a watch that starts behind
  its head only every 100 ms), then ends them.

Where etcd and the contract differ, and what this backend does:
- A `value` compare on a missing key always fails in etcd; the contract reads a missing key as
  value b"". A txn with a value compare that b"" would satisfy is evaluated here instead: read
  the compared keys, evaluate, then run the chosen branch in a txn guarded by the keys'
  mod_revisions (retried if one changed in between), so it stays one atomic step.
- etcd keeps its compaction revision C itself readable (and the versions live at C, which
  the prev_kv of the events after C need); the contract makes C unreadable. `compact(C)`
  compacts etcd at C, and this client refuses revision C from then on. Another client finds
  C still readable, which is more history than promised, never less, so the CompactedError
  it gets for older revisions names C - 1 as the compact revision (oldest available: C).
  etcd quirk: a delete at exactly C is dropped by the compaction, so a watch from C (which
  only such another client can start) may miss it.
- etcd's compaction revision is not part of a range error; it is asked for with a watch from
  the failed revision (etcd answers such a watch with its compaction revision).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

import grpc
import grpc.aio
from aetcd import rpc

from hivenet.store.base import (
    CompactedError,
    Compare,
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
    StoreCorruptError,
    StoreError,
    StoreUnavailableError,
    TxnOp,
    TxnResult,
    WriteOutcome,
)
from hivenet.store.etcd_url import (
    ETCD_PLAIN_SCHEME,
    ETCD_TLS_SCHEME,
    EtcdAuth,
    EtcdTls,
    check_endpoint,
    parse_etcd_url,
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

__all__ = ["ETCD_SCHEME", "EtcdStore", "endpoints_from_url"]

_log = logging.getLogger(__name__)

ETCD_SCHEME: Final = ETCD_PLAIN_SCHEME
_T = TypeVar("_T")

# etcd's metadata asking a member to refuse when it has no leader (clientv3.WithRequireLeader).
_REQUIRE_LEADER: Final = (("hasleader", "true"),)
_ALL_KEYS: Final = b"\0"  # as key and range_end: every key
_MAX_LEASE_TTL: Final = 9_000_000_000  # etcd's MaxLeaseTTL (seconds)
_WATCH_HIGH_WATER: Final = 4096  # buffered events at which a watch stops reading its stream
_WATCH_LOW_WATER: Final = 1024
_COMPACT_PROBE_TIMEOUT: Final = 1.0  # etcd reports a compacted watch within ~100 ms
_CANCEL_SETTLE_SECONDS: Final = 0.02
# How long stopping a watch waits for its reader task to end after cancelling it and its call.
_WATCH_STOP_TIMEOUT: Final = 2.0
# On close, how long live watches may take to receive what was committed before it (a watch
# that started behind the head is caught up by etcd only every 100 ms).
_CLOSE_GRACE_SECONDS: Final = 0.3
_ETCD_REPLAY_PERIOD: Final = 0.15  # etcd replays history to lagging watches every 100 ms
_CATCH_UP_POLL_SECONDS: Final = 0.02
_BACKOFF_FIRST: Final = 0.02
_BACKOFF_MAX: Final = 0.5
# Between rounds of a call: short, so a call finds a newly elected leader within ~0.1 s.
_CALL_BACKOFF_MAX: Final = 0.1
# How long the probe for the leader (Maintenance.Status on every member at once) may take.
_LEADER_PROBE_TIMEOUT: Final = 0.25
# How long the call that asks a failed channel why may take (it fails at once).
_FAILURE_PROBE_TIMEOUT: Final = 0.5

_CHANNEL_OPTIONS: Final = (
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Come back quickly after a member restarts (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Notice a silent member while a call or watch is open; etcd refuses pings more often
    # than every 5 s, so the interval stays at 10 s and a silent member is given up after 2 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 2_000),
)

_COMPARE_TARGETS: Final = {
    "value": rpc.Compare.VALUE,
    "version": rpc.Compare.VERSION,
    "create_revision": rpc.Compare.CREATE,
    "mod_revision": rpc.Compare.MOD,
    "lease": rpc.Compare.LEASE,
}
_COMPARE_RESULTS: Final = {
    "==": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}

# etcd's error texts (api/v3rpc/rpctypes) that pick a StoreError type.
_ERR_COMPACTED: Final = "required revision has been compacted"
_ERR_FUTURE: Final = "required revision is a future revision"
_ERR_LEASE_NOT_FOUND: Final = "requested lease not found"
_ERR_NO_LEADER: Final = "etcdserver: no leader"
_ERR_TOO_MANY_REQUESTS: Final = "etcdserver: too many requests"
# Answers that mean "authenticate again": the token expired (etcd's simple tokens live
# `--auth-token-ttl` seconds after their last use; a restarted member forgets them), or the
# auth store changed since it was issued; "user name is empty": a request went without one.
_ERR_TOKEN_REJECTED: Final = (
    "etcdserver: invalid auth token",
    "etcdserver: revision of auth store is old",
    "etcdserver: user name is empty",
)
_ERR_AUTH_FAILED: Final = "etcdserver: authentication failed"
_ERR_AUTH_NOT_ENABLED: Final = "etcdserver: authentication is not enabled"
_ERR_PERMISSION_DENIED: Final = "etcdserver: permission denied"
# Token refreshes one call may make before etcd's refusal is taken as the answer.
_MAX_REAUTHENTICATIONS: Final = 2
# gRPC texts for a call that never left this process (no connection to the member).
_NOT_SENT_MARKERS: Final = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "dns resolution failed",
    "handshake",  # TLS: the connection never carried a request
    "certificate",
)


# --------------------------------------------------------------------------- URLs and bytes


def endpoints_from_url(url: str) -> list[str]:
    """The `host:port` endpoints of `etcd://host:port,host:port` (IPv6 as `[addr]:port`)."""
    return list(parse_etcd_url(url).endpoints)


def _encode(text: str) -> bytes:
    return text.encode("utf-8")


def _decode(raw: bytes) -> str:
    # Keys other clients wrote need not be UTF-8; surrogateescape keeps them round-trippable.
    return raw.decode("utf-8", "surrogateescape")


def _prefix_range(prefix: str) -> tuple[bytes, bytes]:
    """etcd's [key, range_end) for every key starting with `prefix` ("" = every key)."""
    start = _encode(prefix)
    if not start:
        return _ALL_KEYS, _ALL_KEYS
    end = bytearray(start)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return start, _ALL_KEYS  # no key is greater than every 0xff... string: no upper bound
    end[-1] += 1
    return start, bytes(end)


def _key_value(kv: Any) -> KeyValue:
    return KeyValue(
        key=_decode(kv.key),
        value=bytes(kv.value),
        create_revision=kv.create_revision,
        mod_revision=kv.mod_revision,
        version=kv.version,
        lease=kv.lease,
    )


def _event(event: Any) -> Event:
    kind = EventType.DELETE if event.type == rpc.Event.DELETE else EventType.PUT
    prev_kv = _key_value(event.prev_kv) if event.HasField("prev_kv") else None
    return Event(kind, _key_value(event.kv), prev_kv)


def _compare_message(compare: Compare) -> Any:
    message = rpc.Compare(
        key=_encode(compare.key),
        target=_COMPARE_TARGETS[compare.target],
        result=_COMPARE_RESULTS[compare.op],
    )
    try:
        if compare.target == "value":
            message.value = bytes(compare.value)
        elif compare.target == "version":
            message.version = compare.value
        elif compare.target == "create_revision":
            message.create_revision = compare.value
        elif compare.target == "mod_revision":
            message.mod_revision = compare.value
        else:
            message.lease = compare.value
    except ValueError as error:  # protobuf: outside int64
        raise InvalidRequestError(
            f"compare.value {compare.value!r} (key {compare.key!r}) does not fit etcd's int64"
        ) from error
    return message


def _request_op(op: TxnOp) -> Any:
    if isinstance(op, Put):
        return rpc.RequestOp(
            request_put=rpc.PutRequest(
                key=_encode(op.key), value=bytes(op.value), lease=op.lease, prev_kv=True
            )
        )
    key, range_end = _prefix_range(op.key) if op.prefix else (_encode(op.key), b"")
    if isinstance(op, Delete):
        return rpc.RequestOp(
            request_delete_range=rpc.DeleteRangeRequest(key=key, range_end=range_end)
        )
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=range_end))


def _op_result(op: TxnOp, response: Any) -> list[KeyValue] | int | KeyValue | None:
    if isinstance(op, Put):
        put = response.response_put
        return _key_value(put.prev_kv) if put.HasField("prev_kv") else None
    if isinstance(op, Delete):
        return int(response.response_delete_range.deleted)
    return [_key_value(kv) for kv in response.response_range.kvs]


def _check_lease_id(value: object, field: str) -> int:
    lease_id = check_int(value, field, minimum=1)
    if lease_id >= 2**63:
        raise InvalidRequestError(f"{field} must fit etcd's int64, got {value!r}")
    return lease_id


def _leases_in(ops: Iterable[TxnOp]) -> list[int]:
    return sorted({op.lease for op in ops if isinstance(op, Put) and op.lease})


# --------------------------------------------------------------------------- errors


class _NotConnected(Exception):
    """No connection to an endpoint; nothing was sent."""


class _StreamLost(Exception):
    """An established watch stream broke; resume it elsewhere."""


class _TokenRejected(Exception):
    """etcd refused a watch's auth token; create the stream again with a new one."""


class _EtcdCompacted(StoreError):
    """etcd said "compacted" without saying where; the caller raises the full CompactedError."""


def _details(error: grpc.aio.AioRpcError) -> str:
    return error.details() or error.code().name


def _token_rejected(error: grpc.aio.AioRpcError) -> bool:
    """etcd refused the request's token (expired, or from an older auth store): it did not act
    on it (the token is checked before a write is proposed, and again before it applies)."""
    details = _details(error)
    return any(marker in details for marker in _ERR_TOKEN_REJECTED)


def _was_not_sent(error: grpc.aio.AioRpcError) -> bool:
    """True when etcd surely did not act on the request (it is safe to send it again)."""
    details = _details(error)
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        lowered = details.lower()
        return details == _ERR_NO_LEADER or any(marker in lowered for marker in _NOT_SENT_MARKERS)
    return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and details == _ERR_TOO_MANY_REQUESTS


def _is_transient(error: grpc.aio.AioRpcError) -> bool:
    """An error another endpoint (or a later try) may not have: the member or the connection
    failed, not the request. etcd's own answers start with "etcdserver:"; a connection that
    breaks under a call (a member killed) surfaces as INTERNAL or UNKNOWN without it."""
    code = error.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return True
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return not _details(error).startswith("etcdserver:")
    return _was_not_sent(error)


def _translate(error: grpc.aio.AioRpcError, what: str, *, lease_id: int = 0) -> StoreError:
    """The StoreError for a definitive etcd answer (not a transport problem)."""
    code, details = error.code(), _details(error)
    message = f"{what}: {details}"
    if _ERR_COMPACTED in details:
        return _EtcdCompacted(message)
    if _ERR_FUTURE in details:
        return FutureRevisionError(message)
    if _ERR_LEASE_NOT_FOUND in details:
        return LeaseNotFoundError(lease_id)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return InvalidRequestError(message)
    if code == grpc.StatusCode.DATA_LOSS:
        return StoreCorruptError(message)
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    ):
        return StoreUnavailableError(message)
    return StoreError(f"{message} (gRPC {code.name})")


def _backoff(failures_in_a_row: int, endpoint_count: int, maximum: float = _BACKOFF_MAX) -> float:
    """No pause while untried endpoints remain, then growing pauses between rounds."""
    rounds = failures_in_a_row - endpoint_count
    return 0.0 if rounds < 0 else min(maximum, _BACKOFF_FIRST * 2**rounds)


class _MidCallFailure(Exception):
    """A write reached `member`, which failed before answering: it may have been applied."""

    def __init__(self, member: str, details: str, *, timed_out: bool = False) -> None:
        # A member that times out is alive but could not commit (its leader is gone): say so,
        # so that an operator does not look for the fault there.
        happened = "did not answer in time" if timed_out else "failed mid-call"
        super().__init__(f"{member} {happened} ({details})")
        self.member = member
        self.details = details


def _replay_guard(compares: Sequence[Compare], success: Sequence[TxnOp]) -> tuple[str, int] | None:
    """(key, mod_revision) of a compare that the txn's own success branch falsifies for good,
    so that etcd refuses a second application of it; None when there is none.

    `mod_revision == n` (n > 0) on a key the branch puts or deletes: revisions never come
    back. `mod_revision == 0` / `create_revision == 0` (the key is absent) on a key the branch
    puts: a second application needs someone to delete the key in between (the one case a
    replay can repeat; see the module docstring). Prefix ops are not followed (their keys are
    not known in advance).
    """
    if any(isinstance(op, Delete | Get) and op.prefix for op in success):
        return None
    written = {op.key for op in success if isinstance(op, Put | Delete)}
    put_keys = {op.key for op in success if isinstance(op, Put)}
    absent_guard: tuple[str, int] | None = None
    for compare in compares:
        if compare.op != "==" or compare.key not in written or not isinstance(compare.value, int):
            continue
        if compare.target == "mod_revision" and compare.value > 0:
            return compare.key, compare.value
        if (
            compare.target in ("mod_revision", "create_revision")
            and compare.value == 0
            and compare.key in put_keys
            and absent_guard is None
        ):
            absent_guard = compare.key, 0
    return absent_guard


# --------------------------------------------------------------------------- endpoints


class _Endpoint:
    """One member's address, its gRPC channel (opened on first use; TLS when `tls` is given)
    and the stubs on it."""

    def __init__(self, address: str, tls: EtcdTls | None = None) -> None:
        self.address = address
        self.tls = tls
        self.channel: grpc.aio.Channel | None = None
        self.kv: Any = None
        self.lease: Any = None
        self.watch: Any = None
        self.maintenance: Any = None
        self.auth: Any = None

    def open(self) -> grpc.aio.Channel:
        if self.channel is None:
            if self.tls is None:
                self.channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
            else:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=self.tls.ca_pem,
                    private_key=self.tls.key_pem,
                    certificate_chain=self.tls.cert_pem,
                )
                self.channel = grpc.aio.secure_channel(
                    self.address, credentials, options=_CHANNEL_OPTIONS
                )
            self.kv = rpc.KVStub(self.channel)
            self.lease = rpc.LeaseStub(self.channel)
            self.watch = rpc.WatchStub(self.channel)
            self.maintenance = rpc.MaintenanceStub(self.channel)
            self.auth = rpc.AuthStub(self.channel)
        return self.channel

    async def connect(self, timeout: float) -> None:
        """Wait until the channel is READY; _NotConnected as soon as it fails or on timeout."""
        channel = self.open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        state = channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state in (
                grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                grpc.ChannelConnectivity.SHUTDOWN,
            ):
                raise _NotConnected(f"{self.address}: {await self._failure_reason()}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _NotConnected(f"{self.address}: no connection within {timeout:g}s")
            try:
                await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
            except TimeoutError:
                raise _NotConnected(f"{self.address}: no connection within {timeout:g}s") from None
            state = channel.get_state(try_to_connect=True)

    async def _failure_reason(self) -> str:
        """Why the channel failed (gRPC tells it only to a call: one that fails at once)."""
        try:
            await self.maintenance.Status(rpc.StatusRequest(), timeout=_FAILURE_PROBE_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            reason = _details(error)
            if self.tls is None:
                return reason
            if "handshake" in reason.lower() or "ssl" in reason.lower():
                return f"TLS handshake failed (CA {self.tls.ca_source!r}): {reason}"
            if "TSI_DATA_CORRUPTED" in reason or "unwrap failed" in reason.lower():
                # What gRPC reports when the member ends the TLS session with an alert.
                given = "a client certificate" if self.tls.cert_pem else "no client certificate"
                return (
                    f"the member closed the TLS connection: it refused the client certificate "
                    f"(this store gives {given}; options cert and key): {reason}"
                )
            return reason
        return "cannot connect"

    async def close(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close()


# --------------------------------------------------------------------------- the store


class EtcdStore:
    """The `Store` protocol on an etcd v3 cluster (etcd 3.4+), over `endpoints` (`host:port`).

    `call_timeout` bounds every call, retries and failover included. `connect_timeout` is how
    long one endpoint may take to accept a connection before the next one is tried.
    `attempt_timeout` is how long one try of a read, or of a write that is safe to replay, may
    take on one member before the call moves on (it doubles after each such timeout within a
    call, so a slow but healthy store still answers); a member whose leader just died holds a
    request until its own timeout, and this keeps the call from waiting for it.
    `range_page_size` is the most keys one range request asks etcd for. `watch_reconnect_timeout`
    is how long a watch keeps trying to re-create its stream (on any endpoint) before its
    iterator raises StoreUnavailableError; resume it with the last revision + 1.

    Nothing connects until the first call. The store binds to the event loop of its first
    call; close it on that loop.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        call_timeout: float = 5.0,
        connect_timeout: float = 1.0,
        attempt_timeout: float = 0.5,
        range_page_size: int = 1000,
        watch_reconnect_timeout: float = 10.0,
        tls: EtcdTls | None = None,
        auth: EtcdAuth | None = None,
    ) -> None:
        if isinstance(endpoints, str) or not isinstance(endpoints, Sequence) or not endpoints:
            raise InvalidRequestError(
                f"endpoints must be a non-empty list of 'host:port', got {endpoints!r}"
            )
        checked = [
            check_endpoint(str(endpoint), ETCD_SCHEME + ",".join(map(str, endpoints)))
            for endpoint in endpoints
        ]
        for name, seconds in (
            ("call_timeout", call_timeout),
            ("connect_timeout", connect_timeout),
            ("attempt_timeout", attempt_timeout),
            ("watch_reconnect_timeout", watch_reconnect_timeout),
        ):
            if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
                raise InvalidRequestError(
                    f"{name} must be a number of seconds > 0, got {seconds!r}"
                )
        check_int(range_page_size, "range_page_size", minimum=1)
        if tls is not None and not isinstance(tls, EtcdTls):
            raise InvalidRequestError(f"tls must be an EtcdTls, got {tls!r}")
        if auth is not None and not isinstance(auth, EtcdAuth):
            raise InvalidRequestError(f"auth must be an EtcdAuth, got {auth!r}")
        self._tls = tls
        self._auth = auth
        if auth is not None and tls is None:
            _log.warning(
                "etcd user %r over plaintext: its password and token cross the network in "
                "clear (use etcds:// or cacert=)",
                auth.user,
            )
        # etcd's auth token for `auth` (None: none asked for yet; "": etcd has auth off).
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        self.authentications = 0  # tokens etcd issued to this store (observability, tests)
        self._endpoints = [_Endpoint(address, tls) for address in checked]
        self._current = 0
        self._call_timeout = float(call_timeout)
        self._connect_timeout = float(connect_timeout)
        self._attempt_timeout = float(attempt_timeout)
        # The endpoint of the member that said it leads (writes go there first), and whether
        # to ask again before the next write (at the start, and after any failover).
        self._leader: str | None = None
        self._leader_unknown = True
        # The highest store revision any answer carried: a txn sent now applies above it.
        self._seen_revision = 0
        self._page_size = range_page_size
        self._watch_reconnect_timeout = float(watch_reconnect_timeout)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watches: set[_EtcdWatch] = set()
        self._streams_opened = 0  # watch, keepalive and probe streams (see close())
        # The highest revision this client compacted to under the contract's rule (see the
        # module docstring): revisions <= it are refused even where etcd still has them.
        self._compacted_through = 0

    @property
    def endpoints(self) -> list[str]:
        return [endpoint.address for endpoint in self._endpoints]

    @property
    def tls(self) -> EtcdTls | None:
        return self._tls

    @property
    def auth(self) -> EtcdAuth | None:
        return self._auth

    @property
    def current_endpoint(self) -> str:
        """The endpoint the next call goes to first (it moves on failover)."""
        return self._endpoints[self._current].address

    @property
    def leader_endpoint(self) -> str | None:
        """The endpoint of the member that last said it is the leader (None: none did yet)."""
        return self._leader

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        scheme = ETCD_TLS_SCHEME if self._tls is not None else ETCD_PLAIN_SCHEME
        user = f", user={self._auth.user!r}" if self._auth is not None else ""
        return f"EtcdStore({scheme + ','.join(self.endpoints)!r}{user})"

    # -- authentication

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of every request: `hasleader`, and the auth token once there is one."""
        if self._token:
            return (*_REQUIRE_LEADER, ("token", self._token))
        return _REQUIRE_LEADER

    async def _authenticate(self, endpoint: _Endpoint, timeout: float) -> None:
        """Get a token for `auth` from `endpoint` unless there is one. Concurrent callers wait
        for one Authenticate (etcd checks a bcrypt hash for each: costly). A refused password
        raises StoreUnavailableError at once (no other member would say otherwise)."""
        if self._auth is None or self._token is not None:
            return
        async with self._auth_lock:
            if self._token is not None:
                return
            request = rpc.AuthenticateRequest(name=self._auth.user, password=self._auth.password)
            try:
                response = await endpoint.auth.Authenticate(
                    request, timeout=timeout, metadata=_REQUIRE_LEADER
                )
            except grpc.aio.AioRpcError as error:
                details = _details(error)
                if _ERR_AUTH_NOT_ENABLED in details:
                    _log.warning(
                        "%r: etcd has authentication off; user %r is not used",
                        self,
                        self._auth.user,
                    )
                    self._token = ""
                    return
                if _ERR_AUTH_FAILED in details:
                    raise StoreUnavailableError(
                        f"etcd at {endpoint.address} refused user {self._auth.user!r} with the "
                        f"password from {self._auth.source}: {details}",
                        failed=f"authentication of user {self._auth.user!r}",
                    ) from error
                raise
            self._token = str(response.token)
            self.authentications += 1

    def _drop_token(self, used: str | None) -> None:
        """etcd rejected token `used`: the next call authenticates again (unless another call
        already did)."""
        if self._auth is not None and used and self._token == used:
            self._token = None

    # -- plumbing

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise StoreError(f"{self!r} is bound to the event loop of its first call")
        return loop

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise StoreUnavailableError(f"{what}: store {self!r} is closed")

    def _move_on_from(self, index: int) -> None:
        """Endpoint `index` failed: later calls start with the next one (unless moved already)."""
        if self._current == index:
            self._current = (index + 1) % len(self._endpoints)

    def _member_name(self, endpoint: _Endpoint) -> str:
        return (
            f"{endpoint.address} (the leader)"
            if endpoint.address == self._leader
            else (endpoint.address)
        )

    async def _point_at_leader(self, deadline: float) -> None:
        """Make the leader the current endpoint, if a member says it leads (every member is
        asked at once, briefly): a write sent to the leader fails at once when it dies, while
        a follower would hold it until its own timeout."""
        loop = asyncio.get_running_loop()
        timeout = min(_LEADER_PROBE_TIMEOUT, deadline - loop.time())
        if timeout <= 0:
            return

        async def status(endpoint: _Endpoint) -> Any:
            try:
                await endpoint.connect(timeout)
                return await endpoint.maintenance.Status(rpc.StatusRequest(), timeout=timeout)
            except (_NotConnected, grpc.aio.AioRpcError):
                return None

        answers = await asyncio.gather(*(status(endpoint) for endpoint in self._endpoints))
        self._leader_unknown = True
        for index, answer in enumerate(answers):
            if answer is not None and answer.leader and answer.leader == answer.header.member_id:
                self._current = index
                self._leader = self._endpoints[index].address
                self._leader_unknown = False
                return
        # No member leads now (an election): `_leader` keeps naming the last one that did.

    def _unavailable(self, what: str, problems: dict[str, str]) -> StoreUnavailableError:
        """No member answered in time, and nothing was sent that could have been applied."""
        if problems and all(_ERR_NO_LEADER in problem for problem in problems.values()):
            failed = "no leader (the members are electing one)"
        else:
            failed = "; ".join(
                f"{address}{' (the leader)' if address == self._leader else ''}: {problem}"
                for address, problem in problems.items()
            )
        return StoreUnavailableError(
            f"{what}: no etcd member of {self.endpoints} answered within "
            f"{self._call_timeout:g}s ({failed or 'no endpoint tried'}); not applied",
            outcome=WriteOutcome.NOT_APPLIED,
            failed=failed,
        )

    async def _call(
        self,
        what: str,
        attempt: Callable[[_Endpoint, float], Awaitable[_T]],
        *,
        mutating: bool,
        replay_safe: bool = False,
        lease_id: int = 0,
        deadline: float | None = None,
    ) -> _T:
        """Run `attempt(endpoint, timeout)` with failover until it answers or the deadline
        (loop time; default: `call_timeout` from now).

        Reads go to the next endpoint after any transport error; writes only after errors that
        prove the request was not acted on (see the module docstring). A write that fails
        mid-call raises _MidCallFailure when `replay_safe` (the caller finds out what became of
        it), else StoreUnavailableError with outcome UNKNOWN.
        """
        self._check_open(what)
        loop = self._bind_loop()
        if deadline is None:
            deadline = loop.time() + self._call_timeout
        if mutating and self._leader_unknown:
            await self._point_at_leader(deadline)
        failures_in_a_row = 0
        timeouts = 0
        reauthentications = 0
        token: str | None = None
        problems: dict[str, str] = {}
        while True:
            if deadline - loop.time() <= 0:
                raise self._unavailable(what, problems)
            index = self._current
            endpoint = self._endpoints[index]
            try:
                await endpoint.connect(
                    min(self._connect_timeout, max(deadline - loop.time(), 0.001))
                )
                try:
                    await self._authenticate(endpoint, max(deadline - loop.time(), 0.001))
                except grpc.aio.AioRpcError as error:  # the request itself was not sent
                    raise _NotConnected(
                        f"{endpoint.address}: authenticate: {_details(error)}"
                    ) from error
                token = self._token
                budget = deadline - loop.time()
                attempt_timeout = (
                    budget
                    if mutating and not replay_safe
                    else min(budget, self._attempt_timeout * 2**timeouts)
                )
                result = await attempt(endpoint, max(attempt_timeout, 0.001))
                if failures_in_a_row:
                    self._leader_unknown = True  # it moved: find the leader before a write
                return result
            except _NotConnected as problem:
                problems[endpoint.address] = str(problem).removeprefix(f"{endpoint.address}: ")
            except grpc.aio.AioRpcError as error:
                if self._closed:
                    raise StoreUnavailableError(f"{what}: store {self!r} is closed") from error
                if (
                    self._auth is not None
                    and _token_rejected(error)
                    and reauthentications < _MAX_REAUTHENTICATIONS
                ):
                    reauthentications += 1
                    _log.info(
                        "%s: etcd rejected the auth token (%s); renewing it", what, _details(error)
                    )
                    self._drop_token(token)
                    continue
                if not _is_transient(error):
                    raise _translate(error, what, lease_id=lease_id) from error
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    timeouts += 1
                if mutating and not _was_not_sent(error):
                    member = self._member_name(endpoint)
                    self._move_on_from(index)
                    self._leader_unknown = True
                    if replay_safe:
                        raise _MidCallFailure(
                            member,
                            _details(error),
                            timed_out=error.code() == grpc.StatusCode.DEADLINE_EXCEEDED,
                        ) from error
                    raise StoreUnavailableError(
                        f"{what}: {member} failed mid-call ({_details(error)}); the write may "
                        "or may not have been applied: read it back",
                        outcome=WriteOutcome.UNKNOWN,
                        failed=member,
                    ) from error
                problems[endpoint.address] = _details(error)
            self._check_open(what)
            self._move_on_from(index)
            self._leader_unknown = True
            failures_in_a_row += 1
            # Every endpoint failed once: wait a little between rounds (an election takes
            # about a second; the pause stays short so its end is noticed at once).
            await asyncio.sleep(
                min(
                    _backoff(failures_in_a_row, len(self._endpoints), _CALL_BACKOFF_MAX),
                    max(0.0, deadline - loop.time()),
                )
            )

    async def _unary(
        self,
        what: str,
        stub: str,
        method: str,
        request: Any,
        *,
        mutating: bool,
        replay_safe: bool = False,
        lease_id: int = 0,
        deadline: float | None = None,
    ) -> Any:
        async def attempt(endpoint: _Endpoint, timeout: float) -> Any:
            call = getattr(getattr(endpoint, stub), method)
            return await call(request, timeout=timeout, metadata=self._metadata())

        response = await self._call(
            what,
            attempt,
            mutating=mutating,
            replay_safe=replay_safe,
            lease_id=lease_id,
            deadline=deadline,
        )
        header = getattr(response, "header", None)
        if header is not None and header.revision > self._seen_revision:
            self._seen_revision = int(header.revision)
        return response

    async def _compaction_error(self, requested: int) -> CompactedError:
        """CompactedError for `requested`, with the store's compact revision (etcd's minus one)."""
        etcd_compact_revision = await self._probe_compact_revision(requested)
        store_compact_revision = max(self._compacted_through, etcd_compact_revision - 1)
        return CompactedError(requested, max(store_compact_revision, requested))

    async def _probe_compact_revision(self, revision: int) -> int:
        """etcd's compaction revision, from the answer to a watch that starts at `revision`
        (0 if etcd does not report one in time)."""
        try:
            answer = await asyncio.wait_for(
                self._first_watch_answer("find compaction revision", _ALL_KEYS, revision),
                _COMPACT_PROBE_TIMEOUT,
            )
        except (TimeoutError, StoreError):
            return 0
        return int(answer.compact_revision) if answer is not None else 0

    async def _first_watch_answer(
        self, what: str, key: bytes, start_revision: int, *, deadline: float | None = None
    ) -> Any:
        """The first answer of a one-off watch of `key` from `start_revision` that says
        something (compacted, cancelled, or events), or None if the stream ends first."""

        async def attempt(endpoint: _Endpoint, timeout: float) -> Any:
            call = endpoint.watch.Watch(metadata=self._metadata(), timeout=timeout)
            self._streams_opened += 1
            try:
                await call.write(
                    rpc.WatchRequest(
                        create_request=rpc.WatchCreateRequest(
                            key=key, start_revision=start_revision
                        )
                    )
                )
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        return None
                    if response.compact_revision or response.canceled or response.events:
                        return response
            finally:
                call.cancel()

        return await self._call(what, attempt, mutating=False, deadline=deadline)

    async def _let_watches_catch_up(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CLOSE_GRACE_SECONDS
        try:
            head = await asyncio.wait_for(self.current_revision(), _CLOSE_GRACE_SECONDS)
        except (TimeoutError, StoreError):
            return  # the store is unreachable: nothing more will arrive anyway
        await asyncio.gather(*(watch.catch_up(head, deadline) for watch in list(self._watches)))

    def _refuse_compacted(self, revision: int) -> None:
        if 0 < revision <= self._compacted_through:
            raise CompactedError(revision, self._compacted_through)

    # -- Store protocol: reads

    async def current_revision(self) -> int:
        request = rpc.RangeRequest(key=_ALL_KEYS, keys_only=True, count_only=True)
        response = await self._unary("current revision", "kv", "Range", request, mutating=False)
        return int(response.header.revision)

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        request = rpc.RangeRequest(key=_encode(key))
        response = await self._unary(f"get {key!r}", "kv", "Range", request, mutating=False)
        return _key_value(response.kvs[0]) if response.kvs else None

    async def range(
        self,
        prefix: str,
        *,
        revision: int | None = None,
        limit: int = 0,
        start_after: str | None = None,
    ) -> RangeResult:
        """Keys starting with `prefix`, sorted, at `revision` (None or 0: now); limit 0 = all.

        Read in pages of at most `range_page_size` keys, all at the revision of the first page.
        `count` is the number of keys under `prefix` at that revision, whatever `limit` and
        `start_after` say; `more` is True when keys remain after the last one returned.
        """
        check_prefix(prefix)
        wanted_revision = 0 if revision is None else check_int(revision, "revision", minimum=0)
        check_int(limit, "limit", minimum=0)
        if start_after is not None:
            check_prefix(start_after, "start_after")
        self._refuse_compacted(wanted_revision)
        what = f"range {prefix!r}"
        key_start, range_end = _prefix_range(prefix)
        next_key = key_start
        if start_after is not None:
            next_key = max(key_start, _encode(start_after) + b"\0")
        read_revision = wanted_revision
        kvs: list[KeyValue] = []
        count: int | None = None
        try:
            while True:
                page_limit = (
                    self._page_size if not limit else min(self._page_size, limit - len(kvs))
                )
                page_request = rpc.RangeRequest(
                    key=next_key, range_end=range_end, limit=page_limit, revision=read_revision
                )
                if count is None and start_after is not None:
                    # The prefix's size and the first page, at one revision.
                    count_request = rpc.RangeRequest(
                        key=key_start, range_end=range_end, count_only=True, revision=read_revision
                    )
                    txn = rpc.TxnRequest(
                        success=[
                            rpc.RequestOp(request_range=count_request),
                            rpc.RequestOp(request_range=page_request),
                        ]
                    )
                    response = await self._unary(what, "kv", "Txn", txn, mutating=False)
                    header = response.header
                    count = int(response.responses[0].response_range.count)
                    page = response.responses[1].response_range
                else:
                    page = await self._unary(what, "kv", "Range", page_request, mutating=False)
                    header = page.header
                    if count is None:
                        count = int(page.count)
                if read_revision == 0:
                    read_revision = int(header.revision)
                kvs.extend(_key_value(kv) for kv in page.kvs)
                if not page.more or not page.kvs or (limit and len(kvs) >= limit):
                    break
                next_key = bytes(page.kvs[-1].key) + b"\0"
        except _EtcdCompacted:
            raise await self._compaction_error(read_revision) from None
        return RangeResult(kvs=kvs, revision=read_revision, more=bool(page.more), count=count)

    # -- Store protocol: writes

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        check_key(key)
        data = check_value(value, f"value (key {key!r})")
        check_int(lease, "lease", minimum=0)
        request = rpc.PutRequest(key=_encode(key), value=data, lease=lease)
        response = await self._unary(
            f"put {key!r}", "kv", "Put", request, mutating=True, lease_id=lease
        )
        return int(response.header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        if prefix:
            check_prefix(key, "key")
            start, range_end = _prefix_range(key)
        else:
            check_key(key)
            start, range_end = _encode(key), b""
        request = rpc.DeleteRangeRequest(key=start, range_end=range_end)
        response = await self._unary(f"delete {key!r}", "kv", "DeleteRange", request, mutating=True)
        return int(response.deleted)

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[TxnOp],
        failure: Sequence[TxnOp] = (),
    ) -> TxnResult:
        checked_compares = [check_compare(compare) for compare in compares]
        checked_success = check_ops(success, "success")
        checked_failure = check_ops(failure, "failure")
        for compare in checked_compares:
            _compare_message(compare)  # refuses a value outside etcd's int64 before any call
        try:
            if any(c.target == "value" and compare_holds(c, None) for c in checked_compares):
                return await self._txn_evaluated_here(
                    checked_compares, checked_success, checked_failure
                )
            return await self._send_txn(checked_compares, checked_success, checked_failure)
        except LeaseNotFoundError as error:
            if error.lease_id:
                raise
            missing = await self._missing_lease(_leases_in([*checked_success, *checked_failure]))
            raise LeaseNotFoundError(missing) from error

    async def _send_txn(
        self,
        compares: list[Compare],
        success: list[TxnOp],
        failure: list[TxnOp],
        *,
        what: str = "txn",
    ) -> TxnResult:
        """One txn, within `call_timeout`. When its member fails mid-call and the txn cannot
        apply twice (`_replay_guard`, and no writes in `failure`), find out whether it was
        applied (`_result_if_applied`): if so answer with that, else send it again; only when
        that cannot be found out in time does it raise StoreUnavailableError (UNKNOWN)."""
        request = rpc.TxnRequest(
            compare=[_compare_message(compare) for compare in compares],
            success=[_request_op(op) for op in success],
            failure=[_request_op(op) for op in failure],
        )
        guard = _replay_guard(compares, success)
        if any(isinstance(op, Put | Delete) for op in failure):
            guard = None
        self._check_open(what)
        loop = self._bind_loop()
        deadline = loop.time() + self._call_timeout
        sent_above = self._seen_revision  # where it applies, if it does, is above this
        lost: _MidCallFailure | None = None
        while True:
            response: Any = None
            try:
                response = await self._unary(
                    what,
                    "kv",
                    "Txn",
                    request,
                    mutating=True,
                    replay_safe=guard is not None,
                    deadline=deadline,
                )
            except _MidCallFailure as failure_now:
                lost = lost or failure_now
            except StoreUnavailableError as error:
                if lost is None:
                    raise
                raise self._outcome_unknown(what, lost, error) from error
            if response is not None and (response.succeeded or lost is None):
                branch = success if response.succeeded else failure
                return TxnResult(
                    succeeded=bool(response.succeeded),
                    revision=int(response.header.revision),
                    responses=[
                        _op_result(op, result)
                        for op, result in zip(branch, response.responses, strict=True)
                    ],
                )
            assert guard is not None and lost is not None
            try:
                applied = await self._result_if_applied(guard, success, sent_above, deadline)
            except StoreUnavailableError as error:
                raise self._outcome_unknown(what, lost, error) from error
            except _EtcdCompacted as error:
                raise self._outcome_unknown(
                    what, lost, f"its history is compacted ({error})"
                ) from error
            if applied is not None:
                _log.info("%s: applied at revision %d before %s", what, applied.revision, lost)
                return applied
            if response is not None:  # a replay whose compares failed, not ours: a real no
                return TxnResult(
                    succeeded=False,
                    revision=int(response.header.revision),
                    responses=[
                        _op_result(op, result)
                        for op, result in zip(failure, response.responses, strict=True)
                    ],
                )
            _log.info("%s: not applied before %s; sending it again", what, lost)

    def _outcome_unknown(
        self, what: str, lost: _MidCallFailure, why: StoreUnavailableError | str
    ) -> StoreUnavailableError:
        """The write reached `lost.member`, which failed or went silent; what kept the store
        from finding out since (`why`: what failed then, e.g. the leader and "no leader")
        is what to name."""
        failed = why.failed if isinstance(why, StoreUnavailableError) and why.failed else ""
        return StoreUnavailableError(
            f"{what}: {lost}; whether it was applied could not be found out within "
            f"{self._call_timeout:g}s ({failed or why}): read it back",
            outcome=WriteOutcome.UNKNOWN,
            failed=failed or lost.member,
        )

    async def _result_if_applied(
        self, guard: tuple[str, int], success: list[TxnOp], sent_above: int, deadline: float
    ) -> TxnResult | None:
        """The result of the txn with `success` if it was applied (None if it was not),
        judged from the history of the guard key (see `_replay_guard`): the revision at which
        the guard stopped holding, if above `sent_above` (a revision seen before the txn was
        sent), and whether every key the txn writes changed there to what it writes. (Another
        client's txn that wrote exactly the same at that revision is taken for this one: the
        store is then as if this one had been applied.)"""
        key, guarded_mod_revision = guard
        current = await self._get_by(key, deadline)
        put = next((op for op in success if isinstance(op, Put) and op.key == key), None)
        if guarded_mod_revision == 0:  # "absent": the incarnation created since, if any
            if current is None:
                return None
            candidate = current.create_revision
        elif current is not None and current.mod_revision == guarded_mod_revision:
            return None  # the guard still holds: the txn was not applied
        elif current is not None and put is not None and current.value == put.value:
            candidate = current.mod_revision
        else:
            candidate = await self._first_change_after(key, guarded_mod_revision, deadline)
        if candidate <= sent_above:
            return None  # the guard stopped holding before the txn was sent
        return await self._result_at(candidate, success, deadline)

    async def _get_by(self, key: str, deadline: float) -> KeyValue | None:
        request = rpc.RangeRequest(key=_encode(key))
        response = await self._unary(
            f"get {key!r}", "kv", "Range", request, mutating=False, deadline=deadline
        )
        return _key_value(response.kvs[0]) if response.kvs else None

    async def _first_change_after(self, key: str, revision: int, deadline: float) -> int:
        """The revision of the first put or delete of `key` after `revision` (which there is)."""
        what = f"history of {key!r} from revision {revision + 1}"
        answer = await self._first_watch_answer(what, _encode(key), revision + 1, deadline=deadline)
        if answer is None or answer.canceled:
            reason = "stream ended" if answer is None else answer.cancel_reason or "cancelled"
            raise StoreUnavailableError(f"{what}: {reason}")
        if answer.compact_revision:
            raise _EtcdCompacted(what)
        return int(answer.events[0].kv.mod_revision)

    async def _result_at(
        self, revision: int, success: list[TxnOp], deadline: float
    ) -> TxnResult | None:
        """The txn's result if every key it puts holds its value as written at `revision`
        (and every key it deletes is absent there), else None; its op results are replayed
        on the keys as they were just before."""
        keys = sorted({op.key for op in success})
        reads = [
            rpc.RequestOp(request_range=rpc.RangeRequest(key=_encode(key), revision=at))
            for at in (revision, revision - 1)
            for key in keys
        ]
        response = await self._unary(
            f"txn at revision {revision}",
            "kv",
            "Txn",
            rpc.TxnRequest(success=reads),
            mutating=False,
            deadline=deadline,
        )
        found = [
            _key_value(result.response_range.kvs[0]) if result.response_range.kvs else None
            for result in response.responses
        ]
        after = dict(zip(keys, found[: len(keys)], strict=True))
        state = dict(zip(keys, found[len(keys) :], strict=True))
        for op in success:
            written = after[op.key]
            if isinstance(op, Put) and (
                written is None
                or written.mod_revision != revision
                or written.value != op.value
                or written.lease != op.lease
            ):
                return None
            if isinstance(op, Delete) and written is not None:
                return None
        results: list[list[KeyValue] | int | KeyValue | None] = []
        for op in success:  # in order, as etcd ran them: a Get sees the puts before it
            before = state[op.key]
            if isinstance(op, Put):
                results.append(before)
                state[op.key] = after[op.key]
            elif isinstance(op, Delete):
                results.append(int(before is not None))
                state[op.key] = None
            else:
                results.append([before] if before is not None else [])
        return TxnResult(succeeded=True, revision=revision, responses=results)

    async def _txn_evaluated_here(
        self, compares: list[Compare], success: list[TxnOp], failure: list[TxnOp]
    ) -> TxnResult:
        """Evaluate `compares` on a read of their keys, then run the chosen branch guarded by
        those keys' mod_revisions; again if one changed in between (see module docstring)."""
        keys = sorted({compare.key for compare in compares})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._call_timeout
        while True:
            read = rpc.TxnRequest(
                success=[
                    rpc.RequestOp(request_range=rpc.RangeRequest(key=_encode(key))) for key in keys
                ]
            )
            response = await self._unary(
                "txn (read compared keys)", "kv", "Txn", read, mutating=False
            )
            current: dict[str, KeyValue | None] = {}
            for key, result in zip(keys, response.responses, strict=True):
                kvs = result.response_range.kvs
                current[key] = _key_value(kvs[0]) if kvs else None
            holds = all(compare_holds(compare, current[compare.key]) for compare in compares)
            branch = success if holds else failure
            guards = [
                Compare(key, "mod_revision", "==", kv.mod_revision if kv is not None else 0)
                for key, kv in current.items()
            ]
            written = await self._send_txn(guards, branch, [])
            if written.succeeded:
                return TxnResult(
                    succeeded=holds, revision=written.revision, responses=written.responses
                )
            if loop.time() > deadline:
                raise StoreUnavailableError(
                    f"txn: the compared keys {keys} kept changing for {self._call_timeout:g}s"
                )

    async def _missing_lease(self, candidates: list[int]) -> int:
        """Which of the txn's leases etcd does not know (0 if none can be named)."""
        for lease_id in candidates:
            request = rpc.LeaseTimeToLiveRequest(ID=lease_id)
            try:
                response = await self._unary(
                    f"lease {lease_id} ttl", "lease", "LeaseTimeToLive", request, mutating=False
                )
            except LeaseNotFoundError:
                return lease_id
            if response.TTL < 0:
                return lease_id
        return candidates[0] if len(candidates) == 1 else 0

    # -- Store protocol: watch

    def watch(self, prefix: str, *, start_revision: int) -> AsyncIterator[Event]:
        """Every event under `prefix` from `start_revision` on, in order, exactly once.

        The iterator ends when the store closes or `aclose()` is called. It moves to another
        endpoint by itself when its member goes away; it raises CompactedError if history it
        needs is compacted, and StoreUnavailableError after `watch_reconnect_timeout` without
        any endpoint (resume with the last revision + 1). Cancelling a pending `anext()` loses
        nothing.
        """
        check_prefix(prefix)
        check_int(start_revision, "start_revision", minimum=1)
        return _EtcdWatch(self, prefix, start_revision)

    # -- Store protocol: leases

    async def lease_grant(self, ttl: int) -> Lease:
        check_int(ttl, "ttl", minimum=1)
        if ttl > _MAX_LEASE_TTL:
            raise InvalidRequestError(f"ttl must be at most {_MAX_LEASE_TTL} seconds, got {ttl!r}")
        request = rpc.LeaseGrantRequest(TTL=ttl, ID=0)
        response = await self._unary("lease grant", "lease", "LeaseGrant", request, mutating=True)
        if response.error:
            raise StoreError(f"lease grant: {response.error}")
        return Lease(id=int(response.ID), ttl=int(response.TTL))

    async def lease_keepalive(self, lease_id: int) -> int:
        _check_lease_id(lease_id, "lease_id")

        async def attempt(endpoint: _Endpoint, timeout: float) -> Any:
            call = endpoint.lease.LeaseKeepAlive(metadata=self._metadata(), timeout=timeout)
            self._streams_opened += 1
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                response = await call.read()
            finally:
                call.cancel()
            if response is grpc.aio.EOF:
                raise StoreUnavailableError(f"lease {lease_id} keepalive: stream ended unanswered")
            return response

        # A refresh only moves a deadline forward: sending it twice is harmless.
        response = await self._call(
            f"lease {lease_id} keepalive", attempt, mutating=False, lease_id=lease_id
        )
        if response.TTL <= 0:
            raise LeaseNotFoundError(lease_id)
        return int(response.TTL)

    async def lease_revoke(self, lease_id: int) -> None:
        _check_lease_id(lease_id, "lease_id")
        request = rpc.LeaseRevokeRequest(ID=lease_id)
        await self._unary(
            f"lease {lease_id} revoke",
            "lease",
            "LeaseRevoke",
            request,
            mutating=True,
            lease_id=lease_id,
        )

    # -- Store protocol: compaction and close

    async def compact(self, revision: int) -> None:
        check_int(revision, "revision", minimum=1)
        self._refuse_compacted(revision)
        request = rpc.CompactionRequest(revision=revision, physical=False)
        try:
            await self._unary(f"compact to {revision}", "kv", "Compact", request, mutating=True)
        except _EtcdCompacted:
            raise await self._compaction_error(revision) from None
        # etcd keeps `revision` itself readable; the contract does not: refuse it here.
        self._compacted_through = max(self._compacted_through, revision)

    async def close(self) -> None:
        """End every watch iterator and close the connections. Idempotent.

        Live watches first get a moment (at most `_CLOSE_GRACE_SECONDS`) to receive the events
        committed before the close, so a consumer sees them before its iterator ends.
        """
        if self._closed:
            return
        if self._watches:
            await self._let_watches_catch_up()
        self._closed = True
        for watch in list(self._watches):
            await watch.stop()
        for endpoint in self._endpoints:
            with contextlib.suppress(Exception):  # a channel of a dead member closes anyway
                await endpoint.close()
        if self._streams_opened:
            # gRPC finishes a cancelled stream's operations on its poller thread a moment
            # later and hands each to the loop that started it: let them land on this loop
            # while it runs, not on a closed one (asyncio logs "Event loop is closed" there).
            await asyncio.sleep(_CANCEL_SETTLE_SECONDS)


# --------------------------------------------------------------------------- watch


class _EtcdWatch(AsyncIterator[Event]):
    """One watch: a reader task that follows an etcd watch stream (moving to another endpoint
    when its member goes away) and a buffer the iterator hands out.

    Cancel-safe: an event leaves the buffer only inside a completed `anext()`.
    """

    def __init__(self, store: EtcdStore, prefix: str, start_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        self._key, self._range_end = _prefix_range(prefix)
        self._start_revision = start_revision
        # The first revision not received yet: where a re-created stream starts.
        self._resume_revision = start_revision
        self._events: collections.deque[Event] = collections.deque()
        self._failure: BaseException | None = None
        self._ended = False
        self._reader: asyncio.Task[None] | None = None
        self._call: Any = None  # the gRPC stream being followed, so stop() can cancel it
        self._stopping = False  # set by stop(): the reader ends instead of reconnecting
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.streams_opened = 0  # 1 + how often the watch moved to a new stream (observability)
        # When etcd confirmed the watch on the current stream (loop time), and whether it
        # started behind etcd's head then (so etcd replays history to it, every 100 ms).
        self._stream_created_at: float | None = None
        self._lagging_at_creation = False
        self._received_through = start_revision - 1  # revision of the last event received
        self._progressed = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"<etcd watch {self._prefix!r} from revision {self._start_revision} on {self._store!r}>"
        )

    async def __anext__(self) -> Event:
        while True:
            if self._events:
                event = self._events.popleft()
                if len(self._events) <= _WATCH_LOW_WATER:
                    self._room.set()
                return event
            if self._failure is not None:
                failure, self._failure = self._failure, None
                self._ended = True
                raise failure
            if self._ended:
                raise StopAsyncIteration
            if self._reader is None:
                self._start()
                continue
            self._readable.clear()
            await self._readable.wait()

    def _start(self) -> None:
        store = self._store
        if store.closed:
            self._ended = True
            return
        try:
            store._refuse_compacted(self._start_revision)
            store._bind_loop()
        except StoreError as error:
            self._failure = error
            return
        store._watches.add(self)
        self._reader = asyncio.get_running_loop().create_task(
            self._read(), name=f"hn-etcd-watch {self._prefix!r}"
        )

    async def aclose(self) -> None:
        """Stop watching; a pending or later `anext()` raises StopAsyncIteration."""
        await self.stop()
        self._events.clear()
        self._failure = None

    async def catch_up(self, revision: int, deadline: float) -> None:
        """Wait, until loop time `deadline` at most, for the events up to `revision` that etcd
        will still send: until one of them arrives, or, for a watch created behind etcd's head,
        until etcd's replay had its turn. (etcd 3.4's progress requests cannot tell: it answers
        them at once with its head revision, whatever the watch received; etcd issue 15220.)"""
        loop = asyncio.get_running_loop()
        while not self._ended and self._received_through < revision:
            now = loop.time()
            created_at = self._stream_created_at
            if now >= deadline or (
                created_at is not None
                and (not self._lagging_at_creation or now >= created_at + _ETCD_REPLAY_PERIOD)
            ):
                return
            self._progressed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._progressed.wait(), min(deadline - now, _CATCH_UP_POLL_SECONDS)
                )

    async def stop(self) -> None:
        """End the reader; events already received are still handed out, then the end.

        The gRPC call is cancelled first: a task awaiting `call.read()` on an established
        stream does not always end when only the task is cancelled (grpcio's aio read can miss
        the cancellation and wait for the next message, which may never come). The wait is
        bounded all the same, and the caller's own cancellation is never swallowed.
        """
        self._stopping = True
        reader = self._reader
        if reader is not None and not reader.done():
            if self._call is not None:
                self._call.cancel()
            reader.cancel()
            done, _ = await asyncio.wait({reader}, timeout=_WATCH_STOP_TIMEOUT)
            if not done:
                _log.warning(
                    "%r: reader did not end %gs after cancel; left behind",
                    self,
                    _WATCH_STOP_TIMEOUT,
                )
        self._ended = True
        self._store._watches.discard(self)
        self._readable.set()

    async def _read(self) -> None:  # the reader task
        try:
            await self._follow()
        except asyncio.CancelledError:
            pass
        except StoreError as error:
            self._failure = error
        except Exception as error:  # a bug or an unexpected gRPC error: end loudly, not silently
            _log.exception("%r failed", self)
            self._failure = StoreError(f"{self!r} failed: {error!r}")
        finally:
            self._ended = True
            self._store._watches.discard(self)
            self._readable.set()

    async def _follow(self) -> None:
        """Keep a stream open from `_resume_revision`, on whichever endpoint answers."""
        store = self._store
        loop = asyncio.get_running_loop()
        give_up_at: float | None = None
        failures_in_a_row = 0
        token_renewals = 0  # in a row, without a stream created in between
        while not store.closed and not self._stopping:
            index = store._current
            endpoint = store._endpoints[index]
            try:
                await endpoint.connect(store._connect_timeout)
                await store._authenticate(endpoint, store._call_timeout)
                await self._stream(endpoint)
                return  # only when the store closes
            except _TokenRejected as error:
                if token_renewals >= _MAX_REAUTHENTICATIONS:
                    raise StoreError(
                        f"watch {self._prefix!r}: etcd refused it with a new token too: {error}"
                    ) from None
                token_renewals += 1
                _log.info("watch %r: %s; renewing the auth token", self._prefix, error)
                continue
            except grpc.aio.AioRpcError as error:  # from Authenticate
                problem = f"{endpoint.address}: {_details(error)}"
            except _NotConnected as error:
                problem = str(error)
            except _StreamLost as error:
                problem = f"{endpoint.address}: {error}"
                give_up_at, failures_in_a_row = None, 0  # it was up: the give-up clock restarts
                token_renewals = 0
            if store.closed or self._stopping:
                return
            now = loop.time()
            if give_up_at is None:
                give_up_at = now + store._watch_reconnect_timeout
            elif now >= give_up_at:
                raise StoreUnavailableError(
                    f"watch {self._prefix!r}: no etcd endpoint of {store.endpoints} for "
                    f"{store._watch_reconnect_timeout:g}s (last: {problem}); resume from "
                    f"revision {self._resume_revision}"
                )
            _log.info("watch %r moves on from %s: %s", self._prefix, endpoint.address, problem)
            store._move_on_from(index)
            failures_in_a_row += 1
            await asyncio.sleep(_backoff(failures_in_a_row, len(store._endpoints)))

    async def _stream(self, endpoint: _Endpoint) -> None:
        """Follow one stream. Returns when the store closes; raises _NotConnected if the watch
        could not be created, _StreamLost when an established stream breaks."""
        token = self._store._token
        call = endpoint.watch.Watch(metadata=self._store._metadata())
        self._call = call
        self.streams_opened += 1
        self._store._streams_opened += 1
        created = False
        try:
            await call.write(
                rpc.WatchRequest(
                    create_request=rpc.WatchCreateRequest(
                        key=self._key,
                        range_end=self._range_end,
                        start_revision=self._resume_revision,
                        prev_kv=True,
                    )
                )
            )
            while True:
                if created:
                    response = await call.read()
                else:  # a member that takes the stream but never answers is not a member
                    try:
                        response = await asyncio.wait_for(call.read(), self._store._call_timeout)
                    except TimeoutError:
                        raise _NotConnected(
                            f"{endpoint.address}: watch not confirmed within "
                            f"{self._store._call_timeout:g}s"
                        ) from None
                if response is grpc.aio.EOF:
                    raise _StreamLost("stream ended by the server")
                if response.compact_revision:
                    raise CompactedError(
                        self._resume_revision,
                        max(self._store._compacted_through, int(response.compact_revision) - 1),
                    )
                if response.canceled:
                    reason = response.cancel_reason or "cancelled by the server"
                    if not response.cancel_reason or _ERR_NO_LEADER in reason:
                        raise _StreamLost(reason)
                    if self._store._auth is not None and (
                        _ERR_PERMISSION_DENIED in reason or _ERR_TOKEN_REJECTED[0] in reason
                    ):
                        # etcd 3.4 answers an expired token on a watch with "permission
                        # denied": try once more with a new one before believing it.
                        self._store._drop_token(token)
                        raise _TokenRejected(f"{endpoint.address}: {reason}")
                    raise StoreError(f"watch {self._prefix!r}: etcd cancelled it: {reason}")
                if response.created:
                    created = True
                    self._stream_created_at = asyncio.get_running_loop().time()
                    self._lagging_at_creation = self._resume_revision <= response.header.revision
                    continue
                self._take(response.events)
                while len(self._events) >= _WATCH_HIGH_WATER and not self._store.closed:
                    self._room.clear()
                    await self._room.wait()
        except grpc.aio.AioRpcError as error:
            if self._store.closed or self._stopping:
                return
            if self._store._auth is not None and _token_rejected(error):
                self._store._drop_token(token)
                raise _TokenRejected(f"{endpoint.address}: {_details(error)}") from error
            if not (_is_transient(error) or error.code() == grpc.StatusCode.CANCELLED):
                raise _translate(error, f"watch {self._prefix!r}") from error
            if created:
                raise _StreamLost(_details(error)) from error
            raise _NotConnected(f"{endpoint.address}: {_details(error)}") from error
        except _StreamLost:
            if self._store.closed or self._stopping:
                return
            if not created:
                raise _NotConnected(f"{endpoint.address}: watch not created") from None
            raise
        finally:
            self._stream_created_at = None
            self._call = None
            call.cancel()

    def _note_received(self, revision: int) -> None:
        if revision > self._received_through:
            self._received_through = revision
            self._progressed.set()

    def _take(self, raw_events: Sequence[Any]) -> None:
        events = [_event(raw) for raw in raw_events if raw.kv.mod_revision >= self._resume_revision]
        if not events:
            return
        self._events.extend(events)
        # etcd sends whole revisions per response, so the next stream starts after this one.
        self._resume_revision = events[-1].revision + 1
        self._note_received(events[-1].revision)
        self._readable.set()
