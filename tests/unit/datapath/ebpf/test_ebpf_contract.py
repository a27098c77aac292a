"""The `Datapath` contract (tests/unit/datapath/test_contract.py) on the eBPF datapath: every
case runs again with `EbpfReplayRig`, where frames of offloaded flows are forwarded by the fake
kernel and never reach userspace, so a case passes only if the kernel entries are right, are
removed with their megaflows, and their counters keep the megaflows alive.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.datapath.ebpf.rig import EbpfReplayRig
from tests.unit.datapath.rigs import Rig
from tests.unit.datapath.test_contract import *  # noqa: F403 (the cases, collected here again)


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    made = EbpfReplayRig(monkeypatch.setattr)
    try:
        yield made
    finally:
        made.close()
