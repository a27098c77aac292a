"""The datapath test driver (`hivenet.datapath._testdriver`: static flows from a JSON config,
counters to a file on SIGUSR1) on `EbpfDatapath`, for e2e tests and benchmarks; SIGUSR2
invalidates the tag "static" (every config flow), so a test can watch the kernel entries go.

Run it inside the host's network namespace: `ip netns exec hn-h1 python -m
hivenet.datapath.ebpf._testdriver --config c.json --counters-file out.json`. Exits with status 3
and one line on stderr where the fast path cannot load.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from hivenet.datapath import _testdriver as base
from hivenet.datapath.ebpf.datapath import EbpfDatapath
from hivenet.datapath.ebpf.kernel import FastPathUnavailable

STATIC_TAG = "static"


class _DriverDatapath(EbpfDatapath):
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().start(loop)
        assert self._loop is not None
        self._loop.add_signal_handler(signal.SIGUSR2, self.invalidate, [STATIC_TAG])


def argv(config_file: str, counters_file: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "hivenet.datapath.ebpf._testdriver",
        "--config",
        config_file,
        "--counters-file",
        counters_file,
    ]


def main(arguments: list[str] | None = None) -> int:
    # The base driver's serve() builds the datapath it names; hand it this one instead.
    base.UserspaceDatapath = _DriverDatapath  # type: ignore[misc,assignment]
    try:
        return base.main(arguments)
    except FastPathUnavailable as error:
        print(f"ebpf datapath unavailable: {error}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
