"""bench/datapath.py's in-process micro-benchmark runs against the current datapath code (it
drives the userspace datapath with fake sockets, so a datapath change can break it without
any other test noticing: one did, when counters began reading the tunnel socket's drops)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "datapath.py"


def test_the_micro_benchmark_runs_and_measures_every_case() -> None:
    spec = importlib.util.spec_from_file_location("hn_bench_datapath", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    results = bench.micro_benchmark(frames_per_case=64, flow_count=16)
    assert results["datapath: port -> port"] > 0
    assert results["datapath: port -> VXLAN"] > 0
    assert all(value > 0 for value in results.values()), results
