"""Model-based property test: random op sequences against every backend and a reference model.

The reference model below is a plain-dict implementation of the etcd semantics in
`store/base.py`. After each random sequence the store must agree with it on: every put/delete/
txn result, the range at every revision still kept, the event stream of a watch from any
revision, and CompactedError below the compaction point.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hivenet.store import (
    CompactedError,
    Compare,
    Delete,
    Event,
    EventType,
    Get,
    KeyValue,
    Put,
    Store,
    TxnOp,
    TxnResult,
)
from tests.store.conftest import BACKEND_NAMES, make_backend
from tests.store.test_contract import close_watch

KEYS = ["/a", "/a/b", "/a/c", "/ab", "/b", "/b/a"]
PREFIXES = ["", "/a", "/a/", "/b/", "/z"]
VALUES = [b"", b"x", b"y"]


@dataclass
class ReferenceStore:
    revision: int = 1
    kvs: dict[str, KeyValue] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    snapshots: dict[int, dict[str, KeyValue]] = field(default_factory=lambda: {1: {}})

    def _matching(self, key: str, prefix: bool) -> list[str]:
        return sorted(k for k in self.kvs if (k.startswith(key) if prefix else k == key))

    def _put(self, key: str, value: bytes, revision: int) -> KeyValue | None:
        previous = self.kvs.get(key)
        kv = KeyValue(
            key,
            value,
            previous.create_revision if previous else revision,
            revision,
            previous.version + 1 if previous else 1,
        )
        self.kvs[key] = kv
        self.events.append(Event(EventType.PUT, kv, previous))
        return previous

    def _delete(self, key: str, prefix: bool, revision: int) -> int:
        doomed = self._matching(key, prefix)
        for doomed_key in doomed:
            previous = self.kvs.pop(doomed_key)
            self.events.append(
                Event(EventType.DELETE, KeyValue(doomed_key, b"", 0, revision, 0, 0), previous)
            )
        return len(doomed)

    def _commit(self, changed: bool) -> None:
        if changed:
            self.revision += 1
            self.snapshots[self.revision] = dict(self.kvs)

    def put(self, key: str, value: bytes) -> int:
        self._put(key, value, self.revision + 1)
        self._commit(True)
        return self.revision

    def delete(self, key: str, prefix: bool) -> int:
        count = self._delete(key, prefix, self.revision + 1)
        self._commit(count > 0)
        return count

    def txn(self, compares: list[Compare], success: list[TxnOp], failure: list[TxnOp]) -> TxnResult:
        def holds(compare: Compare) -> bool:
            kv = self.kvs.get(compare.key)
            actual = (
                (kv.value if kv else b"")
                if compare.target == "value"
                else (getattr(kv, compare.target) if kv else 0)
            )
            return {
                "==": actual == compare.value,
                "!=": actual != compare.value,
                "<": actual < compare.value,  # type: ignore[operator]
                ">": actual > compare.value,  # type: ignore[operator]
            }[compare.op]

        succeeded = all(holds(compare) for compare in compares)
        revision = self.revision + 1
        changed = False
        responses: list[list[KeyValue] | int | KeyValue | None] = []
        for op in success if succeeded else failure:
            if isinstance(op, Put):
                responses.append(self._put(op.key, op.value, revision))
                changed = True
            elif isinstance(op, Delete):
                deleted = self._delete(op.key, op.prefix, revision)
                changed = changed or deleted > 0
                responses.append(deleted)
            else:
                responses.append([self.kvs[k] for k in self._matching(op.key, op.prefix)])
        self._commit(changed)
        return TxnResult(succeeded, self.revision, responses)


keys = st.sampled_from(KEYS)
values = st.sampled_from(VALUES)
compares = st.one_of(
    st.builds(Compare, keys, st.just("value"), st.sampled_from(["==", "!=", "<", ">"]), values),
    st.builds(
        Compare,
        keys,
        st.sampled_from(["version", "create_revision", "mod_revision", "lease"]),
        st.sampled_from(["==", "!=", "<", ">"]),
        st.integers(0, 12),
    ),
)
txn_ops = st.one_of(
    st.builds(Put, keys, values),
    st.builds(Delete, st.sampled_from(KEYS + PREFIXES[1:]), st.booleans()),
    st.builds(Get, st.sampled_from(KEYS + PREFIXES[1:]), st.booleans()),
)


def writes_each_key_once(ops: list[TxnOp]) -> bool:
    """etcd's rule: within one txn branch a key is put at most once and never also deleted."""
    put_keys = [op.key for op in ops if isinstance(op, Put)]
    if len(put_keys) != len(set(put_keys)):
        return False
    return not any(
        key == op.key or (op.prefix and key.startswith(op.key))
        for op in ops
        if isinstance(op, Delete)
        for key in put_keys
    )


branches = st.lists(txn_ops, max_size=4).filter(writes_each_key_once)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), keys, values),
        st.tuples(st.just("delete"), st.sampled_from(KEYS + PREFIXES), st.booleans()),
        st.tuples(st.just("txn"), st.lists(compares, max_size=2), branches, branches),
    ),
    min_size=1,
    max_size=25,
)

_example_counter = itertools.count()


async def check_against_model(
    store: Store, steps: list[tuple[object, ...]], compact_choice: int, *, fresh: bool = True
) -> None:
    """Run `steps` on `store` and on the reference model, then compare results, ranges at
    every revision, watches and compaction. A `fresh` store must start at revision 1; else
    (a shared etcd cluster keeps counting across tests) the model starts where the store is."""
    origin = await store.current_revision()
    if fresh:
        assert origin == ReferenceStore().revision
    model = ReferenceStore(revision=origin, snapshots={origin: {}})
    for step in steps:
        if step[0] == "put":
            assert await store.put(step[1], step[2]) == model.put(step[1], step[2])  # type: ignore[arg-type]
        elif step[0] == "delete":
            key, prefix = step[1], step[2]
            if not prefix and not key:
                continue  # an empty exact key is invalid input, covered elsewhere
            expected_count = model.delete(key, prefix)  # type: ignore[arg-type]
            assert await store.delete(key, prefix=prefix) == expected_count  # type: ignore[arg-type]
        else:
            expected_txn = model.txn(step[1], step[2], step[3])  # type: ignore[arg-type]
            assert await store.txn(step[1], step[2], step[3]) == expected_txn  # type: ignore[arg-type]
        assert await store.current_revision() == model.revision

    for revision, snapshot in model.snapshots.items():
        for prefix in PREFIXES:
            result = await store.range(prefix, revision=revision)
            expected = [kv for key, kv in sorted(snapshot.items()) if key.startswith(prefix)]
            assert result.kvs == expected, (revision, prefix)

    for prefix in PREFIXES:
        watched = [e async for e in _drain(store, prefix, origin + 1, model.events)]
        assert watched == [e for e in model.events if e.kv.key.startswith(prefix)]

    compact_revision = origin + compact_choice % (model.revision - origin + 1)
    if compact_revision > origin:
        await store.compact(compact_revision)
        for revision, snapshot in model.snapshots.items():
            if revision <= compact_revision:
                with pytest.raises(CompactedError):
                    await store.range("", revision=revision)
            else:
                result = await store.range("", revision=revision)
                assert result.kvs == [kv for _, kv in sorted(snapshot.items())]
        later = [e for e in model.events if e.revision > compact_revision]
        assert [e async for e in _drain(store, "", compact_revision + 1, later)] == later


async def _drain(
    store: Store, prefix: str, start: int, all_events: list[Event]
) -> AsyncIterator[Event]:
    """The watch's events, checking that exactly the expected number arrive."""
    expected = sum(1 for e in all_events if e.kv.key.startswith(prefix) and e.revision >= start)
    events = store.watch(prefix, start_revision=start)
    for _ in range(expected):
        yield await asyncio.wait_for(anext(events), 5)
    pending = asyncio.ensure_future(anext(events))
    done, _ = await asyncio.wait({pending}, timeout=0.002)
    assert not done, f"extra event {pending.result() if done else None}"
    pending.cancel()
    # Let the cancelled read finish before closing the generator: closing one whose read
    # is still running (an etcd watch still being set up on a loaded machine) can hang.
    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
        await asyncio.wait_for(pending, 10)
    await asyncio.wait_for(close_watch(events), 10)


# The thread-execution variant runs the same SQL as "sqlite-file"; the plain contract suite
# covers it, so the costliest test here runs on two backends only.
@pytest.mark.parametrize(
    "backend_name", [name for name in BACKEND_NAMES if name != "sqlite-file-thread"]
)
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=operations, compact_choice=st.integers(0, 1000))
def test_store_agrees_with_reference_model(
    backend_name: str, tmp_path: Path, steps: list[tuple[object, ...]], compact_choice: int
) -> None:
    directory = tmp_path / f"example-{next(_example_counter)}"
    directory.mkdir()
    backend = make_backend(backend_name, directory)
    backend.run(lambda store: check_against_model(store, steps, compact_choice))
