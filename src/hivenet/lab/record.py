"""The record of one lab in its state dir: `lab.json` (what `lab up` decided, so a later
command in another process finds the same lab), the state dir's default and lock, and the list
of files a lab writes there.

Layout of the state dir (also the `hivenet serve` and agent state dir): `lab.json`, `lab.env`,
`hivenet.db` (SQLite store) or `etcd/` (the cluster's data, logs, PID records and
description), `admin-token`, `<namespace>.<label>.json` PID files and `.log` files,
`agent-<host>.json` counters, `flowstate-<host>/` journals.

Owns those files only; must not touch the kernel, processes or anything else in the dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hivenet.lab import netns
from hivenet.lab.netns import LabError

LAB_FILE = "lab.json"
ENV_FILE = "lab.env"
STORE_FILE = "hivenet.db"
TOKEN_FILE = "admin-token"
STORE_SQLITE = "sqlite"
STORE_ETCD = "etcd"
SUPPORTED_STORES = (STORE_SQLITE, STORE_ETCD)
DATAPATH_USERSPACE = "userspace"
DATAPATH_EBPF = "ebpf"
LAB_DATAPATHS = (DATAPATH_USERSPACE, DATAPATH_EBPF)
DEFAULT_LAB_DATAPATH = DATAPATH_EBPF  # as the agent's own default
LAB_RECORD_VERSION = 1


def default_state_dir() -> Path:
    """$HIVENET_LAB_STATE_DIR, else /run/hivenet-lab (where `hivenet lab clean` looks)."""
    return netns.state_dir()


@dataclass
class LabRecord:
    """What `lab up` wrote down, so later commands (another process) find the same lab."""

    tag: str
    scenario: dict[str, Any]
    store_url: str  # "" until an etcd cluster is up (its ports are picked at start)
    phase: str = "building"  # building -> up
    api_url: str | None = None
    macs: dict[str, str] = field(default_factory=dict)  # VM (or "ext") -> MAC of its port
    created_at: float = field(default_factory=time.time)
    store: str = STORE_SQLITE  # backend kind: "sqlite" or "etcd"
    agent_lease_ttl: int | None = None  # None: the agent's default
    datapath: str = DEFAULT_LAB_DATAPATH  # the agents' --datapath: userspace or ebpf
    # VMs plugged after `up` onto ports made through the API (`Lab.plug_vm`): name -> plan
    plugged: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": LAB_RECORD_VERSION,
                "tag": self.tag,
                "scenario": self.scenario,
                "store_url": self.store_url,
                "phase": self.phase,
                "api_url": self.api_url,
                "macs": self.macs,
                "created_at": self.created_at,
                "store": self.store,
                "agent_lease_ttl": self.agent_lease_ttl,
                "datapath": self.datapath,
                "plugged": self.plugged,
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, *, source: str) -> LabRecord:
        try:
            data = json.loads(text)
            if data.get("version") != LAB_RECORD_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {LAB_RECORD_VERSION}")
            return cls(
                tag=str(data["tag"]),
                scenario=dict(data["scenario"]),
                store_url=str(data["store_url"]),
                phase=str(data["phase"]),
                api_url=None if data.get("api_url") is None else str(data["api_url"]),
                macs={str(k): str(v) for k, v in dict(data.get("macs") or {}).items()},
                created_at=float(data.get("created_at") or 0.0),
                store=str(data.get("store") or STORE_SQLITE),
                agent_lease_ttl=(
                    None if data.get("agent_lease_ttl") is None else int(data["agent_lease_ttl"])
                ),
                datapath=str(data.get("datapath") or DATAPATH_USERSPACE),
                plugged={str(k): dict(v) for k, v in dict(data.get("plugged") or {}).items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise LabError(f"{source}: not a lab record ({error})") from None


def save_record(state_dir: Path, record: LabRecord) -> None:
    """Write `lab.json` atomically (the state dir is made, private, if missing)."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / LAB_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(record.to_json())
    temporary.replace(path)


def read_record(state_dir: Path) -> LabRecord:
    """The record in `state_dir/lab.json`; a clear error when there is none or it is bad."""
    path = state_dir / LAB_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LabError(
            f"no lab in {state_dir} (no {LAB_FILE}); start one with `hivenet lab up`"
        ) from None
    return LabRecord.from_json(text, source=str(path))


@contextlib.contextmanager
def state_dir_lock(state_dir: Path) -> Iterator[None]:
    """Only one `lab up`/`lab down` at a time per state dir (two would each record processes
    the other then cannot find). The lock file sits beside the state dir, which `down`
    removes, and is never deleted, so every waiter locks the same file."""
    lock_path = state_dir.with_name(f".{state_dir.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "another process"
            raise LabError(
                f"the lab in {state_dir} is being built or removed by PID {holder}; "
                "wait for it or use another --state-dir"
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(str(os.getpid()))
        lock_file.flush()
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


DHCP_DIR = "dhcp"  # the VMs' DHCP client scripts and lease files (`hivenet.lab.dhcpclient`)


def remove_lab_files(state_dir: Path) -> None:
    """Delete what a lab writes into its state dir (never anything else), then the dir if empty."""
    if not state_dir.is_dir():
        return
    patterns = [
        LAB_FILE,
        ENV_FILE,
        TOKEN_FILE,
        f"{STORE_FILE}*",
        "agent-*.json",
        "agent-*.tmp",
        f"{netns.NAME_PREFIX}*.json",
        f"{netns.NAME_PREFIX}*.log",
        f"{netns.NAME_PREFIX}*.tmp",
        f"{netns.NAME_PREFIX}*.conf",  # the outside router's BIRD (lab/outside.py)
        f"{netns.NAME_PREFIX}*.ctl",
        "lab.tmp",
    ]
    for pattern in patterns:
        for path in state_dir.glob(pattern):
            if path.is_file():
                path.unlink(missing_ok=True)
    # The agents' flow-state journals: a later lab in this dir must not inherit connections;
    # the VMs' DHCP client scripts and leases.
    for path in [*state_dir.glob("flowstate-*"), *state_dir.glob("bgp-*"), state_dir / DHCP_DIR]:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        state_dir.rmdir()
