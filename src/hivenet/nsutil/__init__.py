"""Linux network namespaces, the low-level part the agent and the lab share: naming a namespace
under /run/netns, creating one without forking, entering one from a thread, netlink inside
one, and removing it. On pyroute2 (`pyroute2.netns`, `IPRoute`); only `unshare` goes through
libc, which pyroute2 offers no fork-free call for.

Why no fork: the agent is a threaded asyncio process (forking one is unsafe), and entering a
namespace moves only the calling thread, so work inside a namespace runs in a short-lived
thread of its own (`in_namespace`) or in pool threads that entered it once (`enter_namespace`
as their initializer) and never go back to general use.

Owns only these primitives. Must not touch any namespace or link its caller did not name, and
imports nothing of HiveNet (agent and lab both import it; see tests/unit/test_layers.py).
Errors are `OSError`s whose message names the namespace; callers wrap them in their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from pyroute2 import IPRoute, netns

NETNS_RUN_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000

T = TypeVar("T")


def namespace_path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def list_namespaces(prefix: str = "") -> list[str]:
    """Names under /run/netns starting with `prefix`, sorted (placeholders included)."""
    return sorted(name for name in netns.listnetns() if name.startswith(prefix))


def namespace_exists(name: str) -> bool:
    return os.path.lexists(namespace_path(name))


def namespace_is_live(name: str) -> bool:
    """True when /run/netns/<name> is a network namespace here (a bind mount of nsfs), False
    when it is missing or only a placeholder file (a mount made in another mount namespace)."""
    try:
        return os.stat(namespace_path(name)).st_dev == os.stat("/proc/self/ns/net").st_dev
    except FileNotFoundError:
        return False


def enter_namespace(name: str) -> None:
    """Move the calling THREAD into namespace `name` (e.g. a pool thread's initializer)."""
    try:
        netns.setns(name, flags=0)
    except OSError as error:
        raise OSError(error.errno, f"enter network namespace {name!r}: {error.strerror}") from None


def _unshare_network() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"unshare a network namespace: {os.strerror(code)}")


def in_namespace(name: str | None, work: Callable[[], T]) -> T:
    """Run `work` in a fresh thread inside namespace `name` (None: a new, unnamed one) and
    return its result; the thread ends afterwards, so no thread is left in the namespace."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if name is None:
                _unshare_network()
            else:
                enter_namespace(name)
            outcome.append(work())
        except BaseException as error:  # handed to the caller below
            failure.append(error)

    worker = threading.Thread(target=run, name="hn-netns")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0]


def create_namespace(name: str, *, ipv6: bool = True) -> None:
    """A new network namespace bound at /run/netns/<name> with its loopback up. Without
    `ipv6`, IPv6 is off for every interface that enters it (set before any link exists, so
    none ever sends an RS, DAD or MLD). The mount is made in the caller's mount namespace."""

    def bind_and_configure() -> None:
        # pyroute2's attach() shares /run/netns (as iproute2 does) and binds the namespace of
        # the given /proc path: this thread's, just unshared.
        netns.attach(name, f"self/task/{threading.get_native_id()}")
        if not ipv6:
            for scope in ("all", "default"):
                sysctl = f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"
                with contextlib.suppress(FileNotFoundError), open(sysctl, "w") as setting:
                    setting.write("1")  # (no such file: a kernel without IPv6)
        with IPRoute() as ipr:
            loopback = link_index(ipr, "lo")
            if loopback is not None:
                ipr.link("set", index=loopback, state="up")

    if namespace_exists(name):
        raise OSError(17, f"namespace {name!r} already exists")
    try:
        in_namespace(None, bind_and_configure)
    except OSError as error:
        with contextlib.suppress(OSError):
            netns.remove(name)
        raise OSError(error.errno, f"create namespace {name!r}: {error}") from error


def remove_namespace(name: str) -> bool:
    """Unmount and unlink /run/netns/<name>; False when there was nothing (idempotent). A
    placeholder's unmount fails quietly; the unlink is the point."""
    if not namespace_exists(name):
        return False
    try:
        netns.remove(name)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise OSError(error.errno, f"remove namespace {name!r}: {error}") from error
    return True


@contextlib.contextmanager
def iproute(name: str | None = None) -> Iterator[IPRoute]:
    """An `IPRoute` in namespace `name` (None: the caller's); never creates a namespace
    (FileNotFoundError when it does not exist)."""
    ipr = IPRoute() if name is None else IPRoute(netns=name, flags=0)
    try:
        yield ipr
    finally:
        ipr.close()


def link_index(ipr: IPRoute, name: str) -> int | None:
    """The index of link `name` as `ipr` sees it, None when there is no such link."""
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None
