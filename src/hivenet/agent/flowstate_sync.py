"""`FlowStateSync`: a host's connection-tracking and NAT state, shared with the hosts that
need it (MidoNet's flow state), kept on local disk.

Owns, on one host: the `ConntrackTable`, the `NatTable` and its `PortBlockAllocator`; one
`FlowStateTransaction` per upcall (`begin` -> the simulation's hook; `finish` commits it
if the packet passes, rolls it back if it is dropped); pushing what a new flow created to
the egress host and the hosts of any stateful port group BEFORE the packet is forwarded
(tunnel messages with the reserved VNI 0xFFFFFF, `flowstate.wire` format); installing what
peers push; refreshing entries that live flows use (flow statistics of the datapath) and
expiring the rest; invalidating the flows whose conntrack/NAT tags an entry's appearance
or expiry touches; leasing SNAT port blocks through the store (create-if-absent txn on
`/hivenet/v1/tables/nat/<ip>/<block>`, on the host's lease) AHEAD of need: one block of each
SNAT range this host may translate to at start and when such a range appears in the
topology, and another in the background when fewer than the allocator's low-water mark
(25%) of a range's held ports are free for a destination, so a packet is dropped for want
of a port (`nat_ports_exhausted`) only when the range is truly exhausted (or a burst
outruns a store round trip), and taking the held blocks again on a new lease after the
agent lost its old one; and the persistence journal in the agent's state dir so a
restarted agent keeps every connection (a failed journal write is counted, never fatal).
Does not own the simulation (sim/stateful.py has the pure hook), the datapath or the lease.

Journal format (`flowstate.journal`): records back to back, each `u32 length | f64 wall
clock seconds when written | wire message`; the wall clock converts the wire format's
relative expiries back after a restart. It is compacted into a snapshot when it grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hivenet.datapath.base import Datapath
from hivenet.flows.table import Tag
from hivenet.flowstate import (
    ConntrackRecord,
    ConntrackTable,
    Destination,
    FlowKey,
    FlowStateTransaction,
    NatKind,
    NatRange,
    NatRecord,
    NatTable,
    PortBlock,
    PortBlockAllocator,
    PortBlockError,
    WireFormatError,
    auth,
    decode,
    decode_stream,
    encode,
    encode_batches,
    group_by_peer,
    hosts_of_stateful_groups,
    key_of_embedded,
    parse_block_key,
    push_targets,
)
from hivenet.flowstate.keys import PackedKeys, is_icmp_error
from hivenet.flowstate.portblocks import NAT_BLOCK_PREFIX
from hivenet.flowstate.transaction import (
    CONNTRACK_TAG_KIND,
    NAT_TAG_KINDS,
    TAG_KEY_SHIFT,
    TAG_KIND_MASK,
    TAG_ZONE_MASK,
    TAG_ZONE_SHIFT,
    ConnectionTags,
    zone_hash,
)
from hivenet.flowstate.wire import DEFAULT_MAX_MESSAGE_BYTES
from hivenet.model import Port, PortGroup
from hivenet.packets import (
    FlowMatch,
    PacketError,
    embedded_datagram,
    extract_flow_match,
    parse_frame,
)
from hivenet.sim import SimulationResult, TopologyView
from hivenet.sim.stateful import (
    TransactionHook,
    egress_hosts_of,
    egress_port_keys_of,
    snat_targets_served,
)
from hivenet.store.base import Compare, Put, Store, StoreError

log = logging.getLogger(__name__)

JOURNAL_NAME = "flowstate.journal"
CONTROL_MAGIC = b"HNPB"  # sealed messages that are gateway probes (agent/probe.py), not flow state
_JOURNAL_HEADER = struct.Struct("!Id")
MAX_JOURNAL_BYTES = 4 << 20


# Bound of each flow-state table when none is given, as Linux sizes nf_conntrack: one entry
# per 16 KiB of memory, here within [64k, 4M] (8 GiB: 512k connections per table).
BYTES_OF_MEMORY_PER_ENTRY = 16 * 1024
MIN_DEFAULT_ENTRIES, MAX_DEFAULT_ENTRIES = 1 << 16, 1 << 22


def default_max_entries(memory_bytes: int | None = None) -> int:
    """The default bound of each flow-state table for a host with `memory_bytes` of memory
    (None: this host's, from sysconf; unknown: 256k)."""
    if memory_bytes is None:
        try:
            memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (OSError, ValueError):
            memory_bytes = (1 << 18) * BYTES_OF_MEMORY_PER_ENTRY
    entries = memory_bytes // BYTES_OF_MEMORY_PER_ENTRY
    return max(MIN_DEFAULT_ENTRIES, min(MAX_DEFAULT_ENTRIES, entries))


@dataclass(slots=True)
class FlowStateCounters:
    transactions: int = 0
    committed: int = 0
    rolled_back: int = 0
    connections_opened: int = 0
    nat_bindings_created: int = 0
    pushed_messages: int = 0
    pushed_bytes: int = 0
    pushed_entries: int = 0
    received_messages: int = 0
    received_entries: int = 0
    bad_messages: int = 0
    expired_entries: int = 0
    refreshed_entries: int = 0
    blocks_leased: int = 0
    blocks_leased_ahead: int = 0  # of blocks_leased: before any packet needed them
    block_conflicts: int = 0
    journal_bytes: int = 0
    restored_entries: int = 0
    not_pushed_no_underlay: int = 0
    journal_errors: int = 0  # journal writes that failed (OSError, e.g. disk full)
    blocks_retaken: int = 0  # held blocks taken again on a new lease after the old one died
    blocks_lost: int = 0  # held blocks another host took while our lease was gone
    # Authentication (flowstate/auth.py), with `authenticate=True`: received messages
    # refused before decoding, never applied.
    rejected_unauthenticated: int = 0  # not sealed, malformed envelope, unknown key, bad tag
    rejected_replayed: int = 0  # authentic, but a sequence already seen, or too old
    rejected_no_key: int = 0  # received before this host had the cluster keyring
    not_pushed_no_key: int = 0  # messages not sent: no cluster keyring yet
    by_event: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _PushTargetMaps:
    """Topology-wide maps for `push_targets`, valid for one revision of one view."""

    view: TopologyView | None
    revision: int
    host_of_underlay_ip: dict[str, str]
    stateful_groups: frozenset[str]
    # (ingress port, egress hosts, egress port keys) -> `push_targets`' answer, for this
    # revision only (it is all topology: ports' groups, stateful groups and their hosts).
    targets: dict[tuple[str, frozenset[str], frozenset[int]], frozenset[str]] = field(
        default_factory=dict
    )


_PUSH_TARGETS_MAX = 4096  # answers kept per topology revision (emptied when full)

# The refresh scan (`_touch_used`) in slices: the flows are split in a fixed number of slices
# (by identity), each with the time it was last scanned, and a tick scans as many of them,
# in turn, as hold about SCAN_FLOWS_PER_SLICE flows (all of them up to that many flows), so
# with many flows a used flow is noted once a pass of several ticks instead of every tick.
# The slices are as many ticks as fit in MAX_SCAN_PASS seconds and an eighth of the shortest
# entry timeout: a use is noted at most a pass late, so an entry used just before its
# deadline may expire up to a pass (<= 1/8 of its timeout) before that use plus its timeout.
SCAN_FLOWS_PER_SLICE = 20_000
MAX_SCAN_PASS = 5.0
# A flow's slice: the high word of its id times 2^64/phi (ids of flows made in turn, a
# fixed size apart, spread evenly over the slices).
_SLICE_MIX = 0x9E3779B97F4A7C15


class FlowStateSync:
    """One host's flow state. Create it with the agent's topology view, datapath and store;
    give `begin`/`finish` to the `FlowPipeline`; `await start()` / `await stop()`."""

    def __init__(
        self,
        host_id: str,
        datapath: Datapath,
        topology: TopologyView,
        store: Store | None = None,
        *,
        lease_id: Callable[[], int] = lambda: 0,
        state_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        tick_interval: float = 0.5,
        authenticate: bool = False,
        keyring: auth.Keyring | None = None,
        max_entries: int | None = None,
    ) -> None:
        self.host_id = host_id
        self.datapath = datapath
        self.topology = topology
        self.store = store
        self.lease_id = lease_id
        self.clock = clock
        self.wall_clock = wall_clock
        if isinstance(tick_interval, bool) or not (
            isinstance(tick_interval, int | float) and 0 < tick_interval < math.inf
        ):
            raise ValueError(f"tick_interval: expected seconds > 0, got {tick_interval!r}")
        self.tick_interval = tick_interval
        self.allocator = PortBlockAllocator(seed=zlib.crc32(host_id.encode()))
        # Each table bounded (None: unbounded); full, it evicts half-open entries first.
        packed_keys = PackedKeys()  # the tables share a connection's key objects
        self.conntrack = ConntrackTable(max_entries=max_entries, packed_keys=packed_keys)
        self.nat = NatTable(self.allocator, max_entries=max_entries, packed_keys=packed_keys)
        self.counters = FlowStateCounters()
        # Zone hash -> the zones with that hash (`transaction.zone_hash`; a tuple in case two
        # collide), for the refresh scan to read a connection tag's zone: rebuilt from the
        # tables' zones when a tag names an unknown hash (at most once a scan).
        self._zones_by_hash: dict[int, tuple[str, ...]] = {}
        self._blocks_taken: set[PortBlock] = set()  # blocks other hosts hold (store watch)
        # SNAT ranges to lease a block of: None = unconditionally (no block held, or a packet
        # found none free); a destination = if still running low for it when the leaser runs.
        self._wanted: dict[NatRange, Destination | None] = {}
        # The SNAT ranges this host may translate to, as of topology revision `_served_at`.
        self._served_targets: list[NatRange] = []
        self._dropped_for: set[NatRange] = set()  # ranges a packet found no free port in
        self._served_at = -1
        self._lease_wakeup = asyncio.Event()
        # The refresh scan's slices (see SCAN_FLOWS_PER_SLICE): when each was last scanned,
        # and the next one to scan.
        shortest = min(
            min(getattr(timeouts, name) for name in timeouts.__dataclass_fields__)
            for timeouts in (self.conntrack.timeouts, self.nat.timeouts)
        )
        slices = max(1, int(min(MAX_SCAN_PASS, shortest / 8) / tick_interval))
        self._scan_since = [-math.inf] * slices
        self._scan_next = 0
        self._task: asyncio.Task[None] | None = None
        self._lease_task: asyncio.Task[None] | None = None
        self._journal_path = state_dir / JOURNAL_NAME if state_dir is not None else None
        self._journal: int | None = None
        # A journal write failed part way: the file may end in a torn record, so the next
        # tick rewrites it as a snapshot of what is in memory.
        self._journal_needs_compaction = False
        # Held blocks whose store key vanished (our lease died): take them again on the
        # current lease, or give them up only if another host was faster.
        self._blocks_to_retake: set[PortBlock] = set()
        self._push_maps = _PushTargetMaps(None, -1, {}, frozenset())
        # Inside a pipeline batch: the tag sets invalidated so far (None: no batch).
        self._batch_log: list[frozenset[Tag]] | None = None
        # Rule id -> its NAT targets parsed, for topology revision `_nat_targets_at` only.
        self._nat_targets: dict[str, list[NatRange]] = {}
        self._nat_targets_at = -1
        self._stateful_group_hosts: dict[str, set[str]] | None = None
        # Sealed messages (flowstate/auth.py): what the agent always asks for. Without it,
        # plain wire messages are sent and accepted (unit tests, the benchmark's baseline).
        self.authenticate = authenticate
        self.keyring = keyring
        self._receive_keys = auth.tag_keys(keyring.receive_keys()) if keyring else {}
        self._sequence = 0  # of the last message sealed (auth.next_sequence)
        # The sealer of the keyring's current key (the key object it was made for, itself).
        self._sealer: tuple[auth.ClusterKey, auth.Sealer] | None = None
        self._replay = auth.ReplayWindow()
        self._max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES - (
            auth.overhead(host_id) if authenticate else 0
        )
        # Who gets sealed control messages (magic CONTROL_MAGIC: gateway probes): the agent.
        self.control_handler: Callable[[str, bytes], None] | None = None
        datapath.set_flow_state_handler(self.receive)

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Restore the journal, re-lease the port blocks its SNAT bindings use, lease a block
        of every SNAT range this host may need ahead of the first packet, then run the
        refresh/expiry timer and the block leaser."""
        self.restore()
        await self.reclaim_blocks()
        await self.lease_ahead()
        self._task = asyncio.create_task(self._tick_loop(), name=f"hn-{self.host_id}-flowstate")
        self._lease_task = asyncio.create_task(
            self._lease_loop(), name=f"hn-{self.host_id}-natblocks"
        )

    async def stop(self, *, compact: bool = True) -> None:
        """Stop the timers; `compact` (a clean stop) rewrites the journal as a snapshot."""
        for task in (self._task, self._lease_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._lease_task = None
        if compact:
            self.compact()
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None

    # ------------------------------------------------------------------ per upcall

    def begin(self, frame: bytes, match: FlowMatch | None = None) -> TransactionHook:
        """The hook for simulating `frame` (an ICMP error's quote is parsed here). `match`:
        the frame's flow match when the caller already extracted it (not parsed again)."""
        self.counters.transactions += 1
        embedded: FlowKey | None = None
        try:
            if match is None:
                match = extract_flow_match(frame, 0)
            if is_icmp_error(match):
                embedded = key_of_embedded(embedded_datagram(parse_frame(frame)))
        except (PacketError, ValueError):
            embedded = None
        return self._hook(embedded)

    def again(self, hook: TransactionHook) -> TransactionHook:
        """A fresh hook for the same packet as `hook` (whose transaction was rolled back: a
        declined replay, simulated next): one transaction counted, the quote not parsed
        again."""
        return self._hook(hook.transaction.embedded)

    def _hook(self, embedded: FlowKey | None) -> TransactionHook:
        view = self.topology
        if self._nat_targets_at != view.revision:  # parsed targets of the rules in force
            self._nat_targets = {}
            self._nat_targets_at = view.revision
        return TransactionHook(
            FlowStateTransaction(self.conntrack, self.nat, embedded), self._nat_targets
        )

    def finish(
        self, hook: TransactionHook, result: SimulationResult, ingress_port_id: str, now: float
    ) -> None:
        """After the simulation, before the packet is forwarded: commit or roll back, then
        invalidate what the new entries change and push them to the hosts that need them."""
        transaction = hook.transaction
        for target in hook.record.exhausted:
            self._wanted[target] = None
            self._dropped_for.add(target)
            self._lease_wakeup.set()
        if self.allocator.running_low:
            for target, destination in self.allocator.take_running_low().items():
                self._wanted.setdefault(target, destination)
            self._lease_wakeup.set()
        if result.is_drop or not hook.record.used:
            transaction.rollback()
            if hook.record.used:
                self.counters.rolled_back += 1
            self._forget_evicted()
            return
        peers = self.push_targets(result, ingress_port_id)
        committed = transaction.commit(now, peers)
        counters = self.counters
        counters.committed += 1
        # The opened connections' and created bindings' tags, as the simulation spelled them.
        tags, opened = hook.record.commit_tags(committed.nat_bindings)
        counters.connections_opened += opened
        counters.nat_bindings_created += len(committed.nat_bindings)
        if tags:
            self._invalidate(tags)
        self._forget_evicted()
        if self._batch_log is None:
            self.push_due(now)

    def begin_batch(self) -> list[frozenset[Tag]]:
        """Until `end_batch`: commits push nothing (the batch's entries go together at its
        end); returns the log of the tag sets invalidated meanwhile, in order (the pipeline
        installs no flow that a later entry of it invalidated)."""
        self._batch_log = []
        return self._batch_log

    def end_batch(self, now: float) -> None:
        """Push what the batch committed: one message per peer (or more if it is large)."""
        self._batch_log = None
        self.push_due(now)

    def _invalidate(self, tags: set[int]) -> None:
        self.datapath.invalidate(tags)
        if self._batch_log is not None:
            self._batch_log.append(frozenset(tags))

    def set_keyring(self, keyring: auth.Keyring | None) -> None:
        """The cluster's flow-state keys (the agent's store watch calls this on a change)."""
        self.keyring = keyring
        self._receive_keys = auth.tag_keys(keyring.receive_keys()) if keyring else {}

    def push_targets(self, result: SimulationResult, ingress_port_id: str) -> frozenset[str]:
        maps = self._push_target_maps()
        egress_hosts = egress_hosts_of(result, maps.host_of_underlay_ip)
        port_keys = egress_port_keys_of(result)
        # The answer is the same for every flow between the same ports and hosts while the
        # topology is: kept with the revision's maps, so a change starts afresh.
        memo_key = (ingress_port_id, frozenset(egress_hosts), frozenset(port_keys))
        targets = maps.targets.get(memo_key)
        if targets is None:
            targets = self._push_targets(maps, ingress_port_id, egress_hosts, port_keys)
            if len(maps.targets) >= _PUSH_TARGETS_MAX:
                maps.targets.clear()
            maps.targets[memo_key] = targets
        return targets

    def _push_targets(
        self,
        maps: _PushTargetMaps,
        ingress_port_id: str,
        egress_hosts: set[str],
        port_keys: set[int],
    ) -> frozenset[str]:
        view = self.topology
        port_ids = [ingress_port_id]
        for key in port_keys:
            port_id = view.port_by_tunnel_key.get(key)
            if port_id is not None:
                port_ids.append(port_id)
        groups_of_port = {
            port_id: view.ports[port_id].port_group_ids
            for port_id in port_ids
            if port_id in view.ports
        }
        stateful = maps.stateful_groups
        hosts_of_group: dict[str, set[str]] = {}
        if stateful and any(groups & stateful for groups in groups_of_port.values()):
            hosts_of_group = self._hosts_of_stateful_groups(stateful)
        group_hosts = hosts_of_stateful_groups(port_ids, groups_of_port, stateful, hosts_of_group)
        return push_targets(
            local_host=self.host_id,
            ingress_host=self.host_id,
            egress_hosts=egress_hosts,
            stateful_group_hosts=group_hosts,
        )

    def _push_target_maps(self) -> _PushTargetMaps:
        """The topology-wide maps `push_targets` needs, rebuilt only when the topology
        changed (every change bumps `TopologyView.revision`), not per connection."""
        view = self.topology
        maps = self._push_maps
        if maps.view is view and maps.revision == view.revision:
            return maps
        maps = _PushTargetMaps(
            view,
            view.revision,
            {ip: host for host, ip in view.host_underlay_ip.items()},
            frozenset(
                group.id
                for group in view.all("port_group")
                if isinstance(group, PortGroup) and group.stateful
            ),
        )
        self._push_maps = maps
        self._stateful_group_hosts = None  # rebuilt when a stateful group is next involved
        return maps

    def _hosts_of_stateful_groups(self, stateful: frozenset[str]) -> dict[str, set[str]]:
        """Stateful port group -> hosts of its bound ports (a scan of every port, once per
        topology revision; `_push_target_maps` resets it)."""
        if self._stateful_group_hosts is None:
            hosts_of_group: dict[str, set[str]] = {}
            for port in self.topology.all("port"):
                if isinstance(port, Port) and port.host_id:
                    for group_id in port.port_group_ids:
                        if group_id in stateful:
                            hosts_of_group.setdefault(group_id, set()).add(port.host_id)
            self._stateful_group_hosts = hosts_of_group
        return self._stateful_group_hosts

    # ------------------------------------------------------------------ pushing

    def push_due(self, now: float) -> None:
        """Send every entry due for a push (new, changed, refreshed) to its peers, then write
        it to the journal (a failed write is counted, never keeps it from the peers)."""
        conntrack_due = self.conntrack.due_for_push(now)
        nat_due = self.nat.due_for_push(now)
        if not conntrack_due and not nat_due:
            return
        self._send_to_peers(conntrack_due, nat_due, now)
        if self._journal_path is not None:  # (no journal: nothing to encode it for)
            self._journal_append(
                encode(
                    (record for record, _ in conntrack_due),
                    (record for record, _ in nat_due),
                    now=now,
                )
            )

    def _send_to_peers(
        self,
        conntrack_due: list[tuple[ConntrackRecord, frozenset[str]]],
        nat_due: list[tuple[NatRecord, frozenset[str]]],
        now: float,
    ) -> None:
        conntrack_by_peer = group_by_peer(conntrack_due)
        nat_by_peer = group_by_peer(nat_due)
        keyring = self.keyring
        if self.authenticate and keyring is None:
            self.counters.not_pushed_no_key += len(set(conntrack_by_peer) | set(nat_by_peer))
            return
        for peer in sorted(set(conntrack_by_peer) | set(nat_by_peer)):
            remote_ip = self.topology.host_underlay_ip.get(peer)
            if remote_ip is None:
                self.counters.not_pushed_no_underlay += 1
                continue
            conntrack_records = conntrack_by_peer.get(peer, [])
            nat_records = nat_by_peer.get(peer, [])
            for message in encode_batches(
                conntrack_records,
                nat_records,
                now=now,
                max_message_bytes=self._max_message_bytes,
            ):
                if keyring is not None and self.authenticate:
                    message = self._seal(keyring, message)
                self.datapath.send_flow_state(remote_ip, message)
                self.counters.pushed_messages += 1
                self.counters.pushed_bytes += len(message)
            self.counters.pushed_entries += len(conntrack_records) + len(nat_records)

    def receive(self, payload: bytes) -> None:
        """A peer's push (the datapath's handler for the flow-state VNI). With
        `authenticate`, only a sealed message with a valid tag and a sequence not seen before
        from its sender is decoded; anything else is counted and dropped, never applied."""
        if self.authenticate:
            opened = self._unseal(payload)
            if opened is None:
                return
            sender, payload = opened
            if self.control_handler is not None and payload[:4] == CONTROL_MAGIC:
                self.control_handler(sender, payload)  # a gateway probe (agent/probe.py)
                return
        now = self.clock()
        try:
            batch = decode(payload, now)
        except WireFormatError as error:
            self.counters.bad_messages += 1
            log.warning("host %s: bad flow-state message: %s", self.host_id, error)
            return
        self.counters.received_messages += 1
        self.counters.received_entries += len(batch)
        self._install(batch.conntrack, batch.nat, now)
        self._journal_append(payload, written_at=now)

    def send_control(self, remote_ip: str, message: bytes) -> bool:
        """A sealed control message (a gateway probe) to the host at `remote_ip`, in the
        sender's one sequence space; False when there is no key yet."""
        keyring = self.keyring
        if keyring is None or not self.authenticate:
            return False
        self.datapath.send_flow_state(remote_ip, self._seal(keyring, message))
        return True

    def _seal(self, keyring: auth.Keyring, message: bytes) -> bytes:
        """`message` sealed with the current key and the next sequence of this sender's one
        sequence space (flow-state pushes and control messages share it)."""
        self._sequence = auth.next_sequence(self._sequence, self.wall_clock())
        current = keyring.current
        sealer = self._sealer
        if sealer is None or sealer[0] is not current:  # made again for a new current key
            sealer = self._sealer = (
                current,
                auth.Sealer(key_id=current.key_id, key=current.secret, sender=self.host_id),
            )
        return sealer[1].seal(message, self._sequence)

    def _unseal(self, payload: bytes) -> tuple[str, bytes] | None:
        if not self._receive_keys:
            self.counters.rejected_no_key += 1
            return None
        try:
            sender, sequence, _, message = auth.open_sealed(payload, self._receive_keys)
        except auth.AuthError as error:
            self.counters.rejected_unauthenticated += 1
            log.debug("host %s: flow-state message refused: %s", self.host_id, error)
            return None
        if not auth.is_fresh(sequence, self.wall_clock()) or not self._replay.accept(
            sender, sequence
        ):
            self.counters.rejected_replayed += 1
            return None
        return sender, message

    def _install(
        self, conntrack: Iterable[ConntrackRecord], nat: Iterable[NatRecord], now: float
    ) -> None:
        tags: set[int] = set()
        # A message's entries name the same keys (a connection's conntrack key is its NAT
        # binding's original key): each NAT tag is made once per message.
        texts = ConnectionTags()
        for record in conntrack:
            existed = self.conntrack.get(record.zone, record.key, now) is not None
            merged = self.conntrack.merge(record, now)
            if merged is None or not existed:
                tags.add(texts.conntrack(record.zone, record.key))
        for nat_record in nat:
            binding = nat_record.binding
            existing = self.nat.lookup_original(binding.zone, binding.kind, binding.original, now)
            merged_binding = self.nat.merge(nat_record, now)
            if merged_binding is None or existing != binding:
                tags.add(texts.nat(binding))
                tags.add(texts.nat_reply(binding.zone, binding.kind, binding.translated))
        if tags:
            self._invalidate(tags)
        self._forget_evicted()

    # ------------------------------------------------------------------ time

    async def _tick_loop(self) -> None:
        # Ticks `tick_interval` apart, start to start (a long tick does not stretch the
        # refresh scan's pass); one longer than the interval is followed at once.
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            await asyncio.sleep(max(0.0, started + self.tick_interval - loop.time()))
            started = loop.time()
            try:
                self.tick(self.clock())
            except Exception:  # the timer must survive a bug in one tick
                log.exception("host %s: flow-state tick failed", self.host_id)

    def tick(self, now: float) -> None:
        """Refresh entries whose flows were used, expire the idle ones, push what is due."""
        self._touch_used(now)
        expired_conntrack, expired_nat = self.conntrack.expire(now), self.nat.expire(now)
        self.counters.expired_entries += len(expired_conntrack) + len(expired_nat)
        self._forget(expired_conntrack, expired_nat)
        self._forget_evicted()
        self.push_due(now)
        self._want_served_targets()
        if self._journal_path is not None and (
            self._journal_needs_compaction or self.counters.journal_bytes > MAX_JOURNAL_BYTES
        ):
            try:
                self.compact()
            except OSError as error:
                self.counters.journal_errors += 1
                log.warning(
                    "host %s: flow-state journal compaction failed: %s", self.host_id, error
                )

    def _forget(self, conntrack: list[ConntrackRecord], nat: list[NatRecord]) -> None:
        """Entries left the tables (expired, evicted, or a binding replaced by a newer one
        or dropped by a SYN's rebinding): remove the flows tagged with them."""
        tags: set[int] = set()
        texts = ConnectionTags()  # each NAT tag made once (see `_install`)
        for record in conntrack:
            tags.add(texts.conntrack(record.zone, record.key))
        for nat_record in nat:
            binding = nat_record.binding
            tags.add(texts.nat(binding))
            tags.add(texts.nat_reply(binding.zone, binding.kind, binding.translated))
        if tags:
            self._invalidate(tags)

    def _forget_evicted(self) -> None:
        """Entries a full table evicted (see `ConntrackTable`, `NatTable`), and bindings a
        newer one with the same original or translated key replaced or a SYN's rebinding
        dropped (`NatTable.take_replaced`: their forward flows carry only their own
        `nat_tag`, which nothing else invalidates when the newer binding differs or is rolled
        back)."""
        nat_table = self.nat
        conntrack, nat = self.conntrack.take_evicted(), nat_table.take_evicted()
        replaced = nat_table.take_replaced()
        if replaced:
            nat += replaced
        if conntrack or nat:
            self._forget(conntrack, nat)

    def _touch_used(self, now: float) -> None:
        """Flow statistics to entries: each flow used since the last scan keeps the entries
        its connection tags name alive (and due for their next refresh push). A tag is read
        back (as `transaction.split_tag` does: kind, zone hash, key) and its entry looked up
        in the table, so the agent keeps no map from tags to entries (two dict slots a
        connection). An entry's timer moves only when its deadline lags by a fraction of its
        timeout (`schedule.USE_SLACK`): most scans leave it. Many flows are scanned in slices
        (`SCAN_FLOWS_PER_SLICE`): each flow is checked when its slice's turn comes, against
        the time its slice was last scanned, so no use is missed, only noted up to a pass
        later."""
        flows = self.datapath.flows()
        scan_since = self._scan_since
        slices = len(scan_since)
        # This tick's share: enough slices for SCAN_FLOWS_PER_SLICE flows, at least one.
        share = min(slices, max(1, -(-slices * SCAN_FLOWS_PER_SLICE // max(len(flows), 1))))
        first = self._scan_next
        self._scan_next = (first + share) % slices
        # Per slice: a use after this is new (inf: not this tick's slice).
        limits = [math.inf] * slices
        for index in range(first, first + share):
            limits[index % slices] = scan_since[index % slices]
            scan_since[index % slices] = now
        since = min(limits)
        whole = share == slices and max(limits) == since  # every slice, scanned together
        zones = self._zones_by_hash
        rebuilt = False
        conntrack, nat, counters = self.conntrack, self.nat, self.counters
        for flow in flows:
            used = flow.last_used
            if used <= since:
                continue
            if not whole and used <= limits[(id(flow) * _SLICE_MIX >> 64) % slices]:
                continue
            # Only a connection's tags name entries: its own (2), not the path's (~20, and
            # `tags` would build their tuple).
            for tag in flow.own_tags:
                if type(tag) is not int:
                    continue
                # `split_tag`, inline (two tags a used flow, every scan).
                hashed = tag >> TAG_ZONE_SHIFT & TAG_ZONE_MASK
                names = zones.get(hashed)
                if names is None:
                    if rebuilt:
                        continue
                    zones = self._zones_by_hash = self._zones_by_their_hash()
                    rebuilt = True
                    names = zones.get(hashed)
                    if names is None:
                        continue
                # The key as a plain int: the tables' dicts are keyed so (see `PackedKeys`).
                kind, key = tag & TAG_KIND_MASK, tag >> TAG_KEY_SHIFT
                for zone in names:
                    if kind == CONNTRACK_TAG_KIND:
                        refreshed = conntrack.note_use(zone, key, now)
                    else:
                        refreshed = nat.note_use(zone, NAT_TAG_KINDS[kind], key, now)
                    if refreshed:
                        counters.refreshed_entries += 1

    def _zones_by_their_hash(self) -> dict[int, tuple[str, ...]]:
        zones: dict[int, tuple[str, ...]] = {}
        for zone in {*self.conntrack.zones(), *self.nat.zones()}:
            hashed = zone_hash(zone)
            zones[hashed] = (*zones.get(hashed, ()), zone)
        return zones

    # ------------------------------------------------------------------ NAT port blocks

    def on_block_change(self, key: str, value: bytes | None) -> None:
        """The store watch saw a NAT block key change (ours or another host's)."""
        try:
            block = parse_block_key(key)
        except PortBlockError:
            return
        if value is None:
            self._blocks_taken.discard(block)
            if block in self.allocator.blocks:
                # Our lease on it is gone (lease lost): live SNAT bindings still use its
                # ports, so keep it and take it again on the current lease (the leaser
                # retries until the agent holds a live one); `reclaim_blocks` drops it only
                # if another host took it first.
                self._blocks_to_retake.add(block)
                self._lease_wakeup.set()
        elif value.decode(errors="replace") != self.host_id:
            self._blocks_taken.add(block)

    def _want_served_targets(self) -> None:
        """When the topology changed: want a block of every SNAT range this host may now
        translate to and holds none of (the leaser takes them in the background)."""
        if self.topology.revision == self._served_at:
            return
        self._served_at = self.topology.revision
        self._served_targets = snat_targets_served(self.topology, self.host_id)
        for target in self._served_targets:
            if self.allocator.capacity(target) == 0 and target not in self._wanted:
                self._wanted[target] = None
                self._lease_wakeup.set()

    async def lease_ahead(self) -> int:
        """Lease one block of each SNAT range this host may translate to and holds none of,
        now (at start, so the very first packet finds a port). Returns how many it leased;
        a store failure leaves the range to the background leaser."""
        self._want_served_targets()
        leased = 0
        for target, destination in list(self._wanted.items()):
            if destination is not None or self.allocator.capacity(target):
                continue
            try:
                block = await self.lease_block(target, ahead=True)
            except StoreError as error:
                log.warning("host %s: NAT block lease failed: %s", self.host_id, error)
                continue
            del self._wanted[target]
            leased += block is not None
        return leased

    async def _lease_loop(self) -> None:
        while True:
            await self._lease_wakeup.wait()
            self._lease_wakeup.clear()
            if self._blocks_to_retake:
                await self.reclaim_blocks(sorted(self._blocks_to_retake))
                if self._blocks_to_retake:  # store unreachable or our lease not renewed yet
                    await asyncio.sleep(0.5)
                    self._lease_wakeup.set()
            wanted = list(self._wanted.items())
            self._wanted.clear()
            for target, destination in wanted:
                if destination is not None and not self.allocator.is_running_low(
                    target, destination
                ):
                    continue  # a block leased meanwhile (or ports freed) was enough
                if (
                    destination is None
                    and target not in self._dropped_for
                    and self.allocator.capacity(target)
                ):
                    continue  # wanted for having no block, and it has one by now
                try:
                    ahead = target not in self._dropped_for
                    self._dropped_for.discard(target)
                    await self.lease_block(target, ahead=ahead)
                except StoreError as error:
                    log.warning("host %s: NAT block lease failed: %s", self.host_id, error)
                    self._wanted[target] = destination
                    await asyncio.sleep(0.5)
                    self._lease_wakeup.set()

    async def reclaim_blocks(self, blocks: Iterable[PortBlock] | None = None) -> None:
        """Take held `blocks` (default: all) again on the current lease: after a restart
        (the blocks of restored bindings) and after the agent lost its lease and took a new
        one (the store deleted the keys of the old one). A block whose key is still ours is
        moved to the current lease; a vanished one is created again (create_revision == 0);
        only a block another host took meanwhile is dropped from the allocator, with its
        bindings' ports. A block the store could not answer for stays to retake."""
        if self.store is None:
            self._blocks_to_retake.clear()
            return
        for block in sorted(self.allocator.blocks if blocks is None else blocks):
            if block not in self.allocator.blocks:
                self._blocks_to_retake.discard(block)
                continue
            self._blocks_to_retake.add(block)
            key = block.store_key()
            mine = Compare(key, "value", "==", self.host_id.encode())
            put = Put(key, self.host_id.encode(), lease=self.lease_id())
            try:
                result = await self.store.txn([mine], [put])
                if not result.succeeded:
                    result = await self.store.txn([Compare(key, "create_revision", "==", 0)], [put])
            except StoreError as error:
                log.warning("host %s: cannot reclaim NAT block %s: %s", self.host_id, key, error)
                continue
            self._blocks_to_retake.discard(block)
            if result.succeeded:
                self.counters.blocks_retaken += 1
                continue
            log.warning("host %s: NAT block %s was taken by another host", self.host_id, key)
            self.allocator.remove_block(block)
            self._blocks_taken.add(block)
            self.counters.blocks_lost += 1
            self._served_at = -1  # lease ahead again for a range left without a block

    async def lease_block(self, target: NatRange, *, ahead: bool = False) -> PortBlock | None:
        """Lease one more block of `target` through the store; None when all are taken.
        `ahead`: no packet is waiting for it (counted in `blocks_leased_ahead`)."""
        if self.store is None:
            return None
        for block in self.allocator.blocks_to_try(target, self._blocks_taken, limit=16):
            key = block.store_key()
            result = await self.store.txn(
                [Compare(key, "create_revision", "==", 0)],
                [Put(key, self.host_id.encode(), lease=self.lease_id())],
            )
            if result.succeeded:
                self.allocator.add_block(block)
                self.counters.blocks_leased += 1
                self.counters.blocks_leased_ahead += ahead
                return block
            self.counters.block_conflicts += 1
            self._blocks_taken.add(block)
        return None

    # ------------------------------------------------------------------ persistence

    def _journal_append(self, message: bytes, written_at: float | None = None) -> None:
        """Append one record; a failure (disk full, ...) is counted and logged, never raised:
        the packet and the peers' state do not depend on the local journal."""
        if self._journal_path is None:
            return
        try:
            self._journal_write(self._journal_path, message, written_at)
        except OSError as error:
            self.counters.journal_errors += 1
            self._journal_needs_compaction = True
            log.warning("host %s: flow-state journal write failed: %s", self.host_id, error)

    def _journal_write(self, path: Path, message: bytes, written_at: float | None) -> None:
        if self._journal is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._journal = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        age = 0.0 if written_at is None else self.clock() - written_at
        record = _JOURNAL_HEADER.pack(len(message), self.wall_clock() - age) + message
        # One write per record: after a kill -9 the kernel still has it (no fsync: a host
        # crash takes the connections with it anyway).
        written = os.write(self._journal, record)
        if written != len(record):
            raise OSError(f"short journal write: {written} of {len(record)} bytes")
        self.counters.journal_bytes += len(record)

    def compact(self) -> None:
        """Replace the journal by a snapshot of the live entries."""
        if self._journal_path is None:
            return
        now = self.clock()
        message = encode(self.conntrack.snapshot(now), self.nat.snapshot(now), now=now)
        tmp = self._journal_path.with_suffix(".tmp")
        self._journal_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(_JOURNAL_HEADER.pack(len(message), self.wall_clock()) + message)
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None
        tmp.replace(self._journal_path)
        self.counters.journal_bytes = len(message) + _JOURNAL_HEADER.size
        self._journal_needs_compaction = False

    def restore(self) -> int:
        """Load the journal (after a restart). Returns how many live entries it held."""
        if self._journal_path is None or not self._journal_path.exists():
            return 0
        data = self._journal_path.read_bytes()
        now, wall_now = self.clock(), self.wall_clock()
        offset = restored = 0
        while offset + _JOURNAL_HEADER.size <= len(data):
            length, written = _JOURNAL_HEADER.unpack_from(data, offset)
            start = offset + _JOURNAL_HEADER.size
            if start + length > len(data):
                break  # torn last record
            try:
                batch = decode_stream(data[start : start + length], now - (wall_now - written))
            except WireFormatError as error:
                log.warning(
                    "host %s: journal record at %d unreadable: %s", self.host_id, offset, error
                )
                break
            for record in batch.conntrack:
                self.conntrack.merge(record, now)
            for nat_record in batch.nat:
                self.nat.merge(nat_record, now)
            offset = start + length
        # Our SNAT bindings' ports must stay ours: re-hold their blocks.
        for nat_record in self.nat.snapshot(now):
            binding = nat_record.binding
            if binding.kind is NatKind.SNAT:
                translated = binding.translated
                with contextlib.suppress(PortBlockError):
                    self.allocator.add_block(
                        PortBlock(
                            translated.ip_version,
                            translated.ip_src,
                            translated.tp_src // self.allocator.block_size,
                        )
                    )
        restored = len(self.conntrack) + len(self.nat)
        self.counters.restored_entries = restored
        self.compact()
        return restored

    def counters_snapshot(self) -> dict[str, int]:
        out = {
            name: getattr(self.counters, name)
            for name in self.counters.__dataclass_fields__
            if name != "by_event"
        }
        out["connections"] = len(self.conntrack)
        out["nat_bindings"] = len(self.nat)
        out["max_entries"] = self.conntrack.max_entries or 0  # of each table; 0: unbounded
        out["evicted_connections_half_open"] = self.conntrack.evicted_half_open
        out["evicted_connections_other"] = self.conntrack.evicted_other
        out["evicted_nat_bindings_unused"] = self.nat.evicted_unused
        out["evicted_nat_bindings_other"] = self.nat.evicted_other
        out["nat_blocks"] = len(self.allocator.blocks)
        return out


def is_nat_block_key(key: str) -> bool:
    return key.startswith(NAT_BLOCK_PREFIX)
