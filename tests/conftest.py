"""Markers every tier shares: a test that needs an etcd cluster is marked `etcd`, so
`make test-fast` can leave it out on a machine without etcd (`make test` runs everything).

A test needs etcd when it asks for the `etcd_cluster` fixture (directly or through another
fixture), when one of its parameters is the etcd backend (the store contract suites pick their
backend by a parameter), or when its module starts clusters of its own (`running_cluster`).
"""

from __future__ import annotations

import pytest

ETCD = "etcd"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        by_parameter = callspec is not None and ETCD in callspec.params.values()
        by_fixture = "etcd_cluster" in getattr(item, "fixturenames", ())
        by_module = hasattr(getattr(item, "module", None), "running_cluster")
        if by_parameter or by_fixture or by_module:
            item.add_marker(pytest.mark.etcd)
