"""Throwaway etcd clusters for the store tests: one per test session, plus helpers.

Owns: starting clusters with `hivenet.lab.etcd` under a fresh `hn-etcd-*` directory (on
/dev/shm when there is one, so fsync costs nothing), stopping them by PID at the end (also when
a test fails; and since their members die with this process, also when the run is killed:
`hivenet lab clean` then removes the directory left behind), and wiping a cluster between tests (revoke every lease, delete every key) so
each test starts from an empty key space. It must not touch any etcd it did not start.

etcd missing is a test error with the install hint, never a silent skip.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from aetcd import rpc

from hivenet.lab.etcd import DEFAULT_ETCD_BINARY, EtcdCluster, start_cluster, stop_all

_FAST_DISK = Path("/dev/shm")
_WIPE_TIMEOUT = 5.0


def require_etcd() -> None:
    if not DEFAULT_ETCD_BINARY.is_file():
        pytest.fail(
            f"{DEFAULT_ETCD_BINARY} not found: the etcd store tests need Debian's etcd-server "
            "(run `make apt`, or `apt-get install -y etcd-server`)",
            pytrace=False,
        )


@contextmanager
def running_cluster(size: int = 3, **options: Any) -> Iterator[EtcdCluster]:
    """A fresh `size`-member cluster, stopped by PID and removed on exit. It is secure (TLS,
    client certificates, etcd auth: see `hivenet.lab.etcd`) unless `secure=False`; `options`
    go to `start_cluster`."""
    require_etcd()
    base = _FAST_DISK if _FAST_DISK.is_dir() else None
    directory = Path(tempfile.mkdtemp(prefix="hn-etcd-", dir=base))
    try:
        cluster = start_cluster(directory, size=size, die_with_owner=True, **options)
        try:
            yield cluster
        finally:
            cluster.stop(remove_data=False, graceful=False)  # throwaway: no need to wait
    finally:
        stop_all(directory)  # whatever a failed start or stop left running
        shutil.rmtree(directory, ignore_errors=True)


def wipe(cluster: EtcdCluster) -> None:
    """Revoke every lease and delete every key, through the first healthy member, so the next
    test sees an empty store and no lease of an earlier test expires in the middle of it."""
    for member in cluster.members:
        if not cluster.is_running(member.name):
            continue
        channel = cluster.admin_channel(member)  # root, by its client certificate
        try:
            leases = rpc.LeaseStub(channel)
            listed = leases.LeaseLeases(rpc.LeaseLeasesRequest(), timeout=_WIPE_TIMEOUT)
            for lease in listed.leases:
                try:
                    leases.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease.ID), timeout=_WIPE_TIMEOUT)
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:  # expired meanwhile: fine
                        raise
            rpc.KVStub(channel).DeleteRange(
                rpc.DeleteRangeRequest(key=b"\0", range_end=b"\0"), timeout=_WIPE_TIMEOUT
            )
            return
        finally:
            channel.close()
    raise RuntimeError(f"no running member to wipe in {cluster!r}")
