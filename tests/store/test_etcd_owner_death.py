"""Throwaway etcd members die with the process that started them, however it dies, and
`clean_stale_clusters` (run by `hivenet lab clean`) removes what a dead owner left on disk.

A pytest run in a subprocess starts a cluster (`die_with_owner=True`, as the store tests do)
and is killed with SIGTERM or SIGKILL, so no finalizer runs: no member may outlive it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hivenet.lab.etcd import CLUSTER_FILE, ETCD_SUBDIR, clean_stale_clusters
from tests.store.etcd_cluster import require_etcd

REPOSITORY = Path(__file__).resolve().parents[2]

OWNER_TEST = textwrap.dedent(
    """
    import json, os, time
    from pathlib import Path
    from hivenet.lab.etcd import start_cluster

    def test_hold_a_cluster():
        cluster = start_cluster(Path(os.environ["HN_OWNER_DIR"]), die_with_owner=True)
        pids = [cluster.pid(name) for name in cluster.names()]
        # Written aside and renamed: the test polls for the name, so it never reads it half-written.
        ready = Path(os.environ["HN_OWNER_READY"])
        ready.with_suffix(".tmp").write_text(json.dumps(pids))
        ready.with_suffix(".tmp").replace(ready)
        time.sleep(120)
    """
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.etcd  # its clusters start in a pytest of its own
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_no_member_outlives_a_killed_pytest(tmp_path: Path, signum: signal.Signals) -> None:
    require_etcd()
    test_file = tmp_path / "test_owner.py"
    test_file.write_text(OWNER_TEST)
    throwaway = tmp_path / "hn-etcd-owner"
    ready = tmp_path / "ready.json"
    environment = {**os.environ, "HN_OWNER_DIR": str(throwaway), "HN_OWNER_READY": str(ready)}
    runner = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest",
         "--rootdir", str(tmp_path), str(test_file)],
        cwd=REPOSITORY,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert runner.poll() is None, "the owner pytest ended before its cluster was up"
            assert time.monotonic() < deadline, "the owner pytest did not start its cluster"
            time.sleep(0.1)
        pids = json.loads(ready.read_text())
        assert len(pids) == 3 and all(_alive(pid) for pid in pids)
        runner.send_signal(signum)
        runner.wait(10)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in pids if _alive(pid)] == []
        # What the dead owner left on disk is stale now: cleaned, and only that.
        ended, removed = clean_stale_clusters((tmp_path,))
        assert ended == [] and removed == [str(throwaway)] and not throwaway.exists()
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        for pid in pids:  # only if the test failed: never leave a member behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _fake_cluster(root: Path, name: str, owner: dict[str, int] | None) -> Path:
    directory = root / name
    (directory / ETCD_SUBDIR).mkdir(parents=True)
    (directory / ETCD_SUBDIR / CLUSTER_FILE).write_text(json.dumps({"owner": owner}))
    return directory


def test_clean_leaves_a_cluster_whose_owner_runs_and_removes_one_whose_owner_is_gone(
    tmp_path: Path,
) -> None:
    own_start = int(Path(f"/proc/{os.getpid()}/stat").read_text().rpartition(")")[2].split()[19])
    live = _fake_cluster(tmp_path, "hn-etcd-live", {"pid": os.getpid(), "start_time": own_start})
    # Our own PID with another start time: a PID reused by a stranger is not the owner.
    gone = _fake_cluster(tmp_path, "hn-etcd-gone", {"pid": os.getpid(), "start_time": 1})
    unrelated = tmp_path / "not-hn-etcd"
    unrelated.mkdir()
    ended, removed = clean_stale_clusters((tmp_path,))
    assert ended == [] and removed == [str(gone)]
    assert live.exists() and unrelated.exists() and not gone.exists()


def test_clean_removes_an_ownerless_directory_only_once_no_start_can_be_writing_it(
    tmp_path: Path,
) -> None:
    old = _fake_cluster(tmp_path, "hn-etcd-old", None)
    fresh = _fake_cluster(tmp_path, "hn-etcd-fresh", None)
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    ended, removed = clean_stale_clusters((tmp_path,))
    assert ended == [] and removed == [str(old)] and fresh.exists()
