"""Shared helpers of the end-to-end tests: one lab per module that is always taken down, with
the check that nothing of it is left behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hivenet.api.client import StoredObject
from hivenet.lab.cleanup import clean
from hivenet.lab.lab import Lab
from hivenet.lab.netns import LabScope, list_links, list_namespaces
from hivenet.lab.record import DEFAULT_LAB_DATAPATH
from hivenet.lab.scenario import Scenario


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("e2e: needs root (network namespaces, veth)")


def lab_datapath() -> str:
    """The agents' datapath for the e2e labs: the lab's default (ebpf), or HN_LAB_DATAPATH
    (`make test` runs the lab tests a second time with HN_LAB_DATAPATH=userspace)."""
    return os.environ.get("HN_LAB_DATAPATH", DEFAULT_LAB_DATAPATH)


@contextlib.contextmanager
def running_lab(
    scenario: Scenario, root: Path, *, timeout: float = 60, **options: Any
) -> Iterator[Lab]:
    """A lab of `scenario` up in `root/state` on a unique tag (`options` go to `Lab`: store,
    agent_lease_ttl); afterwards `down()` must remove everything it made, and nothing of the
    tag may be left for `clean` to find, whatever the test did."""
    require_root()
    scope = LabScope.unique()
    state_dir = root / "state"
    options.setdefault("datapath", lab_datapath())
    lab = Lab(scenario, state_dir=state_dir, scope=scope, **options)
    try:
        lab.up(timeout=timeout)
        yield lab
    finally:
        failures = lab.down()
        leftovers = clean(scope.tag, directory=state_dir)  # what `down` should have removed
        assert not failures, failures
        assert leftovers.is_empty(), leftovers
        assert not list_namespaces(scope.namespace_prefix)
        assert not list_links(scope.link_prefix)


def wait_applied(lab: Lab, written: StoredObject, hosts: tuple[str, ...]) -> None:
    """Wait until the agents of `hosts` have applied `written` (an API write the test made):
    traffic sent sooner may meet the state before it."""
    assert written.revision is not None
    for host in hosts:
        lab.wait_agent_revision(host, written.revision)
