"""`hivenet.nsutil` on a real kernel: a namespace made without forking has its loopback up
and (when asked) IPv6 off, a thread can enter it and work there, and removal is idempotent."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from hivenet import nsutil
from hivenet.lab.netns import LabScope

pytestmark = pytest.mark.e2e


@pytest.fixture
def namespace_name() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("e2e: needs root (network namespaces)")
    name = LabScope.unique().namespace("ns")
    try:
        yield name
    finally:
        nsutil.remove_namespace(name)
        assert not nsutil.namespace_exists(name)


def inside_view() -> tuple[int, str, str]:
    """(this thread's netns inode, lo state, IPv6 default switch) as seen from inside."""
    with nsutil.iproute() as ipr:
        index = nsutil.link_index(ipr, "lo")
        assert index is not None
        state = str(ipr.get_links(index)[0].get("state"))
    with open("/proc/sys/net/ipv6/conf/default/disable_ipv6") as setting:
        ipv6_off = setting.read().strip()
    return os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino, state, ipv6_off


@pytest.mark.parametrize("ipv6", [True, False])
def test_create_enter_and_remove(namespace_name: str, ipv6: bool) -> None:
    nsutil.create_namespace(namespace_name, ipv6=ipv6)
    assert namespace_name in nsutil.list_namespaces(namespace_name[:6])
    assert nsutil.namespace_is_live(namespace_name)
    with pytest.raises(OSError, match="already exists"):
        nsutil.create_namespace(namespace_name)
    inode, lo_state, ipv6_off = nsutil.in_namespace(namespace_name, inside_view)
    assert inode == os.stat(nsutil.namespace_path(namespace_name)).st_ino
    assert inode != os.stat("/proc/self/ns/net").st_ino  # the caller's thread stayed home
    assert lo_state == "up"
    assert ipv6_off == ("0" if ipv6 else "1")
    assert nsutil.remove_namespace(namespace_name)
    assert not nsutil.remove_namespace(namespace_name)
    assert not nsutil.namespace_is_live(namespace_name)


def test_entering_a_missing_namespace_names_it(namespace_name: str) -> None:
    with pytest.raises(OSError, match=namespace_name):
        nsutil.in_namespace(namespace_name, inside_view)
