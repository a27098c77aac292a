"""Fixtures for the root-only end-to-end tests: uniquely named lab namespaces that are always
removed (also when a test fails), and a handle on a `UserspaceDatapath` test driver running in
a host namespace.

Every test here is marked `e2e`. Without root they are skipped with that reason; as root on a
machine with netns/veth/VXLAN they must run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hivenet.datapath._testdriver import driver_argv, read_counters, request_counters
from hivenet.lab.cleanup import clean
from hivenet.lab.netns import LabScope, NamespaceProcess, start_in_namespace

E2E_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(E2E_DIR):
            item.add_marker(pytest.mark.e2e)
            # Tests on a lab whose agents run the datapath of HN_LAB_DATAPATH (tests/e2e/
            # common.py): `make test` runs these once per datapath.
            module = getattr(item, "module", None)
            if hasattr(module, "lab_datapath") or hasattr(module, "running_lab"):
                item.add_marker(pytest.mark.lab)


@pytest.fixture
def lab_scope() -> Iterator[LabScope]:
    """A fresh `LabScope` (unique 4-character tag); everything named in it is removed after the
    test, whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("e2e: needs root (network namespaces, veth, VXLAN)")
    scope = LabScope.unique()
    clean(scope.tag)
    try:
        yield scope
    finally:
        report = clean(scope.tag)
        assert not report.failures, report.failures


class DatapathDriver:
    """A `python -m hivenet.datapath._testdriver` process in a host namespace."""

    def __init__(self, process: NamespaceProcess, counters_file: Path, log_file: Path) -> None:
        self.process = process
        self.counters_file = counters_file
        self.log_file = log_file

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if read_counters(self.counters_file) is not None:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"datapath driver did not start:\n{self.log_file.read_text()}")

    def counters(self) -> dict[str, int]:
        """Fresh counters (the driver writes them on SIGUSR1)."""
        try:
            return request_counters(self.process.pid, self.counters_file)
        except TimeoutError as error:
            raise AssertionError(f"{error}:\n{self.log_file.read_text()}") from None

    def assert_alive(self) -> None:
        assert self.process.poll() is None, self.log_file.read_text()


@pytest.fixture
def start_datapath(tmp_path: Path) -> Iterator[Any]:
    """`start_datapath(namespace, config) -> DatapathDriver`; every driver is stopped after
    the test (the lab_scope cleanup would also end it, by its PID file)."""
    drivers: list[DatapathDriver] = []

    def start(namespace: str, config: dict[str, Any]) -> DatapathDriver:
        name = f"dp{len(drivers)}"
        config_file = tmp_path / f"{name}.json"
        config_file.write_text(json.dumps(config))
        counters_file = tmp_path / f"{name}.counters.json"
        log_file = tmp_path / f"{name}.log"
        with log_file.open("wb") as log:
            process = start_in_namespace(
                namespace, driver_argv(config_file, counters_file), label=name, output=log
            )
        driver = DatapathDriver(process, counters_file, log_file)
        drivers.append(driver)
        driver.wait_ready()
        return driver

    yield start
    for driver in drivers:
        driver.process.stop()
